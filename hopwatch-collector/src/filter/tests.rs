//! Filter semantics, table-driven against Hubble's documented behaviour.

use hopwatch_proto::flow::{
    CiliumEventType, Dns, FlowType, Http, Ip, IpVersion, Layer4, Layer7, Tcp, TcpStats,
    TraceContext, TraceParent, TrafficDirection, Udp, Verdict, flow_filter::Experimental, layer7,
};

use super::*;

#[expect(clippy::unnecessary_wraps, reason = "fills Option<Endpoint> fields")]
fn ep(ns: &str, pod: &str, labels: &[&str]) -> Option<Endpoint> {
    Some(Endpoint {
        namespace: ns.into(),
        pod_name: pod.into(),
        labels: labels.iter().map(|s| (*s).to_owned()).collect(),
        workloads: vec![Workload {
            name: pod.split('-').next().unwrap().into(),
            kind: "Deployment".into(),
        }],
        identity: 42,
        ..Default::default()
    })
}

/// web (prod) → postgres (prod), TCP connect from 10.0.0.1:40000 to 10.0.1.2:5432, 12 ms.
fn tcp_flow() -> Flow {
    Flow {
        uuid: "u-tcp".into(),
        verdict: Verdict::Forwarded.into(),
        ip: Some(Ip {
            source: "10.0.0.1".into(),
            destination: "10.0.1.2".into(),
            ip_version: IpVersion::IPv4.into(),
            encrypted: false,
        }),
        l4: Some(Layer4 {
            protocol: Some(layer4::Protocol::Tcp(Tcp {
                source_port: 40000,
                destination_port: 5432,
                flags: Some(TcpFlags { syn: true, ack: true, ..Default::default() }),
            })),
        }),
        source: ep("prod", "web-7d9f", &["k8s:app=web", "env=prod"]),
        destination: ep("prod", "postgres-0", &["app=postgres"]),
        r#type: FlowType::L3L4.into(),
        node_name: "node-a".into(),
        node_labels: vec!["topology.kubernetes.io/zone=a".into()],
        destination_names: vec!["db.prod.svc.cluster.local.".into()],
        event_type: Some(CiliumEventType { r#type: 4, sub_type: 0 }),
        destination_service: Some(Service { name: "postgres".into(), namespace: "prod".into() }),
        traffic_direction: TrafficDirection::Egress.into(),
        is_reply: Some(false),
        tcp_stats: Some(TcpStats { connect_latency_ns: 12_000_000, ..Default::default() }),
        ..Default::default()
    }
}

/// An HTTP 503 response to GET /api/v1/users?id=3, 80 ms, on node-b, from `fd00::1` (dev).
fn http_flow() -> Flow {
    Flow {
        uuid: "u-http".into(),
        verdict: Verdict::Error.into(),
        ip: Some(Ip {
            source: "fd00::1".into(),
            destination: "fd00::2".into(),
            ip_version: IpVersion::IPv6.into(),
            encrypted: false,
        }),
        l4: Some(Layer4 {
            protocol: Some(layer4::Protocol::Tcp(Tcp {
                source_port: 50000,
                destination_port: 8080,
                flags: None,
            })),
        }),
        source: ep("dev", "client-1", &[]),
        destination: ep("dev", "api-5", &["app=api"]),
        r#type: FlowType::L7.into(),
        node_name: "node-b.example".into(),
        l7: Some(Layer7 {
            r#type: 2,
            latency_ns: 80_000_000,
            protocol: "http".into(),
            record: Some(layer7::Record::Http(Http {
                code: 503,
                method: "GET".into(),
                url: "http://api:8080/api/v1/users?id=3".into(),
                headers: vec![HttpHeader { key: "x-request-id".into(), value: "r-1".into() }],
                ..Default::default()
            })),
            ..Default::default()
        }),
        event_type: Some(CiliumEventType { r#type: 129, sub_type: 0 }),
        traffic_direction: TrafficDirection::Ingress.into(),
        is_reply: Some(true),
        trace_context: Some(TraceContext {
            parent: Some(TraceParent { trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into() }),
        }),
        client_ip: "203.0.113.7".into(),
        ..Default::default()
    }
}

/// A dropped DNS query for api.example.com. over UDP; no pods, no `is_reply`.
fn dns_drop() -> Flow {
    Flow {
        uuid: "u-dns".into(),
        verdict: Verdict::Dropped.into(),
        ip: Some(Ip {
            source: "10.0.0.9".into(),
            destination: "10.96.0.10".into(),
            ip_version: IpVersion::IPv4.into(),
            encrypted: false,
        }),
        l4: Some(Layer4 {
            protocol: Some(layer4::Protocol::Udp(Udp { source_port: 33000, destination_port: 53 })),
        }),
        node_name: "node-a".into(),
        l7: Some(Layer7 {
            record: Some(layer7::Record::Dns(Dns {
                query: "api.example.com.".into(),
                ..Default::default()
            })),
            ..Default::default()
        }),
        event_type: Some(CiliumEventType { r#type: 1, sub_type: 0 }),
        kernel_drop_reason: "NETFILTER_DROP".into(),
        interface: Some(NetworkInterface { index: 3, name: String::new() }),
        ..Default::default()
    }
}

fn ff(f: impl FnOnce(&mut FlowFilter)) -> FlowFilter {
    let mut x = FlowFilter::default();
    f(&mut x);
    x
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| (*x).to_owned()).collect()
}

#[test]
#[expect(clippy::too_many_lines, reason = "one table")]
fn single_filters_match_as_hubble_documents() {
    let flows = [tcp_flow(), http_flow(), dns_drop()];
    // (description, filter, [matches tcp, http, dns])
    let cases: Vec<(&str, FlowFilter, [bool; 3])> = vec![
        ("empty filter matches everything", ff(|_| {}), [true, true, true]),
        ("exact source ip", ff(|f| f.source_ip = s(&["10.0.0.1"])), [true, false, false]),
        ("source CIDR", ff(|f| f.source_ip = s(&["10.0.0.0/24"])), [true, false, true]),
        ("IPv6 CIDR", ff(|f| f.destination_ip = s(&["fd00::/64"])), [false, true, false]),
        (
            "OR within a field",
            ff(|f| f.source_ip = s(&["10.0.0.9", "fd00::1"])),
            [false, true, true],
        ),
        ("pod prefix in namespace", ff(|f| f.source_pod = s(&["prod/web-"])), [true, false, false]),
        (
            "pod prefix, any namespace",
            ff(|f| f.destination_pod = s(&["api"])),
            [false, true, false],
        ),
        ("whole namespace", ff(|f| f.destination_pod = s(&["dev/"])), [false, true, false]),
        (
            "pod prefix in wrong namespace",
            ff(|f| f.source_pod = s(&["dev/web"])),
            [false, false, false],
        ),
        (
            "fqdn glob",
            ff(|f| f.destination_fqdn = s(&["*.prod.svc.cluster.local"])),
            [true, false, false],
        ),
        ("label selector", ff(|f| f.source_label = s(&["app=web"])), [true, false, false]),
        (
            "label set",
            ff(|f| f.destination_label = s(&["app in (api,postgres)"])),
            [true, true, false],
        ),
        ("service", ff(|f| f.destination_service = s(&["prod/post"])), [true, false, false]),
        (
            "workload",
            ff(|f| {
                f.destination_workload = vec![Workload { name: "api".into(), kind: String::new() }];
            }),
            [false, true, false],
        ),
        ("identity", ff(|f| f.source_identity = vec![42]), [true, true, false]),
        ("destination port", ff(|f| f.destination_port = s(&["5432"])), [true, false, false]),
        ("source port", ff(|f| f.source_port = s(&["33000"])), [false, false, true]),
        ("verdict", ff(|f| f.verdict = vec![Verdict::Dropped.into()]), [false, false, true]),
        (
            "event type drop",
            ff(|f| f.event_type = vec![EventTypeFilter { r#type: 1, ..Default::default() }]),
            [false, false, true],
        ),
        (
            "event type with sub type",
            ff(|f| {
                f.event_type =
                    vec![EventTypeFilter { r#type: 4, match_sub_type: true, sub_type: 3 }];
            }),
            [false, false, false],
        ),
        ("http status prefix", ff(|f| f.http_status_code = s(&["5+"])), [false, true, false]),
        ("http status exact", ff(|f| f.http_status_code = s(&["404"])), [false, false, false]),
        ("http method, any case", ff(|f| f.http_method = s(&["get"])), [false, true, false]),
        (
            "http path regex",
            ff(|f| f.http_path = s(&["^/api/v[0-9]+/users$"])),
            [false, true, false],
        ),
        ("dns query regex", ff(|f| f.dns_query = s(&[r"example\.com\.$"])), [false, false, true]),
        ("protocol tcp", ff(|f| f.protocol = s(&["TCP"])), [true, true, false]),
        ("protocol udp", ff(|f| f.protocol = s(&["udp"])), [false, false, true]),
        ("protocol http (L7)", ff(|f| f.protocol = s(&["http"])), [false, true, false]),
        ("protocol dns (L7)", ff(|f| f.protocol = s(&["dns"])), [false, false, true]),
        ("node glob", ff(|f| f.node_name = s(&["node-*"])), [true, false, true]),
        (
            "node glob stays in a label",
            ff(|f| f.node_name = s(&["node-*.example"])),
            [false, true, false],
        ),
        (
            "traffic direction",
            ff(|f| f.traffic_direction = vec![TrafficDirection::Ingress.into()]),
            [false, true, false],
        ),
        ("reply true", ff(|f| f.reply = vec![true]), [false, true, false]),
        ("reply false; absent never matches", ff(|f| f.reply = vec![false]), [true, false, false]),
        ("ip version", ff(|f| f.ip_version = vec![IpVersion::IPv6.into()]), [false, true, false]),
        (
            "tcp flags subset",
            ff(|f| f.tcp_flags = vec![TcpFlags { syn: true, ..Default::default() }]),
            [true, false, false],
        ),
        ("uuid", ff(|f| f.uuid = s(&["u-dns"])), [false, false, true]),
        ("hopwatch: l7 protocol", ff(|f| f.l7_protocol = s(&["http"])), [false, true, false]),
        ("hopwatch: min latency (L7)", ff(|f| f.min_latency_ns = 50_000_000), [false, true, false]),
        (
            "hopwatch: min latency (connect)",
            ff(|f| f.min_latency_ns = 10_000_000),
            [true, true, false],
        ),
        ("pod prefix, any namespace", ff(|f| f.source_pod = s(&["/web-"])), [true, false, false]),
        ("any pod (--all-namespaces)", ff(|f| f.source_pod = s(&["/"])), [true, true, false]),
        (
            "trace id",
            ff(|f| f.trace_id = s(&["4bf92f3577b34da6a3ce929d0e0e4736"])),
            [false, true, false],
        ),
        (
            "hopwatch: forwarded client",
            ff(|f| f.client_ip = s(&["203.0.113.0/24"])),
            [false, true, false],
        ),
        (
            "http url regex",
            ff(|f| f.http_url = s(&[r"^http://api:8080/.*\?id=3$"])),
            [false, true, false],
        ),
        (
            "http header, key in any case",
            ff(|f| {
                f.http_header =
                    vec![HttpHeader { key: "X-Request-ID".into(), value: "r-1".into() }];
            }),
            [false, true, false],
        ),
        (
            "http header value exact",
            ff(|f| {
                f.http_header = vec![HttpHeader { key: "x-request-id".into(), value: "r".into() }];
            }),
            [false, false, false],
        ),
        (
            "cilium drop reason: hopwatch drops have none",
            ff(|f| f.drop_reason_desc = vec![DropReason::PolicyDenied.into()]),
            [false, false, false],
        ),
        (
            "cilium drop reason unknown: drops without one",
            ff(|f| f.drop_reason_desc = vec![DropReason::Unknown.into()]),
            [false, false, true],
        ),
        (
            "hopwatch: kernel drop reason, any case",
            ff(|f| f.kernel_drop_reason = s(&["netfilter_drop"])),
            [false, false, true],
        ),
        (
            "hopwatch: kernel drop reason with the kernel's prefix",
            ff(|f| f.kernel_drop_reason = s(&["SKB_DROP_REASON_NETFILTER_DROP", "NO_SOCKET"])),
            [false, false, true],
        ),
        (
            "interface index",
            ff(|f| f.interface = vec![NetworkInterface { index: 3, name: String::new() }]),
            [false, false, true],
        ),
        (
            "interface name",
            ff(|f| f.interface = vec![NetworkInterface { index: 0, name: "eth0".into() }]),
            [false, false, false],
        ),
        (
            "node labels",
            ff(|f| f.node_labels = s(&["topology.kubernetes.io/zone in (a,b)"])),
            [true, false, false],
        ),
        (
            "cel expression",
            ff(|f| {
                f.experimental = Some(Experimental {
                    cel_expression: s(&[
                        "_flow.verdict == Verdict.DROPPED",
                        "_flow.l7.http.code >= 500",
                    ]),
                });
            }),
            [false, true, true],
        ),
        (
            "AND across fields",
            ff(|f| {
                f.source_ip = s(&["10.0.0.0/8"]);
                f.verdict = vec![Verdict::Forwarded.into()];
            }),
            [true, false, false],
        ),
    ];
    for (what, filter, want) in cases {
        let set = FilterSet::new(std::slice::from_ref(&filter), &[]).expect(what);
        for (flow, want) in flows.iter().zip(want) {
            assert_eq!(set.matches(flow), want, "{what}: flow {}", flow.uuid);
        }
    }
}

#[test]
fn whitelist_is_or_and_blacklist_subtracts() {
    let flows = [tcp_flow(), http_flow(), dns_drop()];
    let run = |white: Vec<FlowFilter>, black: Vec<FlowFilter>| -> Vec<&str> {
        let set = FilterSet::new(&white, &black).unwrap();
        flows.iter().filter(|f| set.matches(f)).map(|f| f.uuid.as_str()).collect()
    };
    let tcp = ff(|f| f.protocol = s(&["tcp"]));
    let dropped = ff(|f| f.verdict = vec![Verdict::Dropped.into()]);
    let node_b = ff(|f| f.node_name = s(&["node-b.*"]));
    assert_eq!(run(vec![tcp.clone(), dropped.clone()], vec![]), ["u-tcp", "u-http", "u-dns"]);
    assert_eq!(run(vec![tcp.clone()], vec![node_b.clone()]), ["u-tcp"]);
    assert_eq!(run(vec![], vec![dropped]), ["u-tcp", "u-http"]);
    assert_eq!(run(vec![], vec![]), ["u-tcp", "u-http", "u-dns"]);
    // Hubble's CLI turns `--ip X` into two whitelist filters (source X, destination X).
    let either = vec![
        ff(|f| f.source_ip = s(&["10.96.0.10"])),
        ff(|f| f.destination_ip = s(&["10.96.0.10"])),
    ];
    assert_eq!(run(either, vec![]), ["u-dns"]);
}

#[test]
fn invalid_values_are_errors_naming_the_field() {
    let cases = [
        ff(|f| f.source_ip = s(&["10.0.0.0/40"])),
        ff(|f| f.destination_port = s(&["http"])),
        ff(|f| f.http_status_code = s(&["5xx"])),
        ff(|f| f.dns_query = s(&["(unclosed"])),
        ff(|f| f.source_label = s(&["app in prod"])),
        ff(|f| f.protocol = s(&["quic"])),
        ff(|f| f.source_pod = s(&[""])),
        ff(|f| f.l7_protocol = s(&["kafka"])),
        ff(|f| f.http_url = s(&["(unclosed"])),
        ff(|f| f.kernel_drop_reason = s(&["NETFILTER DROP"])),
        ff(|f| f.node_labels = s(&["zone in a"])),
        ff(|f| {
            f.experimental = Some(Experimental { cel_expression: s(&["_flow.nope == 1"]) });
        }),
    ];
    let fields = [
        "source_ip",
        "destination_port",
        "http_status_code",
        "dns_query",
        "source_label",
        "protocol",
        "source_pod",
        "l7_protocol",
        "http_url",
        "kernel_drop_reason",
        "node_labels",
        "cel_expression",
    ];
    for (filter, field) in cases.iter().zip(fields) {
        let err = FilterSet::new(&[], std::slice::from_ref(filter)).expect_err(field);
        assert!(err.to_string().contains(field), "{err} should name {field}");
    }
}

#[test]
fn block_and_entry_skipping_never_skip_a_match() {
    let flows = [tcp_flow(), http_flow(), dns_drop()];
    let filters = [
        ff(|f| f.destination_port = s(&["5432"])),
        ff(|f| f.verdict = vec![Verdict::Dropped.into()]),
        ff(|f| f.source_ip = s(&["fd00::1"])),
        ff(|f| f.protocol = s(&["icmp"])),
        ff(|f| f.l7_protocol = s(&["http"])),
        ff(|f| f.destination_pod = s(&["prod/"])),
        ff(|f| f.source_ip = s(&["10.0.0.0/8"])),
    ];
    for flow in &flows {
        let mut terms = Vec::new();
        terms::flow_terms(flow, |t| terms.push(t));
        for filter in &filters {
            let set = FilterSet::new(std::slice::from_ref(filter), &[]).unwrap();
            let sieve = set.sieve();
            if set.matches(flow) {
                assert!(
                    sieve.group(|t| terms.contains(&t)),
                    "{filter:?} matches {} but its terms say no",
                    flow.uuid
                );
                assert!(
                    sieve.entry(terms::entry_sieve(&terms)),
                    "{filter:?} matches {} but its sieve says no",
                    flow.uuid
                );
            }
        }
    }
    // And it does skip: a block with only the TCP flow cannot hold a DNS drop.
    let mut terms = Vec::new();
    terms::flow_terms(&tcp_flow(), |t| terms.push(t));
    let drops = FilterSet::new(&[ff(|f| f.verdict = vec![Verdict::Dropped.into()])], &[]).unwrap();
    assert!(!drops.sieve().group(|t| terms.contains(&t)));
    // No whitelist: nothing is ruled out.
    assert!(FilterSet::new(&[], &[]).unwrap().sieve().entry(0));
}

#[test]
fn entry_sieves_rule_out_most_flows_without_the_term() {
    // 1000 flows on distinct ports and addresses; a filter on a port none of them has lets
    // about one in twelve through (both of its bits set by chance), and never all.
    let drops = FilterSet::new(&[ff(|f| f.destination_port = s(&["6380"]))], &[]).unwrap();
    let sieve = drops.sieve();
    let through = (0..1000u32)
        .filter(|&i| {
            let mut f = tcp_flow();
            f.ip.as_mut().unwrap().destination = format!("10.1.{}.{}", i / 250, i % 250);
            if let Some(layer4::Protocol::Tcp(t)) = f.l4.as_mut().and_then(|l| l.protocol.as_mut())
            {
                t.destination_port = 10_000 + i;
            }
            let mut terms = Vec::new();
            terms::flow_terms(&f, |t| terms.push(t));
            sieve.entry(terms::entry_sieve(&terms))
        })
        .count();
    assert!(through < 200, "{through} of 1000 flows without the port passed the sieve");
}

#[test]
fn url_paths() {
    assert_eq!(url_path("http://h:80/a/b?x=1"), "/a/b");
    assert_eq!(url_path("/a?x"), "/a");
    assert_eq!(url_path("http://h"), "");
    assert_eq!(url_path("/p#frag"), "/p");
}

#[test]
fn sni_matches_handshakes_by_server_name() {
    let tls = |uuid: &str, name: &str| Flow {
        uuid: uuid.into(),
        tls_handshake: Some(hopwatch_proto::flow::TlsHandshake {
            server_name: name.into(),
            version: "TLS 1.3".into(),
            ..Default::default()
        }),
        ..http_flow()
    };
    let flows =
        [tls("api", "api.example.com"), tls("apex", "example.com"), tls("none", ""), http_flow()];
    let names = |filter: FlowFilter| -> Vec<String> {
        let set = FilterSet::new(&[filter], &[]).expect("valid");
        flows.iter().filter(|f| set.matches(f)).map(|f| f.uuid.clone()).collect()
    };
    assert_eq!(names(ff(|f| f.sni = s(&["API.Example.com"]))), ["api"]);
    assert_eq!(names(ff(|f| f.sni = s(&["*.example.com"]))), ["api"], "a subdomain, not the apex");
    assert_eq!(names(ff(|f| f.sni = s(&["example.com", "other.test"]))), ["apex"]);
    assert_eq!(names(ff(|f| f.l7_protocol = s(&["tls"]))).len(), 0, "l7.protocol is http here");
    let err = FilterSet::new(&[ff(|f| f.sni = s(&["bad name"]))], &[]).expect_err("a space");
    assert!(err.to_string().contains("sni"), "{err}");
}
