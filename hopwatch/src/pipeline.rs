//! The agent's event pipeline, one event at a time: decoded kernel events → connection table and
//! L7 sessions → Hubble-shaped flows. Pure of I/O (the caller reads the ring buffer and ships the
//! flows), so it can be driven by tests and benchmarks from a recorded event stream.

use std::{collections::HashMap, time::Duration};

use hopwatch_common::{
    CALLER_COROUTINE, CALLER_NGINX, DataEvent, IPPROTO_UDP, PROTO_DNS, PROTO_HTTP, PROTO_MYSQL,
    PROTO_POSTGRES, PROTO_REDIS, PROTO_TLS, SRC_SYSCALL, TcpOp, ThreadRequest,
    exchange::sample_key,
};
use hopwatch_proto::{
    compact::Compact as _,
    flow::{Flow, TrafficDirection, layer4, layer7::Record},
};
use hopwatch_protocols::{self as protocols, Protocol, Redaction};

pub use crate::l7::{CountedExchange, FastPath};
use crate::{
    conntrack::{Comm, Conn, ConnTable, Process, Role, endpoints},
    events::KernelEvent,
    flow::{Clock, FlowBuilder, L7Observation, forwarded::TrustedProxies},
    identity::Identity,
    l7::{
        Completed, L7Tracker, Measured, session::MessageParser, setup::SetupTracker,
        tls::TlsTracker,
    },
    trace::{Carried, Link, Served, Tracer, TracerStats, coroutine_key, propagated_keys, span_id},
};

/// Connections tracked in userspace.
const CONN_TABLE_CAPACITY: usize = 262_144;
/// A connection silent this long is forgotten (long-lived ones report every update interval).
const CONN_IDLE_FORGET: Duration = Duration::from_hours(1);
/// A connection the kernel no longer has is forgotten once quiet this long (its last events may
/// still be on their way).
const GONE_AFTER: Duration = Duration::from_secs(1);
/// How often idle connections and unanswered requests are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// How often the TLS and set-up tables drop sockets the connection table forgot.
const TLS_SWEEP_EVERY: Duration = Duration::from_mins(1);
/// A handshake with no record for this long is forgotten (its close was lost).
const TLS_HANDSHAKE_GIVE_UP: Duration = Duration::from_mins(1);
/// How long a connection the peer reset keeps its L7 session: the application may still read
/// what the peer sent before the reset (an error reply) after the socket closed.
const RESET_READ_GRACE: Duration = Duration::from_secs(1);
/// How long an exchange's flows wait for the trace of the request it was made for (the parent
/// completes after its children: this bounds the requests whose children get a trace id).
const TRACE_HOLD: Duration = Duration::from_secs(10);
/// Linked calls waiting to be shipped whose request's sample key is kept (see
/// [`Pipeline::parent_sample_key`]).
const PARENT_KEYS_MAX: usize = 65_536;

impl MessageParser for protocols::Parser {
    type Req = protocols::Request;
    type Resp = protocols::Response;

    fn request(
        &mut self,
        buf: &[u8],
    ) -> Result<protocols::Frame<Self::Req>, protocols::ParseError> {
        protocols::Parser::request(self, buf)
    }

    fn response(
        &mut self,
        buf: &[u8],
        pending: Option<&Self::Req>,
    ) -> Result<protocols::Frame<Self::Resp>, protocols::ParseError> {
        protocols::Parser::response(self, buf, pending)
    }

    fn answers(req: &Self::Req, resp: &Self::Resp) -> bool {
        req.matches(resp)
    }

    fn expects_response(req: &Self::Req) -> bool {
        req.expects_response()
    }

    fn response_cut(&mut self, buf: &[u8]) -> Option<Self::Resp> {
        protocols::Parser::response_cut(self, buf)
    }

    fn server_first(resp: &Self::Resp) -> Option<Self::Req> {
        resp.server_first()
    }

    fn fast_path(&self) -> bool {
        self.protocol() == Protocol::Http1
    }

    fn status_response(status: u16) -> Option<Self::Resp> {
        Some(protocols::Response::Http(protocols::http1::Response {
            status,
            version: protocols::http1::Version::Http11,
            keep_alive: true,
            headers: Vec::new(),
        }))
    }
}

/// Pipeline settings.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    /// A request unanswered this long is reported as timed out.
    pub l7_timeout: Duration,
    pub redaction: Redaction,
    /// Promote alternating HTTP/1 connections to the kernel's exchange engine
    /// ([`Pipeline::take_promotions`]).
    pub fast_path: FastPath,
    /// Link exchanges into traces ([`crate::trace`]).
    pub tracing: bool,
    /// Request headers whose values link a call to the request it was made for (a subset of
    /// [`crate::trace::PROPAGATED_HEADERS`]).
    pub trace_headers: Vec<&'static str>,
    /// Peers whose forwarding headers name the real client (`Flow.client_ip`).
    pub trusted_proxies: TrustedProxies,
}

/// What the pipeline could not keep, for the agent's counters.
#[derive(Debug, Default, Clone, Copy)]
pub struct PipelineCounters {
    /// Connections not tracked because the connection table was full.
    pub conn_table_overflow: u64,
    /// Connections forgotten because their close was lost (the kernel no longer had them).
    pub conn_closes_lost: u64,
    /// Connections whose protocol the parsers do not handle (reported at L4 only).
    pub l7_unparsed_connections: u64,
    /// L7 sessions not tracked because too many were open.
    pub l7_sessions_overflow: u64,
    /// Full records of the kernel's exchange engine that did not parse (counted, not recorded).
    pub l7_fast_unparsed: u64,
    /// TLS handshakes not followed because too many were under way.
    pub tls_handshakes_overflow: u64,
    /// Request tracing's links (and what it left unlinked).
    pub trace: TracerStats,
}

pub struct Pipeline {
    builder: FlowBuilder,
    /// Names the flows' ends (pods, services, containers, DNS names) before they leave.
    identity: Identity,
    table: ConnTable,
    l7: L7Tracker<protocols::Parser>,
    tls: TlsTracker,
    setups: SetupTracker,
    /// Links exchanges into traces (holds a child's flows until its parent's trace is known).
    tracer: Tracer,
    /// Linked calls (by span id) → the sample key of the request each was made for, for the
    /// record policy (sampling is per trace); taken when the call's flow is shipped.
    parent_keys: HashMap<u64, u64>,
    /// Exchanges the kernel measured that only count ([`Pipeline::take_counted`]).
    counted: Vec<CountedExchange>,
    options: PipelineOptions,
    last_sweep_ns: u64,
    last_tls_sweep_ns: u64,
    /// Connections forgotten because the kernel no longer had them ([`Pipeline::forget_gone`]).
    forgotten_gone: u64,
}

impl Pipeline {
    pub fn new(builder: FlowBuilder, options: PipelineOptions) -> Self {
        let redaction = options.redaction;
        Self {
            builder,
            identity: Identity::disabled(),
            table: ConnTable::new(CONN_TABLE_CAPACITY),
            l7: L7Tracker::new(Box::new(move |ev: &DataEvent, _server_port| {
                new_parser(ev, redaction)
            }))
            .with_fast_path(options.fast_path),
            tls: TlsTracker::default(),
            setups: SetupTracker::default(),
            tracer: Tracer::new(nanos(TRACE_HOLD)),
            parent_keys: HashMap::new(),
            counted: Vec::new(),
            options,
            last_sweep_ns: Clock::monotonic_now_ns(),
            last_tls_sweep_ns: Clock::monotonic_now_ns(),
            forgotten_gone: 0,
        }
    }

    /// Enriches every flow with `identity` from now on.
    #[must_use]
    pub fn with_identity(mut self, identity: Identity) -> Self {
        self.identity = identity;
        self
    }

    pub fn builder(&self) -> &FlowBuilder {
        &self.builder
    }

    pub fn counters(&self) -> PipelineCounters {
        PipelineCounters {
            conn_table_overflow: self.table.overflow,
            conn_closes_lost: self.forgotten_gone,
            l7_unparsed_connections: self.l7.stats.unparsed_connections,
            l7_sessions_overflow: self.l7.stats.sessions_overflow,
            l7_fast_unparsed: self.l7.stats.fast_unparsed,
            tls_handshakes_overflow: self.tls.overflow,
            trace: self.tracer.stats,
        }
    }

    /// Connections to hand to the kernel's exchange engine (socket cookie, promotion).
    pub fn take_promotions(&mut self) -> Vec<(u64, hopwatch_common::exchange::Promotion)> {
        let mut promotions = self.l7.take_promotions();
        for (cookie, p) in &mut promotions {
            // Where the kernel measures without a socket (TLS), it samples by these.
            if let Some(c) = self.table.get(*cookie) {
                p.ports = [c.local().port(), c.remote().port()];
            }
        }
        promotions
    }

    /// The exchanges measured in the kernel and not recorded since the last call: each counts
    /// in the hops like an exchange flow.
    /// For a call linked to the request it was made for (thread causality, nginx): that
    /// request's sample key, which the record policy samples the call by (sampling is per
    /// trace). Taken: asked once per shipped flow.
    pub fn parent_sample_key(&mut self, flow: &Flow) -> Option<u64> {
        // The call's client end: the one its link was made at.
        if flow.traffic_direction() != TrafficDirection::Egress {
            return None;
        }
        let span = flow.l7.as_ref()?.span.as_ref().filter(|s| !s.parent_span_id.is_empty())?;
        let id = u64::from_str_radix(&span.span_id, 16).ok()?;
        self.parent_keys.remove(&id)
    }

    pub fn take_counted(&mut self) -> std::vec::Drain<'_, CountedExchange> {
        self.counted.drain(..)
    }

    /// Turns one kernel event into the flows it completes (none, one, or several).
    pub fn on_event(&mut self, ev: &KernelEvent<'_>, out: &mut Vec<Flow>) {
        let from = out.len();
        self.flows_of(ev, out);
        self.identity.process(out, from);
    }

    fn flows_of(&mut self, ev: &KernelEvent<'_>, out: &mut Vec<Flow>) {
        match ev {
            KernelEvent::Tcp(ev) => {
                let Some(mut conn) = self.table.apply(ev) else { return };
                // Updates carry no namespace; keep the one learnt at establishment.
                if conn.netns == 0 {
                    conn.netns = ev.tuple.netns;
                }
                let peer = self.table.peer(&conn);
                let mut flow = self.builder.tcp(ev, &conn, peer);
                let closed =
                    matches!(TcpOp::from_u8(ev.op), Some(TcpOp::Closed | TcpOp::ConnectFailed));
                let cookie = ev.header.socket_cookie;
                flow.tls_handshake = self.tls.outcome(cookie).cloned();
                out.push(flow);
                if TcpOp::from_u8(ev.op) == Some(TcpOp::Connected) {
                    self.setups.on_connect(cookie, ev.start_ns, ev.connect_latency_ns);
                }
                if closed {
                    self.setups.on_close(cookie);
                    let reset = ev.stats.resets_received > 0 || ev.stats.resets_sent > 0;
                    if let Some(done) = self.tls.close(cookie, reset, ev.header.timestamp_ns) {
                        out.push(self.tls_flow(done, Some(&conn)));
                    }
                    if ev.stats.resets_received > 0 {
                        let deadline =
                            ev.header.timestamp_ns.saturating_add(nanos(RESET_READ_GRACE));
                        self.l7.close_after(cookie, deadline);
                    } else {
                        let unanswered = self.l7.close(cookie);
                        self.l7_flows(unanswered, out);
                    }
                }
            }
            KernelEvent::Drop(ev) => {
                let (src_proc, dst_proc) = match endpoints(&ev.tuple) {
                    Some((s, d)) => (
                        self.table.find(s, d, ev.tuple.netns).and_then(|c| c.process.as_deref()),
                        self.table.find(d, s, ev.tuple.netns).and_then(|c| c.process.as_deref()),
                    ),
                    None => (None, None),
                };
                out.push(self.builder.drop(ev, src_proc, dst_proc));
            }
            KernelEvent::Data(ev, payload) => self.on_data(ev, payload, out),
            KernelEvent::Exchange(ev, full) => {
                let table = &self.table;
                let conn = table.get(ev.header.socket_cookie);
                let peer = || conn.and_then(|c| table.peer(c)).map(|p| p.cookie);
                match self.l7.on_exchange(ev, *full, peer) {
                    Measured::Recorded(c) => self.l7_flows(vec![c], out),
                    Measured::Counted(c) => self.counted.push(c),
                }
            }
        }
    }

    fn on_data(&mut self, ev: &DataEvent, payload: &[u8], out: &mut Vec<Flow>) {
        let cookie = ev.header.socket_cookie;
        if ev.protocol == PROTO_TLS && ev.source == SRC_SYSCALL {
            if ev.header.tgid != 0 {
                self.table.note_process(cookie, ev.header.tgid, &ev.comm, ev.header.cgroup_id);
            }
            if let Some(done) = self.tls.on_data(ev, payload) {
                out.push(self.tls_flow(done, self.table.get(cookie)));
            }
            return;
        }
        // The process doing the I/O owns the socket now (a pre-forked server's worker rather than
        // the master that called listen()).
        if ev.header.tgid != 0 {
            self.table.note_process(cookie, ev.header.tgid, &ev.comm, ev.header.cgroup_id);
        }
        let table = &self.table;
        let conn = table.get(cookie);
        let server_side = conn.map(|c| c.role == Role::Server);
        let peer = || conn.and_then(|c| table.peer(c)).map(|p| p.cookie);
        let opened_ns = conn.map_or(0, |c| c.opened_ns);
        // TLS plaintext comes without addresses: the session keeps the connection's, for the
        // exchanges it reports once the connection is gone (a request unanswered at the close).
        let with_tuple;
        let ev = match conn {
            Some(c) if ev.tuple.family == 0 => {
                let tuple = crate::events::tcp_tuple(c.local(), c.remote(), c.netns);
                with_tuple = DataEvent { tuple, ..*ev };
                &with_tuple
            }
            _ => ev,
        };
        let done = self.l7.on_data_with(ev, payload, server_side, opened_ns, peer);
        self.l7_flows(done, out);
    }

    /// Periodic work: forget idle connections, report requests that timed out.
    pub fn tick(&mut self, now_ns: u64, out: &mut Vec<Flow>) {
        self.identity.release(out);
        if now_ns.saturating_sub(self.last_sweep_ns) < nanos(SWEEP_EVERY) {
            return;
        }
        let from = out.len();
        self.last_sweep_ns = now_ns;
        self.table.sweep(now_ns.saturating_sub(nanos(CONN_IDLE_FORGET)));
        self.compact();
        if now_ns.saturating_sub(self.last_tls_sweep_ns) >= nanos(TLS_SWEEP_EVERY) {
            self.last_tls_sweep_ns = now_ns;
            let table = &self.table;
            let alive = |cookie| table.get(cookie).is_some();
            self.tls.sweep(now_ns.saturating_sub(nanos(TLS_HANDSHAKE_GIVE_UP)), alive);
            self.setups.sweep(alive);
        }
        let expired = self.l7.expire(now_ns.saturating_sub(nanos(self.options.l7_timeout)));
        self.l7_flows(expired, out);
        let closed = self.l7.close_due(now_ns);
        self.l7_flows(closed, out);
        self.tracer.expire(now_ns, out);
        self.identity.process(out, from);
    }

    /// Forgets the connections whose close the agent never saw (lost with a full ring buffer):
    /// those not seen for a second that `alive` (a lookup in the kernel's connection map) says
    /// are gone. Their unanswered requests are reported as such. Returns how many.
    pub fn forget_gone(
        &mut self,
        now_ns: u64,
        alive: impl Fn(u64) -> bool,
        out: &mut Vec<Flow>,
    ) -> usize {
        let from = out.len();
        let gone = self.table.forget_gone(now_ns.saturating_sub(nanos(GONE_AFTER)), alive);
        for &cookie in &gone {
            self.setups.on_close(cookie);
            let _ = self.tls.close(cookie, false, now_ns);
            let unanswered = self.l7.close(cookie);
            self.l7_flows(unanswered, out);
        }
        self.forgotten_gone += gone.len() as u64;
        self.identity.process(out, from);
        gone.len()
    }

    /// Gives back the room tables no longer use after a burst of connections or requests (a
    /// hash table keeps the capacity of its fullest moment).
    fn compact(&mut self) {
        self.table.compact();
        self.l7.compact();
        self.tls.compact();
        self.setups.compact();
        self.tracer.compact();
        self.identity.compact();
        self.parent_keys.compact();
        self.counted.compact();
    }

    fn l7_flows(
        &mut self,
        done: Vec<Completed<protocols::Request, protocols::Response>>,
        out: &mut Vec<Flow>,
    ) {
        for c in done {
            let (time_ns, caller, cookie, tgid) =
                (c.exchange.response_ns, c.caller, c.cookie, c.pid);
            let window = (c.exchange.request_ns, c.exchange.response_ns);
            let flow = self.l7_flow(c);
            if !self.options.tracing {
                out.push(flow);
                continue;
            }
            let (span, link, carried) = self.span_and_link(&flow, cookie, caller, tgid, window.0);
            // The asyncio task that answered a request it served (see `trace::Served`).
            let served = (caller.method == CALLER_COROUTINE
                && flow.traffic_direction == i32::from(TrafficDirection::Ingress)
                && window.1 != 0)
                .then(|| Served {
                    key: coroutine_key(tgid, caller.cookie),
                    from_ns: window.0,
                    to_ns: window.1,
                });
            self.tracer.admit(flow, span, link, Carried { ids: &carried, served }, time_ns, out);
        }
    }

    /// The exchange's span, how it links to the request it was made for (`request_ns`: when it
    /// was sent), and (for a server end) the propagated ids its request carried (see
    /// [`crate::trace`]).
    fn span_and_link(
        &mut self,
        flow: &Flow,
        cookie: u64,
        caller: ThreadRequest,
        tgid: u32,
        request_ns: u64,
    ) -> (u64, Link, Vec<u64>) {
        let l7 = flow.l7.as_ref();
        let ids = match l7.and_then(|l| l.record.as_ref()) {
            Some(Record::Http(h)) => propagated_keys(tgid, &h.headers, &self.options.trace_headers),
            _ => Vec::new(),
        };
        let index = l7.map_or(0, |l| l.exchange_index);
        let server_side = flow.traffic_direction == i32::from(TrafficDirection::Ingress);
        let conn = self.table.get(cookie);
        let (client, server) = match conn {
            Some(c) if server_side => (c.remote(), c.local()),
            Some(c) => (c.local(), c.remote()),
            None => flow_ends(flow),
        };
        let span = span_id(client, server, index);
        if server_side {
            // The client end, when it is on this node and captured, carries the link.
            let peer = conn.and_then(|c| self.table.peer(c)).map(|p| p.cookie);
            let link =
                if peer.is_some_and(|p| self.l7.tracks(p)) { Link::SameAsPeer } else { Link::Root };
            if !ids.is_empty() {
                self.tracer.note_carrier(tgid, flow_time_ns(flow));
            }
            return (span, link, ids.into_iter().map(|(k, _)| k).collect());
        }
        let link = match caller.inflight {
            0 => Link::Root,
            // Made by an asyncio task while the thread served requests: the task's answered
            // request, if the call fell inside it.
            _ if caller.method == CALLER_COROUTINE => {
                Link::Coroutine { key: coroutine_key(tgid, caller.cookie), at_ns: request_ns }
            }
            // Serving one request, but not the one it read last (that one is answered).
            1 if caller.cookie == 0 => Link::Ambiguous,
            1 => {
                let parent = self
                    .l7
                    .index_at(caller.cookie, caller.turns)
                    .zip(self.table.get(caller.cookie));
                if let Some((index, c)) = parent {
                    if self.parent_keys.len() >= PARENT_KEYS_MAX {
                        // Calls whose flows never shipped (dropped on the way): start over; a
                        // call that loses its entry is sampled by its own key.
                        self.parent_keys.clear();
                    }
                    let key = sample_key(c.local().port(), c.remote().port(), index);
                    self.parent_keys.insert(span, key);
                }
                match parent {
                    Some((index, c)) if caller.method == CALLER_NGINX => {
                        Link::Nginx { parent: span_id(c.remote(), c.local(), index) }
                    }
                    Some((index, c)) => {
                        Link::Thread { parent: span_id(c.remote(), c.local(), index) }
                    }
                    // Serving a request whose connection or exchange the agent did not see.
                    None => Link::Unfollowed,
                }
            }
            _ => Link::Ambiguous,
        };
        // A propagated id links what thread causality cannot: an event loop's calls, or a
        // thread that serves nothing itself (a pool the request was handed to); and it is
        // preferred to a coroutine's link, which waits for the request's response and finds no
        // parent for a call made by a task of its own (`asyncio.gather`).
        let by_id = match link {
            Link::Ambiguous | Link::Unfollowed | Link::Coroutine { .. } => true,
            Link::Root => self.tracer.carries_ids(tgid),
            _ => false,
        };
        let link = match ids.first() {
            Some(&(key, header)) if by_id => Link::Header { key, header },
            _ => link,
        };
        (span, link, Vec::new())
    }

    fn l7_flow(&mut self, c: Completed<protocols::Request, protocols::Response>) -> Flow {
        let x = c.exchange;
        let protocol = x.request.protocol().name();
        let timed_out = x.response.is_none();
        let latency_ns = if timed_out { 0 } else { x.latency_ns() };
        let time_ns = if timed_out { x.request_ns } else { x.response_ns };
        let (request_ns, index) = (x.request_ns, x.index);
        let record = crate::flow::records::l7_record(x.request, x.response);
        let conn: Option<&Conn> = self.table.get(c.cookie);
        let (local, remote) = match (conn, endpoints(&c.tuple)) {
            // UDP sockets talk to many peers: the datagram's addresses are the exchange's.
            (_, Some(ends)) if c.tuple.protocol == IPPROTO_UDP => ends,
            (Some(conn), _) => (conn.local(), conn.remote()),
            (None, Some(ends)) => ends,
            (None, None) => (unspecified(), unspecified()),
        };
        let setup = if c.server_side || timed_out {
            None
        } else {
            if let Record::Dns(d) = &record.record {
                self.setups.on_dns_answer(c.pid, &d.query, &d.ips, request_ns, time_ns);
            }
            let tls =
                self.tls.outcome(c.cookie).filter(|t| t.error.is_empty()).map(|t| t.latency_ns);
            let dialled = (c.pid, remote.ip());
            (index == 0)
                .then(|| self.setups.first_response(c.cookie, dialled, tls, request_ns, time_ns))
                .flatten()
        };
        let peer_process =
            conn.and_then(|c| self.table.peer(c)).and_then(|p| p.process.as_deref().cloned());
        let tls_handshake = self.tls.outcome(c.cookie).cloned();
        let observation = L7Observation {
            protocol,
            record: Some(record.record),
            error: record.error,
            latency_ns,
            timed_out,
            peer_latency_ns: c.peer_latency_ns,
            exchange_index: x.index,
            tls: c.tls,
            server_side: c.server_side,
            time_ns,
            local,
            remote,
            udp: c.tuple.protocol == IPPROTO_UDP,
            netns: conn.map_or(c.tuple.netns, |c| c.netns),
            cookie: c.cookie,
            process: (c.pid != 0).then(|| Process {
                pid: c.pid,
                comm: Comm::from_raw(&c.comm),
                cgroup_id: c.cgroup_id,
            }),
            peer_process,
        };
        let mut flow = self.builder.l7(observation);
        if let (true, Some(Record::Http(h))) =
            (c.server_side, flow.l7.as_ref().and_then(|l| l.record.as_ref()))
            && let Some(ip) = self.options.trusted_proxies.client(remote.ip(), &h.headers)
        {
            flow.client_ip = ip.to_string();
        }
        flow.tls_handshake = tls_handshake;
        flow.connection_setup = setup;
        flow
    }

    /// The flow of a TLS handshake's outcome at one end: an L7 flow of protocol "tls" whose
    /// latency is the handshake's, an error when it failed.
    fn tls_flow(&self, done: crate::l7::tls::Done, conn: Option<&Conn>) -> Flow {
        let (local, remote) =
            conn.map_or((unspecified(), unspecified()), |c| (c.local(), c.remote()));
        let process = conn.and_then(|c| c.process.as_deref().cloned()).or_else(|| {
            (done.pid != 0).then(|| Process {
                pid: done.pid,
                comm: Comm::from_raw(&done.comm),
                cgroup_id: done.cgroup_id,
            })
        });
        let observation = L7Observation {
            protocol: "tls",
            record: None,
            error: (!done.handshake.error.is_empty()).then(|| done.handshake.error.clone()),
            latency_ns: done.handshake.latency_ns,
            timed_out: false,
            peer_latency_ns: None,
            exchange_index: 0,
            tls: true,
            server_side: conn.map_or(done.server_side, |c| c.role == Role::Server),
            time_ns: done.time_ns,
            local,
            remote,
            udp: false,
            netns: conn.map_or(0, |c| c.netns),
            cookie: done.cookie,
            process,
            peer_process: conn
                .and_then(|c| self.table.peer(c))
                .and_then(|p| p.process.as_deref().cloned()),
        };
        let mut flow = self.builder.l7(observation);
        flow.tls_handshake = Some(done.handshake);
        flow
    }
}

/// A flow's wall-clock time, ns.
fn flow_time_ns(flow: &Flow) -> u64 {
    flow.time.map_or(0, |t| {
        u64::try_from(t.seconds).unwrap_or(0) * 1_000_000_000 + u64::try_from(t.nanos).unwrap_or(0)
    })
}

/// A flow's client (source) and server (destination) addresses.
fn flow_ends(flow: &Flow) -> (std::net::SocketAddr, std::net::SocketAddr) {
    let ports = match flow.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
        Some(layer4::Protocol::Tcp(t)) => (t.source_port, t.destination_port),
        Some(layer4::Protocol::Udp(u)) => (u.source_port, u.destination_port),
        _ => (0, 0),
    };
    let addr = |ip: Option<&str>, port: u32| {
        let ip = ip.and_then(|i| i.parse().ok()).unwrap_or(unspecified().ip());
        std::net::SocketAddr::new(ip, u16::try_from(port).unwrap_or(0))
    };
    let ip = flow.ip.as_ref();
    (
        addr(ip.map(|i| i.source.as_str()), ports.0),
        addr(ip.map(|i| i.destination.as_str()), ports.1),
    )
}

fn unspecified() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([0, 0, 0, 0], 0))
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The parser for a new connection, from the kernel's guess of its protocol.
fn new_parser(ev: &DataEvent, redaction: Redaction) -> Option<protocols::Parser> {
    let protocol = match ev.protocol {
        PROTO_HTTP => Protocol::Http1,
        PROTO_POSTGRES => Protocol::Postgres,
        PROTO_REDIS => Protocol::Redis,
        PROTO_MYSQL => Protocol::Mysql,
        PROTO_DNS if ev.tuple.protocol == IPPROTO_UDP => {
            return Some(protocols::Parser::new_dns(protocols::dns::Transport::Udp));
        }
        PROTO_DNS => return Some(protocols::Parser::new_dns(protocols::dns::Transport::Tcp)),
        _ => return None,
    };
    Some(protocols::Parser::new(protocol, redaction))
}
