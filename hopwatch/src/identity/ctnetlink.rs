//! The conntrack netlink messages hopwatch uses: a `IPCTNL_MSG_CT_GET` for one connection by its
//! original tuple, and the reply's tuples. Pure encoding and decoding (the socket is in `nat.rs`).
//!
//! Wire format (linux/netfilter/nfnetlink_conntrack.h): `nlmsghdr`, `nfgenmsg`, then netlink
//! attributes; `CTA_TUPLE_ORIG`/`CTA_TUPLE_REPLY` nest `CTA_TUPLE_IP` (addresses) and
//! `CTA_TUPLE_PROTO` (protocol number, ports in network order).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
/// `IPS_DST_NAT`: the destination was translated.
const IPS_DST_NAT: u32 = 1 << 5;

const NLMSG_HDR: usize = 16;
const NFGENMSG: usize = 4;

/// A connection's addresses as conntrack sees them in one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tuple {
    pub protocol: u8,
    pub src: SocketAddr,
    pub dst: SocketAddr,
}

/// What conntrack knows of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    pub original: Tuple,
    pub reply: Tuple,
    pub status: u32,
}

impl Entry {
    /// Where the original direction's packets really went: the reply's source, when the
    /// destination was translated.
    pub(crate) fn translated_destination(&self) -> Option<SocketAddr> {
        (self.status & IPS_DST_NAT != 0 || self.reply.src != self.original.dst)
            .then_some(self.reply.src)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum CtError {
    #[error("conntrack answered errno {0}")]
    Errno(i32),
    #[error("malformed conntrack message: {0}")]
    Malformed(&'static str),
}

fn put_attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = u16::try_from(4 + payload.len()).expect("small attribute");
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

fn nested(kind: u16, build: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut inner = Vec::new();
    build(&mut inner);
    let mut out = Vec::new();
    put_attr(&mut out, kind | NLA_F_NESTED, &inner);
    out
}

/// A `CT_GET` request for the connection whose original direction is `t`.
pub(crate) fn get_request(t: &Tuple, seq: u32) -> Vec<u8> {
    let family = u8::try_from(if t.src.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 })
        .expect("address family numbers fit in a byte");
    let ip = nested(CTA_TUPLE_IP, |b| match (t.src.ip(), t.dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            put_attr(b, CTA_IP_V4_SRC, &s.octets());
            put_attr(b, CTA_IP_V4_DST, &d.octets());
        }
        (s, d) => {
            put_attr(b, CTA_IP_V6_SRC, &v6(s).octets());
            put_attr(b, CTA_IP_V6_DST, &v6(d).octets());
        }
    });
    let proto = nested(CTA_TUPLE_PROTO, |b| {
        put_attr(b, CTA_PROTO_NUM, &[t.protocol]);
        put_attr(b, CTA_PROTO_SRC_PORT, &t.src.port().to_be_bytes());
        put_attr(b, CTA_PROTO_DST_PORT, &t.dst.port().to_be_bytes());
    });
    let orig = nested(CTA_TUPLE_ORIG, |b| {
        b.extend_from_slice(&ip);
        b.extend_from_slice(&proto);
    });
    let len = u32::try_from(NLMSG_HDR + NFGENMSG + orig.len()).expect("small message");
    let mut msg = Vec::with_capacity(len as usize);
    msg.extend_from_slice(&len.to_ne_bytes());
    msg.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET).to_ne_bytes());
    msg.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&[family, 0, 0, 0]);
    msg.extend_from_slice(&orig);
    msg
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// Netlink attributes in `buf`: (type without flags, payload).
fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([buf[0], buf[1]]));
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return None;
        }
        let payload = &buf[4..len];
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
        Some((kind, payload))
    })
}

fn parse_tuple(buf: &[u8]) -> Result<Tuple, CtError> {
    let (mut src, mut dst, mut protocol, mut sport, mut dport) = (None, None, 0u8, 0u16, 0u16);
    for (kind, payload) in attrs(buf) {
        match kind {
            CTA_TUPLE_IP => {
                for (k, p) in attrs(payload) {
                    let ip = match p.len() {
                        4 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(p).expect("4 bytes"))),
                        16 => {
                            IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(p).expect("16 bytes")))
                        }
                        _ => return Err(CtError::Malformed("address length")),
                    };
                    match k {
                        CTA_IP_V4_SRC | CTA_IP_V6_SRC => src = Some(ip),
                        CTA_IP_V4_DST | CTA_IP_V6_DST => dst = Some(ip),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (k, p) in attrs(payload) {
                    match (k, p) {
                        (CTA_PROTO_NUM, [n, ..]) => protocol = *n,
                        (CTA_PROTO_SRC_PORT, [a, b, ..]) => sport = u16::from_be_bytes([*a, *b]),
                        (CTA_PROTO_DST_PORT, [a, b, ..]) => dport = u16::from_be_bytes([*a, *b]),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    match (src, dst) {
        (Some(s), Some(d)) => {
            Ok(Tuple { protocol, src: SocketAddr::new(s, sport), dst: SocketAddr::new(d, dport) })
        }
        _ => Err(CtError::Malformed("tuple without addresses")),
    }
}

/// Parses the kernel's answer to a `CT_GET`: the entry, or the errno (`ENOENT`: no such
/// connection in this namespace's table).
pub(crate) fn parse_response(buf: &[u8]) -> Result<Entry, CtError> {
    if buf.len() < NLMSG_HDR {
        return Err(CtError::Malformed("short header"));
    }
    let len = u32::from_ne_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
    let kind = u16::from_ne_bytes([buf[4], buf[5]]);
    if len > buf.len() || len < NLMSG_HDR {
        return Err(CtError::Malformed("length"));
    }
    let body = &buf[NLMSG_HDR..len];
    if kind == NLMSG_ERROR {
        let errno = body.get(..4).map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes")));
        return Err(CtError::Errno(-errno.ok_or(CtError::Malformed("short error"))?));
    }
    if kind != (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW {
        return Err(CtError::Malformed("unexpected message type"));
    }
    let attrs_buf = body.get(NFGENMSG..).ok_or(CtError::Malformed("short body"))?;
    let (mut original, mut reply, mut status) = (None, None, 0);
    for (kind, payload) in attrs(attrs_buf) {
        match kind {
            CTA_TUPLE_ORIG => original = Some(parse_tuple(payload)?),
            CTA_TUPLE_REPLY => reply = Some(parse_tuple(payload)?),
            CTA_STATUS if payload.len() >= 4 => {
                status = u32::from_be_bytes(payload[..4].try_into().expect("4 bytes"));
            }
            _ => {}
        }
    }
    match (original, reply) {
        (Some(original), Some(reply)) => Ok(Entry { original, reply, status }),
        _ => Err(CtError::Malformed("entry without both tuples")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds what the kernel answers: a CT_NEW with both tuples and a status.
    fn answer(orig: &Tuple, reply: &Tuple, status: u32) -> Vec<u8> {
        let mut req = get_request(orig, 7);
        let reply_attr = get_request(reply, 7)[NLMSG_HDR + NFGENMSG..].to_vec();
        // Turn the request into a CT_NEW carrying ORIG, REPLY (same encoding, other type) and STATUS.
        req[4..6]
            .copy_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW).to_ne_bytes());
        let mut r = reply_attr;
        r[2..4].copy_from_slice(&(CTA_TUPLE_REPLY | NLA_F_NESTED).to_ne_bytes());
        req.extend_from_slice(&r);
        put_attr(&mut req, CTA_STATUS, &status.to_be_bytes());
        let len = u32::try_from(req.len()).unwrap();
        req[0..4].copy_from_slice(&len.to_ne_bytes());
        req
    }

    #[test]
    fn round_trips_a_dnat_entry() {
        let orig = Tuple {
            protocol: 6,
            src: "10.0.0.2:40000".parse().unwrap(),
            dst: "10.96.0.10:5432".parse().unwrap(),
        };
        let reply = Tuple {
            protocol: 6,
            src: "10.0.1.7:5432".parse().unwrap(),
            dst: "10.0.0.2:40000".parse().unwrap(),
        };
        let e = parse_response(&answer(&orig, &reply, IPS_DST_NAT | 0x8)).unwrap();
        assert_eq!(e.original, orig);
        assert_eq!(e.reply, reply);
        assert_eq!(e.translated_destination(), Some("10.0.1.7:5432".parse().unwrap()));
        let plain = Tuple { protocol: 6, src: orig.dst, dst: orig.src };
        assert_eq!(
            parse_response(&answer(&orig, &plain, 0x8)).unwrap().translated_destination(),
            None
        );
    }

    #[test]
    fn ipv6_and_errors() {
        let orig = Tuple {
            protocol: 6,
            src: "[fd00::2]:40000".parse().unwrap(),
            dst: "[fd00:96::a]:80".parse().unwrap(),
        };
        let reply = Tuple { protocol: 6, src: "[fd00::7]:8080".parse().unwrap(), dst: orig.src };
        assert_eq!(
            parse_response(&answer(&orig, &reply, IPS_DST_NAT)).unwrap().translated_destination(),
            Some("[fd00::7]:8080".parse().unwrap())
        );
        let mut err = vec![0u8; 36];
        err[0..4].copy_from_slice(&36u32.to_ne_bytes());
        err[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err[16..20].copy_from_slice(&(-libc::ENOENT).to_ne_bytes());
        assert_eq!(parse_response(&err), Err(CtError::Errno(libc::ENOENT)));
        assert!(parse_response(&[1, 2, 3]).is_err());
        assert!(parse_response(&answer(&orig, &reply, 0)[..40]).is_err());
    }
}
