//! `hopwatch replay FILE`: a recording through the userspace pipeline — decode → connection
//! table → L7 parsing → flows → hop aggregation (the agent's metrics, not served) — so the
//! agent's per-event cost on one core can be measured repeatably and a field problem can be
//! reproduced from a recording.

use std::{io, path::PathBuf, time::Instant};

use hopwatch_hops::HopConfig;
use hopwatch_proto::observer::{GetFlowsResponse, get_flows_response::ResponseTypes};
use hopwatch_protocols::Redaction;

use crate::{
    drops::DropReasons,
    events::decode,
    flow::{Clock, FlowBuilder},
    loader::btf::Btf,
    metrics::{MetricsError, Telemetry},
    pipeline::{Pipeline, PipelineOptions},
    print::{Format, Options, Printer},
    recording::{RecordingError, read_recording},
};

#[derive(Debug, thiserror::Error)]
pub(crate) enum ReplayError {
    #[error(transparent)]
    Recording(#[from] RecordingError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
}

#[derive(Debug, Clone, clap::Args)]
pub(super) struct ReplayArgs {
    /// A recording made with `hopwatch agent --record FILE`.
    pub file: PathBuf,
    /// Passes over the recording (each with a fresh pipeline).
    #[arg(long, default_value_t = 10)]
    pub repeat: u32,
    /// Also serialize every flow in this format (to a sink), to include the output's cost.
    #[arg(short, long, value_enum)]
    pub output: Option<Format>,
    /// Leave out the hop aggregation behind the agent's metrics (measures the pipeline alone).
    #[arg(long)]
    pub no_metrics: bool,
}

/// What a replay measured.
#[derive(Debug, Clone, Copy)]
pub(super) struct ReplayReport {
    pub events: u64,
    pub undecodable: u64,
    pub flows: u64,
    pub seconds: f64,
    /// Hops kept, flows counted and flows ignored by the last pass's aggregation (zeros with
    /// `--no-metrics`).
    pub hops: usize,
    pub hop_flows_counted: u64,
    pub hop_flows_ignored: u64,
}

pub(super) fn run(args: &ReplayArgs) -> Result<ReplayReport, ReplayError> {
    let records = read_recording(&args.file)?;
    // Drop reason names need this kernel's BTF; without it reasons print as numbers.
    let reasons = Btf::from_file(Btf::VMLINUX)
        .ok()
        .and_then(|b| DropReasons::from_btf(&b).ok())
        .unwrap_or_else(DropReasons::empty);
    let mut report = ReplayReport {
        events: 0,
        undecodable: 0,
        flows: 0,
        seconds: 0.0,
        hops: 0,
        hop_flows_counted: 0,
        hop_flows_ignored: 0,
    };
    let mut printer =
        args.output.map(|format| Printer::new(io::sink(), Options::streaming(format)));
    let mut flows = Vec::new();
    let mut telemetry = Telemetry::default();
    let start = Instant::now();
    for _ in 0..args.repeat {
        if !args.no_metrics {
            telemetry = Telemetry::unserved(HopConfig::default(), "replay")?;
        }
        let builder = FlowBuilder {
            node_name: "replay".to_owned(),
            clock: Clock::now(),
            reasons: reasons.clone(),
            symbols: None,
        };
        let mut pipeline = Pipeline::new(
            builder,
            PipelineOptions {
                l7_timeout: std::time::Duration::from_secs(30),
                redaction: Redaction::default(),
                fast_path: crate::l7::FastPath::OFF,
                tracing: true,
                trace_headers: crate::trace::PROPAGATED_HEADERS.to_vec(),
                trusted_proxies: crate::flow::forwarded::TrustedProxies::default(),
            },
        );
        for rec in &records {
            report.events += 1;
            match decode(rec) {
                Ok(ev) => pipeline.on_event(&ev, &mut flows),
                Err(_) => report.undecodable += 1,
            }
            telemetry.count_exchanges(pipeline.take_counted());
            report.flows += flows.len() as u64;
            // What the agent does with each flow: count it in the metrics, wrap it for the
            // printer and the collector queue.
            for flow in flows.drain(..) {
                telemetry.observe(&flow);
                let mut resp = GetFlowsResponse {
                    time: flow.time,
                    node_name: pipeline.builder().node_name.clone(),
                    response_types: Some(ResponseTypes::Flow(flow)),
                };
                if let Some(p) = printer.as_mut() {
                    let _ = p.write(&mut resp);
                }
                std::hint::black_box(resp);
            }
        }
    }
    report.seconds = start.elapsed().as_secs_f64();
    if let Some((hops, counted, ignored)) = telemetry.hop_totals() {
        (report.hops, report.hop_flows_counted, report.hop_flows_ignored) =
            (hops, counted, ignored);
    }
    Ok(report)
}

/// `hopwatch replay`: runs the recording and prints what it measured.
pub(crate) fn main(args: &ReplayArgs) -> Result<(), ReplayError> {
    let r = run(args)?;
    #[expect(clippy::cast_precision_loss, reason = "rates for display")]
    let (events, flows) = (r.events as f64 / r.seconds, r.flows as f64 / r.seconds);
    println!(
        "{} events ({} undecodable) -> {} flows in {:.3} s: {events:.0} events/s, \
         {flows:.0} flows/s on one core",
        r.events, r.undecodable, r.flows, r.seconds
    );
    if !args.no_metrics {
        println!(
            "hop aggregation (last pass): {} hops, {} flows counted, {} ignored",
            r.hops, r.hop_flows_counted, r.hop_flows_ignored
        );
    }
    Ok(())
}
