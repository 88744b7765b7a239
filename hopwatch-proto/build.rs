//! Generates the wire types from `proto/` with protox (a pure-Rust protobuf compiler, so no
//! `protoc` is needed) and keeps the descriptor set for the protobuf-JSON printers.

use std::{env, path::PathBuf};

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let proto_dir = manifest_dir.parent().context("hopwatch-proto/ has a parent")?.join("proto");
    println!("cargo:rerun-if-changed={}", proto_dir.display());
    let files = [
        "flow/flow.proto",
        "relay/relay.proto",
        "observer/observer.proto",
        "hopwatch/v1/ingest.proto",
    ];
    let fds = protox::compile(files, [&proto_dir]).context("compiling proto/")?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("descriptors.bin"), prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // The collector keeps each event's bytes as it received them (shared, not copied).
        .bytes(".hopwatch.v1.Batch.events")
        .compile_fds(fds)
        .context("generating Rust from proto/")?;
    Ok(())
}
