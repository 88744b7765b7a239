//! Agent memory (full L7 capture, default settings): resident set idle, with N concurrent
//! connections open in the bench namespace, and during and after M short-lived connections. The
//! connections come from `xtask bench-conns` run inside the namespace with a raised open-file
//! limit (two sockets per connection, both ends local).

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{
    BenchOptions,
    report::{Report, Target},
    servers::{Agent, in_netns},
};
use crate::say;

/// Held connections: one listener port per process from here.
const HOLD_PORT: u16 = 19100;
const CHURN_PORT: u16 = 19000;
/// Listener addresses: 127.0.0.1..=4, each good for ~45k client ports per listener port.
const ADDRS: u8 = 4;
/// Time limit of the short-connection load.
const CHURN_LIMIT_S: u64 = 150;
/// How long the agent is given to settle after the short connections.
const SETTLE: Duration = Duration::from_secs(15);
const RSS_TARGET_MIB: f64 = 128.0;

/// This process's hard limit on open files: without `CAP_SYS_RESOURCE` (containers) it cannot
/// be raised, so the held connections are spread over several processes.
fn nofile_hard_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_ascii_whitespace().nth(4)?.parse().ok())
        })
        .unwrap_or(1024)
}

/// `xtask bench-conns MODE ...` in the bench namespace, its open-file limit raised to the hard
/// limit.
fn conns(mode: &str, conns: u64, port: u16, seconds: u64) -> Result<Child> {
    let exe = std::env::current_exe().context("locating the xtask binary")?;
    let nofile = nofile_hard_limit();
    in_netns("prlimit")
        .arg(format!("--nofile={nofile}:{nofile}"))
        .arg(exe)
        .args(["bench-conns", mode, "--conns", &conns.to_string(), "--port", &port.to_string()])
        .args(["--addrs", &ADDRS.to_string(), "--seconds", &seconds.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting xtask bench-conns {mode}"))
}

/// `n` connections held open by as many `bench-conns hold` processes as the open-file limit
/// needs (two sockets per connection, both ends local), each on its own port; returns once all
/// are open.
fn hold_open(n: u64) -> Result<Vec<Child>> {
    let per = (nofile_hard_limit().saturating_sub(256) / 2).max(1);
    let procs = n.div_ceil(per);
    if procs > 200 {
        bail!("{n} connections need {procs} processes at this open-file limit: too many");
    }
    say(&format!("opening {n} connections from {procs} processes of at most {per}"));
    let mut children = Vec::new();
    let mut left = n;
    for i in 0..procs {
        let count = left.min(per);
        left -= count;
        let port = HOLD_PORT + u16::try_from(i).unwrap_or(0);
        children.push(conns("hold", count, port, 120)?);
    }
    for child in &mut children {
        let mut out = BufReader::new(child.stdout.take().context("bench-conns stdout")?);
        let mut line = String::new();
        out.read_line(&mut line)?;
        if !line.starts_with("ready") {
            bail!("bench-conns hold did not open its connections (said {line:?})");
        }
    }
    Ok(children)
}

/// Waits until the agent has read everything the kernel sent (its read counter stops moving).
fn wait_drained(agent: &Agent) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = -1.0;
    loop {
        std::thread::sleep(Duration::from_millis(1100));
        let read = agent.metric("hopwatch_events_read_total", "kernel_ring_buffer")?;
        if (read - last).abs() < 1.0 || Instant::now() > deadline {
            return Ok(());
        }
        last = read;
    }
}

pub fn run(bin: &Path, opts: &BenchOptions, report: &mut Report) -> Result<()> {
    let section = "3 memory";
    let agent = Agent::start(bin, &[])?;
    std::thread::sleep(Duration::from_secs(3));
    let idle = agent.status_mib("VmRSS")?;
    say(&format!(
        "agent (pid {}) idle: RSS {idle:.1} MiB: {}",
        agent.pid(),
        agent.rss_breakdown()?
    ));
    report.add(section, "agent RSS idle (full L7 capture)", idle, "MiB", None);

    // Concurrent connections.
    let n = opts.hold_conns;
    let mut hold = hold_open(n)?;
    wait_drained(&agent)?;
    let held = agent.status_mib("VmRSS")?;
    let conns_map = agent.metric("hopwatch_map_entries", "CONNS\"")?;
    let not_tracked = agent.metric("hopwatch_table_full_total", "")?;
    say(&format!(
        "{n} connections open: agent RSS {held:.1} MiB ({}); kernel CONNS map {conns_map:.0} \
         entries; {not_tracked:.0} not tracked (table full)",
        agent.rss_breakdown()?
    ));
    report.add(
        section,
        format!("agent RSS with {n} concurrent connections open"),
        held,
        "MiB",
        Some(Target::AtMost(RSS_TARGET_MIB)),
    );
    report.notes.push(format!(
        "Memory: with {n} connections open the kernel CONNS map held {conns_map:.0} entries (both \
         ends of each connection are on this host) and {not_tracked:.0} connections were not \
         tracked for a full table"
    ));
    for child in &mut hold {
        drop(child.stdin.take());
    }
    for mut child in hold {
        let status = child.wait()?;
        if !status.success() {
            bail!("bench-conns hold failed ({status})");
        }
    }
    wait_drained(&agent)?;

    // Short-lived connections.
    let m = opts.churn_conns;
    let lost_before = agent.metric("hopwatch_lost_events_total", "")?;
    let (read_before, cpu_before) =
        (agent.metric("hopwatch_events_read_total", "kernel_ring_buffer")?, agent.cpu_seconds());
    let mut churn = conns("churn", m, CHURN_PORT, CHURN_LIMIT_S)?;
    let mut peak = agent.status_mib("VmRSS")?;
    while churn.try_wait()?.is_none() {
        std::thread::sleep(Duration::from_millis(200));
        peak = peak.max(agent.status_mib("VmRSS")?);
    }
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut churn.stdout.take().context("bench-conns stdout")?,
        &mut text,
    )?;
    let status = churn.wait()?;
    let done: Vec<f64> = text
        .trim()
        .strip_prefix("done ")
        .unwrap_or("")
        .split(' ')
        .filter_map(|v| v.parse().ok())
        .collect();
    let [completed, errors, secs] = done[..] else {
        bail!("bench-conns churn failed ({status}): {text:?}");
    };
    say(&format!(
        "{completed:.0} short connections in {secs:.1} s ({:.0}/s, {errors:.0} connect errors): peak RSS {peak:.1} MiB",
        completed / secs
    ));
    let settle_end = Instant::now() + SETTLE;
    while Instant::now() < settle_end {
        std::thread::sleep(Duration::from_secs(1));
    }
    let settled = agent.status_mib("VmRSS")?;
    let lost = agent.metric("hopwatch_lost_events_total", "")? - lost_before;
    // What the agent spent on each event it read: the cost side of the churn, whatever share of
    // the events the kernel could hand over.
    let read = agent.metric("hopwatch_events_read_total", "kernel_ring_buffer")? - read_before;
    let cpu_per_event_us = (agent.cpu_seconds() - cpu_before) * 1e6 / read.max(1.0);
    say(&format!(
        "{}s later: RSS {settled:.1} MiB ({}); {lost:.0} events lost during the churn, \
         {read:.0} read at {cpu_per_event_us:.2} µs of agent CPU each",
        SETTLE.as_secs(),
        agent.rss_breakdown()?
    ));
    report.add(
        section,
        "short-lived connections completed (bounded in time)",
        completed,
        "conns",
        None,
    );
    report.add(
        section,
        "short-lived connection rate (full L7 agent running)",
        completed / secs,
        "conns/s",
        None,
    );
    report.add(
        section,
        format!("agent RSS peak during {completed:.0} short connections"),
        peak,
        "MiB",
        None,
    );
    report.add(
        section,
        format!("agent RSS {}s after the short connections", SETTLE.as_secs()),
        settled,
        "MiB",
        Some(Target::AtMost(RSS_TARGET_MIB)),
    );
    report.add(section, "kernel events lost during the short connections", lost, "events", None);
    report.add(
        section,
        format!("agent CPU per event read during the short connections ({read:.0} read)"),
        cpu_per_event_us,
        "µs",
        None,
    );
    #[expect(clippy::cast_precision_loss, reason = "a count far below 2^52")]
    let wanted = m as f64;
    if completed < wanted {
        report.notes.push(format!(
            "Memory: the short-connection load stopped at its {CHURN_LIMIT_S} s limit after \
             {completed:.0} of {m} connections"
        ));
    }
    Ok(())
}
