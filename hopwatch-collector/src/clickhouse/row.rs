//! A stored event as a ClickHouse row: typed columns for what queries filter on (see
//! [`crate::filter::sql`]) and the whole event, protobuf-encoded, for exact reconstruction.
//!
//! The field order is the column order of [`super::schema`]'s tables: rows go over the wire as
//! `RowBinary`, which carries no names (18.16 has no `RowBinaryWithNamesAndTypes`).

use std::net::IpAddr;

use clickhouse::Row;
use hopwatch_proto::{
    flow::{Endpoint, Flow, Service, layer4, layer7::Record},
    observer::{GetFlowsResponse, get_flows_response::ResponseTypes},
};
use prost::Message as _;
use serde::{Deserialize, Serialize};

use crate::store::Stored;

/// What a row holds (`kind`).
pub const KIND_FLOW: u8 = 1;
/// A lost-event notice: sent to every history reader, never filtered or counted.
pub const KIND_LOST: u8 = 2;

/// One column per field Hubble filters on, plus `flow` (the encoded event).
#[derive(Debug, Clone, Default, Row, Serialize)]
pub struct FlowRow<'a> {
    /// Seconds: the partition and sort key.
    pub time: u32,
    pub time_ns: i64,
    pub kind: u8,
    pub node_name: &'a str,
    pub uuid: &'a str,
    pub verdict: i32,
    pub drop_reason: i32,
    pub event_type: i32,
    pub direction: i32,
    /// 0: unknown, 1: not a reply, 2: a reply.
    pub is_reply: u8,
    pub ip_version: i32,
    pub src_ip4: u32,
    pub dst_ip4: u32,
    pub src_ip6: [u8; 16],
    pub dst_ip6: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    pub l4_protocol: &'a str,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub src_namespace: &'a str,
    pub src_pod: &'a str,
    pub src_workloads: Vec<&'a str>,
    pub src_service_namespace: &'a str,
    pub src_service: &'a str,
    pub dst_namespace: &'a str,
    pub dst_pod: &'a str,
    pub dst_workloads: Vec<&'a str>,
    pub dst_service_namespace: &'a str,
    pub dst_service: &'a str,
    pub l7_protocol: &'a str,
    pub http_method: &'a str,
    pub http_code: u16,
    pub latency_ns: u64,
    pub trace_id: &'a str,
    #[serde(with = "serde_bytes")]
    pub flow: &'a [u8],
}

/// What a history query reads back.
#[derive(Debug, Row, Deserialize)]
pub struct StoredRow {
    pub time_ns: i64,
    #[serde(with = "serde_bytes")]
    pub flow: Vec<u8>,
}

/// The columns [`FlowRow`] writes, in order (for `INSERT` and the DDL's checks).
pub const COLUMNS: &[&str] = &[
    "time",
    "time_ns",
    "kind",
    "node_name",
    "uuid",
    "verdict",
    "drop_reason",
    "event_type",
    "direction",
    "is_reply",
    "ip_version",
    "src_ip4",
    "dst_ip4",
    "src_ip6",
    "dst_ip6",
    "src_port",
    "dst_port",
    "l4_protocol",
    "src_identity",
    "dst_identity",
    "src_namespace",
    "src_pod",
    "src_workloads",
    "src_service_namespace",
    "src_service",
    "dst_namespace",
    "dst_pod",
    "dst_workloads",
    "dst_service_namespace",
    "dst_service",
    "l7_protocol",
    "http_method",
    "http_code",
    "latency_ns",
    "trace_id",
    "flow",
];

fn split_ip(s: &str) -> (u32, [u8; 16]) {
    match s.parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) => (u32::from(a), [0; 16]),
        Ok(IpAddr::V6(a)) => (0, a.octets()),
        Err(_) => (0, [0; 16]),
    }
}

fn l4_name(f: &Flow) -> &'static str {
    match f.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
        Some(layer4::Protocol::Tcp(_)) => "tcp",
        Some(layer4::Protocol::Udp(_)) => "udp",
        Some(layer4::Protocol::Sctp(_)) => "sctp",
        Some(layer4::Protocol::IcmPv4(_)) => "icmpv4",
        Some(layer4::Protocol::IcmPv6(_)) => "icmpv6",
        None => "",
    }
}

fn endpoint(e: Option<&Endpoint>) -> (u32, &str, &str, Vec<&str>) {
    e.map_or((0, "", "", Vec::new()), |e| {
        (
            e.identity,
            e.namespace.as_str(),
            e.pod_name.as_str(),
            e.workloads.iter().map(|w| w.name.as_str()).collect(),
        )
    })
}

fn service(s: Option<&Service>) -> (&str, &str) {
    s.map_or(("", ""), |s| (s.namespace.as_str(), s.name.as_str()))
}

/// The row of `e`, whose encoding is `encoded`.
pub fn row<'a>(e: &'a Stored, encoded: &'a [u8]) -> FlowRow<'a> {
    let time_ns = e.time_ns;
    let time = u32::try_from(time_ns.div_euclid(1_000_000_000)).unwrap_or(0);
    let resp: &GetFlowsResponse = &e.resp;
    let mut r = FlowRow {
        time,
        time_ns,
        kind: KIND_LOST,
        node_name: resp.node_name.as_str(),
        flow: encoded,
        ..FlowRow::default()
    };
    let Some(ResponseTypes::Flow(f)) = &resp.response_types else {
        return r;
    };
    r.kind = KIND_FLOW;
    if !f.node_name.is_empty() {
        r.node_name = f.node_name.as_str();
    }
    r.uuid = f.uuid.as_str();
    r.verdict = f.verdict;
    r.drop_reason = f.drop_reason_desc;
    r.event_type = f.event_type.as_ref().map_or(0, |t| t.r#type);
    r.direction = f.traffic_direction;
    r.is_reply = f.is_reply.map_or(0, |b| u8::from(b) + 1);
    if let Some(ip) = &f.ip {
        r.ip_version = ip.ip_version;
        (r.src_ip4, r.src_ip6) = split_ip(&ip.source);
        (r.dst_ip4, r.dst_ip6) = split_ip(&ip.destination);
    }
    if let Some((s, d)) = f.ports() {
        r.src_port = u16::try_from(s).unwrap_or(0);
        r.dst_port = u16::try_from(d).unwrap_or(0);
    }
    r.l4_protocol = l4_name(f);
    (r.src_identity, r.src_namespace, r.src_pod, r.src_workloads) = endpoint(f.source.as_ref());
    (r.dst_identity, r.dst_namespace, r.dst_pod, r.dst_workloads) =
        endpoint(f.destination.as_ref());
    (r.src_service_namespace, r.src_service) = service(f.source_service.as_ref());
    (r.dst_service_namespace, r.dst_service) = service(f.destination_service.as_ref());
    r.l7_protocol = f.l7_protocol().unwrap_or("");
    if let Some(Record::Http(h)) = f.l7.as_ref().and_then(|l| l.record.as_ref()) {
        r.http_method = h.method.as_str();
        r.http_code = u16::try_from(h.code).unwrap_or(0);
    }
    r.latency_ns = f.latency_ns().unwrap_or(0);
    r.trace_id = f
        .trace_context
        .as_ref()
        .and_then(|t| t.parent.as_ref())
        .map_or("", |p| p.trace_id.as_str());
    r
}

/// The event a row holds.
pub fn decode(row: &StoredRow) -> Result<GetFlowsResponse, prost::DecodeError> {
    GetFlowsResponse::decode(row.flow.as_slice())
}
