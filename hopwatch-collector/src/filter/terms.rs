//! Index terms: short hashed facts about a flow ("destination port 5432", "verdict DROPPED")
//! that the store records per block of the history in a Bloom filter and per entry in a 64-bit
//! sieve, so a query skips blocks and entries that cannot hold a match without decoding them.
//!
//! [`flow_terms`] and [`required`] must agree: whatever a check needs, a matching flow emits.
//! Checks that cannot be reduced to exact terms (CIDR ranges, prefixes, regexes, latencies)
//! return `None` from [`required`] and never skip a block.

use hopwatch_proto::flow::{Flow, layer4};

use super::{Check, Side, parse::Protocol};

/// FNV-1a over a tag and a value; stable across runs (the hashes are stored on disk).
fn hash(tag: &str, value: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in tag.bytes().chain([0xff]).chain(value.iter().copied()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn num(tag: &str, v: i64) -> u64 {
    hash(tag, &v.to_le_bytes())
}

fn ip_term(tag: &str, a: std::net::IpAddr) -> u64 {
    match a {
        std::net::IpAddr::V4(v4) => hash(tag, &v4.octets()),
        std::net::IpAddr::V6(v6) => hash(tag, &v6.octets()),
    }
}

fn side_tag(side: Side, source: &'static str, destination: &'static str) -> &'static str {
    if side == Side::Source { source } else { destination }
}

fn l4_name(f: &Flow) -> Option<&'static str> {
    Some(match f.l4.as_ref()?.protocol.as_ref()? {
        layer4::Protocol::Tcp(_) => "tcp",
        layer4::Protocol::Udp(_) => "udp",
        layer4::Protocol::Sctp(_) => "sctp",
        layer4::Protocol::IcmPv4(_) => "icmpv4",
        layer4::Protocol::IcmPv6(_) => "icmpv6",
    })
}

/// Calls `emit` with every term of `f`.
pub fn flow_terms(f: &Flow, mut emit: impl FnMut(u64)) {
    emit(num("verdict", i64::from(f.verdict)));
    emit(num("dir", i64::from(f.traffic_direction)));
    if let Some(et) = &f.event_type {
        emit(num("event", i64::from(et.r#type)));
    }
    if let Some((s, d)) = f.ports() {
        emit(num("sport", i64::from(s)));
        emit(num("dport", i64::from(d)));
    }
    if let Some(ip) = &f.ip {
        if let Ok(a) = ip.source.parse::<std::net::IpAddr>() {
            emit(ip_term("sip", a));
        }
        if let Ok(a) = ip.destination.parse::<std::net::IpAddr>() {
            emit(ip_term("dip", a));
        }
    }
    if let Some(p) = l4_name(f) {
        emit(hash("proto", p.as_bytes()));
    }
    if let Some(p) = f.l7_protocol() {
        emit(hash("proto", p.as_bytes()));
    }
    for (tag, ep) in [("sns", &f.source), ("dns", &f.destination)] {
        if let Some(ep) = ep.as_ref().filter(|e| !e.namespace.is_empty()) {
            emit(hash(tag, ep.namespace.as_bytes()));
        }
    }
}

/// Terms of which a flow matching `check` has at least one; `None` when the check cannot be
/// expressed that way.
pub(super) fn required(check: &Check) -> Option<Vec<u64>> {
    match check {
        Check::Verdict(v) => Some(v.iter().map(|&x| num("verdict", i64::from(x))).collect()),
        Check::Direction(v) => Some(v.iter().map(|&x| num("dir", i64::from(x))).collect()),
        Check::EventType(v) => Some(v.iter().map(|t| num("event", i64::from(t.r#type))).collect()),
        Check::Port(side, ports) => {
            let tag = side_tag(*side, "sport", "dport");
            Some(ports.iter().map(|&p| num(tag, i64::from(p))).collect())
        }
        Check::Ip(side, nets) => {
            let tag = side_tag(*side, "sip", "dip");
            nets.iter().map(|n| n.exact().map(|a| ip_term(tag, a))).collect()
        }
        Check::Protocol(protocols) => Some(
            protocols
                .iter()
                .flat_map(|p| match p {
                    Protocol::Tcp => vec!["tcp"],
                    Protocol::Udp => vec!["udp"],
                    Protocol::Sctp => vec!["sctp"],
                    Protocol::Icmp => vec!["icmpv4", "icmpv6"],
                    Protocol::IcmpV4 => vec!["icmpv4"],
                    Protocol::IcmpV6 => vec!["icmpv6"],
                    Protocol::L7(name) => vec![*name],
                })
                .map(|p| hash("proto", p.as_bytes()))
                .collect(),
        ),
        Check::L7Protocol(names) => {
            Some(names.iter().map(|p| hash("proto", p.as_bytes())).collect())
        }
        Check::Pod(side, names) => {
            let tag = side_tag(*side, "sns", "dns");
            names.iter().map(|n| n.namespace().map(|ns| hash(tag, ns.as_bytes()))).collect()
        }
        _ => None,
    }
}

/// The bits an entry's sieve has set for `term`: two of 64, from the term's hash.
fn term_mask(term: u64) -> u64 {
    let h = term.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (1 << (h >> 58)) | (1 << ((h >> 52) & 63))
}

/// An entry's terms folded into 64 bits. With the dozen terms a flow has, a term the entry
/// lacks still finds both its bits set about one time in twelve; a term it has always does.
pub fn entry_sieve(terms: &[u64]) -> u64 {
    terms.iter().fold(0, |bits, &t| bits | term_mask(t))
}

/// A query's index terms, worked out once: which blocks (by their Bloom filter) and which
/// entries (by their sieve) may hold a match. Never rules out a match; rules out most
/// non-matches of a filter on a port, verdict, address, protocol or namespace.
#[derive(Debug)]
pub struct Sieve {
    /// `None`: anything may match (no whitelist). Else per whitelist filter, its checks that
    /// have terms.
    filters: Option<Vec<Vec<AnyOf>>>,
}

/// The (term, sieve bits) of which a flow passing one check has at least one.
type AnyOf = Vec<(u64, u64)>;

impl Sieve {
    pub(super) fn new(filters: Option<Vec<Vec<Vec<u64>>>>) -> Self {
        let with_masks = |terms: Vec<u64>| terms.into_iter().map(|t| (t, term_mask(t))).collect();
        Self {
            filters: filters.map(|fs| {
                fs.into_iter().map(|checks| checks.into_iter().map(with_masks).collect()).collect()
            }),
        }
    }

    fn any(&self, has: impl Fn(&(u64, u64)) -> bool) -> bool {
        self.filters.as_ref().is_none_or(|fs| {
            fs.iter().any(|checks| checks.iter().all(|any_of| any_of.iter().any(&has)))
        })
    }

    /// Whether a group of flows whose terms are all in `contains` may hold a match.
    pub fn group(&self, contains: impl Fn(u64) -> bool) -> bool {
        self.any(|&(t, _)| contains(t))
    }

    /// Whether an entry with this [`entry_sieve`] may match.
    pub fn entry(&self, sieve: u64) -> bool {
        self.any(|&(_, m)| sieve & m == m)
    }
}
