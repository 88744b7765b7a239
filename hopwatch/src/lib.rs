//! The `hopwatch` binary: the agent (kernel programs loaded and read, the event pipeline,
//! identity, metrics, the sink to a collector), and the command line (`agent`, `collector`,
//! `observe`, `hops`, `replay`). Wire types, parsers, hop aggregation and the collector are
//! crates of their own (README's "How it works").
//!
//! Everything here is private to the binary except [`main`] and [`harness`], which the
//! end-to-end tests, benchmarks and fuzz targets drive directly.

mod commands;
mod conntrack;
mod drops;
mod events;
mod flow;
mod identity;
mod l7;
mod loader;
mod loss;
mod memory;
mod metrics;
mod otlp;
mod own;
mod pipeline;
mod policy;
mod print;
mod recording;
mod sink;
mod trace;

// A dev-dependency of the benchmarks (`benches/collector.rs` sends ingest requests with its own
// codec), which share the unit tests' dependency list.
#[cfg(test)]
use tonic_prost as _;

pub use self::commands::main;

/// The agent and the collector allocate and free millions of small strings a second (decoded
/// flows); mimalloc does that markedly faster than glibc's allocator (see `cargo xtask bench`).
/// Here rather than in `main.rs` so the tests and benchmarks run on the allocator the binary
/// runs on; fuzz targets keep the sanitizer's.
#[cfg(not(fuzzing))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The parts of the agent that tests, benchmarks and fuzz targets run without the command line.
pub mod harness {
    #[cfg(feature = "kubernetes")]
    pub use crate::identity::kube::{
        KubeSource, PodScope, Source,
        store::{Kind, KubeState},
    };
    pub use crate::{
        drops::DropReasons,
        events::decode,
        flow::{Clock, FlowBuilder, forwarded::TrustedProxies},
        identity::cgroup::cgroup2_mount,
        loader::btf::Btf,
        memory::no_huge_pages,
        metrics::{MetricsAddr, MetricsArgs, Telemetry},
        pipeline::{CountedExchange, FastPath, Pipeline, PipelineOptions},
        print::{Format, Options as PrintOptions, Printer},
        recording::read_recording,
        sink::{
            Batching,
            link::{dial, run_remote},
            queue::Queue,
        },
        trace::PROPAGATED_HEADERS,
    };
}
