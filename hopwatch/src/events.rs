//! Kernel events: decoding ring buffer records into typed events.
//!
//! Records are `#[repr(C)]` structs from `hopwatch-common`; a record too short for its kind or of
//! an unknown kind is a decode error the caller counts, never a panic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use hopwatch_common::{
    AF_INET, AF_INET6, DATA_MAX, DataEvent, DropEvent, EventHeader, EventKind, IPPROTO_TCP,
    TcpEvent, Tuple,
    exchange::{EXCH_F_FULL, EXCHANGE_HEAD, EXCHANGE_RESPONSE, ExchangeEvent},
};

#[derive(Debug, Clone)]
pub enum KernelEvent<'a> {
    Tcp(TcpEvent),
    Drop(DropEvent),
    /// Application data and the captured payload bytes (borrowed from the ring buffer record).
    Data(DataEvent, &'a [u8]),
    /// An exchange measured in the kernel, with (for a full record) the request's head and the
    /// response's first bytes.
    Exchange(ExchangeEvent, Option<(&'a [u8], &'a [u8])>),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("ring buffer record of {len} bytes is shorter than {need} bytes")]
    Short { len: usize, need: usize },
    #[error("ring buffer record has unknown kind {0}")]
    UnknownKind(u32),
}

fn read<T: Copy>(bytes: &[u8]) -> Result<T, DecodeError> {
    let need = size_of::<T>();
    if bytes.len() < need {
        return Err(DecodeError::Short { len: bytes.len(), need });
    }
    // SAFETY: `bytes` holds at least size_of::<T>() bytes and T is a plain-old-data event struct
    // (every bit pattern valid); read_unaligned copes with any alignment.
    Ok(unsafe { bytes.as_ptr().cast::<T>().read_unaligned() })
}

/// Decodes one ring buffer record.
pub fn decode(bytes: &[u8]) -> Result<KernelEvent<'_>, DecodeError> {
    let header: EventHeader = read(bytes)?;
    match EventKind::from_u32(header.kind) {
        Some(EventKind::Tcp) => read(bytes).map(KernelEvent::Tcp),
        Some(EventKind::Drop) => read(bytes).map(KernelEvent::Drop),
        Some(EventKind::Data) => {
            let ev: DataEvent = read(bytes)?;
            let captured = (ev.captured as usize).min(DATA_MAX);
            let start = size_of::<DataEvent>();
            let payload = bytes
                .get(start..start + captured)
                .ok_or(DecodeError::Short { len: bytes.len(), need: start + captured })?;
            Ok(KernelEvent::Data(ev, payload))
        }
        Some(EventKind::Exchange) => {
            let ev: ExchangeEvent = read(bytes)?;
            if ev.flags & EXCH_F_FULL == 0 {
                return Ok(KernelEvent::Exchange(ev, None));
            }
            let head_at = size_of::<ExchangeEvent>();
            let resp_at = head_at + EXCHANGE_HEAD;
            let end = resp_at + EXCHANGE_RESPONSE;
            if bytes.len() < end {
                return Err(DecodeError::Short { len: bytes.len(), need: end });
            }
            let head = &bytes[head_at..head_at + usize::from(ev.head_len).min(EXCHANGE_HEAD)];
            let resp =
                &bytes[resp_at..resp_at + usize::from(ev.response_len).min(EXCHANGE_RESPONSE)];
            Ok(KernelEvent::Exchange(ev, Some((head, resp))))
        }
        None => Err(DecodeError::UnknownKind(header.kind)),
    }
}

/// The source (`saddr`) and destination (`daddr`) addresses of a tuple, `None` for an unknown
/// family.
#[must_use]
pub(crate) fn addrs(t: &Tuple) -> Option<(IpAddr, IpAddr)> {
    match t.family {
        AF_INET => {
            let s = Ipv4Addr::new(t.saddr[0], t.saddr[1], t.saddr[2], t.saddr[3]);
            let d = Ipv4Addr::new(t.daddr[0], t.daddr[1], t.daddr[2], t.daddr[3]);
            Some((IpAddr::V4(s), IpAddr::V4(d)))
        }
        AF_INET6 => {
            let (s, d) = (Ipv6Addr::from(t.saddr), Ipv6Addr::from(t.daddr));
            // Dual-stack sockets talking IPv4 show v4-mapped addresses; report them as IPv4.
            Some((canonical(s), canonical(d)))
        }
        _ => None,
    }
}

/// The kernel's form of a TCP connection's addresses (`local` as the source).
pub(crate) fn tcp_tuple(local: SocketAddr, remote: SocketAddr, netns: u32) -> Tuple {
    let mut t = Tuple {
        sport: local.port(),
        dport: remote.port(),
        protocol: IPPROTO_TCP,
        netns,
        ..Tuple::default()
    };
    match (local.ip(), remote.ip()) {
        (IpAddr::V4(l), IpAddr::V4(r)) => {
            t.family = AF_INET;
            t.saddr[..4].copy_from_slice(&l.octets());
            t.daddr[..4].copy_from_slice(&r.octets());
        }
        (l, r) => {
            t.family = AF_INET6;
            t.saddr = v6(l).octets();
            t.daddr = v6(r).octets();
        }
    }
    t
}

fn v6(a: IpAddr) -> Ipv6Addr {
    match a {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    }
}

fn canonical(a: Ipv6Addr) -> IpAddr {
    a.to_ipv4_mapped().map_or(IpAddr::V6(a), IpAddr::V4)
}

#[cfg(test)]
mod tests {
    use hopwatch_common::TcpOp;

    use super::*;

    fn bytes_of<T>(v: &T) -> Vec<u8> {
        // SAFETY: reading the bytes of a plain-old-data value.
        unsafe {
            std::slice::from_raw_parts(std::ptr::from_ref::<T>(v).cast::<u8>(), size_of::<T>())
        }
        .to_vec()
    }

    #[test]
    fn decodes_a_tcp_event() {
        let mut ev = TcpEvent::default();
        ev.header.kind = EventKind::Tcp as u32;
        ev.op = TcpOp::Connected as u8;
        ev.tuple.protocol = IPPROTO_TCP;
        ev.tuple.sport = 4242;
        match decode(&bytes_of(&ev)).expect("decodes") {
            KernelEvent::Tcp(t) => {
                assert_eq!((t.op, t.tuple.sport), (TcpOp::Connected as u8, 4242));
            }
            other @ (KernelEvent::Drop(_) | KernelEvent::Data(..) | KernelEvent::Exchange(..)) => {
                panic!("wrong kind: {other:?}")
            }
        }
    }

    #[test]
    fn rejects_short_and_unknown_records() {
        let mut ev = DropEvent::default();
        ev.header.kind = EventKind::Drop as u32;
        let b = bytes_of(&ev);
        assert!(matches!(decode(&b[..50]), Err(DecodeError::Short { len: 50, .. })));
        assert!(matches!(decode(&b[..10]), Err(DecodeError::Short { len: 10, need: 40 })));
        let mut bad = b.clone();
        bad[0] = 99;
        assert_eq!(decode(&bad).unwrap_err(), DecodeError::UnknownKind(99));
    }

    #[test]
    fn decodes_exchange_records_with_and_without_their_bytes() {
        let mut ev = ExchangeEvent::default();
        ev.header.kind = EventKind::Exchange as u32;
        ev.status = 503;
        let b = bytes_of(&ev);
        assert!(matches!(decode(&b), Ok(KernelEvent::Exchange(x, None)) if x.status == 503));
        ev.flags = EXCH_F_FULL;
        ev.head_len = 3;
        ev.response_len = 2;
        let mut b = bytes_of(&ev);
        let mut head = vec![0u8; EXCHANGE_HEAD];
        head[..3].copy_from_slice(b"GET");
        b.extend_from_slice(&head);
        assert!(
            matches!(decode(&b), Err(DecodeError::Short { .. })),
            "a full record without its response bytes is rejected, not over-read"
        );
        let mut resp = vec![0u8; EXCHANGE_RESPONSE];
        resp[..2].copy_from_slice(b"HT");
        b.extend_from_slice(&resp);
        match decode(&b).expect("decodes") {
            KernelEvent::Exchange(_, Some((head, resp))) => {
                assert_eq!((head, resp), (&b"GET"[..], &b"HT"[..]));
            }
            other => panic!("wrong kind: {other:?}"),
        }
    }

    #[test]
    fn decodes_a_data_event_with_its_payload() {
        let mut ev = DataEvent::default();
        ev.header.kind = EventKind::Data as u32;
        ev.captured = 4;
        ev.len = 100;
        let mut b = bytes_of(&ev);
        b.extend_from_slice(b"GET /");
        match decode(&b).expect("decodes") {
            KernelEvent::Data(d, payload) => {
                assert_eq!((d.len, payload), (100, &b"GET "[..]));
            }
            other => panic!("wrong kind: {other:?}"),
        }
        // A record claiming more captured bytes than it carries is rejected, not over-read.
        ev.captured = 64;
        let short = bytes_of(&ev);
        assert!(matches!(decode(&short), Err(DecodeError::Short { .. })));
    }

    #[test]
    fn a_connections_addresses_come_back_from_its_tuple() {
        for (l, r) in [("10.0.0.1:443", "10.0.0.2:50000"), ("[fd00::1]:443", "[fd00::2]:50000")] {
            let (l, r): (SocketAddr, SocketAddr) = (l.parse().unwrap(), r.parse().unwrap());
            let t = tcp_tuple(l, r, 7);
            assert_eq!(addrs(&t), Some((l.ip(), r.ip())));
            assert_eq!((t.sport, t.dport, t.protocol, t.netns), (443, 50000, IPPROTO_TCP, 7));
        }
    }

    #[test]
    fn v4_mapped_addresses_are_reported_as_ipv4() {
        let mut t = Tuple { family: AF_INET6, ..Tuple::default() };
        t.saddr[10] = 0xff;
        t.saddr[11] = 0xff;
        t.saddr[12..].copy_from_slice(&[10, 0, 0, 1]);
        t.daddr[15] = 1;
        let (s, d) = addrs(&t).unwrap();
        assert_eq!(s, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(d, IpAddr::V6(Ipv6Addr::LOCALHOST));
    }
}
