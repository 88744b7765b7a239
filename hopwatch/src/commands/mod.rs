//! The `hopwatch` command line: one module per subcommand, each with its flags (`clap`) and its
//! entry point.

mod agent;
mod certs;
mod collector;
mod hops;
mod observe;
mod replay;
mod trace;
mod ui;

use std::process::ExitCode;

use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "hopwatch",
    version,
    about = "eBPF network path observability: which hop is slow or failing"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Trace this host's network path — TCP connections, application exchanges (HTTP/1.x,
    /// PostgreSQL, Redis, MySQL, DNS, also behind TLS) and kernel packet drops — and stream them
    /// as flows.
    Agent(Box<agent::AgentArgs>),
    /// Receive flows from agents, keep their history, and serve Hubble's Observer API.
    Collector(collector::CollectorArgs),
    /// Query a collector's flows (like `hubble observe`).
    Observe(Box<observe::ObserveArgs>),
    /// Generate a CA and the certificates for mutual TLS between agents, the collector and
    /// query clients (PEM files, and optionally the Kubernetes Secrets deploy/ mounts).
    Certs(certs::CertsArgs),
    /// Run a recorded kernel event stream through the userspace pipeline and report its
    /// throughput on one core.
    Replay(replay::ReplayArgs),
    /// Per-hop table (requests/s, errors, latency quantiles, TCP health, drops) over recent
    /// flows; `--path` chains hops upstream → downstream.
    Hops(hops::HopsArgs),
    /// One request hop by hop: a waterfall of the exchanges of trace TRACE_ID (client- and
    /// server-side time, share of the whole, calls made), or the slowest recent traces.
    Trace(trace::TraceArgs),
}

/// Parses the command line, runs the subcommand on a two-thread runtime and says how it ended:
/// `hopwatch: error: ...` on one line and status 1 for a failure, 2 for a bad flag.
pub fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HOPWATCH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    if matches!(cli.command, Command::Agent(_) | Command::Collector(_)) {
        let _ = crate::memory::no_huge_pages();
    }
    let runtime =
        match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("hopwatch: error: cannot start the async runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Agent(args) => agent::run(*args).await.map_err(|e| error_chain(&e)),
            Command::Collector(args) => collector::run(args).await.map_err(|e| error_chain(&e)),
            Command::Observe(args) => {
                let sub = matches.subcommand_matches("observe").expect("observe was parsed");
                return Ok(Some(observe::run(*args, sub).await));
            }
            Command::Certs(args) => certs::run(&args).map_err(|e| error_chain(&e)),
            Command::Replay(args) => replay::main(&args).map_err(|e| error_chain(&e)),
            Command::Hops(args) => return Ok(Some(hops::main(args).await)),
            Command::Trace(args) => return Ok(Some(trace::main(args).await)),
        }
        .map(|()| None)
    });
    match result {
        Ok(Some(code)) => code,
        Ok(None) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("hopwatch: error: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// `error: cause: cause...` on one line, skipping causes the message already contains.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let msg = c.to_string();
        if !s.contains(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        cur = c.source();
    }
    s
}
