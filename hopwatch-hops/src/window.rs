//! A sliding window over hops: flows go into time slots, slots older than the window fall out,
//! and a view merges the slots still inside. `hopwatch hops --watch` keeps one over a live flow
//! stream, so each refresh shows the last `span` only, in bounded memory (one bounded table per
//! slot).

use std::{collections::VecDeque, time::Duration};

use hopwatch_proto::flow::Flow;

use super::{Context, HopConfig, Outcome, aggregate, table::HopTable};

#[derive(Debug)]
pub struct Window {
    cfg: HopConfig,
    cx: Context,
    slot_ns: u64,
    span_ns: u64,
    /// (slot start ns, hops in that slot), oldest first.
    slots: VecDeque<(u64, HopTable)>,
    /// Flows older than the window when they arrived.
    pub too_old: u64,
    /// When (flow time) the ledger last forgot silent sockets.
    last_ledger_sweep_ns: u64,
    pub counted: u64,
    pub ignored: u64,
}

impl Window {
    /// A window of `span` in `slots` slots.
    #[must_use]
    pub fn new(span: Duration, slots: u32, cfg: HopConfig) -> Self {
        let span_ns = u64::try_from(span.as_nanos()).unwrap_or(u64::MAX).max(1);
        let slot_ns = (span_ns / u64::from(slots.max(1))).max(1);
        Self {
            cfg,
            cx: cfg.context(),
            slot_ns,
            span_ns,
            slots: VecDeque::new(),
            too_old: 0,
            last_ledger_sweep_ns: 0,
            counted: 0,
            ignored: 0,
        }
    }

    #[must_use]
    pub fn span(&self) -> Duration {
        Duration::from_nanos(self.span_ns)
    }

    /// Adds a flow (stamped with its own time, `now_ns` if it has none).
    pub fn observe(&mut self, flow: &Flow, now_ns: u64) -> Outcome {
        let at = aggregate::flow_time_ns(flow, now_ns);
        let start = at - at % self.slot_ns;
        let newest = self.slots.back().map_or(0, |(s, _)| *s);
        if start + self.span_ns <= newest {
            self.too_old += 1;
            return Outcome::Ignored;
        }
        let pos = match self.slots.iter().rposition(|(s, _)| *s <= start) {
            Some(i) if self.slots[i].0 == start => i,
            Some(i) => {
                self.slots.insert(i + 1, (start, self.table()));
                i + 1
            }
            None => {
                self.slots.push_front((start, self.table()));
                0
            }
        };
        let outcome = aggregate::apply(flow, at, &mut self.cx, &mut self.slots[pos].1);
        match outcome {
            Outcome::Counted => self.counted += 1,
            Outcome::Ignored => self.ignored += 1,
        }
        self.advance(newest.max(start) + self.slot_ns);
        outcome
    }

    fn table(&self) -> HopTable {
        HopTable::new(self.cfg.series_limit, self.cfg.per_hop_values)
    }

    /// Drops the slots that ended at or before `now_ns - span`.
    pub fn advance(&mut self, now_ns: u64) {
        let cutoff = now_ns.saturating_sub(self.span_ns);
        while self.slots.front().is_some_and(|(s, _)| s + self.slot_ns <= cutoff) {
            self.slots.pop_front();
        }
        // A walk over every socket: once a slot, not once a flow.
        if now_ns >= self.last_ledger_sweep_ns + self.slot_ns {
            self.cx.ledger.sweep(now_ns);
            if let Some(links) = self.cx.links.as_mut() {
                links.forget_before(cutoff);
            }
            self.last_ledger_sweep_ns = now_ns;
        }
    }

    /// The hops of every slot in the window, merged.
    #[must_use]
    pub fn view(&self) -> HopTable {
        let mut all = HopTable::new(usize::MAX, usize::MAX);
        for (_, t) in &self.slots {
            all.merge(t);
        }
        all
    }

    #[must_use]
    pub fn context(&self) -> &Context {
        &self.cx
    }
}
