//! Open connections, per socket: turns the running totals that connection flows carry (a periodic
//! UPDATE and the final CLOSE report everything since the connection began) into increments, and
//! counts the connections open on each hop.
//!
//! A connection whose opening was not seen (the agent started after it) joins at its first UPDATE;
//! its totals then include what happened before, which is counted once, at that point. A socket
//! silent for [`FORGET_AFTER_NS`] (its CLOSE lost) is forgotten.

use std::sync::Arc;

use hopwatch_proto::compact::Compact as _;

use super::{FastMap, HopKey, stats::Side};

/// Sockets tracked at most; past this new connections are not tracked (their final totals are
/// still counted at CLOSE) and [`Ledger::untracked`] grows.
pub const MAX_SOCKETS: usize = 262_144;
/// A socket without any flow for this long is forgotten (an idle pooled connection reports no
/// UPDATE; its CLOSE, if lost, would otherwise keep it open forever).
pub const FORGET_AFTER_NS: u64 = 3_600 * 1_000_000_000;

/// Running totals of one socket as its flows report them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpTotals {
    pub retransmits: u64,
    pub resets: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

impl TcpTotals {
    /// What grew since `before` (a counter that went down restarts from zero).
    #[must_use]
    pub fn since(&self, before: &TcpTotals) -> TcpTotals {
        let d = |now: u64, then: u64| if now >= then { now - then } else { now };
        TcpTotals {
            retransmits: d(self.retransmits, before.retransmits),
            resets: d(self.resets, before.resets),
            bytes_sent: d(self.bytes_sent, before.bytes_sent),
            bytes_received: d(self.bytes_received, before.bytes_received),
        }
    }
}

#[derive(Debug, Clone)]
struct Socket {
    hop: HopKey,
    side: Side,
    last: TcpTotals,
    last_seen_ns: u64,
}

/// Open sockets by (node, socket cookie).
#[derive(Debug, Default)]
pub struct Ledger {
    sockets: FastMap<(Arc<str>, u64), Socket>,
    open: FastMap<(HopKey, Side), u32>,
    /// Connections not tracked because [`MAX_SOCKETS`] were.
    pub untracked: u64,
}

impl Ledger {
    /// A connection opened (CONNECT or ACCEPT); returns what its first report adds.
    pub fn open(
        &mut self,
        node: &Arc<str>,
        cookie: u64,
        hop: &HopKey,
        side: Side,
        totals: TcpTotals,
        at_ns: u64,
    ) -> TcpTotals {
        self.report(node, cookie, hop, side, totals, at_ns)
    }

    /// A periodic report (UPDATE); returns the increments since the previous one.
    pub fn report(
        &mut self,
        node: &Arc<str>,
        cookie: u64,
        hop: &HopKey,
        side: Side,
        totals: TcpTotals,
        at_ns: u64,
    ) -> TcpTotals {
        let key = (node.clone(), cookie);
        if let Some(s) = self.sockets.get_mut(&key) {
            let delta = totals.since(&s.last);
            s.last = totals;
            s.last_seen_ns = at_ns;
            return delta;
        }
        if self.sockets.len() >= MAX_SOCKETS {
            self.untracked += 1;
            return totals;
        }
        *self.open.entry((hop.clone(), side)).or_default() += 1;
        self.sockets
            .insert(key, Socket { hop: hop.clone(), side, last: totals, last_seen_ns: at_ns });
        totals
    }

    /// The connection closed; returns the increments since its previous report (everything, if
    /// it was not tracked).
    pub fn close(&mut self, node: &Arc<str>, cookie: u64, totals: TcpTotals) -> TcpTotals {
        match self.sockets.remove(&(node.clone(), cookie)) {
            Some(s) => {
                self.forget_open(&s);
                totals.since(&s.last)
            }
            None => totals,
        }
    }

    /// The connection closed without its CLOSE reaching the agent (lost): no longer open, and
    /// nothing more is counted for it (its final totals went with the CLOSE).
    pub fn forget(&mut self, node: &Arc<str>, cookie: u64) {
        if let Some(s) = self.sockets.remove(&(node.clone(), cookie)) {
            self.forget_open(&s);
        }
    }

    /// Forgets the sockets of `node` quiet since before `before_ns` that `alive` says are gone
    /// (closed without their CLOSE reaching the agent); returns how many.
    pub fn forget_gone(
        &mut self,
        node: &Arc<str>,
        before_ns: u64,
        alive: impl Fn(u64) -> bool,
    ) -> usize {
        let gone: Vec<u64> = self
            .sockets
            .iter()
            .filter(|((n, cookie), s)| n == node && s.last_seen_ns < before_ns && !alive(*cookie))
            .map(|((_, cookie), _)| *cookie)
            .collect();
        for &cookie in &gone {
            self.forget(node, cookie);
        }
        gone.len()
    }

    fn forget_open(&mut self, s: &Socket) {
        let k = (s.hop.clone(), s.side);
        if let Some(n) = self.open.get_mut(&k) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.open.remove(&k);
            }
        }
    }

    /// Connections open on `hop` as reported by `side`.
    #[must_use]
    pub fn open_on(&self, hop: &HopKey, side: Side) -> u32 {
        // Borrowed lookup without cloning the key: the map is keyed by owned keys.
        self.open.get(&(hop.clone(), side)).copied().unwrap_or(0)
    }

    /// Every (hop, side) with open connections.
    pub fn open_connections(&self) -> impl Iterator<Item = (&HopKey, Side, u32)> {
        self.open.iter().map(|((h, s), n)| (h, *s, *n))
    }

    /// Whether any connection is open on `hop`.
    #[must_use]
    pub fn has_open(&self, hop: &HopKey) -> bool {
        Side::BOTH.iter().any(|s| self.open_on(hop, *s) > 0)
    }

    /// Forgets sockets silent since before `now_ns - FORGET_AFTER_NS`, and gives back the room
    /// of sockets gone (after a burst of connections).
    pub fn sweep(&mut self, now_ns: u64) {
        let cutoff = now_ns.saturating_sub(FORGET_AFTER_NS);
        let stale: Vec<(Arc<str>, u64)> = self
            .sockets
            .iter()
            .filter(|(_, s)| s.last_seen_ns < cutoff)
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            if let Some(s) = self.sockets.remove(&k) {
                self.forget_open(&s);
            }
        }
        self.sockets.compact();
        self.open.compact();
    }

    /// Sockets tracked.
    #[must_use]
    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }
}
