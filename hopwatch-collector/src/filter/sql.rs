//! Filters as SQL for the ClickHouse history (`crate::clickhouse`): the part of a request's
//! whitelist that maps onto typed columns becomes a `WHERE` condition, so ClickHouse reads and
//! returns only candidate rows; the whole [`FilterSet`] still runs on every flow that comes back.
//!
//! Like [`super::terms::required`], a condition may be looser than its check (it must never be
//! stricter): a flow the filter code accepts always passes the SQL. Checks that cannot be
//! expressed exactly on the columns (label selectors, regexes other than node name globs, TCP
//! flags, headers, CEL, ...) are left to the filter code. Blacklists are never pushed down.
//!
//! Column names are those of `crate::clickhouse::schema`; the generated SQL uses only functions
//! ClickHouse 18.16 has (`like`, `match`, `bitAnd`, `has`, `upper`, `toFixedString`, `unhex`).

use std::{fmt::Write as _, net::IpAddr};

use hopwatch_proto::flow::Verdict;

use super::{Check, Compiled, FilterSet, Side, parse::Protocol};

/// A string as a ClickHouse string literal.
pub fn literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\'' => out.push_str("\\'"),
            '\\' => out.push_str("\\\\"),
            '\0' => out.push_str("\\0"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// A `LIKE` pattern matching every string that starts with `prefix`.
fn like_prefix(prefix: &str) -> String {
    let mut p = String::with_capacity(prefix.len() + 1);
    for c in prefix.chars() {
        if matches!(c, '%' | '_' | '\\') {
            p.push('\\');
        }
        p.push(c);
    }
    p.push('%');
    literal(&p)
}

fn list<T: ToString>(values: impl IntoIterator<Item = T>) -> String {
    values.into_iter().map(|v| v.to_string()).collect::<Vec<_>>().join(", ")
}

fn side(s: Side) -> &'static str {
    match s {
        Side::Source => "src",
        Side::Destination => "dst",
    }
}

fn or(parts: Vec<String>) -> String {
    if parts.len() == 1 {
        parts.into_iter().next().expect("one part")
    } else {
        format!("({})", parts.join(" OR "))
    }
}

/// 16 bytes as a `FixedString(16)` literal.
fn fixed16(bytes: [u8; 16]) -> String {
    let mut hex = String::with_capacity(32);
    for b in bytes {
        let _ = write!(hex, "{b:02X}");
    }
    format!("toFixedString(unhex('{hex}'), 16)")
}

fn cidr(col_side: &str, addr: IpAddr, prefix: u8) -> String {
    match addr {
        IpAddr::V4(net) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            let net = u32::from(net) & mask;
            if mask == u32::MAX {
                format!("{col_side}_ip4 = {net}")
            } else {
                format!("bitAnd({col_side}_ip4, {mask}) = {net}")
            }
        }
        IpAddr::V6(net) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            let lo = u128::from(net) & mask;
            let hi = lo | !mask;
            if lo == hi {
                format!("{col_side}_ip6 = {}", fixed16(lo.to_be_bytes()))
            } else {
                // FixedString compares bytewise: a prefix is a range.
                format!(
                    "{col_side}_ip6 BETWEEN {} AND {}",
                    fixed16(lo.to_be_bytes()),
                    fixed16(hi.to_be_bytes())
                )
            }
        }
    }
}

/// The check as SQL, or `None` when the columns cannot express it.
fn check(c: &Check) -> Option<String> {
    Some(match c {
        Check::Uuid(ids) => format!("uuid IN ({})", list(ids.iter().map(|s| literal(s)))),
        Check::Ip(s, nets) => {
            let s = side(*s);
            or(nets
                .iter()
                .map(|n| {
                    let (addr, prefix) = n.parts();
                    cidr(s, addr, prefix)
                })
                .collect())
        }
        Check::Pod(s, names) | Check::Service(s, names) => {
            let (ns_col, name_col) = match (c, side(*s)) {
                (Check::Pod(..), p) => (format!("{p}_namespace"), format!("{p}_pod")),
                (_, p) => (format!("{p}_service_namespace"), format!("{p}_service")),
            };
            or(names
                .iter()
                .map(|n| {
                    let mut parts = vec![format!("({ns_col} != '' OR {name_col} != '')")];
                    if let Some(ns) = n.namespace() {
                        parts.push(format!("{ns_col} = {}", literal(ns)));
                    }
                    if !n.prefix().is_empty() {
                        parts.push(format!("{name_col} LIKE {}", like_prefix(n.prefix())));
                    }
                    format!("({})", parts.join(" AND "))
                })
                .collect())
        }
        Check::Workload(s, wanted) => {
            if wanted.iter().any(|w| w.name.is_empty()) {
                return None;
            }
            let s = side(*s);
            or(wanted.iter().map(|w| format!("has({s}_workloads, {})", literal(&w.name))).collect())
        }
        Check::Identity(s, ids) => format!("{}_identity IN ({})", side(*s), list(ids)),
        Check::Port(s, ports) => format!("{}_port IN ({})", side(*s), list(ports)),
        Check::Direction(v) => format!("direction IN ({})", list(v)),
        Check::Verdict(v) => format!("verdict IN ({})", list(v)),
        Check::EventType(types) => {
            format!("event_type IN ({})", list(types.iter().map(|t| t.r#type)))
        }
        Check::HttpStatus(codes) => or(codes
            .iter()
            .map(|s| match s {
                super::parse::Status::Exact(c) => format!("http_code = {c}"),
                super::parse::Status::Prefix(p) => {
                    let digits = u32::try_from(p.len()).unwrap_or(2);
                    let scale = 10u32.pow(3 - digits);
                    let lo = p.parse::<u32>().unwrap_or(0) * scale;
                    format!("(http_code >= {lo} AND http_code < {})", lo + scale)
                }
            })
            .collect()),
        Check::Protocol(protocols) => or(protocols
            .iter()
            .map(|p| match p {
                Protocol::Tcp => "l4_protocol = 'tcp'".to_owned(),
                Protocol::Udp => "l4_protocol = 'udp'".to_owned(),
                Protocol::Sctp => "l4_protocol = 'sctp'".to_owned(),
                Protocol::Icmp => "l4_protocol IN ('icmpv4', 'icmpv6')".to_owned(),
                Protocol::IcmpV4 => "l4_protocol = 'icmpv4'".to_owned(),
                Protocol::IcmpV6 => "l4_protocol = 'icmpv6'".to_owned(),
                Protocol::L7(name) => format!("l7_protocol = {}", literal(name)),
            })
            .collect()),
        Check::Reply(v) => format!("is_reply IN ({})", list(v.iter().map(|&r| u8::from(r) + 1))),
        Check::HttpMethod(methods) => format!(
            "upper(http_method) IN ({})",
            list(methods.iter().map(|m| literal(&m.to_ascii_uppercase())))
        ),
        // Our own globs (`(?i)`, escaped literals and `[^./]*`): the same in RE2 as in Rust's
        // regex, except that 18.16 ignores `(?i)`, so both sides are lower-cased instead (the
        // escapes and the class have no letters to change).
        Check::NodeName(globs) => or(globs
            .iter()
            .map(|g| {
                let re = g.as_str().trim_start_matches("(?i)").to_lowercase();
                format!("match(lower(node_name), {})", literal(&re))
            })
            .collect()),
        Check::IpVersion(v) => format!("ip_version IN ({})", list(v)),
        Check::L7Protocol(names) => {
            format!("l7_protocol IN ({})", list(names.iter().map(|n| literal(n))))
        }
        Check::MinLatency(min) => format!("latency_ns >= {min}"),
        Check::TraceId(ids) => format!("trace_id IN ({})", list(ids.iter().map(|s| literal(s)))),
        Check::DropReasonDesc(reasons) => format!(
            "verdict = {} AND drop_reason IN ({})",
            i32::from(Verdict::Dropped),
            list(reasons)
        ),
        _ => return None,
    })
}

impl Compiled {
    /// The pushed-down checks, ANDed; `None` when none of them can be pushed down (the filter
    /// then matches any row as far as SQL can tell).
    fn sql(&self) -> Option<String> {
        let parts: Vec<String> = self.checks.iter().filter_map(check).collect();
        (!parts.is_empty()).then(|| format!("({})", parts.join(" AND ")))
    }
}

impl FilterSet {
    /// A condition every flow this set matches satisfies, or `None` when SQL can narrow
    /// nothing (no whitelist, or a whitelist filter with no pushable check).
    pub fn sql(&self) -> Option<String> {
        if self.whitelist.is_empty() {
            return None;
        }
        let parts: Option<Vec<String>> = self.whitelist.iter().map(Compiled::sql).collect();
        parts.map(or)
    }
}

#[cfg(test)]
mod tests {
    use hopwatch_proto::flow::FlowFilter;

    use super::*;

    fn sql(ff: &FlowFilter) -> Option<String> {
        FilterSet::new(std::slice::from_ref(ff), &[]).unwrap().sql()
    }

    #[test]
    fn literals_escape_quotes_and_backslashes() {
        assert_eq!(literal(r"a'b\c"), r"'a\'b\\c'");
        assert_eq!(like_prefix("a_b%"), r"'a\\_b\\%%'");
    }

    #[test]
    fn pushable_checks_become_conditions() {
        let ff = FlowFilter {
            destination_port: vec!["5432".into()],
            verdict: vec![2],
            source_pod: vec!["shop/web-".into()],
            destination_ip: vec!["10.1.0.0/16".into(), "fd00::1".into()],
            ..Default::default()
        };
        let s = sql(&ff).unwrap();
        assert!(s.contains("dst_port IN (5432)"), "{s}");
        assert!(s.contains("verdict IN (2)"), "{s}");
        assert!(s.contains(r"src_namespace = 'shop' AND src_pod LIKE 'web-%'"), "{s}");
        assert!(s.contains("bitAnd(dst_ip4, 4294901760) = 167837696"), "{s}");
        assert!(s.contains("dst_ip6 = toFixedString(unhex('FD00"), "{s}");
    }

    #[test]
    fn a_filter_with_nothing_pushable_pushes_nothing() {
        let label = FlowFilter { source_label: vec!["app=web".into()], ..Default::default() };
        assert_eq!(sql(&label), None);
        let port = FlowFilter { destination_port: vec!["80".into()], ..Default::default() };
        let set = FilterSet::new(&[port, label], &[]).unwrap();
        assert_eq!(set.sql(), None, "the label filter alone may match any row");
        assert_eq!(FilterSet::default().sql(), None);
    }

    #[test]
    fn status_prefixes_are_ranges() {
        let ff =
            FlowFilter { http_status_code: vec!["5+".into(), "40+".into()], ..Default::default() };
        let s = sql(&ff).unwrap();
        assert!(s.contains("(http_code >= 500 AND http_code < 600)"), "{s}");
        assert!(s.contains("(http_code >= 400 AND http_code < 410)"), "{s}");
    }
}
