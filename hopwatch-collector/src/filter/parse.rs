//! Parsers for filter values: CIDR prefixes, `namespace/prefix` names, glob patterns, HTTP
//! status codes, protocol names, ports.

use std::net::IpAddr;

use regex::Regex;

use super::FilterError;

/// An address prefix; a plain address is a /32 or /128.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub(super) fn parse(field: &'static str, s: &str) -> Result<Self, FilterError> {
        let bad = |reason: &str| FilterError::invalid(field, s, reason);
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => {
                (a, Some(p.parse::<u8>().map_err(|_| bad("prefix length is not a number"))?))
            }
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad("not an IP address or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(bad("prefix length too long"));
        }
        Ok(Self { addr, prefix })
    }

    /// The address, when the prefix covers exactly one.
    pub(super) fn exact(&self) -> Option<IpAddr> {
        let max = if self.addr.is_ipv4() { 32 } else { 128 };
        (self.prefix == max).then_some(self.addr)
    }

    /// The network address and prefix length.
    pub(super) fn parts(&self) -> (IpAddr, u8) {
        (self.addr, self.prefix)
    }

    pub(super) fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// `namespace/name-prefix`, `name-prefix` or `/name-prefix` (any namespace), `namespace/` (whole
/// namespace) or `/` (any pod or service at all), as Hubble's pod and service filters take them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct NamespacedPrefix {
    namespace: Option<String>,
    prefix: String,
}

impl NamespacedPrefix {
    pub(super) fn parse(field: &'static str, s: &str) -> Result<Self, FilterError> {
        if s.is_empty() {
            return Err(FilterError::invalid(field, s, "empty name"));
        }
        match s.split_once('/') {
            // "/name" and "/" (Hubble's --all-namespaces): any namespace.
            Some(("", prefix)) => Ok(Self { namespace: None, prefix: prefix.to_owned() }),
            Some((ns, prefix)) => {
                Ok(Self { namespace: Some(ns.to_owned()), prefix: prefix.to_owned() })
            }
            None => Ok(Self { namespace: None, prefix: s.to_owned() }),
        }
    }

    pub(super) fn namespace(&self) -> Option<&str> {
        self.namespace.as_deref()
    }

    /// The name prefix (empty: any name).
    pub(super) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `name` empty means the flow has no such object (never matches).
    pub(super) fn matches(&self, namespace: &str, name: &str) -> bool {
        if namespace.is_empty() && name.is_empty() {
            return false;
        }
        self.namespace.as_deref().is_none_or(|ns| ns == namespace)
            && (self.prefix.is_empty() || name.starts_with(&self.prefix))
    }
}

/// A glob where `*` matches any run of characters within one dot-separated label, anchored at
/// both ends, case-insensitive (Hubble's FQDN and node name patterns).
pub(super) fn glob(field: &'static str, pattern: &str) -> Result<Regex, FilterError> {
    if pattern.is_empty() {
        return Err(FilterError::invalid(field, pattern, "empty pattern"));
    }
    let body: String = pattern
        .trim_end_matches('.')
        .split('*')
        .map(regex::escape)
        .collect::<Vec<_>>()
        .join("[^./]*");
    Regex::new(&format!("(?i)^{body}$"))
        .map_err(|e| FilterError::invalid(field, pattern, &e.to_string()))
}

pub(super) fn regex(field: &'static str, pattern: &str) -> Result<Regex, FilterError> {
    Regex::new(pattern).map_err(|e| FilterError::invalid(field, pattern, &e.to_string()))
}

/// An HTTP status: a full code ("404") or a prefix ("5+", "40+").
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Status {
    Exact(u32),
    Prefix(String),
}

impl Status {
    pub(super) fn parse(field: &'static str, s: &str) -> Result<Self, FilterError> {
        let digits = |d: &str| d.chars().all(|c| c.is_ascii_digit());
        let first_ok = |d: &str| d.starts_with(['1', '2', '3', '4', '5']);
        if s.len() == 3 && digits(s) && first_ok(s) {
            return Ok(Self::Exact(s.parse().expect("three digits")));
        }
        if let Some(p) = s.strip_suffix('+')
            && (1..=2).contains(&p.len())
            && digits(p)
            && first_ok(p)
        {
            return Ok(Self::Prefix(p.to_owned()));
        }
        Err(FilterError::invalid(field, s, "expected a status code like 404 or a prefix like 5+"))
    }

    pub(super) fn matches(&self, code: u32) -> bool {
        match self {
            Self::Exact(c) => *c == code,
            Self::Prefix(p) => format!("{code:03}").starts_with(p.as_str()),
        }
    }
}

/// L4 and L7 protocol names the `protocol` filter knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Protocol {
    Tcp,
    Udp,
    Sctp,
    Icmp,
    IcmpV4,
    IcmpV6,
    L7(&'static str),
}

/// Application protocols hopwatch decodes.
pub(super) const L7_PROTOCOLS: &[&str] = &["http", "dns", "postgres", "redis", "mysql", "tls"];

impl Protocol {
    pub(super) fn parse(field: &'static str, s: &str) -> Result<Self, FilterError> {
        let lower = s.to_ascii_lowercase();
        Ok(match lower.as_str() {
            "tcp" => Self::Tcp,
            "udp" => Self::Udp,
            "sctp" => Self::Sctp,
            "icmp" => Self::Icmp,
            "icmpv4" => Self::IcmpV4,
            "icmpv6" => Self::IcmpV6,
            other => Self::L7(parse_l7(field, s, other)?),
        })
    }
}

pub(super) fn parse_l7(
    field: &'static str,
    raw: &str,
    lower: &str,
) -> Result<&'static str, FilterError> {
    L7_PROTOCOLS.iter().copied().find(|p| *p == lower).ok_or_else(|| {
        FilterError::invalid(
            field,
            raw,
            "unknown protocol (tcp, udp, sctp, icmp, icmpv4, icmpv6, http, dns, postgres, redis, mysql, tls)",
        )
    })
}

/// A TLS server name for `sni`: a DNS name (letters, digits, `-`, `.`, `_`), optionally
/// starting with `*.`; kept lower case.
pub(super) fn sni(s: &str) -> Result<String, FilterError> {
    let lower = s.trim_end_matches('.').to_ascii_lowercase();
    let name = lower.strip_prefix("*.").unwrap_or(&lower);
    if name.is_empty()
        || !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
    {
        return Err(FilterError::invalid(
            "sni",
            s,
            "expected a server name like api.example.com or *.example.com",
        ));
    }
    Ok(lower)
}

/// A kernel drop reason name: letters, digits and underscores, with or without the kernel's
/// `SKB_DROP_REASON_` prefix; kept upper case without the prefix, as flows carry it.
pub(super) fn kernel_drop_reason(s: &str) -> Result<String, FilterError> {
    let upper = s.to_ascii_uppercase();
    let name = upper.strip_prefix("SKB_DROP_REASON_").unwrap_or(&upper);
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(FilterError::invalid(
            "kernel_drop_reason",
            s,
            "expected a kernel drop reason name like NETFILTER_DROP or NO_SOCKET",
        ));
    }
    Ok(name.to_owned())
}

pub(super) fn port(field: &'static str, s: &str) -> Result<u32, FilterError> {
    s.parse::<u16>()
        .map(u32::from)
        .map_err(|_| FilterError::invalid(field, s, "not a port number (0-65535)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_contains() {
        let c = Cidr::parse("f", "10.1.0.0/16").unwrap();
        assert!(c.contains("10.1.200.3".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert!(!c.contains("::1".parse().unwrap()));
        let all = Cidr::parse("f", "0.0.0.0/0").unwrap();
        assert!(all.contains("192.0.2.1".parse().unwrap()));
        let v6 = Cidr::parse("f", "fd00::/8").unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        let exact = Cidr::parse("f", "10.0.0.1").unwrap();
        assert!(exact.contains("10.0.0.1".parse().unwrap()));
        assert!(!exact.contains("10.0.0.2".parse().unwrap()));
        for bad in ["10.0.0.0/33", "10.0.0", "x", "::/129", "1.2.3.4/x"] {
            assert!(Cidr::parse("f", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn globs_stay_within_a_label() {
        let g = glob("f", "*.example.com").unwrap();
        assert!(g.is_match("api.example.com"));
        assert!(g.is_match("API.Example.com"));
        assert!(!g.is_match("a.b.example.com"));
        let n = glob("f", "node-*").unwrap();
        assert!(n.is_match("node-1"));
        assert!(!n.is_match("xnode-1"));
        assert!(glob("f", "example.com.").unwrap().is_match("example.com"));
    }

    #[test]
    fn status_codes_and_prefixes() {
        assert!(Status::parse("f", "5+").unwrap().matches(503));
        assert!(!Status::parse("f", "5+").unwrap().matches(404));
        assert!(Status::parse("f", "40+").unwrap().matches(404));
        assert!(!Status::parse("f", "40+").unwrap().matches(410));
        assert!(Status::parse("f", "404").unwrap().matches(404));
        for bad in ["6+", "+", "5xx", "4040", "600", "abc", "404+"] {
            assert!(Status::parse("f", bad).is_err(), "{bad}");
        }
    }
}
