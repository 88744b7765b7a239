//! Exchanges (a parsed request and its response) to the wire's L7 records
//! (`proto/flow/flow.proto`). Whether the exchange failed, and why, is the protocol's to say
//! (`Request::failure`); this only moves the parsed fields into the record.

use hopwatch_proto::flow::{self, layer7::Record};
use hopwatch_protocols::{Request, Response, dns, http1, mysql, postgres, redis, sql::cap};

/// The flow's `l7` content for one exchange.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct L7Record {
    pub(crate) record: Record,
    /// Why the exchange failed ("HTTP 503", "SQLSTATE 42P01", "ERR", "NXDOMAIN"), `None` when it
    /// did not (or no response was seen).
    pub(crate) error: Option<String>,
}

/// The record of `req` and its response (`None`: not seen, e.g. a timeout), consuming the
/// exchange: its strings move into the record instead of being copied (one L7 flow per
/// exchange and end, on the agent's hot path). A response of another protocol is ignored.
pub(crate) fn l7_record(req: Request, resp: Option<Response>) -> L7Record {
    let error = req.failure(resp.as_ref());
    let record = match req {
        Request::Http(r) => {
            let resp = resp.and_then(|x| if let Response::Http(x) = x { Some(x) } else { None });
            http(r, resp)
        }
        Request::Postgres(r) => {
            let resp =
                resp.and_then(|x| if let Response::Postgres(x) = x { Some(x) } else { None });
            postgres(&r, resp.as_ref())
        }
        Request::Redis(r) => {
            let resp = resp.and_then(|x| if let Response::Redis(x) = x { Some(x) } else { None });
            redis(r, resp)
        }
        Request::Mysql(r) => {
            let resp = resp.and_then(|x| if let Response::Mysql(x) = x { Some(x) } else { None });
            mysql(&r, resp.as_ref())
        }
        Request::Dns(r) => {
            let resp = resp.and_then(|x| if let Response::Dns(x) = x { Some(x) } else { None });
            dns(&r, resp.as_ref())
        }
    };
    L7Record { record, error }
}

/// The W3C trace an HTTP exchange belongs to: the trace id of its `traceparent` header
/// (`00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`); `None` without a valid one (an
/// all-zero trace id is invalid).
pub(crate) fn trace_context(record: Option<&Record>) -> Option<flow::TraceContext> {
    let Some(Record::Http(h)) = record else { return None };
    let header = h.headers.iter().find(|h| h.key.eq_ignore_ascii_case("traceparent"))?;
    let mut parts = header.value.trim().split('-');
    let (_version, trace_id) = (parts.next()?, parts.next()?);
    let hex = |s: &str| s.bytes().all(|b| b.is_ascii_hexdigit());
    if trace_id.len() != 32 || !hex(trace_id) || trace_id.bytes().all(|b| b == b'0') {
        return None;
    }
    Some(flow::TraceContext {
        parent: Some(flow::TraceParent { trace_id: trace_id.to_ascii_lowercase() }),
    })
}

fn http(req: http1::Request, resp: Option<http1::Response>) -> Record {
    let http1::Request { method, path, version, host, headers, .. } = req;
    let url = if host.is_empty() || !path.starts_with('/') {
        path
    } else {
        let mut url = String::with_capacity("http://".len() + host.len() + path.len());
        url.push_str("http://");
        url.push_str(&host);
        url.push_str(&path);
        cap(url)
    };
    let code = resp.as_ref().map_or(0, |r| r.status);
    let headers = headers
        .into_iter()
        .chain(resp.map(|r| r.headers).unwrap_or_default())
        .map(|h| flow::HttpHeader { key: h.name.to_owned(), value: h.value })
        .collect();
    Record::Http(flow::Http {
        code: u32::from(code),
        method: method.into_owned(),
        url,
        protocol: version.as_str().to_owned(),
        headers,
    })
}

fn postgres(req: &postgres::Request, resp: Option<&postgres::Response>) -> Record {
    use postgres::{QueryKind, Request as Q, Response as R};
    let mut rec = flow::Postgres::default();
    match req {
        Q::Startup(login) => {
            rec.kind = "startup".into();
            rec.user.clone_from(&login.user);
            rec.database.clone_from(&login.database);
        }
        Q::SslRequest => rec.kind = "ssl".into(),
        Q::GssEncRequest => rec.kind = "gssenc".into(),
        Q::Cancel => rec.kind = "cancel".into(),
        Q::Query { kind, query, login } => {
            rec.kind = match kind {
                QueryKind::Simple => "simple",
                QueryKind::Extended => "extended",
            }
            .into();
            rec.query.clone_from(query);
            if let Some(login) = login {
                rec.user.clone_from(&login.user);
                rec.database.clone_from(&login.database);
            }
        }
    }
    match resp {
        Some(R::Encryption { accepted }) => {
            rec.command = if *accepted { "accepted" } else { "refused" }.into();
        }
        Some(R::Done { command, error_code }) => {
            rec.command.clone_from(command);
            rec.error_code.clone_from(error_code);
        }
        None => {}
    }
    Record::Postgres(rec)
}

fn redis(req: redis::Request, resp: Option<redis::Response>) -> Record {
    Record::Redis(flow::Redis {
        command: req.command,
        error: resp.and_then(|r| r.error).unwrap_or_default(),
        args: req.args,
    })
}

fn mysql(req: &mysql::Request, resp: Option<&mysql::Response>) -> Record {
    let mut rec = flow::MySql {
        command: req.name().to_owned(),
        query: req.query.clone(),
        statement_id: req.statement_id,
        ..flow::MySql::default()
    };
    if let Some(resp) = resp {
        if resp.statement_id != 0 {
            rec.statement_id = resp.statement_id;
        }
        rec.error_code = u32::from(resp.error_code);
        rec.sql_state.clone_from(&resp.sql_state);
    }
    Record::Mysql(rec)
}

fn dns(req: &dns::Message, resp: Option<&dns::Message>) -> Record {
    let query = if req.query.is_empty() { resp.map(|r| r.query.clone()) } else { None };
    let qtype = if req.query.is_empty() { resp.map_or(0, |r| r.qtype) } else { req.qtype };
    let mut rec = flow::Dns {
        query: query.unwrap_or_else(|| req.query.clone()),
        qtypes: if qtype == 0 { Vec::new() } else { vec![dns::type_name(qtype)] },
        ..flow::Dns::default()
    };
    if let Some(resp) = resp {
        rec.ips.clone_from(&resp.ips);
        rec.cnames.clone_from(&resp.cnames);
        rec.ttl = resp.ttl;
        rec.rcode = u32::from(resp.rcode);
        rec.rrtypes = resp.rrtypes.iter().map(|&t| dns::type_name(t)).collect();
    }
    Record::Dns(rec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http_with(headers: &[(&str, &str)]) -> Record {
        Record::Http(flow::Http {
            headers: headers
                .iter()
                .map(|(k, v)| flow::HttpHeader { key: (*k).into(), value: (*v).into() })
                .collect(),
            ..flow::Http::default()
        })
    }

    #[test]
    fn the_trace_id_comes_from_a_valid_traceparent() {
        let id = |r: &Record| trace_context(Some(r)).and_then(|t| t.parent).map(|p| p.trace_id);
        let ok = http_with(&[
            ("x-request-id", "r-1"),
            ("traceparent", "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"),
        ]);
        assert_eq!(id(&ok).as_deref(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        for bad in ["00-00000000000000000000000000000000-00f067aa0ba902b7-01", "00-abc-01-01", "x"]
        {
            assert_eq!(id(&http_with(&[("traceparent", bad)])), None, "{bad}");
        }
        assert_eq!(id(&http_with(&[])), None);
        assert!(trace_context(Some(&Record::Redis(flow::Redis::default()))).is_none());
    }
}
