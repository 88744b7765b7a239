//! `hopwatch observe` filter flags → `GetFlowsRequest` whitelist/blacklist, the way
//! `hubble observe` builds them:
//!
//! - `--from-X`/`--to-X` constrain the source/destination;
//! - `--X` (ip, pod, namespace, label, service, port, fqdn) means either side: the request gets
//!   two filters, one with the value as source and one as destination (OR);
//! - every other flag applies to both of those filters (AND);
//! - `--not` puts the filter flag that follows it into the blacklist instead;
//! - a flag repeated is OR within its field; flags that select the same side in different ways
//!   (e.g. `--pod` and `--from-ip`) cannot be combined.

use clap::ArgMatches;
use hopwatch_collector::filter::FilterError;
use hopwatch_proto::flow::{
    EventTypeFilter, FlowFilter, HttpHeader, IpVersion, NetworkInterface, TcpFlags,
    TrafficDirection, Verdict, Workload,
};

/// Filter flag ids, as clap knows them.
pub(in crate::commands) const FILTER_FLAGS: &[&str] = &[
    "ip",
    "from_ip",
    "to_ip",
    "namespace",
    "from_namespace",
    "to_namespace",
    "pod",
    "from_pod",
    "to_pod",
    "label",
    "from_label",
    "to_label",
    "service",
    "from_service",
    "to_service",
    "port",
    "from_port",
    "to_port",
    "fqdn",
    "from_fqdn",
    "to_fqdn",
    "protocol",
    "verdict",
    "type",
    "http_status",
    "http_method",
    "http_path",
    "dns_query",
    "node_name",
    "traffic_direction",
    "uuid",
    "ip_version",
    "l7_protocol",
    "min_latency",
    "all_namespaces",
    "from_all_namespaces",
    "to_all_namespaces",
    "workload",
    "from_workload",
    "to_workload",
    "drop_reason_desc",
    "http_url",
    "http_header",
    "tcp_flags",
    "ipv4",
    "ipv6",
    "trace_id",
    "node_label",
    "interface",
    "cel_expression",
    "sni",
    "client_ip",
];

const CONFLICTS: &[&[&str]] = &[
    &[
        "from_fqdn",
        "from_ip",
        "ip",
        "fqdn",
        "from_namespace",
        "namespace",
        "from_all_namespaces",
        "all_namespaces",
        "from_pod",
        "pod",
    ],
    &[
        "to_fqdn",
        "to_ip",
        "ip",
        "fqdn",
        "to_namespace",
        "namespace",
        "to_all_namespaces",
        "all_namespaces",
        "to_pod",
        "pod",
    ],
    &["label", "from_label"],
    &["label", "to_label"],
    &["service", "from_service"],
    &["service", "to_service"],
    &["port", "from_port"],
    &["port", "to_port"],
    &["workload", "from_workload"],
    &["workload", "to_workload"],
];

/// A flag the user got wrong (exit status 2): filters, `--output`, `--since`/`--until`. Value
/// errors reach the user through clap, which names the flag and the value before the message.
#[derive(Debug, thiserror::Error)]
pub(in crate::commands) enum FlagError {
    #[error("filters --{} and --{} cannot be combined", flag(first), flag(second))]
    Conflict { first: &'static str, second: &'static str },
    #[error("--not must be followed by a filter flag")]
    DanglingNot,
    /// `--verdict`.
    #[error("expected FORWARDED, DROPPED, ERROR, AUDIT, REDIRECTED, TRACED or TRANSLATED")]
    Verdict { value: String },
    /// `--type`.
    #[error(
        "expected drop, trace, l7, sock, policy-verdict, capture, debug, agent or a number (with \
         an optional :subtype number)"
    )]
    Type { value: String },
    /// `--type name:subtype`.
    #[error("subtype {sub_type:?} is not a number")]
    SubType {
        sub_type: String,
        #[source]
        source: std::num::ParseIntError,
    },
    /// `--traffic-direction`.
    #[error("expected ingress or egress")]
    Direction { value: String },
    /// `--ip-version`.
    #[error("expected v4 or v6")]
    IpVersion { value: String },
    /// `--tcp-flags`.
    #[error(
        "unknown TCP flag {flag:?} (expected a comma-separated list of SYN, FIN, RST, PSH, ACK, URG, ECE, CWR, NS)"
    )]
    TcpFlag { flag: String },
    /// `--http-header`.
    #[error("expected NAME:VALUE")]
    HttpHeader { value: String },
    /// `--allowlist`/`--denylist`.
    #[error("--{flag} {value}: {source}")]
    RawFilter {
        flag: &'static str,
        value: String,
        #[source]
        source: hopwatch_proto::JsonError,
    },
    /// `--field-mask`.
    #[error("--field-mask: {0}")]
    FieldMask(#[source] hopwatch_proto::FieldMaskError),
    /// `--field-mask` with an output that prints summaries, as `hubble observe` refuses it.
    #[error(
        "--field-mask needs -o json or -o jsonpb: the {format} output reads fields the mask may remove"
    )]
    FieldMaskOutput { format: &'static str },
    /// A `hubble observe` flag with no meaning without Cilium (or that hopwatch refuses).
    #[error("--{flag} is not supported: {reason}")]
    Unsupported { flag: &'static str, reason: &'static str },
    /// A value the collector's filters would refuse (`--to-ip 10.0.0.0/40`), checked here so
    /// the user hears which flag is wrong before anything is sent.
    #[error("{}", filter_reason(source))]
    Filter {
        #[source]
        source: FilterError,
    },
    /// `--allowlist`/`--denylist` JSON that parses but that the collector's filters refuse.
    #[error("--allowlist/--denylist: {source}")]
    RawFilterValue {
        #[source]
        source: FilterError,
    },
    /// `--output`.
    #[error("{value:?} is not one of compact, dict, table, json, jsonpb")]
    Output { value: String },
    #[error(
        "--since {since} is after --until {until}: no flow can match; give an earlier --since \
         or a later --until"
    )]
    SinceAfterUntil { since: prost_types::Timestamp, until: prost_types::Timestamp },
}

/// Why the collector's filters refuse a value, without the field and value clap already names.
fn filter_reason(e: &FilterError) -> &str {
    match e {
        FilterError::Invalid { reason, .. } => reason,
    }
}

fn flag(id: &str) -> String {
    id.replace('_', "-")
}

/// One side of the request (whitelist or blacklist) being built.
#[derive(Default)]
struct Tracker {
    left: FlowFilter,
    right: FlowFilter,
    either: bool,
    used: Vec<&'static str>,
}

impl Tracker {
    fn both(&mut self, f: impl Fn(&mut FlowFilter)) {
        f(&mut self.left);
        f(&mut self.right);
    }

    #[expect(clippy::too_many_lines, reason = "one short arm per filter flag")]
    fn add(&mut self, id: &'static str, v: &str) -> Result<(), FlagError> {
        for group in CONFLICTS.iter().filter(|g| g.contains(&id)) {
            if let Some(other) = self.used.iter().find(|u| **u != id && group.contains(u)) {
                return Err(FlagError::Conflict { first: other, second: id });
            }
        }
        if !self.used.contains(&id) {
            self.used.push(id);
        }
        let s = v.to_owned();
        macro_rules! either {
            ($src:ident, $dst:ident, $val:expr) => {{
                self.either = true;
                let val: String = $val;
                self.left.$src.push(val.clone());
                self.right.$dst.push(val);
            }};
        }
        match id {
            "ip" => either!(source_ip, destination_ip, s),
            "from_ip" => self.both(|f| f.source_ip.push(s.clone())),
            "to_ip" => self.both(|f| f.destination_ip.push(s.clone())),
            "namespace" => either!(source_pod, destination_pod, format!("{v}/")),
            "from_namespace" => self.both(|f| f.source_pod.push(format!("{v}/"))),
            "to_namespace" => self.both(|f| f.destination_pod.push(format!("{v}/"))),
            "pod" => either!(source_pod, destination_pod, namespaced(v)),
            "from_pod" => self.both(|f| f.source_pod.push(namespaced(v))),
            "to_pod" => self.both(|f| f.destination_pod.push(namespaced(v))),
            "label" => either!(source_label, destination_label, s),
            "from_label" => self.both(|f| f.source_label.push(s.clone())),
            "to_label" => self.both(|f| f.destination_label.push(s.clone())),
            "service" => either!(source_service, destination_service, namespaced(v)),
            "from_service" => self.both(|f| f.source_service.push(namespaced(v))),
            "to_service" => self.both(|f| f.destination_service.push(namespaced(v))),
            "port" => either!(source_port, destination_port, s),
            "from_port" => self.both(|f| f.source_port.push(s.clone())),
            "to_port" => self.both(|f| f.destination_port.push(s.clone())),
            "fqdn" => either!(source_fqdn, destination_fqdn, s),
            "from_fqdn" => self.both(|f| f.source_fqdn.push(s.clone())),
            "to_fqdn" => self.both(|f| f.destination_fqdn.push(s.clone())),
            "protocol" => self.both(|f| f.protocol.push(s.clone())),
            "verdict" => {
                let verdict = parse_verdict(v).expect("validated by clap");
                self.both(|f| f.verdict.push(verdict.into()));
            }
            "type" => {
                let t = parse_type(v).expect("validated by clap");
                self.both(|f| f.event_type.push(t));
            }
            "http_status" => self.both(|f| f.http_status_code.push(s.clone())),
            "http_method" => self.both(|f| f.http_method.push(s.clone())),
            "http_path" => self.both(|f| f.http_path.push(s.clone())),
            "dns_query" => self.both(|f| f.dns_query.push(s.clone())),
            "node_name" => self.both(|f| f.node_name.push(s.clone())),
            "traffic_direction" => {
                let d = parse_direction(v).expect("validated by clap");
                self.both(|f| f.traffic_direction.push(d.into()));
            }
            "uuid" => self.both(|f| f.uuid.push(s.clone())),
            "ip_version" => {
                let ver = parse_ip_version(v).expect("validated by clap");
                self.both(|f| f.ip_version.push(ver));
            }
            "l7_protocol" => self.both(|f| f.l7_protocol.push(s.to_ascii_lowercase())),
            "all_namespaces" => either!(source_pod, destination_pod, "/".to_owned()),
            "from_all_namespaces" => self.both(|f| f.source_pod.push("/".to_owned())),
            "to_all_namespaces" => self.both(|f| f.destination_pod.push("/".to_owned())),
            "workload" => {
                self.either = true;
                self.left.source_workload.push(parse_workload(v));
                self.right.destination_workload.push(parse_workload(v));
            }
            "from_workload" => self.both(|f| f.source_workload.push(parse_workload(v))),
            "to_workload" => self.both(|f| f.destination_workload.push(parse_workload(v))),
            "drop_reason_desc" => self.both(|f| f.kernel_drop_reason.push(s.clone())),
            "http_url" => self.both(|f| f.http_url.push(s.clone())),
            "sni" => self.both(|f| f.sni.push(s.to_ascii_lowercase())),
            "client_ip" => self.both(|f| f.client_ip.push(s.clone())),
            "http_header" => {
                let h = parse_http_header(v).expect("validated by clap");
                self.both(|f| f.http_header.push(h.clone()));
            }
            "tcp_flags" => {
                let t = parse_tcp_flags(v).expect("validated by clap");
                self.both(|f| f.tcp_flags.push(t));
            }
            "ipv4" => self.both(|f| f.ip_version.push(IpVersion::IPv4.into())),
            "ipv6" => self.both(|f| f.ip_version.push(IpVersion::IPv6.into())),
            "trace_id" => self.both(|f| f.trace_id.push(s.clone())),
            "node_label" => self.both(|f| f.node_labels.push(s.clone())),
            "interface" => {
                let i = parse_interface(v);
                self.both(|f| f.interface.push(i.clone()));
            }
            "cel_expression" => self.both(|f| {
                f.experimental.get_or_insert_default().cel_expression.push(s.clone());
            }),
            "min_latency" => {
                let d = super::time::parse_latency(v).expect("validated by clap");
                let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
                // Several --min-latency: the smallest is the least strict (OR).
                self.both(|f| {
                    f.min_latency_ns =
                        if f.min_latency_ns == 0 { ns } else { f.min_latency_ns.min(ns) }
                });
            }
            other => unreachable!("{other} is not a filter flag"),
        }
        Ok(())
    }

    fn finish(self) -> Vec<FlowFilter> {
        if self.used.is_empty() {
            Vec::new()
        } else if self.either {
            vec![self.left, self.right]
        } else {
            vec![self.left]
        }
    }
}

/// `name` → `default/name` (Kubernetes' default namespace), as `hubble observe` does.
fn namespaced(v: &str) -> String {
    if v.contains('/') { v.to_owned() } else { format!("default/{v}") }
}

/// A filter flag occurrence in command-line order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(in crate::commands) struct Occurrence {
    pub index: usize,
    pub id: &'static str,
    pub value: String,
}

/// Filter flags and `--not`s from parsed arguments, in command-line order.
pub(super) fn occurrences(m: &ArgMatches) -> (Vec<Occurrence>, Vec<usize>) {
    let mut out = Vec::new();
    for &id in FILTER_FLAGS {
        if let (Some(values), Some(indices)) = (m.get_many::<String>(id), m.indices_of(id)) {
            for (value, index) in values.zip(indices) {
                out.push(Occurrence { index, id, value: value.clone() });
            }
        }
    }
    out.sort_by_key(|o| o.index);
    // A count flag has a default value (with an index of its own) when not given.
    let given = m.value_source("not") == Some(clap::parser::ValueSource::CommandLine);
    let nots = if given {
        m.indices_of("not").map(Iterator::collect).unwrap_or_default()
    } else {
        Vec::new()
    };
    (out, nots)
}

/// (whitelist, blacklist) for the request.
pub(in crate::commands) fn build(
    flags: &[Occurrence],
    nots: &[usize],
) -> Result<(Vec<FlowFilter>, Vec<FlowFilter>), FlagError> {
    let (mut white, mut black) = (Tracker::default(), Tracker::default());
    let mut nots = nots.to_vec();
    nots.sort_unstable();
    let mut pending = nots.iter().peekable();
    let mut negate = false;
    for o in flags {
        while pending.peek().is_some_and(|&&n| n < o.index) {
            negate = true;
            pending.next();
        }
        if negate {
            black.add(o.id, &o.value)?;
        } else {
            white.add(o.id, &o.value)?;
        }
        negate = false;
    }
    if pending.next().is_some() {
        return Err(FlagError::DanglingNot);
    }
    Ok((white.finish(), black.finish()))
}

// ---- value checks (clap value parsers: a bad value exits 2 naming the flag) ----

/// Checks `v` as the value of filter flag `id` the way clap's value parsers do for `observe`
/// (the web UI's filters come as text, not through clap). `min_latency` is checked by
/// [`super::time::parse_latency`].
pub(in crate::commands) fn check_value(id: &str, v: &str) -> Result<(), FlagError> {
    match id {
        "verdict" => parse_verdict(v).map(drop),
        "type" => parse_type(v).map(drop),
        "traffic_direction" => parse_direction(v).map(drop),
        "http_header" => parse_http_header(v).map(drop),
        "tcp_flags" => parse_tcp_flags(v).map(drop),
        "ip_version" => parse_ip_version(v).map(drop),
        _ => Ok(()),
    }
}

pub(super) fn parse_verdict(v: &str) -> Result<Verdict, FlagError> {
    Verdict::from_str_name(&v.to_ascii_uppercase())
        .filter(|x| *x != Verdict::Unknown)
        .ok_or_else(|| FlagError::Verdict { value: v.to_owned() })
}

/// Cilium's monitor message types (`hubble observe -t`).
const TYPES: &[(&str, i32)] = &[
    ("drop", 1),
    ("debug", 2),
    ("capture", 3),
    ("trace", 4),
    ("policy-verdict", 5),
    ("recorder", 6),
    ("trace-sock", 7),
    ("sock", 7),
    ("l7", 129),
    ("agent", 130),
];

pub(super) fn parse_type(v: &str) -> Result<EventTypeFilter, FlagError> {
    let (name, sub) = match v.split_once(':') {
        Some((n, s)) => (n, Some(s)),
        None => (v, None),
    };
    let lower = name.to_ascii_lowercase();
    let t = TYPES
        .iter()
        .find(|(n, _)| *n == lower)
        .map(|(_, t)| *t)
        .or_else(|| name.parse().ok())
        .ok_or_else(|| FlagError::Type { value: v.to_owned() })?;
    let sub_type = match sub {
        Some(s) => Some(
            s.parse::<i32>()
                .map_err(|source| FlagError::SubType { sub_type: s.to_owned(), source })?,
        ),
        None => None,
    };
    Ok(EventTypeFilter {
        r#type: t,
        match_sub_type: sub_type.is_some(),
        sub_type: sub_type.unwrap_or(0),
    })
}

pub(super) fn parse_direction(v: &str) -> Result<TrafficDirection, FlagError> {
    match v.to_ascii_lowercase().as_str() {
        "ingress" => Ok(TrafficDirection::Ingress),
        "egress" => Ok(TrafficDirection::Egress),
        _ => Err(FlagError::Direction { value: v.to_owned() }),
    }
}

/// `[kind/]name` (`Deployment/api`, `api`, `Deployment/`), as `hubble observe --workload`.
fn parse_workload(v: &str) -> Workload {
    match v.split_once('/') {
        Some((kind, name)) => Workload { kind: kind.to_owned(), name: name.to_owned() },
        None => Workload { kind: String::new(), name: v.to_owned() },
    }
}

/// `NAME:VALUE`.
pub(super) fn parse_http_header(v: &str) -> Result<HttpHeader, FlagError> {
    let (key, value) =
        v.split_once(':').ok_or_else(|| FlagError::HttpHeader { value: v.to_owned() })?;
    Ok(HttpHeader { key: key.to_owned(), value: value.to_owned() })
}

/// `syn,ack`: a flow matches when it has all of them.
pub(super) fn parse_tcp_flags(v: &str) -> Result<TcpFlags, FlagError> {
    let mut t = TcpFlags::default();
    for flag in v.split(',') {
        let slot = match flag.to_ascii_uppercase().as_str() {
            "SYN" => &mut t.syn,
            "FIN" => &mut t.fin,
            "RST" => &mut t.rst,
            "PSH" => &mut t.psh,
            "ACK" => &mut t.ack,
            "URG" => &mut t.urg,
            "ECE" => &mut t.ece,
            "CWR" => &mut t.cwr,
            "NS" => &mut t.ns,
            _ => return Err(FlagError::TcpFlag { flag: flag.to_owned() }),
        };
        *slot = true;
    }
    Ok(t)
}

/// An interface name (`eth0`), or its index (`3`): hopwatch's agent records the index of the
/// interface a packet was dropped on, not its name.
fn parse_interface(v: &str) -> NetworkInterface {
    match v.parse::<u32>() {
        Ok(index) if index > 0 => NetworkInterface { index, name: String::new() },
        _ => NetworkInterface { index: 0, name: v.to_owned() },
    }
}

pub(super) fn parse_ip_version(v: &str) -> Result<i32, FlagError> {
    match v.to_ascii_lowercase().as_str() {
        "4" | "v4" | "ipv4" => Ok(1),
        "6" | "v6" | "ipv6" => Ok(2),
        _ => Err(FlagError::IpVersion { value: v.to_owned() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn occ(list: &[(&'static str, &str)]) -> Vec<Occurrence> {
        list.iter()
            .enumerate()
            .map(|(i, (id, v))| Occurrence { index: i * 2 + 1, id, value: (*v).to_owned() })
            .collect()
    }

    #[test]
    fn either_flags_make_two_filters() {
        let (white, black) =
            build(&occ(&[("ip", "10.0.0.1"), ("verdict", "DROPPED")]), &[]).unwrap();
        assert!(black.is_empty());
        assert_eq!(white.len(), 2);
        assert_eq!(white[0].source_ip, ["10.0.0.1"]);
        assert!(white[0].destination_ip.is_empty());
        assert_eq!(white[1].destination_ip, ["10.0.0.1"]);
        assert_eq!(white[0].verdict, [2]);
        assert_eq!(white[1].verdict, [2]);
    }

    #[test]
    fn directional_flags_make_one_filter() {
        let err =
            build(&occ(&[("from_pod", "prod/web"), ("from_namespace", "x")]), &[]).unwrap_err();
        assert!(err.to_string().contains("--from-namespace"), "{err}");
        let (white, _) =
            build(&occ(&[("from_pod", "web"), ("to_port", "5432"), ("to_port", "6379")]), &[])
                .unwrap();
        assert_eq!(white.len(), 1);
        assert_eq!(white[0].source_pod, ["default/web"]);
        assert_eq!(white[0].destination_port, ["5432", "6379"]);
    }

    #[test]
    fn not_negates_the_next_filter_only() {
        // --to-port 80 --not --verdict FORWARDED --protocol tcp
        let flags = vec![
            Occurrence { index: 2, id: "to_port", value: "80".into() },
            Occurrence { index: 5, id: "verdict", value: "FORWARDED".into() },
            Occurrence { index: 7, id: "protocol", value: "tcp".into() },
        ];
        let (white, black) = build(&flags, &[3]).unwrap();
        assert_eq!(white.len(), 1);
        assert_eq!(white[0].destination_port, ["80"]);
        assert_eq!(white[0].protocol, ["tcp"]);
        assert!(white[0].verdict.is_empty());
        assert_eq!(black.len(), 1);
        assert_eq!(black[0].verdict, [1]);
        assert!(matches!(build(&flags, &[9]), Err(FlagError::DanglingNot)));
    }

    #[test]
    fn sni_applies_to_both_filters_lower_case() {
        // --ip 10.0.0.1 --sni API.example.com --sni *.example.org
        let flags =
            occ(&[("ip", "10.0.0.1"), ("sni", "API.example.com"), ("sni", "*.example.org")]);
        let (white, _) = build(&flags, &[]).unwrap();
        assert_eq!(white.len(), 2);
        for f in &white {
            assert_eq!(f.sni, ["api.example.com", "*.example.org"]);
        }
    }

    #[test]
    fn conflicting_flags_are_refused() {
        let err = build(&occ(&[("ip", "1.1.1.1"), ("from_ip", "2.2.2.2")]), &[]).unwrap_err();
        assert!(matches!(err, FlagError::Conflict { first: "ip", second: "from_ip" }), "{err:?}");
        assert_eq!(err.to_string(), "filters --ip and --from-ip cannot be combined");
        assert!(build(&occ(&[("port", "80"), ("to_port", "81")]), &[]).is_err());
        assert!(build(&occ(&[("from_ip", "1.1.1.1"), ("to_pod", "db")]), &[]).is_ok());
        assert!(build(&occ(&[("from_ip", "1.1.1.1"), ("from_ip", "1.1.1.2")]), &[]).is_ok());
    }

    #[test]
    fn value_parsers() {
        assert_eq!(parse_verdict("dropped").unwrap(), Verdict::Dropped);
        assert!(
            matches!(parse_verdict("maybe"), Err(FlagError::Verdict { value }) if value == "maybe")
        );
        assert_eq!(parse_type("drop").unwrap().r#type, 1);
        assert_eq!(parse_type("l7").unwrap().r#type, 129);
        let t = parse_type("trace:3").unwrap();
        assert!(t.match_sub_type && t.sub_type == 3 && t.r#type == 4);
        assert!(matches!(parse_type("nope"), Err(FlagError::Type { value }) if value == "nope"));
        let err = parse_type("trace:x").unwrap_err();
        assert_eq!(err.to_string(), "subtype \"x\" is not a number");
        assert!(std::error::Error::source(&err).is_some(), "{err:?}");
        assert_eq!(parse_direction("EGRESS").unwrap(), TrafficDirection::Egress);
        assert!(matches!(parse_direction("up"), Err(FlagError::Direction { .. })));
        assert_eq!(parse_ip_version("v6").unwrap(), 2);
        assert_eq!(parse_ip_version("v5").unwrap_err().to_string(), "expected v4 or v6");
    }
}
