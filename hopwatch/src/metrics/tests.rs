//! Exposition of hop families: labels, buckets, the series limit, stale removal; and the HTTP
//! server with its probes.

use std::time::Duration;

use hopwatch_hops::testing::*;
use hopwatch_proto::flow::{SocketEvent, TcpStats};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::*;

/// The hop families of `agg` in the text exposition (without the registry's `node` label).
fn text(agg: &Aggregator) -> String {
    encode(&hop_families::render(agg))
}

/// Label pairs of a sample's `{...}` part (values without escapes, as ours are).
fn label_pairs(mut rest: &str) -> Vec<(&str, &str)> {
    let mut out = Vec::new();
    while let Some((k, r)) = rest.split_once("=\"") {
        let (v, r) = r.split_once('"').unwrap_or((r, ""));
        out.push((k.trim_start_matches(','), v));
        rest = r;
    }
    out
}

/// The value of the sample `name` whose labels include every one of `labels`.
pub(crate) fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (head, v) = l.rsplit_once(' ')?;
        let (n, rest) = head.split_once('{').unwrap_or((head, ""));
        let have = label_pairs(rest);
        (n == name && labels.iter().all(|want| have.contains(want))).then(|| v.parse().ok())?
    })
}

/// Sample lines of `family` (exact metric name, so `_bucket`/`_sum`/`_count` are separate).
fn samples<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    text.lines().filter(|l| l.split(['{', ' ']).next() == Some(name)).collect()
}

#[test]
fn hop_families_carry_hop_labels_reporter_and_seconds_buckets() {
    let mut a = Aggregator::new(HopConfig::default());
    for i in 0..9 {
        a.observe(&l7(APP, DB, T0 + i, 2 * MS, false, ""), T0);
    }
    a.observe(&l7(APP, DB, T0, 30 * MS, false, "SQLSTATE 57014"), T0);
    a.observe(
        &tcp(
            APP,
            DB,
            T0,
            SocketEvent::Connect,
            1,
            TcpStats { connect_latency_ns: 40 * MS, ..TcpStats::default() },
        ),
        T0,
    );
    a.observe(&dropped(APP, DB, T0, "NETFILTER_DROP"), T0);
    let t = text(&a);
    let hop = [
        ("source_namespace", ""),
        ("source_workload", "app"),
        ("destination_namespace", ""),
        ("destination_workload", "postgres"),
        ("destination_port", "5432"),
    ];
    let has = |name: &str, extra: &[(&str, &str)], want: f64| {
        let labels: Vec<(&str, &str)> = hop.iter().chain(extra).copied().collect();
        assert_eq!(value(&t, name, &labels), Some(want), "{name} {extra:?} in\n{t}");
    };
    let client = [("protocol", "http"), ("reporter", "client")];
    has("hopwatch_hop_requests_total", &client, 10.0);
    has("hopwatch_hop_request_errors_total", &client, 1.0);
    let bucket = |le| [("protocol", "http"), ("reporter", "client"), ("le", le)];
    has("hopwatch_hop_request_duration_seconds_bucket", &bucket("0.0025"), 9.0);
    has("hopwatch_hop_request_duration_seconds_bucket", &bucket("0.05"), 10.0);
    has("hopwatch_hop_request_duration_seconds_sum", &client, 0.048);
    has("hopwatch_hop_connect_duration_seconds_bucket", &[("le", "0.025")], 0.0);
    has("hopwatch_hop_connect_duration_seconds_bucket", &[("le", "0.05")], 1.0);
    has("hopwatch_hop_open_connections", &[("reporter", "client")], 1.0);
    a.observe(&tcp(APP, DB, T0 + S, SocketEvent::Close, 1, TcpStats::default()), T0);
    let t = text(&a);
    assert_eq!(
        value(&t, "hopwatch_hop_open_connections", &[("reporter", "client")]),
        Some(0.0),
        "closed: the gauge reads 0, it does not vanish"
    );
    has("hopwatch_hop_drops_total", &[("protocol", "tcp"), ("reason", "NETFILTER_DROP")], 1.0);
    // Buckets run from 100 µs to 10 s, then +Inf.
    let les: Vec<&str> = samples(&t, "hopwatch_hop_connect_duration_seconds_bucket")
        .iter()
        .filter_map(|l| l.split("le=\"").nth(1)?.split('"').next())
        .collect();
    assert_eq!(les.first(), Some(&"0.0001"));
    assert_eq!(&les[les.len() - 2..], ["10", "+Inf"]);
}

#[test]
fn every_family_stays_within_the_series_limit_with_an_overflow_series() {
    let cfg = HopConfig { series_limit: 3, ..HopConfig::default() };
    let mut a = Aggregator::new(cfg);
    for port in 0..10u32 {
        let dst = ("postgres", "10.0.0.3", 7000 + port);
        a.observe(&l7(APP, dst, T0, MS, false, ""), T0);
        a.observe(
            &tcp(
                APP,
                dst,
                T0,
                SocketEvent::ConnectFailed,
                u64::from(port),
                TcpStats { error: "ECONNREFUSED".into(), ..TcpStats::default() },
            ),
            T0,
        );
        a.observe(&dropped(APP, dst, T0, "NETFILTER_DROP"), T0);
    }
    let t = text(&a);
    for family in [
        "hopwatch_hop_requests_total",
        "hopwatch_hop_request_errors_total",
        "hopwatch_hop_request_duration_seconds_count",
        "hopwatch_hop_connect_failures_total",
        "hopwatch_hop_drops_total",
    ] {
        let s = samples(&t, family);
        let overflow: Vec<&&str> = s.iter().filter(|l| l.contains("_overflow_")).collect();
        assert_eq!(s.len(), 4, "{family}: 3 series and the overflow one:\n{}", s.join("\n"));
        assert_eq!(overflow.len(), 1, "{family}");
    }
    let total: f64 = samples(&t, "hopwatch_hop_requests_total")
        .iter()
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert!((total - 10.0).abs() < 1e-9, "every request is still counted once");
}

#[test]
fn series_of_hops_that_went_quiet_are_removed_after_the_grace_period() {
    let cfg = HopConfig { stale_after: Duration::from_mins(1), ..HopConfig::default() };
    let mut a = Aggregator::new(cfg);
    a.observe(&l7(APP, DB, T0, MS, false, ""), T0);
    a.observe(&l7(FRONT, APP_SVC, T0 + 50 * S, MS, false, ""), T0);
    a.sweep(T0 + 70 * S);
    let t = text(&a);
    let s = samples(&t, "hopwatch_hop_requests_total");
    assert_eq!(s.len(), 1, "{t}");
    assert!(s[0].contains("destination_workload=\"app\""));
}

#[test]
fn the_flags_parse_with_their_defaults_and_off() {
    use clap::Parser as _;
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        m: MetricsArgs,
    }
    let d = Cli::try_parse_from(["t"]).unwrap().m;
    assert_eq!(d.metrics_addr, MetricsAddr(Some("0.0.0.0:9965".parse().unwrap())));
    assert_eq!((d.metrics_series_limit, d.metrics_stale_after), (2000, Duration::from_mins(5)));
    let off = Cli::try_parse_from(["t", "--metrics-addr", "off"]).unwrap().m;
    assert_eq!(off.metrics_addr, MetricsAddr(None));
    let e = Cli::try_parse_from(["t", "--metrics-addr", "localhost"]).err().unwrap().to_string();
    assert!(e.contains("--metrics-addr") && e.contains("IP:PORT"), "{e}");
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect to the metrics server");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let status = buf.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("HTTP status");
    let body = buf.split_once("\r\n\r\n").map_or(String::new(), |(_, b)| b.to_owned());
    (status, body)
}

#[tokio::test]
async fn the_server_serves_metrics_and_probes() {
    let args = MetricsArgs {
        metrics_addr: MetricsAddr(Some("127.0.0.1:0".parse().unwrap())),
        metrics_series_limit: 100,
        metrics_stale_after: Duration::from_mins(5),
    };
    let t = Telemetry::serve(&args, "node-a").await.expect("start");
    let addr = t.local_addr().expect("serving");
    let (code, body) = get(addr, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    t.set_ready();
    t.heartbeat(crate::pipeline::PipelineCounters {
        l7_unparsed_connections: 4,
        ..Default::default()
    });
    assert_eq!(get(addr, "/readyz").await.0, 200);
    assert_eq!(get(addr, "/healthz").await.0, 200);
    t.observe(&l7(APP, DB, wall_now_ns(), 3 * MS, false, ""));
    let (code, body) = get(addr, "/metrics").await;
    assert_eq!(code, 200);
    assert!(body.contains("hopwatch_hop_requests_total{"), "{body}");
    assert!(body.contains("node=\"node-a\""), "{body}");
    assert!(body.contains("hopwatch_agent_info{"), "{body}");
    assert_eq!(
        value(&body, "hopwatch_parse_failures_total", &[("stage", "l7_connection")]),
        Some(4.0)
    );
    assert!(body.contains("process_resident_memory_bytes"), "{body}");
    assert_eq!(
        value(&body, "hopwatch_flows_total", &[("node", "node-a"), ("type", "l7")]),
        Some(1.0)
    );
    // A second agent on the same address gets a clear error.
    let again = MetricsArgs { metrics_addr: MetricsAddr(Some(addr)), ..args };
    let err = Telemetry::serve(&again, "b").await.unwrap_err();
    assert!(err.to_string().contains("--metrics-addr"), "{err}");
}
