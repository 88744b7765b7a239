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
    /// As the flow carries them (32 bits), so a socket's last totals fit in 24 bytes.
    pub retransmits: u32,
    pub resets: u32,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

impl TcpTotals {
    /// What grew since `before` (a counter that went down restarts from zero).
    #[must_use]
    pub fn since(&self, before: &TcpTotals) -> TcpTotals {
        fn d<T: PartialOrd + std::ops::Sub<Output = T> + Copy>(now: T, then: T) -> T {
            if now >= then { now - then } else { now }
        }
        TcpTotals {
            retransmits: d(self.retransmits, before.retransmits),
            resets: d(self.resets, before.resets),
            bytes_sent: d(self.bytes_sent, before.bytes_sent),
            bytes_received: d(self.bytes_received, before.bytes_received),
        }
    }
}

/// One socket: 40 bytes. Its hop and the node it is on are slots in the ledger's tables, not
/// keys of their own (at 200k sockets, cloned keys cost about 25 MiB more).
#[derive(Debug, Clone)]
struct Socket {
    /// Index in [`Ledger::open`]: the (hop, side) it is open on.
    slot: u32,
    last: TcpTotals,
    last_seen_ns: u64,
}

const _: () = assert!(std::mem::size_of::<Socket>() == 40);

/// A (hop, side) with open connections.
#[derive(Debug)]
struct Open {
    hop: HopKey,
    side: Side,
    count: u32,
}

/// Open sockets by (node, socket cookie).
#[derive(Debug, Default)]
pub struct Ledger {
    /// (node slot, cookie) → socket.
    sockets: FastMap<(u32, u64), Socket>,
    /// Nodes by slot, and their slots; a node keeps its slot (nodes are few).
    nodes: Vec<Arc<str>>,
    node_slots: FastMap<Arc<str>, u32>,
    /// (hop, side) slots; a slot whose count fell to 0 is `None` and reused.
    open: Vec<Option<Open>>,
    open_slots: FastMap<(HopKey, Side), u32>,
    free: Vec<u32>,
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
        let key = (self.node_slot(node), cookie);
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
        let slot = self.open_slot(hop, side);
        self.sockets.insert(key, Socket { slot, last: totals, last_seen_ns: at_ns });
        totals
    }

    /// The connection closed; returns the increments since its previous report (everything, if
    /// it was not tracked).
    pub fn close(&mut self, node: &Arc<str>, cookie: u64, totals: TcpTotals) -> TcpTotals {
        match self.remove(node, cookie) {
            Some(s) => totals.since(&s.last),
            None => totals,
        }
    }

    /// The connection closed without its CLOSE reaching the agent (lost): no longer open, and
    /// nothing more is counted for it (its final totals went with the CLOSE).
    pub fn forget(&mut self, node: &Arc<str>, cookie: u64) {
        self.remove(node, cookie);
    }

    /// Forgets the sockets of `node` quiet since before `before_ns` that `alive` says are gone
    /// (closed without their CLOSE reaching the agent); returns how many.
    pub fn forget_gone(
        &mut self,
        node: &Arc<str>,
        before_ns: u64,
        alive: impl Fn(u64) -> bool,
    ) -> usize {
        let Some(&n) = self.node_slots.get(node) else { return 0 };
        self.remove_where(|(slot, cookie), s| {
            slot == n && s.last_seen_ns < before_ns && !alive(cookie)
        })
    }

    fn node_slot(&mut self, node: &Arc<str>) -> u32 {
        if let Some(&slot) = self.node_slots.get(node) {
            return slot;
        }
        let slot = u32::try_from(self.nodes.len()).expect("fewer than 2^32 nodes");
        self.nodes.push(node.clone());
        self.node_slots.insert(node.clone(), slot);
        slot
    }

    /// The slot of (hop, side), its count grown by one.
    fn open_slot(&mut self, hop: &HopKey, side: Side) -> u32 {
        if let Some(&slot) = self.open_slots.get(&(hop.clone(), side)) {
            if let Some(o) = &mut self.open[slot as usize] {
                o.count += 1;
            }
            return slot;
        }
        let entry = Some(Open { hop: hop.clone(), side, count: 1 });
        let slot = if let Some(slot) = self.free.pop() {
            self.open[slot as usize] = entry;
            slot
        } else {
            self.open.push(entry);
            u32::try_from(self.open.len() - 1).expect("fewer than 2^32 hops")
        };
        self.open_slots.insert((hop.clone(), side), slot);
        slot
    }

    fn remove(&mut self, node: &Arc<str>, cookie: u64) -> Option<Socket> {
        let n = *self.node_slots.get(node)?;
        let s = self.sockets.remove(&(n, cookie))?;
        self.forget_open(s.slot);
        Some(s)
    }

    /// Removes the sockets `pick` selects; returns how many.
    fn remove_where(&mut self, pick: impl Fn((u32, u64), &Socket) -> bool) -> usize {
        let picked: Vec<((u32, u64), u32)> =
            self.sockets.iter().filter(|(k, s)| pick(**k, s)).map(|(k, s)| (*k, s.slot)).collect();
        for (key, slot) in &picked {
            self.sockets.remove(key);
            self.forget_open(*slot);
        }
        picked.len()
    }

    fn forget_open(&mut self, slot: u32) {
        let Some(o) = &mut self.open[slot as usize] else { return };
        o.count = o.count.saturating_sub(1);
        if o.count == 0 {
            let o = self.open[slot as usize].take().expect("the slot just read");
            self.open_slots.remove(&(o.hop, o.side));
            self.free.push(slot);
        }
    }

    /// Connections open on `hop` as reported by `side`.
    #[must_use]
    pub fn open_on(&self, hop: &HopKey, side: Side) -> u32 {
        // Borrowed lookup without cloning the key: the map is keyed by owned keys.
        let slot = self.open_slots.get(&(hop.clone(), side));
        slot.and_then(|&i| self.open[i as usize].as_ref()).map_or(0, |o| o.count)
    }

    /// Every (hop, side) with open connections.
    pub fn open_connections(&self) -> impl Iterator<Item = (&HopKey, Side, u32)> {
        self.open.iter().flatten().map(|o| (&o.hop, o.side, o.count))
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
        self.remove_where(|_, s| s.last_seen_ns < cutoff);
        self.sockets.compact();
        self.open_slots.compact();
        // The slot table shrinks from its end only (slots in use keep their index).
        while self.open.last().is_some_and(Option::is_none) {
            self.open.pop();
        }
        let len = u32::try_from(self.open.len()).unwrap_or(u32::MAX);
        self.free.retain(|&slot| slot < len);
        self.open.compact();
        self.free.compact();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EndpointId, Transport, endpoint::Kind};

    fn hop(port: u32) -> HopKey {
        let end =
            |name: &str| EndpointId { namespace: "".into(), name: name.into(), kind: Kind::Ip };
        HopKey {
            source: end("10.0.0.1"),
            destination: end("10.0.0.2"),
            port,
            transport: Transport::Tcp,
        }
    }

    #[test]
    fn counts_open_sockets_per_hop_and_side_and_reuses_the_room_of_closed_ones() {
        let (mut l, node, other): (Ledger, Arc<str>, Arc<str>) =
            (Ledger::default(), "n1".into(), "n2".into());
        let t = TcpTotals::default();
        l.open(&node, 1, &hop(80), Side::Client, t, 1);
        l.open(&node, 2, &hop(80), Side::Client, t, 1);
        l.open(&node, 3, &hop(80), Side::Server, t, 1);
        l.open(&other, 1, &hop(443), Side::Client, t, 1);
        assert_eq!(l.open_on(&hop(80), Side::Client), 2);
        assert_eq!(l.open_on(&hop(80), Side::Server), 1);
        assert_eq!(l.open_on(&hop(443), Side::Client), 1, "the same cookie on another node");
        let grown = TcpTotals { bytes_sent: 10, ..t };
        assert_eq!(l.report(&node, 1, &hop(80), Side::Client, grown, 2).bytes_sent, 10);
        assert_eq!(l.close(&node, 1, TcpTotals { bytes_sent: 15, ..t }).bytes_sent, 5);
        l.forget(&node, 2);
        assert_eq!(l.open_on(&hop(80), Side::Client), 0);
        assert!(l.has_open(&hop(80)));
        // A hop opened after another's last socket closed takes its room.
        l.open(&node, 4, &hop(8080), Side::Client, t, 3);
        assert_eq!(l.open.len(), 3, "{:?}", l.open);
        let mut open: Vec<(u32, Side, u32)> =
            l.open_connections().map(|(h, s, n)| (h.port, s, n)).collect();
        open.sort_by_key(|o| o.0);
        assert_eq!(open, [(80, Side::Server, 1), (443, Side::Client, 1), (8080, Side::Client, 1)]);
        assert_eq!(l.forget_gone(&node, 10, |cookie| cookie == 3), 1);
        assert_eq!((l.len(), l.open_on(&hop(8080), Side::Client)), (2, 0));
        l.sweep(FORGET_AFTER_NS + 10);
        assert!(l.is_empty() && l.open_connections().next().is_none());
        assert!(l.open.is_empty() && l.free.is_empty(), "the slot table shrank");
    }
}
