//! The agent's link to a collector: batching, acknowledgements, backpressure, reconnection with
//! resume, and counted overflow.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use hopwatch_proto::{flow::LostEventSource, hopwatch::v1::Hello, observer::GetFlowsRequest};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::sink::{
    Backoff, Batching,
    link::{Dial, run_remote},
    queue::Queue,
};

/// A dial function whose target can be swapped (collector restarts).
fn swappable(pipe: &Arc<Mutex<Arc<Pipe>>>) -> Dial {
    let pipe = pipe.clone();
    Arc::new(move || {
        let p = pipe.lock().unwrap().clone();
        Box::pin(async move { p.connect().await })
    })
}

fn hello(node: &str) -> Hello {
    Hello {
        agent_id: format!("agent-{node}"),
        node_name: node.into(),
        version: "test".into(),
        started: None,
    }
}

const BATCHING: Batching = Batching { max_events: 200, interval: Duration::from_millis(10) };
const BACKOFF: Backoff =
    Backoff { initial: Duration::from_millis(10), max: Duration::from_millis(100) };

async fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn stored_uuids(pipe: &Pipe) -> (Vec<String>, u64) {
    let all = get_flows(pipe.connect().await.unwrap(), GetFlowsRequest::default()).await.unwrap();
    let lost = all
        .iter()
        .filter_map(|r| match &r.response_types {
            Some(ResponseTypes::LostEvents(l))
                if l.source() == LostEventSource::ObserverEventsQueue =>
            {
                Some(l.num_events_lost)
            }
            _ => None,
        })
        .sum();
    (flows(&all).iter().map(|f| f.uuid.clone()).collect(), lost)
}

#[tokio::test]
async fn the_link_delivers_everything_once_across_reconnections() {
    let hub = memory_hub(Duration::ZERO);
    let pipe = Arc::new(Mutex::new(Arc::new(Pipe::serve(hub.clone()))));
    let queue = Arc::new(Queue::new(100_000, "n1"));
    let stop = CancellationToken::new();
    let link = tokio::spawn(run_remote(
        queue.clone(),
        swappable(&pipe),
        "test".into(),
        hello("n1"),
        BATCHING,
        BACKOFF,
        stop.clone(),
    ));
    let t0 = now_ns() - 60 * SEC;
    let mut offered = 0i64;
    let mut offer = |n: i64| {
        for _ in 0..n {
            queue.offer(flow("n1", t0 + offered * 1000, 80, Verdict::Forwarded));
            offered += 1;
        }
    };
    offer(3000);
    wait_for("the first flows to be stored", || hub.store.end() >= 3000).await;
    // The collector's server goes away while the agent keeps producing, then comes back.
    pipe.lock().unwrap().stop();
    offer(2000);
    tokio::time::sleep(Duration::from_millis(100)).await;
    *pipe.lock().unwrap() = Arc::new(Pipe::serve(hub.clone()));
    offer(1000);
    wait_for("everything to be acknowledged", || queue.is_drained()).await;
    stop.cancel();
    link.await.unwrap();
    let current = pipe.lock().unwrap().clone();
    let (uuids, lost) = stored_uuids(&current).await;
    assert_eq!(lost, 0);
    assert_eq!(uuids.len(), 6000, "every flow stored");
    let mut dedup = uuids.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!(dedup.len(), 6000, "no flow stored twice");
    assert_eq!(queue.dropped(), 0);
}

#[tokio::test]
async fn a_full_queue_drops_the_newest_and_the_count_reaches_the_collector() {
    let hub = memory_hub(Duration::ZERO);
    // No collector at first: the server is stopped before the agent starts.
    let down = Arc::new(Pipe::serve(hub.clone()));
    down.stop();
    let pipe = Arc::new(Mutex::new(down));
    let queue = Arc::new(Queue::new(100, "n1"));
    let stop = CancellationToken::new();
    let link = tokio::spawn(run_remote(
        queue.clone(),
        swappable(&pipe),
        "test".into(),
        hello("n1"),
        BATCHING,
        BACKOFF,
        stop.clone(),
    ));
    let t0 = now_ns() - 60 * SEC;
    for k in 0..1000 {
        queue.offer(flow("n1", t0 + k, 80, Verdict::Forwarded));
    }
    assert_eq!(queue.dropped(), 900);
    *pipe.lock().unwrap() = Arc::new(Pipe::serve(hub.clone()));
    wait_for("the queue to drain", || queue.is_drained()).await;
    stop.cancel();
    link.await.unwrap();
    let current = pipe.lock().unwrap().clone();
    let (uuids, lost) = stored_uuids(&current).await;
    // Delivered plus counted-as-lost is everything the agent produced.
    assert_eq!(uuids.len(), 100);
    assert_eq!(lost, 900);
    assert_eq!(uuids.len() as u64 + lost, 1000);
}

#[tokio::test]
async fn a_restarted_collector_tells_the_agent_where_to_resume() {
    let dir = tempfile::tempdir().unwrap();
    let hub = disk_hub(dir.path(), 4096, Duration::from_millis(50));
    let pipe = Arc::new(Mutex::new(Arc::new(Pipe::serve(hub.clone()))));
    let queue = Arc::new(Queue::new(100_000, "n1"));
    let stop = CancellationToken::new();
    let link = tokio::spawn(run_remote(
        queue.clone(),
        swappable(&pipe),
        "test".into(),
        hello("n1"),
        BATCHING,
        BACKOFF,
        stop.clone(),
    ));
    let t0 = now_ns() - 60 * SEC;
    for k in 0..5000 {
        queue.offer(flow("n1", t0 + k * 1000, 80, Verdict::Forwarded));
    }
    wait_for("some flows stored", || hub.store.end() > 1000).await;
    // Stop the collector (server, then store) mid-stream and start a new one on the directory.
    pipe.lock().unwrap().stop();
    hub.shutdown().await;
    drop(hub);
    for k in 5000..8000 {
        queue.offer(flow("n1", t0 + k * 1000, 80, Verdict::Forwarded));
    }
    let hub = disk_hub(dir.path(), 4096, Duration::from_millis(50));
    *pipe.lock().unwrap() = Arc::new(Pipe::serve(hub.clone()));
    wait_for("everything acknowledged by the new collector", || queue.is_drained()).await;
    stop.cancel();
    link.await.unwrap();
    let current = pipe.lock().unwrap().clone();
    let (uuids, lost) = stored_uuids(&current).await;
    let mut dedup = uuids.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!((uuids.len(), dedup.len(), lost), (8000, 8000, 0));
}
