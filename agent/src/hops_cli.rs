//! `hopwatch hops`: a per-hop table (or paths) over recent flows.
//!
//! Flows come from a source ([`Source`]): a collector's Hubble-compatible `GetFlows` (with
//! `since`), or JSON flow lines (`hopwatch agent -o json`, `hopwatch observe -o json`, `hubble
//! observe -o json`) from a file or standard input. They are aggregated here, client side, by the
//! same [`crate::hops`] code the agent's metrics use; the table and the paths are pure functions
//! of the flows ([`summarize`]).
//!
//! `--watch` keeps a sliding window over a live stream (standard input, a growing file, or a
//! following `GetFlows`) and redraws in place.

use std::{
    fmt::Write as _,
    io::{BufRead, BufReader, IsTerminal as _, Write as _},
    path::PathBuf,
    sync::{LazyLock, mpsc},
    time::{Duration, Instant},
};

use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage};
use serde::Serialize;

use crate::{
    hops::{
        Aggregator, HopConfig,
        path::{Path, paths},
        view::{self, HopRow, Latency, RowFilter, SortKey},
        window::Window,
    },
    metrics::wall_now_ns,
    output::human_ns,
    proto::{flow::Flow, observer::GetFlowsResponse},
};

/// Slots of the `--watch` window (its resolution is the window / this).
const WATCH_SLOTS: u32 = 12;
/// Flows waiting between the reader thread and the table.
const READ_QUEUE: usize = 65_536;
/// How often a followed file is checked for new lines.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HopsFormat {
    /// Aligned columns.
    Table,
    /// One JSON document (per refresh with --watch).
    Json,
}

#[derive(Debug, Clone, clap::Args)]
pub struct HopsArgs {
    /// Collector to query (host:port).
    #[arg(long, env = "HOPWATCH_SERVER", default_value = "localhost:4245")]
    pub server: String,
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
pub enum Since {
    Ago(Duration),
    /// ns since the epoch.
    At(u64),
}

impl Since {
    fn start_ns(self, now_ns: u64) -> u64 {
        match self {
            Since::Ago(d) => now_ns.saturating_sub(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
            Since::At(t) => t,
        }
    }
}

fn parse_since(s: &str) -> Result<Since, String> {
    if let Ok(d) = humantime::parse_duration(s) {
        return Ok(Since::Ago(d));
    }
    humantime::parse_rfc3339_weak(s)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .and_then(|d| u64::try_from(d.as_nanos()).ok())
        .map(Since::At)
        .ok_or_else(|| format!("{s:?} is neither a duration (30s, 5m, 1h) nor an RFC 3339 time"))
}

#[derive(Debug, thiserror::Error)]
pub enum HopsError {
    #[error("cannot read flows from {path}: {source}")]
    Input {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "reading flows from the collector at {server} needs its GetFlows client, which this build \
         does not have yet; pipe flows in instead: `hopwatch observe --since 5m -o json | \
         hopwatch hops --input -` (or `hopwatch agent -o json > flows.json`, then `--input \
         flows.json`)"
    )]
    NoServerClient { server: String },
    #[error("--watch needs a window relative to now (`--since 5m`), not a fixed start time")]
    WatchSince,
    #[error("cannot write the table: {0}")]
    Output(#[source] std::io::Error),
}

static DESCRIPTORS: LazyLock<DescriptorPool> = LazyLock::new(|| {
    DescriptorPool::decode(include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin")).as_ref())
        .expect("descriptor set generated by build.rs is valid")
});

/// One JSON line → a flow. Accepts a `GetFlowsResponse` (`{"flow": {...}}`, as `observe -o json`
/// and Hubble print it) or a bare flow; fields hopwatch does not model are ignored. `Ok(None)`
/// for a response that carries no flow (a lost-events or node notice).
pub fn flow_from_json(line: &str) -> Result<Option<Flow>, String> {
    let opts = DeserializeOptions::new().deny_unknown_fields(false);
    let value: serde_json::Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
    let is_response = ["flow", "lost_events", "node_status"].iter().any(|k| value.get(k).is_some());
    let name = if is_response { GetFlowsResponse::FULL_NAME } else { "flow.Flow" };
    let desc = DESCRIPTORS.get_message_by_name(name).expect("message is in proto/");
    let msg =
        DynamicMessage::deserialize_with_options(desc, value, &opts).map_err(|e| e.to_string())?;
    if is_response {
        let resp: GetFlowsResponse = msg.transcode_to().map_err(|e| e.to_string())?;
        Ok(match resp.response_types {
            Some(crate::proto::observer::get_flows_response::ResponseTypes::Flow(f)) => Some(f),
            _ => None,
        })
    } else {
        msg.transcode_to().map(Some).map_err(|e| e.to_string())
    }
}

/// What `hopwatch hops` shows for a set of flows.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub window_seconds: f64,
    /// Flows counted into hops.
    pub flows: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hops: Option<Vec<HopRow>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paths: Option<Vec<Path>>,
}

/// How to present the rows.
#[derive(Debug, Clone, Default)]
pub struct Presentation {
    pub filter: RowFilter,
    pub sort: Option<(SortKey, bool)>,
    pub top: Option<usize>,
    pub path: bool,
}

/// Rows (or paths) of `rows`, filtered, sorted and cut as asked.
#[must_use]
pub fn present(mut rows: Vec<HopRow>, window_s: f64, flows: u64, p: &Presentation) -> Summary {
    if p.path {
        let mut ps: Vec<Path> = paths(&rows)
            .into_iter()
            .filter(|path| path.steps.iter().any(|s| p.filter.matches(&s.hop)))
            .collect();
        if let Some(n) = p.top {
            ps.truncate(n);
        }
        return Summary { window_seconds: window_s, flows, hops: None, paths: Some(ps) };
    }
    rows.retain(|r| p.filter.matches(r));
    let (key, reverse) = p.sort.unwrap_or((SortKey::P99, false));
    view::sort(&mut rows, key, reverse);
    if let Some(n) = p.top {
        rows.truncate(n);
    }
    Summary { window_seconds: window_s, flows, hops: Some(rows), paths: None }
}

/// The summary of `flows` between `start_ns` and `now_ns` (the one-shot table).
#[must_use]
pub fn summarize(flows: &[Flow], start_ns: u64, now_ns: u64, p: &Presentation) -> Summary {
    let cfg =
        HopConfig { series_limit: usize::MAX, stale_after: Duration::MAX, ..HopConfig::default() };
    let mut agg = Aggregator::new(cfg);
    for f in flows {
        let at = crate::hops::aggregate::flow_time_ns(f, now_ns);
        if at >= start_ns && at <= now_ns {
            agg.observe(f, now_ns);
        }
    }
    #[expect(clippy::cast_precision_loss, reason = "seconds for rates")]
    let window_s = now_ns.saturating_sub(start_ns) as f64 / 1e9;
    let rows = view::rows(agg.table(), Some(&agg.context().ledger), window_s);
    present(rows, window_s, agg.counted, p)
}

pub async fn run(args: HopsArgs) -> Result<(), HopsError> {
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
    let Some(input) = args.input.clone() else {
        return Err(HopsError::NoServerClient { server: args.server });
    };
    if args.watch.is_some() && matches!(args.since, Since::At(_)) {
        return Err(HopsError::WatchSince);
    }
    let name = input.display().to_string();
    let stdin = name == "-";
    let source: Box<dyn BufRead + Send> = if stdin {
        Box::new(BufReader::new(std::io::stdin()))
    } else {
        let file = std::fs::File::open(&input)
            .map_err(|source| HopsError::Input { path: name.clone(), source })?;
        Box::new(BufReader::new(file))
    };
    let (tx, rx) = mpsc::sync_channel::<Flow>(READ_QUEUE);
    // A growing file is followed with --watch; standard input ends when its writer does.
    let follow = args.watch.is_some() && !stdin;
    let reader = std::thread::spawn(move || read_lines(source, &name, follow, &tx));
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
    match reader.join() {
        Ok(r) => r,
        Err(_) => Ok(()),
    }
}

/// Reads JSON flow lines into `tx` (at the end, waits for more when `follow`).
fn read_lines(
    mut reader: Box<dyn BufRead + Send>,
    name: &str,
    follow: bool,
    tx: &mpsc::SyncSender<Flow>,
) -> Result<(), HopsError> {
    let io_err = |source| HopsError::Input { path: name.to_owned(), source };
    let (mut line, mut n, mut bad) = (String::new(), 0u64, 0u64);
    loop {
        line.clear();
        let read = reader.read_line(&mut line).map_err(io_err)?;
        if read == 0 {
            if follow {
                std::thread::sleep(FOLLOW_POLL);
                continue;
            }
            break;
        }
        n += 1;
        if line.trim().is_empty() {
            continue;
        }
        match flow_from_json(line.trim()) {
            Ok(Some(f)) => {
                if tx.send(f).is_err() {
                    break;
                }
            }
            Ok(None) => {}
            Err(e) => {
                bad += 1;
                if bad == 1 {
                    eprintln!(
                        "hopwatch hops: {name} line {n} is not a flow ({e}); skipping such lines"
                    );
                }
            }
        }
    }
    if bad > 0 {
        eprintln!("hopwatch hops: {bad} of {n} lines of {name} were not flows and were skipped");
    }
    Ok(())
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
    let cfg = HopConfig { series_limit: 100_000, stale_after: span, ..HopConfig::default() };
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
        let rows = view::rows(&table, Some(&window.context().ledger), span.as_secs_f64());
        let summary = present(rows, span.as_secs_f64(), window.counted, p);
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

/// Writes a summary as a table or one JSON line.
pub fn write_summary(
    out: &mut impl std::io::Write,
    s: &Summary,
    format: HopsFormat,
    title: Option<&str>,
) -> std::io::Result<()> {
    match format {
        HopsFormat::Json => {
            serde_json::to_writer(&mut *out, s)?;
            writeln!(out)
        }
        HopsFormat::Table => {
            if let Some(t) = title {
                writeln!(out, "{t}")?;
            }
            match (&s.hops, &s.paths) {
                (Some(rows), _) => write!(out, "{}", table(rows)),
                (_, Some(paths)) => write!(out, "{}", path_table(paths)),
                _ => Ok(()),
            }
        }
    }
}

fn lat(l: Option<&Latency>, f: fn(&Latency) -> u64) -> String {
    l.map_or_else(|| "-".to_owned(), |l| human_ns(f(l)))
}

fn hop_name(r: &HopRow) -> String {
    format!("{} → {}:{}", r.source.display(), r.destination.display(), r.port)
}

fn pct(x: Option<f64>) -> String {
    x.map_or_else(|| "-".to_owned(), |x| format!("{:.1}%", x * 100.0))
}

/// Columns padded to their widest cell.
fn columns(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            let pad = w[i] - c.chars().count();
            // Names left-aligned, numbers right-aligned.
            if i < 2 {
                s.push_str(c);
                s.push_str(&" ".repeat(pad));
            } else {
                s.push_str(&" ".repeat(pad));
                s.push_str(c);
            }
            s.push_str("  ");
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.iter().map(|h| (*h).to_owned()).collect());
    for r in rows {
        out.push_str(&line(r.clone()));
    }
    out
}

/// The hop table.
#[must_use]
pub fn table(rows: &[HopRow]) -> String {
    let header = [
        "HOP", "PROTO", "REQ/S", "ERR%", "P50", "P90", "P99", "SRV P99", "CONN P99", "CONNS",
        "RETRANS", "DROPS",
    ];
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let client = r.client_latency.as_ref().or(r.server_latency.as_ref());
            vec![
                hop_name(r),
                r.protocol.clone(),
                format!("{:.2}", r.requests_per_second),
                pct(r.error_ratio),
                lat(client, |l| l.p50_ns),
                lat(client, |l| l.p90_ns),
                lat(client, |l| l.p99_ns),
                lat(r.server_latency.as_ref(), |l| l.p99_ns),
                lat(r.connect_latency.as_ref(), |l| l.p99_ns),
                r.connects.to_string(),
                r.retransmits.to_string(),
                r.drops_total.to_string(),
            ]
        })
        .collect();
    if cells.is_empty() {
        return "no hops in this window\n".to_owned();
    }
    columns(&header, &cells)
}

/// Paths, each as an indented tree of hops with shares.
#[must_use]
pub fn path_table(paths: &[Path]) -> String {
    if paths.is_empty() {
        return "no paths in this window\n".to_owned();
    }
    let mut out = String::new();
    for p in paths {
        let e2e = p.end_to_end.as_ref();
        let _ = writeln!(
            out,
            "PATH {}  end-to-end p50 {} p99 {}",
            p.entry,
            lat(e2e, |l| l.p50_ns),
            lat(e2e, |l| l.p99_ns)
        );
        let cells: Vec<Vec<String>> = p
            .steps
            .iter()
            .map(|s| {
                let l = s.hop.client_latency.as_ref().or(s.hop.server_latency.as_ref());
                vec![
                    format!("{}{}", "  ".repeat(s.depth + 1), hop_name(&s.hop)),
                    s.hop.protocol.clone(),
                    format!("{:.2}", s.hop.requests_per_second),
                    lat(l, |l| l.p50_ns),
                    lat(l, |l| l.p99_ns),
                    pct(s.share),
                    pct(s.self_share),
                    s.calls_per_request.map_or_else(|| "-".to_owned(), |c| format!("{c:.2}")),
                ]
            })
            .collect();
        out.push_str(&columns(
            &["HOP", "PROTO", "REQ/S", "P50", "P99", "SHARE", "SELF", "CALLS/REQ"],
            &cells,
        ));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hops::testing::*;

    #[test]
    fn json_lines_from_observe_and_hubble_decode_to_flows() {
        let f = l7(APP, DB, T0, 12 * MS, false, "");
        let resp = GetFlowsResponse {
            response_types: Some(crate::proto::observer::get_flows_response::ResponseTypes::Flow(
                f.clone(),
            )),
            ..GetFlowsResponse::default()
        };
        let line = resp.to_json();
        let back = flow_from_json(&line).unwrap().unwrap();
        assert_eq!(back, f);
        // Hubble prints fields hopwatch does not model; they are skipped, not fatal.
        let hubble = r#"{"flow":{"time":"2026-11-23T16:00:00Z","verdict":"FORWARDED","trace_observation_point":"TO_ENDPOINT","IP":{"source":"10.0.0.1","destination":"10.0.0.2"}},"node_name":"n"}"#;
        let f = flow_from_json(hubble).unwrap().unwrap();
        assert_eq!(f.ip.unwrap().destination, "10.0.0.2");
        assert_eq!(flow_from_json(r#"{"lost_events":{"num_events_lost":3}}"#), Ok(None));
        assert!(flow_from_json("not json").is_err());
    }

    #[test]
    fn since_takes_durations_and_times() {
        assert_eq!(parse_since("5m"), Ok(Since::Ago(Duration::from_mins(5))));
        assert_eq!(parse_since("1970-01-01T00:00:10Z"), Ok(Since::At(10_000_000_000)));
        assert!(parse_since("yesterday").unwrap_err().contains("RFC 3339"));
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
