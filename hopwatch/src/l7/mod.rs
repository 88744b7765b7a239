//! Application-layer tracking: kernel data events → per-connection sessions → completed
//! exchanges, measured on each socket that sees them (client side and, when the server runs on
//! this node, server side), paired across the two ends of a hop.

pub(crate) mod session;
pub(crate) mod setup;
pub(crate) mod stream;
pub(crate) mod tls;

use std::collections::VecDeque;

use hopwatch_common::{
    CALLER_COROUTINE, DIR_EGRESS, DIR_INGRESS, DataEvent, IPPROTO_UDP, SRC_TLS, ThreadRequest,
    Tuple,
    exchange::{EXCH_F_SERVER, EXCH_F_UNANSWERED, ExchangeEvent, Promotion},
};
use hopwatch_proto::compact::Compact as _;
use rustc_hash::FxHashMap;

use self::session::{Exchange, MessageParser, Session};

/// Connections with live L7 sessions; beyond this new ones are counted, not tracked.
pub(crate) const MAX_SESSIONS: usize = 65_536;
/// Latest exchanges of a socket remembered for pairing with the other end of the hop: both ends
/// are read from one event stream, so the other end completes the same exchange within a few.
const PAIR_WINDOW: usize = 8;
/// Closed connections whose latest exchanges are still remembered (the server end of a
/// `Connection: close` exchange closes before the client reads the response).
const CLOSED_REMEMBERED: usize = 4096;
const DNS_PORT: u16 = 53;
/// Exchanges a connection completes on the capture path before it is promoted to the kernel's
/// exchange engine (all of them one request, one response).
const PROMOTE_AFTER: u64 = 2;
/// Promotions waiting for the agent to hand them to the kernel; beyond this none are made.
const MAX_PROMOTIONS: usize = 4096;

/// Which connections are promoted to the kernel's exchange engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FastPath {
    /// HTTP/1 in clear: measured by the socket-layer hooks (socket storage), so not on the
    /// syscall path.
    pub clear: bool,
    /// HTTP/1 over TLS: measured by the TLS probes, on either path.
    pub tls: bool,
}

impl FastPath {
    pub const OFF: Self = Self { clear: false, tls: false };
    pub const ALL: Self = Self { clear: true, tls: true };
}

/// A completed (or timed-out) exchange, ready to become a flow.
#[derive(Debug, Clone)]
pub(crate) struct Completed<Req, Resp> {
    pub cookie: u64,
    pub exchange: Exchange<Req, Resp>,
    /// This socket is the server end (it received the request).
    pub server_side: bool,
    /// The plaintext came from TLS uprobes.
    pub tls: bool,
    /// Latency of the same exchange measured at the other end of the hop, when seen.
    pub peer_latency_ns: Option<u64>,
    /// Addresses as the kernel saw them on the response (or request) syscall.
    pub tuple: Tuple,
    /// Process that made the response syscall (or the request one, for a timeout).
    pub pid: u32,
    pub comm: [u8; 16],
    pub cgroup_id: u64,
    /// Client sockets: the inbound request the sending thread was serving when the request
    /// started (see [`ThreadRequest`]).
    pub caller: ThreadRequest,
}

/// What the tracker could not keep or parse, for the agent's counters.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct TrackerStats {
    pub sessions_overflow: u64,
    pub unparsed_connections: u64,
    /// Full records of the kernel's exchange engine whose request head did not parse (counted
    /// in the hops from the kernel's measurement, not recorded).
    pub fast_unparsed: u64,
}

/// An exchange the kernel measured and userspace only counts (no flow is built for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CountedExchange {
    pub cookie: u64,
    pub server_side: bool,
    /// `None`: the request was never answered (the connection closed first).
    pub latency_ns: Option<u64>,
    pub failed: bool,
}

/// What an exchange record of the kernel's engine becomes.
#[derive(Debug)]
pub(crate) enum Measured<Req, Resp> {
    /// Recorded in full: a flow.
    Recorded(Completed<Req, Resp>),
    Counted(CountedExchange),
}

/// The latencies of a socket's latest exchanges, by exchange index.
#[derive(Debug, Default, Clone, Copy)]
struct Latencies {
    /// `(index + 1, latency)` in slot `index % PAIR_WINDOW`; 0 marks an empty slot.
    slots: [(u64, u64); PAIR_WINDOW],
}

impl Latencies {
    fn remember(&mut self, index: u64, latency_ns: u64) {
        self.slots[Self::slot(index)] = (index + 1, latency_ns);
    }

    fn get(&self, index: u64) -> Option<u64> {
        let (stored, latency) = self.slots[Self::slot(index)];
        (stored == index + 1).then_some(latency)
    }

    fn slot(index: u64) -> usize {
        usize::try_from(index % PAIR_WINDOW as u64).expect("below the window")
    }
}

struct Tracked<P: MessageParser> {
    session: Session<P>,
    latencies: Latencies,
    server_side: bool,
    tls: bool,
    last_tuple: Tuple,
    last_pid: u32,
    last_comm: [u8; 16],
    last_cgroup: u64,
    engine: Engine,
    /// The caller the kernel attached to the latest request's first message (client sockets).
    caller: ThreadRequest,
    /// An exchange index and the turns its response started at: maps a request's turns (what
    /// the kernel names an inbound request by) to its exchange index.
    anchor: (u64, u32),
    /// Turns of the latest request's first message.
    request_turns: u32,
}

impl<P: MessageParser> Tracked<P> {
    fn new(parser: P, opened_ns: u64, server_side: bool, tuple: Tuple) -> Self {
        Self {
            session: Session::new(parser, opened_ns),
            latencies: Latencies::default(),
            server_side,
            tls: false,
            last_tuple: tuple,
            last_pid: 0,
            last_comm: [0; 16],
            last_cgroup: 0,
            engine: Engine::Capture,
            caller: ThreadRequest::default(),
            // Seen from its start: the first request starts at turn 1.
            anchor: (0, 2),
            request_turns: 0,
        }
    }
}

/// Where a connection's exchanges are measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Engine {
    /// From captured bytes, here.
    Capture,
    /// Handed to the kernel's exchange engine, whose records have not arrived yet.
    Promoted,
    /// The kernel's records arrive: the capture path's waiting requests are stale.
    Kernel,
}

/// Builds a parser for a new connection from its first data event (the kernel's protocol guess,
/// the transport) and the server port; `None` when the protocol is not parsed.
pub(crate) type ParserFactory<P> = Box<dyn Fn(&DataEvent, u16) -> Option<P> + Send>;

pub(crate) struct L7Tracker<P: MessageParser> {
    // Keys are kernel socket cookies (not attacker-chosen): a fast non-keyed hash is fine.
    sessions: FxHashMap<u64, Tracked<P>>,
    /// Latest latencies of connections closed recently, oldest first in `closed_order`.
    closed: FxHashMap<u64, Latencies>,
    closed_order: VecDeque<u64>,
    /// Connections the peer reset, closed at their deadline (monotonic ns), in deadline order.
    closing: VecDeque<(u64, u64)>,
    make: ParserFactory<P>,
    /// Promote alternating connections to the kernel's exchange engine.
    fast_path: FastPath,
    /// Promotions for the agent to hand to the kernel (socket cookie, promotion).
    promotions: Vec<(u64, Promotion)>,
    pub stats: TrackerStats,
}

impl<P: MessageParser> L7Tracker<P> {
    pub(crate) fn new(make: ParserFactory<P>) -> Self {
        Self {
            sessions: FxHashMap::default(),
            closed: FxHashMap::default(),
            closed_order: VecDeque::new(),
            closing: VecDeque::new(),
            make,
            fast_path: FastPath::OFF,
            promotions: Vec::new(),
            stats: TrackerStats::default(),
        }
    }

    /// Gives back the room of sessions gone (after a burst of connections).
    pub(crate) fn compact(&mut self) {
        self.sessions.compact();
        self.closed.compact();
        self.closed_order.compact();
        self.closing.compact();
    }

    /// Promote connections to the kernel's exchange engine from now on.
    pub(crate) fn with_fast_path(mut self, which: FastPath) -> Self {
        self.fast_path = which;
        self
    }

    /// The promotions made since the last call, for the kernel.
    pub(crate) fn take_promotions(&mut self) -> Vec<(u64, Promotion)> {
        std::mem::take(&mut self.promotions)
    }

    #[cfg(test)]
    pub(crate) fn sessions(&self) -> usize {
        self.sessions.len()
    }

    #[cfg(test)]
    /// Feeds one data event. `server_side` is the socket's role when the connection table knows
    /// it; `peer` is the cookie of the socket at the other end, when it is on this node.
    pub(crate) fn on_data(
        &mut self,
        ev: &DataEvent,
        payload: &[u8],
        server_side: Option<bool>,
        peer: Option<u64>,
    ) -> Vec<Completed<P::Req, P::Resp>> {
        self.on_data_with(ev, payload, server_side, 0, || peer)
    }

    /// [`L7Tracker::on_data`] with the peer's cookie looked up only when an exchange completes
    /// (most data events complete none, and the lookup hashes two socket addresses), and with
    /// when the connection was established (`opened_ns`, 0 if unknown): an error the server
    /// sends before any request is an exchange measured from then.
    pub(crate) fn on_data_with(
        &mut self,
        ev: &DataEvent,
        payload: &[u8],
        server_side: Option<bool>,
        opened_ns: u64,
        peer: impl FnOnce() -> Option<u64>,
    ) -> Vec<Completed<P::Req, P::Resp>> {
        let cookie = ev.header.socket_cookie;
        if !self.sessions.contains_key(&cookie) {
            let server_side = server_side.unwrap_or_else(|| guess_server_side(ev));
            let server_port = if server_side { ev.tuple.sport } else { ev.tuple.dport };
            let Some(parser) = (self.make)(ev, server_port) else {
                self.stats.unparsed_connections += 1;
                return Vec::new();
            };
            if self.sessions.len() >= MAX_SESSIONS {
                self.stats.sessions_overflow += 1;
                return Vec::new();
            }
            self.sessions.insert(cookie, Tracked::new(parser, opened_ns, server_side, ev.tuple));
        }
        let t = self.sessions.get_mut(&cookie).expect("inserted above");
        t.tls |= ev.source == SRC_TLS;
        if ev.tuple.family != 0 {
            t.last_tuple = ev.tuple;
        }
        t.last_pid = ev.header.tgid;
        t.last_comm = ev.comm;
        t.last_cgroup = ev.header.cgroup_id;
        let is_request = match ev.direction {
            DIR_EGRESS => !t.server_side,
            DIR_INGRESS => t.server_side,
            _ => return Vec::new(),
        };
        let ts = ev.header.timestamp_ns;
        let total = u64::from(ev.len);
        if is_request && ev.turns != t.request_turns {
            // The first message of a request: the kernel attached its caller.
            t.request_turns = ev.turns;
            t.caller = ev.caller;
        }
        if is_request {
            t.session.on_request_data(payload, total, ts);
            return Vec::new();
        }
        if t.server_side && ev.caller.method == CALLER_COROUTINE {
            // The response's first message: the asyncio task answering (request tracing).
            t.caller = ev.caller;
        }
        let done = t.session.on_response_data(payload, total, ts);
        if done.is_empty() {
            return Vec::new();
        }
        let last_index = done.last().map(|x| x.index);
        if let (Some(i), true) = (last_index, ev.turns != 0) {
            t.anchor = (i, ev.turns);
        }
        if (if t.tls { self.fast_path.tls } else { self.fast_path.clear })
            && t.engine == Engine::Capture
            // The plaintext's source stays the same (TLS connections: the TLS probes, whose
            // engine has no socket: the pipeline adds the ports).
            && (ev.source == SRC_TLS) == t.tls
            && ev.turns != 0
            && server_side.is_some()
            && ev.tuple.protocol != IPPROTO_UDP
            && last_index.is_some_and(|i| i + 1 >= PROMOTE_AFTER)
            && t.session.parser().fast_path()
            && t.session.alternating()
            && self.promotions.len() < MAX_PROMOTIONS
        {
            t.engine = Engine::Promoted;
            self.promotions.push((
                cookie,
                Promotion {
                    anchor_index: last_index.unwrap_or(0),
                    anchor_turns: ev.turns,
                    ports: [0; 2],
                    server: u8::from(t.server_side),
                    _pad: [0; 7],
                },
            ));
        }
        let peer = peer();
        let (server_side, tls) = (t.server_side, t.tls);
        let (tuple, pid, comm, cgroup_id) = (t.last_tuple, t.last_pid, t.last_comm, t.last_cgroup);
        let caller = t.caller;
        done.into_iter()
            .map(|exchange| {
                let peer_latency_ns = self.pair(cookie, peer, &exchange);
                Completed {
                    cookie,
                    exchange,
                    server_side,
                    tls,
                    peer_latency_ns,
                    tuple,
                    pid,
                    comm,
                    cgroup_id,
                    caller,
                }
            })
            .collect()
    }

    /// One exchange the kernel's engine measured on a promoted socket: counted, or (for a full
    /// record, with the request's head and the response's first bytes) parsed into an exchange
    /// as the capture path would have.
    pub(crate) fn on_exchange(
        &mut self,
        ev: &ExchangeEvent,
        full: Option<(&[u8], &[u8])>,
        peer: impl FnOnce() -> Option<u64>,
    ) -> Measured<P::Req, P::Resp> {
        let cookie = ev.header.socket_cookie;
        let unanswered = ev.flags & EXCH_F_UNANSWERED != 0;
        let latency_ns = ev.header.timestamp_ns.saturating_sub(ev.request_ns);
        let counted = Measured::Counted(CountedExchange {
            cookie,
            server_side: ev.flags & EXCH_F_SERVER != 0,
            latency_ns: (!unanswered).then_some(latency_ns),
            failed: unanswered || ev.status >= 500,
        });
        let Some(t) = self.sessions.get_mut(&cookie) else { return counted };
        if std::mem::replace(&mut t.engine, Engine::Kernel) != Engine::Kernel {
            t.session.forget_pending();
        }
        if !unanswered {
            t.latencies.remember(ev.index, latency_ns);
        }
        if ev.header.tgid != 0 {
            t.last_pid = ev.header.tgid;
        }
        let Some((head, response)) = full else { return counted };
        let probe =
            DataEvent { protocol: ev.protocol, tuple: t.last_tuple, ..DataEvent::default() };
        let port = if t.server_side { t.last_tuple.sport } else { t.last_tuple.dport };
        let Some(parser) = (self.make)(&probe, port) else { return counted };
        let mut s = Session::new(parser, 0);
        s.on_request_data(head, u64::from(ev.request_bytes), ev.request_ns);
        let ts = ev.header.timestamp_ns;
        let framed = if unanswered {
            None
        } else {
            s.on_response_data(response, u64::from(ev.response_bytes), ts).pop()
        };
        let mut exchange = if let Some(x) = framed {
            x
        } else {
            // Unanswered, or the response's first bytes end inside its headers (the status is
            // the kernel's).
            let response = if unanswered { None } else { P::status_response(ev.status) };
            let (Some(req), true) = (s.take_pending(), unanswered || response.is_some()) else {
                self.stats.fast_unparsed += 1;
                return counted;
            };
            Exchange {
                request: req.msg,
                response,
                request_ns: req.last_ns,
                response_ns: if unanswered { 0 } else { ts },
                index: 0,
            }
        };
        exchange.index = ev.index;
        let peer_latency_ns = peer()
            .and_then(|p| {
                self.sessions.get(&p).map(|t| &t.latencies).or_else(|| self.closed.get(&p))
            })
            .and_then(|l| l.get(ev.index));
        let t = &self.sessions[&cookie];
        Measured::Recorded(Completed {
            cookie,
            exchange,
            server_side: t.server_side,
            tls: t.tls,
            peer_latency_ns,
            tuple: t.last_tuple,
            pid: t.last_pid,
            comm: t.last_comm,
            cgroup_id: t.last_cgroup,
            caller: ev.caller,
        })
    }

    /// Whether socket `cookie` has an L7 session.
    pub(crate) fn tracks(&self, cookie: u64) -> bool {
        self.sessions.contains_key(&cookie)
    }

    /// The exchange index of the request that started at `turns` on the server socket `cookie`
    /// (what [`ThreadRequest`] names it by), when that socket is tracked as a server's.
    pub(crate) fn index_at(&self, cookie: u64, turns: u32) -> Option<u64> {
        let t = self.sessions.get(&cookie).filter(|t| t.server_side)?;
        let (index, response_turns) = t.anchor;
        // Each exchange is two turns; its response starts the turn after its request.
        let delta = i64::from(turns.wrapping_add(1)) - i64::from(response_turns);
        u64::try_from(i64::try_from(index).ok()? + delta / 2).ok()
    }

    /// Remembers this exchange's latency and returns the other end's, if already seen.
    fn pair(
        &mut self,
        cookie: u64,
        peer: Option<u64>,
        x: &Exchange<P::Req, P::Resp>,
    ) -> Option<u64> {
        if let Some(t) = self.sessions.get_mut(&cookie) {
            t.latencies.remember(x.index, x.latency_ns());
        }
        let p = peer?;
        let theirs = self.sessions.get(&p).map(|t| &t.latencies).or_else(|| self.closed.get(&p));
        theirs.and_then(|l| l.get(x.index))
    }

    /// Reports requests unanswered since before `deadline_ns` on every connection.
    pub(crate) fn expire(&mut self, deadline_ns: u64) -> Vec<Completed<P::Req, P::Resp>> {
        let mut out = Vec::new();
        for (&cookie, t) in &mut self.sessions {
            for exchange in t.session.expire(deadline_ns) {
                out.push(Completed {
                    cookie,
                    exchange,
                    server_side: t.server_side,
                    tls: t.tls,
                    peer_latency_ns: None,
                    tuple: t.last_tuple,
                    pid: t.last_pid,
                    comm: t.last_comm,
                    cgroup_id: t.last_cgroup,
                    caller: t.caller,
                });
            }
        }
        out
    }

    /// The peer reset the connection: what it sent before is still in the socket's receive
    /// queue and may be read after the socket closed (a server that refuses with an error and
    /// closes resets the client's request). The session is closed at `deadline_ns`
    /// ([`L7Tracker::close_due`]).
    pub(crate) fn close_after(&mut self, cookie: u64, deadline_ns: u64) {
        if self.sessions.contains_key(&cookie) {
            self.closing.push_back((cookie, deadline_ns));
        }
    }

    /// Closes the sessions [`L7Tracker::close_after`] kept whose deadline is before `now_ns`.
    pub(crate) fn close_due(&mut self, now_ns: u64) -> Vec<Completed<P::Req, P::Resp>> {
        let mut out = Vec::new();
        while let Some(&(cookie, deadline)) = self.closing.front() {
            if deadline > now_ns {
                break;
            }
            self.closing.pop_front();
            out.extend(self.close(cookie));
        }
        out
    }

    /// The connection closed: its unanswered requests will never be answered.
    pub(crate) fn close(&mut self, cookie: u64) -> Vec<Completed<P::Req, P::Resp>> {
        let Some(mut t) = self.sessions.remove(&cookie) else { return Vec::new() };
        if self.closed_order.len() >= CLOSED_REMEMBERED
            && let Some(old) = self.closed_order.pop_front()
        {
            self.closed.remove(&old);
        }
        self.closed.insert(cookie, t.latencies);
        self.closed_order.push_back(cookie);
        t.session
            .expire(u64::MAX)
            .into_iter()
            .map(|exchange| Completed {
                cookie,
                exchange,
                server_side: t.server_side,
                tls: t.tls,
                peer_latency_ns: None,
                tuple: t.last_tuple,
                pid: t.last_pid,
                comm: t.last_comm,
                cgroup_id: t.last_cgroup,
                caller: t.caller,
            })
            .collect()
    }
}

/// Role of a socket the connection table does not know: DNS by port, otherwise the end with the
/// lower port is taken as the server (clients use ephemeral ports).
fn guess_server_side(ev: &DataEvent) -> bool {
    if ev.tuple.protocol == IPPROTO_UDP {
        return ev.tuple.sport == DNS_PORT;
    }
    ev.tuple.sport != 0 && ev.tuple.sport < ev.tuple.dport
}

#[cfg(test)]
mod tests;
