//! `hopwatch agent`: probe, load, then run the pipeline
//! kernel ring buffer → decode → connection table → flows → output, until SIGINT/SIGTERM.

use std::{
    io::Write as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use aya::maps::{MapData, PerCpuArray, RingBuf};
use hopwatch_common::{Counter, KernelSettings};
use tokio::{io::unix::AsyncFd, sync::mpsc};
use tokio_util::sync::CancellationToken;

use crate::{
    conntrack::{ConnTable, endpoints},
    drops::{DEFAULT_IGNORED, symbols::KernelSymbols},
    events::{KernelEvent, decode},
    flow::{Clock, FlowBuilder},
    loader::{self, LoadOptions, probe::Probe},
    output::{self, Format},
    proto::{
        flow::{LostEvent, LostEventSource},
        observer::{GetFlowsResponse, get_flows_response::ResponseTypes},
    },
    sink::Outlet,
};

/// Flows waiting for the printer; beyond this the newest are dropped and counted.
const OUTPUT_QUEUE: usize = 16_384;
/// Connections tracked in userspace.
const CONN_TABLE_CAPACITY: usize = 262_144;
/// A connection silent this long is forgotten (long-lived ones report every update interval).
const CONN_IDLE_FORGET: Duration = Duration::from_hours(1);

#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// Print what this kernel and process allow, then exit.
    #[arg(long)]
    pub probe: bool,
    /// Flow output format on stdout.
    #[arg(short, long, value_enum, default_value_t = Format::Compact)]
    pub output: Format,
    /// Node name put on every flow [default: the host name].
    #[arg(long, env = "HOPWATCH_NODE_NAME")]
    pub node_name: Option<String>,
    /// Interval between periodic reports of a long-lived connection's counters.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub update_interval: Duration,
    /// Do not trace kernel packet drops.
    #[arg(long)]
    pub no_drops: bool,
    /// Kernel drop reasons not to report (comma-separated names as this kernel spells them,
    /// e.g. `NOT_SPECIFIED`). Replaces the default list.
    #[arg(long, value_delimiter = ',', value_name = "REASON,...")]
    pub drop_ignore: Option<Vec<String>>,
    /// Drop events sent per CPU per second at most; the rest are counted as rate-limited.
    #[arg(long, default_value_t = 1000)]
    pub drops_per_sec: u32,
    /// Size of the kernel→agent ring buffer in bytes (a power of two, at least 4096).
    #[arg(long, value_parser = parse_ringbuf_bytes)]
    pub ringbuf_bytes: Option<u32>,
    /// Where flows go besides stdout (a remote collector, or the in-process one).
    #[command(flatten)]
    pub sink: crate::sink::SinkArgs,
}

fn parse_ringbuf_bytes(s: &str) -> Result<u32, String> {
    let v: u32 = s.parse().map_err(|e| format!("{e}"))?;
    if v < 4096 || !v.is_power_of_two() {
        return Err(format!("{v} is not a power of two of at least 4096"));
    }
    Ok(v)
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{check}: {detail}")]
    Requirement { check: &'static str, detail: String },
    #[error(transparent)]
    Load(#[from] loader::LoadError),
    #[error("cannot watch the events ring buffer: {0}")]
    RingBuf(#[source] std::io::Error),
    #[error("cannot install SIGINT/SIGTERM handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error(transparent)]
    Sink(#[from] crate::sink::SinkError),
}

/// Counters of what the userspace pipeline could not keep.
#[derive(Debug, Default)]
struct PipelineStats {
    decode_errors: AtomicU64,
    output_dropped: AtomicU64,
    flows: AtomicU64,
}

pub async fn run(args: AgentArgs) -> Result<(), AgentError> {
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

    let (drop_ignore, strict) = match &args.drop_ignore {
        Some(list) => (list.clone(), true),
        None => (DEFAULT_IGNORED.iter().map(|s| (*s).to_owned()).collect(), false),
    };
    let settings = KernelSettings {
        update_interval_ns: u64::try_from(args.update_interval.as_nanos()).unwrap_or(u64::MAX),
        drops_per_sec_per_cpu: args.drops_per_sec,
        self_tgid: std::process::id(),
    };
    let loaded = loader::load(&LoadOptions {
        settings,
        drop_ignore: drop_ignore.clone(),
        drop_ignore_strict: strict,
        drops: !args.no_drops,
        cgroup2: probe.cgroup2.clone(),
        ringbuf_bytes: args.ringbuf_bytes,
    })?;
    eprintln!("hopwatch agent: hooks {}", loaded.hooks.join(", "));
    if !args.no_drops {
        eprintln!(
            "hopwatch agent: {} kernel drop reasons; not reported: {}",
            loaded.reasons.count(),
            drop_ignore.join(",")
        );
    }

    let symbols = match KernelSymbols::load(KernelSymbols::KALLSYMS) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "drop locations will be shown as addresses");
            None
        }
    };
    let node_name = args.node_name.clone().unwrap_or_else(hostname);
    let builder = FlowBuilder {
        node_name: node_name.clone(),
        clock: Clock::now(),
        reasons: loaded.reasons.clone(),
        symbols,
    };

    let loader::Loaded { ebpf, events, counters, .. } = loaded;
    let stats = Arc::new(PipelineStats::default());
    let cancel = CancellationToken::new();
    let sink = crate::sink::start(&args.sink, &node_name).await?;
    let (tx, rx) = crate::sink::channel(OUTPUT_QUEUE, &sink);

    let printer = tokio::task::spawn_blocking({
        let cancel = cancel.clone();
        move || print_loop(rx, args.output, &cancel)
    });
    let reader =
        tokio::spawn(read_loop(events, builder, tx.clone(), stats.clone(), cancel.clone()));
    let watcher =
        tokio::spawn(watch_counters(counters, node_name, tx, stats.clone(), cancel.clone()));

    tokio::select! {
        () = shutdown => eprintln!("hopwatch agent: shutting down"),
        () = cancel.cancelled() => {}
    }
    cancel.cancel();
    let reader_result = reader.await;
    let _ = watcher.await;
    let _ = printer.await;
    sink.close().await;
    // Dropping the object detaches every program (all are BPF links owned by this process).
    drop(ebpf);
    eprintln!(
        "hopwatch agent: {} flows, {} undecodable events, {} flows dropped at the output queue",
        stats.flows.load(Ordering::Relaxed),
        stats.decode_errors.load(Ordering::Relaxed),
        stats.output_dropped.load(Ordering::Relaxed)
    );
    match reader_result {
        Ok(result) => result,
        Err(e) => {
            tracing::error!(error = %e, "event reader task failed");
            Ok(())
        }
    }
}

/// Registers SIGINT and SIGTERM handlers now; the returned future completes on either.
fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_or_else(|_| "localhost".to_owned(), |s| s.trim().to_owned())
}

fn send(tx: &Outlet, stats: &PipelineStats, resp: GetFlowsResponse) {
    // Policy: when the printer falls behind, drop the newest and count it; the count is reported
    // as an OBSERVER_EVENTS_QUEUE lost event.
    if tx.try_send(resp).is_err() {
        stats.output_dropped.fetch_add(1, Ordering::Relaxed);
    }
}

fn flow_response(node_name: &str, flow: crate::proto::flow::Flow) -> GetFlowsResponse {
    GetFlowsResponse {
        time: flow.time,
        node_name: node_name.to_owned(),
        response_types: Some(ResponseTypes::Flow(flow)),
    }
}

async fn read_loop(
    events: RingBuf<MapData>,
    builder: FlowBuilder,
    tx: Outlet,
    stats: Arc<PipelineStats>,
    cancel: CancellationToken,
) -> Result<(), AgentError> {
    // SAFETY: the ring buffer owns its fd and nothing closes or replaces it while the AsyncFd
    // holds it.
    let mut ring =
        unsafe { AsyncFd::register_with_interest(events, tokio::io::Interest::READABLE) }
            .map_err(|e| AgentError::RingBuf(e.into_parts().1))?;
    let mut table = ConnTable::new(CONN_TABLE_CAPACITY);
    let mut last_sweep = Clock::monotonic_now_ns();
    loop {
        let mut guard = tokio::select! {
            () = cancel.cancelled() => break,
            guard = ring.readable_mut() => guard.map_err(AgentError::RingBuf)?,
        };
        let rb = guard.get_inner_mut();
        while let Some(item) = rb.next() {
            match decode(&item) {
                Ok(ev) => handle(ev, &builder, &mut table, &tx, &stats),
                Err(e) => {
                    if stats.decode_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                        tracing::warn!(error = %e, "undecodable kernel event (counted; further ones are not logged)");
                    }
                }
            }
        }
        guard.clear_ready();
        let now = Clock::monotonic_now_ns();
        if now.saturating_sub(last_sweep) > 60_000_000_000 {
            let forget = u64::try_from(CONN_IDLE_FORGET.as_nanos()).unwrap_or(u64::MAX);
            table.sweep(now.saturating_sub(forget));
            last_sweep = now;
        }
    }
    Ok(())
}

fn handle(
    ev: KernelEvent,
    builder: &FlowBuilder,
    table: &mut ConnTable,
    tx: &Outlet,
    stats: &PipelineStats,
) {
    let flow = match ev {
        KernelEvent::Tcp(ev) => {
            let Some(mut conn) = table.apply(&ev) else { return };
            // Updates carry no namespace; keep the one learnt at establishment.
            if conn.netns == 0 {
                conn.netns = ev.tuple.netns;
            }
            let peer = table.peer(&conn).cloned();
            builder.tcp(&ev, &conn, peer.as_ref())
        }
        KernelEvent::Drop(ev) => {
            let (src_proc, dst_proc) = match endpoints(&ev.tuple) {
                Some((s, d)) => (
                    table.find(s, d, ev.tuple.netns).and_then(|c| c.process.clone()),
                    table.find(d, s, ev.tuple.netns).and_then(|c| c.process.clone()),
                ),
                None => (None, None),
            };
            builder.drop(&ev, src_proc.as_ref(), dst_proc.as_ref())
        }
    };
    stats.flows.fetch_add(1, Ordering::Relaxed);
    send(tx, stats, flow_response(&builder.node_name, flow));
}

/// Every second: turn new kernel-side and queue losses into Hubble `LostEvent`s.
async fn watch_counters(
    counters: PerCpuArray<MapData, u64>,
    node_name: String,
    tx: Outlet,
    stats: Arc<PipelineStats>,
    cancel: CancellationToken,
) {
    let mut last_ring = 0u64;
    let mut last_queue = 0u64;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        let ring_lost = counters
            .get(&(Counter::RingbufFull as u32), 0)
            .map_or(last_ring, |per_cpu| per_cpu.iter().sum::<u64>());
        let queue_lost = stats.output_dropped.load(Ordering::Relaxed);
        for (source, now, last) in [
            (LostEventSource::PerfEventRingBuffer, ring_lost, &mut last_ring),
            (LostEventSource::ObserverEventsQueue, queue_lost, &mut last_queue),
        ] {
            if now > *last {
                let lost =
                    LostEvent { source: source.into(), num_events_lost: now - *last, cpu: None };
                tracing::warn!(source = source.as_str_name(), lost = now - *last, "events lost");
                // Lost-event notices bypass the drop-newest policy: they are what tells the user.
                let _ = tx
                    .send(GetFlowsResponse {
                        time: Some(Clock::now().timestamp(Clock::monotonic_now_ns())),
                        node_name: node_name.clone(),
                        response_types: Some(ResponseTypes::LostEvents(lost)),
                    })
                    .await;
                *last = now;
            }
        }
    }
}

fn print_loop(
    mut rx: mpsc::Receiver<GetFlowsResponse>,
    format: Format,
    cancel: &CancellationToken,
) {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    while let Some(resp) = rx.blocking_recv() {
        let mut result = output::write(&mut out, format, &resp);
        // Flush when the queue is drained so a reader sees flows promptly.
        if result.is_ok() && rx.is_empty() {
            result = out.flush();
        }
        if let Err(e) = result {
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                tracing::error!(error = %e, "cannot write flows to stdout");
            }
            cancel.cancel();
            return;
        }
    }
    let _ = out.flush();
}
