//! Traces across nodes. Each agent names the trace of what it sees: a request that crosses from
//! node A (nginx) to node B (the app) is, at B, a server end whose client is elsewhere, so B's
//! agent starts a trace there. Both ends of that exchange carry the same span id (a hash of the
//! connection's addresses and the exchange's index), so the collector that receives both joins
//! the two: B's trace continues A's ([`TraceJoin`]). Queries see one trace: a `trace_id` filter
//! matches the traces joined to it ([`TraceJoin::expand`]) and every flow leaves with the trace
//! id its trace was joined to ([`TraceJoin::canonical`]).
//!
//! Joins live in the collector's memory, bounded ([`ENDS_MAX`] exchange ends, [`JOINS_MAX`]
//! joins, oldest forgotten first), and are made by the collector that received both ends: with
//! several collectors behind one address, an exchange whose two ends went to different
//! collectors stays two traces.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use hopwatch_proto::{
    flow::{Flow, TrafficDirection},
    observer::{GetFlowsRequest, get_flows_response::ResponseTypes},
};

/// Exchange ends remembered (per side) while their other end may still arrive.
pub const ENDS_MAX: usize = 262_144;
/// Joins remembered.
pub const JOINS_MAX: usize = 65_536;
/// Joins followed from a trace to the one it continues (a request through this many nodes).
const CHAIN_MAX: usize = 16;

/// A FIFO-bounded map.
#[derive(Debug, Default)]
struct Bounded<K, V> {
    map: HashMap<K, V>,
    order: VecDeque<K>,
}

impl<K: std::hash::Hash + Eq + Copy, V> Bounded<K, V> {
    fn insert(&mut self, k: K, v: V, max: usize) {
        if self.map.insert(k, v).is_none() {
            self.order.push_back(k);
            while self.order.len() > max {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
        }
    }

    fn get(&self, k: &K) -> Option<&V> {
        self.map.get(k)
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// Span → the trace its client end is in.
    clients: Bounded<u64, u128>,
    /// Span → the trace its server end is in, for server ends that start no trace of a client
    /// on their node (their parent is unknown there).
    servers: Bounded<u64, u128>,
    /// Trace → the trace it continues.
    joins: Bounded<u128, u128>,
}

impl Inner {
    fn canonical(&self, mut t: u128) -> u128 {
        for _ in 0..CHAIN_MAX {
            match self.joins.get(&t) {
                Some(&up) => t = up,
                None => break,
            }
        }
        t
    }

    /// The client end of span `span` is in `trace`; true when that joined a trace.
    fn client_end(&mut self, span: u64, trace: u128) -> bool {
        if let Some(&server) = self.servers.get(&span) {
            return self.join(server, trace);
        }
        self.clients.insert(span, trace, ENDS_MAX);
        false
    }

    /// The server end of span `span` starts `trace` at its node; true when that joined a trace.
    fn server_root(&mut self, span: u64, trace: u128) -> bool {
        if let Some(&client) = self.clients.get(&span) {
            return self.join(trace, client);
        }
        self.servers.insert(span, trace, ENDS_MAX);
        false
    }

    /// `later` (a server end's trace) continues `earlier` (its client end's); false when that
    /// says nothing new (one trace already) or would make a loop.
    fn join(&mut self, later: u128, earlier: u128) -> bool {
        if later == earlier || self.canonical(earlier) == later || self.joins.get(&later).is_some()
        {
            return false;
        }
        self.joins.insert(later, earlier, JOINS_MAX);
        true
    }
}

/// The joins of traces across nodes.
#[derive(Debug, Default)]
pub struct TraceJoin {
    inner: RwLock<Inner>,
    /// Joins made since the collector started (read without the lock: none yet means flows
    /// leave untouched).
    joined: AtomicU64,
}

fn parse_trace(s: &str) -> Option<u128> {
    (s.len() == 32).then(|| u128::from_str_radix(s, 16).ok()).flatten()
}

fn trace_of(f: &Flow) -> Option<u128> {
    parse_trace(&f.trace_context.as_ref()?.parent.as_ref()?.trace_id)
}

fn hex_trace(t: u128) -> String {
    format!("{t:032x}")
}

impl TraceJoin {
    /// Learns from a batch of events as they are accepted.
    pub fn observe<'a>(&self, flows: impl IntoIterator<Item = &'a Flow>) {
        let mut inner = None;
        for f in flows {
            let Some(span) = f.l7.as_ref().and_then(|l| l.span.as_ref()) else { continue };
            let (Some(trace), Ok(id)) = (trace_of(f), u64::from_str_radix(&span.span_id, 16))
            else {
                continue;
            };
            let inner = inner.get_or_insert_with(|| {
                self.inner.write().unwrap_or_else(std::sync::PoisonError::into_inner)
            });
            let joined = match f.traffic_direction() {
                TrafficDirection::Egress => inner.client_end(id, trace),
                TrafficDirection::Ingress if span.parent_span_id.is_empty() => {
                    inner.server_root(id, trace)
                }
                _ => false,
            };
            if joined {
                self.joined.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The trace `trace_id` was joined to (itself when it was not).
    pub fn canonical(&self, trace_id: &str) -> Option<String> {
        if self.joined() == 0 {
            return None;
        }
        let t = parse_trace(trace_id)?;
        let c = self.read().canonical(t);
        (c != t).then(|| hex_trace(c))
    }

    /// Every trace id that is one trace with one of `ids` (the ids themselves included).
    pub fn expand(&self, ids: &[String]) -> Vec<String> {
        let inner = self.read();
        let wanted: Vec<u128> =
            ids.iter().filter_map(|s| parse_trace(s)).map(|t| inner.canonical(t)).collect();
        let mut out: Vec<String> = ids.to_vec();
        for &c in &wanted {
            out.push(hex_trace(c));
        }
        for &t in inner.joins.map.keys() {
            if wanted.contains(&inner.canonical(t)) {
                out.push(hex_trace(t));
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// A request whose `trace_id` filters also match the traces joined to theirs.
    pub fn expand_request(&self, mut req: GetFlowsRequest) -> GetFlowsRequest {
        for ff in req.whitelist.iter_mut().chain(req.blacklist.iter_mut()) {
            if !ff.trace_id.is_empty() {
                ff.trace_id = self.expand(&ff.trace_id);
            }
        }
        req
    }

    /// The flow of `resp` with the trace id its trace was joined to, when that differs.
    pub fn rejoined(
        &self,
        resp: &hopwatch_proto::observer::GetFlowsResponse,
    ) -> Option<hopwatch_proto::observer::GetFlowsResponse> {
        let Some(ResponseTypes::Flow(f)) = &resp.response_types else { return None };
        let id = &f.trace_context.as_ref()?.parent.as_ref()?.trace_id;
        let canonical = self.canonical(id)?;
        let mut out = resp.clone();
        if let Some(ResponseTypes::Flow(f)) = &mut out.response_types
            && let Some(p) = f.trace_context.as_mut().and_then(|t| t.parent.as_mut())
        {
            p.trace_id = canonical;
        }
        Some(out)
    }

    /// Traces joined to another since the collector started.
    pub fn joined(&self) -> u64 {
        self.joined.load(Ordering::Relaxed)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
