//! The query engine behind `GetFlows`: Hubble's `number`/`first`/`follow`/`since`/`until`
//! semantics over the store, whitelist/blacklist filters, node status and lost-event notices.

use std::{sync::Arc, time::Duration};

use hopwatch_proto::{
    FieldMask, clock,
    flow::LostEventSource,
    lost,
    observer::{GetFlowsRequest, GetFlowsResponse, get_flows_response::ResponseTypes},
};
use tokio::sync::{broadcast, mpsc};
use tonic::Status;

use super::{
    filter::{FilterSet, terms::Sieve},
    hub::Hub,
    store::{Chunk, FlowStore, Select, Stored, record::BlockMeta},
    traces::TraceJoin,
};

type Tx = mpsc::Sender<Result<GetFlowsResponse, Status>>;

/// A validated `GetFlowsRequest`.
#[derive(Debug)]
pub struct Query {
    filters: FilterSet,
    /// The filters' index terms (what the store can rule out undecoded).
    sieve: Sieve,
    number: u64,
    first: bool,
    follow: bool,
    since_ns: Option<i64>,
    until_ns: Option<i64>,
    /// Flow fields sent (`field_mask`); empty: all of them.
    mask: FieldMask,
    /// Traces joined across nodes: flows leave with their joined trace id.
    traces: Option<Arc<TraceJoin>>,
}

fn ts_ns(t: &prost_types::Timestamp) -> i64 {
    t.seconds.saturating_mul(1_000_000_000).saturating_add(i64::from(t.nanos))
}

impl Query {
    pub fn new(req: &GetFlowsRequest) -> Result<Self, Status> {
        if req.first && req.follow {
            return Err(Status::invalid_argument("first cannot be combined with follow"));
        }
        let filters = FilterSet::new(&req.whitelist, &req.blacklist)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let since_ns = req.since.as_ref().map(ts_ns);
        let until_ns = req.until.as_ref().map(ts_ns);
        if let (Some(s), Some(u)) = (since_ns, until_ns)
            && s > u
        {
            return Err(Status::invalid_argument("since is after until"));
        }
        Ok(Self {
            sieve: filters.sieve(),
            filters,
            number: req.number,
            first: req.first,
            follow: req.follow,
            since_ns,
            until_ns,
            mask: FieldMask::lenient(req.field_mask.as_ref().map_or(&[][..], |m| &m.paths[..])),
            traces: None,
        })
    }

    /// A query over `traces`' joins: `req`'s trace-id filters match the traces joined to theirs
    /// and flows leave with their joined trace id.
    pub fn joined(req: GetFlowsRequest, traces: &Arc<TraceJoin>) -> Result<Self, Status> {
        let mut q = Self::new(&traces.expand_request(req))?;
        q.traces = Some(traces.clone());
        Ok(q)
    }

    pub fn filters(&self) -> &FilterSet {
        &self.filters
    }

    /// How many flows (0: all in range).
    pub fn number(&self) -> u64 {
        self.number
    }

    /// Oldest first (`--first`) rather than the newest `number`.
    pub fn first(&self) -> bool {
        self.first
    }

    pub fn since_ns(&self) -> Option<i64> {
        self.since_ns
    }

    pub fn until_ns(&self) -> Option<i64> {
        self.until_ns
    }

    /// A stored response as this query sends it: its flow with its joined trace id, cut to the
    /// field mask.
    pub fn out(&self, resp: &GetFlowsResponse) -> GetFlowsResponse {
        let rejoined = self.traces.as_ref().and_then(|t| t.rejoined(resp));
        let resp = rejoined.as_ref().unwrap_or(resp);
        match &resp.response_types {
            Some(ResponseTypes::Flow(f)) if !self.mask.is_empty() => GetFlowsResponse {
                response_types: Some(ResponseTypes::Flow(self.mask.apply(f))),
                node_name: resp.node_name.clone(),
                time: resp.time,
            },
            _ => resp.clone(),
        }
    }

    fn in_time(&self, t: i64) -> bool {
        self.since_ns.is_none_or(|s| t >= s) && self.until_ns.is_none_or(|u| t <= u)
    }

    fn block_ok(&self, b: &BlockMeta) -> bool {
        self.since_ns.is_none_or(|s| b.max_time_ns >= s)
            && self.until_ns.is_none_or(|u| b.min_time_ns <= u)
            && self.sieve.group(|t| b.bloom.contains(t))
    }

    /// `Some(true)` for a matching flow, `Some(false)` for a notice (sent, not counted), `None`
    /// for anything else.
    pub fn wants(&self, e: &Stored) -> Option<bool> {
        if !self.in_time(e.time_ns) {
            return None;
        }
        match &e.resp.response_types {
            Some(ResponseTypes::Flow(f)) => self.filters.matches(f).then_some(true),
            Some(_) => Some(false),
            None => None,
        }
    }

    fn wants_history(&self) -> bool {
        !(self.follow && self.number == 0 && self.since_ns.is_none())
    }
}

/// Runs a query to completion (or until the client leaves), sending into `tx`.
pub async fn run(hub: Arc<Hub>, q: Query, tx: Tx) {
    // Subscribe before reading history so nothing falls between history and follow.
    let mut nodes_rx = hub.nodes.subscribe();
    let mut end_rx = hub.store.subscribe();
    let end0 = hub.store.end();
    for ev in hub.nodes.snapshot_events() {
        if tx.send(Ok(node_status(ev))).await.is_err() {
            return;
        }
    }
    let q = Arc::new(q);
    if q.wants_history()
        && let Some(ch) = &hub.clickhouse
    {
        // The shared history: every node's flows, whichever collector they came through.
        match super::clickhouse::history::run(ch, &q, &tx).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                tracing::warn!(error = %e, "history query on ClickHouse failed");
                let _ = tx.send(Err(Status::unavailable(e.to_string()))).await;
                return;
            }
        }
    } else if q.wants_history() {
        let (store, q2, tx2) = (hub.store.clone(), q.clone(), tx.clone());
        let done = tokio::task::spawn_blocking(move || history(&store, &q2, end0, &tx2)).await;
        if !matches!(done, Ok(true)) {
            return;
        }
    }
    if !q.follow {
        return;
    }
    let mut pos = end0;
    let until_deadline = q.until_ns.map(|u| {
        let now = clock::now_ns();
        let wait = u.saturating_sub(now).max(0).cast_unsigned();
        tokio::time::Instant::now()
            + Duration::from_nanos(wait)
            + hub.sort_window
            + Duration::from_millis(200)
    });
    loop {
        if !forward_new(&hub.store, &q, &mut pos, &tx).await {
            return;
        }
        tokio::select! {
            changed = end_rx.changed() => if changed.is_err() { return },
            ev = nodes_rx.recv() => match ev {
                Ok(ev) => if tx.send(Ok(node_status(ev))).await.is_err() { return },
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            },
            () = tx.closed() => return,
            () = clock::sleep_until(until_deadline) => {
                let _ = forward_new(&hub.store, &q, &mut pos, &tx).await;
                return;
            }
        }
    }
}

fn node_status(ev: hopwatch_proto::relay::NodeStatusEvent) -> GetFlowsResponse {
    GetFlowsResponse {
        time: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
        node_name: String::new(),
        response_types: Some(ResponseTypes::NodeStatus(ev)),
    }
}

/// Sends new entries from `pos` to the store's end; entries that left memory before this
/// reader got to them (and are not in the history) become a `HUBBLE_RING_BUFFER` lost event.
async fn forward_new(store: &FlowStore, q: &Query, pos: &mut u64, tx: &Tx) -> bool {
    let end = store.end();
    while *pos < end {
        match store.chunk_from(*pos, end, Select::ALL) {
            Chunk::Entries { end: chunk_end, entries, .. } => {
                let from = *pos;
                if chunk_end <= from {
                    break;
                }
                for e in entries.iter().filter(|e| e.index >= from && e.index < end) {
                    if q.wants(e).is_some() && tx.send(Ok(q.out(&e.resp))).await.is_err() {
                        return false;
                    }
                }
                *pos = chunk_end.min(end);
            }
            Chunk::Missing { end: gone, .. } | Chunk::Skipped { end: gone, .. } => {
                let gone = gone.min(end).max(*pos + 1);
                let resp = lost::notice("", LostEventSource::HubbleRingBuffer, gone - *pos);
                if tx.send(Ok(resp)).await.is_err() {
                    return false;
                }
                *pos = gone;
            }
        }
    }
    true
}

/// Sends the stored part of the answer (blocking: it may read the on-disk history). Returns
/// false when the client left.
fn history(store: &FlowStore, q: &Query, end: u64, tx: &Tx) -> bool {
    let lo = store.first();
    let (block, entry) = (|b: &BlockMeta| q.block_ok(b), |sieve| q.sieve.entry(sieve));
    let select = Select { block: &block, entry: &entry };
    if !q.first && q.number > 0 {
        // The newest `number` matches: walk back, then send oldest first.
        let mut picked: Vec<Arc<Stored>> = Vec::new();
        let mut flows = 0u64;
        let mut pos = end;
        while pos > lo && flows < q.number {
            match store.chunk_before(pos, lo, select) {
                Chunk::Entries { start, entries, .. } => {
                    for e in entries.iter().rev().filter(|e| e.index < pos && e.index >= lo) {
                        match q.wants(e) {
                            Some(true) if flows < q.number => {
                                flows += 1;
                                picked.push(e.clone());
                            }
                            Some(false) => picked.push(e.clone()),
                            _ => {}
                        }
                    }
                    if start >= pos {
                        break;
                    }
                    pos = start;
                }
                Chunk::Skipped { start, .. } => pos = start.min(pos - 1),
                Chunk::Missing { .. } => break,
            }
        }
        picked.reverse();
        // Nearly sorted already (the store is in release order); make it exact.
        picked.sort_by_key(|e| (e.time_ns, e.index));
        return picked.iter().all(|e| tx.blocking_send(Ok(q.out(&e.resp))).is_ok());
    }
    // Oldest first: everything in range, or the first `number` matches.
    let mut flows = 0u64;
    let mut pos = lo;
    while pos < end && (q.number == 0 || flows < q.number) {
        match store.chunk_from(pos, end, select) {
            Chunk::Entries { end: chunk_end, entries, .. } => {
                if chunk_end <= pos {
                    break;
                }
                for e in entries.iter().filter(|e| e.index >= pos && e.index < end) {
                    let send = match q.wants(e) {
                        Some(true) if q.number == 0 || flows < q.number => {
                            flows += 1;
                            true
                        }
                        Some(false) => true,
                        _ => false,
                    };
                    if send && tx.blocking_send(Ok(q.out(&e.resp))).is_err() {
                        return false;
                    }
                }
                pos = chunk_end;
            }
            Chunk::Skipped { end: e, .. } | Chunk::Missing { end: e, .. } => pos = e.max(pos + 1),
        }
    }
    true
}
