//! Hops chained into paths, upstream to downstream: ingress → app → database. A hop B continues
//! hop A when requests on A really called B:
//!
//! - the tracer linked B's exchanges to A's ([`links`](crate::links): thread causality, a
//!   propagated id): B goes under A and no other hop (`via: link`);
//! - without links for B, B's client is A's server and that endpoint names a workload, pod,
//!   container or process (`via: endpoint`). An endpoint that is only an address (or a DNS name)
//!   chains nothing: unrelated processes share `127.0.0.1`, and a refused connect to one port does
//!   not call a UDP drop to another.
//!
//! Each path starts at a hop nothing calls (an entry point).
//!
//! Shares are of time, not of quantiles: the total time callers waited on a hop over the window
//! (mean latency × requests, i.e. the histogram's sum) divided by the total time waited on the
//! path's first hop. With synchronous calls that is exactly the part of the end-to-end latency
//! spent in that hop; the rest of an intermediate hop's time is its own processing ("self"). A
//! linked hop's time counts the part of its exchanges linked to the hop above. Fan-out in parallel
//! can make children add up to more than their parent.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use super::{
    Kind,
    links::LinkEdge,
    view::{EndpointView, HopRow, Latency, endpoint},
};

/// Deepest chain followed (a guard against long cycles of identities).
const MAX_DEPTH: usize = 16;

/// How a step joins the hop above it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    /// The path's first hop.
    Entry,
    /// The tracer linked this hop's exchanges to the hop above's.
    Link,
    /// No links: this hop's client is the hop above's server, a named workload or process.
    Endpoint,
}

#[derive(Debug, Clone, Serialize)]
pub struct PathStep {
    /// 0 for the entry hop, 1 for the hops it calls, ...
    pub depth: usize,
    pub hop: HopRow,
    pub via: Via,
    /// With `via: link`: this hop's exchanges linked to the hop above, by link method ("thread",
    /// "header:x-request-id").
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub links: BTreeMap<String, u64>,
    /// This hop's time over the entry hop's time.
    pub share: Option<f64>,
    /// For a hop that calls others: the part of the entry hop's time spent in this hop's server
    /// itself (its time minus its downstream hops' time).
    pub self_share: Option<f64>,
    /// Requests on this hop per request on the hop above it (linked requests when linked).
    pub calls_per_request: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Path {
    /// `client → server:port` of the entry hop.
    pub entry: String,
    /// Latency of the entry hop: what the path's client waited.
    pub end_to_end: Option<Latency>,
    pub steps: Vec<PathStep>,
}

/// Endpoints that name one program: chaining through them is chaining through the same code.
fn names_a_program(e: &EndpointView) -> bool {
    matches!(e.kind, Kind::Workload | Kind::Pod | Kind::Container | Kind::Process)
}

/// Total time waited on a hop: the client's measurement when there is one (it includes the
/// network), else the server's.
fn hop_time(r: &HopRow) -> Option<u128> {
    r.client_latency.as_ref().or(r.server_latency.as_ref()).map(|l| l.sum_ns).filter(|t| *t > 0)
}

#[expect(clippy::cast_precision_loss, reason = "ratios for display")]
fn ratio(a: u128, b: u128) -> f64 {
    a as f64 / b as f64
}

/// A hop called by another.
#[derive(Debug)]
struct Call<'a> {
    row: usize,
    via: Via,
    /// Linked exchanges (with `Via::Link`), by method.
    linked: u64,
    methods: Option<&'a BTreeMap<String, u64>>,
}

/// Time callers waited on `call`'s hop for the hop above: its linked part when linked.
fn call_time(rows: &[HopRow], call: &Call<'_>) -> Option<u128> {
    let r = &rows[call.row];
    let t = hop_time(r)?;
    if call.via == Via::Link && call.linked < r.requests {
        Some(t * u128::from(call.linked) / u128::from(r.requests))
    } else {
        Some(t)
    }
}

/// Who calls whom among the rows.
struct Graph<'a> {
    rows: &'a [HopRow],
    calls: Vec<Vec<Call<'a>>>,
}

impl<'a> Graph<'a> {
    fn new(rows: &'a [HopRow], links: &'a [LinkEdge]) -> Self {
        let index: HashMap<(EndpointView, EndpointView, u32, &str), usize> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| ((r.source.clone(), r.destination.clone(), r.port, r.transport), i))
            .collect();
        let row_of = |k: &super::HopKey| {
            let id = (endpoint(&k.source), endpoint(&k.destination), k.port, k.transport.as_str());
            index.get(&id).copied()
        };
        let mut calls: Vec<Vec<Call<'a>>> = rows.iter().map(|_| Vec::new()).collect();
        let mut linked = vec![false; rows.len()];
        for e in links {
            let (Some(p), Some(c)) = (row_of(&e.parent), row_of(&e.child)) else { continue };
            if p != c {
                calls[p].push(Call {
                    row: c,
                    via: Via::Link,
                    linked: e.requests,
                    methods: Some(&e.methods),
                });
                linked[c] = true;
            }
        }
        // Hops without links, by client: callable through a named program.
        let mut by_client: HashMap<&EndpointView, Vec<usize>> = HashMap::new();
        for (i, r) in rows.iter().enumerate() {
            if !linked[i] && names_a_program(&r.source) {
                by_client.entry(&r.source).or_default().push(i);
            }
        }
        for (i, r) in rows.iter().enumerate() {
            for &c in by_client.get(&r.destination).into_iter().flatten() {
                if c != i {
                    calls[i].push(Call { row: c, via: Via::Endpoint, linked: 0, methods: None });
                }
            }
        }
        for v in &mut calls {
            v.sort_by(|a, b| {
                call_time(rows, b)
                    .cmp(&call_time(rows, a))
                    .then(rows[b.row].requests.cmp(&rows[a.row].requests))
                    .then(a.row.cmp(&b.row))
            });
        }
        Self { rows, calls }
    }

    fn time(&self, call: &Call<'_>) -> Option<u128> {
        call_time(self.rows, call)
    }

    /// Rows nothing else calls, largest time first.
    fn entries(&self) -> Vec<usize> {
        let mut called = vec![false; self.rows.len()];
        for (i, v) in self.calls.iter().enumerate() {
            for c in v.iter().filter(|c| c.row != i) {
                called[c.row] = true;
            }
        }
        let mut out: Vec<usize> = (0..self.rows.len()).filter(|&i| !called[i]).collect();
        self.order(&mut out);
        out
    }

    fn order(&self, v: &mut [usize]) {
        let rows = self.rows;
        v.sort_by(|&a, &b| {
            hop_time(&rows[b])
                .cmp(&hop_time(&rows[a]))
                .then(rows[b].requests.cmp(&rows[a].requests))
                .then(a.cmp(&b))
        });
    }
}

/// The paths through `rows`, largest entry-hop time first, chained along `links` (the tracer's
/// linked calls, [`Links::edges`](crate::links::Links::edges)) and, for hops without links,
/// through named programs. Every row appears in at least one path (hops no entry point reaches
/// start their own).
#[must_use]
pub fn paths(rows: &[HopRow], links: &[LinkEdge]) -> Vec<Path> {
    let g = Graph::new(rows, links);
    let mut covered = vec![false; rows.len()];
    let mut out = Vec::new();
    let build = |entry: usize, covered: &mut Vec<bool>| {
        let mut steps = Vec::new();
        let mut on_path = HashSet::new();
        let root = Call { row: entry, via: Via::Entry, linked: 0, methods: None };
        let mut walk = Walk { g: &g, root_time: hop_time(&rows[entry]), on_path: &mut on_path };
        walk.step(&root, None, 0, &mut steps);
        for (_, i) in &steps {
            covered[*i] = true;
        }
        let r = &rows[entry];
        Path {
            entry: format!("{} → {}:{}", r.source.display(), r.destination.display(), r.port),
            end_to_end: r.client_latency.or(r.server_latency),
            steps: steps.into_iter().map(|(step, _)| step).collect(),
        }
    };
    for e in g.entries() {
        out.push(build(e, &mut covered));
    }
    // Hops only reachable through a cycle: start a path at each one not shown yet.
    let mut rest: Vec<usize> = (0..rows.len()).collect();
    g.order(&mut rest);
    for i in rest {
        if !covered[i] {
            out.push(build(i, &mut covered));
        }
    }
    out
}

/// A walk down the calls from one entry.
struct Walk<'g, 'a> {
    g: &'g Graph<'a>,
    root_time: Option<u128>,
    on_path: &'g mut HashSet<usize>,
}

impl Walk<'_, '_> {
    fn step(
        &mut self,
        call: &Call<'_>,
        parent: Option<usize>,
        depth: usize,
        steps: &mut Vec<(PathStep, usize)>,
    ) {
        let g = self.g;
        let i = call.row;
        let r = &g.rows[i];
        self.on_path.insert(i);
        let children: Vec<&Call<'_>> = if depth + 1 >= MAX_DEPTH {
            Vec::new()
        } else {
            g.calls[i].iter().filter(|c| !self.on_path.contains(&c.row)).collect()
        };
        let time = g.time(call);
        let share = time.zip(self.root_time).map(|(t, root)| ratio(t, root));
        let children_time: u128 = children.iter().filter_map(|c| g.time(c)).sum();
        let self_share = time
            .zip(self.root_time)
            .filter(|_| !children.is_empty())
            .map(|(t, root)| ratio(t.saturating_sub(children_time), root));
        let calls_per_request = parent.and_then(|p| {
            let up = g.rows[p].requests;
            let calls = if call.via == Via::Link { call.linked } else { r.requests };
            #[expect(clippy::cast_precision_loss, reason = "a ratio for display")]
            let per = (up > 0).then(|| calls as f64 / up as f64);
            per
        });
        steps.push((
            PathStep {
                depth,
                hop: r.clone(),
                via: call.via,
                links: call.methods.cloned().unwrap_or_default(),
                share,
                self_share,
                calls_per_request,
            },
            i,
        ));
        for c in children {
            self.step(c, Some(i), depth + 1, steps);
        }
        self.on_path.remove(&i);
    }
}
