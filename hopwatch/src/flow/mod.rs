//! Kernel events → Hubble-shaped [`Flow`]s (the one module converting into the wire type).
//!
//! Orientation follows Hubble: `source` is the end that opened the connection (or sent the
//! packet), `destination` the other; `traffic_direction` says which of them this node traced
//! (EGRESS: the client, INGRESS: the server).

pub(crate) mod forwarded;
mod l7;
pub(crate) mod records;

use std::net::{IpAddr, SocketAddr};

use hopwatch_common::{
    CONN_F_FIN_IN, CONN_F_FIN_OUT_ACKED, CONN_F_PREEXISTING, CONN_F_RESET_IN_SYN_SENT,
    CONN_F_STATS_VALID, DropEvent, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP,
    ROLE_CLIENT, TcpEvent, TcpOp,
};
use hopwatch_proto::flow::{
    self as pb, CiliumEventType, Endpoint, Flow, FlowType, IpVersion, Layer4, SocketEvent,
    TcpFlags, TcpStats, TrafficDirection, Verdict, layer4::Protocol,
};

pub(crate) use self::l7::L7Observation;
use crate::{
    conntrack::{Conn, Process, Role, endpoints},
    drops::{DropReasons, symbols::KernelSymbols},
};

/// Cilium's monitor message types, which Hubble filters (`--type drop`, `--type trace`,
/// `--type l7`) use.
const EVENT_TYPE_DROP: i32 = 1;
const EVENT_TYPE_TRACE: i32 = 4;
pub(crate) const EVENT_TYPE_L7: i32 = 129;

/// Converts `CLOCK_MONOTONIC` nanoseconds (what BPF programs stamp) to wall-clock time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    realtime_minus_monotonic_ns: i128,
}

impl Clock {
    #[must_use]
    pub fn now() -> Self {
        let read = |id| {
            let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
            // SAFETY: valid clock id and out-pointer.
            unsafe { libc::clock_gettime(id, &raw mut ts) };
            i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
        };
        let monotonic = read(libc::CLOCK_MONOTONIC);
        let wall = read(libc::CLOCK_REALTIME);
        Self { realtime_minus_monotonic_ns: wall - monotonic }
    }

    #[must_use]
    pub fn monotonic_now_ns() -> u64 {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: valid clock id and out-pointer.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
        // CLOCK_MONOTONIC is never negative.
        ts.tv_sec.cast_unsigned() * 1_000_000_000 + ts.tv_nsec.cast_unsigned()
    }

    #[must_use]
    pub fn timestamp(&self, monotonic_ns: u64) -> prost_types::Timestamp {
        let wall = i128::from(monotonic_ns) + self.realtime_minus_monotonic_ns;
        prost_types::Timestamp {
            seconds: i64::try_from(wall.div_euclid(1_000_000_000)).unwrap_or(i64::MAX),
            nanos: i32::try_from(wall.rem_euclid(1_000_000_000)).expect("below 1e9"),
        }
    }
}

/// Builds flows from kernel events.
pub struct FlowBuilder {
    pub node_name: String,
    pub clock: Clock,
    pub reasons: DropReasons,
    pub symbols: Option<KernelSymbols>,
}

impl FlowBuilder {
    /// A flow for a TCP connection event. `conn` is the traced socket, `peer` the socket at the
    /// other end when it is on this node too.
    #[must_use]
    pub fn tcp(&self, ev: &TcpEvent, conn: &Conn, peer: Option<&Conn>) -> Flow {
        let op = TcpOp::from_u8(ev.op).unwrap_or(TcpOp::Update);
        let (src, dst, direction) = match conn.role {
            Role::Client => (conn.local(), conn.remote(), TrafficDirection::Egress),
            Role::Server => (conn.remote(), conn.local(), TrafficDirection::Ingress),
        };
        let (local_proc, peer_proc) =
            (conn.process.as_deref(), peer.and_then(|p| p.process.as_deref()));
        let (src_proc, dst_proc) = match conn.role {
            Role::Client => (local_proc, peer_proc),
            Role::Server => (peer_proc, local_proc),
        };
        let stats = tcp_stats(ev, op);
        let verdict = if op == TcpOp::ConnectFailed { Verdict::Error } else { Verdict::Forwarded };
        let socket_event = match op {
            TcpOp::Connected => SocketEvent::Connect,
            TcpOp::ConnectFailed => SocketEvent::ConnectFailed,
            TcpOp::Accepted => SocketEvent::Accept,
            TcpOp::Closed => SocketEvent::Close,
            TcpOp::Update => SocketEvent::Update,
        };
        let reset = ev.stats.resets_received > 0
            || ev.stats.resets_sent > 0
            || ev.flags & CONN_F_RESET_IN_SYN_SENT != 0;
        let flags = TcpFlags {
            syn: matches!(op, TcpOp::Connected | TcpOp::Accepted | TcpOp::ConnectFailed),
            ack: matches!(op, TcpOp::Accepted | TcpOp::Update | TcpOp::Closed),
            fin: op == TcpOp::Closed && !reset,
            rst: reset && matches!(op, TcpOp::Closed | TcpOp::ConnectFailed),
            ..TcpFlags::default()
        };
        Flow {
            time: Some(self.clock.timestamp(ev.header.timestamp_ns)),
            uuid: new_uuid(),
            verdict: verdict.into(),
            ip: Some(ip(src.ip(), dst.ip())),
            l4: Some(Layer4 {
                protocol: Some(Protocol::Tcp(pb::Tcp {
                    source_port: src.port().into(),
                    destination_port: dst.port().into(),
                    flags: Some(flags),
                })),
            }),
            source: Some(Endpoint::default()),
            destination: Some(Endpoint::default()),
            r#type: FlowType::L3L4.into(),
            node_name: self.node_name.clone(),
            event_type: Some(CiliumEventType { r#type: EVENT_TYPE_TRACE, sub_type: 0 }),
            traffic_direction: direction.into(),
            is_reply: Some(false),
            socket_cookie: conn.cookie,
            cgroup_id: conn.process.as_ref().map_or(0, |p| p.cgroup_id),
            tcp_stats: Some(stats),
            source_process: src_proc.map(process),
            destination_process: dst_proc.map(process),
            socket_event: socket_event.into(),
            netns_inode: conn.netns,
            ..Flow::default()
        }
    }

    /// A flow for a dropped packet; `src_proc`/`dst_proc` are the processes owning the sockets at
    /// either end when known.
    #[must_use]
    pub fn drop(
        &self,
        ev: &DropEvent,
        src_proc: Option<&Process>,
        dst_proc: Option<&Process>,
    ) -> Flow {
        let reason = self.reasons.name(ev.reason);
        let location = self
            .symbols
            .as_ref()
            .map_or_else(|| format!("{:#x}", ev.location), |s| s.resolve(ev.location));
        let (ip_layer, l4) = match endpoints(&ev.tuple) {
            Some((s, d)) => (Some(ip(s.ip(), d.ip())), layer4(ev, s, d)),
            None => (None, None),
        };
        Flow {
            time: Some(self.clock.timestamp(ev.header.timestamp_ns)),
            uuid: new_uuid(),
            verdict: Verdict::Dropped.into(),
            ip: ip_layer,
            l4,
            source: Some(Endpoint::default()),
            destination: Some(Endpoint::default()),
            r#type: FlowType::L3L4.into(),
            node_name: self.node_name.clone(),
            event_type: Some(CiliumEventType { r#type: EVENT_TYPE_DROP, sub_type: 0 }),
            interface: (ev.ifindex != 0)
                .then(|| pb::NetworkInterface { index: ev.ifindex, name: String::new() }),
            kernel_drop_reason: reason,
            kernel_drop_location: location,
            source_process: src_proc.map(process),
            destination_process: dst_proc.map(process),
            netns_inode: ev.tuple.netns,
            ..Flow::default()
        }
    }
}

/// A random flow id in its hyphenated text form, written straight into its string (one per
/// flow: `to_string` goes through the formatting machinery).
pub(crate) fn new_uuid() -> String {
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf).to_owned()
}

pub(crate) fn ip(src: IpAddr, dst: IpAddr) -> pb::Ip {
    pb::Ip {
        source: ip_string(src),
        destination: ip_string(dst),
        ip_version: if src.is_ipv4() { IpVersion::IPv4 } else { IpVersion::IPv6 }.into(),
        encrypted: false,
    }
}

/// An address as text; IPv4 without the formatting machinery (two per flow, on the hot path).
fn ip_string(ip: IpAddr) -> String {
    let IpAddr::V4(v4) = ip else { return ip.to_string() };
    let mut s = String::with_capacity(15);
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            s.push('.');
        }
        if octet >= 100 {
            s.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            s.push(char::from(b'0' + octet / 10 % 10));
        }
        s.push(char::from(b'0' + octet % 10));
    }
    s
}

fn layer4(ev: &DropEvent, s: SocketAddr, d: SocketAddr) -> Option<Layer4> {
    let protocol = match ev.tuple.protocol {
        IPPROTO_TCP => Protocol::Tcp(pb::Tcp {
            source_port: s.port().into(),
            destination_port: d.port().into(),
            flags: None,
        }),
        IPPROTO_UDP => Protocol::Udp(pb::Udp {
            source_port: s.port().into(),
            destination_port: d.port().into(),
        }),
        IPPROTO_ICMP => {
            Protocol::IcmPv4(pb::IcmPv4 { r#type: ev.icmp_type.into(), code: ev.icmp_code.into() })
        }
        IPPROTO_ICMPV6 => {
            Protocol::IcmPv6(pb::IcmPv6 { r#type: ev.icmp_type.into(), code: ev.icmp_code.into() })
        }
        _ => return None,
    };
    Some(Layer4 { protocol: Some(protocol) })
}

pub(crate) fn process(p: &Process) -> pb::Process {
    pb::Process { pid: p.pid, comm: p.comm.to_string(), cgroup_id: p.cgroup_id }
}

/// errno values the TCP stack leaves in `sk_err`.
fn errno_name(err: u32) -> Option<&'static str> {
    Some(match err {
        0 => return None,
        32 => "EPIPE",
        101 => "ENETUNREACH",
        103 => "ECONNABORTED",
        104 => "ECONNRESET",
        110 => "ETIMEDOUT",
        111 => "ECONNREFUSED",
        113 => "EHOSTUNREACH",
        _ => return Some("EUNKNOWN"),
    })
}

fn tcp_stats(ev: &TcpEvent, op: TcpOp) -> TcpStats {
    let s = &ev.stats;
    let duration_ns =
        if ev.start_ns == 0 { 0 } else { ev.header.timestamp_ns.saturating_sub(ev.start_ns) };
    let error = match (op, errno_name(ev.error)) {
        (_, Some(name)) => name.to_owned(),
        (TcpOp::ConnectFailed, None) if ev.flags & CONN_F_RESET_IN_SYN_SENT != 0 => {
            "ECONNREFUSED".to_owned()
        }
        // The application gave up before the kernel did (its own connect timeout): the peer
        // never answered the SYNs it sent.
        (TcpOp::ConnectFailed, None) if s.retransmit_events > 0 || duration_ns >= 1_000_000_000 => {
            "ETIMEDOUT".to_owned()
        }
        (TcpOp::ConnectFailed, None) => "ECONNABORTED".to_owned(),
        (TcpOp::Closed, None) if s.resets_received > 0 => "ECONNRESET".to_owned(),
        _ => String::new(),
    };
    TcpStats {
        connect_latency_ns: ev.connect_latency_ns,
        srtt_ns: u64::from(s.srtt_us) * 1000,
        retransmits: s.total_retrans.max(s.retransmit_events),
        // Counters straight from the kernel event: a corrupt one must not overflow.
        resets: s.resets_sent.saturating_add(s.resets_received),
        bytes_sent: payload_sent(ev),
        bytes_received: s.bytes_received.saturating_sub(u64::from(ev.flags & CONN_F_FIN_IN != 0)),
        duration_ns,
        error,
        resets_sent: s.resets_sent,
        resets_received: s.resets_received,
        segments_sent: s.segs_out,
        segments_received: s.segs_in,
        complete: ev.flags & CONN_F_PREEXISTING == 0 && ev.flags & CONN_F_STATS_VALID != 0,
    }
}

/// Payload bytes the peer acknowledged. The kernel's `bytes_acked` also counts the sequence
/// numbers a client's SYN and our FIN consume.
fn payload_sent(ev: &TcpEvent) -> u64 {
    let syn = ev.role == ROLE_CLIENT && ev.connect_latency_ns > 0;
    let fin = ev.flags & CONN_F_FIN_OUT_ACKED != 0;
    ev.stats.bytes_acked.saturating_sub(u64::from(syn) + u64::from(fin))
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::Clock;

    /// A clock whose monotonic zero is `wall_ns` of wall time.
    pub(crate) fn clock_at(wall_ns: i128) -> Clock {
        Clock { realtime_minus_monotonic_ns: wall_ns }
    }
}

#[cfg(test)]
mod tests {
    use hopwatch_common::{AF_INET, EventKind, ROLE_CLIENT};

    use super::*;

    fn builder() -> FlowBuilder {
        FlowBuilder {
            node_name: "node-a".into(),
            clock: Clock { realtime_minus_monotonic_ns: 1_700_000_000_000_000_000 },
            reasons: DropReasons::from_pairs(&[(12, "NETFILTER_DROP")]),
            symbols: Some(KernelSymbols::parse("ffffffff81000000 T nft_do_chain\n")),
        }
    }

    fn client_event(op: TcpOp) -> TcpEvent {
        let mut ev = TcpEvent::default();
        ev.header.kind = EventKind::Tcp as u32;
        ev.header.timestamp_ns = 3_000_000_000;
        ev.header.socket_cookie = 77;
        ev.header.tgid = 4242;
        ev.comm[..4].copy_from_slice(b"curl");
        ev.op = op as u8;
        ev.role = ROLE_CLIENT;
        ev.tuple.family = AF_INET;
        ev.tuple.saddr[..4].copy_from_slice(&[10, 0, 0, 1]);
        ev.tuple.daddr[..4].copy_from_slice(&[10, 0, 0, 2]);
        ev.tuple.sport = 40000;
        ev.tuple.dport = 80;
        ev.start_ns = 1_000_000_000;
        ev
    }

    #[test]
    fn counters_at_their_limits_do_not_overflow() {
        // Found by the `events` fuzz target: reset counts near the type's maximum.
        let mut ev = client_event(TcpOp::Closed);
        ev.stats.resets_sent = u32::MAX;
        ev.stats.resets_received = u32::MAX;
        assert_eq!(tcp_stats(&ev, TcpOp::Closed).resets, u32::MAX);
        let conn = Conn::from_event(&ev).unwrap();
        let f = builder().tcp(&ev, &conn, None);
        assert_eq!(f.verdict(), Verdict::Forwarded, "a closed connection, reset: {f:?}");
    }

    #[test]
    fn addresses_print_as_std_does() {
        for a in ["0.0.0.0", "10.0.0.1", "192.168.100.255", "1.20.3.40", "::1", "fd00:213::2"] {
            let ip: IpAddr = a.parse().unwrap();
            assert_eq!(ip_string(ip), ip.to_string());
        }
    }

    #[test]
    fn client_connect_flow_is_oriented_and_measured() {
        let mut ev = client_event(TcpOp::Connected);
        ev.connect_latency_ns = 20_300_000;
        let conn = Conn::from_event(&ev).unwrap();
        let f = builder().tcp(&ev, &conn, None);
        let ip = f.ip.as_ref().unwrap();
        assert_eq!((ip.source.as_str(), ip.destination.as_str()), ("10.0.0.1", "10.0.0.2"));
        let Some(Protocol::Tcp(tcp)) = f.l4.as_ref().unwrap().protocol.as_ref() else { panic!() };
        assert_eq!((tcp.source_port, tcp.destination_port), (40000, 80));
        assert!(tcp.flags.as_ref().unwrap().syn);
        assert_eq!(f.traffic_direction(), TrafficDirection::Egress);
        assert_eq!(f.verdict(), Verdict::Forwarded);
        assert_eq!(f.source_process.as_ref().unwrap().comm, "curl");
        assert_eq!(f.tcp_stats.as_ref().unwrap().connect_latency_ns, 20_300_000);
        assert_eq!(f.time.unwrap().seconds, 1_700_000_003);
    }

    #[test]
    fn refused_connect_is_an_error_flow() {
        let mut ev = client_event(TcpOp::ConnectFailed);
        ev.error = 111;
        let conn = Conn::from_event(&ev).unwrap();
        let f = builder().tcp(&ev, &conn, None);
        assert_eq!(f.verdict(), Verdict::Error);
        assert_eq!(f.tcp_stats.as_ref().unwrap().error, "ECONNREFUSED");
    }

    #[test]
    fn app_abandoned_connect_after_syn_retransmits_is_a_timeout() {
        let mut ev = client_event(TcpOp::ConnectFailed);
        ev.stats.retransmit_events = 2;
        let conn = Conn::from_event(&ev).unwrap();
        let f = builder().tcp(&ev, &conn, None);
        assert_eq!(f.tcp_stats.as_ref().unwrap().error, "ETIMEDOUT");
    }

    #[test]
    fn drop_flow_names_reason_and_location() {
        let mut ev =
            DropEvent { reason: 12, location: 0xffff_ffff_8100_0010, ..DropEvent::default() };
        ev.tuple.family = AF_INET;
        ev.tuple.protocol = IPPROTO_UDP;
        ev.tuple.saddr[..4].copy_from_slice(&[10, 0, 0, 1]);
        ev.tuple.daddr[..4].copy_from_slice(&[10, 0, 0, 2]);
        ev.tuple.sport = 5000;
        ev.tuple.dport = 53;
        let f = builder().drop(&ev, None, None);
        assert_eq!(f.verdict(), Verdict::Dropped);
        assert_eq!(f.kernel_drop_reason, "NETFILTER_DROP");
        assert_eq!(f.kernel_drop_location, "nft_do_chain+0x10");
        assert!(matches!(
            f.l4.unwrap().protocol,
            Some(Protocol::Udp(pb::Udp { destination_port: 53, .. }))
        ));
    }
}
