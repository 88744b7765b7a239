//! One flow → the hop it belongs to and what it adds there.
//!
//! - L7 flows (one per exchange and observing end) count a request, an error, a latency sample
//!   on the side that measured it, and DNS rcodes / NXDOMAIN names.
//! - Connection flows count connects (with the handshake time), accepts, failed connects by
//!   cause, and — through the [`Ledger`] — the retransmits, resets and bytes their running totals
//!   grew by, and the connections open.
//! - Drop flows count a drop by kernel reason on the hop the packet belonged to. A dropped reply
//!   (from a service port to an ephemeral port) belongs to the hop of the connection it answers,
//!   so a drop is oriented client → server by the ports: the end on the ephemeral port is the
//!   client.

use std::sync::Arc;

use hopwatch_proto::{
    compact::Compact as _,
    flow::{
        Flow, FlowType, SocketEvent, TcpStats, TrafficDirection, Verdict, layer4::Protocol,
        layer7::Record,
    },
};

use super::{
    HopKey, Transport,
    endpoint::{EndView, Resolver},
    ledger::{Ledger, TcpTotals},
    links::Links,
    stats::{Side, TallyKind},
    table::HopTable,
};

/// Linux's default ephemeral port range starts here (`net.ipv4.ip_local_port_range`).
const EPHEMERAL_PORTS_START: u32 = 32_768;
const DNS_RCODE_NXDOMAIN: u32 = 3;

/// What a flow was to the aggregation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Counted,
    /// Not about a hop (no addresses, or a flow type that carries nothing to count).
    Ignored,
}

/// Sockets whose exchanges are remembered by hop; beyond this they are forgotten.
const EXCHANGE_SOCKETS_MAX: usize = 262_144;
/// Sockets whose exchanges wait for their hop to be known; beyond this new ones are not kept.
const AWAITING_MAX: usize = 16_384;

/// Exchanges of a socket counted before any exchange flow of it named its hop (that flow can be
/// held back a while, e.g. while the identity of its ends is looked up).
#[derive(Debug, Default)]
struct Awaiting {
    requests: u64,
    errors: u64,
    timeouts: u64,
    latency: crate::histogram::Histogram,
    last_ns: u64,
}

/// The node-wide state the table updates share: identities and open sockets.
#[derive(Debug, Default)]
pub struct Context {
    pub resolver: Resolver,
    pub ledger: Ledger,
    /// The hop and side of each socket that carried an exchange flow: exchanges counted without a
    /// flow (measured in the kernel) go there.
    exchange_sockets: std::collections::HashMap<u64, (HopKey, Side)>,
    awaiting: std::collections::HashMap<u64, Awaiting>,
    /// Exchanges whose socket's hop never became known (the socket closed first, or too many
    /// sockets waited): counted here, in no hop.
    pub exchanges_without_hop: u64,
    /// The tracer's links between exchanges, when kept ([`HopConfig::links`](crate::HopConfig)).
    pub links: Option<Links>,
}

impl Context {
    /// Forgets the exchanges of sockets whose hop is still unknown after `cutoff_ns` (their
    /// flows were left out, e.g. the agent's own traffic), counting them.
    pub fn sweep_awaiting(&mut self, cutoff_ns: u64) {
        let mut lost = 0;
        self.awaiting.retain(|_, w| {
            let keep = w.last_ns >= cutoff_ns;
            if !keep {
                lost += w.requests;
            }
            keep
        });
        self.exchanges_without_hop += lost;
        self.awaiting.compact();
        self.exchange_sockets.compact();
    }

    /// See [`crate::Aggregator::forget_gone_sockets`].
    pub(crate) fn forget_gone_sockets(
        &mut self,
        node: &Arc<str>,
        before_ns: u64,
        alive: impl Fn(u64) -> bool,
    ) -> usize {
        self.exchange_sockets.retain(|cookie, _| alive(*cookie));
        self.ledger.forget_gone(node, before_ns, alive)
    }

    /// The hop and side the socket `cookie`'s exchanges count on, once one of its exchange flows
    /// was seen.
    #[must_use]
    pub fn exchange_hop(&self, cookie: u64) -> Option<&(HopKey, Side)> {
        self.exchange_sockets.get(&cookie)
    }
}

/// Transport and ports of a flow.
fn layer4(flow: &Flow) -> (Transport, u32, u32) {
    match flow.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
        Some(Protocol::Tcp(t)) => (Transport::Tcp, t.source_port, t.destination_port),
        Some(Protocol::Udp(u)) => (Transport::Udp, u.source_port, u.destination_port),
        Some(Protocol::Sctp(s)) => (Transport::Sctp, s.source_port, s.destination_port),
        Some(Protocol::IcmPv4(_) | Protocol::IcmPv6(_)) => (Transport::Icmp, 0, 0),
        None => (Transport::Other, 0, 0),
    }
}

/// Flow time in ns since the epoch, `fallback_ns` when the flow has none.
#[must_use]
pub fn flow_time_ns(flow: &Flow, fallback_ns: u64) -> u64 {
    flow.time.as_ref().map_or(fallback_ns, |t| {
        u64::try_from(t.seconds).unwrap_or(0) * 1_000_000_000 + u64::try_from(t.nanos).unwrap_or(0)
    })
}

/// The hop `flow` belongs to, as [`apply`] counts it, and the end that reported it (`None` for a
/// drop, which the kernel reports for the hop); `None` for a flow without addresses.
pub fn hop_of(flow: &Flow, resolver: &mut Resolver) -> Option<(HopKey, Option<Side>)> {
    flow.ip.as_ref()?;
    let (transport, sport, dport) = layer4(flow);
    if flow.verdict() == Verdict::Dropped {
        let reply = dport >= EPHEMERAL_PORTS_START && sport < EPHEMERAL_PORTS_START;
        let (client, server, port) = if reply {
            (EndView::destination(flow, dport), EndView::source(flow, sport), sport)
        } else {
            (EndView::source(flow, sport), EndView::destination(flow, dport), dport)
        };
        let key = HopKey {
            source: resolver.resolve(&client, false, false),
            destination: resolver.resolve(&server, true, false),
            port,
            transport,
        };
        return Some((key, None));
    }
    let side = match flow.traffic_direction() {
        TrafficDirection::Ingress => Side::Server,
        TrafficDirection::Egress | TrafficDirection::Unknown => Side::Client,
    };
    let src = resolver.resolve(&EndView::source(flow, sport), false, side == Side::Client);
    let dst = resolver.resolve(&EndView::destination(flow, dport), true, side == Side::Server);
    Some((HopKey { source: src, destination: dst, port: dport, transport }, Some(side)))
}

/// Adds `flow` to `table`, stamped `at_ns`.
pub fn apply(flow: &Flow, at_ns: u64, cx: &mut Context, table: &mut HopTable) -> Outcome {
    let Some((key, side)) = hop_of(flow, &mut cx.resolver) else { return Outcome::Ignored };
    let Some(side) = side else {
        let reason =
            if flow.kernel_drop_reason.is_empty() { "UNKNOWN" } else { &flow.kernel_drop_reason };
        table.drop(&key, reason, 1, at_ns);
        return Outcome::Counted;
    };
    match flow.r#type() {
        FlowType::L7 => apply_l7(flow, at_ns, cx, table, &key, side),
        FlowType::L3L4 if key.transport == Transport::Tcp => {
            apply_tcp(flow, at_ns, cx, table, &key, side)
        }
        _ => Outcome::Ignored,
    }
}

/// The exchanges of socket `cookie` counted while its hop was unknown, into `key`'s `side`.
fn settle_awaiting(
    cx: &mut Context,
    table: &mut HopTable,
    cookie: u64,
    key: &HopKey,
    side: Side,
    at_ns: u64,
) {
    if let Some(w) = cx.awaiting.remove(&cookie) {
        let (s, _) = table.side_mut(key, side, w.last_ns.max(at_ns));
        s.requests += w.requests;
        s.errors += w.errors;
        s.timeouts += w.timeouts;
        s.latency.merge(&w.latency);
    }
}

/// `l7.protocol` of the flow of a TLS handshake.
const TLS_PROTOCOL: &str = "tls";

fn apply_l7(
    flow: &Flow,
    at_ns: u64,
    cx: &mut Context,
    table: &mut HopTable,
    key: &HopKey,
    side: Side,
) -> Outcome {
    let Some(l7) = flow.l7.as_ref() else { return Outcome::Ignored };
    if let (Some(links), Some(span)) = (cx.links.as_mut(), l7.span.as_ref()) {
        links.record(span, key, at_ns);
    }
    if flow.socket_cookie != 0 && !cx.exchange_sockets.contains_key(&flow.socket_cookie) {
        if cx.exchange_sockets.len() >= EXCHANGE_SOCKETS_MAX {
            cx.exchange_sockets.clear();
        }
        cx.exchange_sockets.insert(flow.socket_cookie, (key.clone(), side));
        settle_awaiting(cx, table, flow.socket_cookie, key, side, at_ns);
    }
    if l7.protocol == TLS_PROTOCOL && flow.tls_handshake.is_some() {
        // A handshake, not an exchange: its own histogram and failures.
        if l7.error.is_empty() {
            let (s, _) = table.side_mut(key, side, at_ns);
            s.tls_handshake.record(l7.latency_ns);
        } else {
            table.tally(key, side, TallyKind::TlsFailures, &l7.error, 1, at_ns);
        }
        return Outcome::Counted;
    }
    let failed = !l7.error.is_empty() || l7.timed_out || flow.verdict() == Verdict::Error;
    let (s, _) = table.side_mut(key, side, at_ns);
    if let Some(x) = &flow.connection_setup {
        s.setup.total.record(x.total_ns);
        s.setup.dns_ns += x.dns_ns;
        s.setup.connect_ns += x.connect_ns;
        s.setup.tls_ns += x.tls_ns;
        s.setup.first_byte_ns += x.first_byte_ns;
    }
    if s.protocol.is_none() && !l7.protocol.is_empty() {
        s.protocol = Some(cx.resolver.intern(&l7.protocol));
    }
    s.requests += 1;
    s.errors += u64::from(failed);
    if l7.timed_out {
        s.timeouts += 1;
    } else {
        s.latency.record(l7.latency_ns);
    }
    if let Some(Record::Dns(dns)) = &l7.record {
        let rcode = if l7.timed_out { "TIMEOUT" } else { rcode_name(dns.rcode) };
        table.tally(key, side, TallyKind::DnsRcodes, rcode, 1, at_ns);
        if !l7.timed_out && dns.rcode == DNS_RCODE_NXDOMAIN && !dns.query.is_empty() {
            table.tally(key, side, TallyKind::Nxdomain, &dns.query, 1, at_ns);
        }
    }
    Outcome::Counted
}

fn apply_tcp(
    flow: &Flow,
    at_ns: u64,
    cx: &mut Context,
    table: &mut HopTable,
    key: &HopKey,
    side: Side,
) -> Outcome {
    let none = TcpStats::default();
    let stats = flow.tcp_stats.as_ref().unwrap_or(&none);
    let totals = TcpTotals {
        retransmits: stats.retransmits,
        resets: stats.resets,
        bytes_sent: stats.bytes_sent,
        bytes_received: stats.bytes_received,
    };
    let node_name: Arc<str> = cx.resolver.intern(&flow.node_name);
    let cookie = flow.socket_cookie;
    let delta = match flow.socket_event() {
        SocketEvent::Connect | SocketEvent::Accept => {
            let delta = cx.ledger.open(&node_name, cookie, key, side, totals, at_ns);
            let (s, _) = table.side_mut(key, side, at_ns);
            s.opened += 1;
            if flow.socket_event() == SocketEvent::Connect && stats.connect_latency_ns > 0 {
                s.connect.record(stats.connect_latency_ns);
            }
            delta
        }
        SocketEvent::Update => cx.ledger.report(&node_name, cookie, key, side, totals, at_ns),
        SocketEvent::Close => {
            cx.exchange_sockets.remove(&cookie);
            // Exchanges counted before any exchange flow of the socket named its hop (those
            // flows can be held a while, e.g. by the tracer): the connection's own flow names
            // it now.
            settle_awaiting(cx, table, cookie, key, side, at_ns);
            cx.ledger.close(&node_name, cookie, totals)
        }
        SocketEvent::ConnectFailed => {
            let cause = if stats.error.is_empty() { "UNKNOWN" } else { stats.error.as_str() };
            table.tally(key, side, TallyKind::ConnectFailures, cause, 1, at_ns);
            // Nothing of a failed connection is in the ledger: its totals are all new.
            totals
        }
        SocketEvent::Unknown => return Outcome::Ignored,
    };
    if delta == TcpTotals::default() {
        // Nothing grew (e.g. the close of a connection opened before the agent, with no
        // traffic since): no series for it.
        return Outcome::Counted;
    }
    let (s, _) = table.side_mut(key, side, at_ns);
    s.retransmits += u64::from(delta.retransmits);
    s.resets += u64::from(delta.resets);
    s.bytes_sent += delta.bytes_sent;
    s.bytes_received += delta.bytes_received;
    Outcome::Counted
}

/// Adds one exchange measured in the kernel on socket `cookie` to its hop (`latency_ns` `None`
/// for an unanswered one). Until an exchange flow of that socket names its hop, its exchanges
/// wait (and count there once it does).
pub fn apply_exchange(
    cookie: u64,
    latency_ns: Option<u64>,
    failed: bool,
    at_ns: u64,
    cx: &mut Context,
    table: &mut HopTable,
) -> Outcome {
    let (requests, errors, timeouts, latency) =
        if let Some((key, side)) = cx.exchange_sockets.get(&cookie) {
            let (s, _) = table.side_mut(key, *side, at_ns);
            (&mut s.requests, &mut s.errors, &mut s.timeouts, &mut s.latency)
        } else {
            if cx.awaiting.len() >= AWAITING_MAX && !cx.awaiting.contains_key(&cookie) {
                cx.exchanges_without_hop += 1;
                return Outcome::Ignored;
            }
            let w = cx.awaiting.entry(cookie).or_default();
            w.last_ns = at_ns;
            (&mut w.requests, &mut w.errors, &mut w.timeouts, &mut w.latency)
        };
    *requests += 1;
    if let Some(ns) = latency_ns {
        *errors += u64::from(failed);
        latency.record(ns);
    } else {
        *errors += 1;
        *timeouts += 1;
    }
    Outcome::Counted
}

/// DNS rcode names (RFC 1035, RFC 2136, RFC 6895).
#[must_use]
pub fn rcode_name(rcode: u32) -> &'static str {
    match rcode {
        0 => "NOERROR",
        1 => "FORMERR",
        2 => "SERVFAIL",
        3 => "NXDOMAIN",
        4 => "NOTIMP",
        5 => "REFUSED",
        6 => "YXDOMAIN",
        7 => "YXRRSET",
        8 => "NXRRSET",
        9 => "NOTAUTH",
        10 => "NOTZONE",
        _ => "OTHER",
    }
}
