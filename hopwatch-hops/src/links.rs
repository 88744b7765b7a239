//! Which hop called which, from the links the agent's tracer made between exchanges: every
//! exchange flow of a trace carries its span id and, when the tracer could prove it (thread
//! causality, a propagated id), its parent's span id. A parent span's hop calling a child span's
//! hop is a chain a request really took; `hopwatch hops --path` prefers these edges to chaining by
//! endpoint names.
//!
//! Both ends of an exchange carry the same span, so each child exchange counts once. Memory is
//! bounded: past [`SPANS_MAX`] spans, new ones are not kept and are counted in
//! [`Links::not_kept`].

use std::{collections::BTreeMap, sync::Arc};

use hopwatch_proto::flow::Span;

use super::{FastMap, FastSet, HopKey};

/// Spans remembered at most (both maps together hold about twice this in entries).
pub const SPANS_MAX: usize = 1 << 20;

#[derive(Debug)]
struct Parent {
    span: u64,
    /// How the tracer linked it ("thread", "header:x-request-id").
    method: Arc<str>,
    at_ns: u64,
}

/// Spans seen (with their hop) and the parents of the linked ones.
#[derive(Debug, Default)]
pub struct Links {
    spans: FastMap<u64, (HopKey, u64)>,
    parents: FastMap<u64, Parent>,
    /// Link methods, one copy each.
    methods: FastSet<Arc<str>>,
    /// Spans not kept because the maps were full.
    pub not_kept: u64,
    /// Span ids that were not 16 hex digits.
    pub malformed: u64,
}

/// Calls from one hop to another that the tracer linked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkEdge {
    pub parent: HopKey,
    pub child: HopKey,
    /// Child exchanges linked to an exchange of the parent hop.
    pub requests: u64,
    /// Of those, how many by each link method.
    pub methods: BTreeMap<String, u64>,
}

/// What the links cover, for the user to judge the paths by.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LinkCounts {
    /// Exchanges with a span.
    pub spans: u64,
    /// Exchanges linked to a parent exchange whose hop is known.
    pub linked: u64,
    /// Exchanges linked to a parent exchange not seen in the window.
    pub parent_not_seen: u64,
    /// Spans not kept (memory bound) or malformed.
    pub not_kept: u64,
}

fn span_id(hex: &str) -> Option<u64> {
    (hex.len() == 16).then(|| u64::from_str_radix(hex, 16).ok()).flatten()
}

impl Links {
    /// Remembers that `span` (of a flow at `at_ns`) is an exchange on `hop`.
    pub fn record(&mut self, span: &Span, hop: &HopKey, at_ns: u64) {
        let Some(id) = span_id(&span.span_id) else {
            self.malformed += 1;
            return;
        };
        if !self.spans.contains_key(&id) && self.spans.len() >= SPANS_MAX {
            self.not_kept += 1;
            return;
        }
        self.spans.insert(id, (hop.clone(), at_ns));
        if span.parent_span_id.is_empty() || self.parents.contains_key(&id) {
            return;
        }
        let Some(parent) = span_id(&span.parent_span_id) else {
            self.malformed += 1;
            return;
        };
        let method = self.methods.get(span.link.as_str()).cloned().unwrap_or_else(|| {
            let m: Arc<str> = Arc::from(span.link.as_str());
            self.methods.insert(m.clone());
            m
        });
        self.parents.insert(id, Parent { span: parent, method, at_ns });
    }

    /// Forgets spans older than `cutoff_ns` (a sliding window moved past them).
    pub fn forget_before(&mut self, cutoff_ns: u64) {
        self.spans.retain(|_, (_, at)| *at >= cutoff_ns);
        self.parents.retain(|_, p| p.at_ns >= cutoff_ns);
    }

    /// The linked calls between hops, most requests first, and what the links cover.
    #[must_use]
    pub fn edges(&self) -> (Vec<LinkEdge>, LinkCounts) {
        let mut by_pair: BTreeMap<(&HopKey, &HopKey), LinkEdge> = BTreeMap::new();
        let mut counts = LinkCounts {
            spans: self.spans.len() as u64,
            not_kept: self.not_kept + self.malformed,
            ..LinkCounts::default()
        };
        for (child, p) in &self.parents {
            let (Some((child_hop, _)), Some((parent_hop, _))) =
                (self.spans.get(child), self.spans.get(&p.span))
            else {
                counts.parent_not_seen += 1;
                continue;
            };
            counts.linked += 1;
            let e = by_pair.entry((parent_hop, child_hop)).or_insert_with(|| LinkEdge {
                parent: parent_hop.clone(),
                child: child_hop.clone(),
                requests: 0,
                methods: BTreeMap::new(),
            });
            e.requests += 1;
            *e.methods.entry(p.method.to_string()).or_default() += 1;
        }
        let mut edges: Vec<LinkEdge> = by_pair.into_values().collect();
        edges.sort_by_key(|e| std::cmp::Reverse(e.requests));
        (edges, counts)
    }
}
