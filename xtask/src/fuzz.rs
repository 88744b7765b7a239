//! `cargo xtask fuzz`: every cargo-fuzz target, each for a bounded time. Each crate fuzzes what
//! it owns, in its own `fuzz/` package that depends only on it: `hopwatch-protocols/fuzz` (one
//! target per protocol parser, SQL redaction, the kernel's protocol detection),
//! `hopwatch-collector/fuzz` (the ingest path) and `hopwatch/fuzz` (kernel event decoding
//! through the whole pipeline and the printers; the only one that needs the eBPF toolchain).
//! Inputs that once crashed a target are kept in `<crate>/fuzz/regressions/<target>/` and
//! replayed before the target is fuzzed.
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

/// The crates with a `fuzz/` package, cheapest to build first.
const FUZZED_CRATES: [&str; 3] = ["hopwatch-protocols", "hopwatch-collector", "hopwatch"];

/// `cargo +nightly fuzz <verb>` in `crate_dir` (cargo-fuzz finds `fuzz/` there). The packages
/// share one target directory, so the dependencies they have in common are built once.
fn cargo_fuzz(crate_dir: &Path, verb: &str) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.args(["+nightly", "fuzz", verb, "--target-dir"])
        .arg(workspace_root().join("target/fuzz"))
        .current_dir(crate_dir);
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

/// The targets `<crate>/fuzz/Cargo.toml` declares (`[[bin]]` names), in file order.
fn targets_of(crate_dir: &Path) -> Result<Vec<String>> {
    let manifest = crate_dir.join("fuzz/Cargo.toml");
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
    let mut all: Vec<(PathBuf, String)> = Vec::new();
    for name in FUZZED_CRATES {
        let dir = workspace_root().join(name);
        all.extend(targets_of(&dir)?.into_iter().map(|t| (dir.clone(), t)));
    }
    for t in opts.targets {
        if !all.iter().any(|(_, name)| name == t) {
            let names: Vec<&str> = all.iter().map(|(_, n)| n.as_str()).collect();
            bail!("no fuzz target {t:?}; there are: {}", names.join(", "));
        }
    }
    all.retain(|(_, t)| opts.targets.is_empty() || opts.targets.contains(t));
    let mut crashed = Vec::new();
    let mut built: Vec<PathBuf> = Vec::new();
    for (dir, target) in &all {
        if !built.contains(dir) {
            say(&format!(
                "building the fuzz targets of {} (nightly, address sanitizer; the first build takes minutes)",
                dir.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned())
            ));
            check(cargo_fuzz(dir, "build").arg("--debug-assertions"))?;
            built.push(dir.clone());
        }
        let regressions = dir.join("fuzz/regressions").join(target);
        let known = files_in(&regressions);
        if !known.is_empty() {
            say(&format!("{target}: replaying {} regression inputs", known.len()));
            // Files given as arguments are run once each; nothing is fuzzed or written.
            check(
                cargo_fuzz(dir, "run")
                    .args(["--debug-assertions", target])
                    .args(&known)
                    .args(["--", &format!("-rss_limit_mb={RSS_LIMIT_MB}")]),
            )
            .with_context(|| format!("{target}: a regression input fails again"))?;
        }
        say(&format!("{target}: fuzzing for {} s", opts.seconds));
        let started = Instant::now();
        let status = cargo_fuzz(dir, "run")
            .args(["--debug-assertions", target, "--"])
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
            "fuzz targets crashed: {}. The inputs are in <crate>/fuzz/artifacts/<target>/: fix \
             the cause, add a unit test with the input where the bug was, and copy the input to \
             <crate>/fuzz/regressions/<target>/ (replayed on every run)",
            crashed.join(", ")
        );
    }
    Ok(())
}
