//! The merge stage: one thread that orders events from all nodes by time within a bounded sort
//! window (as Hubble Relay does across nodes), appends them to the store, and acknowledges
//! agents once their events are stored.
//!
//! Like Relay, it merges per-source streams: each agent's events stay in the order the agent
//! sent them (its sequence numbers), and the stage repeatedly releases the earliest of the
//! sources' next events once that event has waited `window` (or once more than `max_pending`
//! events wait). Events from a node that lags by more than the window come out late, not lost.
//!
//! Keeping each agent's events in sequence order is what makes acknowledgements exact: what has
//! been released of an agent is always a prefix of its sequence numbers, so the checkpoint
//! written with those events (and the acknowledgement sent after) names precisely what is
//! stored. After a crash, recovery truncates to the last checkpoint and the agent resends
//! exactly what follows it: no event is stored twice.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use hopwatch_proto::clock;
use tokio::sync::{mpsc, oneshot};

use super::{
    agents::AgentState,
    store::{
        Incoming, StoreWriter,
        record::{AgentMark, Checkpoint},
    },
};

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
    Batch { agent: Arc<AgentState>, last_seq: u64, events: Vec<Incoming> },
    /// Events the collector itself produced (lost-event notices).
    Notices(Vec<Incoming>),
    /// Release everything now and answer when it is stored (shutdown, tests).
    Flush(oneshot::Sender<()>),
}

struct Pending {
    arrival: Instant,
    entry: Incoming,
    /// The agent's sequence number (none for the collector's own notices).
    seq: Option<u64>,
}

/// One source's events, in the order it sent them.
struct Source {
    /// `None` for the collector's own notices.
    agent: Option<Arc<AgentState>>,
    queue: VecDeque<Pending>,
    /// Everything up to here is released (and, after the next commit, stored).
    ready_through: u64,
    updated_unix_s: i64,
}

/// A source's next event, as the merge heap orders them.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Head {
    time_ns: i64,
    /// Ties go to the event that arrived first.
    order: u64,
    source: usize,
}

struct Merger {
    cfg: MergeConfig,
    writer: StoreWriter,
    /// Source 0 is the collector's own notices.
    sources: Vec<Source>,
    by_id: HashMap<String, usize>,
    heads: BinaryHeap<Reverse<Head>>,
    pending: usize,
    order: u64,
    /// Released but not yet written.
    out: Vec<Incoming>,
    dirty: bool,
    failing_since: Option<Instant>,
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
                sources: vec![Source {
                    agent: None,
                    queue: VecDeque::new(),
                    ready_through: 0,
                    updated_unix_s: 0,
                }],
                by_id: HashMap::new(),
                heads: BinaryHeap::new(),
                pending: 0,
                order: 0,
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
        self.by_id.insert(state.id.clone(), self.sources.len());
        self.sources.push(Source {
            agent: Some(state),
            queue: VecDeque::new(),
            ready_through,
            updated_unix_s: clock::now_ns() / 1_000_000_000,
        });
        self.sources.len() - 1
    }

    async fn run(&mut self, mut rx: mpsc::Receiver<MergeMsg>) {
        loop {
            let mut deadline = self.next_due();
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
                () = clock::sleep_until(deadline.map(Into::into)) => None,
            };
            let mut flush = Vec::new();
            if let Some(m) = msg {
                self.accept(m, &mut flush);
                // Take whatever else is queued before writing: one write per burst.
                while self.pending < self.cfg.max_pending * 2 {
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

    /// When the earliest waiting event is due.
    fn next_due(&self) -> Option<Instant> {
        let Reverse(head) = self.heads.peek()?;
        let p = self.sources[head.source].queue.front().expect("a head has an event");
        Some(p.arrival + self.cfg.window)
    }

    fn accept(&mut self, msg: MergeMsg, flush: &mut Vec<oneshot::Sender<()>>) {
        let arrival = Instant::now();
        match msg {
            MergeMsg::Batch { agent, last_seq, events } => {
                let idx = self.track(agent);
                self.sources[idx].updated_unix_s = clock::now_ns() / 1_000_000_000;
                let first_seq = last_seq + 1 - events.len() as u64;
                for (resp, seq) in events.into_iter().zip(first_seq..) {
                    self.push(idx, resp, arrival, Some(seq));
                }
            }
            MergeMsg::Notices(events) => {
                for resp in events {
                    self.push(0, resp, arrival, None);
                }
            }
            MergeMsg::Flush(tx) => flush.push(tx),
        }
    }

    fn push(&mut self, source: usize, entry: Incoming, arrival: Instant, seq: Option<u64>) {
        let time_ns = entry.time_ns;
        let q = &mut self.sources[source].queue;
        let was_empty = q.is_empty();
        q.push_back(Pending { arrival, entry, seq });
        self.pending += 1;
        if was_empty {
            self.order += 1;
            self.heads.push(Reverse(Head { time_ns, order: self.order, source }));
        }
    }

    /// Moves due events (all of them with `everything`) from the window to the output.
    fn release(&mut self, everything: bool) {
        let now = Instant::now();
        while let Some(Reverse(head)) = self.heads.peek() {
            let source = head.source;
            let due = everything
                || self.pending > self.cfg.max_pending
                || self.sources[source]
                    .queue
                    .front()
                    .is_some_and(|p| p.arrival + self.cfg.window <= now);
            if !due {
                break;
            }
            self.heads.pop();
            let src = &mut self.sources[source];
            let p = src.queue.pop_front().expect("a head has an event");
            self.pending -= 1;
            if let Some(seq) = p.seq {
                src.ready_through = src.ready_through.max(seq);
                self.dirty = true;
            }
            if let Some(next) = src.queue.front() {
                self.order += 1;
                self.heads.push(Reverse(Head {
                    time_ns: next.entry.time_ns,
                    order: self.order,
                    source,
                }));
            }
            self.out.push(p.entry);
        }
    }

    fn checkpoint(&self) -> Checkpoint {
        let oldest =
            clock::now_ns() / 1_000_000_000 - i64::try_from(MARK_TTL.as_secs()).unwrap_or(i64::MAX);
        let mut agents: Vec<AgentMark> = self
            .sources
            .iter()
            .filter(|s| s.updated_unix_s >= oldest)
            .filter_map(|s| {
                let a = s.agent.as_ref()?;
                Some(AgentMark {
                    agent_id: a.id.clone(),
                    node_name: a.node_name.clone(),
                    seq: s.ready_through,
                    updated_unix_s: s.updated_unix_s,
                })
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
        match self.writer.append(&mut self.out, &cp) {
            Ok(()) => {
                if let Some(since) = self.failing_since.take() {
                    tracing::warn!(after = ?since.elapsed(), "flow history writable again");
                }
                self.dirty = false;
                for s in &self.sources {
                    if let Some(a) = &s.agent {
                        a.set_stored_through(s.ready_through);
                    }
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
