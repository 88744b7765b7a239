//! Hops: flows grouped by (source endpoint → destination endpoint, destination port, transport),
//! with per-hop request, error and latency figures, TCP health and drops.
//!
//! Pure and synchronous: flows in, state out, no I/O, so the agent (which exports the state as
//! Prometheus metrics) and `hopwatch hops` (which shows it as a table over flows fetched from a
//! collector) run the same code.
//!
//! - [`Aggregator`]: running totals since the agent started, for Prometheus (which computes rates
//!   from counters). Memory is bounded: a hard series limit per metric family with an overflow
//!   hop ([`table`]), and hops silent for `stale_after` are evicted (their series disappear).
//! - [`window::Window`]: the last few minutes in time slots, for `hopwatch hops --watch`: old
//!   slots fall out, so rates and quantiles are those of the window.
//! - [`view`]: a hop table as rows (rates, error ratio, quantiles); [`path`]: hops chained
//!   upstream → downstream with each hop's share of the end-to-end latency, along the calls the
//!   tracer linked ([`links`]) where there are any.

#![forbid(unsafe_code)]

pub mod aggregate;
pub mod endpoint;
pub mod histogram;
pub mod ledger;
pub mod links;
pub mod path;
pub mod stats;
pub mod table;
pub mod view;
pub mod window;

use std::time::Duration;

/// Maps of the per-flow aggregation path. Keys hold names and addresses that remote peers can
/// choose, so the hash is seeded per process (foldhash), but several times faster than std's
/// SipHash on these short keys.
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
pub(crate) type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

use hopwatch_proto::flow::Flow;

pub use self::{
    aggregate::{Context, Outcome},
    endpoint::{EndpointId, Kind},
    stats::{Hop, Side, SideStats},
    table::HopTable,
};

/// A hop: who talks to whom, on which port and transport.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HopKey {
    /// The client end (the one that connected, or sent the datagram).
    pub source: EndpointId,
    /// The server end.
    pub destination: EndpointId,
    /// Destination (service) port; 0 for ICMP.
    pub port: u32,
    pub transport: Transport,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transport {
    Tcp,
    Udp,
    Sctp,
    Icmp,
    Other,
}

impl Transport {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
            Transport::Sctp => "sctp",
            Transport::Icmp => "icmp",
            Transport::Other => "ip",
        }
    }
}

/// Bounds of the hop state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HopConfig {
    /// Series per metric family at most (per-side families: hop sides; tallies: names); the
    /// rest is counted in the `_overflow_` hop.
    pub series_limit: usize,
    /// Names (failure causes, rcodes, query names, drop reasons) one hop side keeps per tally
    /// before the rest count in the overflow hop.
    pub per_hop_values: usize,
    /// A hop without flows for this long is evicted (unless it has open connections, which keep
    /// it up to [`ledger::FORGET_AFTER_NS`]).
    pub stale_after: Duration,
    /// Keep the tracer's links between exchanges ([`links`]), for paths that requests really
    /// took. Off in the agent's metrics, which do not show paths.
    pub links: bool,
}

impl Default for HopConfig {
    fn default() -> Self {
        Self {
            series_limit: 2000,
            per_hop_values: 16,
            stale_after: Duration::from_mins(5),
            links: false,
        }
    }
}

impl HopConfig {
    /// The aggregation state for this configuration.
    fn context(&self) -> Context {
        let mut cx = Context::default();
        cx.links = self.links.then(links::Links::default);
        cx
    }
}

/// How often (in flow time) the aggregator evicts by itself while flows arrive.
const SWEEP_EVERY_NS: u64 = 10_000_000_000;

/// Running per-hop totals for the agent's metrics.
#[derive(Debug)]
pub struct Aggregator {
    cfg: HopConfig,
    cx: Context,
    table: HopTable,
    last_sweep_ns: u64,
    /// Flows counted and flows that carried nothing to count.
    pub counted: u64,
    pub ignored: u64,
    /// Hops evicted as stale.
    pub evicted: u64,
}

impl Aggregator {
    #[must_use]
    pub fn new(cfg: HopConfig) -> Self {
        Self {
            cfg,
            cx: cfg.context(),
            table: HopTable::new(cfg.series_limit, cfg.per_hop_values),
            last_sweep_ns: 0,
            counted: 0,
            ignored: 0,
            evicted: 0,
        }
    }

    /// Adds one flow; `now_ns` (ns since the epoch) stands in for a flow without a time.
    pub fn observe(&mut self, flow: &Flow, now_ns: u64) -> Outcome {
        let at = aggregate::flow_time_ns(flow, now_ns);
        let outcome = aggregate::apply(flow, at, &mut self.cx, &mut self.table);
        match outcome {
            Outcome::Counted => self.counted += 1,
            Outcome::Ignored => self.ignored += 1,
        }
        if at > self.last_sweep_ns + SWEEP_EVERY_NS {
            self.sweep(at);
        }
        outcome
    }

    /// The sockets of `node` quiet since before `before_ns` (ns since the epoch) that `alive`
    /// says are gone (closed, their CLOSE flows lost) no longer count as open connections.
    /// Returns how many.
    pub fn forget_gone_sockets(
        &mut self,
        node: &str,
        before_ns: u64,
        alive: impl Fn(u64) -> bool,
    ) -> usize {
        let node = self.cx.resolver.intern(node);
        self.cx.forget_gone_sockets(&node, before_ns, alive)
    }

    /// Adds one exchange measured in the kernel (no flow) on socket `cookie`; `now_ns` is ns
    /// since the epoch.
    pub fn observe_exchange(
        &mut self,
        cookie: u64,
        latency_ns: Option<u64>,
        failed: bool,
        now_ns: u64,
    ) -> Outcome {
        let outcome = aggregate::apply_exchange(
            cookie,
            latency_ns,
            failed,
            now_ns,
            &mut self.cx,
            &mut self.table,
        );
        match outcome {
            Outcome::Counted => self.counted += 1,
            Outcome::Ignored => self.ignored += 1,
        }
        outcome
    }

    /// Evicts hops silent for `stale_after` (those with open connections only once these are
    /// silent for [`ledger::FORGET_AFTER_NS`] too), and forgets their names.
    pub fn sweep(&mut self, now_ns: u64) {
        self.last_sweep_ns = now_ns;
        self.cx.ledger.sweep(now_ns);
        let stale = u64::try_from(self.cfg.stale_after.as_nanos()).unwrap_or(u64::MAX);
        let cutoff = now_ns.saturating_sub(stale);
        self.cx.sweep_awaiting(cutoff);
        let forget = now_ns.saturating_sub(ledger::FORGET_AFTER_NS);
        let ledger = &self.cx.ledger;
        // Open connections keep a quiet hop (its gauge still says something) until they too are
        // forgotten; nothing goes before `stale_after`.
        self.evicted += self.table.evict(|key, hop| {
            hop.last_seen_ns < cutoff && (hop.last_seen_ns < forget || !ledger.has_open(key))
        }) as u64;
        self.table.expire_overflow(cutoff);
        self.cx.resolver.sweep();
    }

    #[must_use]
    pub fn table(&self) -> &HopTable {
        &self.table
    }

    #[must_use]
    pub fn context(&self) -> &Context {
        &self.cx
    }

    #[must_use]
    pub fn config(&self) -> &HopConfig {
        &self.cfg
    }
}

#[cfg(any(test, feature = "testing"))]
pub mod testing;
#[cfg(test)]
mod tests;
