//! Recording the kernel's event stream (`hopwatch agent --record FILE`) and replaying it through
//! the userspace pipeline (`hopwatch replay FILE`): decode → connection table → L7 parsing → flows
//! → hop aggregation (the agent's metrics, not served), with no kernel involved, so the agent's
//! per-event cost on one core can be measured repeatably and a field problem can be reproduced
//! from a recording.
//!
//! File format: the 8-byte magic `HWREC01\n`, then per record its length as a little-endian
//! `u32` and the raw ring buffer bytes.

use std::{
    fs::File,
    io::{self, BufReader, BufWriter, Read, Write},
    path::{Path, PathBuf},
    time::Instant,
};

use crate::{
    drops::DropReasons,
    events::decode,
    flow::{Clock, FlowBuilder},
    hops::HopConfig,
    loader::btf::Btf,
    metrics::{MetricsError, Telemetry},
    output::{self, Format},
    pipeline::{Pipeline, PipelineOptions},
    proto::observer::{GetFlowsResponse, get_flows_response::ResponseTypes},
    protocols::Redaction,
};

const MAGIC: &[u8; 8] = b"HWREC01\n";
/// Largest record accepted when reading (the kernel's are far smaller).
const MAX_RECORD: u32 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a hopwatch recording (no {magic:?} header)", magic = "HWREC01")]
    NotARecording { path: PathBuf },
    #[error(
        "{path}: record {index} claims {len} bytes, more than {MAX_RECORD}: the file is corrupt"
    )]
    Corrupt { path: PathBuf, index: usize, len: u32 },
    #[error(transparent)]
    Metrics(#[from] MetricsError),
}

/// Appends raw ring buffer records to a recording.
pub struct Recorder {
    out: BufWriter<File>,
    path: PathBuf,
}

impl Recorder {
    pub fn create(path: &Path) -> Result<Self, ReplayError> {
        let io = |source| ReplayError::Io { what: "create", path: path.to_owned(), source };
        let mut out = BufWriter::new(File::create(path).map_err(io)?);
        out.write_all(MAGIC).map_err(io)?;
        Ok(Self { out, path: path.to_owned() })
    }

    pub fn record(&mut self, bytes: &[u8]) -> Result<(), ReplayError> {
        let io = |source| ReplayError::Io { what: "write", path: self.path.clone(), source };
        let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        self.out.write_all(&len.to_le_bytes()).map_err(io)?;
        self.out.write_all(bytes).map_err(io)
    }

    pub fn flush(&mut self) -> Result<(), ReplayError> {
        self.out.flush().map_err(|source| ReplayError::Io {
            what: "write",
            path: self.path.clone(),
            source,
        })
    }
}

/// Reads every record of a recording.
pub fn read_recording(path: &Path) -> Result<Vec<Vec<u8>>, ReplayError> {
    let io = |source| ReplayError::Io { what: "read", path: path.to_owned(), source };
    let mut r = BufReader::new(File::open(path).map_err(io)?);
    let mut magic = [0u8; 8];
    if r.read_exact(&mut magic).is_err() || &magic != MAGIC {
        return Err(ReplayError::NotARecording { path: path.to_owned() });
    }
    let mut records = Vec::new();
    loop {
        let mut len = [0u8; 4];
        match r.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(records),
            Err(e) => return Err(io(e)),
        }
        let len = u32::from_le_bytes(len);
        if len > MAX_RECORD {
            return Err(ReplayError::Corrupt { path: path.to_owned(), index: records.len(), len });
        }
        let mut rec = vec![0u8; len as usize];
        r.read_exact(&mut rec).map_err(io)?;
        records.push(rec);
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
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
pub struct ReplayReport {
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

pub fn run(args: &ReplayArgs) -> Result<ReplayReport, ReplayError> {
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
    let mut sink = io::sink();
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
            },
        );
        for rec in &records {
            report.events += 1;
            match decode(rec) {
                Ok(ev) => pipeline.on_event(&ev, &mut flows),
                Err(_) => report.undecodable += 1,
            }
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
                if let Some(format) = args.output {
                    let _ = output::write(&mut sink, format, &mut resp);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recordings_round_trip_and_reject_garbage() {
        let dir = std::env::temp_dir().join(format!("hopwatch-rec-{}", std::process::id()));
        let mut rec = Recorder::create(&dir).unwrap();
        rec.record(b"abc").unwrap();
        rec.record(b"").unwrap();
        rec.flush().unwrap();
        assert_eq!(read_recording(&dir).unwrap(), vec![b"abc".to_vec(), Vec::new()]);
        std::fs::write(&dir, b"not a recording").unwrap();
        assert!(matches!(read_recording(&dir), Err(ReplayError::NotARecording { .. })));
        let mut bad = MAGIC.to_vec();
        bad.extend_from_slice(&u32::MAX.to_le_bytes());
        std::fs::write(&dir, bad).unwrap();
        assert!(matches!(read_recording(&dir), Err(ReplayError::Corrupt { .. })));
        let _ = std::fs::remove_file(&dir);
    }
}
