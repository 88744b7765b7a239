//! The flow history on ClickHouse, against real servers the tests start: Debian's 18.16
//! (`clickhouse-server`, private instances on loopback) and a modern engine in process
//! (chdb-core) for the modern DDL and the pushed-down SQL.

use std::{
    collections::BTreeSet,
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use hopwatch::harness::Queue;
use hopwatch_collector::{
    clickhouse::{
        history::Plan,
        schema::{self, Layout, Variant},
    },
    filter::FilterSet,
};
use hopwatch_proto::{
    flow::{
        Endpoint, Flow, FlowFilter, Http, Ip, Layer4, Layer7, Service, Tcp, TraceContext,
        TraceParent, Udp, Verdict, Workload, layer4, layer7::Record,
    },
    observer::{GetFlowsRequest, GetFlowsResponse, get_flows_response::ResponseTypes},
};
use tokio_util::sync::CancellationToken;

use super::{
    clickhouse_server::{ClickHouseServer, chdb_python, http, http_bytes},
    link_to,
    support::{Collector, client, free_port, now_ns, status},
    wait_until,
};

/// A collector on `ch` with an empty data directory of its own.
pub(crate) struct ChCollector {
    pub(crate) collector: Collector,
    metrics_port: u16,
    _dir: tempfile::TempDir,
}

pub(crate) fn ch_collector(ch: &ClickHouseServer, db: &str, extra: &[&str]) -> ChCollector {
    let dir = tempfile::tempdir().unwrap();
    let metrics_port = free_port();
    let metrics = format!("127.0.0.1:{metrics_port}");
    let url = ch.url();
    let mut args = vec![
        "--clickhouse",
        &url,
        "--clickhouse-database",
        db,
        "--clickhouse-flush-interval",
        "50ms",
        "--metrics-listen",
        &metrics,
        "--ui-listen",
        "off",
        "--sort-window",
        "20ms",
    ];
    args.extend_from_slice(extra);
    let collector = Collector::start(free_port(), dir.path(), &args);
    assert!(collector.stderr().contains("on ClickHouse `"), "{}", collector.stderr());
    ChCollector { collector, metrics_port, _dir: dir }
}

impl ChCollector {
    fn metric(&self, name: &str) -> u64 {
        let body = http(self.metrics_port, "GET", "/metrics", "").expect("GET /metrics");
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} not in /metrics:\n{body}"))
    }
}

pub(crate) fn ts(ns: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ns.div_euclid(1_000_000_000),
        nanos: i32::try_from(ns.rem_euclid(1_000_000_000)).unwrap(),
    }
}

/// A flow with something for every pushed-down filter to find, varied by `k`.
pub(crate) fn rich_flow(node: &str, k: i64, time_ns: i64) -> GetFlowsResponse {
    let v6 = k % 3 == 0;
    let (src, dst) = if v6 {
        (format!("fd00::{:x}", k % 7 + 1), format!("fd01::{:x}", k % 5 + 1))
    } else {
        (format!("10.0.{}.1", k % 4), format!("10.{}.{}.{}", k % 2, k % 5, k % 200))
    };
    let dport = if k % 100 == 1 { 5432 } else { 80 };
    let l4 = if k % 10 == 0 {
        layer4::Protocol::Udp(Udp { source_port: 40_000, destination_port: 53 })
    } else {
        layer4::Protocol::Tcp(Tcp { source_port: 40_000, destination_port: dport, flags: None })
    };
    let web = k % 2 == 1;
    let l7 = (k % 4 == 0).then(|| Layer7 {
        latency_ns: u64::try_from(k * 1000 % 5_000_000).unwrap(),
        record: Some(Record::Http(Http {
            code: if k % 40 == 0 { 503 } else { 200 },
            method: if k % 8 == 0 { "GET" } else { "post" }.into(),
            url: format!("/items/{k}"),
            ..Default::default()
        })),
        ..Default::default()
    });
    let t = ts(time_ns);
    GetFlowsResponse {
        time: Some(t),
        node_name: node.into(),
        response_types: Some(ResponseTypes::Flow(Flow {
            time: Some(t),
            uuid: format!("{node}-{k}"),
            node_name: node.into(),
            verdict: if k % 50 == 0 { Verdict::Dropped } else { Verdict::Forwarded }.into(),
            drop_reason_desc: if k % 50 == 0 { 133 } else { 0 },
            is_reply: Some(k % 2 == 1),
            ip: Some(Ip {
                source: src,
                destination: dst,
                ip_version: if v6 { 2 } else { 1 },
                encrypted: false,
            }),
            l4: Some(Layer4 { protocol: Some(l4) }),
            source: Some(Endpoint {
                identity: u32::try_from(k % 4).unwrap(),
                namespace: if web { "shop" } else { "infra" }.into(),
                pod_name: if web { format!("web-{}", k % 5) } else { format!("db-{}", k % 3) },
                workloads: if web {
                    vec![Workload { name: "web".into(), kind: "Deployment".into() }]
                } else {
                    Vec::new()
                },
                ..Default::default()
            }),
            destination_service: (dport == 5432)
                .then(|| Service { name: "db".into(), namespace: "shop".into() }),
            l7,
            trace_context: (k == 777).then(|| TraceContext {
                parent: Some(TraceParent { trace_id: "0af7651916cd43dd8448eb211c80319c".into() }),
            }),
            ..Default::default()
        })),
    }
}

/// Filters with something pushed down, each with a name for messages.
fn filters() -> Vec<(&'static str, Vec<FlowFilter>)> {
    let f = FlowFilter::default;
    vec![
        ("to-port 5432", vec![FlowFilter { destination_port: vec!["5432".into()], ..f() }]),
        ("verdict DROPPED", vec![FlowFilter { verdict: vec![Verdict::Dropped.into()], ..f() }]),
        ("from-pod shop/web-", vec![FlowFilter { source_pod: vec!["shop/web-".into()], ..f() }]),
        (
            "to-ip 10.1.0.0/16",
            vec![FlowFilter { destination_ip: vec!["10.1.0.0/16".into()], ..f() }],
        ),
        ("from-ip fd00::/16", vec![FlowFilter { source_ip: vec!["fd00::/16".into()], ..f() }]),
        ("from-ip fd00::3", vec![FlowFilter { source_ip: vec!["fd00::3".into()], ..f() }]),
        ("http-status 5+", vec![FlowFilter { http_status_code: vec!["5+".into()], ..f() }]),
        ("http-method get", vec![FlowFilter { http_method: vec!["get".into()], ..f() }]),
        ("node-name *-b", vec![FlowFilter { node_name: vec!["*-B".into()], ..f() }]),
        ("protocol udp", vec![FlowFilter { protocol: vec!["udp".into()], ..f() }]),
        (
            "trace id",
            vec![FlowFilter { trace_id: vec!["0af7651916cd43dd8448eb211c80319c".into()], ..f() }],
        ),
        ("min latency", vec![FlowFilter { min_latency_ns: 1_500_000, ..f() }]),
        (
            "workload web",
            vec![FlowFilter {
                source_workload: vec![Workload { name: "web".into(), kind: String::new() }],
                ..f()
            }],
        ),
        (
            "to-service shop/db",
            vec![FlowFilter { destination_service: vec!["shop/db".into()], ..f() }],
        ),
        ("reply", vec![FlowFilter { reply: vec![true], ..f() }]),
        (
            "port 5432 or dropped",
            vec![
                FlowFilter { destination_port: vec!["5432".into()], ..f() },
                FlowFilter { verdict: vec![Verdict::Dropped.into()], ..f() },
            ],
        ),
    ]
}

/// Reads a history query to its end; a collector (or the ClickHouse behind it) that does not
/// answer within a minute fails the test rather than hanging it.
pub(crate) async fn history(url: &str, req: GetFlowsRequest) -> Vec<GetFlowsResponse> {
    let read = async {
        let mut c = client(url).await.expect("connect to the collector");
        let mut s = c.get_flows(req).await.expect("GetFlows").into_inner();
        let mut out = Vec::new();
        while let Some(r) = s.message().await.expect("flow stream") {
            out.push(r);
        }
        out
    };
    tokio::time::timeout(Duration::from_mins(1), read)
        .await
        .unwrap_or_else(|_| panic!("GetFlows history from {url} did not end within 60 s"))
}

pub(crate) fn uuids(resps: &[GetFlowsResponse]) -> Vec<String> {
    resps
        .iter()
        .filter_map(|r| match &r.response_types {
            Some(ResponseTypes::Flow(f)) => Some(f.uuid.clone()),
            _ => None,
        })
        .collect()
}

fn observe(port: u16, args: &[&str]) -> Vec<String> {
    let out = Command::new(super::support::BIN)
        .args(["observe", "--server", &format!("127.0.0.1:{port}")])
        .args(args)
        .args(["-o", "json"])
        .output()
        .expect("run hopwatch observe");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
            // Node status lines come first; flows are what is compared.
            v["flow"]["uuid"].as_str().map(str::to_owned)
        })
        .collect()
}

fn count(ch: &ClickHouseServer, sql: &str) -> u64 {
    ch.query(sql).trim().parse().unwrap_or_else(|_| panic!("a count from {sql}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_two_stateless_collectors_answer_the_same_history() {
    const PER_NODE: i64 = 2000;
    let ch_dir = tempfile::tempdir().unwrap();
    let ch = ClickHouseServer::start(ch_dir.path(), "");
    let db = "shared";
    let a = ch_collector(&ch, db, &[]);
    let b = ch_collector(&ch, db, &[]);
    let stop = CancellationToken::new();
    let nodes = [("node-a", &a), ("node-b", &b)];
    let queues: Vec<Arc<Queue>> =
        nodes.iter().map(|(n, _)| Arc::new(Queue::new(100_000, n))).collect();
    let links: Vec<_> = nodes
        .iter()
        .zip(&queues)
        .map(|((n, c), q)| link_to(&c.collector.url(), n, q, &stop))
        .collect();
    let t0 = now_ns() - 3_600_000_000_000;
    let mut all = Vec::new();
    for ((node, _), q) in nodes.iter().zip(&queues) {
        for k in 0..PER_NODE {
            let f = rich_flow(node, k, t0 + k * 1_000_000);
            all.push(f.clone());
            q.offer(f);
        }
    }
    crate::drain_and_stop(&queues, &stop, links).await;
    let total = 2 * u64::try_from(PER_NODE).unwrap();
    let table = format!("`{db}`.`flows`");
    wait_until("flows in ClickHouse", Duration::from_mins(1), async || {
        count(&ch, &format!("SELECT count() FROM {table}")) >= total
    })
    .await;
    assert_eq!(count(&ch, &format!("SELECT count() FROM {table} WHERE kind = 1")), total);
    assert_eq!(count(&ch, &format!("SELECT uniqExact(uuid) FROM {table}")), total);
    assert_eq!(a.metric("hopwatch_clickhouse_flows_written_total"), total / 2);
    assert_eq!(a.metric("hopwatch_clickhouse_flows_dropped_total"), 0);

    let since = Some(ts(t0 - 1_000_000_000));
    let everything = GetFlowsRequest { since, ..Default::default() };
    let mut expected: Vec<String> = uuids(&all);
    expected.sort();
    let check_both = async |a: &ChCollector, b: &ChCollector, when: &str| {
        for c in [a, b] {
            let mut got = uuids(&history(&c.collector.url(), everything.clone()).await);
            got.sort();
            assert_eq!(got, expected, "{when}: every node's flows through either collector");
        }
        let last = ["--since", "2h", "--last", "1000", "--to-port", "5432"];
        let (from_a, from_b) = (observe(a.collector.port, &last), observe(b.collector.port, &last));
        assert_eq!(from_a.len(), 40, "{when}: 20 flows to 5432 per node");
        assert_eq!(from_a, from_b, "{when}: the same answer from either collector");
        let newest = observe(a.collector.port, &["--since", "2h", "--last", "3"]);
        let tail = ["node-a-1997", "node-a-1998", "node-a-1999"].map(String::from);
        assert_eq!(newest.len(), 3, "{when}");
        assert!(
            newest
                .iter()
                .all(|u| u.ends_with("-1997") || u.ends_with("-1998") || u.ends_with("-1999")),
            "{when}: {newest:?} vs {tail:?}"
        );
    };
    check_both(&a, &b, "first collectors").await;

    // Every filter: the collector's answer equals the filter code on the flows sent, and the
    // pushed-down SQL selects the same rows on 18.16 (and, below, on a modern engine).
    let mut sql_counts = Vec::new();
    for (name, whitelist) in filters() {
        let set = FilterSet::new(&whitelist, &[]).unwrap();
        let want = all
            .iter()
            .filter(|r| matches!(&r.response_types, Some(ResponseTypes::Flow(f)) if set.matches(f)))
            .count();
        assert!(want > 0, "{name}: the test flows have matches");
        let req = GetFlowsRequest {
            since,
            whitelist: whitelist.clone(),
            number: 100_000,
            ..Default::default()
        };
        let got = uuids(&history(&b.collector.url(), req).await).len();
        assert_eq!(got, want, "{name}: flows from the collector");
        let pushed = set.sql().unwrap_or_else(|| panic!("{name}: pushed down"));
        let plan = Plan::new(table.clone(), Some(pushed), None, None);
        let [times, _] = plan.sample(true, 1_000_000);
        let rows = ch.query(&times).lines().count();
        assert_eq!(rows, want, "{name}: rows the pushed-down SQL selects on 18.16:\n{times}");
        sql_counts.push((name, times, want));
    }
    check_on_chdb(&ch, &table, &sql_counts);

    // Both collectors restart with empty data directories: ClickHouse still answers.
    drop((a, b));
    let (a, b) = (ch_collector(&ch, db, &[]), ch_collector(&ch, db, &[]));
    check_both(&a, &b, "restarted collectors").await;
}

/// Loads what 18.16 holds into chdb (the modern DDL) and checks each query selects as many rows.
fn check_on_chdb(ch: &ClickHouseServer, table: &str, queries: &[(&str, String, usize)]) {
    let python = chdb_python();
    let dir = tempfile::tempdir().unwrap();
    let tsv = dir.path().join("flows.tsv");
    let dump = http_bytes(
        ch.http_port,
        "POST",
        "/",
        &format!("SELECT * FROM {table} FORMAT TabSeparated"),
    )
    .expect("dump the flows table");
    std::fs::write(&tsv, dump).unwrap();
    let layout = Layout {
        database: "shared".into(),
        table: "flows".into(),
        cluster: None,
        retention_s: 7 * 86_400,
    };
    let structure =
        schema::columns(Variant::Legacy).lines().map(str::trim).collect::<Vec<_>>().join(" ");
    let spec = serde_json::json!({
        "ddl": layout.ddl(Variant::Modern),
        "table": layout.table(),
        "tsv": tsv,
        "structure": structure,
        "queries": queries.iter().map(|q| q.1.clone()).collect::<Vec<_>>(),
    });
    let spec_path = dir.path().join("spec.json");
    std::fs::write(&spec_path, spec.to_string()).unwrap();
    let script = r#"
import json, sys
from chdb import session
spec = json.load(open(sys.argv[1]))
s = session.Session(sys.argv[2])
for stmt in spec["ddl"]:
    s.query(stmt)
s.query("INSERT INTO %s SELECT * FROM file('%s', 'TabSeparated', '%s')" % (spec["table"], spec["tsv"], spec["structure"]))
ddl = str(s.query("SHOW CREATE TABLE " + spec["table"], "TabSeparatedRaw"))
counts = [len([l for l in str(s.query(q, "TabSeparated")).splitlines() if l]) for q in spec["queries"]]
print(json.dumps({"counts": counts, "ddl": ddl}))
"#;
    let out = Command::new(python)
        .args(["-c", script])
        .arg(&spec_path)
        .arg(dir.path().join("chdb"))
        .output()
        .expect("run chdb");
    assert!(out.status.success(), "chdb failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("chdb's JSON");
    let ddl = v["ddl"].as_str().unwrap();
    for modern in ["CODEC(", "TTL ", "LowCardinality(", "INDEX trace_idx"] {
        assert!(ddl.contains(modern), "the modern table has {modern}:\n{ddl}");
    }
    for ((name, sql, want), got) in queries.iter().zip(v["counts"].as_array().unwrap()) {
        assert_eq!(got.as_u64(), Some(*want as u64), "{name} on chdb:\n{sql}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_killed_mid_stream_loses_nothing_within_the_queue() {
    let ch_dir = tempfile::tempdir().unwrap();
    let mut ch = ClickHouseServer::start(ch_dir.path(), "");
    let c = ch_collector(&ch, "outage", &[]);
    let stop = CancellationToken::new();
    let queue = Arc::new(Queue::new(100_000, "node-o"));
    let link = link_to(&c.collector.url(), "node-o", &queue, &stop);
    let t0 = now_ns() - 60_000_000_000;
    let offer = |range: std::ops::Range<i64>| {
        let q = queue.clone();
        async move {
            for chunk in range.step_by(20) {
                for k in chunk..chunk + 20 {
                    q.offer(rich_flow("node-o", k, t0 + k * 100_000));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    let table = "`outage`.`flows`";
    offer(0..2000).await;
    wait_until("some flows in ClickHouse", Duration::from_mins(1), async || {
        count(&ch, &format!("SELECT count() FROM {table}")) >= 1000
    })
    .await;
    ch.kill();
    offer(2000..4000).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    ch.restart();
    offer(4000..5000).await;
    let deadline = Instant::now() + Duration::from_mins(1);
    while count(&ch, &format!("SELECT uniqExact(uuid) FROM {table}")) < 5000 {
        assert!(Instant::now() < deadline, "flows missing after the restart");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    link.await.unwrap();
    let rows = count(&ch, &format!("SELECT count() FROM {table}"));
    eprintln!("rows {rows} for 5000 flows (an insert in flight at the kill may be written twice)");
    assert!(c.metric("hopwatch_clickhouse_insert_failures_total") > 0, "the outage was seen");
    assert_eq!(c.metric("hopwatch_clickhouse_flows_dropped_total"), 0);
    assert_eq!(count(&ch, &format!("SELECT count() FROM {table} WHERE kind = 2")), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_queue_overflow_is_counted_exactly() {
    let ch_dir = tempfile::tempdir().unwrap();
    let mut ch = ClickHouseServer::start(ch_dir.path(), "");
    let c =
        ch_collector(&ch, "overflow", &["--clickhouse-queue", "500", "--clickhouse-batch", "100"]);
    let url = c.collector.url();
    let stop = CancellationToken::new();
    let queue = Arc::new(Queue::new(100_000, "node-x"));
    let link = link_to(&url, "node-x", &queue, &stop);
    let t0 = now_ns() - 60_000_000_000;
    let table = "`overflow`.`flows`";
    for k in 0..300 {
        queue.offer(rich_flow("node-x", k, t0 + k * 100_000));
    }
    wait_until("the first flows in ClickHouse", Duration::from_mins(1), async || {
        count(&ch, &format!("SELECT count() FROM {table}")) >= 300
    })
    .await;
    ch.kill();
    for k in 300..2300 {
        queue.offer(rich_flow("node-x", k, t0 + k * 100_000));
    }
    wait_until("the agent drained", Duration::from_mins(1), async || queue.is_drained()).await;
    wait_until("the queue overflowed", Duration::from_mins(1), async || {
        c.metric("hopwatch_clickhouse_flows_dropped_total") > 0
    })
    .await;
    ch.restart();
    wait_until("the queue written", Duration::from_mins(1), async || {
        c.metric("hopwatch_clickhouse_queue_flows") == 0
            && count(&ch, &format!("SELECT count() FROM {table} WHERE kind = 2")) > 0
    })
    .await;
    stop.cancel();
    link.await.unwrap();
    let dropped = c.metric("hopwatch_clickhouse_flows_dropped_total");
    let stored = count(&ch, &format!("SELECT uniqExact(uuid) FROM {table} WHERE kind = 1"));
    assert_eq!(stored + dropped, 2300, "every flow is stored or counted ({stored} + {dropped})");
    // The queue (500) and one batch per writer (2 × 100) wait out the outage.
    assert!(
        dropped >= 2000 - 500 - 200,
        "at most the queue and the writers' batches wait ({dropped} dropped)"
    );
    let s = status(&url).await.expect("ServerStatus");
    assert_eq!(s.flows_not_recorded, dropped, "ServerStatus counts the loss");
    let req = GetFlowsRequest { since: Some(ts(t0 - 1_000_000_000)), ..Default::default() };
    let resps = history(&url, req).await;
    let lost: u64 = resps
        .iter()
        .filter_map(|r| match &r.response_types {
            Some(ResponseTypes::LostEvents(l)) => Some(l.num_events_lost),
            _ => None,
        })
        .sum();
    assert_eq!(lost, dropped, "the history itself says how many flows it is missing");
    assert_eq!(uuids(&resps).len() as u64, stored);
    let mut seen = BTreeSet::new();
    assert!(uuids(&resps).into_iter().all(|u| seen.insert(u)), "no flow twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_retention_drops_old_hours_on_18_16() {
    let ch_dir = tempfile::tempdir().unwrap();
    let ch = ClickHouseServer::start(ch_dir.path(), "");
    let table = "`aged`.`flows`";
    {
        let c = ch_collector(&ch, "aged", &[]);
        let stop = CancellationToken::new();
        let queue = Arc::new(Queue::new(100_000, "node-r"));
        let link = link_to(&c.collector.url(), "node-r", &queue, &stop);
        let now = now_ns();
        // 100 flows three hours ago, 100 flows a minute ago.
        for k in 0..200 {
            let age = if k < 100 { 3 * 3_600_000_000_000 } else { 60_000_000_000 };
            queue.offer(rich_flow("node-r", k, now - age + k * 1_000_000));
        }
        wait_until("flows in ClickHouse", Duration::from_mins(1), async || {
            count(&ch, &format!("SELECT count() FROM {table}")) >= 200
        })
        .await;
        stop.cancel();
        link.await.unwrap();
    }
    // A collector with a 1 h retention drops the old hour at start (18.16 has no TTL).
    let _c = ch_collector(&ch, "aged", &["--clickhouse-retention", "1h"]);
    wait_until("the old hour dropped", Duration::from_mins(1), async || {
        count(&ch, &format!("SELECT count() FROM {table}")) == 100
    })
    .await;
    let oldest = count(
        &ch,
        &format!("SELECT min(time) FROM {table}").replace("min(time)", "toUInt32(min(time))"),
    );
    let now_s = u64::try_from(now_ns() / 1_000_000_000).unwrap();
    assert!(now_s - oldest < 3600, "only the recent flows are left");
}
