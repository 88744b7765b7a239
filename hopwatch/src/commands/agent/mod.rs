//! `hopwatch agent`: probe, load, then run the pipeline
//! kernel ring buffer → decode → connection table → flows → output, until SIGINT/SIGTERM.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use aya::maps::{MapData, PerCpuArray, RingBuf};
use hopwatch_common::{Counter, KernelSettings, TRACE_COROUTINES, TRACE_THREADS};
use hopwatch_proto::{
    observer::{GetFlowsResponse, get_flows_response::ResponseTypes},
    signal::shutdown_signal,
};
use hopwatch_protocols::Redaction;
use tokio::{io::unix::AsyncFd, sync::mpsc};
use tokio_util::sync::CancellationToken;

mod args;
mod gone;

pub(super) use self::args::AgentArgs;
use crate::{
    drops::{DEFAULT_IGNORED, symbols::KernelSymbols},
    events::decode,
    flow::{Clock, FlowBuilder},
    loader::{self, LoadOptions, probe::Probe},
    loss::{Loss, Losses},
    metrics::Telemetry,
    own::OwnListeners,
    pipeline::{FastPath, Pipeline, PipelineOptions},
    policy::RecordPolicy,
    print::{Format, Options, Printer},
    sink::Outlet,
};

/// Flows waiting for the printer; beyond this the newest are dropped and counted. A queued flow
/// costs about 3 KiB: a full queue of 16 384 added 40 to 60 MiB to the agent under a flood
/// (the e2e floods with `-o json`); 4096 is still tens of milliseconds of a printer's work.
const OUTPUT_QUEUE: usize = 4096;
/// Longest a kernel event waits in the ring buffer before the agent reads it.
const DRAIN_INTERVAL: Duration = Duration::from_millis(20);
/// Records read between two rounds of the pipeline's periodic work.
const DRAIN_BATCH: usize = 4096;
/// Records read at most after the shutdown signal: an 8 MiB buffer holds about 45 000.
const FINAL_DRAIN_MAX: usize = 1 << 17;
/// How often the agent hands memory freed after a burst (a connection flood) back to the system.
const RELEASE_EVERY_SECONDS: u64 = 10;
/// How often running processes are scanned for files (libssl, nginx) not yet probed.
const UPROBE_RESCAN: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub(super) enum AgentError {
    #[error("{check}: {detail}")]
    Requirement { check: &'static str, detail: String },
    #[error(transparent)]
    Load(#[from] loader::LoadError),
    #[error("cannot watch the events ring buffer: {0}")]
    RingBuf(#[source] std::io::Error),
    #[error("cannot install SIGINT/SIGTERM handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error(transparent)]
    Record(crate::recording::RecordingError),
    #[error("cannot enable BPF run-time statistics: {0}")]
    BpfStats(#[source] aya::sys::SyscallError),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    #[error(transparent)]
    Sink(#[from] crate::sink::SinkError),
    #[error(transparent)]
    Ui(#[from] super::ui::UiError),
    #[error(transparent)]
    Otlp(#[from] crate::otlp::OtlpError),
    #[error(
        "--otlp-endpoint exports from the in-process collector; with --collector, give it to \
         that collector instead"
    )]
    OtlpWithoutCollector,
}

/// Counters of what the userspace pipeline read and could not keep.
#[derive(Debug, Default)]
struct PipelineStats {
    /// Records read from the ring buffer (decodable or not).
    read: AtomicU64,
    decode_errors: AtomicU64,
    losses: Losses,
    flows: AtomicU64,
    /// Exchanges counted but not recorded as flows (the record policy's running total).
    not_recorded: AtomicU64,
    /// Prometheus metrics and probes (a no-op with `--metrics-addr off`).
    metrics: Telemetry,
    /// The agent's own listeners, whose connections are left out (counted there); `None` with
    /// `--show-own-traffic`.
    own: Option<OwnListeners>,
}

pub(super) async fn run(args: AgentArgs) -> Result<(), AgentError> {
    // Installed first, so a SIGINT/SIGTERM at any point after start-up is a clean shutdown.
    let shutdown = shutdown_signal().map_err(AgentError::Signals)?;
    let probe = Probe::run(!args.probe);
    if args.probe {
        print!("{probe}");
        return match probe.first_missing() {
            Some(c) => Err(AgentError::Requirement { check: c.name, detail: c.detail.clone() }),
            None => Ok(()),
        };
    }
    eprint!("{probe}");
    if let Some(c) = probe.first_missing() {
        return Err(AgentError::Requirement { check: c.name, detail: c.detail.clone() });
    }

    // Before loading: a bad endpoints file or kubeconfig is refused before anything attaches.
    let identity = crate::identity::Identity::start(
        &args.identity,
        &args.node_name.clone().unwrap_or_else(hostname),
    )
    .await?;
    let loaded = load(&args, &probe)?;

    let node_name = args.node_name.clone().unwrap_or_else(hostname);
    let builder = FlowBuilder {
        node_name: node_name.clone(),
        clock: Clock::now(),
        reasons: loaded.reasons.clone(),
        symbols: kernel_symbols(),
    };

    let stats_guard = if args.bpf_stats {
        Some(aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(AgentError::BpfStats)?)
    } else {
        None
    };
    let loader::Loaded { mut ebpf, events, counters, uprobes, capabilities, l7_hook, .. } = loaded;
    let caps = report_capabilities(capabilities, &identity);
    // The syscall path's socket is no pointer the kernel handed over: no socket storage for the
    // kernel's exchange state there, so only TLS connections (measured by the TLS probes) are
    // promoted on it.
    let exchange_maps = (!args.no_kernel_exchanges && l7_hook.is_some())
        .then(|| loader::exchange::ExchangeMaps::take(&mut ebpf))
        .flatten();
    let fast_path = match exchange_maps {
        Some(_) => FastPath { clear: l7_hook == Some(loader::L7Hook::Socket), tls: true },
        None => FastPath::OFF,
    };
    let gone = loader::conns::KernelConns::open(&ebpf).map(gone::GoneCheck::new);
    let metrics = Telemetry::start(&args.metrics, &node_name, &ebpf, &events).await?;
    metrics.capabilities(&caps);
    let sink = crate::sink::start(&args.sink, &node_name).await?;
    let cancel = CancellationToken::new();
    let (own, _ui) = start_ui(&args, &metrics, &sink, &cancel).await?;
    let stats = Arc::new(PipelineStats { metrics, own, ..PipelineStats::default() });
    let ebpf = Arc::new(std::sync::Mutex::new(ebpf));
    let (tx, rx) = crate::sink::channel(OUTPUT_QUEUE, &sink, args.output != Format::None);
    let printer = rx.map(|rx| {
        let cancel = cancel.clone();
        tokio::task::spawn_blocking(move || print_loop(rx, args.output, &cancel))
    });
    let pipeline =
        Pipeline::new(builder, pipeline_options(&args, fast_path)).with_identity(identity);
    let recorder = match &args.record {
        Some(path) => Some(crate::recording::Recorder::create(path).map_err(AgentError::Record)?),
        None => None,
    };
    let reader = tokio::spawn(read_loop(
        events,
        Stages {
            pipeline,
            policy: RecordPolicy::new(&args.l7_flows),
            exchange: exchange_maps,
            recorder,
            gone,
        },
        tx.clone(),
        stats.clone(),
        cancel.clone(),
    ));
    // The watcher outlives the reader: its last report covers what the final drain dropped.
    let reader_done = CancellationToken::new();
    let watcher =
        tokio::spawn(watch_counters(counters, node_name, tx, stats.clone(), reader_done.clone()));
    let rescan_task =
        (!uprobes.is_empty()).then(|| tokio::spawn(rescan_uprobes(uprobes, ebpf.clone())));

    tokio::select! {
        () = shutdown => eprintln!("hopwatch agent: shutting down"),
        () = cancel.cancelled() => {}
    }
    // Programs detached (all are BPF links the object owns) before the final drain: nothing is
    // written after it, so every event put in the ring buffer is read and the rest was counted
    // lost. The ring buffer and the counters were taken out of the object and stay.
    detach(ebpf, rescan_task, stats_guard.is_some()).await;
    cancel.cancel();
    let reader_result = reader.await;
    reader_done.cancel();
    let kernel = watcher.await.unwrap_or_default();
    if let Some(printer) = printer {
        let _ = printer.await;
    }
    sink.close().await;
    stats.print_summary(kernel);
    match reader_result {
        Ok(result) => result,
        Err(e) => {
            tracing::error!(error = %e, "event reader task failed");
            Ok(())
        }
    }
}

/// The kernel's symbols, to name drop locations (addresses without them).
fn kernel_symbols() -> Option<KernelSymbols> {
    KernelSymbols::load(KernelSymbols::KALLSYMS)
        .inspect_err(|e| tracing::warn!(error = %e, "drop locations will be shown as addresses"))
        .ok()
}

/// Stops the uprobe rescans (which share the object) and detaches every program by dropping the
/// object, after printing the programs' run statistics when they were kept.
async fn detach(
    ebpf: Arc<std::sync::Mutex<aya::Ebpf>>,
    rescan_task: Option<tokio::task::JoinHandle<()>>,
    bpf_stats: bool,
) {
    if let Some(t) = rescan_task {
        t.abort();
        let _ = t.await;
    }
    if bpf_stats {
        print_program_stats(&ebpf.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    }
    drop(ebpf);
}

/// Loads and attaches the kernel side as the flags ask, and reports what was attached.
fn load(args: &AgentArgs, probe: &Probe) -> Result<loader::Loaded, AgentError> {
    let (drop_ignore, strict) = match &args.drop_ignore {
        Some(list) => (list.clone(), true),
        None => (DEFAULT_IGNORED.iter().map(|s| (*s).to_owned()).collect(), false),
    };
    let settings = KernelSettings {
        update_interval_ns: u64::try_from(args.update_interval.as_nanos()).unwrap_or(u64::MAX),
        drops_per_sec_per_cpu: args.drops_per_sec,
        self_tgid: std::process::id(),
        capture_bytes: args.capture_bytes,
        exchange_rate_per_cpu: args.l7_flows.per_cpu_rate(),
        exchange_slow_ns: u64::try_from(args.l7_flows.slow.as_nanos()).unwrap_or(u64::MAX),
        exchange_sample: args.l7_flows.sample,
        trace_threads: match (args.no_request_tracing, args.no_python_uprobe) {
            (true, _) => 0,
            (false, true) => TRACE_THREADS,
            (false, false) => TRACE_THREADS | TRACE_COROUTINES,
        },
    };
    let loaded = loader::load(&LoadOptions {
        settings,
        drop_ignore: drop_ignore.clone(),
        drop_ignore_strict: strict,
        drops: !args.no_drops,
        cgroup2: probe.cgroup2.clone(),
        ringbuf_bytes: args.ringbuf_bytes,
        uprobes: loader::UprobeSets {
            tls: !args.no_tls,
            idle_tls: args.idle_tls_uprobes,
            tls_probes: args.tls_probes,
            nginx: !args.no_request_tracing && !args.no_nginx_uprobe,
            python: !args.no_request_tracing && !args.no_python_uprobe,
        },
        drop_hook: args.drop_hook,
        l7_hook: args.l7_hook,
        kernel_exchanges: !args.no_kernel_exchanges,
    })?;
    eprintln!("hopwatch agent: hooks {}", loaded.hooks.join(", "));
    // Parsing the kernel's BTF (here and in aya) leaves tens of MiB freed but still held.
    crate::memory::release_freed();
    if !args.no_drops && !loaded.reasons.is_reasonless() {
        eprintln!(
            "hopwatch agent: {} kernel drop reasons; not reported: {}",
            loaded.reasons.count(),
            drop_ignore.join(",")
        );
    }
    Ok(loaded)
}

/// One line per capability on stderr: what the agent runs with and through which hook, and
/// what it runs without and why.
fn report_capabilities(
    mut caps: Vec<crate::metrics::capability::Capability>,
    identity: &crate::identity::Identity,
) -> Vec<crate::metrics::capability::Capability> {
    caps.extend_from_slice(identity.capabilities());
    for c in &caps {
        eprintln!("hopwatch agent: {c}");
    }
    caps
}

fn pipeline_options(args: &AgentArgs, fast_path: FastPath) -> PipelineOptions {
    PipelineOptions {
        l7_timeout: args.l7_timeout,
        redaction: Redaction { keep_full_statements: args.keep_full_statements },
        fast_path,
        tracing: !args.no_request_tracing,
        trace_headers: crate::trace::PROPAGATED_HEADERS
            .into_iter()
            .filter(|h| args.trace_headers.iter().any(|a| a == h))
            .collect(),
        trusted_proxies: crate::flow::forwarded::TrustedProxies::new(args.trusted_proxies.clone()),
    }
}

/// OTLP export of traces from the in-process collector, with `--otlp-endpoint`.
fn start_otlp(
    args: &AgentArgs,
    sink: &crate::sink::Sink,
    cancel: &CancellationToken,
) -> Result<(), AgentError> {
    if args.otlp.otlp_endpoint.is_some() {
        let hub = sink.hub().ok_or(AgentError::OtlpWithoutCollector)?;
        if let Some(to) = crate::otlp::start(&args.otlp, hub, cancel.clone())? {
            eprintln!("hopwatch agent: traces to OTLP endpoint {to}");
        }
    }
    Ok(())
}

/// The web UI and the OTLP export over the in-process collector (none when flows go elsewhere),
/// and the agent's own listeners (`None` with `--show-own-traffic`).
async fn start_ui(
    args: &AgentArgs,
    metrics: &Telemetry,
    sink: &crate::sink::Sink,
    cancel: &CancellationToken,
) -> Result<(Option<OwnListeners>, Option<super::ui::Started>), AgentError> {
    start_otlp(args, sink, cancel)?;
    let ui = match sink.hub() {
        Some(hub) => {
            let started = super::ui::start(&args.ui, hub, args.sink.tls.allow_plaintext).await?;
            if !matches!(started, super::ui::Started::Off) {
                eprintln!("hopwatch agent: {started}");
            }
            Some(started)
        }
        None => None,
    };
    let addr = ui.as_ref().and_then(super::ui::Started::addr);
    Ok(((!args.show_own_traffic).then(|| own_listeners(metrics, sink, addr)), ui))
}

/// The agent's own listening sockets (the collector's APIs, `/metrics`, the web UI), announced.
fn own_listeners(
    metrics: &Telemetry,
    sink: &crate::sink::Sink,
    ui: Option<SocketAddr>,
) -> OwnListeners {
    let own =
        OwnListeners::new(sink.listen_addr().into_iter().chain(metrics.local_addr()).chain(ui));
    if !own.addrs().is_empty() {
        let addrs: Vec<String> = own.addrs().iter().map(ToString::to_string).collect();
        eprintln!(
            "hopwatch agent: connections to its own listeners ({}) are not shown \
             (--show-own-traffic shows them)",
            addrs.join(", ")
        );
    }
    own
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_or_else(|_| "localhost".to_owned(), |s| s.trim().to_owned())
}

fn send(tx: &Outlet, stats: &PipelineStats, resp: GetFlowsResponse) {
    // Policy: when the printer falls behind, drop the newest and count it; the count is reported
    // as an OBSERVER_EVENTS_QUEUE lost event.
    if tx.try_send(resp).is_err() {
        stats.losses.count(Loss::OutputQueue, 1);
    }
}

fn flow_response(node_name: &str, flow: hopwatch_proto::flow::Flow) -> GetFlowsResponse {
    GetFlowsResponse {
        time: flow.time,
        node_name: node_name.to_owned(),
        response_types: Some(ResponseTypes::Flow(flow)),
    }
}

async fn read_loop(
    events: RingBuf<MapData>,
    mut stages: Stages,
    tx: Outlet,
    stats: Arc<PipelineStats>,
    cancel: CancellationToken,
) -> Result<(), AgentError> {
    // SAFETY: the ring buffer owns its fd and nothing closes or replaces it while the AsyncFd
    // holds it.
    let mut ring =
        unsafe { AsyncFd::register_with_interest(events, tokio::io::Interest::READABLE) }
            .map_err(|e| AgentError::RingBuf(e.into_parts().1))?;
    let mut drain_tick = tokio::time::interval(DRAIN_INTERVAL);
    drain_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut flows = Vec::new();
    loop {
        // The kernel wakes us only when a batch is waiting; the timer bounds the delay of a
        // trickle of events.
        let woken = tokio::select! {
            () = cancel.cancelled() => break,
            guard = ring.readable_mut() => Some(guard.map_err(AgentError::RingBuf)?),
            _ = drain_tick.tick() => None,
        };
        if let Some(mut guard) = woken {
            guard.clear_ready();
        }
        // In batches: under a flood the kernel refills the buffer as fast as it is read, and
        // a drain without a bound never reached the pipeline's periodic work (held flows
        // released, idle connections swept) nor let the other tasks run; what waited on it
        // grew with the flood.
        loop {
            stats.metrics.heartbeat(stages.pipeline.counters());
            stages.policy.set_followed(tx.followed());
            if let Some(x) = stages.exchange.as_mut() {
                x.set_followed(tx.followed());
            }
            let n = drain(ring.get_mut(), DRAIN_BATCH, &mut stages, &mut flows, &tx, &stats);
            if let Some(x) = stages.exchange.as_mut() {
                x.promote(stages.pipeline.take_promotions());
            }
            if n < DRAIN_BATCH || cancel.is_cancelled() {
                break;
            }
            tokio::task::yield_now().await;
        }
    }
    // What the kernel wrote before the shutdown is read, not left in the buffer uncounted (the
    // programs are detached by now; the bound only guards against a reader slower than a
    // buffer's worth).
    let _ = drain(ring.get_mut(), FINAL_DRAIN_MAX, &mut stages, &mut flows, &tx, &stats);
    if let Some(mut rec) = stages.recorder {
        rec.flush().map_err(AgentError::Record)?;
    }
    Ok(())
}

/// What the read loop runs each record through.
struct Stages {
    pipeline: Pipeline,
    policy: RecordPolicy,
    /// The kernel's exchange engine, unless --no-kernel-exchanges.
    exchange: Option<crate::loader::exchange::ExchangeMaps>,
    recorder: Option<crate::recording::Recorder>,
    /// Finds the connections whose close was lost.
    gone: Option<gone::GoneCheck>,
}

/// Reads what waits in the ring buffer (at most `max` records) through the pipeline, then does
/// its periodic work. Returns the number of records read.
fn drain(
    rb: &mut RingBuf<MapData>,
    max: usize,
    stages: &mut Stages,
    flows: &mut Vec<hopwatch_proto::flow::Flow>,
    tx: &Outlet,
    stats: &PipelineStats,
) -> usize {
    let now_ns = Clock::monotonic_now_ns();
    let mut n = 0;
    while n < max {
        let Some(item) = rb.next() else { break };
        n += 1;
        if let Some(rec) = stages.recorder.as_mut()
            && let Err(e) = rec.record(&item)
        {
            tracing::error!(error = %e, "recording stopped");
            stages.recorder = None;
        }
        match decode(&item) {
            Ok(ev) => stages.pipeline.on_event(&ev, flows),
            Err(e) => {
                if stats.decode_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::warn!(error = %e, "undecodable kernel event (counted; further ones are not logged)");
                }
            }
        }
        ship(flows, stages, now_ns, tx, stats);
    }
    // Once per batch, not per record: a shared counter the metrics thread reads.
    stats.read.fetch_add(n as u64, Ordering::Relaxed);
    count_exchanges(stages, stats);
    stages.pipeline.tick(Clock::monotonic_now_ns(), flows);
    if let Some(g) = stages.gone.as_mut() {
        g.run(&mut stages.pipeline, stats, flows);
    }
    ship(flows, stages, now_ns, tx, stats);
    let not_recorded = stages.policy.not_recorded();
    if not_recorded != stats.not_recorded.swap(not_recorded, Ordering::Relaxed) {
        stats.metrics.exchanges(stages.policy.totals().map(|(d, t)| (d.name(), t)));
        tx.not_recorded(not_recorded);
    }
    n
}

/// Every flow is counted in the metrics and hops; those the policy records go on to the printer
/// and the collector.
fn ship(
    flows: &mut Vec<hopwatch_proto::flow::Flow>,
    stages: &mut Stages,
    now_ns: u64,
    tx: &Outlet,
    stats: &PipelineStats,
) {
    if flows.is_empty() {
        return;
    }
    // The exchanges counted so far go first: a flow may close their socket's hop.
    count_exchanges(stages, stats);
    for flow in flows.drain(..) {
        if stats.own.as_ref().is_some_and(|own| own.hide(&flow)) {
            continue;
        }
        stats.flows.fetch_add(1, Ordering::Relaxed);
        stats.metrics.observe(&flow);
        let parent_key = stages.pipeline.parent_sample_key(&flow);
        if stages.policy.keep(&flow, parent_key, now_ns) {
            send(tx, stats, flow_response(&stages.pipeline.builder().node_name, flow));
        }
    }
}

/// The exchanges the kernel measured and the pipeline only counts, into the hops under one lock
/// (between flows, in the order they came, and once per batch).
fn count_exchanges(stages: &mut Stages, stats: &PipelineStats) {
    let counted = stages.pipeline.take_counted();
    stages.policy.count_not_recorded(counted.len() as u64);
    stats.metrics.count_exchanges(counted);
}

/// With `--bpf-stats`: each kernel program's runs and average run time.
fn print_program_stats(ebpf: &aya::Ebpf) {
    for (name, runs, time) in loader::program_stats(ebpf) {
        #[expect(clippy::cast_precision_loss, reason = "a rounded display value")]
        let per_run = time.as_nanos() as f64 / runs as f64;
        eprintln!("hopwatch agent: program {name}: {runs} runs, {per_run:.0} ns per run");
    }
}

impl PipelineStats {
    /// The last line the agent prints: what it read, produced and lost.
    fn print_summary(&self, kernel: FinalCounts) {
        eprintln!(
            "hopwatch agent: {} events sent by the kernel, {} events read, {} lost in the kernel \
             ring buffer; {} flows ({} exchanges counted but not recorded), {} undecodable \
             events, {} flows dropped at the output queue",
            kernel.sent,
            self.read.load(Ordering::Relaxed),
            kernel.ring_lost,
            self.flows.load(Ordering::Relaxed),
            self.not_recorded.load(Ordering::Relaxed),
            self.decode_errors.load(Ordering::Relaxed),
            self.losses.total(Loss::OutputQueue)
        );
    }
}

/// Every few seconds: attach the uprobes (TLS, nginx) to files that appeared (new container
/// images, a library upgraded in place).
async fn rescan_uprobes(
    mut sets: Vec<crate::loader::uprobes::FileProbes>,
    ebpf: Arc<std::sync::Mutex<aya::Ebpf>>,
) {
    let mut tick = tokio::time::interval(UPROBE_RESCAN);
    tick.tick().await;
    loop {
        tick.tick().await;
        for probes in &mut sets {
            let (attached, failed) = {
                let mut ebpf = ebpf.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                probes.scan(&mut ebpf)
            };
            for (file, functions) in attached {
                eprintln!(
                    "hopwatch agent: {} uprobes attached to {} ({functions})",
                    probes.name,
                    file.display()
                );
            }
            for (file, err) in failed {
                tracing::warn!(probes = probes.name, file = %file.display(), error = %err, "cannot attach uprobes");
            }
        }
    }
}

/// The kernel's totals read after the final drain.
#[derive(Debug, Default, Clone, Copy)]
struct FinalCounts {
    /// Events put in the ring buffer.
    sent: u64,
    /// Events that did not fit (all reported as lost events).
    ring_lost: u64,
}

/// Every second, and once more when `reader_done` is cancelled: turn new kernel-side and queue
/// losses into Hubble `LostEvent`s. Returns the kernel's totals at the last round.
async fn watch_counters(
    counters: PerCpuArray<MapData, u64>,
    node_name: String,
    tx: Outlet,
    stats: Arc<PipelineStats>,
    reader_done: CancellationToken,
) -> FinalCounts {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut round = 0u64;
    loop {
        round += 1;
        let last_round = tokio::select! {
            () = reader_done.cancelled() => true,
            _ = tick.tick() => false,
        };
        if round.is_multiple_of(RELEASE_EVERY_SECONDS) {
            crate::memory::release_freed();
        }
        stats.metrics.tick(
            &counters,
            stats.read.load(Ordering::Relaxed),
            stats.decode_errors.load(Ordering::Relaxed),
            stats.losses.total(Loss::OutputQueue),
        );
        if let Some(own) = &stats.own {
            stats.metrics.flows_hidden("own_traffic", own.hidden());
        }
        let (collector_dropped, collector_waiting) = tx.collector_queue();
        stats.metrics.collector_queue(collector_dropped, collector_waiting);
        if let Some(total) = counters
            .get(&(Counter::RingbufFull as u32), 0)
            .ok()
            .map(|per_cpu| per_cpu.iter().sum::<u64>())
        {
            stats.losses.follow_total(Loss::KernelRingBuffer, total);
        }
        for notice in stats.losses.reports(&node_name) {
            // Lost-event notices bypass the drop-newest policy: they are what tells the user.
            tx.send(notice).await;
        }
        if last_round {
            let sent = counters
                .get(&(Counter::EventsSent as u32), 0)
                .map_or(0, |per_cpu| per_cpu.iter().sum::<u64>());
            return FinalCounts { sent, ring_lost: stats.losses.total(Loss::KernelRingBuffer) };
        }
    }
}

fn print_loop(
    mut rx: mpsc::Receiver<GetFlowsResponse>,
    format: Format,
    cancel: &CancellationToken,
) {
    let stdout = std::io::stdout();
    let mut printer =
        Printer::new(std::io::BufWriter::new(stdout.lock()), Options::streaming(format));
    while let Some(mut resp) = rx.blocking_recv() {
        let mut result = printer.write(&mut resp);
        // Flush when the queue is drained so a reader sees flows promptly.
        if result.is_ok() && rx.is_empty() {
            result = printer.flush();
        }
        if let Err(e) = result {
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                tracing::error!(error = %e, "cannot write flows to stdout");
            }
            cancel.cancel();
            return;
        }
    }
    let _ = printer.flush();
}
