//! `hopwatch trace`: one request hop by hop (a waterfall of its exchanges, each with its client-
//! and server-side time and its share of the whole), or the slowest recent traces.
//!
//! The agents link exchanges into traces as they see them ([`crate::trace`]); this asks a
//! collector for the flows of one trace (`GetFlows` with `FlowFilter.trace_id`, Hubble's own
//! field) or of a window, and assembles the tree from the spans the flows carry.

mod waterfall;

use std::process::ExitCode;

use hopwatch_proto::{
    flow::{Flow, FlowFilter},
    observer::{GetFlowsRequest, get_flows_response::ResponseTypes},
};

use self::waterfall::{Trace, slowest};
use super::{
    hops::{Since, parse_since},
    observe::{Connection, ServerError},
};
use crate::metrics::wall_now_ns;

#[derive(Debug, Clone, clap::Args)]
pub(super) struct TraceArgs {
    /// The trace to show (32 hex digits, as `observe -o json` prints in
    /// `trace_context.parent.trace_id`). Without it, the slowest traces are listed.
    #[arg(value_name = "TRACE_ID")]
    pub trace_id: Option<String>,
    /// List the N slowest traces of the window.
    #[arg(long, value_name = "N", default_value_t = 10, conflicts_with = "trace_id")]
    pub slowest: usize,
    /// Look at flows since this long ago (e.g. `30s`, `5m`) or this time (RFC 3339).
    #[arg(long, default_value = "15m", value_parser = parse_since)]
    pub since: Since,
    /// Collector address: host:port, http://host:port or https://host:port.
    #[arg(long, env = "HOPWATCH_SERVER", default_value = "localhost:4245")]
    pub server: String,
    #[command(flatten)]
    pub connection: Connection,
}

/// Why `hopwatch trace` stopped.
#[derive(Debug, thiserror::Error)]
pub(super) enum TraceError {
    #[error("{id:?} is not a trace id: expected 32 hexadecimal digits")]
    BadId { id: String },
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("no flows of trace {id} since {since} (is the collector's history that long?)")]
    NotFound { id: String, since: String },
}

pub(super) async fn main(args: TraceArgs) -> ExitCode {
    match run(&args).await {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hopwatch trace: error: {e}");
            let usage = match &e {
                TraceError::BadId { .. } => true,
                TraceError::Server(s) => s.is_usage(),
                TraceError::NotFound { .. } => false,
            };
            if usage { ExitCode::from(2) } else { ExitCode::FAILURE }
        }
    }
}

async fn run(args: &TraceArgs) -> Result<String, TraceError> {
    let id = match &args.trace_id {
        Some(id) if id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Some(id.to_ascii_lowercase())
        }
        Some(id) => return Err(TraceError::BadId { id: id.clone() }),
        None => None,
    };
    let since_ns = args.since.start_ns(wall_now_ns());
    let flows = fetch(args, id.as_deref(), since_ns).await?;
    let traces = Trace::from_flows(&flows);
    match id {
        Some(id) => traces
            .iter()
            .find(|t| t.id == id)
            .map(Trace::waterfall)
            .ok_or_else(|| TraceError::NotFound { id, since: since_text(args.since) }),
        None => Ok(slowest(&traces, args.slowest)),
    }
}

/// The L7 flows of trace `id` (or of every trace) since `since_ns`.
async fn fetch(
    args: &TraceArgs,
    id: Option<&str>,
    since_ns: u64,
) -> Result<Vec<Flow>, ServerError> {
    let (uri, mut client) = args.connection.client(&args.server).await?;
    let filter = FlowFilter {
        trace_id: id.map(str::to_owned).into_iter().collect(),
        event_type: vec![hopwatch_proto::flow::EventTypeFilter {
            r#type: crate::flow::EVENT_TYPE_L7,
            ..Default::default()
        }],
        ..FlowFilter::default()
    };
    let req = GetFlowsRequest {
        number: u64::MAX,
        whitelist: vec![filter],
        since: Some(prost_types::Timestamp {
            seconds: i64::try_from(since_ns / 1_000_000_000).unwrap_or(i64::MAX),
            nanos: i32::try_from(since_ns % 1_000_000_000).unwrap_or(0),
        }),
        ..GetFlowsRequest::default()
    };
    let mut stream =
        client.get_flows(req).await.map_err(|s| ServerError::status(&uri, s))?.into_inner();
    let mut flows = Vec::new();
    while let Some(resp) = stream.message().await.map_err(|s| ServerError::status(&uri, s))? {
        if let Some(ResponseTypes::Flow(f)) = resp.response_types {
            flows.push(f);
        }
    }
    Ok(flows)
}

fn since_text(s: Since) -> String {
    match s {
        Since::Ago(d) => format!("{} ago", humantime::format_duration(d)),
        Since::At(ns) => {
            humantime::format_rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns))
                .to_string()
        }
    }
}
