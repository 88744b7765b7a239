//! The figures of one `cargo xtask bench` run: collected from every part, printed as one table and
//! written to `BENCHMARKS.md` with the machine, kernel, commit, date and command.

use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::{output, workspace_root};

/// A target a figure is held against.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    AtLeast(f64),
    AtMost(f64),
}

impl Target {
    fn met(self, value: f64) -> bool {
        match self {
            Target::AtLeast(t) => value >= t,
            Target::AtMost(t) => value <= t,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Figure {
    pub section: &'static str,
    pub name: String,
    pub value: f64,
    pub unit: &'static str,
    pub target: Option<Target>,
    /// Lowest and highest value over the rounds, when `value` is their median.
    pub spread: Option<(f64, f64)>,
}

/// Everything one run measured, plus detail tables (per mode and round) for BENCHMARKS.md.
#[derive(Debug, Default)]
pub struct Report {
    pub figures: Vec<Figure>,
    pub details: String,
    pub notes: Vec<String>,
}

impl Report {
    pub fn add(
        &mut self,
        section: &'static str,
        name: impl Into<String>,
        value: f64,
        unit: &'static str,
        target: Option<Target>,
    ) {
        self.figures.push(Figure { section, name: name.into(), value, unit, target, spread: None });
    }

    /// A figure that is the median of rounds, with their minimum and maximum.
    pub fn add_rounds(
        &mut self,
        section: &'static str,
        name: impl Into<String>,
        rounds: &[f64],
        unit: &'static str,
        target: Option<Target>,
    ) {
        let (min, median, max) = min_median_max(rounds);
        self.figures.push(Figure {
            section,
            name: name.into(),
            value: median,
            unit,
            target,
            spread: Some((min, max)),
        });
    }

    /// The figures as a Markdown table.
    pub fn table(&self) -> String {
        let mut out = String::from(
            "| # | figure | value | min – max of the rounds | target | |\n|---|---|---:|---:|---:|---|\n",
        );
        for f in &self.figures {
            let (target, verdict) = match f.target {
                Some(t) => {
                    let (op, v) = match t {
                        Target::AtLeast(v) => ("≥", v),
                        Target::AtMost(v) => ("≤", v),
                    };
                    (
                        format!("{op} {} {}", fmt_value(v), f.unit),
                        if t.met(f.value) { "met" } else { "**missed**" },
                    )
                }
                None => (String::new(), ""),
            };
            let spread = f
                .spread
                .map(|(lo, hi)| format!("{} – {}", fmt_value(lo), fmt_value(hi)))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "| {} | {} | {} {} | {spread} | {target} | {verdict} |",
                f.section,
                f.name,
                fmt_value(f.value),
                f.unit
            );
        }
        out
    }

    /// Writes BENCHMARKS.md: conditions, the figures, the notes, the detail tables. A run of some
    /// groups only (`partial`, the `--only` list) does not replace a whole run's file: it goes
    /// into a section of its own at the end (replacing that of an earlier run of the same
    /// groups), headed by its own conditions.
    pub fn write(&self, path: &Path, command: &str, partial: Option<&str>) -> Result<()> {
        let mut conditions = String::new();
        let _ = writeln!(conditions, "- Date: {}", shell("date -u '+%Y-%m-%d %H:%M UTC'"));
        let _ = writeln!(conditions, "- Command: `{command}`");
        let _ = writeln!(conditions, "- Commit: {}", commit());
        let _ = writeln!(conditions, "- Machine: {}", machine());
        let _ = writeln!(conditions, "- Kernel: {}", shell("uname -r"));
        for note in &self.notes {
            let _ = writeln!(conditions, "- {note}");
        }
        let existing = std::fs::read_to_string(path).unwrap_or_default();
        let md = match partial {
            Some(groups) if existing.starts_with("# hopwatch benchmarks") => {
                let heading = format!("\n## Partial run: {groups}\n");
                let mut md = match existing.find(&heading) {
                    Some(at) => {
                        // Keep later partial sections of other groups.
                        let rest = &existing[at + heading.len()..];
                        let next = rest.find("\n## Partial run: ").map_or("", |i| &rest[i..]);
                        format!("{}{next}", &existing[..at])
                    }
                    None => existing,
                };
                let _ = write!(
                    md,
                    "{heading}\nMeasured in a later run of only these groups (`--only`); the figures \
                     above are from the whole run.\n\n{conditions}\n### Figures and targets\n\n{}\n\
                     ### Details\n{}",
                    self.table(),
                    self.details.replace("\n### ", "\n#### ")
                );
                md
            }
            _ => {
                let mut md = String::from("# hopwatch benchmarks\n\n");
                md.push_str(
                    "Produced by one run of `cargo xtask bench` (see `xtask/src/bench/`): every \
                     figure below was measured in that run, the data path figures side by side \
                     (modes alternated round by round, medians reported with the lowest and \
                     highest round); runs of some groups only (`--only`) are added as sections \
                     of their own at the end. Regenerate rather than edit.\n\n",
                );
                md.push_str(&conditions);
                md.push_str("\n## Figures and targets\n\n");
                md.push_str(&self.table());
                md.push_str("\n## Details\n");
                md.push_str(&self.details);
                md
            }
        };
        std::fs::write(path, md).with_context(|| format!("writing {}", path.display()))
    }
}

/// The smallest, the median (the upper one of an even count) and the largest value; zeros for none.
pub fn min_median_max(values: &[f64]) -> (f64, f64, f64) {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match (v.first(), v.get(v.len() / 2), v.last()) {
        (Some(&lo), Some(&mid), Some(&hi)) => (lo, mid, hi),
        _ => (0.0, 0.0, 0.0),
    }
}

/// Three significant digits or so, without exponent noise.
fn fmt_value(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn shell(cmd: &str) -> String {
    output(Command::new("sh").args(["-c", cmd]))
        .map_or_else(|| "?".to_owned(), |s| s.trim().to_owned())
}

fn commit() -> String {
    let root = workspace_root();
    let head =
        output(Command::new("git").arg("-C").arg(&root).args(["rev-parse", "--short=12", "HEAD"]))
            .map_or_else(|| "?".to_owned(), |s| s.trim().to_owned());
    let dirty =
        output(Command::new("git").arg("-C").arg(&root).args(["status", "--porcelain", "-uno"]))
            .is_some_and(|s| !s.trim().is_empty());
    if dirty { format!("{head} (with uncommitted changes)") } else { head }
}

/// CPU model, logical CPUs, RAM.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?.split_once(':').map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().find_map(|l| {
                l.strip_prefix("MemTotal:")?.trim().strip_suffix("kB")?.trim().parse::<f64>().ok()
            })
        })
        .map_or(0.0, |kib| kib / 1_048_576.0);
    format!("{model}, {cpus} logical CPUs, {mem_gib:.1} GiB RAM")
}

/// A `BENCH<TAB>id<TAB>value<TAB>unit<TAB>label` line printed by a benchmark binary.
#[derive(Debug, Clone)]
pub struct BenchLine {
    pub id: String,
    pub value: f64,
    pub label: String,
}

fn parse_bench_line(line: &str) -> Option<BenchLine> {
    let mut f = line.strip_prefix("BENCH\t")?.split('\t');
    let id = f.next()?.to_owned();
    let value = f.next()?.parse().ok()?;
    let _unit = f.next()?;
    let label = f.next()?.to_owned();
    Some(BenchLine { id, value, label })
}

/// Runs `cargo <args>` in the workspace, passing its output through (but the `BENCH` lines), and
/// returns the `BENCH` lines.
pub fn cargo_bench_lines(args: &[&str]) -> Result<Vec<BenchLine>> {
    let mut child = Command::new(env!("CARGO"))
        .args(args)
        .current_dir(workspace_root())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start cargo {}", args.join(" ")))?;
    let mut lines = Vec::new();
    for line in BufReader::new(child.stdout.take().context("cargo's stdout")?).lines() {
        let line = line?;
        match parse_bench_line(&line) {
            Some(b) => lines.push(b),
            None => println!("{line}"),
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_lines_and_targets() {
        let b = parse_bench_line("BENCH\tpipeline_full\t1234567\tevents/s\tdecode -> aggregate")
            .unwrap();
        assert_eq!((b.id.as_str(), b.label.as_str()), ("pipeline_full", "decode -> aggregate"));
        assert!((b.value - 1_234_567.0).abs() < 1e-9);
        assert!(parse_bench_line("| a | table |").is_none());
        assert!(parse_bench_line("BENCH\tx\tnot-a-number\tu\tl").is_none());
        assert!(Target::AtLeast(97.0).met(97.0) && !Target::AtLeast(97.0).met(96.9));
        assert!(Target::AtMost(128.0).met(100.0) && !Target::AtMost(128.0).met(129.0));
        let mut r = Report::default();
        r.add("1", "x", 96.0, "%", Some(Target::AtLeast(97.0)));
        assert!(r.table().contains("**missed**"));
    }
}
