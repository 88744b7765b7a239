//! Hubble's flow filter semantics over [`Flow`]s.
//!
//! A request's whitelist matches when it is empty or any of its filters matches; its blacklist
//! removes flows matched by any of its filters. Inside one [`FlowFilter`] every field that is set
//! must match (AND); inside one repeated field any value may (OR). Values are parsed once, when
//! the request arrives: a bad CIDR, port, regex, label selector or status code is an error that
//! names the field, never a filter that silently matches nothing.

pub mod cel;
mod label;
mod parse;
pub mod sql;
pub mod terms;

use std::net::IpAddr;

use hopwatch_proto::flow::{
    DropReason, Endpoint, EventTypeFilter, Flow, FlowFilter, HttpHeader, NetworkInterface, Service,
    TcpFlags, Verdict, Workload, layer4, layer7::Record,
};
use regex::Regex;

use self::{
    label::Selector,
    parse::{Cidr, NamespacedPrefix, Protocol, Status},
};

#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("invalid {field} filter {value:?}: {reason}")]
    Invalid { field: &'static str, value: String, reason: String },
}

impl FilterError {
    fn invalid(field: &'static str, value: &str, reason: &str) -> Self {
        Self::Invalid { field, value: value.to_owned(), reason: reason.to_owned() }
    }
}

/// A compiled whitelist/blacklist pair.
#[derive(Debug, Default)]
pub struct FilterSet {
    whitelist: Vec<Compiled>,
    blacklist: Vec<Compiled>,
}

impl FilterSet {
    pub fn new(whitelist: &[FlowFilter], blacklist: &[FlowFilter]) -> Result<Self, FilterError> {
        Ok(Self {
            whitelist: whitelist.iter().map(Compiled::new).collect::<Result<_, _>>()?,
            blacklist: blacklist.iter().map(Compiled::new).collect::<Result<_, _>>()?,
        })
    }

    pub fn matches(&self, flow: &Flow) -> bool {
        (self.whitelist.is_empty() || self.whitelist.iter().any(|f| f.matches(flow)))
            && !self.blacklist.iter().any(|f| f.matches(flow))
    }

    /// The index terms a match needs, worked out once (to skip stored blocks and entries
    /// without decoding them).
    pub fn sieve(&self) -> terms::Sieve {
        terms::Sieve::new((!self.whitelist.is_empty()).then(|| {
            self.whitelist
                .iter()
                .map(|f| f.checks.iter().filter_map(terms::required).collect())
                .collect()
        }))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Source,
    Destination,
}

#[derive(Debug)]
enum Check {
    Uuid(Vec<String>),
    Ip(Side, Vec<Cidr>),
    Pod(Side, Vec<NamespacedPrefix>),
    Fqdn(Side, Vec<Regex>),
    Label(Side, Vec<Selector>),
    Service(Side, Vec<NamespacedPrefix>),
    Workload(Side, Vec<Workload>),
    Identity(Side, Vec<u32>),
    Port(Side, Vec<u32>),
    Direction(Vec<i32>),
    Verdict(Vec<i32>),
    EventType(Vec<EventTypeFilter>),
    HttpStatus(Vec<Status>),
    Protocol(Vec<Protocol>),
    Reply(Vec<bool>),
    DnsQuery(Vec<Regex>),
    HttpMethod(Vec<String>),
    HttpPath(Vec<Regex>),
    TcpFlags(Vec<TcpFlags>),
    NodeName(Vec<Regex>),
    IpVersion(Vec<i32>),
    L7Protocol(Vec<&'static str>),
    MinLatency(u64),
    TraceId(Vec<String>),
    HttpUrl(Vec<Regex>),
    HttpHeader(Vec<HttpHeader>),
    DropReasonDesc(Vec<i32>),
    KernelDropReason(Vec<String>),
    /// Lower-case server names; `*.` prefixes kept (see [`parse::sni`]).
    Sni(Vec<String>),
    /// The forwarded client (`Flow.client_ip`) in one of these networks.
    ClientIp(Vec<Cidr>),
    Interface(Vec<NetworkInterface>),
    NodeLabels(Vec<Selector>),
    Cel(Vec<cel::Expr>),
}

/// One [`FlowFilter`]: all checks must hold.
#[derive(Debug)]
struct Compiled {
    checks: Vec<Check>,
}

fn each<T>(
    values: &[String],
    f: impl Fn(&str) -> Result<T, FilterError>,
) -> Result<Vec<T>, FilterError> {
    values.iter().map(|v| f(v)).collect()
}

impl Compiled {
    fn new(ff: &FlowFilter) -> Result<Self, FilterError> {
        use Side::{Destination as D, Source as S};
        let mut checks = Vec::new();
        let mut push = |present: bool, check: Check| {
            if present {
                checks.push(check);
            }
        };
        push(!ff.uuid.is_empty(), Check::Uuid(ff.uuid.clone()));
        for (side, field, v) in
            [(S, "source_ip", &ff.source_ip), (D, "destination_ip", &ff.destination_ip)]
        {
            push(!v.is_empty(), Check::Ip(side, each(v, |s| Cidr::parse(field, s))?));
        }
        for (side, field, v) in
            [(S, "source_pod", &ff.source_pod), (D, "destination_pod", &ff.destination_pod)]
        {
            push(!v.is_empty(), Check::Pod(side, each(v, |s| NamespacedPrefix::parse(field, s))?));
        }
        for (side, field, v) in
            [(S, "source_fqdn", &ff.source_fqdn), (D, "destination_fqdn", &ff.destination_fqdn)]
        {
            push(!v.is_empty(), Check::Fqdn(side, each(v, |s| parse::glob(field, s))?));
        }
        for (side, field, v) in
            [(S, "source_label", &ff.source_label), (D, "destination_label", &ff.destination_label)]
        {
            push(!v.is_empty(), Check::Label(side, each(v, |s| Selector::parse(field, s))?));
        }
        for (side, field, v) in [
            (S, "source_service", &ff.source_service),
            (D, "destination_service", &ff.destination_service),
        ] {
            let names = each(v, |s| NamespacedPrefix::parse(field, s))?;
            push(!v.is_empty(), Check::Service(side, names));
        }
        for (side, v) in [(S, &ff.source_workload), (D, &ff.destination_workload)] {
            push(!v.is_empty(), Check::Workload(side, v.clone()));
        }
        for (side, v) in [(S, &ff.source_identity), (D, &ff.destination_identity)] {
            push(!v.is_empty(), Check::Identity(side, v.clone()));
        }
        for (side, field, v) in
            [(S, "source_port", &ff.source_port), (D, "destination_port", &ff.destination_port)]
        {
            push(!v.is_empty(), Check::Port(side, each(v, |s| parse::port(field, s))?));
        }
        push(!ff.traffic_direction.is_empty(), Check::Direction(ff.traffic_direction.clone()));
        push(!ff.verdict.is_empty(), Check::Verdict(ff.verdict.clone()));
        push(!ff.event_type.is_empty(), Check::EventType(ff.event_type.clone()));
        let status = each(&ff.http_status_code, |s| Status::parse("http_status_code", s))?;
        push(!status.is_empty(), Check::HttpStatus(status));
        let protocols = each(&ff.protocol, |s| Protocol::parse("protocol", s))?;
        push(!protocols.is_empty(), Check::Protocol(protocols));
        push(!ff.reply.is_empty(), Check::Reply(ff.reply.clone()));
        let dns = each(&ff.dns_query, |s| parse::regex("dns_query", s))?;
        push(!dns.is_empty(), Check::DnsQuery(dns));
        push(!ff.http_method.is_empty(), Check::HttpMethod(ff.http_method.clone()));
        let paths = each(&ff.http_path, |s| parse::regex("http_path", s))?;
        push(!paths.is_empty(), Check::HttpPath(paths));
        push(!ff.tcp_flags.is_empty(), Check::TcpFlags(ff.tcp_flags.clone()));
        let nodes = each(&ff.node_name, |s| {
            // "cluster/" selects a whole cluster; hopwatch node names carry no cluster part,
            // so the pattern is matched against the whole name.
            let p = if s.ends_with('/') { format!("{s}*") } else { s.to_owned() };
            parse::glob("node_name", &p)
        })?;
        push(!nodes.is_empty(), Check::NodeName(nodes));
        push(!ff.ip_version.is_empty(), Check::IpVersion(ff.ip_version.clone()));
        let l7 =
            each(&ff.l7_protocol, |s| parse::parse_l7("l7_protocol", s, &s.to_ascii_lowercase()))?;
        push(!l7.is_empty(), Check::L7Protocol(l7));
        push(ff.min_latency_ns > 0, Check::MinLatency(ff.min_latency_ns));
        push(!ff.trace_id.is_empty(), Check::TraceId(ff.trace_id.clone()));
        let urls = each(&ff.http_url, |s| parse::regex("http_url", s))?;
        push(!urls.is_empty(), Check::HttpUrl(urls));
        push(!ff.http_header.is_empty(), Check::HttpHeader(ff.http_header.clone()));
        push(!ff.drop_reason_desc.is_empty(), Check::DropReasonDesc(ff.drop_reason_desc.clone()));
        let kernel = each(&ff.kernel_drop_reason, parse::kernel_drop_reason)?;
        push(!kernel.is_empty(), Check::KernelDropReason(kernel));
        let sni = each(&ff.sni, parse::sni)?;
        push(!sni.is_empty(), Check::Sni(sni));
        let clients = each(&ff.client_ip, |s| Cidr::parse("client_ip", s))?;
        push(!clients.is_empty(), Check::ClientIp(clients));
        push(!ff.interface.is_empty(), Check::Interface(ff.interface.clone()));
        let node_labels = each(&ff.node_labels, |s| Selector::parse("node_labels", s))?;
        push(!node_labels.is_empty(), Check::NodeLabels(node_labels));
        let cel = ff.experimental.as_ref().map_or(&[][..], |e| &e.cel_expression[..]);
        let cel = each(cel, |s| {
            cel::Expr::parse(s).map_err(|e| FilterError::Invalid {
                field: "experimental.cel_expression",
                value: s.to_owned(),
                reason: e.to_string(),
            })
        })?;
        push(!cel.is_empty(), Check::Cel(cel));
        Ok(Self { checks })
    }

    fn matches(&self, f: &Flow) -> bool {
        self.checks.iter().all(|c| c.matches(f))
    }
}

fn endpoint(f: &Flow, side: Side) -> Option<&Endpoint> {
    match side {
        Side::Source => f.source.as_ref(),
        Side::Destination => f.destination.as_ref(),
    }
}

fn ip(f: &Flow, side: Side) -> Option<IpAddr> {
    let ip = f.ip.as_ref()?;
    let s = match side {
        Side::Source => &ip.source,
        Side::Destination => &ip.destination,
    };
    s.parse().ok()
}

fn service(f: &Flow, side: Side) -> Option<&Service> {
    match side {
        Side::Source => f.source_service.as_ref(),
        Side::Destination => f.destination_service.as_ref(),
    }
}

fn has_flags(have: &TcpFlags, want: &TcpFlags) -> bool {
    let bits = |t: &TcpFlags| {
        [t.fin, t.syn, t.rst, t.psh, t.ack, t.urg, t.ece, t.cwr, t.ns]
            .iter()
            .enumerate()
            .fold(0u16, |acc, (i, &b)| acc | (u16::from(b) << i))
    };
    let (have, want) = (bits(have), bits(want));
    have & want == want
}

impl Check {
    #[expect(clippy::too_many_lines, reason = "one short arm per FlowFilter field")]
    fn matches(&self, f: &Flow) -> bool {
        match self {
            Self::Uuid(ids) => ids.contains(&f.uuid),
            Self::Ip(side, nets) => {
                ip(f, *side).is_some_and(|a| nets.iter().any(|n| n.contains(a)))
            }
            Self::Pod(side, names) => endpoint(f, *side)
                .is_some_and(|e| names.iter().any(|n| n.matches(&e.namespace, &e.pod_name))),
            Self::Fqdn(side, globs) => {
                let names = match side {
                    Side::Source => &f.source_names,
                    Side::Destination => &f.destination_names,
                };
                names.iter().any(|n| {
                    let n = n.trim_end_matches('.');
                    globs.iter().any(|g| g.is_match(n))
                })
            }
            Self::Label(side, selectors) => {
                endpoint(f, *side).is_some_and(|e| selectors.iter().any(|s| s.matches(&e.labels)))
            }
            Self::Service(side, names) => service(f, *side)
                .is_some_and(|s| names.iter().any(|n| n.matches(&s.namespace, &s.name))),
            Self::Workload(side, wanted) => endpoint(f, *side).is_some_and(|e| {
                e.workloads.iter().any(|w| {
                    wanted.iter().any(|x| {
                        (x.name.is_empty() || x.name == w.name)
                            && (x.kind.is_empty() || x.kind.eq_ignore_ascii_case(&w.kind))
                    })
                })
            }),
            Self::Identity(side, ids) => {
                endpoint(f, *side).is_some_and(|e| ids.contains(&e.identity))
            }
            Self::Port(side, wanted) => f
                .ports()
                .is_some_and(|(s, d)| wanted.contains(if *side == Side::Source { &s } else { &d })),
            Self::Direction(dirs) => dirs.contains(&f.traffic_direction),
            Self::Verdict(verdicts) => verdicts.contains(&f.verdict),
            Self::EventType(types) => f.event_type.as_ref().is_some_and(|et| {
                types.iter().any(|t| {
                    t.r#type == et.r#type && (!t.match_sub_type || t.sub_type == et.sub_type)
                })
            }),
            Self::HttpStatus(codes) => match f.l7.as_ref().and_then(|l| l.record.as_ref()) {
                Some(Record::Http(h)) if h.code != 0 => codes.iter().any(|c| c.matches(h.code)),
                _ => false,
            },
            Self::Protocol(protocols) => {
                let l4 = f.l4.as_ref().and_then(|l| l.protocol.as_ref());
                let l7 = f.l7_protocol();
                protocols.iter().any(|p| match p {
                    Protocol::Tcp => matches!(l4, Some(layer4::Protocol::Tcp(_))),
                    Protocol::Udp => matches!(l4, Some(layer4::Protocol::Udp(_))),
                    Protocol::Sctp => matches!(l4, Some(layer4::Protocol::Sctp(_))),
                    Protocol::Icmp => matches!(
                        l4,
                        Some(layer4::Protocol::IcmPv4(_) | layer4::Protocol::IcmPv6(_))
                    ),
                    Protocol::IcmpV4 => matches!(l4, Some(layer4::Protocol::IcmPv4(_))),
                    Protocol::IcmpV6 => matches!(l4, Some(layer4::Protocol::IcmPv6(_))),
                    Protocol::L7(name) => l7 == Some(*name),
                })
            }
            Self::Reply(wanted) => f.is_reply.is_some_and(|r| wanted.contains(&r)),
            Self::DnsQuery(res) => match f.l7.as_ref().and_then(|l| l.record.as_ref()) {
                Some(Record::Dns(d)) => res.iter().any(|r| r.is_match(&d.query)),
                _ => false,
            },
            Self::HttpMethod(methods) => match f.l7.as_ref().and_then(|l| l.record.as_ref()) {
                Some(Record::Http(h)) => methods.iter().any(|m| m.eq_ignore_ascii_case(&h.method)),
                _ => false,
            },
            Self::HttpPath(res) => match f.l7.as_ref().and_then(|l| l.record.as_ref()) {
                Some(Record::Http(h)) => {
                    let path = url_path(&h.url);
                    res.iter().any(|r| r.is_match(path))
                }
                _ => false,
            },
            Self::TcpFlags(wanted) => match f.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
                Some(layer4::Protocol::Tcp(t)) => {
                    t.flags.as_ref().is_some_and(|have| wanted.iter().any(|w| has_flags(have, w)))
                }
                _ => false,
            },
            Self::NodeName(globs) => globs.iter().any(|g| g.is_match(&f.node_name)),
            Self::IpVersion(versions) => {
                f.ip.as_ref().is_some_and(|ip| versions.contains(&ip.ip_version))
            }
            Self::L7Protocol(names) => f.l7_protocol().is_some_and(|p| names.contains(&p)),
            Self::MinLatency(min) => f.latency_ns().is_some_and(|l| l >= *min),
            Self::TraceId(ids) => {
                let id = f
                    .trace_context
                    .as_ref()
                    .and_then(|t| t.parent.as_ref())
                    .map_or("", |p| p.trace_id.as_str());
                ids.iter().any(|i| i == id)
            }
            Self::HttpUrl(res) => match f.l7.as_ref().and_then(|l| l.record.as_ref()) {
                Some(Record::Http(h)) if !h.url.is_empty() => {
                    res.iter().any(|r| r.is_match(&h.url))
                }
                _ => false,
            },
            Self::HttpHeader(wanted) => match f.l7.as_ref().and_then(|l| l.record.as_ref()) {
                Some(Record::Http(h)) => h.headers.iter().any(|have| {
                    wanted
                        .iter()
                        .any(|w| w.key.eq_ignore_ascii_case(&have.key) && w.value == have.value)
                }),
                _ => false,
            },
            Self::DropReasonDesc(reasons) => {
                f.verdict == i32::from(Verdict::Dropped) && reasons.contains(&f.drop_reason_desc)
            }
            Self::KernelDropReason(names) => {
                f.verdict == i32::from(Verdict::Dropped)
                    && names.iter().any(|n| {
                        n.eq_ignore_ascii_case(&f.kernel_drop_reason)
                            || DropReason::try_from(f.drop_reason_desc)
                                .is_ok_and(|r| r != DropReason::Unknown && r.as_str_name() == n)
                    })
            }
            Self::ClientIp(nets) => f
                .client_ip
                .parse::<std::net::IpAddr>()
                .is_ok_and(|a| nets.iter().any(|n| n.contains(a))),
            Self::Sni(names) => f
                .tls_handshake
                .as_ref()
                .is_some_and(|t| names.iter().any(|n| sni_matches(n, &t.server_name))),
            Self::Interface(wanted) => f.interface.as_ref().is_some_and(|have| {
                wanted.iter().any(|w| {
                    (w.index == 0 || w.index == have.index)
                        && (w.name.is_empty() || w.name == have.name)
                })
            }),
            Self::NodeLabels(selectors) => selectors.iter().any(|s| s.matches(&f.node_labels)),
            Self::Cel(exprs) => exprs.iter().any(|e| e.matches(f)),
        }
    }
}

/// A server name against a `--sni` value: equal ignoring case, or for `*.suffix` any name
/// ending in `.suffix`.
fn sni_matches(want: &str, name: &str) -> bool {
    match want.strip_prefix("*.") {
        Some(suffix) => {
            name.len() > suffix.len() + 1
                && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
                && name[name.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
        }
        None => want.eq_ignore_ascii_case(name),
    }
}

/// The path of an HTTP URL (`http://h/p?q` → `/p`, `/p?q` → `/p`).
fn url_path(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r.find('/').map_or("", |i| &r[i..]));
    let end = rest.find(['?', '#']).unwrap_or(rest.len());
    &rest[..end]
}

#[cfg(test)]
mod tests;
