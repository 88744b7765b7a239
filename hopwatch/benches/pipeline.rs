//! Userspace pipeline throughput on one core, from a recorded kernel event stream
//! (`hopwatch agent --record FILE`; `cargo xtask bench` records one under load and runs this):
//! `cargo bench -p hopwatch --bench pipeline -- --recording FILE [--seconds S]`.
//!
//! Four stages over the same records, each timed in thread CPU time on one pinned core:
//! 1. drain: each record's bytes read (summed), as a ring buffer consumer touches them;
//! 2. decode: `events::decode` of each record — the agent's drain loop without the pipeline, the
//!    ceiling the rest of the pipeline is held against;
//! 3. pipeline: decode → connection table → L7 parsing → flows (what `hopwatch replay` runs);
//! 4. pipeline + aggregate: also every flow into the hop state and flow counters
//!    (`Telemetry::observe`, the agent's path to `/metrics`).
//!
//! Figures go to stdout as a table and as `BENCH<TAB>id<TAB>value<TAB>unit<TAB>label` lines for
//! `cargo xtask bench` to collect.
#![allow(
    unused_crate_dependencies,
    reason = "a test or bench target links every dependency of the package; the lint is for the library"
)]

mod support;

use std::{
    hint::black_box,
    path::PathBuf,
    time::{Duration, Instant},
};

use hopwatch::harness::{
    Btf, Clock, DropReasons, FlowBuilder, MetricsAddr, MetricsArgs, Pipeline, PipelineOptions,
    Telemetry, decode, read_recording,
};
use hopwatch_protocols::Redaction;

/// CPU time this thread has used (not time spent waiting for a CPU other work holds).
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid clock id and out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) };
    Duration::new(u64::try_from(ts.tv_sec).unwrap_or(0), u32::try_from(ts.tv_nsec).unwrap_or(0))
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

fn builder(reasons: &DropReasons) -> FlowBuilder {
    FlowBuilder {
        node_name: "bench".to_owned(),
        clock: Clock::now(),
        reasons: reasons.clone(),
        symbols: None,
    }
}

fn options() -> PipelineOptions {
    PipelineOptions {
        l7_timeout: Duration::from_secs(30),
        redaction: Redaction::default(),
        fast_path: hopwatch::harness::FastPath::OFF,
        tracing: true,
        trace_headers: Vec::new(),
        trusted_proxies: hopwatch::harness::TrustedProxies::default(),
    }
}

/// Runs `pass` (one pass over all records, returning a checksum) until `min` of CPU time has
/// gone by, after one untimed warm-up pass; returns events per CPU second.
fn stage(
    id: &str,
    label: &str,
    records: usize,
    min: Duration,
    mut pass: impl FnMut() -> u64,
) -> f64 {
    black_box(pass());
    let (start, cpu0) = (Instant::now(), thread_cpu());
    let mut passes = 0u32;
    // Bounded: at most 10 000 passes even over a tiny recording.
    while thread_cpu().saturating_sub(cpu0) < min && passes < 10_000 {
        black_box(pass());
        passes += 1;
    }
    let (wall, cpu) = (start.elapsed(), thread_cpu().saturating_sub(cpu0));
    #[expect(clippy::cast_precision_loss, reason = "a rate")]
    let events = (records as f64) * f64::from(passes);
    let rate = events / cpu.as_secs_f64();
    println!(
        "| {label} | {events:.0} | {:.2} s | {:.2} s | {rate:.0} | {:.0} ns |",
        wall.as_secs_f64(),
        cpu.as_secs_f64(),
        1e9 / rate
    );
    println!("BENCH\t{id}\t{rate:.0}\tevents/s\t{label}");
    rate
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("pipeline: bench");
        return;
    }
    let Some(path) = arg("--recording").map(PathBuf::from) else {
        eprintln!(
            "pipeline bench: no --recording FILE given (make one with `hopwatch agent --record FILE` \
             under load; `cargo xtask bench` does)"
        );
        std::process::exit(2);
    };
    let min = Duration::from_secs_f64(
        arg("--seconds").and_then(|s| s.parse().ok()).unwrap_or(2.0_f64).max(0.1),
    );
    let records = read_recording(&path).unwrap_or_else(|e| panic!("{e}"));
    assert!(!records.is_empty(), "{} holds no records", path.display());
    let bytes: usize = records.iter().map(Vec::len).sum();
    let reasons = Btf::from_file(Btf::VMLINUX)
        .ok()
        .and_then(|b| DropReasons::from_btf(&b).ok())
        .unwrap_or_else(DropReasons::empty);
    let cpu = support::pin_to_one_core();
    let n = records.len();

    // What the stream holds: the pipeline's work depends on it.
    let mut flows = Vec::new();
    let (mut undecodable, mut produced) = (0u64, 0u64);
    let mut pipeline = Pipeline::new(builder(&reasons), options());
    for rec in &records {
        match decode(rec) {
            Ok(ev) => pipeline.on_event(&ev, &mut flows),
            Err(_) => undecodable += 1,
        }
        produced += flows.len() as u64;
        flows.clear();
    }
    println!(
        "\nuserspace pipeline on one core (CPU {}): {} records ({:.1} MB, {undecodable} undecodable) \
         from {} -> {produced} flows per pass",
        cpu.map_or_else(|| "unpinned".to_owned(), |c| c.to_string()),
        n,
        f64::from(u32::try_from(bytes).unwrap_or(u32::MAX)) / 1e6,
        path.display()
    );
    println!("BENCH\tpipeline_records\t{n}\trecords\trecords in the recording");
    println!(
        "BENCH\tpipeline_flows_per_pass\t{produced}\tflows\tflows per pass over the recording"
    );
    println!("| stage | events | wall time | CPU time | events per CPU second | CPU per event |");
    println!("|---|---:|---:|---:|---:|---:|");

    stage("pipeline_drain", "drain (read every record's bytes)", n, min, || {
        records.iter().map(|r| r.iter().map(|&b| u64::from(b)).sum::<u64>()).sum()
    });
    stage("pipeline_decode", "decode only (ceiling)", n, min, || {
        records.iter().map(|r| u64::from(decode(r).is_ok())).sum()
    });
    stage("pipeline_track_parse", "decode -> track -> parse -> flows", n, min, || {
        let mut p = Pipeline::new(builder(&reasons), options());
        let mut count = 0u64;
        for rec in &records {
            if let Ok(ev) = decode(rec) {
                p.on_event(&ev, &mut flows);
            }
            count += flows.len() as u64;
            flows.clear();
        }
        count
    });

    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let args = MetricsArgs {
        metrics_addr: MetricsAddr(Some("127.0.0.1:0".parse().expect("address"))),
        metrics_series_limit: 10_000,
        metrics_stale_after: Duration::from_mins(5),
    };
    let telemetry = runtime.block_on(Telemetry::serve(&args, "bench")).expect("metrics");
    stage("pipeline_full", "decode -> track -> parse -> flows -> aggregate", n, min, || {
        let mut p = Pipeline::new(builder(&reasons), options());
        let mut count = 0u64;
        for rec in &records {
            if let Ok(ev) = decode(rec) {
                p.on_event(&ev, &mut flows);
            }
            for f in &flows {
                telemetry.observe(f);
            }
            count += flows.len() as u64;
            flows.clear();
        }
        count
    });
}
