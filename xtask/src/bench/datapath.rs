//! Data path overhead: each load with the agent off, with TCP capture only
//! (`--capture-bytes 0 --no-tls`) and with full L7 capture (defaults: payload capture and TLS
//! uprobes), modes alternated round by round so drift hits all of them; medians of the rounds.
//! The agent's cost comes from the same runs: its CPU time (from /proc) against the kernel events
//! it was sent (`hopwatch_kernel_events_total{event="events_sent"}`) and the requests served.

use std::{fmt::Write as _, path::Path, time::Duration};

use anyhow::{Context as _, Result, bail};

use super::{
    BenchOptions,
    load::{LoadResult, pgbench, wrk},
    report::{Report, Target},
    servers::{Agent, PORT, TLS_PORT},
};
use crate::say;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Off,
    Tcp,
    Full,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::Off, Mode::Tcp, Mode::Full];

    fn name(self) -> &'static str {
        match self {
            Mode::Off => "no agent",
            Mode::Tcp => "TCP capture",
            Mode::Full => "full L7 capture",
        }
    }

    fn agent_args(self) -> Option<&'static [&'static str]> {
        match self {
            Mode::Off => None,
            Mode::Tcp => Some(&["--capture-bytes", "0", "--no-tls"]),
            Mode::Full => Some(&[]),
        }
    }
}

/// One load generator against one server; `run(seconds)`.
pub struct Load<'a> {
    pub name: &'static str,
    pub run: Box<dyn Fn(u32) -> Result<LoadResult> + 'a>,
}

pub fn loads<'a>(opts: &'a BenchOptions, dir: &'a Path) -> Vec<Load<'a>> {
    let c = opts.connections;
    vec![
        Load {
            name: "HTTP keep-alive (wrk → nginx)",
            run: Box::new(move |s| wrk(&format!("http://127.0.0.1:{PORT}/"), s, c, &[])),
        },
        Load {
            name: "HTTPS keep-alive (wrk → nginx, TLS 1.3)",
            run: Box::new(move |s| wrk(&format!("https://127.0.0.1:{TLS_PORT}/"), s, c, &[])),
        },
        Load {
            name: "connection churn (wrk → nginx, `Connection: close`)",
            run: Box::new(move |s| {
                wrk(&format!("http://127.0.0.1:{PORT}/"), s, c, &["Connection: close"])
            }),
        },
        Load {
            name: "pgbench -S → PostgreSQL", run: Box::new(move |s| pgbench(s, c.min(8), dir))
        },
    ]
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    load: LoadResult,
    agent_cpu_s: f64,
    kernel_events: f64,
    l7_flows: f64,
    lost: f64,
}

/// Counters read from the agent before and after a load.
#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    cpu_s: f64,
    events: f64,
    l7: f64,
    lost: f64,
}

fn counters(agent: &Agent) -> Result<Counters> {
    let text = agent.metrics()?;
    let m = |name, labels| super::servers::sum_metric(&text, name, labels);
    Ok(Counters {
        cpu_s: agent.cpu_seconds(),
        events: m("hopwatch_kernel_events_total", "event=\"events_sent\""),
        l7: m("hopwatch_flows_total", "type=\"l7\""),
        lost: m("hopwatch_lost_events_total", ""),
    })
}

/// The agent pushes kernel counters to /metrics once a second.
const COUNTER_PERIOD: Duration = Duration::from_millis(1100);

/// One load run in one mode, with a fresh agent started for it (and stopped after).
fn measure(bin: &Path, mode: Mode, load: &Load<'_>, seconds: u32) -> Result<Sample> {
    let Some(args) = mode.agent_args() else {
        let load = (load.run)(seconds)?;
        return Ok(Sample { load, agent_cpu_s: 0.0, kernel_events: 0.0, l7_flows: 0.0, lost: 0.0 });
    };
    let agent = Agent::start(bin, args)?;
    std::thread::sleep(COUNTER_PERIOD);
    let before = counters(&agent)?;
    let result = (load.run)(seconds)?;
    std::thread::sleep(COUNTER_PERIOD);
    let after = counters(&agent).with_context(|| format!("agent log:\n{}", agent.log()))?;
    Ok(Sample {
        load: result,
        agent_cpu_s: after.cpu_s - before.cpu_s,
        kernel_events: after.events - before.events,
        l7_flows: after.l7 - before.l7,
        lost: after.lost - before.lost,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

pub fn run(bin: &Path, opts: &BenchOptions, loads: &[Load<'_>], report: &mut Report) -> Result<()> {
    // Agent CPU and kernel events over every full-L7 (and TCP) run, for the per-event cost.
    let mut totals = [(0.0, 0.0); 3];
    for load in loads {
        (load.run)(opts.seconds.min(2)).with_context(|| format!("warm-up of {}", load.name))?;
        let mut samples: Vec<(Mode, Sample)> = Vec::new();
        for round in 1..=opts.rounds {
            for mode in Mode::ALL {
                let s = measure(bin, mode, load, opts.seconds)
                    .with_context(|| format!("{} with {}", load.name, mode.name()))?;
                say(&format!(
                    "{} round {round} {:<16} {:>9.0} req/s  p99 {:.2} ms  agent CPU {:.2} s  \
                     {:.0} kernel events  {:.0} L7 flows  {:.0} lost",
                    load.name,
                    mode.name(),
                    s.load.rps,
                    s.load.p99_ms,
                    s.agent_cpu_s,
                    s.kernel_events,
                    s.l7_flows,
                    s.lost
                ));
                let t = &mut totals[mode as usize];
                t.0 += s.agent_cpu_s;
                t.1 += s.kernel_events;
                samples.push((mode, s));
            }
        }
        figures(load.name, &samples, report)?;
    }
    for (mode, label) in [(Mode::Tcp, "TCP capture"), (Mode::Full, "full L7 capture")] {
        let (cpu, events) = totals[mode as usize];
        if events > 0.0 {
            report.add(
                "2 cost",
                format!("agent CPU s per 1M kernel events ({label}, all loads)"),
                cpu / events * 1e6,
                "CPU s",
                None,
            );
        }
    }
    Ok(())
}

fn figures(name: &'static str, samples: &[(Mode, Sample)], report: &mut Report) -> Result<()> {
    let of = |mode: Mode, f: &dyn Fn(&Sample) -> f64| {
        median(samples.iter().filter(|(m, _)| *m == mode).map(|(_, s)| f(s)).collect())
    };
    let base_rps = of(Mode::Off, &|s| s.load.rps);
    let base_p99 = of(Mode::Off, &|s| s.load.p99_ms);
    if base_rps <= 0.0 {
        bail!("{name}: no throughput without the agent");
    }
    let mut d = String::new();
    let _ = writeln!(&mut d, "\n### {name}\n\nMedians of the rounds.\n");
    let _ = writeln!(
        &mut d,
        "| mode | req/s | vs no agent | p99 ms | vs no agent | agent CPU s / 100k req | \
         agent CPU s / 1M kernel events | kernel events / req | L7 flows / req | lost events |"
    );
    let _ = writeln!(&mut d, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for mode in Mode::ALL {
        let rps = of(mode, &|s| s.load.rps);
        let p99 = of(mode, &|s| s.load.p99_ms);
        let per_req =
            |x: f64, s: &Sample| if s.load.requests > 0.0 { x / s.load.requests } else { 0.0 };
        let cpu_100k = of(mode, &|s| per_req(s.agent_cpu_s, s) * 1e5);
        let cpu_1m = of(mode, &|s| {
            if s.kernel_events > 0.0 { s.agent_cpu_s / s.kernel_events * 1e6 } else { 0.0 }
        });
        let events_req = of(mode, &|s| per_req(s.kernel_events, s));
        let l7_req = of(mode, &|s| per_req(s.l7_flows, s));
        let lost = of(mode, &|s| s.lost);
        let _ = writeln!(
            &mut d,
            "| {} | {rps:.0} | {:.1}% | {p99:.2} | {:.2}x | {cpu_100k:.3} | {cpu_1m:.2} | \
             {events_req:.2} | {l7_req:.2} | {lost:.0} |",
            mode.name(),
            rps / base_rps * 100.0,
            p99 / base_p99,
        );
        match mode {
            Mode::Off => {}
            Mode::Tcp => {
                report.add(
                    "1 data path",
                    format!("{name}: throughput, TCP capture vs no agent"),
                    rps / base_rps * 100.0,
                    "%",
                    Some(Target::AtLeast(97.0)),
                );
                report.add(
                    "1 data path",
                    format!("{name}: p99, TCP capture vs no agent"),
                    p99 / base_p99,
                    "x",
                    None,
                );
            }
            Mode::Full => {
                report.add(
                    "1 data path",
                    format!("{name}: throughput, full L7 vs no agent"),
                    rps / base_rps * 100.0,
                    "%",
                    Some(Target::AtLeast(95.0)),
                );
                report.add(
                    "1 data path",
                    format!("{name}: p99, full L7 vs no agent"),
                    p99 / base_p99,
                    "x",
                    None,
                );
                report.add(
                    "2 cost",
                    format!("agent CPU s per 100k requests, full L7 ({name})"),
                    cpu_100k,
                    "CPU s",
                    None,
                );
            }
        }
    }
    let _ = writeln!(
        &mut d,
        "\nNo agent: {base_rps:.0} req/s, p99 {base_p99:.2} ms. L7 flows / req of about 2 in full \
         mode (client and server end, both on this host) shows every request was parsed (for \
         HTTPS: through the TLS uprobes)."
    );
    report.details.push_str(&d);
    Ok(())
}
