//! Hops chained into paths, upstream to downstream: ingress → app → database. A hop B continues
//! hop A when B's client is A's server (the middle endpoint). Each path starts at a hop whose
//! client is nobody's server (an entry point).
//!
//! Shares are of time, not of quantiles: the total time callers waited on a hop over the window
//! (mean latency × requests, i.e. the histogram's sum) divided by the total time waited on the
//! path's first hop. With synchronous calls that is exactly the part of the end-to-end latency
//! spent in that hop; the rest of an intermediate hop's time is its own processing ("self").
//! Fan-out in parallel can make children add up to more than their parent.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use super::view::{HopRow, Latency};

/// Deepest chain followed (a guard against long cycles of identities).
const MAX_DEPTH: usize = 16;

#[derive(Debug, Clone, Serialize)]
pub struct PathStep {
    /// 0 for the entry hop, 1 for the hops it calls, ...
    pub depth: usize,
    pub hop: HopRow,
    /// This hop's time over the entry hop's time.
    pub share: Option<f64>,
    /// For a hop that calls others: the part of the entry hop's time spent in this hop's server
    /// itself (its time minus its downstream hops' time).
    pub self_share: Option<f64>,
    /// Requests on this hop per request on the hop above it.
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

fn end_key(e: &super::view::EndpointView) -> (&str, &str) {
    (e.namespace.as_str(), e.name.as_str())
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

/// The paths through `rows`, largest entry-hop time first. Every row appears in at least one
/// path (hops no entry point reaches start their own).
#[must_use]
pub fn paths(rows: &[HopRow]) -> Vec<Path> {
    let mut by_client: HashMap<(&str, &str), Vec<usize>> = HashMap::new();
    let mut servers: HashSet<(&str, &str)> = HashSet::new();
    for (i, r) in rows.iter().enumerate() {
        by_client.entry(end_key(&r.source)).or_default().push(i);
        if r.source != r.destination {
            servers.insert(end_key(&r.destination));
        }
    }
    let order = |v: &mut Vec<usize>| {
        v.sort_by(|&a, &b| {
            hop_time(&rows[b])
                .cmp(&hop_time(&rows[a]))
                .then(rows[b].requests.cmp(&rows[a].requests))
                .then(a.cmp(&b))
        });
    };
    for v in by_client.values_mut() {
        order(v);
    }
    let mut entries: Vec<usize> =
        (0..rows.len()).filter(|&i| !servers.contains(&end_key(&rows[i].source))).collect();
    order(&mut entries);

    let mut covered = vec![false; rows.len()];
    let mut out = Vec::new();
    let build = |entry: usize, covered: &mut Vec<bool>| {
        let mut steps = Vec::new();
        let mut on_path = HashSet::new();
        walk(rows, &by_client, entry, None, 0, hop_time(&rows[entry]), &mut on_path, &mut steps);
        for (_, i) in &steps {
            covered[*i] = true;
        }
        let root = &rows[entry];
        Path {
            entry: format!(
                "{} → {}:{}",
                root.source.display(),
                root.destination.display(),
                root.port
            ),
            end_to_end: root.client_latency.or(root.server_latency),
            steps: steps.into_iter().map(|(step, _)| step).collect(),
        }
    };
    for e in entries {
        out.push(build(e, &mut covered));
    }
    // Hops only reachable through a cycle: start a path at each one not shown yet.
    let mut rest: Vec<usize> = (0..rows.len()).collect();
    order(&mut rest);
    for i in rest {
        if !covered[i] {
            out.push(build(i, &mut covered));
        }
    }
    out
}

#[expect(clippy::too_many_arguments, reason = "a recursive walk's state")]
fn walk(
    rows: &[HopRow],
    by_client: &HashMap<(&str, &str), Vec<usize>>,
    i: usize,
    parent: Option<usize>,
    depth: usize,
    root_time: Option<u128>,
    on_path: &mut HashSet<usize>,
    steps: &mut Vec<(PathStep, usize)>,
) {
    let r = &rows[i];
    on_path.insert(i);
    let children: Vec<usize> = if depth + 1 >= MAX_DEPTH {
        Vec::new()
    } else {
        by_client
            .get(&end_key(&r.destination))
            .map(|v| v.iter().copied().filter(|c| !on_path.contains(c)).collect())
            .unwrap_or_default()
    };
    let time = hop_time(r);
    let share = match (time, root_time) {
        (Some(t), Some(root)) => Some(ratio(t, root)),
        _ => None,
    };
    let children_time: u128 = children.iter().filter_map(|&c| hop_time(&rows[c])).sum();
    let self_share = match (time, root_time) {
        (Some(t), Some(root)) if !children.is_empty() => {
            Some(ratio(t.saturating_sub(children_time), root))
        }
        _ => None,
    };
    let calls_per_request = parent.and_then(|p| {
        let up = rows[p].requests;
        #[expect(clippy::cast_precision_loss, reason = "a ratio for display")]
        let calls = (up > 0).then(|| r.requests as f64 / up as f64);
        calls
    });
    steps.push((PathStep { depth, hop: r.clone(), share, self_share, calls_per_request }, i));
    for c in children {
        walk(rows, by_client, c, Some(i), depth + 1, root_time, on_path, steps);
    }
    on_path.remove(&i);
}
