//! Builds the kernel object (aya-build, nightly + bpf-linker) that `loader` embeds. This is the
//! only build in the workspace that needs the eBPF toolchain.
//!
//! `cargo xtask` installs what the eBPF build needs; run `cargo xtask build` if this fails with a
//! missing toolchain or `bpf-linker`.

use std::{env, path::PathBuf};

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir.parent().context("hopwatch/ has a parent")?;

    let ebpf_dir = root.join("hopwatch-ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 path")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "hopwatch-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context("building the kernel programs (hopwatch-ebpf); run `cargo xtask build` to install the eBPF toolchain")?;
    // The shared types are compiled into the kernel object too.
    println!("cargo:rerun-if-changed={}", root.join("hopwatch-common").display());
    Ok(())
}
