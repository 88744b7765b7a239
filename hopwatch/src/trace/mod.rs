//! Request tracing on one node: each L7 exchange is a span, linked to the exchange it was made
//! for, and the spans of one request share a trace id.
//!
//! - **Span.** Both ends of an exchange name it alike: a hash of the client's and the server's
//!   addresses and the exchange's index on the connection ([`span_id`]).
//! - **Links.** An outbound exchange's parent is the inbound request its thread was serving when
//!   it sent the request, as the kernel recorded it ([`hopwatch_common::ThreadRequest`]), and only
//!   when the thread was serving exactly one: thread- and process-per-request servers link, an
//!   event loop with several requests in flight stays unlinked ("ambiguous"), never guessed.
//!   nginx's upstream requests name their downstream request themselves; an asyncio task's
//!   call links to the request the same task answered around it ([`Link::Coroutine`],
//!   [`Served`]); a propagated id (`X-Request-ID`, ...) links to the one request that carried it.
//! - **Trace id.** The root exchange's `traceparent` trace id, else one derived from the root's
//!   span id, so every end computes the same.
//!
//! A child exchange completes before its parent, and a trace's id is only known once its root is
//! linked: so the [`Tracer`] holds an exchange's flows until its parent's trace is known, at most
//! [`Tracer::hold_ns`]; what it gives up on is emitted with its link but without a trace id, and
//! counted. Exchanges that cannot have a parent here (a client that serves nothing, a server end
//! whose client is not on this node) pass through at once.

use std::{
    collections::VecDeque,
    net::{IpAddr, SocketAddr},
};

use hopwatch_proto::{
    compact::Compact as _,
    flow::{Flow, Span, TraceContext, TraceParent},
};
use rustc_hash::FxHashMap;
use served::Answered;
pub(crate) use served::Served;

mod served;

/// Spans whose flows are held at most (beyond, new ones pass through unlinked, counted).
const MAX_HELD: usize = 65_536;
/// Spans whose trace id is remembered for their late ends and children.
const MAX_RESOLVED: usize = 262_144;
/// Propagated ids of inbound requests remembered (per process) for the calls made for them.
const MAX_KEYS: usize = 262_144;
/// Processes remembered as serving requests that carry propagated ids.
const MAX_CARRIERS: usize = 16_384;

/// How a flow's exchange relates to the rest of its trace, as the pipeline found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Link {
    /// No parent: the exchange starts a trace.
    Root,
    /// Made for the inbound request `parent`, by the thread serving it alone.
    Thread { parent: u64 },
    /// An nginx upstream request made for the downstream request `parent` (nginx's own
    /// structures said so).
    Nginx { parent: u64 },
    /// Carries the propagated id `key` (a hash of the process, the header and its value) that
    /// exactly one inbound request of the same process carried; `header` names it.
    Header { key: u64, header: &'static str },
    /// A parent may exist but could not be told without guessing; the exchange starts a trace.
    Ambiguous,
    /// Made for the one request its thread was serving, but that request was not followed (its
    /// connection or exchange was not seen); the exchange starts a trace.
    Unfollowed,
    /// Made at `at_ns` by the asyncio task whose coroutine is `key` (a hash of the process and
    /// the coroutine object's address, [`coroutine_key`]): its parent is the inbound request that
    /// coroutine answered, if the call fell between that request and its response ([`Served`]).
    Coroutine { key: u64, at_ns: u64 },
    /// A server end whose client end is on this node: the client end carries the link.
    SameAsPeer,
}

/// What a server end's request brings for the calls made for it: the propagated ids it carried
/// (as keys, [`propagated_keys`]) and the asyncio task that answered it.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Carried<'a> {
    pub ids: &'a [u64],
    pub served: Option<Served>,
}

/// What the tracer did, for the agent's counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TracerStats {
    /// Exchanges linked to their parent by thread causality.
    pub linked_thread: u64,
    /// Exchanges linked to their parent by a propagated id (`X-Request-ID`, ...).
    pub linked_header: u64,
    /// nginx upstream requests linked to their downstream request.
    pub linked_nginx: u64,
    /// Exchanges linked to the request the asyncio task that made them answered.
    pub linked_coroutine: u64,
    /// Exchanges left unlinked because their thread had several requests in flight.
    pub ambiguous: u64,
    /// Exchanges left unlinked because the one request their thread served was not followed.
    pub unfollowed: u64,
    /// Flows emitted without a trace id because their parent's trace was not known in time.
    pub expired: u64,
    /// Flows passed through unlinked because too many spans were held.
    pub overflow: u64,
}

struct Held {
    flows: Vec<Flow>,
    /// The span whose trace this one waits for (its parent, or itself for a server end), or
    /// the propagated id or the coroutine whose inbound request it waits for (`by`).
    waits_for: u64,
    by: By,
    since_ns: u64,
}

/// What a held span's `waits_for` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum By {
    /// A span (its parent's, or its own for a server end).
    Span,
    /// A propagated id, of this header.
    Header(&'static str),
    /// A coroutine ([`Link::Coroutine`]), for the call made at this time.
    Coroutine { at_ns: u64 },
}

/// What a propagated id of an inbound request names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Carrier {
    /// The inbound request (span) that carried it.
    Span(u64),
    /// Several inbound requests carried it (a constant id): it links nothing.
    Several,
}

pub(crate) struct Tracer {
    held: FxHashMap<u64, Held>,
    /// Held spans in the order they were first held, for expiry.
    held_order: VecDeque<u64>,
    /// Span → the held spans waiting for its trace.
    waiting: FxHashMap<u64, Vec<u64>>,
    resolved: FxHashMap<u64, u128>,
    resolved_order: VecDeque<u64>,
    /// Propagated ids of inbound requests, oldest first in `keys_order` (with when seen).
    keys: FxHashMap<u64, Carrier>,
    keys_order: VecDeque<(u64, u64)>,
    /// Processes whose inbound requests carried propagated ids, with when last seen.
    carriers: FxHashMap<u32, u64>,
    /// The requests asyncio tasks answered, by coroutine.
    answered: Answered,
    hold_ns: u64,
    pub stats: TracerStats,
}

impl Tracer {
    /// Gives back the room of spans and ids gone (after a burst of requests).
    pub(crate) fn compact(&mut self) {
        self.held.compact();
        self.held_order.compact();
        self.waiting.compact();
        self.resolved.compact();
        self.resolved_order.compact();
        self.keys.compact();
        self.keys_order.compact();
        self.carriers.compact();
        self.answered.compact();
    }

    pub(crate) fn new(hold_ns: u64) -> Self {
        Self {
            held: FxHashMap::default(),
            held_order: VecDeque::new(),
            waiting: FxHashMap::default(),
            resolved: FxHashMap::default(),
            resolved_order: VecDeque::new(),
            keys: FxHashMap::default(),
            keys_order: VecDeque::new(),
            carriers: FxHashMap::default(),
            answered: Answered::default(),
            hold_ns,
            stats: TracerStats::default(),
        }
    }

    /// One exchange's flow, with its span and link, and (for a server end) what its request
    /// brings for its calls; the flows whose trace is now known go to `out` (this one, and any
    /// it completes).
    pub(crate) fn admit(
        &mut self,
        mut flow: Flow,
        span: u64,
        link: Link,
        carried: Carried<'_>,
        now_ns: u64,
        out: &mut Vec<Flow>,
    ) {
        for &key in carried.ids {
            self.carried(key, span, now_ns, out);
        }
        if let Some(s) = carried.served {
            self.served(s, span, now_ns, out);
        }
        let link = match link {
            Link::Header { key, header } => match self.keys.get(&key) {
                Some(Carrier::Span(parent)) => {
                    self.stats.linked_header += 1;
                    let link = format!("header:{header}");
                    return self.admit_linked(flow, span, *parent, &link, now_ns, out);
                }
                Some(Carrier::Several) => Link::Ambiguous,
                None => return self.hold(flow, span, key, By::Header(header), now_ns, out),
            },
            Link::Coroutine { key, at_ns } => {
                return match self.answered.parent(key, at_ns) {
                    Some(parent) => {
                        self.stats.linked_coroutine += 1;
                        self.admit_linked(flow, span, parent, "coroutine", now_ns, out);
                    }
                    None => self.hold(flow, span, key, By::Coroutine { at_ns }, now_ns, out),
                };
            }
            other => other,
        };
        let own_trace = flow.trace_context.as_ref().and_then(trace_id_of);
        let mut s = Span { span_id: hex64(span), ..Span::default() };
        let waits_for = match link {
            Link::Root => None,
            Link::Ambiguous => {
                self.stats.ambiguous += 1;
                "ambiguous".clone_into(&mut s.unlinked);
                None
            }
            Link::Unfollowed => {
                self.stats.unfollowed += 1;
                "unfollowed".clone_into(&mut s.unlinked);
                None
            }
            Link::Thread { parent } => {
                self.stats.linked_thread += 1;
                s.parent_span_id = hex64(parent);
                "thread".clone_into(&mut s.link);
                Some(parent)
            }
            Link::Nginx { parent } => {
                self.stats.linked_nginx += 1;
                s.parent_span_id = hex64(parent);
                "nginx".clone_into(&mut s.link);
                Some(parent)
            }
            Link::SameAsPeer => Some(span),
            Link::Header { .. } | Link::Coroutine { .. } => unreachable!("resolved above"),
        };
        if let Some(l7) = flow.l7.as_mut() {
            l7.span = Some(s);
        }
        let Some(waits_for) = waits_for else {
            // A root: its trace is its own.
            let trace = own_trace.unwrap_or_else(|| derived_trace(span));
            self.resolve(span, trace, out);
            out.push(with_trace(flow, trace));
            return;
        };
        self.emit_or_hold(flow, span, waits_for, now_ns, out);
    }

    /// A call linked (by `link`) at its admission to the inbound request `parent` (a propagated
    /// id's, a coroutine's).
    fn admit_linked(
        &mut self,
        mut flow: Flow,
        span: u64,
        parent: u64,
        link: &str,
        now_ns: u64,
        out: &mut Vec<Flow>,
    ) {
        set_parent(&mut flow, span, parent, link);
        self.emit_or_hold(flow, span, parent, now_ns, out);
    }

    /// Emits `flow` (of `span`) with the trace of the span it waits for when that is known
    /// (`waits_for` is `span` itself for a server end waiting for its client end), else holds it.
    fn emit_or_hold(
        &mut self,
        flow: Flow,
        span: u64,
        waits_for: u64,
        now_ns: u64,
        out: &mut Vec<Flow>,
    ) {
        if let Some(&trace) = self.resolved.get(&waits_for) {
            if waits_for != span {
                self.resolve(span, trace, out);
            }
            out.push(with_trace(flow, trace));
            return;
        }
        self.hold(flow, span, waits_for, By::Span, now_ns, out);
    }

    /// Holds `flow` until `waits_for` (a span, or a propagated id or coroutine: `by`) is known.
    fn hold(
        &mut self,
        mut flow: Flow,
        span: u64,
        waits_for: u64,
        by: By,
        now_ns: u64,
        out: &mut Vec<Flow>,
    ) {
        if let Some(l7) = flow.l7.as_mut() {
            l7.span.get_or_insert_with(|| Span { span_id: hex64(span), ..Span::default() });
        }
        if let Some(h) = self.held.get_mut(&span) {
            h.flows.push(flow);
            if waits_for != span && h.waits_for == span {
                // The client end arrived with the link the server end was waiting for.
                h.waits_for = waits_for;
                h.by = by;
                self.waiting.entry(waits_for).or_default().push(span);
            }
            return;
        }
        if self.held.len() >= MAX_HELD {
            self.stats.overflow += 1;
            out.push(flow);
            return;
        }
        self.held.insert(span, Held { flows: vec![flow], waits_for, by, since_ns: now_ns });
        self.held_order.push_back(span);
        if waits_for != span {
            self.waiting.entry(waits_for).or_default().push(span);
        }
    }

    /// The inbound request `span` carried the propagated id `key`: the calls waiting for it are
    /// linked to it (unless another request carried it too).
    fn carried(&mut self, key: u64, span: u64, now_ns: u64, out: &mut Vec<Flow>) {
        while let Some(&(old, seen)) = self.keys_order.front() {
            if self.keys_order.len() < MAX_KEYS && now_ns.saturating_sub(seen) < self.hold_ns {
                break;
            }
            self.keys_order.pop_front();
            self.keys.remove(&old);
        }
        match self.keys.get(&key) {
            Some(Carrier::Span(s)) if *s != span => {
                self.keys.insert(key, Carrier::Several);
                return;
            }
            Some(_) => return,
            None => {
                self.keys.insert(key, Carrier::Span(span));
                self.keys_order.push_back((key, now_ns));
            }
        }
        let trace = self.resolved.get(&span).copied();
        for child in self.waiting.remove(&key).unwrap_or_default() {
            let Some(h) = self.held.get_mut(&child) else { continue };
            let By::Header(header) = h.by else { continue };
            if h.waits_for != key {
                continue;
            }
            self.stats.linked_header += 1;
            self.link_held(child, span, &format!("header:{header}"), trace, out);
        }
    }

    /// The held call `child` was made for the inbound request `span` (whose trace may be
    /// known): linked by `link`.
    fn link_held(
        &mut self,
        child: u64,
        span: u64,
        link: &str,
        trace: Option<u128>,
        out: &mut Vec<Flow>,
    ) {
        let Some(h) = self.held.get_mut(&child) else { return };
        for f in &mut h.flows {
            set_parent(f, child, span, link);
        }
        h.waits_for = span;
        h.by = By::Span;
        match trace {
            Some(t) => self.resolve(child, t, out),
            None => self.waiting.entry(span).or_default().push(child),
        }
    }

    /// The inbound request `span` was answered by an asyncio task (`s`): the calls its
    /// coroutine made within it are linked to it; those made before it was read were made for
    /// no request of this coroutine's still to come, and are left unlinked as ambiguous.
    fn served(&mut self, s: Served, span: u64, now_ns: u64, out: &mut Vec<Flow>) {
        self.answered.remember(s, span, now_ns, self.hold_ns);
        let trace = self.resolved.get(&span).copied();
        let mut later = Vec::new();
        for child in self.waiting.remove(&s.key).unwrap_or_default() {
            let Some(h) = self.held.get(&child) else { continue };
            let By::Coroutine { at_ns } = h.by else { continue };
            if h.waits_for != s.key {
                continue;
            }
            if at_ns > s.to_ns {
                // Made after this response started: for a later request of the coroutine.
                later.push(child);
            } else if at_ns < s.from_ns {
                self.unlinked_root(child, out);
            } else {
                self.stats.linked_coroutine += 1;
                self.link_held(child, span, "coroutine", trace, out);
            }
        }
        if !later.is_empty() {
            self.waiting.entry(s.key).or_default().extend(later);
        }
    }

    /// The held call `child` waited for a coroutine's request that did not come: it starts a
    /// trace of its own, counted and marked as ambiguous.
    fn unlinked_root(&mut self, child: u64, out: &mut Vec<Flow>) {
        let Some(h) = self.held.get_mut(&child) else { return };
        self.stats.ambiguous += 1;
        for f in &mut h.flows {
            if let Some(s) = f.l7.as_mut().and_then(|l| l.span.as_mut()) {
                "ambiguous".clone_into(&mut s.unlinked);
            }
        }
        let own = h.flows.first().and_then(|f| f.trace_context.as_ref()).and_then(trace_id_of);
        self.resolve(child, own.unwrap_or_else(|| derived_trace(child)), out);
    }

    /// Emits the flows held longer than the hold, without a trace id (their links stay).
    pub(crate) fn expire(&mut self, now_ns: u64, out: &mut Vec<Flow>) {
        while let Some(&span) = self.held_order.front() {
            let Some(h) = self.held.get(&span) else {
                self.held_order.pop_front();
                continue;
            };
            if now_ns.saturating_sub(h.since_ns) < self.hold_ns {
                break;
            }
            self.held_order.pop_front();
            if matches!(h.by, By::Coroutine { .. }) {
                // No request of its coroutine's contained it (a task of its own, a gather).
                self.unlinked_root(span, out);
                continue;
            }
            let h = self.held.remove(&span).expect("looked up above");
            self.stats.expired += h.flows.len() as u64;
            for mut f in h.flows {
                if let Some(s) = f.l7.as_mut().and_then(|l| l.span.as_mut())
                    && s.unlinked.is_empty()
                {
                    "expired".clone_into(&mut s.unlinked);
                }
                out.push(f);
            }
        }
    }

    /// Process `tgid` served a request carrying a propagated id at `now_ns` (wall clock).
    pub(crate) fn note_carrier(&mut self, tgid: u32, now_ns: u64) {
        if self.carriers.len() >= MAX_CARRIERS && !self.carriers.contains_key(&tgid) {
            // Forget the processes not seen within the hold (and, past that, start over).
            let hold = self.hold_ns;
            self.carriers.retain(|_, seen| now_ns.saturating_sub(*seen) < hold);
            if self.carriers.len() >= MAX_CARRIERS {
                self.carriers.clear();
            }
        }
        self.carriers.insert(tgid, now_ns);
    }

    /// Whether process `tgid` ever served a request carrying a propagated id (as far as the
    /// tracer remembers): only then does a call of one of its idle threads wait for one.
    pub(crate) fn carries_ids(&self, tgid: u32) -> bool {
        self.carriers.contains_key(&tgid)
    }

    /// Flows held now.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.held.values().map(|h| h.flows.len()).sum()
    }

    /// `span` belongs to `trace`: remembered, and everything waiting for it is emitted.
    fn resolve(&mut self, span: u64, trace: u128, out: &mut Vec<Flow>) {
        let mut released = Vec::new();
        let mut queue = VecDeque::from([(span, trace)]);
        while let Some((span, trace)) = queue.pop_front() {
            if self.resolved.insert(span, trace).is_none() {
                self.resolved_order.push_back(span);
                if self.resolved_order.len() > MAX_RESOLVED
                    && let Some(old) = self.resolved_order.pop_front()
                {
                    self.resolved.remove(&old);
                }
            }
            if let Some(h) = self.held.remove(&span) {
                released.extend(h.flows.into_iter().map(|f| with_trace(f, trace)));
            }
            for child in self.waiting.remove(&span).unwrap_or_default() {
                if self.held.get(&child).is_some_and(|h| h.waits_for == span) {
                    queue.push_back((child, trace));
                }
            }
        }
        // In the order they happened (a pipeline's commands, a request's queries).
        released.sort_by_key(|f| f.time.map(|t| (t.seconds, t.nanos)));
        out.extend(released);
    }
}

/// Request headers whose value a proxy or an application passes on to the requests it makes for
/// the request (`traceparent` by its trace id, the others whole).
pub const PROPAGATED_HEADERS: [&str; 4] =
    ["traceparent", "x-request-id", "x-correlation-id", "cf-ray"];

/// The propagated ids an HTTP request carries, as keys of process `tgid`: (key, header), in the
/// order of `headers` (those looked at).
pub(crate) fn propagated_keys(
    tgid: u32,
    request: &[hopwatch_proto::flow::HttpHeader],
    headers: &[&'static str],
) -> Vec<(u64, &'static str)> {
    let mut out = Vec::new();
    for &name in headers {
        let Some(h) = request.iter().find(|h| h.key.eq_ignore_ascii_case(name)) else { continue };
        let value = h.value.trim();
        let value =
            if name == "traceparent" { value.split('-').nth(1).unwrap_or("") } else { value };
        if value.is_empty() {
            continue;
        }
        let mut f = Fnv::default();
        f.write(&tgid.to_be_bytes());
        f.write(name.as_bytes());
        f.write(value.to_ascii_lowercase().as_bytes());
        out.push((f.0, name));
    }
    out
}

/// An asyncio task's coroutine (the object's address) in process `tgid`, as a key.
pub(crate) fn coroutine_key(tgid: u32, coro: u64) -> u64 {
    let mut f = Fnv::default();
    f.write(b"coroutine");
    f.write(&tgid.to_be_bytes());
    f.write(&coro.to_be_bytes());
    f.0
}

/// The span id of an exchange: both of its ends compute it from the same facts.
#[must_use]
pub(crate) fn span_id(client: SocketAddr, server: SocketAddr, index: u64) -> u64 {
    let mut h = Fnv::default();
    for end in [client, server] {
        match end.ip() {
            IpAddr::V4(a) => h.write(&a.to_ipv6_mapped().octets()),
            IpAddr::V6(a) => h.write(&a.octets()),
        }
        h.write(&end.port().to_be_bytes());
    }
    h.write(&index.to_be_bytes());
    // 0 is not a valid span id (W3C Trace Context).
    h.0.max(1)
}

/// The trace id of a trace whose root exchange carried no `traceparent`.
fn derived_trace(root: u64) -> u128 {
    let mut hi = Fnv::default();
    hi.write(b"hopwatch trace");
    hi.write(&root.to_be_bytes());
    (u128::from(hi.0) << 64) | u128::from(root)
}

fn trace_id_of(t: &TraceContext) -> Option<u128> {
    u128::from_str_radix(&t.parent.as_ref()?.trace_id, 16).ok().filter(|&v| v != 0)
}

/// Marks `flow` (of span `span`) as made for `parent`, linked by `link` (`header:x-request-id`,
/// `coroutine`).
fn set_parent(flow: &mut Flow, span: u64, parent: u64, link: &str) {
    if let Some(l7) = flow.l7.as_mut() {
        let s = l7.span.get_or_insert_with(|| Span { span_id: hex64(span), ..Span::default() });
        s.parent_span_id = hex64(parent);
        link.clone_into(&mut s.link);
        s.unlinked.clear();
    }
}

fn with_trace(mut f: Flow, trace: u128) -> Flow {
    f.trace_context =
        Some(TraceContext { parent: Some(TraceParent { trace_id: format!("{trace:032x}") }) });
    f
}

fn hex64(v: u64) -> String {
    format!("{v:016x}")
}

/// FNV-1a, 64-bit: stable across builds and machines (the standard library's hasher is not),
/// so two agents name a span alike.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests;
