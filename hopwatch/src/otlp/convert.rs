//! An exchange's flows → an OpenTelemetry span, named and attributed after the OpenTelemetry
//! semantic conventions (`http.request.method`, `db.system.name`, `server.address`, ...), with
//! hopwatch's own measurements under `hopwatch.*`.

use std::collections::BTreeMap;

use hopwatch_proto::flow::{Flow, layer4, layer7::Record};
use opentelemetry_proto::tonic::{
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value::Value},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span::SpanKind, status::StatusCode},
};

/// Spans grouped by service (the calling side's name for a client span, the serving side's for
/// a server-only one), one `ResourceSpans` each.
pub(super) fn resource_spans<'a>(
    exchanges: impl Iterator<Item = (Option<&'a Flow>, Option<&'a Flow>)>,
) -> Vec<ResourceSpans> {
    let mut by_service: BTreeMap<String, Vec<Span>> = BTreeMap::new();
    for (client, server) in exchanges {
        if let Some((service, span)) = span(client, server) {
            by_service.entry(service).or_default().push(span);
        }
    }
    by_service
        .into_iter()
        .map(|(service, spans)| ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv("service.name", service)],
                ..Resource::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "hopwatch".to_owned(),
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                    ..InstrumentationScope::default()
                }),
                spans,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        })
        .collect()
}

/// The span of one exchange (the client end's timing when it was seen, else the server's) and
/// the service it belongs to; `None` for a flow without a trace or a span.
pub(super) fn span(client: Option<&Flow>, server: Option<&Flow>) -> Option<(String, Span)> {
    let main = client.or(server)?;
    let l7 = main.l7.as_ref()?;
    let s = l7.span.as_ref()?;
    let trace_id = hex(&main.trace_context.as_ref()?.parent.as_ref()?.trace_id, 16)?;
    let span_id = hex(&s.span_id, 8)?;
    let parent_span_id = hex(&s.parent_span_id, 8).unwrap_or_default();
    let end = main.time.as_ref().map_or(0, |t| {
        u64::try_from(t.seconds).unwrap_or(0) * 1_000_000_000 + u64::try_from(t.nanos).unwrap_or(0)
    });
    let (client_name, server_name) = (side_name(main, true), side_name(main, false));
    let mut attributes = vec![
        kv("hopwatch.client", client_name.clone()),
        kv("hopwatch.server", server_name.clone()),
        kv("hopwatch.node", main.node_name.clone()),
        kv("hopwatch.l7.protocol", l7.protocol.clone()),
    ];
    if let Some(ip) = &main.ip {
        attributes.push(kv("client.address", ip.source.clone()));
        attributes.push(kv("server.address", ip.destination.clone()));
    }
    if let Some((_, port)) = ports(main) {
        attributes.push(kv_int("server.port", port));
    }
    if !s.link.is_empty() {
        attributes.push(kv("hopwatch.link", s.link.clone()));
    }
    if !s.unlinked.is_empty() {
        attributes.push(kv("hopwatch.unlinked", s.unlinked.clone()));
    }
    for (key, end) in
        [("hopwatch.client.latency_ns", client), ("hopwatch.server.latency_ns", server)]
    {
        if let Some(l) = end.and_then(|f| f.l7.as_ref()) {
            attributes.push(kv_int(key, l.latency_ns));
        }
    }
    let name = record_attributes(l7.record.as_ref(), &l7.protocol, &mut attributes);
    let status = if l7.error.is_empty() {
        None
    } else {
        attributes.push(kv("error.type", l7.error.clone()));
        Some(Status { message: l7.error.clone(), code: StatusCode::Error.into() })
    };
    let (kind, service) = if client.is_some() {
        (SpanKind::Client, client_name)
    } else {
        (SpanKind::Server, server_name)
    };
    Some((
        service,
        Span {
            trace_id,
            span_id,
            parent_span_id,
            name,
            kind: kind.into(),
            start_time_unix_nano: end.saturating_sub(l7.latency_ns),
            end_time_unix_nano: end,
            attributes,
            status,
            ..Span::default()
        },
    ))
}

/// Protocol attributes; returns the span's name (`GET /chain`, `SELECT`, `GET` for Redis).
fn record_attributes(record: Option<&Record>, protocol: &str, a: &mut Vec<KeyValue>) -> String {
    match record {
        Some(Record::Http(h)) => {
            a.push(kv("http.request.method", h.method.clone()));
            a.push(kv("url.full", h.url.clone()));
            if h.code != 0 {
                a.push(kv_int("http.response.status_code", h.code));
            }
            let path = h.url.splitn(4, '/').nth(3).map_or("/".to_owned(), |p| format!("/{p}"));
            format!("{} {path}", h.method)
        }
        Some(Record::Postgres(p)) => db(a, "postgresql", &p.query, &p.command),
        Some(Record::Mysql(m)) => db(a, "mysql", &m.query, &m.command),
        Some(Record::Redis(r)) => {
            a.push(kv("db.system.name", "redis".to_owned()));
            a.push(kv("db.operation.name", r.command.clone()));
            r.command.clone()
        }
        Some(Record::Dns(d)) => {
            a.push(kv("dns.question.name", d.query.clone()));
            format!("DNS {}", d.query)
        }
        None => protocol.to_owned(),
    }
}

fn db(a: &mut Vec<KeyValue>, system: &str, query: &str, command: &str) -> String {
    a.push(kv("db.system.name", system.to_owned()));
    if !query.is_empty() {
        a.push(kv("db.query.text", query.to_owned()));
    }
    let op = query.split_whitespace().next().unwrap_or(command).to_ascii_uppercase();
    a.push(kv("db.operation.name", op.clone()));
    op
}

/// A pod name, else the process name, else the address, of the client (`client`) or server end.
fn side_name(f: &Flow, client: bool) -> String {
    let (ep, process, ip) = if client {
        (f.source.as_ref(), f.source_process.as_ref(), f.ip.as_ref().map(|i| &i.source))
    } else {
        (
            f.destination.as_ref(),
            f.destination_process.as_ref(),
            f.ip.as_ref().map(|i| &i.destination),
        )
    };
    ep.map(|e| e.pod_name.clone())
        .filter(|n| !n.is_empty())
        .or_else(|| process.map(|p| p.comm.clone()).filter(|c| !c.is_empty()))
        .or_else(|| ip.cloned())
        .unwrap_or_else(|| "unknown".to_owned())
}

fn ports(f: &Flow) -> Option<(u32, u32)> {
    match f.l4.as_ref()?.protocol.as_ref()? {
        layer4::Protocol::Tcp(t) => Some((t.source_port, t.destination_port)),
        layer4::Protocol::Udp(u) => Some((u.source_port, u.destination_port)),
        _ => None,
    }
}

/// `len` bytes from hex digits; `None` when `s` is not exactly that.
fn hex(s: &str, len: usize) -> Option<Vec<u8>> {
    if s.len() != 2 * len {
        return None;
    }
    (0..len).map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()).collect()
}

fn kv(key: &str, value: String) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(Value::StringValue(value)) }),
    }
}

fn kv_int(key: &str, value: impl Into<u64>) -> KeyValue {
    let v = i64::try_from(value.into()).unwrap_or(i64::MAX);
    KeyValue { key: key.to_owned(), value: Some(AnyValue { value: Some(Value::IntValue(v)) }) }
}

#[cfg(test)]
mod tests {
    use hopwatch_proto::flow::{
        Http, Ip, Layer7, Process, Span as FlowSpan, TraceContext, TraceParent, TrafficDirection,
    };

    use super::*;

    fn flow(dir: TrafficDirection, latency_ms: u64) -> Flow {
        Flow {
            time: Some(prost_types::Timestamp { seconds: 10, nanos: 0 }),
            traffic_direction: dir.into(),
            node_name: "n1".into(),
            ip: Some(Ip {
                source: "10.0.0.1".into(),
                destination: "10.0.0.2".into(),
                ..Ip::default()
            }),
            source_process: Some(Process { comm: "nginx".into(), ..Process::default() }),
            destination_process: Some(Process { comm: "python".into(), ..Process::default() }),
            trace_context: Some(TraceContext {
                parent: Some(TraceParent { trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into() }),
            }),
            l7: Some(Layer7 {
                latency_ns: latency_ms * 1_000_000,
                protocol: "http".into(),
                record: Some(Record::Http(Http {
                    code: 503,
                    method: "GET".into(),
                    url: "http://api/chain?x=1".into(),
                    ..Http::default()
                })),
                error: "HTTP 503".into(),
                span: Some(FlowSpan {
                    span_id: "00f067aa0ba902b7".into(),
                    parent_span_id: "0000000000000001".into(),
                    link: "thread".into(),
                    unlinked: String::new(),
                }),
                ..Layer7::default()
            }),
            ..Flow::default()
        }
    }

    #[test]
    fn an_exchange_is_one_client_span_with_both_ends_times() {
        let (c, s) = (flow(TrafficDirection::Egress, 12), flow(TrafficDirection::Ingress, 10));
        let (service, span) = span(Some(&c), Some(&s)).expect("a span");
        assert_eq!(service, "nginx");
        assert_eq!(span.name, "GET /chain?x=1");
        assert_eq!(span.kind, i32::from(SpanKind::Client));
        assert_eq!(span.trace_id.len(), 16);
        assert_eq!(span.span_id, [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
        assert_eq!(span.parent_span_id, [0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(span.end_time_unix_nano - span.start_time_unix_nano, 12_000_000);
        let int = |k: &str| {
            span.attributes.iter().find(|a| a.key == k).and_then(|a| {
                match a.value.as_ref()?.value {
                    Some(Value::IntValue(v)) => Some(v),
                    _ => None,
                }
            })
        };
        assert_eq!(int("hopwatch.server.latency_ns"), Some(10_000_000));
        assert_eq!(int("http.response.status_code"), Some(503));
        assert_eq!(span.status.map(|s| s.code), Some(StatusCode::Error.into()));
        // A server end alone is a server span of the serving side.
        let (service, alone) = super::span(None, Some(&s)).expect("a span");
        assert_eq!((service.as_str(), alone.kind), ("python", i32::from(SpanKind::Server)));
        assert!(super::span(Some(&Flow::default()), None).is_none());
    }
}
