//! Traces assembled from flows (client side, from what the collector returns): each exchange's
//! span, its two ends, its children, and the waterfall `hopwatch trace` prints.

use std::{collections::BTreeMap, fmt::Write as _};

use hopwatch_proto::flow::{Endpoint, Flow, Process, TrafficDirection};

use crate::print::summary::{human_ns, l7_label};

/// Width of the waterfall's bar column.
const BAR: usize = 32;

/// One exchange of a trace, from the flows of its ends.
#[derive(Debug, Clone)]
pub(super) struct SpanView {
    pub id: String,
    pub parent: String,
    pub link: String,
    pub unlinked: String,
    /// What it was (`HTTP/1.1 GET /x → 200`).
    pub label: String,
    pub client: String,
    pub server: String,
    /// Wall-clock ns of the request and of the response, at the end that saw the most of it
    /// (the client's, when on a node hopwatch runs on).
    pub start_ns: u64,
    pub end_ns: u64,
    pub client_ns: Option<u64>,
    pub server_ns: Option<u64>,
    pub error: String,
}

/// A trace: its spans in waterfall order (depth-first, children by start time) with depths.
#[derive(Debug, Clone)]
pub(super) struct Trace {
    pub id: String,
    pub spans: Vec<(usize, SpanView)>,
}

impl Trace {
    /// The traces of `flows` (L7 flows carrying a trace id and a span), largest first by
    /// duration.
    pub(super) fn from_flows(flows: &[Flow]) -> Vec<Trace> {
        let mut by_trace: BTreeMap<&str, BTreeMap<&str, Vec<&Flow>>> = BTreeMap::new();
        for f in flows {
            let Some(trace) = f.trace_context.as_ref().and_then(|t| t.parent.as_ref()) else {
                continue;
            };
            let Some(span) = f.l7.as_ref().and_then(|l| l.span.as_ref()) else { continue };
            by_trace
                .entry(trace.trace_id.as_str())
                .or_default()
                .entry(span.span_id.as_str())
                .or_default()
                .push(f);
        }
        let mut out: Vec<Trace> = by_trace
            .into_iter()
            .map(|(id, spans)| {
                let views: Vec<SpanView> = spans.values().filter_map(|ends| view(ends)).collect();
                Trace { id: id.to_owned(), spans: order(views) }
            })
            .collect();
        out.sort_by_key(|t| std::cmp::Reverse(t.duration_ns()));
        out
    }

    pub(super) fn start_ns(&self) -> u64 {
        self.spans.iter().map(|(_, s)| s.start_ns).min().unwrap_or(0)
    }

    pub(super) fn duration_ns(&self) -> u64 {
        let end = self.spans.iter().map(|(_, s)| s.end_ns).max().unwrap_or(0);
        end.saturating_sub(self.start_ns())
    }

    /// The first exchange (the trace's entry).
    pub(super) fn root(&self) -> Option<&SpanView> {
        self.spans.first().map(|(_, s)| s)
    }

    /// Hops (distinct client → server pairs).
    fn hops(&self) -> usize {
        let mut hops: Vec<(&str, &str)> =
            self.spans.iter().map(|(_, s)| (s.client.as_str(), s.server.as_str())).collect();
        hops.sort_unstable();
        hops.dedup();
        hops.len()
    }

    /// The waterfall: one line per exchange, indented under the exchange it was made for, with
    /// its offset, its client- and server-side times, its share of the trace and a bar.
    pub(super) fn waterfall(&self) -> String {
        let (start, total) = (self.start_ns(), self.duration_ns().max(1));
        let mut out = format!(
            "trace {}: {} exchanges over {} hops, {}\n\n",
            self.id,
            self.spans.len(),
            self.hops(),
            human_ns(total)
        );
        let _ = writeln!(
            out,
            "{:>9} {:>9} {:>9} {:>5}  {:<w$}  exchange",
            "offset",
            "client",
            "server",
            "share",
            "",
            w = BAR
        );
        let children = |id: &str| self.spans.iter().filter(|(_, s)| s.parent == id).count();
        for (depth, s) in &self.spans {
            let offset = s.start_ns.saturating_sub(start);
            let took = s.end_ns.saturating_sub(s.start_ns);
            let opt = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), human_ns);
            let mut what =
                format!("{}{}  {} → {}", "  ".repeat(*depth), s.label, s.client, s.server);
            if !s.error.is_empty() {
                let _ = write!(what, " [{}]", s.error);
            }
            match children(&s.id) {
                0 => {}
                1 => what.push_str("  (1 call)"),
                n => {
                    let _ = write!(what, "  ({n} calls)");
                }
            }
            if !s.link.is_empty() {
                let _ = write!(what, "  via {}", s.link);
            }
            if !s.unlinked.is_empty() {
                let _ = write!(what, "  (parent {})", s.unlinked);
            }
            let _ = writeln!(
                out,
                "{:>9} {:>9} {:>9} {:>4}%  {}  {what}",
                human_ns(offset),
                opt(s.client_ns),
                opt(s.server_ns),
                share(took, total),
                bar(offset, took, total),
            );
        }
        out
    }
}

/// The slowest traces, one line each.
pub(super) fn slowest(traces: &[Trace], n: usize) -> String {
    let mut out = format!("{:<32}  {:>9}  {:>5}  entry\n", "trace", "duration", "spans");
    for t in traces.iter().take(n) {
        let entry = t
            .root()
            .map_or_else(String::new, |r| format!("{}  {} → {}", r.label, r.client, r.server));
        let _ = writeln!(
            out,
            "{:<32}  {:>9}  {:>5}  {entry}",
            t.id,
            human_ns(t.duration_ns()),
            t.spans.len()
        );
    }
    out
}

#[expect(clippy::cast_precision_loss, reason = "a rounded percentage")]
fn share(part: u64, total: u64) -> String {
    format!("{:.0}", part as f64 * 100.0 / total as f64)
}

/// `|   ████      |`: where in the trace the exchange ran.
fn bar(offset: u64, took: u64, total: u64) -> String {
    let scale =
        |ns: u64| usize::try_from(u128::from(ns) * BAR as u128 / u128::from(total)).unwrap_or(BAR);
    let from = scale(offset).min(BAR - 1);
    let len = scale(took).clamp(1, BAR - from);
    format!("{}{}{}", " ".repeat(from), "█".repeat(len), " ".repeat(BAR - from - len))
}

/// Spans in waterfall order: roots (no parent in the trace) by start, each followed by its
/// children, depth first.
fn order(mut spans: Vec<SpanView>) -> Vec<(usize, SpanView)> {
    spans.sort_by_key(|s| s.start_ns);
    let ids: Vec<String> = spans.iter().map(|s| s.id.clone()).collect();
    let mut out = Vec::with_capacity(spans.len());
    let mut taken = vec![false; spans.len()];
    let roots: Vec<usize> = (0..spans.len()).filter(|&i| !ids.contains(&spans[i].parent)).collect();
    let mut stack: Vec<(usize, usize)> = roots.into_iter().rev().map(|i| (0, i)).collect();
    while let Some((depth, i)) = stack.pop() {
        if std::mem::replace(&mut taken[i], true) {
            continue;
        }
        let id = spans[i].id.clone();
        for c in (0..spans.len()).rev().filter(|&c| spans[c].parent == id && !taken[c]) {
            stack.push((depth + 1, c));
        }
        out.push((depth, spans[i].clone()));
    }
    out
}

/// The span of one exchange from the flows of its ends.
fn view(ends: &[&Flow]) -> Option<SpanView> {
    let side = |d: TrafficDirection| ends.iter().copied().find(|f| f.traffic_direction() == d);
    let (client, server) = (side(TrafficDirection::Egress), side(TrafficDirection::Ingress));
    let main = client.or(server)?;
    let l7 = main.l7.as_ref()?;
    let span = l7.span.as_ref()?;
    let end_ns = main.time.as_ref().map_or(0, |t| {
        u64::try_from(t.seconds).unwrap_or(0) * 1_000_000_000 + u64::try_from(t.nanos).unwrap_or(0)
    });
    let latency = |f: Option<&Flow>| f.and_then(|f| f.l7.as_ref()).map(|l| l.latency_ns);
    let (client_ns, server_ns) = (latency(client), latency(server));
    let end = |e: Option<&Endpoint>, p: Option<&Process>, ip: Option<&str>| {
        e.filter(|e| !e.pod_name.is_empty())
            .map(|e| e.pod_name.clone())
            .or_else(|| p.filter(|p| !p.comm.is_empty()).map(|p| p.comm.clone()))
            .unwrap_or_else(|| ip.unwrap_or("?").to_owned())
    };
    let ip = main.ip.as_ref();
    Some(SpanView {
        id: span.span_id.clone(),
        parent: ends.iter().find_map(|f| non_empty(f, |s| &s.parent_span_id)).unwrap_or_default(),
        link: ends.iter().find_map(|f| non_empty(f, |s| &s.link)).unwrap_or_default(),
        unlinked: ends.iter().find_map(|f| non_empty(f, |s| &s.unlinked)).unwrap_or_default(),
        label: l7_label(l7),
        client: end(
            main.source.as_ref(),
            main.source_process.as_ref(),
            ip.map(|i| i.source.as_str()),
        ),
        server: end(
            main.destination.as_ref(),
            main.destination_process.as_ref(),
            ip.map(|i| i.destination.as_str()),
        ),
        start_ns: end_ns.saturating_sub(l7.latency_ns),
        end_ns,
        client_ns,
        server_ns,
        error: l7.error.clone(),
    })
}

fn non_empty(f: &Flow, field: impl Fn(&hopwatch_proto::flow::Span) -> &String) -> Option<String> {
    let s = f.l7.as_ref()?.span.as_ref()?;
    Some(field(s).clone()).filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use hopwatch_proto::flow::{Layer7, Span, TraceContext, TraceParent, layer7::Record};

    use super::*;

    fn flow(span: &str, parent: &str, dir: TrafficDirection, end_ms: u64, took_ms: u64) -> Flow {
        Flow {
            time: Some(prost_types::Timestamp {
                seconds: 1_000,
                nanos: i32::try_from(end_ms * 1_000_000).unwrap(),
            }),
            traffic_direction: dir.into(),
            trace_context: Some(TraceContext {
                parent: Some(TraceParent { trace_id: "ab".repeat(16) }),
            }),
            source_process: Some(Process { comm: format!("c{span}"), ..Process::default() }),
            destination_process: Some(Process { comm: format!("s{span}"), ..Process::default() }),
            l7: Some(Layer7 {
                latency_ns: took_ms * 1_000_000,
                record: Some(Record::Redis(hopwatch_proto::flow::Redis {
                    command: format!("CMD{span}"),
                    ..Default::default()
                })),
                span: Some(Span {
                    span_id: span.to_owned(),
                    parent_span_id: parent.to_owned(),
                    link: if parent.is_empty() { String::new() } else { "thread".into() },
                    unlinked: String::new(),
                }),
                ..Layer7::default()
            }),
            ..Flow::default()
        }
    }

    #[test]
    fn a_trace_is_a_tree_of_exchanges_with_both_ends_times() {
        use TrafficDirection::{Egress, Ingress};
        let flows = [
            flow("2", "1", Egress, 40, 10),
            flow("2", "1", Ingress, 39, 8),
            flow("3", "1", Egress, 80, 20),
            flow("1", "", Egress, 100, 100),
            flow("4", "2", Egress, 38, 2),
        ];
        let traces = Trace::from_flows(&flows);
        assert_eq!(traces.len(), 1);
        let t = &traces[0];
        let order: Vec<(usize, &str)> = t.spans.iter().map(|(d, s)| (*d, s.id.as_str())).collect();
        assert_eq!(order, [(0, "1"), (1, "2"), (2, "4"), (1, "3")]);
        assert_eq!(t.duration_ns(), 100_000_000);
        let two = &t.spans[1].1;
        assert_eq!((two.client_ns, two.server_ns), (Some(10_000_000), Some(8_000_000)));
        let w = t.waterfall();
        assert!(w.contains("4 exchanges over 4 hops, 100.0ms"), "{w}");
        assert!(w.contains("  Redis CMD2  c2 → s2  (1 call)  via thread"), "{w}");
        assert!(w.contains("10.0ms     8.0ms   10%"), "{w}");
        let slow = slowest(&traces, 5);
        assert!(slow.contains("Redis CMD1  c1 → s1"), "{slow}");
    }
}
