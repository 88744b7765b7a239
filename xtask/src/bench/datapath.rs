//! Data path overhead: each load with the agent off, with TCP capture only
//! (`--capture-bytes 0 --no-tls`), with full L7 capture (defaults: payload capture, TLS uprobes,
//! the kernel's exchange engine) and with full L7 capture on the capture path alone
//! (`--no-kernel-exchanges`, the baseline the engine is measured against), from the syscall
//! tracepoints (`--l7-hook syscalls`) and without request tracing (`--no-request-tracing`, what
//! tracing costs) and, for HTTPS, with TCP capture and the TLS uprobes attached but returning at
//! once (`--idle-tls-uprobes`: the floor the probes' hits alone set), modes alternated round by
//! round so drift hits all of them; medians of the
//! rounds.
//! The agent's cost comes from the same runs: its CPU time (from /proc) against the kernel events
//! it was sent (`hopwatch_kernel_events_total{event="events_sent"}`) and the requests served.

use std::{fmt::Write as _, path::Path, time::Duration};

use anyhow::{Context as _, Result, bail};

use super::{
    BenchOptions,
    load::{LoadResult, pgbench, wrk},
    report::{Report, Target},
    servers::{Agent, PORT, PROXY_PORT, TLS_PORT, ThreadCost},
};
use crate::say;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Off,
    Tcp,
    Full,
    /// Full L7 capture without the kernel's exchange engine.
    Capture,
    /// Full L7 capture from the syscall tracepoints, as kernels before 6.3 are served.
    Syscalls,
    /// Full L7 capture without request tracing (what tracing costs, side by side).
    NoTracing,
    /// TCP capture with the TLS uprobes attached and doing nothing: what the probes' hits alone
    /// cost (TLS loads only).
    IdleUprobes,
}

impl Mode {
    const ALL: [Mode; 7] = [
        Mode::Off,
        Mode::Tcp,
        Mode::Full,
        Mode::Capture,
        Mode::Syscalls,
        Mode::NoTracing,
        Mode::IdleUprobes,
    ];

    fn name(self) -> &'static str {
        match self {
            Mode::Off => "no agent",
            Mode::Tcp => "TCP capture",
            Mode::Full => "full L7 capture",
            Mode::Capture => "full L7, capture path only",
            Mode::Syscalls => "full L7 from syscall tracepoints",
            Mode::NoTracing => "full L7 without request tracing",
            Mode::IdleUprobes => "TCP capture, idle TLS uprobes",
        }
    }

    /// Whether the mode is measured under `load`.
    fn applies(self, load: &Load<'_>) -> bool {
        self != Mode::IdleUprobes || load.tls
    }

    fn agent_args(self) -> Option<&'static [&'static str]> {
        match self {
            Mode::Off => None,
            Mode::Tcp => Some(&["--capture-bytes", "0", "--no-tls"]),
            Mode::Full => Some(&[]),
            Mode::Capture => Some(&["--no-kernel-exchanges"]),
            Mode::Syscalls => Some(&["--l7-hook", "syscalls"]),
            Mode::NoTracing => Some(&["--no-request-tracing"]),
            Mode::IdleUprobes => Some(&["--capture-bytes", "0", "--idle-tls-uprobes"]),
        }
    }
}

/// One load generator against one server; `run(seconds)`.
pub struct Load<'a> {
    pub name: &'static str,
    /// Hops each request crosses (each end counts one exchange per hop).
    pub hops: f64,
    /// The load is TLS (its plaintext comes from the uprobes).
    pub tls: bool,
    pub run: Box<dyn Fn(u32) -> Result<LoadResult> + 'a>,
}

pub fn loads<'a>(opts: &'a BenchOptions, dir: &'a Path) -> Vec<Load<'a>> {
    let c = opts.connections;
    vec![
        Load {
            name: "HTTP keep-alive (wrk → nginx)",
            hops: 1.0,
            tls: false,
            run: Box::new(move |s| wrk(&format!("http://127.0.0.1:{PORT}/"), s, c, &[])),
        },
        Load {
            name: "HTTP keep-alive through a proxy (wrk → nginx → nginx upstream, keep-alive)",
            hops: 2.0,
            tls: false,
            run: Box::new(move |s| wrk(&format!("http://127.0.0.1:{PROXY_PORT}/"), s, c, &[])),
        },
        Load {
            name: "HTTPS keep-alive (wrk → nginx, TLS 1.3)",
            hops: 1.0,
            tls: true,
            run: Box::new(move |s| wrk(&format!("https://127.0.0.1:{TLS_PORT}/"), s, c, &[])),
        },
        Load {
            name: "connection churn (wrk → nginx, `Connection: close`)",
            hops: 1.0,
            tls: false,
            run: Box::new(move |s| {
                wrk(&format!("http://127.0.0.1:{PORT}/"), s, c, &["Connection: close"])
            }),
        },
        Load {
            name: "pgbench -S → PostgreSQL",
            hops: 1.0,
            tls: false,
            run: Box::new(move |s| pgbench(s, c.min(8), dir)),
        },
    ]
}

#[derive(Debug, Clone)]
struct Sample {
    load: LoadResult,
    agent_cpu_s: f64,
    kernel_events: f64,
    /// Exchanges counted in the hops (both ends): about 2 per request when every one is seen.
    exchanges: f64,
    /// Of them, those the client end and the server end counted.
    by_end: [f64; 2],
    lost: f64,
    /// The agent's CPU and context switches per thread name during the load.
    threads: Vec<ThreadCost>,
}

/// Counters read from the agent before and after a load.
#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    cpu_s: f64,
    events: f64,
    exchanges: f64,
    by_end: [f64; 2],
    lost: f64,
}

fn counters(agent: &Agent) -> Result<Counters> {
    let text = agent.metrics()?;
    let m = |name, labels| super::servers::sum_metric(&text, name, labels);
    Ok(Counters {
        cpu_s: agent.cpu_seconds(),
        events: m("hopwatch_kernel_events_total", "event=\"events_sent\""),
        exchanges: m("hopwatch_hop_requests_total", ""),
        by_end: ["reporter=\"client\"", "reporter=\"server\""]
            .map(|end| m("hopwatch_hop_requests_total", end)),
        lost: m("hopwatch_lost_events_total", ""),
    })
}

/// The agent pushes kernel counters to /metrics once a second.
const COUNTER_PERIOD: Duration = Duration::from_millis(1100);

/// One load run in one mode, with a fresh agent started for it (and stopped after).
fn measure(bin: &Path, mode: Mode, load: &Load<'_>, seconds: u32) -> Result<Sample> {
    let Some(args) = mode.agent_args() else {
        let load = (load.run)(seconds)?;
        return Ok(Sample {
            load,
            agent_cpu_s: 0.0,
            kernel_events: 0.0,
            exchanges: 0.0,
            by_end: [0.0; 2],
            lost: 0.0,
            threads: Vec::new(),
        });
    };
    let agent = Agent::start(bin, args)?;
    std::thread::sleep(COUNTER_PERIOD);
    let before = counters(&agent)?;
    let threads_before = agent.threads();
    let result = (load.run)(seconds)?;
    let threads = ThreadCost::since(&agent.threads(), &threads_before);
    std::thread::sleep(COUNTER_PERIOD);
    let after = counters(&agent).with_context(|| format!("agent log:\n{}", agent.log()))?;
    Ok(Sample {
        threads,
        load: result,
        agent_cpu_s: after.cpu_s - before.cpu_s,
        kernel_events: after.events - before.events,
        exchanges: after.exchanges - before.exchanges,
        by_end: [0, 1].map(|i| after.by_end[i] - before.by_end[i]),
        lost: after.lost - before.lost,
    })
}

/// Values of `f` over the rounds of `mode`, in round order.
fn per_round(samples: &[(Mode, Sample)], mode: Mode, f: &dyn Fn(&Sample) -> f64) -> Vec<f64> {
    samples.iter().filter(|(m, _)| *m == mode).map(|(_, s)| f(s)).collect()
}

fn median(v: &[f64]) -> f64 {
    super::report::min_median_max(v).1
}

pub fn run(bin: &Path, opts: &BenchOptions, loads: &[Load<'_>], report: &mut Report) -> Result<()> {
    // Agent CPU and kernel events over every full-L7 (and TCP) run, for the per-event cost.
    let mut totals = [(0.0, 0.0); Mode::ALL.len()];
    for load in loads {
        (load.run)(opts.seconds.min(2)).with_context(|| format!("warm-up of {}", load.name))?;
        let mut samples: Vec<(Mode, Sample)> = Vec::new();
        for round in 1..=opts.rounds {
            for mode in Mode::ALL.into_iter().filter(|m| m.applies(load)) {
                let s = measure(bin, mode, load, opts.seconds)
                    .with_context(|| format!("{} with {}", load.name, mode.name()))?;
                say(&format!(
                    "{} round {round} {:<16} {:>9.0} req/s  p99 {:.2} ms  agent CPU {:.2} s  \
                     {:.0} kernel events  {:.0} exchanges  {:.0} lost",
                    load.name,
                    mode.name(),
                    s.load.rps,
                    s.load.p99_ms,
                    s.agent_cpu_s,
                    s.kernel_events,
                    s.exchanges,
                    s.lost
                ));
                let t = &mut totals[mode as usize];
                t.0 += s.agent_cpu_s;
                t.1 += s.kernel_events;
                samples.push((mode, s));
            }
        }
        figures(load, &samples, report)?;
        let programs = kernel_programs(bin, load, opts.seconds)
            .with_context(|| format!("{}: kernel program run times", load.name))?;
        program_figures(load.name, &programs, report);
    }
    for mode in Mode::ALL.into_iter().skip(1).filter(|m| *m != Mode::IdleUprobes) {
        let label = mode.name();
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

fn figures(load: &Load<'_>, samples: &[(Mode, Sample)], report: &mut Report) -> Result<()> {
    let name = load.name;
    let of = |mode: Mode, f: &dyn Fn(&Sample) -> f64| median(&per_round(samples, mode, f));
    let base = per_round(samples, Mode::Off, &|s| s.load.rps);
    let base_p99 = per_round(samples, Mode::Off, &|s| s.load.p99_ms);
    if base.iter().any(|r| *r <= 0.0) {
        bail!("{name}: no throughput without the agent in a round");
    }
    // Each round's ratio against the same round without the agent: drift over the run hits
    // both sides of a ratio, not the spread.
    let ratios = |mode: Mode, f: &dyn Fn(&Sample) -> f64, of: &[f64], scale: f64| -> Vec<f64> {
        per_round(samples, mode, f).iter().zip(of).map(|(v, b)| v / b * scale).collect()
    };
    let mut d = String::new();
    let _ = writeln!(
        &mut d,
        "\n### {name}\n\nMedians of the rounds; ratios are each round's against the same round \
         without the agent (lowest – highest round in brackets).\n"
    );
    let _ = writeln!(
        &mut d,
        "| mode | req/s | vs no agent | p99 ms | vs no agent | agent CPU s / 100k req | \
         agent CPU s / 1M kernel events | kernel events / req | exchanges counted / req | lost events |"
    );
    let _ = writeln!(&mut d, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for mode in Mode::ALL.into_iter().filter(|m| m.applies(load)) {
        let rps = of(mode, &|s| s.load.rps);
        let p99 = of(mode, &|s| s.load.p99_ms);
        let per_req =
            |x: f64, s: &Sample| if s.load.requests > 0.0 { x / s.load.requests } else { 0.0 };
        let cpu_100k = of(mode, &|s| per_req(s.agent_cpu_s, s) * 1e5);
        let cpu_1m = of(mode, &|s| {
            if s.kernel_events > 0.0 { s.agent_cpu_s / s.kernel_events * 1e6 } else { 0.0 }
        });
        let events_req = of(mode, &|s| per_req(s.kernel_events, s));
        let l7_req = of(mode, &|s| per_req(s.exchanges, s));
        let lost = of(mode, &|s| s.lost);
        let throughput = ratios(mode, &|s| s.load.rps, &base, 100.0);
        let latency = ratios(mode, &|s| s.load.p99_ms, &base_p99, 1.0);
        let (t_lo, t_mid, t_hi) = super::report::min_median_max(&throughput);
        let _ = writeln!(
            &mut d,
            "| {} | {rps:.0} | {t_mid:.1}% ({t_lo:.1} – {t_hi:.1}) | {p99:.2} | {:.2}x | \
             {cpu_100k:.3} | {cpu_1m:.2} | {events_req:.2} | {l7_req:.2} | {lost:.0} |",
            mode.name(),
            median(&latency),
        );
        let (label, target) = match mode {
            Mode::Off => continue,
            Mode::Tcp => ("TCP capture", Some(99.0)),
            Mode::Full => ("full L7", Some(95.0)),
            Mode::Capture => ("full L7 on the capture path", Some(95.0)),
            Mode::Syscalls => ("full L7 from syscall tracepoints (kernels before 6.3)", Some(95.0)),
            Mode::NoTracing => ("full L7 without request tracing", Some(95.0)),
            Mode::IdleUprobes => ("TCP capture and idle TLS uprobes (the uprobes' floor)", None),
        };
        report.add_rounds(
            "1 data path",
            format!("{name}: throughput, {label} vs no agent"),
            &throughput,
            "%",
            target.map(Target::AtLeast),
        );
        report.add_rounds(
            "1 data path",
            format!("{name}: p99, {label} vs no agent"),
            &latency,
            "x",
            None,
        );
        if mode != Mode::Tcp && mode != Mode::IdleUprobes {
            // Exactness: each end's count against the requests the load generator completed
            // times the hops each crosses (a few more at the server: requests in flight when
            // it stopped were answered).
            for (i, end) in ["client", "server"].into_iter().enumerate() {
                report.add_rounds(
                    "3 exactness",
                    format!("{name}: exchanges counted at the {end} end / requests, {label}"),
                    &per_round(samples, mode, &|s| per_req(s.by_end[i], s) / load.hops * 100.0),
                    "%",
                    None,
                );
            }
            report.add_rounds(
                "2 cost",
                format!("agent CPU µs per request, {} ({name})", mode.name()),
                &per_round(samples, mode, &|s| per_req(s.agent_cpu_s, s) * 1e6),
                "µs",
                Some(Target::AtMost(1.0)),
            );
        }
    }
    thread_table(&mut d, samples);
    let _ = writeln!(
        &mut d,
        "\nNo agent: {:.0} req/s, p99 {:.2} ms. Exchanges counted / req of about 2 in the full \
         modes (client and server end, both on this host) shows every request was measured (for \
         HTTPS: through the TLS uprobes).",
        median(&base),
        median(&base_p99),
    );
    report.details.push_str(&d);
    Ok(())
}

/// Where the agent's CPU goes in full L7 mode: per thread name, µs and context switches per
/// request (medians of the rounds).
fn thread_table(d: &mut String, samples: &[(Mode, Sample)]) {
    let full: Vec<&Sample> =
        samples.iter().filter(|(m, _)| *m == Mode::Full).map(|(_, s)| s).collect();
    let mut names: Vec<&str> =
        full.iter().flat_map(|s| s.threads.iter().map(|t| t.name.as_str())).collect();
    names.sort_unstable();
    names.dedup();
    let _ = writeln!(
        d,
        "\nFull L7, the agent's threads (medians of the rounds, per request):\n\n\
         | thread | threads | CPU µs / req | voluntary switches / req | involuntary switches / req |\n\
         |---|---:|---:|---:|---:|"
    );
    for name in names {
        let of = |f: &dyn Fn(&ThreadCost) -> f64| {
            let v: Vec<f64> = full
                .iter()
                .filter(|s| s.load.requests > 0.0)
                .map(|s| s.threads.iter().find(|t| t.name == name).map_or(0.0, f) / s.load.requests)
                .collect();
            median(&v)
        };
        let cpu = of(&|t| t.cpu_s * 1e6);
        if cpu < 0.005 {
            continue;
        }
        let threads = full
            .iter()
            .filter_map(|s| s.threads.iter().find(|t| t.name == name))
            .map(|t| t.threads)
            .max()
            .unwrap_or(0);
        let _ = writeln!(
            d,
            "| {name} | {threads} | {cpu:.2} | {:.3} | {:.3} |",
            of(&|t| t.voluntary_switches),
            of(&|t| t.involuntary_switches)
        );
    }
}

/// One kernel program's share of a load.
struct ProgramCost {
    name: String,
    runs_per_request: f64,
    ns_per_run: f64,
}

/// One more full-L7 run with `--bpf-stats` (the kernel times every program run, which costs a
/// little, so these runs are not among the rounds): runs and ns per request of each program.
fn kernel_programs(bin: &Path, load: &Load<'_>, seconds: u32) -> Result<Vec<ProgramCost>> {
    let agent = Agent::start(bin, &["--bpf-stats"])?;
    let result = (load.run)(seconds)?;
    let log = agent.stop();
    if result.requests <= 0.0 {
        bail!("no requests completed");
    }
    // "hopwatch agent: program NAME: RUNS runs, NS ns per run"
    let programs: Vec<ProgramCost> = log
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("hopwatch agent: program ")?;
            let (name, rest) = rest.split_once(": ")?;
            let (runs, rest) = rest.split_once(" runs, ")?;
            let ns = rest.strip_suffix(" ns per run")?;
            Some(ProgramCost {
                name: name.to_owned(),
                runs_per_request: runs.parse::<f64>().ok()? / result.requests,
                ns_per_run: ns.parse().ok()?,
            })
        })
        .collect();
    if programs.is_empty() {
        bail!("the agent printed no program run times:\n{log}");
    }
    Ok(programs)
}

fn program_figures(name: &'static str, programs: &[ProgramCost], report: &mut Report) {
    let mut d = String::from(
        "\nFull L7 with `--bpf-stats` (one extra run): the kernel programs' cost per request.\n\n\
         | program | runs / req | ns / run | ns / req |\n|---|---:|---:|---:|\n",
    );
    let mut total = 0.0;
    for p in programs.iter().filter(|p| p.runs_per_request > 0.0) {
        let per_req = p.runs_per_request * p.ns_per_run;
        total += per_req;
        let _ = writeln!(
            &mut d,
            "| {} | {:.2} | {:.0} | {per_req:.0} |",
            p.name, p.runs_per_request, p.ns_per_run
        );
    }
    let _ = writeln!(&mut d, "| all | | | {total:.0} |");
    report.add(
        "2 cost",
        format!("kernel ns per request, all programs, full L7 ({name})"),
        total,
        "ns",
        None,
    );
    report.details.push_str(&d);
}

/// Functions holding at least this share of the agent's samples are listed.
const PROFILE_PERCENT_LIMIT: &str = "0.8";

/// One extra full-L7 run of `load` with `perf record -g` on the agent: the hottest functions
/// (self time, kernel and user) into the report's details.
pub fn profile(
    bin: &Path,
    opts: &BenchOptions,
    load: &Load<'_>,
    dir: &Path,
    report: &mut Report,
) -> Result<()> {
    let data = dir.join("agent.perf.data");
    let agent = Agent::start(bin, &[])?;
    let mut perf = std::process::Command::new("perf")
        .args(["record", "-F", "999", "-g", "-p", &agent.pid().to_string(), "-o"])
        .arg(&data)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting perf record (Debian's linux-perf)")?;
    std::thread::sleep(Duration::from_millis(500));
    let result = (load.run)(opts.seconds);
    let _ = std::process::Command::new("kill").args(["-INT", &perf.id().to_string()]).status();
    let status = perf.wait()?;
    drop(agent);
    let result = result?;
    if !status.success() && !data.exists() {
        bail!("perf record failed ({status})");
    }
    let out = std::process::Command::new("perf")
        .args(["report", "--stdio", "--no-children", "--sort", "dso,symbol", "-g", "none"])
        .args(["--percent-limit", PROFILE_PERCENT_LIMIT, "-i"])
        .arg(&data)
        .output()
        .context("perf report")?;
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.trim_start().chars().next().is_some_and(|c| c.is_ascii_digit()))
        .map(|l| format!("    {}", l.trim()))
        .collect();
    if lines.is_empty() {
        bail!("perf report listed nothing: {}", String::from_utf8_lossy(&out.stderr));
    }
    let _ = writeln!(
        report.details,
        "\n### Profile of the agent, full L7, {} ({:.0} req/s)\n\n`perf record -F 999 -g -p AGENT` \
         for {} s, self time by function (≥ {PROFILE_PERCENT_LIMIT} %):\n\n{}\n",
        load.name,
        result.rps,
        opts.seconds,
        lines.join("\n")
    );
    let _ = std::fs::remove_file(&data);
    Ok(())
}
