//! The one printer of flow streams, for the agent's stdout and for `observe`, with the formats
//! of `hubble observe`: `compact` (one line per flow), `dict` (a block of `KEY: value` lines per
//! flow), `table` (aligned columns), `json` (one `GetFlowsResponse` per line with protobuf field
//! names, as `hubble observe -o json`) and `jsonpb` (canonical proto3 JSON of each response).
//!
//! Flows are built and stored without their one-line summary (Hubble's `Summary`); the printer
//! fills it in when it is missing, so a flow reads the same whoever prints it.

pub(crate) mod summary;
pub(crate) mod time;

use std::{
    fmt::Write as _,
    io::{self, Write},
};

use hopwatch_proto::{
    flow::{Flow, L7FlowType, LostEvent, SocketEvent, Verdict, layer4::Protocol},
    observer::{GetFlowsResponse, get_flows_response::ResponseTypes},
    relay::{NodeState, NodeStatusEvent},
};

pub(crate) use self::summary::{human_ns, summary};
use self::time::TimeFormat;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One line per flow.
    Compact,
    /// A block of `KEY: value` lines per flow.
    Dict,
    /// Aligned columns.
    Table,
    /// One `GetFlowsResponse` per line (protobuf field names, as `hubble observe -o json`).
    Json,
    /// One `GetFlowsResponse` per line in canonical proto3 JSON (camelCase, 64-bit as strings).
    Jsonpb,
    /// Nothing (the agent as a daemon: flows still go to the collector and the metrics).
    None,
}

/// How a printer lays out what it prints.
#[derive(Debug, Clone, Copy)]
#[expect(clippy::struct_excessive_bools, reason = "independent output options")]
pub struct Options {
    pub format: Format,
    pub time: TimeFormat,
    /// A node name column (`[node]` in compact lines).
    pub node: bool,
    pub color: bool,
    /// Rows are printed as they come instead of aligned at the end (`table`).
    pub follow: bool,
    /// Addresses, not pod names (`observe --numeric`).
    pub numeric: bool,
    /// No notices on standard error (`observe --silent-errors`).
    pub quiet: bool,
    /// Fill in a missing summary (not when `observe --field-mask` left it out).
    pub summary: bool,
}

impl Options {
    /// How the agent (and `replay`) print: node names on every line, rows as they come, no
    /// colour.
    pub fn streaming(format: Format) -> Self {
        Self {
            format,
            time: TimeFormat::StampMilli,
            node: true,
            color: false,
            follow: true,
            numeric: false,
            quiet: false,
            summary: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Color {
    /// When stdout is a terminal (and `NO_COLOR` is not set).
    Auto,
    Always,
    Never,
}

impl Color {
    pub(crate) fn enabled(self) -> bool {
        use std::io::IsTerminal as _;
        match self {
            Color::Always => true,
            Color::Never => false,
            Color::Auto => {
                std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
            }
        }
    }
}

#[expect(clippy::struct_excessive_bools, reason = "independent output options")]
pub struct Printer<W: Write> {
    out: W,
    format: Format,
    time: TimeFormat,
    node: bool,
    color: bool,
    follow: bool,
    numeric: bool,
    quiet: bool,
    summary: bool,
    rows: Vec<Vec<(String, Option<&'static str>)>>,
    widths: Vec<usize>,
    header_done: bool,
    flows_seen: bool,
}

const GREEN: &str = "\x1b[32m";
const RED: &str = "\x1b[31m";
const YELLOW: &str = "\x1b[33m";
const RESET: &str = "\x1b[0m";

fn verdict_color(v: Verdict) -> Option<&'static str> {
    match v {
        Verdict::Forwarded | Verdict::Redirected | Verdict::Translated => Some(GREEN),
        Verdict::Dropped | Verdict::Error => Some(RED),
        Verdict::Audit => Some(YELLOW),
        _ => None,
    }
}

impl<W: Write> Printer<W> {
    pub fn new(out: W, options: Options) -> Self {
        let Options { format, time, node, color, follow, numeric, quiet, summary } = options;
        Self {
            out,
            format,
            time,
            node,
            color,
            follow,
            numeric,
            quiet,
            summary,
            rows: Vec::new(),
            widths: Vec::new(),
            header_done: false,
            flows_seen: false,
        }
    }

    fn paint(&self, s: &str, c: Option<&'static str>) -> String {
        match c {
            Some(c) if self.color => format!("{c}{s}{RESET}"),
            _ => s.to_owned(),
        }
    }

    /// Writes one response; returns the write error (e.g. a closed pipe). Fills in a flow's
    /// missing summary first.
    pub fn write(&mut self, resp: &mut GetFlowsResponse) -> io::Result<()> {
        if self.format == Format::None {
            return Ok(());
        }
        if let Some(ResponseTypes::Flow(f)) = &mut resp.response_types
            && f.summary.is_empty()
            && self.summary
        {
            f.summary = summary(f);
        }
        if let Some(ResponseTypes::NodeStatus(n)) = &resp.response_types {
            // A stream opens with who is connected; say only what deserves attention: nodes
            // that are unavailable, and changes while following.
            if n.state_change() == NodeState::NodeConnected && !self.flows_seen {
                return Ok(());
            }
            return match self.format {
                Format::Json => writeln!(self.out, "{}", resp.to_json()),
                Format::Jsonpb => writeln!(self.out, "{}", resp.to_jsonpb()),
                Format::None => Ok(()),
                _ => {
                    self.flush_rows()?;
                    self.out.flush()?;
                    if !self.quiet {
                        eprintln!("{}", compact_node_status(n));
                    }
                    Ok(())
                }
            };
        }
        if matches!(resp.response_types, Some(ResponseTypes::Flow(_))) {
            self.flows_seen = true;
        }
        match self.format {
            Format::Json => return writeln!(self.out, "{}", resp.to_json()),
            Format::Jsonpb => return writeln!(self.out, "{}", resp.to_jsonpb()),
            _ => {}
        }
        match &resp.response_types {
            Some(ResponseTypes::Flow(f)) => self.flow(f),
            Some(ResponseTypes::LostEvents(l)) => {
                let line = self.paint(&compact_lost(l), Some(YELLOW));
                self.flush_rows()?;
                writeln!(self.out, "{line}")
            }
            Some(ResponseTypes::NodeStatus(_)) | None => Ok(()),
        }
    }

    fn flow(&mut self, f: &Flow) -> io::Result<()> {
        let ts = f.time.as_ref().map_or_else(|| "-".to_owned(), |t| time::format(t, self.time));
        let (src, dst) = (endpoint(f, true, self.numeric), endpoint(f, false, self.numeric));
        let kind = type_name(f);
        let verdict = f.verdict();
        let summary = &f.summary;
        match self.format {
            Format::Compact => {
                let node = if self.node { format!(" [{}]", f.node_name) } else { String::new() };
                let v = self.paint(verdict.as_str_name(), verdict_color(verdict));
                let sep = if summary.is_empty() { "" } else { " " };
                writeln!(self.out, "{ts}{node}: {src} -> {dst} {kind} {v}{sep}{summary}")
            }
            Format::Dict => {
                writeln!(self.out, "------------")?;
                writeln!(self.out, "  TIMESTAMP: {ts}")?;
                if self.node {
                    writeln!(self.out, "       NODE: {}", f.node_name)?;
                }
                writeln!(self.out, "     SOURCE: {src}")?;
                writeln!(self.out, "DESTINATION: {dst}")?;
                writeln!(self.out, "       TYPE: {kind}")?;
                let v = self.paint(verdict.as_str_name(), verdict_color(verdict));
                writeln!(self.out, "    VERDICT: {v}")?;
                writeln!(self.out, "    SUMMARY: {summary}")
            }
            Format::Table => {
                let mut row = vec![(ts, None)];
                if self.node {
                    row.push((f.node_name.clone(), None));
                }
                row.extend([
                    (src, None),
                    (dst, None),
                    (kind, None),
                    (verdict.as_str_name().to_owned(), verdict_color(verdict)),
                    (summary.clone(), None),
                ]);
                self.rows.push(row);
                if self.follow { self.flush_rows() } else { Ok(()) }
            }
            Format::Json | Format::Jsonpb | Format::None => unreachable!("handled above"),
        }
    }

    fn header(&self) -> Vec<&'static str> {
        let mut h = vec!["TIMESTAMP"];
        if self.node {
            h.push("NODE");
        }
        h.extend(["SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY"]);
        h
    }

    /// Prints buffered table rows (aligned to the widest cell so far).
    fn flush_rows(&mut self) -> io::Result<()> {
        if self.format != Format::Table || (self.rows.is_empty() && self.header_done) {
            return Ok(());
        }
        let header = self.header();
        self.widths.resize(header.len(), 0);
        for (w, h) in self.widths.iter_mut().zip(&header) {
            *w = (*w).max(h.len());
        }
        for row in &self.rows {
            for (w, (cell, _)) in self.widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let last = header.len() - 1;
        if !self.header_done {
            let mut line = String::new();
            for (i, h) in header.iter().enumerate() {
                if i == last {
                    line.push_str(h);
                } else {
                    let _ = write!(line, "{h:<w$}   ", w = self.widths[i]);
                }
            }
            writeln!(self.out, "{}", line.trim_end())?;
            self.header_done = true;
        }
        for row in std::mem::take(&mut self.rows) {
            let mut line = String::new();
            for (i, (cell, color)) in row.iter().enumerate() {
                let pad = if i == last {
                    0
                } else {
                    self.widths[i].saturating_sub(cell.chars().count()) + 3
                };
                line.push_str(&self.paint(cell, *color));
                line.push_str(&" ".repeat(pad));
            }
            writeln!(self.out, "{}", line.trim_end())?;
        }
        Ok(())
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.flush_rows()?;
        self.out.flush()
    }
}

/// `ns/pod:port (comm:pid)`, or the address when no pod is known or `numeric`.
fn endpoint(f: &Flow, source: bool, numeric: bool) -> String {
    let ep = if source { f.source.as_ref() } else { f.destination.as_ref() };
    let ip = f.ip.as_ref().map(|ip| if source { &ip.source } else { &ip.destination });
    let port = f.ports().map(|(s, d)| if source { s } else { d });
    let base = match ep.filter(|e| !e.pod_name.is_empty() && !numeric) {
        Some(e) if e.namespace.is_empty() => e.pod_name.clone(),
        Some(e) => format!("{}/{}", e.namespace, e.pod_name),
        None => ip.cloned().unwrap_or_else(|| "?".to_owned()),
    };
    let mut s = match port {
        Some(p) if base.contains(':') => format!("[{base}]:{p}"),
        Some(p) => format!("{base}:{p}"),
        None => base,
    };
    let process = if source { f.source_process.as_ref() } else { f.destination_process.as_ref() };
    if let Some(p) = process {
        let _ = write!(s, " ({}:{})", p.comm, p.pid);
    }
    s
}

fn l4_name(f: &Flow) -> &'static str {
    match f.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
        Some(Protocol::Tcp(_)) => "tcp",
        Some(Protocol::Udp(_)) => "udp",
        Some(Protocol::Sctp(_)) => "sctp",
        Some(Protocol::IcmPv4(_)) => "icmp",
        Some(Protocol::IcmPv6(_)) => "icmpv6",
        None => "ip",
    }
}

/// `http-request`, `postgres-response`, `tcp-connect`, `udp-drop`, ...
pub(crate) fn type_name(f: &Flow) -> String {
    if let Some(l7) = &f.l7 {
        let proto = f.l7_protocol().unwrap_or("l7");
        let kind = match l7.r#type() {
            L7FlowType::Request => "request",
            L7FlowType::Response => "response",
            L7FlowType::Sample => "sample",
            L7FlowType::UnknownL7Type => "exchange",
        };
        return format!("{proto}-{kind}");
    }
    if f.verdict() == Verdict::Dropped {
        return format!("{}-drop", l4_name(f));
    }
    match f.socket_event() {
        SocketEvent::Connect => "tcp-connect".into(),
        SocketEvent::ConnectFailed => "tcp-connect-failed".into(),
        SocketEvent::Accept => "tcp-accept".into(),
        SocketEvent::Close => "tcp-close".into(),
        SocketEvent::Update => "tcp-update".into(),
        SocketEvent::Unknown => l4_name(f).into(),
    }
}

/// `EVENTS LOST: PERF_EVENT_RING_BUFFER 42 events lost`
fn compact_lost(l: &LostEvent) -> String {
    format!("EVENTS LOST: {} {} events lost", l.source().as_str_name(), l.num_events_lost)
}

/// `NODE STATUS: NODE_UNAVAILABLE node-a, node-b (agent disconnected)`
fn compact_node_status(n: &NodeStatusEvent) -> String {
    let mut s =
        format!("NODE STATUS: {} {}", n.state_change().as_str_name(), n.node_names.join(", "));
    if !n.message.is_empty() {
        let _ = write!(s, " ({})", n.message);
    }
    s
}

#[cfg(test)]
mod tests;
