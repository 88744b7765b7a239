//! Every `hubble observe` flag `hopwatch observe` supports (the README's table), against flows
//! stored in a collector process and against the same flows recorded to a file and read back
//! with `--input-file`: what each selects, how repetition ORs and different flags AND, `--not`,
//! the allow/deny lists, the printers' flags, and the Cilium-only flags' refusals.

use std::{
    io::Write as _,
    process::{Command, Stdio},
    sync::Arc,
    time::Duration,
};

use hopwatch::harness::Queue;
use hopwatch_proto::{
    flow::{
        Endpoint, Flow, Http, HttpHeader, Ip, IpVersion, Layer4, Layer7, NetworkInterface,
        TcpFlags, TraceContext, TraceParent, TrafficDirection, Udp, Verdict, Workload,
        layer4::Protocol, layer7::Record,
    },
    observer::{GetFlowsResponse, get_flows_response::ResponseTypes},
};
use tokio_util::sync::CancellationToken;

use super::{link_to, support::*, wait_until};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

fn endpoint(ns: &str, pod: &str, kind: &str, workload: &str) -> Option<Endpoint> {
    Some(Endpoint {
        namespace: ns.into(),
        pod_name: pod.into(),
        workloads: vec![Workload { name: workload.into(), kind: kind.into() }],
        ..Endpoint::default()
    })
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

/// Three flows that between them set every field the flags select on.
fn flows(t0: i64) -> Vec<GetFlowsResponse> {
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
                protocol: Some(Protocol::Tcp(hopwatch_proto::flow::Tcp {
                    source_port: 40000,
                    destination_port: 5432,
                    flags: Some(TcpFlags { syn: true, ack: true, ..TcpFlags::default() }),
                })),
            }),
            source: endpoint("prod", "web-7d9f", "Deployment", "web"),
            destination: endpoint("prod", "postgres-0", "StatefulSet", "postgres"),
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
                protocol: Some(Protocol::Tcp(hopwatch_proto::flow::Tcp {
                    source_port: 50000,
                    destination_port: 8080,
                    flags: None,
                })),
            }),
            source: endpoint("dev", "client-1", "Deployment", "client"),
            destination: endpoint("dev", "api-5", "Deployment", "api"),
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
fn cases() -> Vec<(Vec<String>, Vec<&'static str>, bool)> {
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

fn run(bin_args: &[String], stdin: Option<&str>) -> (Option<i32>, String, String) {
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

fn uuids(json_lines: &str) -> Vec<String> {
    json_lines
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
            v["flow"]["uuid"].as_str().expect("a flow with a uuid").to_owned()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[expect(clippy::too_many_lines, reason = "one scenario, checked flag by flag")]
async fn every_supported_hubble_flag_selects_the_same_flows_from_a_collector_and_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let collector = Collector::start(free_port(), dir.path(), &[]);
    let url = collector.url();
    let queue = Arc::new(Queue::new(1000, "n1"));
    let stop = CancellationToken::new();
    let link = link_to(&url, "n1", &queue, &stop);
    let t0 = now_ns() - 60_000_000_000;
    for f in flows(t0) {
        queue.offer(f);
    }
    wait_until("flows stored", Duration::from_secs(30), async || {
        queue.is_drained() && status(&url).await.is_some_and(|s| s.num_flows == 3)
    })
    .await;
    let server = ["--server".to_owned(), format!("127.0.0.1:{}", collector.port)];

    // The recording: what `observe -o json` printed, replayed through --input-file; a line of
    // Hubble's own output (a Cilium drop reason, an interface name) and a garbage line added.
    let (code, recorded, err) =
        run(&[&server[..], &["-o".into(), "json".into(), "--all".into()]].concat(), None);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(uuids(&recorded), ["tcp-web", "http-api", "drop"]);
    let hubble_line = r#"{"flow":{"time":"2026-11-23T16:00:00.5Z","uuid":"hubble-drop","verdict":"DROPPED","drop_reason_desc":"POLICY_DENIED","IP":{"source":"10.0.2.1","destination":"10.0.2.2","ipVersion":"IPv4"},"source":{"namespace":"kube-system","pod_name":"coredns-1","identity":102},"node_name":"k8s1","node_labels":["zone=c"],"interface":{"index":7,"name":"eth0"},"trace_observation_point":"TO_ENDPOINT","Summary":"policy"},"node_name":"k8s1","time":"2026-11-23T16:00:00.5Z"}"#;
    let file = dir.path().join("recorded.json");
    std::fs::write(&file, format!("{recorded}not a flow\n{hubble_line}\n")).unwrap();
    let from_file = ["--input-file".to_owned(), file.display().to_string()];

    for (args, want, hubble) in cases() {
        let json = ["-o".to_owned(), "json".to_owned()];
        let (code, out, err) = run(&[&server[..], &args, &json, &["--all".into()]].concat(), None);
        assert_eq!(code, Some(0), "{args:?}: {err}");
        assert_eq!(uuids(&out), want, "collector: {args:?}");
        // The file: the same selection, and the Hubble line when it matches.
        let (code, out, err) = run(&[&from_file[..], &args, &json, &["-s".into()]].concat(), None);
        assert_eq!(code, Some(0), "{args:?}: {err}");
        assert!(err.is_empty(), "--silent-errors: {err}");
        let mut want_file: Vec<&str> = want.clone();
        if hubble {
            want_file.push("hubble-drop");
        }
        assert_eq!(uuids(&out), want_file, "file: {args:?}");
    }
    // A CEL expression outside the supported subset is refused before any call.
    let (code, _, err) =
        run(&[&server[..], &["--cel-expression".into(), "_flow.nope == 1".into()]].concat(), None);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--cel-expression") && err.contains("has no field nope"), "{err}");

    // The Hubble line on its own: its Cilium drop reason, interface name and node labels.
    for (args, want) in [
        (&["--drop-reason-desc", "POLICY_DENIED"][..], &["hubble-drop"][..]),
        (&["--allowlist", r#"{"drop_reason_desc":["POLICY_DENIED"]}"#], &["hubble-drop"]),
        (&["--interface", "eth0"], &["hubble-drop"]),
        (&["--node-label", "zone=c"], &["hubble-drop"]),
        (&["--pod", "kube-system/coredns"], &["hubble-drop"]),
    ] {
        let args: Vec<String> = args.iter().map(|&a| a.to_owned()).collect();
        let (code, out, err) = run(
            &[&["--input-file".into(), "-".into(), "-o".into(), "json".into()], &args[..]].concat(),
            Some(&format!("{recorded}{hubble_line}\n")),
        );
        assert_eq!(code, Some(0), "{args:?}: {err}");
        assert_eq!(uuids(&out), want, "stdin: {args:?}");
    }
    // Without --silent-errors the skipped line is named.
    let (code, _, err) = run(&[&from_file[..], &["--ipv6".into()]].concat(), None);
    assert_eq!(code, Some(0));
    assert!(err.contains("line 4") && err.contains("skipped"), "{err}");
    // --first/--last over a file.
    let (_, out, _) = run(
        &[&from_file[..], &["-s", "--first", "1", "-o", "json"].map(String::from)].concat(),
        None,
    );
    assert_eq!(uuids(&out), ["tcp-web"]);
    let (_, out, _) = run(
        &[&from_file[..], &["-s", "--last", "2", "-o", "json"].map(String::from)].concat(),
        None,
    );
    assert_eq!(uuids(&out), ["drop", "hubble-drop"]);

    // --numeric: addresses instead of pod names.
    let compact = |extra: &[&str]| {
        let extra: Vec<String> = extra.iter().map(|&a| a.to_owned()).collect();
        let (code, out, err) = run(&[&server[..], &["--all".into()], &extra[..]].concat(), None);
        assert_eq!(code, Some(0), "{err}");
        out
    };
    let named = compact(&["--to-port", "5432"]);
    assert!(named.contains("prod/web-7d9f:40000 -> prod/postgres-0:5432"), "{named}");
    let numeric = compact(&["--to-port", "5432", "--numeric"]);
    assert!(numeric.contains("10.0.0.1:40000 -> 10.0.1.2:5432"), "{numeric}");
    // --use-default-field-masks: the default mask keeps everything the printers read.
    for format in ["compact", "dict", "table"] {
        let masked = compact(&["-o", format]);
        let full = compact(&["-o", format, "--use-default-field-masks=false"]);
        assert_eq!(masked, full, "{format}");
        assert!(full.contains("NETFILTER_DROP at nft_do_chain+0x3c4"), "{full}");
    }
    // --field-mask: only the named fields (JSON output only).
    let (code, out, err) = run(
        &[
            &server[..],
            &["--all", "-o", "json", "--field-mask", "uuid,verdict,source.pod_name"]
                .map(String::from),
        ]
        .concat(),
        None,
    );
    assert_eq!(code, Some(0), "{err}");
    let first: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(
        first["flow"],
        serde_json::json!({"uuid": "tcp-web", "verdict": "FORWARDED", "source": {"pod_name": "web-7d9f"}})
    );
    for (args, needle) in [
        (&["--field-mask", "time"][..], "--field-mask needs -o json"),
        (&["-o", "json", "--field-mask", "nope"], "\"nope\" is not a flow field"),
    ] {
        let (code, _, err) = run(
            &[&server[..], &args.iter().map(|&a| a.to_owned()).collect::<Vec<_>>()].concat(),
            None,
        );
        assert_eq!(code, Some(2), "{args:?}");
        assert!(err.contains(needle), "{err}");
    }

    // --print-raw-filters: Hubble's YAML, no call made (the server is unreachable).
    let (code, out, err) = run(
        &[
            "--server",
            "127.0.0.1:1",
            "--print-raw-filters",
            "--http-method",
            "get",
            "-A",
            "--not",
            "--drop-reason-desc",
            "NO_SOCKET",
        ]
        .map(String::from),
        None,
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        out,
        "allowlist:\n    - '{\"source_pod\":[\"/\"],\"http_method\":[\"get\"]}'\n    - '{\"destination_pod\":[\"/\"],\"http_method\":[\"get\"]}'\ndenylist:\n    - '{\"kernel_drop_reason\":[\"NO_SOCKET\"]}'\n"
    );

    // Cilium-only flags: one line saying why, exit 2, before any call.
    for flag in [
        "--identity=5",
        "--from-identity=5",
        "--to-identity=5",
        "--cluster=c",
        "--from-cluster=c",
        "--to-cluster=c",
        "--encrypted",
        "--unencrypted",
        "--snat-ip=1.1.1.1",
        "--ip-trace-id=1",
        "--ip-translation=false",
        "--print-policy-names",
        "--port-forward",
        "--port-forward-port=4245",
        "--kube-context=x",
        "--kubeconfig=x",
        "--kube-namespace=x",
        "--tls-allow-insecure",
        "--basic-auth-username=u",
        "--basic-auth-password=p",
        "--request-timeout=5s",
        "--config=x",
        "--debug",
    ] {
        let (code, out, err) = run(&[flag.to_owned()], None);
        assert_eq!(code, Some(2), "{flag}: {err}");
        assert!(out.is_empty());
        let name = flag.split('=').next().unwrap();
        assert_eq!(err.lines().count(), 1, "{flag}: {err}");
        assert!(err.contains(&format!("{name} is not supported: ")), "{flag}: {err}");
    }
    stop.cancel();
    link.await.unwrap();
}
