//! The hop table as Prometheus metric families, rendered at scrape time from the aggregator (the
//! one source of truth: nothing is counted twice, and a hop evicted from the table is gone from
//! the next scrape).
//!
//! Labels, as Hubble's metrics name them: `source_namespace`, `source_workload`,
//! `destination_namespace`, `destination_workload`, `destination_port` on every hop family
//! (`*_workload` is the best identity known: workload, pod, container, process, DNS name or
//! address); `reporter` (`client` / `server`) on families both ends measure; `protocol` (`http`,
//! `postgres`, ..., or the transport); and one name label on the tallies (`cause`, `reason`,
//! `rcode`, `query`).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use hopwatch_hops::{
    Aggregator, Hop, HopKey, Side, SideStats,
    endpoint::OVERFLOW,
    histogram::{EXPORT_BOUNDS_S, Histogram as LatencyHistogram},
};
use prometheus::{
    core::{Collector, Desc},
    proto::{Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType},
};

const HOP_LABELS: [&str; 5] = [
    "source_namespace",
    "source_workload",
    "destination_namespace",
    "destination_workload",
    "destination_port",
];

/// One family: name, help, type, labels after the hop labels.
struct Spec {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    extra: &'static [&'static str],
}

macro_rules! families {
    ($($id:ident = $name:literal, $kind:ident, [$($l:literal),*], $help:literal;)*) => {
        #[derive(Clone, Copy)]
        #[repr(usize)]
        enum F { $($id),* }
        const SPECS: &[Spec] = &[$(Spec {
            name: $name,
            help: $help,
            kind: MetricType::$kind,
            extra: &[$($l),*],
        }),*];
    };
}

families! {
    Requests = "hopwatch_hop_requests_total", COUNTER, ["protocol", "reporter"],
        "Application exchanges on the hop (answered or not), as the reporting end saw them.";
    Errors = "hopwatch_hop_request_errors_total", COUNTER, ["protocol", "reporter"],
        "Exchanges that failed: error status or reply, or no response.";
    Duration = "hopwatch_hop_request_duration_seconds", HISTOGRAM, ["protocol", "reporter"],
        "Request to response time of answered exchanges, measured at the reporting end's socket.";
    Connect = "hopwatch_hop_connect_duration_seconds", HISTOGRAM, [],
        "TCP handshake time (SYN sent to established), at the client.";
    Opened = "hopwatch_hop_connections_opened_total", COUNTER, ["reporter"],
        "TCP connections opened (client: connects completed; server: accepts).";
    Open = "hopwatch_hop_open_connections", GAUGE, ["reporter"],
        "TCP connections open now.";
    ConnectFailures = "hopwatch_hop_connect_failures_total", COUNTER, ["cause"],
        "TCP connects that failed, by cause (errno name).";
    Retransmits = "hopwatch_hop_retransmits_total", COUNTER, ["reporter"],
        "TCP segments the reporting end retransmitted.";
    Resets = "hopwatch_hop_resets_total", COUNTER, ["reporter"],
        "TCP resets the reporting end sent or received.";
    Sent = "hopwatch_hop_sent_bytes_total", COUNTER, ["reporter"],
        "Payload bytes the reporting end sent (acknowledged by its peer).";
    Received = "hopwatch_hop_received_bytes_total", COUNTER, ["reporter"],
        "Payload bytes the reporting end received.";
    Drops = "hopwatch_hop_drops_total", COUNTER, ["protocol", "reason"],
        "Packets of the hop the kernel dropped, by drop reason.";
    DnsQueries = "hopwatch_dns_queries_total", COUNTER, ["reporter", "rcode"],
        "DNS queries by response code (TIMEOUT: no response).";
    Nxdomain = "hopwatch_dns_nxdomain_responses_total", COUNTER, ["reporter", "query"],
        "NXDOMAIN answers by queried name.";
    TlsHandshake = "hopwatch_hop_tls_handshake_duration_seconds", HISTOGRAM, ["reporter"],
        "TLS handshake time, ClientHello to the client's first encrypted record, at the reporting end.";
    TlsFailures = "hopwatch_hop_tls_handshake_failures_total", COUNTER, ["reporter", "reason"],
        "TLS handshakes that failed, by reason (the alert's description, or a reset or close).";
}

/// Renders the aggregator's hops on every scrape.
pub(crate) struct HopCollector {
    hops: Arc<Mutex<Aggregator>>,
    descs: Vec<Desc>,
}

impl HopCollector {
    pub(crate) fn new(hops: Arc<Mutex<Aggregator>>) -> Result<Self, prometheus::Error> {
        let descs = SPECS
            .iter()
            .map(|s| {
                let labels = HOP_LABELS.iter().chain(s.extra).map(|l| (*l).to_owned()).collect();
                Desc::new(
                    s.name.to_owned(),
                    s.help.to_owned(),
                    labels,
                    std::collections::HashMap::default(),
                )
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { hops, descs })
    }
}

impl Collector for HopCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut agg = self.hops.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        agg.sweep(super::wall_now_ns());
        render(&agg)
    }
}

fn pair(name: &str, value: &str) -> LabelPair {
    let mut p = LabelPair::default();
    p.set_name(name.to_owned());
    p.set_value(value.to_owned());
    p
}

fn hop_labels(key: &HopKey) -> Vec<LabelPair> {
    let values = [
        key.source.namespace.as_ref(),
        key.source.name.as_ref(),
        key.destination.namespace.as_ref(),
        key.destination.name.as_ref(),
        &key.port.to_string(),
    ];
    HOP_LABELS.iter().zip(values).map(|(n, v)| pair(n, v)).collect()
}

fn overflow_labels() -> Vec<LabelPair> {
    HOP_LABELS.iter().map(|n| pair(n, OVERFLOW)).collect()
}

struct Out {
    families: Vec<Vec<Metric>>,
}

impl Out {
    fn push(&mut self, f: F, base: &[LabelPair], extra: &[(&str, &str)], mut m: Metric) {
        let mut labels = base.to_vec();
        labels.extend(extra.iter().map(|(n, v)| pair(n, v)));
        m.set_label(labels);
        self.families[f as usize].push(m);
    }

    #[expect(clippy::cast_precision_loss, reason = "Prometheus samples are f64")]
    fn counter(&mut self, f: F, base: &[LabelPair], extra: &[(&str, &str)], v: u64) {
        let mut c = Counter::default();
        c.set_value(v as f64);
        let mut m = Metric::default();
        m.set_counter(c);
        self.push(f, base, extra, m);
    }

    fn gauge(&mut self, f: F, base: &[LabelPair], extra: &[(&str, &str)], v: f64) {
        let mut g = Gauge::default();
        g.set_value(v);
        self.push(f, base, extra, Metric::from_gauge(g));
    }

    #[expect(clippy::cast_precision_loss, reason = "Prometheus samples are f64")]
    fn histogram(
        &mut self,
        f: F,
        base: &[LabelPair],
        extra: &[(&str, &str)],
        h: &LatencyHistogram,
    ) {
        let mut ph = Histogram::default();
        ph.set_sample_count(h.count());
        ph.set_sample_sum(h.sum_ns() as f64 / 1e9);
        ph.set_bucket(
            EXPORT_BOUNDS_S
                .iter()
                .zip(h.export_cumulative())
                .map(|(le, n)| {
                    let mut b = Bucket::default();
                    b.set_upper_bound(*le);
                    b.set_cumulative_count(n);
                    b
                })
                .collect(),
        );
        let mut m = Metric::default();
        m.set_histogram(ph);
        self.push(f, base, extra, m);
    }

    fn side(&mut self, base: &[LabelPair], side: Side, s: &SideStats, transport: &str, open: u32) {
        let r = side.as_str();
        if s.requests > 0 {
            let protocol = s.protocol.as_deref().unwrap_or(transport);
            let l = [("protocol", protocol), ("reporter", r)];
            self.counter(F::Requests, base, &l, s.requests);
            // Zero errors is a sample too: error-ratio queries then have data.
            self.counter(F::Errors, base, &l, s.errors);
            if !s.latency.is_empty() {
                self.histogram(F::Duration, base, &l, &s.latency);
            }
        }
        if !s.connect.is_empty() {
            self.histogram(F::Connect, base, &[], &s.connect);
        }
        for (cause, n) in s.connect_failures.iter() {
            self.counter(F::ConnectFailures, base, &[("cause", cause)], n);
        }
        let tcp = s.opened > 0 || s.bytes_sent + s.bytes_received + s.retransmits + s.resets > 0;
        if tcp {
            let l = [("reporter", r)];
            // Zero when all closed: the gauge then drops to 0 instead of vanishing.
            self.gauge(F::Open, base, &l, open.into());
            self.counter(F::Opened, base, &l, s.opened);
            self.counter(F::Retransmits, base, &l, s.retransmits);
            self.counter(F::Resets, base, &l, s.resets);
            self.counter(F::Sent, base, &l, s.bytes_sent);
            self.counter(F::Received, base, &l, s.bytes_received);
        }
        for (rcode, n) in s.dns_rcodes.iter() {
            self.counter(F::DnsQueries, base, &[("reporter", r), ("rcode", rcode)], n);
        }
        for (query, n) in s.nxdomain.iter() {
            self.counter(F::Nxdomain, base, &[("reporter", r), ("query", query)], n);
        }
        if !s.tls_handshake.is_empty() {
            self.histogram(F::TlsHandshake, base, &[("reporter", r)], &s.tls_handshake);
        }
        for (reason, n) in s.tls_failures.iter() {
            self.counter(F::TlsFailures, base, &[("reporter", r), ("reason", reason)], n);
        }
    }

    fn hop(&mut self, base: &[LabelPair], hop: &Hop, transport: &str, open: [u32; 2]) {
        for side in Side::BOTH {
            if let Some(s) = hop.side(side) {
                self.side(base, side, s, transport, open[side as usize]);
            }
        }
        for (reason, n) in hop.drops.iter() {
            self.counter(F::Drops, base, &[("protocol", transport), ("reason", reason)], n);
        }
    }
}

/// Every hop family, from the aggregator's current state.
#[must_use]
pub(crate) fn render(agg: &Aggregator) -> Vec<MetricFamily> {
    let mut out = Out { families: vec![Vec::new(); SPECS.len()] };
    let table = agg.table();
    // Open connections live in the ledger; those of a hop side that did not fit count in the
    // overflow hop.
    let mut open: HashMap<&HopKey, [u32; 2]> = HashMap::new();
    let mut overflow_open = [0u32; 2];
    for (key, side, n) in agg.context().ledger.open_connections() {
        match table.get(key).and_then(|h| h.side(side)) {
            Some(_) => open.entry(key).or_default()[side as usize] += n,
            None => overflow_open[side as usize] += n,
        }
    }
    for (key, hop) in table.iter() {
        let o = open.get(key).copied().unwrap_or_default();
        out.hop(&hop_labels(key), hop, key.transport.as_str(), o);
    }
    let overflow = overflow_labels();
    if *table.overflow() != Hop::default() {
        out.hop(&overflow, table.overflow(), OVERFLOW, overflow_open);
    }
    SPECS
        .iter()
        .zip(out.families)
        .filter(|(_, metrics)| !metrics.is_empty())
        .map(|(spec, metrics)| {
            let mut mf = MetricFamily::default();
            mf.set_name(spec.name.to_owned());
            mf.set_help(spec.help.to_owned());
            mf.set_field_type(spec.kind);
            mf.set_metric(metrics);
            mf
        })
        .collect()
}
