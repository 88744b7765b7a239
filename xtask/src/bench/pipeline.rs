//! Userspace pipeline throughput: the agent (full L7 capture) records the kernel's event stream
//! (`--record`) while every data path load runs briefly, then `hopwatch/benches/pipeline.rs` replays
//! the recording on one pinned core: decode only (the ceiling: the agent's drain loop with nothing
//! behind it) and decode → track → parse → flows → aggregate (the pipeline).

use std::path::Path;

use anyhow::{Context as _, Result, bail};

use super::{
    BenchOptions,
    datapath::Load,
    report::{Report, Target, cargo_bench_lines},
    servers::Agent,
};
use crate::say;

pub fn run(
    bin: &Path,
    opts: &BenchOptions,
    loads: &[Load<'_>],
    dir: &Path,
    report: &mut Report,
) -> Result<()> {
    let file = dir.join("events.hwrec");
    {
        let rec = file.display().to_string();
        let agent = Agent::start(bin, &["--record", &rec])?;
        let seconds = opts.seconds.clamp(1, 3);
        for load in loads {
            say(&format!("recording kernel events: {} for {seconds} s", load.name));
            (load.run)(seconds).with_context(|| format!("{} while recording", load.name))?;
        }
        drop(agent);
    }
    let size = std::fs::metadata(&file)
        .with_context(|| format!("no recording at {}", file.display()))?
        .len();
    say(&format!(
        "recording: {:.1} MB",
        f64::from(u32::try_from(size / 1000).unwrap_or(u32::MAX)) / 1e3
    ));
    let rec = file.display().to_string();
    let lines = cargo_bench_lines(&[
        "bench",
        "-p",
        "hopwatch",
        "--bench",
        "pipeline",
        "--",
        "--recording",
        &rec,
        "--seconds",
        "2",
    ])?;
    let _ = std::fs::remove_file(&file);
    let get = |id: &str| {
        lines
            .iter()
            .find(|l| l.id == id)
            .map(|l| (l.value, l.label.clone()))
            .with_context(|| format!("the pipeline benchmark printed no {id}"))
    };
    let (records, _) = get("pipeline_records")?;
    if records < 1000.0 {
        bail!("the recording holds only {records} events: the agent saw almost none of the load");
    }
    let (decode, _) = get("pipeline_decode")?;
    let (drain, drain_label) = get("pipeline_drain")?;
    let (parse, parse_label) = get("pipeline_track_parse")?;
    let (full, full_label) = get("pipeline_full")?;
    let section = "2 cost";
    report.add(section, format!("one core: {drain_label}"), drain, "events/s", None);
    report.add(
        section,
        "one core: decode only (ceiling: the drain loop without the pipeline)",
        decode,
        "events/s",
        None,
    );
    report.add(section, format!("one core: {parse_label}"), parse, "events/s", None);
    report.add(
        section,
        format!("one core: {full_label} (the userspace pipeline)"),
        full,
        "events/s",
        Some(Target::AtLeast(1e6)),
    );
    report.add(
        section,
        "userspace pipeline vs decode-only ceiling",
        full / decode * 100.0,
        "%",
        None,
    );
    report.notes.push(format!(
        "Pipeline figures replay {records:.0} kernel events recorded by the agent (full L7) while \
         each data path load ran for {} s; rates are events per CPU second of one pinned thread",
        opts.seconds.clamp(1, 3)
    ));
    report.notes.push(
        "Pipeline ceiling: the ring buffer is memory-mapped, so taking a record off it costs no \
         copy; what the agent's drain loop does per record before the pipeline is to decode it. \
         \"Decode only\" is therefore the drain rate with nothing behind it, the ceiling the \
         pipeline is held against; \"drain\" (every byte of every record read) bounds it from \
         above"
            .to_owned(),
    );
    Ok(())
}
