//! Prometheus metrics and the health probes, served on `--metrics-addr` (default
//! `0.0.0.0:9965`): `/metrics` (text exposition), `/healthz` (liveness: the event reader is
//! running), `/readyz` (readiness: the kernel programs are attached).
//!
//! Hop families are rendered from the [`Aggregator`] at scrape time ([`hop_families`]); the
//! agent's own health is kept in ordinary `prometheus` collectors ([`health`]) plus the process
//! collector (CPU, memory, file descriptors). Every series carries a `node` label.
//!
//! The agent feeds it through [`Telemetry`], a cheap handle: one call per flow
//! ([`Telemetry::observe`]), one per second for the counters ([`Telemetry::tick`]), one per
//! reader loop ([`Telemetry::heartbeat`]). With `--metrics-addr off` every call is a no-op.

pub(crate) mod bpf;
pub(crate) mod capability;
pub(crate) mod health;
pub(crate) mod hop_families;
mod server;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use aya::maps::{MapData, PerCpuArray, RingBuf};
use hopwatch_common::Counter;
use hopwatch_hops::{Aggregator, HopConfig, ledger};
use hopwatch_proto::flow::{Flow, FlowType, Verdict};
use prometheus::{Encoder as _, IntGaugeVec, Opts, Registry, TextEncoder, proto::MetricFamily};

use self::{
    bpf::RingbufGauge,
    capability::{Capability, CapabilityGauge},
    health::Health,
    hop_families::HopCollector,
};
use crate::{flow::Clock, pipeline::PipelineCounters};

/// How often the kernel maps' entries are counted (a walk of up to their capacity in keys).
const MAP_COUNT_INTERVAL: Duration = Duration::from_secs(30);
/// How often the ring buffer's fill level is sampled for the peak gauge.
const RINGBUF_SAMPLE_INTERVAL: Duration = Duration::from_millis(10);
/// The peak gauge covers this much time (and up to twice as much).
const RINGBUF_PEAK_WINDOW: Duration = Duration::from_secs(10);
/// `/healthz` fails when the event reader has not looped for this long.
const READER_STALL: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, clap::Args)]
pub struct MetricsArgs {
    /// Address for Prometheus metrics (`/metrics`) and the Kubernetes probes (`/healthz`,
    /// `/readyz`); `off` turns the server off.
    #[arg(long, default_value = "0.0.0.0:9965", value_parser = parse_metrics_addr, value_name = "ADDR|off")]
    pub metrics_addr: MetricsAddr,
    /// Series per metric family at most; what does not fit is counted in an `_overflow_` series.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..))]
    pub metrics_series_limit: u32,
    /// Hops without traffic for this long leave the metrics (their series are removed).
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub metrics_stale_after: Duration,
}

/// `--metrics-addr`: an address, or none (`off`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsAddr(pub Option<SocketAddr>);

fn parse_metrics_addr(s: &str) -> Result<MetricsAddr, String> {
    match s {
        "off" | "none" | "" => Ok(MetricsAddr(None)),
        _ => s
            .parse()
            .map(|a| MetricsAddr(Some(a)))
            .map_err(|e| format!("{e}: expected IP:PORT (e.g. 0.0.0.0:9965 or [::]:9965) or off")),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(
        "cannot listen on --metrics-addr {addr}: {source} (pick a free address, or \
         `--metrics-addr off`)"
    )]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up metric families: {0}")]
    Register(#[from] prometheus::Error),
}

/// The metrics and probes of a running agent; cloning shares them. `Default` is switched off.
#[derive(Clone, Default)]
pub struct Telemetry {
    inner: Option<Arc<Inner>>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").field("enabled", &self.inner.is_some()).finish()
    }
}

struct Inner {
    registry: Registry,
    hops: Arc<Mutex<Aggregator>>,
    health: Health,
    capabilities: CapabilityGauge,
    series_limit: usize,
    ready: AtomicBool,
    /// Monotonic ns of the event reader's last loop.
    heartbeat_ns: AtomicU64,
    ringbuf: OnceLock<RingbufGauge>,
    programs: OnceLock<Vec<(String, u32)>>,
    /// Where `/metrics` is served; `None` when it is not (replay).
    local_addr: Option<SocketAddr>,
    /// The pipeline's running totals: connection table full, L7 sessions full, connections no
    /// parser took.
    pipeline: [AtomicU64; 14],
}

pub(crate) use hopwatch_proto::clock::wall_now_ns;

/// The registry's text exposition.
#[must_use]
pub(crate) fn encode(families: &[MetricFamily]) -> String {
    let mut buf = Vec::with_capacity(64 * 1024);
    // Encoding into a Vec only fails on malformed families, which we never build.
    if let Err(e) = TextEncoder::new().encode(families, &mut buf) {
        tracing::error!(error = %e, "cannot encode metrics");
    }
    String::from_utf8(buf).unwrap_or_default()
}

/// A registry whose series all carry `node`.
pub(crate) fn registry(node: &str) -> Registry {
    let labels = HashMap::from([("node".to_owned(), node.to_owned())]);
    Registry::new_custom(None, Some(labels)).expect("`node` is a valid label name")
}

impl Telemetry {
    /// The agent's metrics: served on `args.metrics_addr` (off: a no-op handle), with the kernel
    /// side's fill levels watched. Ready (`/readyz`) once the event reader runs.
    pub async fn start(
        args: &MetricsArgs,
        node: &str,
        ebpf: &aya::Ebpf,
        events: &RingBuf<MapData>,
    ) -> Result<Self, MetricsError> {
        let t = Self::serve(args, node).await?;
        t.watch_kernel(ebpf, events);
        Ok(t)
    }

    /// Sets up the metrics and starts serving them on `args.metrics_addr` (off: a no-op handle);
    /// nothing of the kernel side is watched.
    pub async fn serve(args: &MetricsArgs, node: &str) -> Result<Self, MetricsError> {
        let MetricsAddr(Some(addr)) = args.metrics_addr else { return Ok(Self::default()) };
        let cfg = HopConfig {
            series_limit: args.metrics_series_limit as usize,
            stale_after: args.metrics_stale_after,
            ..HopConfig::default()
        };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| MetricsError::Bind { addr, source })?;
        let local = listener.local_addr().map_err(|source| MetricsError::Bind { addr, source })?;
        let inner = Arc::new(Inner::new(cfg, node, Some(local))?);
        tokio::spawn(server::serve(listener, Self { inner: Some(inner.clone()) }));
        eprintln!("hopwatch agent: metrics on http://{local}/metrics, probes /healthz /readyz");
        Ok(Self { inner: Some(inner) })
    }

    /// The metrics, kept as the agent keeps them but served nowhere: `hopwatch replay` feeds
    /// them to measure the per-flow cost of the hop aggregation.
    pub fn unserved(cfg: HopConfig, node: &str) -> Result<Self, MetricsError> {
        Ok(Self { inner: Some(Arc::new(Inner::new(cfg, node, None)?)) })
    }

    /// Hops (series) kept, flows counted and flows ignored by the hop aggregation; `None` when
    /// switched off.
    #[must_use]
    pub fn hop_totals(&self) -> Option<(usize, u64, u64)> {
        let i = self.inner.as_ref()?;
        let agg = i.hops.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Some((agg.table().len(), agg.counted, agg.ignored))
    }

    /// Where the server listens (the port chosen, for `--metrics-addr 127.0.0.1:0`).
    #[must_use]
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.inner.as_ref().and_then(|i| i.local_addr)
    }

    /// Counts one flow the agent produced.
    pub fn observe(&self, flow: &Flow) {
        let Some(i) = &self.inner else { return };
        let now = wall_now_ns();
        let kind = match (flow.verdict(), flow.r#type()) {
            (Verdict::Dropped, _) => "drop",
            (_, FlowType::L7) => "l7",
            _ => "l3_l4",
        };
        if kind == "drop" {
            i.health.kernel_drop(&flow.kernel_drop_reason, &flow.kernel_drop_location);
        }
        let at = hopwatch_hops::aggregate::flow_time_ns(flow, now);
        i.health
            .flow(kind, flow.time.is_some().then(|| Duration::from_nanos(now.saturating_sub(at))));
        i.hops.lock().unwrap_or_else(std::sync::PoisonError::into_inner).observe(flow, now);
    }

    /// Counts exchanges the kernel measured that are not recorded as flows, in their hops.
    pub(crate) fn count_exchanges(
        &self,
        exchanges: impl ExactSizeIterator<Item = crate::l7::CountedExchange>,
    ) {
        let Some(i) = &self.inner else { return };
        if exchanges.len() == 0 {
            return;
        }
        let now = wall_now_ns();
        let mut hops = i.hops.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for x in exchanges {
            hops.observe_exchange(x.cookie, x.latency_ns, x.failed, now);
        }
    }

    /// The hops' open sockets of `node` quiet for a second that `alive` says are gone (their
    /// close was lost) are no longer open; returns how many.
    pub(crate) fn forget_gone_sockets(&self, node: &str, alive: impl Fn(u64) -> bool) -> usize {
        let Some(i) = &self.inner else { return 0 };
        let before = wall_now_ns().saturating_sub(1_000_000_000);
        let mut hops = i.hops.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        hops.forget_gone_sockets(node, before, alive)
    }

    /// The event reader is alive (called on every loop, with the pipeline's running totals).
    /// Its first loop also makes the agent ready: the programs are attached and their events
    /// are being read.
    pub fn heartbeat(&self, counters: PipelineCounters) {
        if let Some(i) = &self.inner {
            i.heartbeat_ns.store(Clock::monotonic_now_ns(), Ordering::Relaxed);
            i.ready.store(true, Ordering::Relaxed);
            let PipelineCounters {
                conn_table_overflow,
                conn_closes_lost,
                l7_unparsed_connections,
                l7_sessions_overflow,
                l7_fast_unparsed,
                tls_handshakes_overflow,
                trace,
            } = counters;
            for (slot, v) in i.pipeline.iter().zip([
                conn_table_overflow,
                conn_closes_lost,
                l7_sessions_overflow,
                l7_unparsed_connections,
                l7_fast_unparsed,
                tls_handshakes_overflow,
                trace.linked_thread,
                trace.linked_header,
                trace.linked_nginx,
                trace.linked_coroutine,
                trace.ambiguous,
                trace.unfollowed,
                trace.expired,
                trace.overflow,
            ]) {
                slot.store(v, Ordering::Relaxed);
            }
        }
    }

    /// What the agent runs with, and what it runs without (and why).
    pub(crate) fn capabilities(&self, caps: &[Capability]) {
        if let Some(i) = &self.inner {
            i.capabilities.set(caps);
        }
    }

    /// The kernel programs are attached and the pipeline runs.
    pub fn set_ready(&self) {
        if let Some(i) = &self.inner {
            i.ready.store(true, Ordering::Relaxed);
        }
    }

    /// Once a second: the kernel counters and the pipeline's running totals (events read from
    /// the ring buffer, undecodable ones, flows the output queue dropped).
    pub fn tick(
        &self,
        counters: &PerCpuArray<MapData, u64>,
        read: u64,
        undecodable: u64,
        output_dropped: u64,
    ) {
        let Some(i) = &self.inner else { return };
        let totals: Vec<(&str, u64)> = Counter::ALL
            .iter()
            .filter_map(|c| Some((c.name(), counters.get(&(*c as u32), 0).ok()?.iter().sum())))
            .collect();
        i.health.kernel_counters(&totals);
        i.health.pipeline(read, undecodable, output_dropped);
    }

    /// Running totals of the recording decisions (see `policy`), by reason.
    pub fn exchanges(&self, totals: impl Iterator<Item = (&'static str, u64)>) {
        if let Some(i) = &self.inner {
            i.health.exchanges(totals);
        }
    }

    /// Once a second: the running total of flows left out of the output for `reason`.
    pub fn flows_hidden(&self, reason: &str, total: u64) {
        if let Some(i) = &self.inner {
            i.health.hidden(reason, total);
        }
    }

    /// Once a second: the collector queue's drops (a running total) and fill level.
    pub fn collector_queue(&self, dropped: u64, waiting: u64) {
        if let Some(i) = &self.inner {
            i.health.collector_queue(dropped, waiting);
        }
    }

    /// Starts watching the kernel side's fill levels: the events ring buffer, the hash maps and
    /// the programs' run counters.
    pub fn watch_kernel(&self, ebpf: &aya::Ebpf, events: &RingBuf<MapData>) {
        use std::os::fd::AsFd as _;
        let Some(i) = &self.inner else { return };
        let gauge = events
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| e.to_string())
            .and_then(|fd| MapData::from_fd(fd).map_err(|e| e.to_string()))
            .and_then(|md| md.info().map_err(|e| e.to_string()))
            .and_then(|info| {
                RingbufGauge::new(events.as_fd(), info.max_entries().into())
                    .map_err(|e| e.to_string())
            });
        match gauge {
            Ok(g) => {
                i.health.ringbuf_size.set(i64::try_from(g.size).unwrap_or(i64::MAX));
                let _ = i.ringbuf.set(g);
                tokio::spawn(sample_ringbuf(i.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot map the ring buffer: no fill-level metrics");
            }
        }
        let _ = i.programs.set(bpf::program_ids(ebpf));
        tokio::spawn(count_maps(i.clone(), bpf::hash_maps(ebpf)));
    }

    /// The exposition text, as `/metrics` serves it.
    #[must_use]
    pub fn scrape(&self) -> String {
        let Some(i) = &self.inner else { return String::new() };
        {
            let agg = i.hops.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let (hops, sockets) = (agg.table().len() as u64, agg.context().ledger.len() as u64);
            // A hop is created with its first side series or, for drop-only hops, its first
            // drop series: each family's budget is the series limit, so twice that bounds it.
            i.health.map("hop_table", hops, 2 * i.series_limit as u64);
            i.health.map("hop_sockets", sockets, ledger::MAX_SOCKETS as u64);
            let without_hop = agg.context().exchanges_without_hop;
            i.health.hop_state(agg.table().overflowed, agg.evicted, without_hop);
        }
        if let Some(ids) = i.programs.get() {
            // The kernel counts runs only while BPF statistics are on (--bpf-stats): without
            // them every count is zero, which would read as "never ran".
            let runs: Vec<_> =
                bpf::program_runs(ids).into_iter().filter(|(_, n, _)| *n > 0).collect();
            i.health.programs(&runs);
        }
        let [
            conn_table,
            closes_lost,
            l7_sessions,
            unparsed,
            fast_unparsed,
            tls_handshakes,
            linked_thread,
            linked_header,
            linked_nginx,
            linked_coroutine,
            ambiguous,
            unfollowed,
            expired,
            overflow,
        ] = i.pipeline.each_ref().map(|a| a.load(Ordering::Relaxed));
        i.health.tables_full(conn_table, l7_sessions, unparsed, fast_unparsed);
        i.health.tls_handshakes_full(tls_handshakes);
        i.health.closes_lost(closes_lost);
        i.health.trace_links(crate::trace::TracerStats {
            linked_thread,
            linked_header,
            linked_nginx,
            linked_coroutine,
            ambiguous,
            unfollowed,
            expired,
            overflow,
        });
        if let Some(g) = i.ringbuf.get() {
            i.health.ringbuf_used.set(i64::try_from(g.used_bytes()).unwrap_or(i64::MAX));
        }
        encode(&i.registry.gather())
    }

    /// `/readyz`: Ok when the kernel programs are attached.
    fn ready(&self) -> Result<(), String> {
        match &self.inner {
            Some(i) if i.ready.load(Ordering::Relaxed) => Ok(()),
            _ => Err("loading: kernel programs not attached yet".to_owned()),
        }
    }

    /// `/healthz`: Ok unless the event reader stopped looping.
    fn healthy(&self) -> Result<(), String> {
        let Some(i) = &self.inner else { return Ok(()) };
        if !i.ready.load(Ordering::Relaxed) {
            return Ok(());
        }
        let idle = Clock::monotonic_now_ns().saturating_sub(i.heartbeat_ns.load(Ordering::Relaxed));
        if idle > u64::try_from(READER_STALL.as_nanos()).unwrap_or(u64::MAX) {
            return Err(format!("the event reader has not run for {} s", idle / 1_000_000_000));
        }
        Ok(())
    }
}

impl Inner {
    fn new(
        cfg: HopConfig,
        node: &str,
        local_addr: Option<SocketAddr>,
    ) -> Result<Self, MetricsError> {
        let registry = registry(node);
        let hops = Arc::new(Mutex::new(Aggregator::new(cfg)));
        registry.register(Box::new(HopCollector::new(hops.clone())?))?;
        let health = Health::register(&registry)?;
        let capabilities = CapabilityGauge::register(&registry)?;
        registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
        let info = IntGaugeVec::new(
            Opts::new("hopwatch_agent_info", "The agent's version (value 1)."),
            &["version"],
        )?;
        info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        registry.register(Box::new(info))?;
        Ok(Self {
            registry,
            hops,
            health,
            capabilities,
            series_limit: cfg.series_limit,
            ready: AtomicBool::new(false),
            heartbeat_ns: AtomicU64::new(Clock::monotonic_now_ns()),
            ringbuf: OnceLock::new(),
            programs: OnceLock::new(),
            local_addr,
            pipeline: Default::default(),
        })
    }
}

async fn sample_ringbuf(i: Arc<Inner>) {
    let Some(g) = i.ringbuf.get() else { return };
    let mut tick = tokio::time::interval(RINGBUF_SAMPLE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let per_window = (RINGBUF_PEAK_WINDOW.as_millis() / RINGBUF_SAMPLE_INTERVAL.as_millis()).max(1);
    let (mut n, mut window_max, mut previous_max) = (0u128, 0u64, 0u64);
    loop {
        tick.tick().await;
        let used = g.used_bytes();
        window_max = window_max.max(used);
        i.health.ringbuf_peak.set(i64::try_from(window_max.max(previous_max)).unwrap_or(i64::MAX));
        n += 1;
        if n % per_window == 0 {
            previous_max = window_max;
            window_max = 0;
        }
    }
}

async fn count_maps(i: Arc<Inner>, maps: Vec<bpf::KernelMap>) {
    let maps = Arc::new(maps);
    let mut tick = tokio::time::interval(MAP_COUNT_INTERVAL);
    loop {
        tick.tick().await;
        let (i, maps) = (i.clone(), maps.clone());
        let counted = tokio::task::spawn_blocking(move || {
            for m in maps.iter() {
                match m.count() {
                    Ok(n) => i.health.map(&m.name, n, m.capacity),
                    Err(e) => {
                        tracing::debug!(map = %m.name, error = %e, "cannot count map entries");
                    }
                }
            }
        })
        .await;
        if counted.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests;
