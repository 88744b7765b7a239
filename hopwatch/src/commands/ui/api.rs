//! The UI's JSON API over the collector's store:
//!
//! - `GET /api/hops?since=5m` — the hop table of the window (`hopwatch hops -o json`'s rows, each
//!   with an `id`) and the node each endpoint was seen on;
//! - `GET /api/hop?id=ID&since=5m` — one hop: its row, its latency histograms (client, server,
//!   connect) as kept, and its most recent flows;
//! - `GET /api/flows?number=200&f=FLAG:VALUE...` — the newest flows matching `hubble observe`'s
//!   filter flags (`f=verdict:DROPPED`, `f=from-pod:shop/web`, `f=!port:53` for `--not`);
//! - `GET /api/flows/follow?f=...` — the same filters, new flows as server-sent events.
//!
//! Flows are written as `hopwatch observe -o json` writes them (protobuf JSON of
//! `GetFlowsResponse`).

use std::{collections::BTreeMap, convert::Infallible, sync::Arc, time::Duration};

use axum::{
    Router,
    extract::{RawQuery, State},
    http::{StatusCode, header},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
    routing::get,
};
use hopwatch_collector::{
    hub::Hub,
    query::{self, Query},
};
use hopwatch_hops::{
    HopKey, Side,
    aggregate::hop_of,
    endpoint::Resolver,
    histogram::Histogram,
    view::{self, HopRow},
};
use hopwatch_proto::{
    clock::wall_now_ns,
    flow::{Flow, FlowFilter},
    observer::{GetFlowsRequest, GetFlowsResponse, get_flows_response::ResponseTypes},
};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::{StreamExt as _, wrappers::ReceiverStream};

use crate::commands::{
    hops,
    observe::{
        filters::{FILTER_FLAGS, FlagError, Occurrence, build, check_value},
        time::parse_latency,
    },
};

/// Window of the map and the hop details unless `since` says otherwise.
const DEFAULT_SINCE: Duration = Duration::from_mins(5);
/// Flows `/api/flows` returns unless `number` says otherwise, and at most.
const DEFAULT_FLOWS: u64 = 200;
const MAX_FLOWS: u64 = 10_000;
/// Recent flows shown with a hop.
const HOP_FLOWS: usize = 50;
/// Responses waiting between a query and its HTTP answer.
const QUERY_QUEUE: usize = 1024;

pub(super) fn routes() -> Router<Arc<Hub>> {
    Router::new()
        .route("/api/hops", get(hops_table))
        .route("/api/hop", get(hop_detail))
        .route("/api/flows", get(flows))
        .route("/api/flows/follow", get(follow))
}

/// What a request got wrong, or what the query refused: 400 with the reason as text.
#[derive(Debug, thiserror::Error)]
pub(super) enum ApiError {
    #[error("{name}={value:?}: {reason}")]
    Param { name: &'static str, value: String, reason: String },
    #[error("unknown filter {name:?} (use hubble observe's flag names, e.g. from-pod, verdict)")]
    UnknownFilter { name: String },
    #[error("filter {name}:{value}: {source}")]
    FilterValue {
        name: String,
        value: String,
        #[source]
        source: FlagError,
    },
    #[error("filters: {0}")]
    Filters(#[source] FlagError),
    #[error("query refused: {}", .0.message())]
    Query(tonic::Status),
    #[error("no hop {id:?} in the last {since:?}")]
    NoHop { id: String, since: Duration },
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = if matches!(self, ApiError::NoHop { .. }) {
            StatusCode::NOT_FOUND
        } else {
            StatusCode::BAD_REQUEST
        };
        (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], format!("{self}\n"))
            .into_response()
    }
}

// ============================================================================================
// Parameters
// ============================================================================================

/// One `f=[!]flag:value` filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct FilterParam {
    pub negated: bool,
    pub flag: String,
    pub value: String,
}

#[derive(Debug, Default)]
pub(super) struct Params {
    pub since: Option<Duration>,
    pub number: Option<u64>,
    pub id: Option<String>,
    pub filters: Vec<FilterParam>,
}

pub(super) fn params(raw: Option<&str>) -> Result<Params, ApiError> {
    let mut p = Params::default();
    for (k, v) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        match &*k {
            "since" => {
                let d = humantime::parse_duration(&v).map_err(|e| ApiError::Param {
                    name: "since",
                    value: v.to_string(),
                    reason: e.to_string(),
                })?;
                p.since = Some(d);
            }
            "number" => {
                let n: u64 = v.parse().map_err(|e: std::num::ParseIntError| ApiError::Param {
                    name: "number",
                    value: v.to_string(),
                    reason: e.to_string(),
                })?;
                p.number = Some(n.min(MAX_FLOWS));
            }
            "id" => p.id = Some(v.into_owned()),
            "f" => {
                let (negated, rest) = v.strip_prefix('!').map_or((false, &*v), |r| (true, r));
                let (flag, value) = rest.split_once(':').unwrap_or((rest, ""));
                p.filters.push(FilterParam {
                    negated,
                    flag: flag.trim().to_owned(),
                    value: value.trim().to_owned(),
                });
            }
            // Cache busters and the like.
            _ => {}
        }
    }
    Ok(p)
}

/// (whitelist, blacklist) as `hubble observe` builds them from the same flags.
pub(super) fn filters(
    list: &[FilterParam],
) -> Result<(Vec<FlowFilter>, Vec<FlowFilter>), ApiError> {
    let mut occurrences = Vec::with_capacity(list.len());
    let mut nots = Vec::new();
    for (i, f) in list.iter().enumerate() {
        let wanted = f.flag.trim_start_matches("--").replace('-', "_");
        let Some(&id) = FILTER_FLAGS.iter().find(|known| **known == wanted) else {
            return Err(ApiError::UnknownFilter { name: f.flag.clone() });
        };
        let bad =
            |source| ApiError::FilterValue { name: f.flag.clone(), value: f.value.clone(), source };
        check_value(id, &f.value).map_err(bad)?;
        if id == "min_latency" && parse_latency(&f.value).is_err() {
            return Err(ApiError::Param {
                name: "f",
                value: format!("{}:{}", f.flag, f.value),
                reason: "not a duration like 50ms".to_owned(),
            });
        }
        // Positions as on a command line: a `--not` right before the flag it negates.
        if f.negated {
            nots.push(2 * i);
        }
        occurrences.push(Occurrence { index: 2 * i + 1, id, value: f.value.clone() });
    }
    build(&occurrences, &nots).map_err(ApiError::Filters)
}

fn since_ns(d: Duration, now_ns: u64) -> u64 {
    now_ns.saturating_sub(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn timestamp(ns: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: i64::try_from(ns / 1_000_000_000).unwrap_or(i64::MAX),
        nanos: i32::try_from(ns % 1_000_000_000).unwrap_or(0),
    }
}

/// The flow responses a (non-following) `GetFlows` request gets, oldest first.
async fn fetch(hub: &Arc<Hub>, req: &GetFlowsRequest) -> Result<Vec<GetFlowsResponse>, ApiError> {
    let q = Query::joined(req.clone(), &hub.traces).map_err(ApiError::Query)?;
    let (tx, mut rx) = mpsc::channel(QUERY_QUEUE);
    tokio::spawn(query::run(hub.clone(), q, tx));
    let mut out = Vec::new();
    while let Some(r) = rx.recv().await {
        let r = r.map_err(ApiError::Query)?;
        if matches!(r.response_types, Some(ResponseTypes::Flow(_))) {
            out.push(r);
        }
    }
    Ok(out)
}

fn flow_of(r: &GetFlowsResponse) -> Option<&Flow> {
    match &r.response_types {
        Some(ResponseTypes::Flow(f)) => Some(f),
        _ => None,
    }
}

/// The window's flows (filtered as asked) and its bounds. The window starts no earlier than the
/// oldest flow the collector holds: rates over 5 minutes of an agent started 10 s ago would be
/// 30 times too low.
async fn window(hub: &Arc<Hub>, p: &Params) -> Result<(Vec<GetFlowsResponse>, u64, u64), ApiError> {
    let (whitelist, blacklist) = filters(&p.filters)?;
    let now = wall_now_ns();
    let oldest = GetFlowsRequest { first: true, number: 1, ..GetFlowsRequest::default() };
    let held_since = fetch(hub, &oldest)
        .await?
        .first()
        .and_then(flow_of)
        .map(|f| hopwatch_hops::aggregate::flow_time_ns(f, now));
    let start = since_ns(p.since.unwrap_or(DEFAULT_SINCE), now).max(held_since.unwrap_or(0));
    let req = GetFlowsRequest {
        since: Some(timestamp(start)),
        whitelist,
        blacklist,
        ..GetFlowsRequest::default()
    };
    Ok((fetch(hub, &req).await?, start, now))
}

/// How the UI names a hop (stable across refreshes).
pub(super) fn hop_id(key: &HopKey) -> String {
    format!(
        "{} -> {}:{}/{}",
        key.source.display(),
        key.destination.display(),
        key.port,
        key.transport.as_str()
    )
}

#[derive(Serialize)]
struct HopOut {
    id: String,
    #[serde(flatten)]
    row: HopRow,
}

// ============================================================================================
// Handlers
// ============================================================================================

#[derive(Serialize)]
struct HopsOut {
    window_seconds: f64,
    flows: u64,
    hops: Vec<HopOut>,
    /// Endpoint (`namespace/name`) → the node it was seen on (the node of the agent that
    /// reported its side), for grouping the map by node.
    nodes: BTreeMap<String, String>,
}

async fn hops_table(
    State(hub): State<Arc<Hub>>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let p = params(raw.as_deref())?;
    let (responses, start, now) = window(&hub, &p).await?;
    let out = tokio::task::spawn_blocking(move || {
        let flows: Vec<Flow> = responses.iter().filter_map(flow_of).cloned().collect();
        let (agg, window_s) = hops::aggregate(&flows, start, now, false);
        let mut hops: Vec<HopOut> = agg
            .table()
            .iter()
            .map(|(k, h)| HopOut {
                id: hop_id(k),
                row: view::row(k, h, Some(&agg.context().ledger), window_s),
            })
            .collect();
        hops.sort_by(|a, b| a.id.cmp(&b.id));
        let mut nodes = BTreeMap::new();
        let mut resolver = Resolver::default();
        for f in &flows {
            if let Some((key, Some(side))) = hop_of(f, &mut resolver) {
                let local = if side == Side::Client { &key.source } else { &key.destination };
                nodes.entry(local.display()).or_insert_with(|| f.node_name.clone());
            }
        }
        HopsOut { window_seconds: window_s, flows: agg.counted, hops, nodes }
    })
    .await
    .expect("the hop table task does not panic");
    Ok(json_response(serde_json::to_string(&out).expect("serializable")))
}

#[derive(Serialize)]
struct Histograms {
    /// (upper bound in ns, count) of each non-empty bucket; the +Inf bound is null.
    client: Vec<(Option<u64>, u64)>,
    server: Vec<(Option<u64>, u64)>,
    connect: Vec<(Option<u64>, u64)>,
}

fn buckets(h: Option<&Histogram>) -> Vec<(Option<u64>, u64)> {
    h.map(|h| h.buckets().map(|(le, n)| ((le != u64::MAX).then_some(le), n)).collect())
        .unwrap_or_default()
}

#[derive(Serialize)]
struct HopDetail {
    hop: HopOut,
    histograms: Histograms,
    /// The hop's newest flows, newest first.
    flows: Vec<serde_json::Value>,
}

async fn hop_detail(
    State(hub): State<Arc<Hub>>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let p = params(raw.as_deref())?;
    let Some(id) = p.id.clone() else {
        return Err(ApiError::Param {
            name: "id",
            value: String::new(),
            reason: "which hop (an id from /api/hops)".to_owned(),
        });
    };
    let since = p.since.unwrap_or(DEFAULT_SINCE);
    let (responses, start, now) = window(&hub, &p).await?;
    let detail = tokio::task::spawn_blocking(move || {
        let flows: Vec<Flow> = responses.iter().filter_map(flow_of).cloned().collect();
        let (agg, window_s) = hops::aggregate(&flows, start, now, false);
        let (key, hop) = agg.table().iter().find(|(k, _)| hop_id(k) == id)?;
        let side = |s| hop.side(s);
        let histograms = Histograms {
            client: buckets(side(Side::Client).map(|s| &s.latency)),
            server: buckets(side(Side::Server).map(|s| &s.latency)),
            connect: buckets(side(Side::Client).map(|s| &s.connect)),
        };
        let row = view::row(key, hop, Some(&agg.context().ledger), window_s);
        let mut resolver = Resolver::default();
        let recent = responses
            .iter()
            .rev()
            .filter(|r| {
                flow_of(r)
                    .and_then(|f| hop_of(f, &mut resolver))
                    .is_some_and(|(k, _)| hop_id(&k) == id)
            })
            .take(HOP_FLOWS)
            .map(|r| serde_json::from_str(&r.to_json()).expect("flow JSON parses"))
            .collect();
        Some(HopDetail { hop: HopOut { id: hop_id(key), row }, histograms, flows: recent })
    })
    .await
    .expect("the hop detail task does not panic");
    let detail = detail.ok_or_else(|| ApiError::NoHop { id: p.id.unwrap_or_default(), since })?;
    Ok(json_response(serde_json::to_string(&detail).expect("serializable")))
}

async fn flows(State(hub): State<Arc<Hub>>, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let p = params(raw.as_deref())?;
    let (whitelist, blacklist) = filters(&p.filters)?;
    let since = p.since.map(|d| timestamp(since_ns(d, wall_now_ns())));
    let req = GetFlowsRequest {
        number: p.number.unwrap_or(DEFAULT_FLOWS),
        since,
        whitelist,
        blacklist,
        ..GetFlowsRequest::default()
    };
    let responses = fetch(&hub, &req).await?;
    let lines: Vec<String> = responses.iter().map(GetFlowsResponse::to_json).collect();
    Ok(json_response(format!("{{\"flows\":[{}]}}", lines.join(","))))
}

async fn follow(
    State(hub): State<Arc<Hub>>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let p = params(raw.as_deref())?;
    let (whitelist, blacklist) = filters(&p.filters)?;
    let req = GetFlowsRequest { follow: true, whitelist, blacklist, ..GetFlowsRequest::default() };
    let q = Query::joined(req, &hub.traces).map_err(ApiError::Query)?;
    let (tx, rx) = mpsc::channel(QUERY_QUEUE);
    // The query ends when the browser goes: the stream (and `rx`) is dropped, `tx` closes.
    tokio::spawn(query::run(hub, q, tx));
    let events = ReceiverStream::new(rx).filter_map(|r| {
        let r = r.ok()?;
        flow_of(&r)?;
        Some(Ok::<_, Infallible>(Event::default().event("flow").data(r.to_json())))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()).into_response())
}

fn json_response(body: String) -> Response {
    ([(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-store")], body)
        .into_response()
}
