//! The write path: stored events go into a bounded queue ([`Sink::offer`], called by the store's
//! writer, never waiting), and one task drains it in batches into ClickHouse over HTTP.
//!
//! A failed insert is retried with backoff, with the same batch, while new events wait in the
//! queue: a ClickHouse restart shorter than the queue's capacity loses nothing. What does not
//! fit is dropped (the newest; the queue keeps what it has) and counted: in `/metrics`
//! (`hopwatch_clickhouse_flows_dropped_total`), in `ServerStatus.flows_not_recorded`, and, once
//! ClickHouse takes writes again, as a lost-event notice row in the history itself, so every
//! `observe` over that time says how many events it is missing.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use hopwatch_proto::{backoff::Backoff, flow::LostEventSource, lost};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{
    ClickHouseError,
    row::{self, FlowRow},
};
use crate::store::Stored;

/// Counters for `/metrics` and `ServerStatus`.
#[derive(Debug, Default)]
pub struct SinkStats {
    /// Events written to ClickHouse.
    pub written: AtomicU64,
    /// Events dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Inserts that failed (each retried).
    pub failures: AtomicU64,
    /// Events waiting in the queue.
    pub queued: AtomicU64,
    /// Events taken by a writer and not yet written (in an insert, or waiting to retry one).
    pub in_flight: AtomicU64,
    /// Bytes of encoded events sent (the `flow` column before compression).
    pub encoded_bytes: AtomicU64,
}

/// A stored event on its way to ClickHouse: decoded (for the typed columns) and as the store
/// keeps it encoded (the `flow` column, not encoded again).
pub struct Queued {
    pub entry: Arc<Stored>,
    pub encoded: bytes::Bytes,
}

impl Queued {
    fn new(resp: hopwatch_proto::observer::GetFlowsResponse) -> Self {
        let encoded = prost::Message::encode_to_vec(&resp).into();
        Self { entry: Stored::new(resp), encoded }
    }
}

/// The queue between the store and ClickHouse.
pub struct Sink {
    queue: Mutex<VecDeque<Queued>>,
    capacity: usize,
    wake: Notify,
    pub stats: SinkStats,
    /// Dropped, not yet reported in the history.
    unreported: AtomicU64,
}

/// How the writer batches.
#[derive(Debug, Clone, Copy)]
pub struct WriterConfig {
    pub queue: usize,
    pub batch: usize,
    /// A partial batch goes out after this long.
    pub interval: Duration,
}

impl Sink {
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            queue: Mutex::new(VecDeque::with_capacity(capacity.min(1 << 20))),
            capacity: capacity.max(1),
            wake: Notify::new(),
            stats: SinkStats::default(),
            unreported: AtomicU64::new(0),
        })
    }

    /// Queues stored events; what does not fit is counted as dropped. Never waits.
    pub fn offer(&self, entries: impl Iterator<Item = Queued>) {
        let (queued, dropped) = {
            let mut q = self.queue.lock().expect("sink queue lock");
            let mut dropped = 0u64;
            for e in entries {
                if q.len() < self.capacity {
                    q.push_back(e);
                } else {
                    dropped += 1;
                }
            }
            (q.len(), dropped)
        };
        if dropped > 0 {
            self.stats.dropped.fetch_add(dropped, Ordering::Relaxed);
            self.unreported.fetch_add(dropped, Ordering::Relaxed);
        }
        self.stats.queued.store(queued as u64, Ordering::Relaxed);
        self.wake.notify_one();
    }

    fn take(&self, max: usize) -> Vec<Queued> {
        let mut q = self.queue.lock().expect("sink queue lock");
        let n = q.len().min(max);
        let out: Vec<_> = q.drain(..n).collect();
        // In flight before no longer queued: the two together never under-count.
        self.stats.in_flight.fetch_add(n as u64, Ordering::Relaxed);
        self.stats.queued.store(q.len() as u64, Ordering::Relaxed);
        out
    }

    fn len(&self) -> usize {
        self.queue.lock().expect("sink queue lock").len()
    }
}

/// Inserts `batch` in one `INSERT` (one HTTP request).
async fn insert(
    client: &clickhouse::Client,
    table: &str,
    batch: &[Queued],
) -> Result<u64, ClickHouseError> {
    let fail = |source| ClickHouseError::Insert { table: table.to_owned(), source };
    let mut ins = client.insert_unescaped::<FlowRow<'static>>(table).await.map_err(fail)?;
    for q in batch {
        ins.write(&row::row(&q.entry, &q.encoded)).await.map_err(fail)?;
    }
    ins.end().await.map_err(fail)?;
    Ok(batch.iter().map(|q| q.encoded.len() as u64).sum())
}

/// Drains the sink into `table` until `stop` (then writes what is queued, unless ClickHouse fails).
pub async fn run(
    client: clickhouse::Client,
    table: String,
    sink: Arc<Sink>,
    cfg: WriterConfig,
    node: String,
    stop: CancellationToken,
) {
    let backoff = Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(5) };
    let mut attempt = 0u32;
    let mut failing = false;
    let mut pending: Vec<Queued> = Vec::new();
    loop {
        if pending.is_empty() {
            if sink.len() < cfg.batch && !stop.is_cancelled() {
                tokio::select! {
                    () = sink.wake.notified() => {}
                    () = tokio::time::sleep(cfg.interval) => {}
                    () = stop.cancelled() => {}
                }
                if sink.len() < cfg.batch && !stop.is_cancelled() {
                    // Let a partial batch fill up for one interval before it goes.
                    tokio::select! {
                        () = tokio::time::sleep(cfg.interval) => {}
                        () = stop.cancelled() => {}
                    }
                }
            }
            pending = sink.take(cfg.batch);
            let lost = sink.unreported.swap(0, Ordering::Relaxed);
            if lost > 0 {
                let notice = lost::notice(&node, LostEventSource::ObserverEventsQueue, lost);
                pending.push(Queued::new(notice));
                sink.stats.in_flight.fetch_add(1, Ordering::Relaxed);
            }
            if pending.is_empty() {
                if stop.is_cancelled() {
                    return;
                }
                continue;
            }
        }
        match insert(&client, &table, &pending).await {
            Ok(bytes) => {
                if failing {
                    tracing::warn!(%table, "ClickHouse takes writes again");
                    failing = false;
                }
                attempt = 0;
                sink.stats.written.fetch_add(pending.len() as u64, Ordering::Relaxed);
                sink.stats.in_flight.fetch_sub(pending.len() as u64, Ordering::Relaxed);
                sink.stats.encoded_bytes.fetch_add(bytes, Ordering::Relaxed);
                pending.clear();
            }
            Err(e) => {
                sink.stats.failures.fetch_add(1, Ordering::Relaxed);
                if !failing {
                    tracing::error!(error = %e, queued = sink.len(), "cannot write flows to ClickHouse; retrying with backoff, flows wait in the queue (--clickhouse-queue)");
                    failing = true;
                }
                attempt = attempt.saturating_add(1);
                if stop.is_cancelled() {
                    let n = pending.len() + sink.len();
                    tracing::error!(
                        flows = n,
                        "shutting down with flows not written to ClickHouse"
                    );
                    return;
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff.delay(attempt)) => {}
                    () = stop.cancelled() => {}
                }
            }
        }
    }
}
