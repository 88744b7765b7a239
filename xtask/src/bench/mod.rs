//! `cargo xtask bench`: every figure of issue 7 from one run, printed as one table and written to
//! `BENCHMARKS.md`.
//!
//! - Data path ([`datapath`]): inside a network namespace the bench creates, wrk against nginx
//!   (HTTP keep-alive, HTTPS keep-alive, one new connection per request) and `pgbench -S` against
//!   PostgreSQL, with the agent off, with TCP capture only and with full L7 capture (TLS uprobes
//!   included), alternating the modes over rounds; throughput and p99 as ratios against "off"
//!   from the same run; the agent's CPU per million kernel events and per 100k requests.
//! - Pipeline ([`pipeline`]): a kernel event stream recorded by the agent under that load,
//!   replayed through the userspace pipeline on one core against the decode-only ceiling.
//! - Memory ([`memory`]): agent RSS idle, with 100k open connections, during and after 1M short
//!   connections.
//! - Collector: ingest rate and `observe` latency over a 1M-flow store (`hopwatch/benches/collector.rs`).
//! - ClickHouse: one collector's write rate into a private 18.16 server, `observe --last 1000`
//!   with a rare filter over 10M stored flows, bytes per stored flow (`hopwatch/benches/clickhouse.rs`).
//! - Hops: aggregation and `/metrics` rendering (`hopwatch/benches/hops.rs`; printed, not tabled).
//! - asyncio ([`asyncio`]): wrk against a FastAPI app on uvicorn in the same namespace, without
//!   the agent, with full L7 with and without its asyncio probes (request tracing's Python
//!   uprobes) and without request tracing, rounds alternated.
//! - VM (`vm`): the same keep-alive load (wrk against nginx across a veth pair) inside Debian 12's
//!   own 6.1 kernel under qemu, without and with the agent (L7 on the syscall capture path), rounds
//!   alternated in one boot ([`crate::vm::bench`]).

mod asyncio;
pub mod conns;
mod datapath;
pub mod hops;
mod load;
mod memory;
mod pipeline;
mod report;
mod servers;

use std::path::PathBuf;

use anyhow::{Result, bail};
use report::Report;

use crate::{apt_install, is_root, say, workspace_root};

/// Debian packages the benchmarks drive (openssl makes the HTTPS certificate, util-linux's
/// prlimit raises the open-file limit for 100k connections, linux-perf profiles the agent).
pub const BENCH_PACKAGES: &[&str] =
    &["nginx", "wrk", "iproute2", "postgresql", "openssl", "util-linux", "linux-perf"];

pub struct BenchOptions {
    /// Groups to run (empty: all).
    pub only: Vec<String>,
    pub rounds: u32,
    pub seconds: u32,
    pub connections: u32,
    pub collector_args: Vec<String>,
    pub clickhouse_args: Vec<String>,
    /// Concurrent connections held open for the memory figure.
    pub hold_conns: u64,
    /// Short connections for the memory figure.
    pub churn_conns: u64,
    /// Where the report goes (relative to the workspace root).
    pub output: PathBuf,
    /// The command line, for the report.
    pub command: String,
    /// Profile the agent during one extra full-L7 run of the first load.
    pub profile: bool,
}

pub fn run(opts: &BenchOptions) -> Result<()> {
    let want = |group: &str| opts.only.is_empty() || opts.only.iter().any(|g| g == group);
    let needs_root = ["datapath", "pipeline", "memory", "asyncio"].iter().any(|g| want(g));
    if needs_root && !is_root() {
        bail!(
            "the data path, pipeline and memory benchmarks load eBPF programs and create a network \
             namespace: run `sudo -E cargo xtask bench` (or `--only hops,collector`)"
        );
    }
    let mut report = Report::default();
    report.notes.push(format!(
        "Settings: {} round(s) of {} s per mode and load, {} wrk connections; memory: {} held \
         connections, {} short connections",
        opts.rounds, opts.seconds, opts.connections, opts.hold_conns, opts.churn_conns
    ));
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    report.notes.push(format!(
        "Load average when the run started: {}",
        load.split_ascii_whitespace().take(3).collect::<Vec<_>>().join(" ")
    ));
    // A failing group is reported and the others still run: the report says what is missing.
    let mut failed: Vec<String> = Vec::new();
    let mut attempt = |group: &str, result: Result<()>| {
        if let Err(e) = result {
            say(&format!("{group} benchmarks failed: {e:#}"));
            failed.push(format!("{group}: {e:#}"));
        }
    };
    if want("hops") {
        attempt("hops", hops::run());
    }
    if want("datapath") || want("pipeline") || want("memory") || want("asyncio") {
        apt_install(BENCH_PACKAGES)?;
        crate::build(true)?;
        let bin = workspace_root().join("target/release/hopwatch");
        let _ns = servers::Netns::create()?;
        let dir = servers::tempdir("hopwatch-bench")?;
        if want("datapath") || want("pipeline") {
            let nginx = servers::Nginx::start(&dir)?;
            say(&format!(
                "nginx (pid {}) on 127.0.0.1:{} (HTTP) and :{} (HTTPS) in netns {}",
                nginx.pid(),
                servers::PORT,
                servers::TLS_PORT,
                servers::NETNS
            ));
            let pg = servers::Postgres::start(&dir)?;
            say(&format!(
                "PostgreSQL (pid {}) on 127.0.0.1:{} in netns {}",
                pg.pid(),
                servers::PG_PORT,
                servers::NETNS
            ));
            let loads = datapath::loads(opts, &dir);
            if want("datapath") {
                attempt("datapath", datapath::run(&bin, opts, &loads, &mut report));
            }
            if opts.profile {
                attempt("profile", datapath::profile(&bin, opts, &loads[0], &dir, &mut report));
            }
            if want("pipeline") {
                attempt("pipeline", pipeline::run(&bin, opts, &loads, &dir, &mut report));
            }
        }
        if want("memory") {
            attempt("memory", memory::run(&bin, opts, &mut report));
        }
        if want("asyncio") {
            // The app is the end-to-end tests' FastAPI and uvicorn, in their virtualenv.
            let venv = apt_install(&["python3-venv"])
                .and_then(|()| crate::python_venv(crate::E2E_REQUIREMENTS, crate::E2E_VENV));
            attempt("asyncio", venv.and_then(|()| asyncio::run(&bin, opts, &dir, &mut report)));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    if want("collector") {
        attempt("collector", collector(opts, &mut report));
    }
    if want("clickhouse") {
        attempt("clickhouse", clickhouse(opts, &mut report));
    }
    if want("vm") {
        attempt("vm", vm(opts, &mut report));
    }
    for f in &failed {
        report.notes.push(format!("FAILED in this run: {f}"));
    }
    let table = report.table();
    println!("\nhopwatch benchmarks (this run)\n{table}");
    let path = workspace_root().join(&opts.output);
    let partial = (!opts.only.is_empty()).then(|| opts.only.join(","));
    report.write(&path, &opts.command, partial.as_deref())?;
    say(&format!("figures written to {}", path.display()));
    if !failed.is_empty() {
        bail!("{} group(s) failed: {}", failed.len(), failed.join("; "));
    }
    Ok(())
}

/// The agent's cost on Debian 12's 6.1 kernel, inside a guest (see [`crate::vm::bench`]).
fn vm(opts: &BenchOptions, report: &mut Report) -> Result<()> {
    crate::build(true)?;
    say(&format!(
        "the agent on Debian's kernel under qemu: {} rounds of {} s per mode",
        opts.rounds, opts.seconds
    ));
    let b = crate::vm::bench(None, opts.rounds, opts.seconds)?;
    let ratios: Vec<f64> = b.rounds.iter().map(|(none, l7)| l7 / none * 100.0).collect();
    let name = format!("{} guest (TCG), HTTP keep-alive (wrk → nginx)", b.kernel);
    report.add_rounds(
        "5 kernels",
        format!("{name}: throughput, full L7 (syscall tracepoints) vs no agent"),
        &ratios,
        "%",
        Some(report::Target::AtLeast(95.0)),
    );
    let none: Vec<f64> = b.rounds.iter().map(|r| r.0).collect();
    report.add_rounds("5 kernels", format!("{name}: requests/s, no agent"), &none, "req/s", None);
    let cpu: Vec<f64> = b.cpu_per_request.iter().map(|s| s * 1e6).collect();
    if !cpu.is_empty() {
        report.add_rounds(
            "5 kernels",
            format!("{name}: agent CPU µs per request (emulated CPU)"),
            &cpu,
            "µs",
            None,
        );
    }
    report.notes.push(format!("VM bench: the guest agent said `{}`", b.l7_line.trim()));
    Ok(())
}

/// The ClickHouse benchmark's figures (`BENCH` lines): write rate, a rare-filter query over
/// everything stored, bytes per flow. It starts its own clickhouse-server (a test package).
fn clickhouse(opts: &BenchOptions, report: &mut Report) -> Result<()> {
    crate::apt_install(&["clickhouse-server"])?;
    say("ClickHouse benchmarks (cargo bench -p hopwatch --bench clickhouse)");
    let mut cmd = vec!["bench", "-p", "hopwatch", "--bench", "clickhouse", "--"];
    cmd.extend(opts.clickhouse_args.iter().map(String::as_str));
    let lines = report::cargo_bench_lines(&cmd)?;
    if !lines.iter().any(|l| l.id == "clickhouse_write") {
        bail!("the ClickHouse benchmark printed no write figure");
    }
    for l in lines {
        let (unit, target) = match l.id.as_str() {
            "clickhouse_write" => ("flows/s", None),
            "clickhouse_write_per_core" => ("flows/s", Some(report::Target::AtLeast(500_000.0))),
            "clickhouse_observe_rare" => ("ms", Some(report::Target::AtMost(250.0))),
            _ => ("B", None),
        };
        report.add("6 clickhouse", l.label, l.value, unit, target);
    }
    Ok(())
}

/// The collector benchmark binary's figures (`BENCH` lines) into the report.
fn collector(opts: &BenchOptions, report: &mut Report) -> Result<()> {
    if !is_root() {
        say("not root: the kernel-event-to-observe delay is not measured (it loads eBPF programs)");
    }
    say("collector benchmarks (cargo bench -p hopwatch --bench collector)");
    let mut cmd = vec!["bench", "-p", "hopwatch", "--bench", "collector", "--"];
    cmd.extend(opts.collector_args.iter().map(String::as_str));
    let lines = report::cargo_bench_lines(&cmd)?;
    if !lines.iter().any(|l| l.id.starts_with("collector_ingest")) {
        bail!("the collector benchmark printed no ingest figure");
    }
    for l in lines {
        let (unit, target) = match l.id.as_str() {
            id if id.starts_with("collector_ingest") => {
                ("flows/s", Some(report::Target::AtLeast(500_000.0)))
            }
            "collector_observe_rare" => ("ms", Some(report::Target::AtMost(100.0))),
            _ => ("ms", None),
        };
        report.add("4 collector", l.label, l.value, unit, target);
    }
    Ok(())
}
