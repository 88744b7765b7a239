//! The application-protocol (L7) families through a real Prometheus, fed with synthetic L7 flows
//! (HTTP with a slow hop, failing requests, DNS answers with NXDOMAIN and SERVFAIL) by the
//! agent's own metrics code, in process.
//!
//! The real-traffic test checks the same panels on what the kernel saw; this one is their
//! deterministic complement: exact shapes the kernel test cannot make on demand (a failing upstream
//! HTTP hop, SERVFAIL answers, a client-and-server view of every exchange), and it fails for a
//! dashboard or rule mistake alone, never for timing.

use std::time::{Duration, Instant};

use hopwatch::harness::{MetricsAddr, MetricsArgs, Telemetry};
use hopwatch_proto::{
    clock::wall_now_ns,
    flow::{
        self as pb, Dns, Flow, FlowType, Ip, Layer4, Layer7, TrafficDirection, Verdict,
        layer4::Protocol, layer7::Record,
    },
};

use super::{Prometheus, SLOW_PORT, check_dashboards, needs_l7, repo_root, unix_now, value_of};
use crate::support::serial;

/// One end: (process name, address, port).
type End = (&'static str, &'static str, u32);

const FRONT: End = ("hwm-front", "10.99.0.1", 40_000);
const APP: End = ("hwm-app", "10.99.0.2", 8080);
const APP_OUT: End = ("hwm-app", "10.99.0.2", 41_000);
const DB: End = ("hwm-db", "10.99.0.3", 5432);
const DNS: End = ("dnsmasq", "10.99.0.53", 53);

fn ts(ns: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: i64::try_from(ns / 1_000_000_000).expect("in range"),
        nanos: i32::try_from(ns % 1_000_000_000).expect("below 1e9"),
    }
}

fn l7(
    src: End,
    dst: End,
    server_side: bool,
    latency_ms: f64,
    error: &str,
    record: Option<Record>,
) -> Flow {
    let udp = dst.2 == 53;
    let l4 = if udp {
        Protocol::Udp(pb::Udp { source_port: src.2, destination_port: dst.2 })
    } else {
        Protocol::Tcp(pb::Tcp { source_port: src.2, destination_port: dst.2, flags: None })
    };
    let protocol = if udp { "dns" } else { "http" };
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "small test values"
    )]
    let latency = (latency_ms * 1e6) as u64;
    Flow {
        time: Some(ts(wall_now_ns())),
        verdict: if error.is_empty() { Verdict::Forwarded } else { Verdict::Error }.into(),
        ip: Some(Ip { source: src.1.into(), destination: dst.1.into(), ..Ip::default() }),
        l4: Some(Layer4 { protocol: Some(l4) }),
        r#type: FlowType::L7.into(),
        node_name: "synthetic-node".into(),
        traffic_direction: if server_side {
            TrafficDirection::Ingress
        } else {
            TrafficDirection::Egress
        }
        .into(),
        l7: Some(Layer7 {
            latency_ns: latency,
            protocol: protocol.into(),
            error: error.into(),
            record,
            ..Layer7::default()
        }),
        source_process: Some(pb::Process { pid: 1, comm: src.0.into(), cgroup_id: 0 }),
        destination_process: Some(pb::Process { pid: 2, comm: dst.0.into(), cgroup_id: 0 }),
        ..Flow::default()
    }
}

fn dns(query: &str, rcode: u32) -> Record {
    Record::Dns(Dns { query: query.into(), rcode, ..Dns::default() })
}

/// One round of traffic: each hop measured at both ends where both would be traced.
fn round(i: u32) -> Vec<Flow> {
    let slow = ("hwm-slow", "10.99.0.4", 9090);
    let mut v = vec![
        l7(FRONT, APP, false, 8.0, "", None),
        l7(FRONT, APP, true, 6.0, "", None),
        l7(FRONT, slow, false, 60.0 + f64::from(i % 5), "", None),
        l7(FRONT, slow, true, 1.0, "", None),
        l7(APP_OUT, DB, false, 4.0, if i.is_multiple_of(10) { "HTTP 503" } else { "" }, None),
        l7(FRONT, DNS, false, 1.0, "", Some(dns("ok.test.", 0))),
        l7(FRONT, DNS, false, 1.0, "NXDOMAIN", Some(dns("missing.test.", 3))),
    ];
    if i.is_multiple_of(4) {
        v.push(l7(FRONT, DNS, false, 2.0, "SERVFAIL", Some(dns("broken.test.", 2))));
    }
    v
}

#[test]
fn l7_panels_and_rule_signals_show_synthetic_l7_traffic_and_rank_the_slow_hop_first() {
    let _serial = serial();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let args = MetricsArgs {
        metrics_addr: MetricsAddr(Some("127.0.0.1:0".parse().expect("address"))),
        metrics_series_limit: 2000,
        metrics_stale_after: Duration::from_mins(5),
    };
    let telemetry =
        runtime.block_on(Telemetry::serve(&args, "synthetic-node")).expect("serve metrics");
    telemetry.set_ready();
    let rules = repo_root().join("deploy/prometheus/hopwatch-rules.yaml");
    let prom = Prometheus::start(telemetry.local_addr().expect("serving"), &rules);

    let start = Instant::now();
    let mut i = 0;
    while start.elapsed() < Duration::from_secs(10) {
        for f in round(i) {
            telemetry.observe(&f);
        }
        i += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    let t_end = unix_now();
    std::thread::sleep(Duration::from_secs(4));
    let t_eval = t_end + 2.0;

    let mut failures = Vec::new();
    check_dashboards(&prom, "hwm-.*", t_eval, needs_l7, &mut failures);
    let loaded = prom.get("/api/v1/rules");
    for g in loaded["groups"].as_array().expect("groups") {
        for r in g["rules"].as_array().expect("rules") {
            let name = r["name"].as_str().unwrap_or("?");
            let expr = r["query"].as_str().expect("query");
            let signal = if r["type"] == "alerting" {
                expr.split_whitespace().next().unwrap_or("")
            } else {
                name
            };
            if !needs_l7(signal) {
                continue;
            }
            match prom.query(signal, t_eval) {
                Ok(v) if v.iter().any(|s| value_of(s).is_finite()) => {
                    eprintln!("ok rule {name}: signal {signal}: {} series", v.len());
                }
                Ok(v) => failures.push(format!("rule {name}: signal {signal} has no data: {v:?}")),
                Err(e) => failures.push(format!("rule {name}: {e}")),
            }
        }
    }
    // The p99 signal ranks the slow hop first too.
    let p99 = prom.query("hopwatch:hop_request_p99_seconds:rate5m", t_eval).expect("p99 signal");
    let top = p99.iter().max_by(|a, b| value_of(a).total_cmp(&value_of(b))).expect("p99 series");
    assert_eq!(top["metric"]["destination_port"], SLOW_PORT, "{p99:?}");
    assert!(failures.is_empty(), "{} failed checks:\n{}", failures.len(), failures.join("\n"));
    drop(runtime);
}
