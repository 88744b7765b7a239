//! The collector as a real process: agents streaming to it while it is killed and restarted,
//! the `observe` CLI against it, and (as root) a real agent streaming kernel flows to it.
//! `cargo xtask test` runs these with the privileged tests (serially).
#![allow(
    unused_crate_dependencies,
    reason = "a test or bench target links every dependency of the package; the lint is for the library"
)]

mod agent;
mod clickhouse;
mod clickhouse_cluster;
mod clickhouse_server;
mod flag_cases;
mod hubble_flags;
mod support;

use std::{
    collections::HashMap,
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use hopwatch::harness::{Batching, Queue, dial, run_remote};
use hopwatch_proto::{
    backoff::Backoff,
    flow::LostEventSource,
    hopwatch::v1::Hello,
    observer::get_flows_response::ResponseTypes,
    tls::{ClientTls, Target},
};
use tokio_util::sync::CancellationToken;

use self::support::*;

fn link_to(
    url: &str,
    node: &str,
    queue: &Arc<Queue>,
    stop: &CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let endpoint =
        Target::parse(url, false).unwrap().endpoint(&ClientTls::default(), false).unwrap();
    tokio::spawn(run_remote(
        queue.clone(),
        dial(endpoint),
        url.to_owned(),
        Hello {
            agent_id: format!("{node}-{}", std::process::id()),
            node_name: node.to_owned(),
            version: "test".into(),
            started: None,
        },
        Batching { max_events: 500, interval: Duration::from_millis(20) },
        Backoff { initial: Duration::from_millis(50), max: Duration::from_millis(400) },
        stop.clone(),
    ))
}

/// Waits until every agent queue has handed its flows to a collector, then stops the agents.
async fn drain_and_stop(
    queues: &[Arc<Queue>],
    stop: &CancellationToken,
    links: Vec<tokio::task::JoinHandle<()>>,
) {
    wait_until("every agent queue drained", Duration::from_mins(1), async || {
        queues.iter().all(|q| q.is_drained())
    })
    .await;
    stop.cancel();
    for l in links {
        tokio::time::timeout(Duration::from_secs(30), l)
            .await
            .expect("an agent link still running 30 s after it was stopped")
            .unwrap();
    }
}

async fn wait_until(what: &str, timeout: Duration, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_killed_mid_stream_delivers_each_flow_once_or_counts_it() {
    const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];
    const PER_NODE: i64 = 6000;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let args = ["--sort-window", "50ms"];
    let mut collector = Collector::start(port, dir.path(), &args);
    let url = collector.url();
    let stop = CancellationToken::new();
    // Each agent queues at most 1000 events, so the outage below overflows it; the overflow
    // must come back as counted losses.
    let queues: Vec<Arc<Queue>> = NODES.iter().map(|n| Arc::new(Queue::new(1000, n))).collect();
    let links: Vec<_> =
        NODES.iter().zip(&queues).map(|(n, q)| link_to(&url, n, q, &stop)).collect();
    let t0 = now_ns() - 60_000_000_000;
    let offer = |range: std::ops::Range<i64>| {
        for (node, q) in NODES.iter().zip(&queues) {
            for k in range.clone() {
                q.offer(flow(node, k, t0 + k * 100_000, 80));
            }
        }
    };
    // Before: 3000 flows per node, paced (20 every 10 ms).
    for chunk in 0..150 {
        offer(chunk * 20..(chunk + 1) * 20);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    wait_until("some flows stored", Duration::from_mins(1), async || {
        status(&url).await.is_some_and(|s| s.seen_flows >= 3000)
    })
    .await;
    // The collector dies mid-stream (SIGKILL); agents keep producing: 2000 more per node,
    // more than their queues hold.
    collector.kill();
    offer(3000..5000);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut collector = Collector::start(port, dir.path(), &args);
    // After: 1000 more per node.
    offer(5000..6000);
    drain_and_stop(&queues, &stop, links).await;

    let all = all_responses(&url).await;
    let mut stored: HashMap<String, Vec<String>> = HashMap::new();
    let mut lost: HashMap<String, u64> = HashMap::new();
    for r in &all {
        match &r.response_types {
            Some(ResponseTypes::Flow(f)) => {
                stored.entry(f.node_name.clone()).or_default().push(f.uuid.clone());
            }
            Some(ResponseTypes::LostEvents(l)) => {
                assert_eq!(l.source(), LostEventSource::ObserverEventsQueue, "{l:?}");
                *lost.entry(r.node_name.clone()).or_default() += l.num_events_lost;
            }
            _ => {}
        }
    }
    let mut total_lost = 0;
    for (node, q) in NODES.iter().zip(&queues) {
        let uuids = stored.get(*node).cloned().unwrap_or_default();
        let mut dedup = uuids.clone();
        dedup.sort();
        dedup.dedup();
        assert_eq!(dedup.len(), uuids.len(), "{node}: a flow was stored twice");
        let lost = lost.get(*node).copied().unwrap_or(0);
        assert_eq!(lost, q.dropped(), "{node}: the collector was told of every drop");
        assert_eq!(
            uuids.len() as u64 + lost,
            u64::try_from(PER_NODE).unwrap(),
            "{node}: stored {} + counted lost {lost} must be everything produced",
            uuids.len()
        );
        total_lost += lost;
    }
    assert!(total_lost > 0, "the outage was long enough to overflow the agents' queues");
    assert!(collector.stderr().contains("listening on"));
    collector.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_cli_reads_history_follows_and_rejects_bad_flags() {
    let dir = tempfile::tempdir().unwrap();
    let collector = Collector::start(free_port(), dir.path(), &["--memory-flows", "4096"]);
    let url = collector.url();
    let stop = CancellationToken::new();
    let queue = Arc::new(Queue::new(100_000, "cli-node"));
    let link = link_to(&url, "cli-node", &queue, &stop);
    let t0 = now_ns() - 3_600_000_000_000;
    // 10 000 flows an hour ago (most of them older than the memory window), to ports 80 and 5432.
    for k in 0..10_000 {
        queue.offer(flow("cli-node", k, t0 + k * 1_000_000, if k % 100 == 0 { 5432 } else { 80 }));
    }
    wait_until("flows stored", Duration::from_secs(30), async || queue.is_drained()).await;

    let observe = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(["observe", "--server", &format!("127.0.0.1:{}", collector.port)])
            .args(args)
            .output()
            .expect("run hopwatch observe");
        (
            out.status.code(),
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    };
    let (code, out, err) = observe(&["--since", "2h", "--to-port", "5432", "-o", "json"]);
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<serde_json::Value> =
        out.lines().map(|l| serde_json::from_str(l).expect("JSON line")).collect();
    assert_eq!(lines.len(), 100, "one line per matching flow");
    assert!(lines.iter().all(|l| l["flow"]["l4"]["TCP"]["destination_port"] == 5432));
    assert_eq!(lines[0]["flow"]["uuid"], "cli-node-0", "oldest first");
    let (code, out, _) = observe(&["--last", "3", "--print-node-name"]);
    assert_eq!(code, Some(0));
    assert_eq!(out.lines().count(), 3);
    assert!(out.lines().all(|l| l.contains(" [cli-node]: 10.0.0.1:40000 -> 10.0.0.2:")), "{out}");
    // Bad values exit 2 and name the flag.
    for (args, flag) in [
        (&["--verdict", "MAYBE"][..], "--verdict"),
        (&["--to-ip", "10.0.0.0/40"][..], "--to-ip"),
        (&["--http-status", "9xx"][..], "--http-status"),
        (&["--since", "last tuesday"][..], "--since"),
        (&["--ip", "10.0.0.1", "--from-ip", "10.0.0.2"][..], "--from-ip"),
        (&["-o", "yaml"][..], "--output"),
    ] {
        let (code, _, err) = observe(args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(flag), "{args:?}: {err}");
    }
    // Follow: start `observe -f`, then send a flow; it is printed.
    let mut child = Command::new(BIN)
        .args([
            "observe",
            "--server",
            &format!("127.0.0.1:{}", collector.port),
            "-f",
            "--to-port",
            "6379",
            "-o",
            "json",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    queue.offer(flow("cli-node", 99_999, now_ns(), 6379));
    let stdout = child.stdout.take().unwrap();
    let reader = tokio::task::spawn_blocking(move || {
        use std::io::BufRead as _;
        std::io::BufReader::new(stdout).lines().next().map(Result::unwrap)
    });
    let printed = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .expect("followed flow in time")
        .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let v: serde_json::Value = serde_json::from_str(&printed.expect("a line")).unwrap();
    assert_eq!(v["flow"]["uuid"], "cli-node-99999");
    stop.cancel();
    link.await.unwrap();
}
