//! What request tracing costs an asyncio app ([`run`]): wrk against a FastAPI app on uvicorn
//! (one worker, the asyncio loop, h11) inside the bench namespace, with no agent, with the
//! agent's full L7 (the asyncio probes on the task step), the same without the asyncio probes,
//! and without request tracing; modes alternated round by round, each round's throughput against
//! the same round's without the agent.

use std::{fmt::Write as _, path::Path, time::Duration};

use anyhow::{Result, bail};

use super::{
    BenchOptions,
    load::wrk,
    report::{Report, min_median_max},
    servers::{Agent, UVICORN_PORT, Uvicorn},
};
use crate::say;

const LOAD: &str = "asyncio app (wrk → uvicorn/FastAPI, one await per request)";

/// Modes: a name, and the agent's arguments (none: no agent).
const MODES: [(&str, Option<&[&str]>); 4] = [
    ("no agent", None),
    ("full L7 (asyncio probes)", Some(&[])),
    ("full L7 without the asyncio probes", Some(&["--no-python-uprobe"])),
    ("full L7 without request tracing", Some(&["--no-request-tracing"])),
];

/// The agent attaches its uprobes at start; a moment for the rescan-free start to settle.
const SETTLE: Duration = Duration::from_secs(2);

pub fn run(bin: &Path, opts: &BenchOptions, dir: &Path, report: &mut Report) -> Result<()> {
    let app = Uvicorn::start(dir)?;
    say(&format!("uvicorn (pid {}) on 127.0.0.1:{UVICORN_PORT}", app.pid()));
    let url = format!("http://127.0.0.1:{UVICORN_PORT}/");
    // One Python thread serves them all: more connections only queue.
    let connections = opts.connections.min(16);
    let mut rps = vec![Vec::new(); MODES.len()];
    let mut p99 = vec![Vec::new(); MODES.len()];
    for round in 1..=opts.rounds {
        for (i, (name, args)) in MODES.iter().enumerate() {
            let agent = args.map(|a| Agent::start(bin, a)).transpose()?;
            if agent.is_some() {
                std::thread::sleep(SETTLE);
            }
            let r = wrk(&url, opts.seconds, connections, &[])?;
            if let Some(agent) = agent {
                let log = agent.stop();
                let probed = log.contains("hopwatch agent: python: on");
                if probed != (i == 1) {
                    bail!(
                        "{name}: the asyncio probes were {}attached:\n{log}",
                        if probed { "" } else { "not " }
                    );
                }
            }
            say(&format!("{LOAD}, round {round}, {name}: {:.0} req/s", r.rps));
            rps[i].push(r.rps);
            p99[i].push(r.p99_ms);
        }
    }
    if rps[0].iter().any(|r| *r <= 0.0) {
        bail!("{LOAD}: no throughput without the agent in a round");
    }
    let ratio = |a: &[f64], b: &[f64], scale: f64| -> Vec<f64> {
        a.iter().zip(b).map(|(x, y)| x / y * scale).collect()
    };
    let mut d = String::new();
    let _ = writeln!(
        &mut d,
        "\n### {LOAD}\n\nMedians of the rounds; ratios are each round's against the same round \
         without the agent (lowest – highest round in brackets).\n\n\
         | mode | req/s | vs no agent | p99 ms | vs no agent |\n|---|---:|---:|---:|---:|"
    );
    for (i, (name, _)) in MODES.iter().enumerate() {
        let throughput = ratio(&rps[i], &rps[0], 100.0);
        let latency = ratio(&p99[i], &p99[0], 1.0);
        let (lo, mid, hi) = min_median_max(&throughput);
        let _ = writeln!(
            &mut d,
            "| {name} | {:.0} | {mid:.1}% ({lo:.1} – {hi:.1}) | {:.2} | {:.2}x |",
            min_median_max(&rps[i]).1,
            min_median_max(&p99[i]).1,
            min_median_max(&latency).1,
        );
        if i > 0 {
            report.add_rounds(
                "1 data path",
                format!("{LOAD}: throughput, {name} vs no agent"),
                &throughput,
                "%",
                None,
            );
        }
    }
    report.add_rounds(
        "2 cost",
        format!("{LOAD}: throughput with the asyncio probes vs without them (full L7 both)"),
        &ratio(&rps[1], &rps[2], 100.0),
        "%",
        None,
    );
    report.details.push_str(&d);
    Ok(())
}
