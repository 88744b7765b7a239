//! OTLP export of traces: every L7 exchange that belongs to a trace becomes one OpenTelemetry
//! span (with its parent), sent over OTLP/gRPC to a trace backend (Jaeger, Tempo, Phoenix, an
//! OpenTelemetry Collector).
//!
//! The exporter follows the collector's flows in process (a `GetFlows` follow of L7 flows), so it
//! sees every node's flows, and sends each exchange once: both ends of an exchange carry the same
//! span, so their flows are merged for [`MERGE_WINDOW`] (the client end's timing, the server
//! end's time as an attribute) before the span leaves. Spans go in batches; a batch the backend
//! refuses or cannot take is dropped and counted, never retried into an unbounded queue.

mod convert;

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use hopwatch_collector::{
    hub::Hub,
    query::{self, Query},
};
use hopwatch_proto::{
    flow::{EventTypeFilter, Flow, FlowFilter},
    observer::{GetFlowsRequest, get_flows_response::ResponseTypes},
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, trace_service_client::TraceServiceClient,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// How long the first end of an exchange waits for the other before its span is sent.
const MERGE_WINDOW: Duration = Duration::from_secs(2);
/// Exchanges waiting for their other end at most; beyond, the oldest is sent at once.
const MAX_PENDING: usize = 65_536;
/// Spans per export request at most.
const BATCH: usize = 2048;
/// Flows between the follow and the exporter.
const FOLLOW_QUEUE: usize = 4096;

/// `--otlp-endpoint`, shared by the agent (its in-process collector) and `hopwatch collector`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct OtlpArgs {
    /// Send traces (one span per L7 exchange of a trace, with its parent) over OTLP/gRPC to this
    /// endpoint, e.g. `http://127.0.0.1:4317`.
    #[arg(long, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum OtlpError {
    #[error("--otlp-endpoint {endpoint:?} is not a URL (e.g. http://127.0.0.1:4317): {source}")]
    Endpoint {
        endpoint: String,
        #[source]
        source: tonic::codegen::http::uri::InvalidUri,
    },
}

/// What the exporter did, for its log line.
#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    exported: u64,
    /// Spans in batches the backend refused or could not be reached for.
    failed: u64,
    /// Flows the follow lost before the exporter read them (the collector's memory overflowed).
    lost_flows: u64,
}

/// Starts the exporter over `hub` (nothing without `--otlp-endpoint`); it stops with `stop`,
/// after sending what it holds.
pub(crate) fn start(
    args: &OtlpArgs,
    hub: Arc<Hub>,
    stop: CancellationToken,
) -> Result<Option<String>, OtlpError> {
    let Some(endpoint) = args.otlp_endpoint.clone() else { return Ok(None) };
    let channel = Channel::from_shared(endpoint.clone())
        .map_err(|source| OtlpError::Endpoint { endpoint: endpoint.clone(), source })?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect_lazy();
    let client = TraceServiceClient::new(channel);
    tokio::spawn(run(hub, client, stop));
    Ok(Some(endpoint))
}

async fn run(hub: Arc<Hub>, mut client: TraceServiceClient<Channel>, stop: CancellationToken) {
    let (tx, mut rx) = mpsc::channel(FOLLOW_QUEUE);
    let req = GetFlowsRequest {
        follow: true,
        whitelist: vec![FlowFilter {
            event_type: vec![EventTypeFilter {
                r#type: crate::flow::EVENT_TYPE_L7,
                ..EventTypeFilter::default()
            }],
            ..FlowFilter::default()
        }],
        ..GetFlowsRequest::default()
    };
    let query = Query::joined(req, &hub.traces).expect("a follow of L7 flows is a valid query");
    tokio::spawn(query::run(hub, query, tx));
    let mut merger = Merger::default();
    let mut totals = Totals::default();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        let done = tokio::select! {
            msg = rx.recv() => match msg {
                Some(Ok(resp)) => {
                    match resp.response_types {
                        Some(ResponseTypes::Flow(f)) => merger.add(f, Instant::now()),
                        Some(ResponseTypes::LostEvents(l)) => totals.lost_flows += l.num_events_lost,
                        _ => {}
                    }
                    false
                }
                Some(Err(_)) | None => true,
            },
            _ = tick.tick() => false,
            () = stop.cancelled() => true,
        };
        let ready = if done { merger.drain() } else { merger.ready(Instant::now()) };
        for batch in ready.chunks(BATCH) {
            export(&mut client, batch, &mut totals).await;
        }
        if done {
            return;
        }
    }
}

async fn export(client: &mut TraceServiceClient<Channel>, ends: &[Ends], totals: &mut Totals) {
    let resource_spans =
        convert::resource_spans(ends.iter().map(|e| (e.client.as_ref(), e.server.as_ref())));
    let n: u64 =
        resource_spans.iter().flat_map(|r| &r.scope_spans).map(|s| s.spans.len() as u64).sum();
    if n == 0 {
        return;
    }
    match client.export(ExportTraceServiceRequest { resource_spans }).await {
        Ok(resp) => {
            let rejected = resp.into_inner().partial_success.map_or(0, |p| p.rejected_spans);
            let rejected = u64::try_from(rejected).unwrap_or(0);
            totals.exported += n - rejected.min(n);
            totals.failed += rejected.min(n);
        }
        Err(status) => {
            totals.failed += n;
            tracing::warn!(
                error = %status.message(),
                code = ?status.code(),
                spans = n,
                failed_total = totals.failed,
                exported_total = totals.exported,
                lost_flows_total = totals.lost_flows,
                "OTLP export failed: spans dropped"
            );
        }
    }
}

/// The flows of one exchange's ends.
#[derive(Debug, Default)]
struct Ends {
    client: Option<Flow>,
    server: Option<Flow>,
}

/// Exchanges waiting for their other end, by span id.
#[derive(Default)]
struct Merger {
    pending: HashMap<String, (Ends, Instant)>,
    order: VecDeque<String>,
}

impl Merger {
    fn add(&mut self, f: Flow, now: Instant) {
        let Some(span) = f.l7.as_ref().and_then(|l| l.span.as_ref()).map(|s| s.span_id.clone())
        else {
            return;
        };
        if f.trace_context.is_none() {
            return;
        }
        let server_side = f.traffic_direction() == hopwatch_proto::flow::TrafficDirection::Ingress;
        let entry = self.pending.entry(span.clone()).or_insert_with(|| {
            self.order.push_back(span);
            (Ends::default(), now)
        });
        let slot = if server_side { &mut entry.0.server } else { &mut entry.0.client };
        slot.get_or_insert(f);
    }

    /// Exchanges whose window is over (or beyond the cap).
    fn ready(&mut self, now: Instant) -> Vec<Ends> {
        let mut out = Vec::new();
        while let Some(span) = self.order.front() {
            let Some((_, since)) = self.pending.get(span) else {
                self.order.pop_front();
                continue;
            };
            let complete =
                self.pending[span].0.client.is_some() && self.pending[span].0.server.is_some();
            if !complete
                && now.duration_since(*since) < MERGE_WINDOW
                && self.order.len() <= MAX_PENDING
            {
                break;
            }
            let span = self.order.pop_front().expect("looked at above");
            if let Some((ends, _)) = self.pending.remove(&span) {
                out.push(ends);
            }
        }
        out
    }

    fn drain(&mut self) -> Vec<Ends> {
        self.order.clear();
        self.pending.drain().map(|(_, (ends, _))| ends).collect()
    }
}
