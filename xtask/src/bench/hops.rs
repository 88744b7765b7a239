//! `cargo xtask bench`, hop part: aggregation throughput (flows per CPU second into the hop state,
//! on one core) and `/metrics` rendering time with about 10k and 100k series. The measurement is
//! the agent crate's `hops` benchmark (`hopwatch/benches/hops.rs`), run in release mode; its tables
//! are printed as they come (not in the figures table). No root needed.

use anyhow::Result;

use crate::{cargo, say};

pub fn run() -> Result<()> {
    say("hop aggregation and /metrics rendering (cargo bench -p hopwatch --bench hops)");
    cargo(&["bench", "-p", "hopwatch", "--bench", "hops"])
}
