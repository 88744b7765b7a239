//! What is counted per hop: one [`SideStats`] per end that reported it (the client's socket, the
//! server's socket) and the packet drops on the hop.
//!
//! Both ends are kept apart because each measures something different (the client's latency
//! includes the network, the server's does not) and because, when both ends run on traced nodes,
//! adding them would count every request twice. Views take the larger of the two counts.

use std::sync::Arc;

use super::histogram::Histogram;

/// Value of a label past its per-hop or per-family limit.
pub const OTHER: &str = "_other_";

/// How many more series a family may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub used: usize,
    pub limit: usize,
}

impl Budget {
    #[must_use]
    pub fn new(limit: usize) -> Self {
        Self { used: 0, limit }
    }

    /// Takes one series if any is left.
    pub fn take(&mut self) -> bool {
        if self.used < self.limit {
            self.used += 1;
            true
        } else {
            false
        }
    }

    pub fn give_back(&mut self, n: usize) {
        self.used = self.used.saturating_sub(n);
    }
}

/// Counts by a short name (drop reason, failure cause, DNS rcode, query name), bounded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    entries: Vec<(Arc<str>, u64)>,
}

impl Tally {
    /// Adds `n` under `key` when it is already counted, or when there is room for it (fewer than
    /// `cap` names here and a series left in `budget`). Returns false when it did not fit.
    pub fn try_add(&mut self, key: &str, n: u64, cap: usize, budget: &mut Budget) -> bool {
        if let Some(e) = self.entries.iter_mut().find(|(k, _)| k.as_ref() == key) {
            e.1 += n;
            return true;
        }
        if self.entries.len() >= cap || !budget.take() {
            return false;
        }
        self.entries.push((Arc::from(key), n));
        true
    }

    /// Adds `n` under `key`, or under [`OTHER`] once `cap` names are held (never fails; the
    /// overflow hop's tallies use it).
    pub fn add_capped(&mut self, key: &str, n: u64, cap: usize) {
        let key =
            if self.entries.len() >= cap && !self.entries.iter().any(|(k, _)| k.as_ref() == key) {
                OTHER
            } else {
                key
            };
        if let Some(e) = self.entries.iter_mut().find(|(k, _)| k.as_ref() == key) {
            e.1 += n;
        } else {
            self.entries.push((Arc::from(key), n));
        }
    }

    /// Adds every count of `other` (window merges: no limits, both sides were already bounded).
    pub fn merge(&mut self, other: &Tally) {
        for (k, n) in &other.entries {
            if let Some(e) = self.entries.iter_mut().find(|(mine, _)| mine == k) {
                e.1 += n;
            } else {
                self.entries.push((k.clone(), *n));
            }
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.entries.iter().map(|(k, n)| (k.as_ref(), *n))
    }

    #[must_use]
    pub fn get(&self, key: &str) -> u64 {
        self.entries.iter().find(|(k, _)| k.as_ref() == key).map_or(0, |e| e.1)
    }

    #[must_use]
    pub fn total(&self) -> u64 {
        self.entries.iter().map(|e| e.1).sum()
    }

    /// Names held (series in the family).
    #[must_use]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The bounded per-side tallies, indexing [`SideStats::tally_mut`] and the table's budgets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TallyKind {
    /// Failed connects by cause (errno name).
    ConnectFailures = 0,
    /// DNS answers by rcode name.
    DnsRcodes = 1,
    /// NXDOMAIN answers by query name.
    Nxdomain = 2,
    /// Packet drops on the hop by kernel reason (hop level, not per side).
    Drops = 3,
    /// Failed TLS handshakes by reason (the alert's description, or a reset or close).
    TlsFailures = 4,
}

impl TallyKind {
    pub const COUNT: usize = 5;
}

/// What one end of a hop reported.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SideStats {
    /// Application protocol of the hop's exchanges ("http", "postgres", ...); the first seen.
    pub protocol: Option<Arc<str>>,
    /// Exchanges (answered or timed out).
    pub requests: u64,
    /// Exchanges that failed (error response, error status, no response).
    pub errors: u64,
    /// Exchanges that got no response in time.
    pub timeouts: u64,
    /// Request → response latency of answered exchanges, as this end measured it.
    pub latency: Histogram,
    /// Connections opened (client: connects that completed; server: accepts).
    pub opened: u64,
    /// TCP handshake time (client side only).
    pub connect: Histogram,
    pub connect_failures: Tally,
    /// Segments this end retransmitted.
    pub retransmits: u64,
    /// RSTs this end sent or received.
    pub resets: u64,
    /// Payload bytes this end sent (acknowledged by the peer) and received.
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub dns_rcodes: Tally,
    pub nxdomain: Tally,
    /// TLS handshakes completed, ClientHello → the client's first encrypted record, as this
    /// end measured it.
    pub tls_handshake: Histogram,
    /// TLS handshakes that failed, by reason.
    pub tls_failures: Tally,
    /// Client connections' set-up (DNS → connect → TLS → first response byte), from their
    /// first exchange's flow: the total's distribution and each phase's sum.
    pub setup: SetupStats,
}

/// Connection set-ups of one side of a hop.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetupStats {
    /// First DNS query (or SYN) → first response byte.
    pub total: Histogram,
    pub dns_ns: u64,
    pub connect_ns: u64,
    pub tls_ns: u64,
    pub first_byte_ns: u64,
}

impl SetupStats {
    pub fn merge(&mut self, other: &SetupStats) {
        self.total.merge(&other.total);
        self.dns_ns += other.dns_ns;
        self.connect_ns += other.connect_ns;
        self.tls_ns += other.tls_ns;
        self.first_byte_ns += other.first_byte_ns;
    }
}

impl SideStats {
    pub fn tally_mut(&mut self, kind: TallyKind) -> &mut Tally {
        match kind {
            TallyKind::ConnectFailures => &mut self.connect_failures,
            TallyKind::DnsRcodes => &mut self.dns_rcodes,
            TallyKind::Nxdomain => &mut self.nxdomain,
            TallyKind::TlsFailures => &mut self.tls_failures,
            TallyKind::Drops => unreachable!("drops are counted per hop, not per side"),
        }
    }

    /// Adds `other`'s counts (window merges).
    pub fn merge(&mut self, other: &SideStats) {
        if self.protocol.is_none() {
            self.protocol.clone_from(&other.protocol);
        }
        self.requests += other.requests;
        self.errors += other.errors;
        self.timeouts += other.timeouts;
        self.latency.merge(&other.latency);
        self.opened += other.opened;
        self.connect.merge(&other.connect);
        self.connect_failures.merge(&other.connect_failures);
        self.retransmits += other.retransmits;
        self.resets += other.resets;
        self.bytes_sent += other.bytes_sent;
        self.bytes_received += other.bytes_received;
        self.dns_rcodes.merge(&other.dns_rcodes);
        self.nxdomain.merge(&other.nxdomain);
        self.tls_handshake.merge(&other.tls_handshake);
        self.tls_failures.merge(&other.tls_failures);
        self.setup.merge(&other.setup);
    }

    /// Tally series this side holds, per kind (to give budgets back on eviction).
    #[must_use]
    pub fn tally_series(&self) -> [usize; TallyKind::COUNT] {
        [
            self.connect_failures.len(),
            self.dns_rcodes.len(),
            self.nxdomain.len(),
            0,
            self.tls_failures.len(),
        ]
    }
}

/// Which end of a hop reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Side {
    /// The socket that connected (Hubble's EGRESS).
    Client,
    /// The socket that accepted (Hubble's INGRESS).
    Server,
}

impl Side {
    pub const BOTH: [Side; 2] = [Side::Client, Side::Server];

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Server => "server",
        }
    }
}

/// Everything counted for one hop.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hop {
    pub client: Option<Box<SideStats>>,
    pub server: Option<Box<SideStats>>,
    /// Packets dropped on the hop, by kernel reason.
    pub drops: Tally,
    /// Flow time (ns since the epoch) of the last observation.
    pub last_seen_ns: u64,
}

impl Hop {
    #[must_use]
    pub fn side(&self, side: Side) -> Option<&SideStats> {
        match side {
            Side::Client => self.client.as_deref(),
            Side::Server => self.server.as_deref(),
        }
    }

    pub fn side_slot(&mut self, side: Side) -> &mut Option<Box<SideStats>> {
        match side {
            Side::Client => &mut self.client,
            Side::Server => &mut self.server,
        }
    }

    /// Adds `other`'s counts (window merges).
    pub fn merge(&mut self, other: &Hop) {
        for side in Side::BOTH {
            if let Some(theirs) = other.side(side) {
                self.side_slot(side).get_or_insert_with(Box::default).merge(theirs);
            }
        }
        self.drops.merge(&other.drops);
        self.last_seen_ns = self.last_seen_ns.max(other.last_seen_ns);
    }

    /// Per-side series and tally series this hop holds (to give budgets back on eviction).
    #[must_use]
    pub fn series(&self) -> (usize, [usize; TallyKind::COUNT]) {
        let mut tallies = [0; TallyKind::COUNT];
        let mut sides = 0;
        for s in Side::BOTH.iter().filter_map(|s| self.side(*s)) {
            sides += 1;
            for (t, n) in tallies.iter_mut().zip(s.tally_series()) {
                *t += n;
            }
        }
        tallies[TallyKind::Drops as usize] = self.drops.len();
        (sides, tallies)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tally_keeps_its_names_within_the_cap_and_the_budget() {
        let mut budget = Budget::new(3);
        let mut t = Tally::default();
        assert!(t.try_add("ECONNREFUSED", 1, 2, &mut budget));
        assert!(t.try_add("ECONNREFUSED", 2, 2, &mut budget), "a known name always fits");
        assert!(t.try_add("ETIMEDOUT", 1, 2, &mut budget));
        assert!(!t.try_add("EHOSTUNREACH", 1, 2, &mut budget), "per-hop cap");
        let mut other = Tally::default();
        assert!(other.try_add("A", 1, 8, &mut budget));
        assert!(!other.try_add("B", 1, 8, &mut budget), "family budget");
        assert_eq!((t.get("ECONNREFUSED"), t.total(), budget.used), (3, 4, 3));
        let mut capped = Tally::default();
        for k in ["a", "b", "c", "a"] {
            capped.add_capped(k, 1, 2);
        }
        assert_eq!((capped.get("a"), capped.get("b"), capped.get(OTHER)), (2, 1, 1));
    }
}
