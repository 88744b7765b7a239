//! The flows and `hopwatch observe` flag cases the Hubble-flag tests share (the collector tests
//! and the compatibility test, which sends the same filters from a client generated from
//! Cilium's published API).

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use hopwatch_proto::{
    flow::{
        Endpoint, Flow, Http, HttpHeader, Ip, IpVersion, Layer4, Layer7, NetworkInterface, Tcp,
        TcpFlags, TraceContext, TraceParent, TrafficDirection, Udp, Verdict, Workload,
        layer4::Protocol, layer7::Record,
    },
    observer::{GetFlowsResponse, get_flows_response::ResponseTypes},
};

use super::support::BIN;

pub(crate) const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

fn endpoint(ns: &str, pod: &str, kind: &str, workload: &str) -> Endpoint {
    Endpoint {
        namespace: ns.into(),
        pod_name: pod.into(),
        workloads: vec![Workload { name: workload.into(), kind: kind.into() }],
        ..Endpoint::default()
    }
}

fn response(f: Flow, time_ns: i64) -> GetFlowsResponse {
    let ts = prost_types::Timestamp {
        seconds: time_ns / 1_000_000_000,
        nanos: i32::try_from(time_ns % 1_000_000_000).unwrap(),
    };
    GetFlowsResponse {
        time: Some(ts),
        node_name: f.node_name.clone(),
        response_types: Some(ResponseTypes::Flow(Flow { time: Some(ts), ..f })),
    }
}

/// Three flows that between them set every field the `hubble observe` flags select on.
pub(crate) fn hubble_flag_flows(t0: i64) -> Vec<GetFlowsResponse> {
    // prod/web-7d9f (Deployment web) → prod/postgres-0 (StatefulSet postgres), SYN+ACK, on n1
    // (zone=a).
    let tcp = response(
        Flow {
            uuid: "tcp-web".into(),
            verdict: Verdict::Forwarded.into(),
            ip: Some(Ip {
                source: "10.0.0.1".into(),
                destination: "10.0.1.2".into(),
                ip_version: IpVersion::IPv4.into(),
                encrypted: false,
            }),
            l4: Some(Layer4 {
                protocol: Some(Protocol::Tcp(Tcp {
                    source_port: 40000,
                    destination_port: 5432,
                    flags: Some(TcpFlags { syn: true, ack: true, ..TcpFlags::default() }),
                })),
            }),
            source: Some(endpoint("prod", "web-7d9f", "Deployment", "web")),
            destination: Some(endpoint("prod", "postgres-0", "StatefulSet", "postgres")),
            node_name: "n1".into(),
            node_labels: vec!["zone=a".into()],
            traffic_direction: TrafficDirection::Egress.into(),
            ..Flow::default()
        },
        t0,
    );
    // dev/client-1 → dev/api-5 over IPv6: GET http://api:8080/api/v1/users?id=3 → 503, traced.
    let http = response(
        Flow {
            uuid: "http-api".into(),
            verdict: Verdict::Error.into(),
            ip: Some(Ip {
                source: "fd00::1".into(),
                destination: "fd00::2".into(),
                ip_version: IpVersion::IPv6.into(),
                encrypted: false,
            }),
            l4: Some(Layer4 {
                protocol: Some(Protocol::Tcp(Tcp {
                    source_port: 50000,
                    destination_port: 8080,
                    flags: None,
                })),
            }),
            source: Some(endpoint("dev", "client-1", "Deployment", "client")),
            destination: Some(endpoint("dev", "api-5", "Deployment", "api")),
            node_name: "n2".into(),
            l7: Some(Layer7 {
                r#type: 2,
                latency_ns: 80_000_000,
                protocol: "http".into(),
                record: Some(Record::Http(Http {
                    code: 503,
                    method: "GET".into(),
                    url: "http://api:8080/api/v1/users?id=3".into(),
                    protocol: "HTTP/1.1".into(),
                    headers: vec![HttpHeader { key: "x-request-id".into(), value: "r-1".into() }],
                })),
                ..Layer7::default()
            }),
            trace_context: Some(TraceContext {
                parent: Some(TraceParent { trace_id: TRACE.into() }),
            }),
            traffic_direction: TrafficDirection::Ingress.into(),
            ..Flow::default()
        },
        t0 + 1_000_000,
    );
    // A DNS query dropped by netfilter on interface 3, no pods.
    let drop = response(
        Flow {
            uuid: "drop".into(),
            verdict: Verdict::Dropped.into(),
            ip: Some(Ip {
                source: "10.0.0.9".into(),
                destination: "10.96.0.10".into(),
                ip_version: IpVersion::IPv4.into(),
                encrypted: false,
            }),
            l4: Some(Layer4 {
                protocol: Some(Protocol::Udp(Udp { source_port: 33000, destination_port: 53 })),
            }),
            node_name: "n1".into(),
            node_labels: vec!["zone=b".into()],
            kernel_drop_reason: "NETFILTER_DROP".into(),
            kernel_drop_location: "nft_do_chain+0x3c4".into(),
            interface: Some(NetworkInterface { index: 3, name: String::new() }),
            ..Flow::default()
        },
        t0 + 2_000_000,
    );
    vec![tcp, http, drop]
}

/// (flags, the flows they select from the collector, whether they also select the line of
/// Hubble's output the recorded file adds: a POLICY_DENIED drop from kube-system/coredns-1 over
/// IPv4 on k8s1 (zone=c), interface 7 "eth0", no L4, no workloads). Every supported Hubble
/// filter flag is here at least once.
pub(crate) fn cases() -> Vec<(Vec<String>, Vec<&'static str>, bool)> {
    let c = |args: &[&str], want: &[&'static str], hubble: bool| {
        (args.iter().map(|&a| a.to_owned()).collect::<Vec<_>>(), want.to_vec(), hubble)
    };
    vec![
        c(&[], &["tcp-web", "http-api", "drop"], true),
        c(&["-A"], &["tcp-web", "http-api"], true),
        c(&["--all-namespaces"], &["tcp-web", "http-api"], true),
        c(&["--from-all-namespaces"], &["tcp-web", "http-api"], true),
        c(&["--to-all-namespaces", "--ipv4"], &["tcp-web"], false),
        c(&["--not", "-A"], &["drop"], false),
        c(&["--workload", "Deployment/web"], &["tcp-web"], false),
        c(&["--workload", "api"], &["http-api"], false),
        c(&["--workload", "web", "--workload", "api"], &["tcp-web", "http-api"], false),
        c(&["--from-workload", "client"], &["http-api"], false),
        c(&["--to-workload", "StatefulSet/"], &["tcp-web"], false),
        c(&["--drop-reason-desc", "netfilter_drop"], &["drop"], false),
        c(&["--drop-reason-desc", "SKB_DROP_REASON_NETFILTER_DROP"], &["drop"], false),
        c(&["--drop-reason-desc", "NO_SOCKET"], &[], false),
        c(&["--not", "--drop-reason-desc", "NETFILTER_DROP"], &["tcp-web", "http-api"], true),
        c(&["--http-url", r"users\?id=3$"], &["http-api"], false),
        c(&["--http-url", "^https://"], &[], false),
        c(&["--http-header", "X-Request-ID:r-1"], &["http-api"], false),
        c(&["--http-header", "x-request-id:r-2"], &[], false),
        c(&["--tcp-flags", "syn"], &["tcp-web"], false),
        c(&["--tcp-flags", "syn,fin"], &[], false),
        c(&["--tcp-flags", "fin", "--tcp-flags", "ack"], &["tcp-web"], false),
        c(&["--ipv4"], &["tcp-web", "drop"], true),
        c(&["-4"], &["tcp-web", "drop"], true),
        c(&["--ipv6"], &["http-api"], false),
        c(&["-4", "-6"], &["tcp-web", "http-api", "drop"], true),
        c(&["--not", "--ipv4"], &["http-api"], false),
        c(&["--trace-id", TRACE], &["http-api"], false),
        c(&["--trace-id", "0af7651916cd43dd8448eb211c80319c"], &[], false),
        c(&["--node-label", "zone=a"], &["tcp-web"], false),
        c(&["--node-label", "zone in (a,b)"], &["tcp-web", "drop"], false),
        c(&["--node-label", "zone=a", "--ipv4"], &["tcp-web"], false),
        c(&["--interface", "3"], &["drop"], false),
        c(&["--interface", "eth0"], &[], true),
        c(&["--cel-expression", "_flow.verdict == Verdict.DROPPED"], &["drop"], true),
        c(
            &[
                "--cel-expression",
                "_flow.l7.http.code >= 500 && _flow.destination.namespace == 'dev'",
                "--cel-expression",
                "_flow.node_labels.size() == 1 && 'zone=a' in _flow.node_labels",
            ],
            &["tcp-web", "http-api"],
            false,
        ),
        c(
            &["--cel-expression", "_flow.source.workloads.size() > 0 && _flow.IP.ipVersion == 1"],
            &["tcp-web"],
            false,
        ),
        c(&["--allowlist", r#"{"destination_port":["5432"]}"#], &["tcp-web"], false),
        c(
            &["--allowlist", r#"{"verdict":["DROPPED"]} {"source_ip":["fd00::/64"]}"#],
            &["http-api", "drop"],
            true,
        ),
        c(&["--denylist", r#"{"verdict":["DROPPED"]}"#], &["tcp-web", "http-api"], false),
        c(&["--ipv4", "--denylist", r#"{"node_labels":["zone=b"]}"#], &["tcp-web"], true),
        c(
            &["--allowlist", r#"{"trace_id":["4bf92f3577b34da6a3ce929d0e0e4736"]}"#],
            &["http-api"],
            false,
        ),
        c(&["--allowlist", r#"{"drop_reason_desc":["POLICY_DENIED"]}"#], &[], true),
        c(&["--allowlist", r#"{"kernel_drop_reason":["NETFILTER_DROP"]}"#], &["drop"], false),
    ]
}

pub(crate) fn run(bin_args: &[String], stdin: Option<&str>) -> (Option<i32>, String, String) {
    let mut child = Command::new(BIN)
        .arg("observe")
        .args(bin_args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run hopwatch observe");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or_default().as_bytes()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

pub(crate) fn uuids(json_lines: &str) -> Vec<String> {
    json_lines
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
            v["flow"]["uuid"].as_str().expect("a flow with a uuid").to_owned()
        })
        .collect()
}
