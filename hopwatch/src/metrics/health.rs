//! The agent's own health: what it lost and where, how full its buffers and maps are, how often
//! its kernel programs run, how far behind the kernel it is.

use std::{
    collections::{HashMap, HashSet},
    sync::Mutex,
    time::Duration,
};

use prometheus::{
    CounterVec, Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// (reason, location) pairs of kernel drops kept as their own series; the rest are counted under
/// location `_other_` (a reason has a handful of locations; this bounds a pathological kernel).
const KERNEL_DROP_SERIES: usize = 512;

/// Export lag buckets (seconds): the agent drains the ring buffer every 20 ms.
const LAG_BUCKETS: [f64; 12] =
    [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Counter families fed from running totals kept elsewhere (kernel per-CPU counters, pipeline
/// atomics): each reading adds what grew since the previous one.
struct Totals {
    vec: IntCounterVec,
    last: Mutex<HashMap<String, u64>>,
}

impl Totals {
    fn new(r: &Registry, name: &str, help: &str, label: &str) -> Result<Self, prometheus::Error> {
        let vec = IntCounterVec::new(Opts::new(name, help), &[label])?;
        r.register(Box::new(vec.clone()))?;
        Ok(Self { vec, last: Mutex::new(HashMap::new()) })
    }

    /// Records that `label`'s running total is now `total`.
    fn set(&self, label: &str, total: u64) {
        let mut last = self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let prev = last.entry(label.to_owned()).or_insert(0);
        let c = self.vec.with_label_values(&[label]);
        // A total that went down (a restarted source) counts from zero again.
        c.inc_by(if total >= *prev { total - *prev } else { total });
        *prev = total;
    }
}

pub(crate) struct Health {
    flows: IntCounterVec,
    /// `flows`' children by type (l3_l4, l7, drop), looked up once: a label lookup hashes and
    /// locks, and this is counted for every flow.
    flow_children: [std::sync::OnceLock<prometheus::IntCounter>; 3],
    kernel_drops: IntCounterVec,
    kernel_drop_keys: Mutex<HashSet<(String, String)>>,
    lost: Totals,
    queue_dropped: Totals,
    kernel: Totals,
    parse_failures: Totals,
    hop_overflow: Totals,
    tables_full: Totals,
    export_lag: Histogram,
    collector_queue: IntGauge,
    pub ringbuf_size: IntGauge,
    pub ringbuf_used: IntGauge,
    pub ringbuf_peak: IntGauge,
    map_entries: IntGaugeVec,
    map_capacity: IntGaugeVec,
    program_runs: Totals,
    events_read: Totals,
    exchanges: Totals,
    hidden: Totals,
    trace_links: Totals,
    program_run_seconds: CounterVec,
    program_last_ns: Mutex<HashMap<String, u64>>,
}

fn registered<C: prometheus::core::Collector + Clone + 'static>(
    r: &Registry,
    c: Result<C, prometheus::Error>,
) -> Result<C, prometheus::Error> {
    let c = c?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

/// The counter families fed from running totals, in the order of [`Health`]'s fields below.
fn totals(r: &Registry) -> Result<[Totals; 11], prometheus::Error> {
    let specs = [
        (
            "hopwatch_lost_events_total",
            "Events lost, by where (kernel_ring_buffer, output_queue: before the printer, \
                 collector_queue: before the collector).",
            "source",
        ),
        (
            "hopwatch_queue_dropped_events_total",
            "Events dropped because a queue inside the agent was full, by queue.",
            "queue",
        ),
        (
            "hopwatch_kernel_events_total",
            "Counters kept by hopwatch's kernel programs (summed over CPUs), by event.",
            "event",
        ),
        (
            "hopwatch_parse_failures_total",
            "Inputs the agent could not decode or parse, by stage.",
            "stage",
        ),
        (
            "hopwatch_hop_state_events_total",
            "Hop table events: observations counted in the overflow hop (series limit), \
                 hops evicted as stale, exchanges measured in the kernel whose socket's hop \
                 never became known (exchanges_without_hop), connections forgotten because \
                 their close was lost with a full ring buffer and the kernel no longer had them \
                 (closes_lost).",
            "event",
        ),
        (
            "hopwatch_table_full_total",
            "Connections (conntrack) or L7 sessions (l7_sessions) not tracked because the \
                 agent's table was full; they are still reported at L4.",
            "table",
        ),
        (
            "hopwatch_program_runs_total",
            "Runs of each hopwatch kernel program (with --bpf-stats).",
            "program",
        ),
        (
            "hopwatch_events_read_total",
            "Events the agent read, by source (kernel_ring_buffer: equals the kernel's \
                 events_sent once the agent has caught up).",
            "source",
        ),
        (
            "hopwatch_l7_exchanges_total",
            "Application exchanges by whether and why they were recorded as flows (error, slow, \
                 first, followed, under_rate, sampled; not_recorded: counted in the hops and \
                 metrics only).",
            "reason",
        ),
        (
            "hopwatch_flows_hidden_total",
            "Flows the agent left out of its output and metrics, by why (own_traffic: \
                 connections to the agent's own listeners; --show-own-traffic shows them).",
            "reason",
        ),
        (
            "hopwatch_trace_links_total",
            "L7 exchanges by how request tracing linked them to the exchange they were made for \
                 (thread: the calling thread served exactly that request; header: a propagated \
                 id only that request carried; nginx: an nginx upstream request, to the \
                 downstream request nginx made it for; coroutine: the asyncio task that made the \
                 call answered that request, and the call fell inside it; ambiguous: none could tell (an event loop with \
                 several requests in flight), left unlinked; unfollowed: the request its thread served \
                 was not followed (its connection or exchange not seen), left unlinked; expired: emitted without a trace id because \
                 the parent's trace was not known within the hold; overflow: too many held).",
            "outcome",
        ),
    ];
    let mut out = Vec::with_capacity(specs.len());
    for (name, help, label) in specs {
        out.push(Totals::new(r, name, help, label)?);
    }
    Ok(out.try_into().unwrap_or_else(|_| unreachable!("one per spec")))
}

impl Health {
    pub(crate) fn register(r: &Registry) -> Result<Self, prometheus::Error> {
        let counters = |name: &str, help: &str, labels: &[&str]| {
            registered(r, IntCounterVec::new(Opts::new(name, help), labels))
        };
        let gauge = |name: &str, help: &str| registered(r, IntGauge::new(name, help));
        let per_map = |name: &str, help: &str| {
            registered(r, IntGaugeVec::new(Opts::new(name, help), &["map"]))
        };
        let [
            lost,
            queue_dropped,
            kernel,
            parse_failures,
            hop_overflow,
            tables_full,
            program_runs,
            events_read,
            exchanges,
            hidden,
            trace_links,
        ] = totals(r)?;
        Ok(Self {
            events_read,
            exchanges,
            hidden,
            trace_links,
            lost,
            queue_dropped,
            kernel,
            parse_failures,
            hop_overflow,
            tables_full,
            program_runs,
            flows: counters(
                "hopwatch_flows_total",
                "Flows the agent produced, by type (l3_l4, l7, drop).",
                &["type"],
            )?,
            kernel_drops: counters(
                "hopwatch_kernel_drops_total",
                "Packets the kernel dropped on this node, by drop reason and the kernel function \
                 that dropped them.",
                &["reason", "location"],
            )?,
            kernel_drop_keys: Mutex::new(HashSet::new()),
            flow_children: Default::default(),
            export_lag: registered(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "hopwatch_export_lag_seconds",
                        "Time from the kernel event to the flow reaching the metrics.",
                    )
                    .buckets(LAG_BUCKETS.to_vec()),
                ),
            )?,
            collector_queue: gauge(
                "hopwatch_collector_queue_events",
                "Events waiting for the collector (unacknowledged ones included); at most \
                 --queue-flows.",
            )?,
            ringbuf_size: gauge(
                "hopwatch_ringbuf_size_bytes",
                "Size of the kernel→agent ring buffer.",
            )?,
            ringbuf_used: gauge(
                "hopwatch_ringbuf_used_bytes",
                "Ring buffer bytes written by the kernel and not yet read by the agent.",
            )?,
            ringbuf_peak: gauge(
                "hopwatch_ringbuf_used_peak_bytes",
                "Highest ring buffer fill sampled every 10 ms over the last 10 to 20 seconds.",
            )?,
            map_entries: per_map(
                "hopwatch_map_entries",
                "Entries in hopwatch's kernel maps and userspace tables.",
            )?,
            map_capacity: per_map(
                "hopwatch_map_capacity_entries",
                "Capacity of hopwatch's kernel maps and userspace tables.",
            )?,
            program_run_seconds: registered(
                r,
                CounterVec::new(
                    Opts::new(
                        "hopwatch_program_run_seconds_total",
                        "Time the kernel spent running each hopwatch program (with --bpf-stats).",
                    ),
                    &["program"],
                ),
            )?,
            program_last_ns: Mutex::new(HashMap::new()),
        })
    }

    pub(crate) fn flow(&self, kind: &str, lag: Option<Duration>) {
        let slot = match kind {
            "l3_l4" => Some(0),
            "l7" => Some(1),
            "drop" => Some(2),
            _ => None,
        };
        match slot {
            Some(i) => {
                self.flow_children[i].get_or_init(|| self.flows.with_label_values(&[kind])).inc();
            }
            None => self.flows.with_label_values(&[kind]).inc(),
        }
        if let Some(lag) = lag {
            self.export_lag.observe(lag.as_secs_f64());
        }
    }

    /// One kernel drop (reason and location as the flow names them).
    pub(crate) fn kernel_drop(&self, reason: &str, location: &str) {
        let mut keys =
            self.kernel_drop_keys.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = (reason.to_owned(), location.to_owned());
        let location = if keys.contains(&key) || keys.len() < KERNEL_DROP_SERIES {
            keys.insert(key);
            location
        } else {
            hopwatch_hops::stats::OTHER
        };
        self.kernel_drops.with_label_values(&[reason, location]).inc();
    }

    /// Running totals of the kernel counters (by [`hopwatch_common::Counter::name`]).
    pub(crate) fn kernel_counters(&self, totals: &[(&str, u64)]) {
        for (name, total) in totals {
            self.kernel.set(name, *total);
            if *name == hopwatch_common::Counter::RingbufFull.name() {
                self.lost.set("kernel_ring_buffer", *total);
            }
        }
    }

    /// Running totals of the userspace pipeline: events read from the ring buffer, and losses.
    pub(crate) fn pipeline(&self, read: u64, undecodable: u64, output_dropped: u64) {
        self.events_read.set("kernel_ring_buffer", read);
        self.parse_failures.set("kernel_event", undecodable);
        self.lost.set("output_queue", output_dropped);
        self.queue_dropped.set("output", output_dropped);
    }

    /// Running totals of the recording decisions, by reason.
    pub(crate) fn exchanges(&self, totals: impl Iterator<Item = (&'static str, u64)>) {
        for (reason, total) in totals {
            self.exchanges.set(reason, total);
        }
    }

    /// The collector queue: events it dropped (a running total) and events in it now.
    pub(crate) fn collector_queue(&self, dropped: u64, waiting: u64) {
        self.lost.set("collector_queue", dropped);
        self.queue_dropped.set("collector", dropped);
        self.collector_queue.set(i64::try_from(waiting).unwrap_or(i64::MAX));
    }

    /// Running total of the flows left out for `reason`.
    pub(crate) fn hidden(&self, reason: &str, total: u64) {
        self.hidden.set(reason, total);
    }

    /// Running totals of the pipeline: tables full, connections no parser took (their L7 is
    /// not parsed: a parse failure of the whole connection), and full records of the kernel's
    /// exchange engine whose request did not parse (counted in the hops, not recorded).
    pub(crate) fn tables_full(
        &self,
        conn_table: u64,
        l7_sessions: u64,
        unparsed_connections: u64,
        kernel_exchanges: u64,
    ) {
        self.tables_full.set("conntrack", conn_table);
        self.tables_full.set("l7_sessions", l7_sessions);
        self.parse_failures.set("l7_connection", unparsed_connections);
        self.parse_failures.set("l7_kernel_exchange", kernel_exchanges);
    }

    /// Running total of connections forgotten because their close was lost.
    pub(crate) fn closes_lost(&self, total: u64) {
        self.hop_overflow.set("closes_lost", total);
    }

    /// Running totals of request tracing's links.
    pub(crate) fn trace_links(&self, t: crate::trace::TracerStats) {
        self.trace_links.set("thread", t.linked_thread);
        self.trace_links.set("header", t.linked_header);
        self.trace_links.set("nginx", t.linked_nginx);
        self.trace_links.set("coroutine", t.linked_coroutine);
        self.trace_links.set("ambiguous", t.ambiguous);
        self.trace_links.set("unfollowed", t.unfollowed);
        self.trace_links.set("expired", t.expired);
        self.trace_links.set("overflow", t.overflow);
    }

    /// Running total of TLS handshakes not followed (too many under way at once).
    pub(crate) fn tls_handshakes_full(&self, total: u64) {
        self.tables_full.set("tls_handshakes", total);
    }

    pub(crate) fn hop_state(&self, overflowed: u64, evicted: u64, without_hop: u64) {
        self.hop_overflow.set("overflow", overflowed);
        self.hop_overflow.set("evicted", evicted);
        self.hop_overflow.set("exchanges_without_hop", without_hop);
    }

    pub(crate) fn map(&self, name: &str, entries: u64, capacity: u64) {
        self.map_entries.with_label_values(&[name]).set(i64::try_from(entries).unwrap_or(i64::MAX));
        self.map_capacity
            .with_label_values(&[name])
            .set(i64::try_from(capacity).unwrap_or(i64::MAX));
    }

    pub(crate) fn programs(&self, runs: &[(String, u64, Duration)]) {
        let mut last =
            self.program_last_ns.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (name, count, time) in runs {
            self.program_runs.set(name, *count);
            let ns = u64::try_from(time.as_nanos()).unwrap_or(u64::MAX);
            let prev = last.entry(name.clone()).or_insert(0);
            let grew = if ns >= *prev { ns - *prev } else { ns };
            #[expect(clippy::cast_precision_loss, reason = "seconds as f64")]
            self.program_run_seconds.with_label_values(&[name]).inc_by(grew as f64 / 1e9);
            *prev = ns;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_totals_become_counter_increments() {
        let r = Registry::new();
        let h = Health::register(&r).unwrap();
        h.pipeline(40, 3, 10);
        h.pipeline(60, 5, 10);
        h.kernel_counters(&[("ringbuf_full", 7), ("tcp_state_changes", 100)]);
        h.kernel_counters(&[("ringbuf_full", 9), ("tcp_state_changes", 150)]);
        h.collector_queue(4, 100);
        h.collector_queue(6, 30);
        let text = super::super::encode(&r.gather());
        for line in [
            "hopwatch_parse_failures_total{stage=\"kernel_event\"} 5",
            "hopwatch_lost_events_total{source=\"output_queue\"} 10",
            "hopwatch_lost_events_total{source=\"kernel_ring_buffer\"} 9",
            "hopwatch_kernel_events_total{event=\"tcp_state_changes\"} 150",
            "hopwatch_queue_dropped_events_total{queue=\"output\"} 10",
            "hopwatch_events_read_total{source=\"kernel_ring_buffer\"} 60",
            "hopwatch_lost_events_total{source=\"collector_queue\"} 6",
            "hopwatch_queue_dropped_events_total{queue=\"collector\"} 6",
            "hopwatch_collector_queue_events 30",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from:\n{text}");
        }
    }
}
