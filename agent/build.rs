//! Builds the kernel object (aya-build, nightly + bpf-linker) and the protobuf types (protox, a
//! pure-Rust protobuf compiler, so no `protoc` is needed).
//!
//! `cargo xtask` installs what the eBPF build needs; run `cargo xtask build` if this fails with a
//! missing toolchain or `bpf-linker`.

use std::{env, path::PathBuf};

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir.parent().context("agent/ has a parent")?;

    let ebpf_dir = root.join("agent-ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 path")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "hopwatch-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context("building the kernel programs (agent-ebpf); run `cargo xtask build` to install the eBPF toolchain")?;
    // The shared types are compiled into the kernel object too.
    println!("cargo:rerun-if-changed={}", root.join("agent-common").display());

    let proto_dir = root.join("proto");
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
        .compile_fds(fds)
        .context("generating Rust from proto/")?;
    Ok(())
}
