//! The merge stage: one thread that orders events from all nodes by time within a bounded sort
//! window (as Hubble Relay does across nodes), appends them to the store, and acknowledges
//! agents once their events are stored.
//!
//! An event waits until it has been in the window for `window` (or the window holds more than
//! `max_pending` events), then leaves in time order. Events from a node that lags by more than
//! the window come out late, not lost. Acknowledgements follow storage: an agent's sequence
//! number is acknowledged only when every event up to it has been written (with the history's
//! checkpoint), so after a crash the checkpoint and the acknowledgements agree.

use std::{
    cell::Cell,
    cmp::Reverse,
    collections::{BinaryHeap, HashMap, VecDeque},
    rc::Rc,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use tokio::sync::{mpsc, oneshot};

use super::{
    hub::AgentState,
    store::{
        StoreWriter, entry_time_ns,
        record::{AgentMark, Checkpoint},
    },
};
use crate::proto::observer::GetFlowsResponse;

/// Marks of agents not heard from for this long are dropped from checkpoints.
const MARK_TTL: Duration = Duration::from_hours(24 * 7);
/// At most this many agents are remembered in checkpoints (the most recent).
const MAX_MARKS: usize = 16_384;

#[derive(Debug, Clone, Copy)]
pub struct MergeConfig {
    pub window: Duration,
    pub max_pending: usize,
}

pub enum MergeMsg {
    /// Events from an agent with sequence numbers `last_seq + 1 - events.len() ..= last_seq`.
    Batch { agent: Arc<AgentState>, last_seq: u64, events: Vec<GetFlowsResponse> },
    /// Events the collector itself produced (lost-event notices).
    Notices(Vec<GetFlowsResponse>),
    /// Release everything now and answer when it is stored (shutdown, tests).
    Flush(oneshot::Sender<()>),
}

struct BatchTrack {
    last_seq: u64,
    remaining: Cell<usize>,
}

struct Pending {
    time_ns: i64,
    order: u64,
    arrival: Instant,
    resp: GetFlowsResponse,
    batch: Option<Rc<BatchTrack>>,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        (self.time_ns, self.order) == (other.time_ns, other.order)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.time_ns, self.order).cmp(&(other.time_ns, other.order))
    }
}

struct AgentTrack {
    state: Arc<AgentState>,
    batches: VecDeque<Rc<BatchTrack>>,
    /// Everything up to here is released (and, after the next commit, stored).
    ready_through: u64,
    updated_unix_s: i64,
}

struct Merger {
    cfg: MergeConfig,
    writer: StoreWriter,
    heap: BinaryHeap<Reverse<Pending>>,
    order: u64,
    agents: Vec<AgentTrack>,
    by_id: HashMap<String, usize>,
    /// Released but not yet written.
    out: Vec<(i64, GetFlowsResponse)>,
    dirty: bool,
    failing_since: Option<Instant>,
}

fn unix_now_s() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0))
}

/// Runs the merge stage on its own thread until every sender is gone.
pub fn spawn(
    cfg: MergeConfig,
    writer: StoreWriter,
    known: Vec<Arc<AgentState>>,
    rx: mpsc::Receiver<MergeMsg>,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("hopwatch-merge".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("a current-thread runtime builds");
            let mut m = Merger {
                cfg,
                writer,
                heap: BinaryHeap::new(),
                order: 0,
                agents: Vec::new(),
                by_id: HashMap::new(),
                out: Vec::new(),
                dirty: false,
                failing_since: None,
            };
            for a in known {
                m.track(a);
            }
            rt.block_on(m.run(rx));
        })
        .expect("spawning the merge thread")
}

impl Merger {
    fn track(&mut self, state: Arc<AgentState>) -> usize {
        if let Some(&i) = self.by_id.get(&state.id) {
            return i;
        }
        let ready_through = state.stored_through();
        self.agents.push(AgentTrack {
            state: state.clone(),
            batches: VecDeque::new(),
            ready_through,
            updated_unix_s: unix_now_s(),
        });
        self.by_id.insert(state.id.clone(), self.agents.len() - 1);
        self.agents.len() - 1
    }

    async fn run(&mut self, mut rx: mpsc::Receiver<MergeMsg>) {
        loop {
            let mut deadline = self.heap.peek().map(|Reverse(p)| p.arrival + self.cfg.window);
            if self.failing_since.is_some() {
                // Retry a failed history write even when nothing new arrives.
                let retry = Instant::now() + Duration::from_secs(1);
                deadline = Some(deadline.map_or(retry, |d| d.min(retry)));
            }
            let msg = tokio::select! {
                msg = rx.recv() => match msg {
                    Some(m) => Some(m),
                    None => break,
                },
                () = sleep_until(deadline) => None,
            };
            let mut flush = Vec::new();
            if let Some(m) = msg {
                self.accept(m, &mut flush);
                // Take whatever else is queued before writing: one write per burst.
                while self.heap.len() < self.cfg.max_pending * 2 {
                    match rx.try_recv() {
                        Ok(m) => self.accept(m, &mut flush),
                        Err(_) => break,
                    }
                }
            }
            self.release(!flush.is_empty());
            self.commit();
            for f in flush {
                let _ = f.send(());
            }
        }
        self.release(true);
        self.commit();
        let cp = self.checkpoint();
        if let Err(e) = self.writer.close(&cp) {
            tracing::error!(error = %e, "cannot close the flow history cleanly");
        }
    }

    fn accept(&mut self, msg: MergeMsg, flush: &mut Vec<oneshot::Sender<()>>) {
        let arrival = Instant::now();
        match msg {
            MergeMsg::Batch { agent, last_seq, events } => {
                let idx = self.track(agent);
                let track = Rc::new(BatchTrack { last_seq, remaining: Cell::new(events.len()) });
                self.agents[idx].batches.push_back(track.clone());
                self.agents[idx].updated_unix_s = unix_now_s();
                for resp in events {
                    self.push(resp, arrival, Some(track.clone()));
                }
                if track.remaining.get() == 0 {
                    self.dirty = true;
                }
            }
            MergeMsg::Notices(events) => {
                for resp in events {
                    self.push(resp, arrival, None);
                }
            }
            MergeMsg::Flush(tx) => flush.push(tx),
        }
    }

    fn push(&mut self, resp: GetFlowsResponse, arrival: Instant, batch: Option<Rc<BatchTrack>>) {
        self.order += 1;
        self.heap.push(Reverse(Pending { time_ns: entry_time_ns(&resp), order: self.order, arrival, resp, batch }));
    }

    /// Moves due events (all of them with `everything`) from the window to the output.
    fn release(&mut self, everything: bool) {
        let now = Instant::now();
        while let Some(Reverse(top)) = self.heap.peek() {
            let due = everything
                || self.heap.len() > self.cfg.max_pending
                || top.arrival + self.cfg.window <= now;
            if !due {
                break;
            }
            let Reverse(p) = self.heap.pop().expect("peeked");
            if let Some(b) = &p.batch {
                b.remaining.set(b.remaining.get() - 1);
                self.dirty = true;
            }
            self.out.push((p.time_ns, p.resp));
        }
        if self.dirty {
            for a in &mut self.agents {
                while let Some(b) = a.batches.front().filter(|b| b.remaining.get() == 0) {
                    a.ready_through = a.ready_through.max(b.last_seq);
                    a.batches.pop_front();
                }
            }
        }
    }

    fn checkpoint(&self) -> Checkpoint {
        let oldest = unix_now_s() - i64::try_from(MARK_TTL.as_secs()).unwrap_or(i64::MAX);
        let mut agents: Vec<AgentMark> = self
            .agents
            .iter()
            .filter(|a| a.updated_unix_s >= oldest)
            .map(|a| AgentMark {
                agent_id: a.state.id.clone(),
                node_name: a.state.node_name.clone(),
                seq: a.ready_through,
                updated_unix_s: a.updated_unix_s,
            })
            .collect();
        if agents.len() > MAX_MARKS {
            agents.sort_by_key(|a| Reverse(a.updated_unix_s));
            agents.truncate(MAX_MARKS);
        }
        Checkpoint { agents }
    }

    fn commit(&mut self) {
        if self.out.is_empty() && !self.dirty && self.failing_since.is_none() {
            return;
        }
        let cp = self.checkpoint();
        let out = std::mem::take(&mut self.out);
        match self.writer.append(out, &cp) {
            Ok(()) => {
                if let Some(since) = self.failing_since.take() {
                    tracing::warn!(after = ?since.elapsed(), "flow history writable again");
                }
                self.dirty = false;
                for a in &self.agents {
                    a.state.set_stored_through(a.ready_through);
                }
            }
            Err(e) => {
                // Entries are in memory (readers see them) and stay in the write buffer; agents
                // are not acknowledged, so they keep their copies until a write succeeds.
                if self.failing_since.is_none() {
                    tracing::error!(error = %e, "cannot write the flow history; agents are not acknowledged until it works again");
                    self.failing_since = Some(Instant::now());
                }
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}
