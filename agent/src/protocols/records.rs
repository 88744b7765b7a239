//! Requests and responses to the wire's L7 records (`proto/flow/flow.proto`).

use super::{L7Record, dns, http1, mysql, postgres, redis, sql::cap};
use crate::proto::flow::{self, layer7::Record};

// Records take the exchange by value: its strings move into the flow (one L7 flow per exchange
// and end, on the agent's hot path) instead of being copied.
pub(super) fn http(req: http1::Request, resp: Option<http1::Response>) -> L7Record {
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
    L7Record {
        record: Record::Http(flow::Http {
            code: u32::from(code),
            method: method.into_owned(),
            url,
            protocol: version.as_str().to_owned(),
            headers,
        }),
        error: (code >= 500).then(|| format!("HTTP {code}")),
    }
}

pub(super) fn postgres(req: &postgres::Request, resp: Option<&postgres::Response>) -> L7Record {
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
    let mut error = None;
    match resp {
        Some(R::Encryption { accepted }) => {
            rec.command = if *accepted { "accepted" } else { "refused" }.into();
        }
        Some(R::Done { command, error_code }) => {
            rec.command.clone_from(command);
            if !error_code.is_empty() {
                rec.error_code.clone_from(error_code);
                error = Some(format!("SQLSTATE {error_code}"));
            }
        }
        None => {}
    }
    L7Record { record: Record::Postgres(rec), error }
}

pub(super) fn redis(req: redis::Request, resp: Option<redis::Response>) -> L7Record {
    let reply_error = resp.and_then(|r| r.error);
    // The error's first word is its kind ("ERR", "WRONGTYPE", "NOAUTH").
    let error = reply_error.as_ref().map(|e| {
        let kind = e.split_ascii_whitespace().next().unwrap_or("ERR");
        kind.to_owned()
    });
    L7Record {
        record: Record::Redis(flow::Redis {
            command: req.command,
            error: reply_error.unwrap_or_default(),
            args: req.args,
        }),
        error,
    }
}

pub(super) fn mysql(req: &mysql::Request, resp: Option<&mysql::Response>) -> L7Record {
    let mut rec = flow::MySql {
        command: req.name().to_owned(),
        query: req.query.clone(),
        statement_id: req.statement_id,
        ..flow::MySql::default()
    };
    let mut error = None;
    if let Some(resp) = resp {
        if resp.statement_id != 0 {
            rec.statement_id = resp.statement_id;
        }
        if resp.error_code != 0 {
            rec.error_code = u32::from(resp.error_code);
            rec.sql_state.clone_from(&resp.sql_state);
            error = Some(if resp.sql_state.is_empty() {
                format!("MySQL error {}", resp.error_code)
            } else {
                format!("SQLSTATE {}", resp.sql_state)
            });
        }
    }
    L7Record { record: Record::Mysql(rec), error }
}

pub(super) fn dns(req: &dns::Message, resp: Option<&dns::Message>) -> L7Record {
    let query = if req.query.is_empty() { resp.map(|r| r.query.clone()) } else { None };
    let qtype = if req.query.is_empty() { resp.map_or(0, |r| r.qtype) } else { req.qtype };
    let mut rec = flow::Dns {
        query: query.unwrap_or_else(|| req.query.clone()),
        qtypes: if qtype == 0 { Vec::new() } else { vec![dns::type_name(qtype)] },
        ..flow::Dns::default()
    };
    let mut error = None;
    if let Some(resp) = resp {
        rec.ips.clone_from(&resp.ips);
        rec.cnames.clone_from(&resp.cnames);
        rec.ttl = resp.ttl;
        rec.rcode = u32::from(resp.rcode);
        rec.rrtypes = resp.rrtypes.iter().map(|&t| dns::type_name(t)).collect();
        if resp.rcode != 0 {
            error = Some(dns::rcode_name(resp.rcode));
        }
    }
    L7Record { record: Record::Dns(rec), error }
}
