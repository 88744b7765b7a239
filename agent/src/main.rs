//! `hopwatch`: eBPF network path observability — which hop is slow or failing.

use std::process::ExitCode;

use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand};
use hopwatch::{agent, cli, collector, error_chain, hops_cli, replay};

/// The collector allocates and frees millions of small strings a second (decoded flows);
/// mimalloc does that markedly faster than glibc's allocator (see `cargo xtask bench`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Trace TCP connections and kernel packet drops on this host and stream them as flows.
    Agent(Box<agent::AgentArgs>),
    /// Receive flows from agents, keep their history, and serve Hubble's Observer API.
    Collector(collector::CollectorArgs),
    /// Query a collector's flows (like `hubble observe`).
    Observe(Box<cli::ObserveArgs>),
    /// Run a recorded kernel event stream through the userspace pipeline and report its
    /// throughput on one core.
    Replay(replay::ReplayArgs),
    /// Per-hop table (requests/s, errors, latency quantiles, TCP health, drops) over recent
    /// flows; `--path` chains hops upstream → downstream.
    Hops(hops_cli::HopsArgs),
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HOPWATCH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
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
                return Ok(Some(cli::run(*args, sub).await));
            }
            Command::Replay(args) => replay::run(&args).map_err(|e| error_chain(&e)).map(|r| {
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
            }),
            Command::Hops(args) => return Ok(Some(hops_cli::main(args).await)),
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
