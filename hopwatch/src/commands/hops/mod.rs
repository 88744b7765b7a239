//! `hopwatch hops`: a per-hop table (or paths) over recent flows.
//!
//! Flows come from a collector's Hubble-compatible `GetFlows` (with `since`; following with
//! `--watch`), or from JSON flow lines (`hopwatch agent -o json`, `hopwatch observe -o json`, `hubble
//! observe -o json`) from a file or standard input. They are aggregated here, client side, by the
//! same [`hopwatch_hops`] code the agent's metrics use; the table and the paths are pure functions
//! of the flows ([`summarize`]).
//!
//! `--watch` keeps a sliding window over a live stream (standard input, a growing file, or a
//! following `GetFlows`) and redraws in place.

mod render;
mod source;

use std::{
    io::{BufRead, BufReader, IsTerminal as _, Write as _},
    path::PathBuf,
    process::ExitCode,
    sync::mpsc,
    time::{Duration, Instant},
};

use hopwatch_hops::{
    Aggregator, HopConfig,
    links::{LinkCounts, Links},
    path::{Path, paths},
    view::{self, HopRow, RowFilter, SortKey},
    window::Window,
};
use hopwatch_proto::flow::Flow;
use serde::Serialize;

#[cfg(test)]
use self::render::table;
use self::render::write_summary;
use crate::{commands::observe::ServerError, metrics::wall_now_ns};

/// Slots of the `--watch` window (its resolution is the window / this).
const WATCH_SLOTS: u32 = 12;
/// Flows waiting between the reader thread and the table.
const READ_QUEUE: usize = 65_536;
/// How often a followed file is checked for new lines.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(super) enum HopsFormat {
    /// Aligned columns.
    Table,
    /// One JSON document (per refresh with --watch).
    Json,
}

#[derive(Debug, Clone, clap::Args)]
pub(super) struct HopsArgs {
    /// Collector address: host:port, http://host:port or https://host:port.
    #[arg(long, env = "HOPWATCH_SERVER", default_value = "localhost:4245")]
    pub server: String,
    #[command(flatten)]
    pub connection: crate::commands::observe::Connection,
    /// Read flows from JSON flow lines (`hopwatch observe -o json`, `hubble observe -o json`)
    /// in FILE instead of the server; `-` reads standard input.
    #[arg(long, value_name = "FILE|-")]
    pub input: Option<PathBuf>,
    /// Flows since this long ago (e.g. `30s`, `5m`) or this time (RFC 3339); rates are per
    /// second over that window.
    #[arg(long, default_value = "5m", value_parser = parse_since)]
    pub since: Since,
    /// Hops with either end in this namespace (repeatable).
    #[arg(short = 'n', long = "namespace", value_name = "NAMESPACE")]
    pub namespaces: Vec<String>,
    /// Hops with either end named `[namespace/]prefix...` (repeatable).
    #[arg(long, value_name = "[NAMESPACE/]NAME")]
    pub pod: Vec<String>,
    /// Hops to this destination port (repeatable).
    #[arg(long, value_name = "PORT")]
    pub to_port: Vec<u16>,
    /// Column to sort by (numbers largest first, names A→Z).
    #[arg(long, value_enum, default_value_t = SortKey::P99)]
    pub sort: SortKey,
    /// Reverse the sort order.
    #[arg(long)]
    pub reverse: bool,
    /// Show only the first N hops (or paths).
    #[arg(long, value_name = "N")]
    pub top: Option<usize>,
    /// Chain hops into paths (upstream → downstream) with each hop's share of the end-to-end
    /// latency.
    #[arg(long)]
    pub path: bool,
    /// Refresh in place every INTERVAL (default 2s) over a sliding window of --since.
    #[arg(long, value_name = "INTERVAL", num_args = 0..=1, default_missing_value = "2s",
          value_parser = humantime::parse_duration)]
    pub watch: Option<Duration>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = HopsFormat::Table)]
    pub output: HopsFormat,
}

/// Start of the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Since {
    Ago(Duration),
    /// ns since the epoch.
    At(u64),
}

impl Since {
    pub(super) fn start_ns(self, now_ns: u64) -> u64 {
        match self {
            Since::Ago(d) => now_ns.saturating_sub(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
            Since::At(t) => t,
        }
    }
}

pub(super) fn parse_since(s: &str) -> Result<Since, HopsError> {
    if let Ok(d) = humantime::parse_duration(s) {
        return Ok(Since::Ago(d));
    }
    humantime::parse_rfc3339_weak(s)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .and_then(|d| u64::try_from(d.as_nanos()).ok())
        .map(Since::At)
        .ok_or_else(|| HopsError::Since { value: s.to_owned() })
}

/// Why `hopwatch hops` stopped.
#[derive(Debug, thiserror::Error)]
pub(super) enum HopsError {
    /// `--since` (through clap, which names the flag and the value first).
    #[error(
        "{value:?} is neither a duration (30s, 5m, 1h) nor an RFC 3339 time \
         (2024-05-01T10:00:00Z)"
    )]
    Since { value: String },
    /// `--input` (`-`: standard input) cannot be opened or read.
    #[error("cannot read flows from {}: {source}", input_name(path))]
    Input {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("--watch needs a window relative to now (`--since 5m`), not a fixed start time")]
    WatchSince,
    #[error("cannot write the table to standard output: {0}")]
    Output(#[source] std::io::Error),
}

/// How messages name `--input`.
fn input_name(path: &std::path::Path) -> String {
    if path.as_os_str() == "-" { "standard input".to_owned() } else { path.display().to_string() }
}

/// What `hopwatch hops` shows for a set of flows.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Summary {
    pub window_seconds: f64,
    /// Flows counted into hops.
    pub flows: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hops: Option<Vec<HopRow>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paths: Option<Vec<Path>>,
    /// With paths: how many exchanges the tracer linked to their caller's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub links: Option<LinkCounts>,
}

/// How to present the rows.
#[derive(Debug, Clone, Default)]
pub(super) struct Presentation {
    pub filter: RowFilter,
    pub sort: Option<(SortKey, bool)>,
    pub top: Option<usize>,
    pub path: bool,
}

/// Rows (or paths, along `links` where the tracer made them) of `rows`, filtered, sorted and cut
/// as asked.
#[must_use]
pub(super) fn present(
    mut rows: Vec<HopRow>,
    links: Option<&Links>,
    window_s: f64,
    flows: u64,
    p: &Presentation,
) -> Summary {
    if p.path {
        let (edges, counts) = links.map(Links::edges).unwrap_or_default();
        let mut ps: Vec<Path> = paths(&rows, &edges)
            .into_iter()
            .filter(|path| path.steps.iter().any(|s| p.filter.matches(&s.hop)))
            .collect();
        if let Some(n) = p.top {
            ps.truncate(n);
        }
        return Summary {
            window_seconds: window_s,
            flows,
            hops: None,
            paths: Some(ps),
            links: Some(counts),
        };
    }
    rows.retain(|r| p.filter.matches(r));
    let (key, reverse) = p.sort.unwrap_or((SortKey::P99, false));
    view::sort(&mut rows, key, reverse);
    if let Some(n) = p.top {
        rows.truncate(n);
    }
    Summary { window_seconds: window_s, flows, hops: Some(rows), paths: None, links: None }
}

/// The summary of `flows` between `start_ns` and `now_ns` (the one-shot table).
#[must_use]
pub(super) fn summarize(flows: &[Flow], start_ns: u64, now_ns: u64, p: &Presentation) -> Summary {
    let (agg, window_s) = aggregate(flows, start_ns, now_ns, p.path);
    let cx = agg.context();
    let rows = view::rows(agg.table(), Some(&cx.ledger), window_s);
    present(rows, cx.links.as_ref(), window_s, agg.counted, p)
}

/// The hops of `flows` between `start_ns` and `now_ns` (with the tracer's links between them
/// when `links`), and the window in seconds: what the one-shot table and the web UI show.
#[must_use]
pub(in crate::commands) fn aggregate(
    flows: &[Flow],
    start_ns: u64,
    now_ns: u64,
    links: bool,
) -> (Aggregator, f64) {
    let cfg = HopConfig {
        series_limit: usize::MAX,
        stale_after: Duration::MAX,
        links,
        ..HopConfig::default()
    };
    let mut agg = Aggregator::new(cfg);
    for f in flows {
        let at = hopwatch_hops::aggregate::flow_time_ns(f, now_ns);
        if at >= start_ns && at <= now_ns {
            agg.observe(f, now_ns);
        }
    }
    #[expect(clippy::cast_precision_loss, reason = "seconds for rates")]
    let window_s = now_ns.saturating_sub(start_ns) as f64 / 1e9;
    (agg, window_s)
}

/// Runs `hopwatch hops`: exit 2 for bad flags, 1 when the flows cannot be read.
pub(super) async fn main(args: HopsArgs) -> ExitCode {
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hopwatch hops: error: {e}");
            let usage = match &e {
                HopsError::Server(s) => s.is_usage(),
                HopsError::Since { .. } | HopsError::WatchSince => true,
                HopsError::Input { .. } | HopsError::Output(_) => false,
            };
            if usage { ExitCode::from(2) } else { ExitCode::FAILURE }
        }
    }
}

pub(super) async fn run(args: HopsArgs) -> Result<(), HopsError> {
    let p = Presentation {
        filter: RowFilter {
            namespaces: args.namespaces.clone(),
            pods: args.pod.clone(),
            to_ports: args.to_port.iter().map(|p| u32::from(*p)).collect(),
        },
        sort: Some((args.sort, args.reverse)),
        top: args.top,
        path: args.path,
    };
    if args.watch.is_some() && matches!(args.since, Since::At(_)) {
        return Err(HopsError::WatchSince);
    }
    let (tx, rx) = mpsc::sync_channel::<Flow>(READ_QUEUE);
    let feeder = if let Some(input) = args.input.clone() {
        feed_from_input(&input, args.watch.is_some(), tx)?
    } else {
        let (uri, stream) = source::query(&args, args.since.start_ns(wall_now_ns())).await?;
        tokio::spawn(source::pump(stream, uri, tx))
    };
    let result = match args.watch {
        None => tokio::task::spawn_blocking(move || one_shot(&rx, args.since, args.output, &p))
            .await
            .unwrap_or_else(|e| panic!("table task failed: {e}")),
        Some(every) => {
            tokio::task::spawn_blocking(move || watch(&rx, args.since, every, args.output, &p))
                .await
                .unwrap_or_else(|e| panic!("watch task failed: {e}"))
        }
    };
    result?;
    feeder.await.unwrap_or(Ok(()))
}

/// Starts reading JSON flow lines from `input` (`-`: standard input) into `tx`.
fn feed_from_input(
    input: &std::path::Path,
    watch: bool,
    tx: mpsc::SyncSender<Flow>,
) -> Result<tokio::task::JoinHandle<Result<(), HopsError>>, HopsError> {
    let stdin = input.as_os_str() == "-";
    let reader: Box<dyn BufRead + Send> = if stdin {
        Box::new(BufReader::new(std::io::stdin()))
    } else {
        let file = std::fs::File::open(input)
            .map_err(|source| HopsError::Input { path: input.to_owned(), source })?;
        Box::new(BufReader::new(file))
    };
    // A growing file is followed with --watch; standard input ends when its writer does.
    let follow = watch && !stdin;
    let input = input.to_owned();
    Ok(tokio::task::spawn_blocking(move || source::read_lines(reader, &input, follow, &tx)))
}

fn one_shot(
    rx: &mpsc::Receiver<Flow>,
    since: Since,
    format: HopsFormat,
    p: &Presentation,
) -> Result<(), HopsError> {
    let flows: Vec<Flow> = rx.iter().collect();
    let now = wall_now_ns();
    let summary = summarize(&flows, since.start_ns(now), now, p);
    let mut out = std::io::stdout().lock();
    write_summary(&mut out, &summary, format, None).map_err(HopsError::Output)
}

fn watch(
    rx: &mpsc::Receiver<Flow>,
    since: Since,
    every: Duration,
    format: HopsFormat,
    p: &Presentation,
) -> Result<(), HopsError> {
    let Since::Ago(span) = since else { return Err(HopsError::WatchSince) };
    let cfg = HopConfig {
        series_limit: 100_000,
        stale_after: span,
        links: p.path,
        ..HopConfig::default()
    };
    let mut window = Window::new(span, WATCH_SLOTS, cfg);
    let mut next = Instant::now() + every;
    let tty = std::io::stdout().is_terminal();
    let mut ended = false;
    loop {
        let wait = next.saturating_duration_since(Instant::now());
        match rx.recv_timeout(wait) {
            Ok(f) => {
                window.observe(&f, wall_now_ns());
                continue;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // The stream ended: show the window as it stands, once more, and stop.
            Err(mpsc::RecvTimeoutError::Disconnected) => ended = true,
        }
        next += every;
        let now = wall_now_ns();
        window.advance(now);
        let table = window.view();
        let cx = window.context();
        let rows = view::rows(&table, Some(&cx.ledger), span.as_secs_f64());
        let summary = present(rows, cx.links.as_ref(), span.as_secs_f64(), window.counted, p);
        let mut out = std::io::stdout().lock();
        if tty && format == HopsFormat::Table {
            // Home and clear: redraw in place.
            write!(out, "\x1b[H\x1b[2J").map_err(HopsError::Output)?;
        }
        let title = format!(
            "hopwatch hops: last {}, every {}",
            humantime::format_duration(span),
            humantime::format_duration(every)
        );
        write_summary(&mut out, &summary, format, Some(&title)).map_err(HopsError::Output)?;
        out.flush().map_err(HopsError::Output)?;
        if ended {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use hopwatch_hops::testing::*;

    use super::*;

    #[test]
    fn the_server_is_asked_for_every_flow_of_the_window_and_only_the_namespace_filter() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            hops: HopsArgs,
        }
        let args = |a: &[&str]| Cli::try_parse_from([&["t"], a].concat()).unwrap().hops;
        let req = source::request(
            &args(&["-n", "shop", "--pod", "api", "--to-port", "80"]),
            5_000_000_000,
        );
        assert_eq!((req.number, req.follow), (u64::MAX, false));
        assert_eq!(req.since.unwrap().seconds, 5);
        assert_eq!(req.whitelist.len(), 2);
        assert_eq!(req.whitelist[0].source_pod, ["shop/"]);
        assert_eq!(req.whitelist[1].destination_pod, ["shop/"]);
        assert!(req.whitelist.iter().all(|f| f.destination_port.is_empty()));
        let req = source::request(&args(&["--watch"]), 0);
        assert!(req.follow && req.whitelist.is_empty());
    }

    #[test]
    fn since_takes_durations_and_times() {
        assert_eq!(parse_since("5m").unwrap(), Since::Ago(Duration::from_mins(5)));
        assert_eq!(parse_since("1970-01-01T00:00:10Z").unwrap(), Since::At(10_000_000_000));
        let err = parse_since("yesterday").unwrap_err();
        assert!(matches!(&err, HopsError::Since { value } if value == "yesterday"), "{err:?}");
        assert!(err.to_string().contains("RFC 3339"), "{err}");
    }

    #[test]
    fn paths_follow_the_tracers_links_and_say_how_each_hop_joined() {
        let span = |mut f: Flow, id: u64, parent: u64| {
            f.l7.as_mut().unwrap().span = Some(hopwatch_proto::flow::Span {
                span_id: format!("{id:016x}"),
                parent_span_id: if parent == 0 { String::new() } else { format!("{parent:016x}") },
                link: if parent == 0 { String::new() } else { "thread".to_owned() },
                unlinked: String::new(),
            });
            f
        };
        let mut flows = Vec::new();
        for i in 0..5 {
            let at = T0 + i * MS;
            flows.push(span(l7(FRONT, APP_SVC, at, 20 * MS, false, ""), 1 + i, 0));
            flows.push(span(l7(APP, DB, at, 5 * MS, false, ""), 100 + i, 1 + i));
            flows.push(l7(APP, ("redis-server", "10.0.0.4", 6379), at, MS, false, ""));
        }
        let p = Presentation { path: true, ..Presentation::default() };
        let s = summarize(&flows, T0, T0 + S, &p);
        let mut out = Vec::new();
        write_summary(&mut out, &s, HopsFormat::Table, None).unwrap();
        let text = String::from_utf8(out).unwrap();
        let line = |needle: &str| text.lines().find(|l| l.contains(needle)).unwrap_or_default();
        assert!(line("→ postgres:5432").contains("link:thread"), "{text}");
        assert!(line("→ redis-server:6379").contains("endpoint"), "{text}");
        assert!(text.contains("links: 5 of 10 exchanges linked to their caller"), "{text}");
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["paths"][0]["steps"][1]["via"], "link");
        assert_eq!(json["paths"][0]["steps"][1]["links"]["thread"], 5);
        assert_eq!(json["links"]["linked"], 5);
    }

    #[test]
    fn the_one_shot_summary_keeps_the_window_and_ranks_the_slow_hop_first() {
        let now = T0 + 60 * S;
        let mut flows = Vec::new();
        for i in 0..30 {
            flows.push(l7(FRONT, APP_SVC, T0 + 30 * S + i * MS, 2 * MS, false, ""));
            flows.push(l7(APP, DB, T0 + 30 * S + i * MS, 40 * MS, false, ""));
        }
        // Outside the window: ignored.
        flows.push(l7(APP, ("redis", "10.0.0.9", 6379), T0, 900 * MS, false, ""));
        let s = summarize(&flows, T0 + 10 * S, now, &Presentation::default());
        let rows = s.hops.unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].destination.name, "postgres");
        assert!((s.window_seconds - 50.0).abs() < 1e-9);
        assert!((rows[0].requests_per_second - 0.6).abs() < 1e-9);
        let text = table(&rows);
        assert!(text.lines().nth(1).unwrap().starts_with("app → postgres:5432"), "{text}");
        assert!(text.contains("40.0ms"), "{text}");
        let p = Presentation {
            path: false,
            filter: RowFilter { to_ports: vec![8000], ..RowFilter::default() },
            ..Presentation::default()
        };
        assert_eq!(summarize(&flows, T0, now, &p).hops.unwrap().len(), 1);
        let json =
            serde_json::to_value(summarize(&flows, T0 + 10 * S, now, &Presentation::default()))
                .unwrap();
        assert_eq!(json["hops"][0]["client_latency"]["p50_ns"], 40 * MS);
    }
}
