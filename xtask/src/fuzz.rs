//! `cargo xtask fuzz`: every cargo-fuzz target in `agent/fuzz` (one per protocol parser, SQL
//! redaction, protocol detection, the kernel event decoding and the collector's ingest), each
//! for a bounded time. Inputs that once crashed a target are kept in
//! `agent/fuzz/regressions/<target>/` and replayed before the target is fuzzed.
//!
//! cargo-fuzz needs the nightly toolchain (sanitizers); `setup` installs nightly, this installs
//! cargo-fuzz itself when it is missing.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::{check, output, say, workspace_root};

/// cargo-fuzz release installed when none is on the PATH.
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// libFuzzer's memory limit per target (MiB); the collector target holds a store per input.
const RSS_LIMIT_MB: u32 = 2048;

pub struct FuzzOptions<'a> {
    pub seconds: u32,
    /// Targets to run; all when empty.
    pub targets: &'a [String],
}

fn fuzz_dir() -> PathBuf {
    workspace_root().join("agent/fuzz")
}

/// `cargo +nightly fuzz <args>` in `agent/` (cargo-fuzz finds `fuzz/` there).
fn cargo_fuzz() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.args(["+nightly", "fuzz"]).current_dir(workspace_root().join("agent"));
    cmd
}

/// Installs cargo-fuzz with `cargo install` unless it is already there.
fn ensure_cargo_fuzz() -> Result<()> {
    if let Some(v) = output(Command::new("cargo").args(["fuzz", "--version"])) {
        say(&format!("using {}", v.trim()));
        return Ok(());
    }
    say(&format!(
        "installing cargo-fuzz {CARGO_FUZZ_VERSION} (cargo install; the fuzz targets need it)"
    ));
    check(Command::new(env!("CARGO")).args([
        "install",
        "cargo-fuzz",
        "--locked",
        "--version",
        CARGO_FUZZ_VERSION,
    ]))
}

/// The targets `agent/fuzz/Cargo.toml` declares (`[[bin]]` names), in file order.
fn all_targets() -> Result<Vec<String>> {
    let manifest = fuzz_dir().join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest)
        .with_context(|| format!("cannot read {}", manifest.display()))?;
    let mut in_bin = false;
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
        } else if in_bin && let Some(v) = line.strip_prefix("name") {
            let name = v.trim_start().trim_start_matches('=').trim().trim_matches('"');
            out.push(name.to_owned());
        }
    }
    if out.is_empty() {
        bail!("no [[bin]] targets in {}", manifest.display());
    }
    Ok(out)
}

/// Files of `dir` (none when it does not exist).
fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| Some(e.ok()?.path())).filter(|p| p.is_file()).collect())
        .unwrap_or_default();
    files.sort();
    files
}

pub fn run(opts: &FuzzOptions<'_>) -> Result<()> {
    ensure_cargo_fuzz()?;
    let all = all_targets()?;
    let targets: Vec<String> = if opts.targets.is_empty() {
        all.clone()
    } else {
        for t in opts.targets {
            if !all.contains(t) {
                bail!("no fuzz target {t:?}; agent/fuzz has: {}", all.join(", "));
            }
        }
        opts.targets.to_vec()
    };
    say(&format!(
        "building {} fuzz targets (nightly, address sanitizer; the first build takes minutes)",
        targets.len()
    ));
    check(cargo_fuzz().args(["build", "--debug-assertions"]))?;
    let mut crashed = Vec::new();
    for target in &targets {
        let regressions = fuzz_dir().join("regressions").join(target);
        let known = files_in(&regressions);
        if !known.is_empty() {
            say(&format!("{target}: replaying {} regression inputs", known.len()));
            // Files given as arguments are run once each; nothing is fuzzed or written.
            check(
                cargo_fuzz()
                    .args(["run", "--debug-assertions", target])
                    .args(&known)
                    .args(["--", &format!("-rss_limit_mb={RSS_LIMIT_MB}")]),
            )
            .with_context(|| format!("{target}: a regression input fails again"))?;
        }
        say(&format!("{target}: fuzzing for {} s", opts.seconds));
        let started = Instant::now();
        let status = cargo_fuzz()
            .args(["run", "--debug-assertions", target, "--"])
            .arg(format!("-max_total_time={}", opts.seconds))
            .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
            .arg("-print_final_stats=1")
            .status()
            .with_context(|| format!("cannot run cargo fuzz for {target}"))?;
        if status.success() {
            say(&format!("{target}: no crash in {:.0} s", started.elapsed().as_secs_f64()));
        } else {
            crashed.push(target.clone());
        }
    }
    if !crashed.is_empty() {
        bail!(
            "fuzz targets crashed: {}. The inputs are in agent/fuzz/artifacts/<target>/: fix the \
             cause, add a unit test with the input where the bug was, and copy the input to \
             agent/fuzz/regressions/<target>/ (replayed on every run)",
            crashed.join(", ")
        );
    }
    Ok(())
}
