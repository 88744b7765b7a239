//! Load generators run inside the bench namespace: `wrk` (HTTP, HTTPS, and one new connection
//! per request) and `pgbench -S`; each returns throughput, p99 latency and the request count.

use std::{path::Path, process::Command};

use anyhow::{Context as _, Result, bail};

use super::servers::{NETNS, PG_PORT, as_postgres};

/// What one load run measured.
#[derive(Debug, Clone, Copy)]
pub struct LoadResult {
    pub rps: f64,
    pub p99_ms: f64,
    pub requests: f64,
}

/// Runs wrk against `url` inside the bench namespace, with extra request `headers`.
pub fn wrk(url: &str, seconds: u32, connections: u32, headers: &[&str]) -> Result<LoadResult> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", NETNS, "wrk", "--latency", "-t", "1"]).args([
        "-c",
        &connections.to_string(),
        "-d",
        &format!("{seconds}s"),
    ]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd.arg(url).output().context("running wrk")?;
    if !out.status.success() {
        bail!("wrk failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    parse_wrk(&String::from_utf8_lossy(&out.stdout))
}

fn parse_wrk(text: &str) -> Result<LoadResult> {
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk output:\n{text}"))?;
    let p99_ms = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .and_then(|v| parse_wrk_duration(v.trim()))
        .with_context(|| format!("no 99% latency in wrk output:\n{text}"))?;
    let requests = text
        .lines()
        .find_map(|l| l.split_once(" requests in ").map(|(n, _)| n.trim().to_owned()))
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no request count in wrk output:\n{text}"))?;
    // Socket errors mean the figures describe a broken run, not the agent's cost.
    if let Some(errors) = text.lines().find(|l| l.trim().starts_with("Socket errors:")) {
        let failed: f64 = errors
            .split(',')
            .filter_map(|p| p.split_ascii_whitespace().last()?.parse::<f64>().ok())
            .sum();
        if failed > requests * 0.01 {
            bail!("wrk: more than 1% socket errors ({}):\n{text}", errors.trim());
        }
    }
    Ok(LoadResult { rps, p99_ms, requests })
}

/// `1.23ms`, `850.00us`, `1.02s` → milliseconds.
fn parse_wrk_duration(s: &str) -> Option<f64> {
    let (num, scale) = if let Some(v) = s.strip_suffix("us") {
        (v, 1e-3)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1e3)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|n| n * scale)
}

/// Runs `pgbench -S` (select-only) inside the bench namespace with per-transaction logging in
/// `log_dir` (owned by postgres) for the p99, which pgbench does not print.
pub fn pgbench(seconds: u32, clients: u32, log_dir: &Path) -> Result<LoadResult> {
    let prefix = log_dir.join("pgbench_log");
    let out = as_postgres("pgbench")?
        .args(["-h", "127.0.0.1", "-p", &PG_PORT.to_string(), "-S", "-n", "-l"])
        .arg(format!("--log-prefix={}", prefix.display()))
        .args(["-c", &clients.to_string(), "-j", "1", "-T", &seconds.to_string(), "bench"])
        .current_dir(log_dir)
        .output()
        .context("running pgbench")?;
    if !out.status.success() {
        bail!("pgbench failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|v| v.split_ascii_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .with_context(|| format!("no {prefix:?} in pgbench output:\n{text}"))
    };
    let rps = field("tps = ")?;
    let requests = field("number of transactions actually processed: ")?;
    let mut latencies_us = Vec::new();
    for entry in std::fs::read_dir(log_dir)? {
        let path = entry?.path();
        if path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("pgbench_log")) {
            let log = std::fs::read_to_string(&path)?;
            latencies_us.extend(pgbench_latencies(&log));
            std::fs::remove_file(&path)?;
        }
    }
    if latencies_us.is_empty() {
        bail!("pgbench wrote no per-transaction log under {}", log_dir.display());
    }
    Ok(LoadResult { rps, p99_ms: percentile(latencies_us, 0.99) / 1e3, requests })
}

/// Latencies (µs, the third column) of a pgbench per-transaction log.
fn pgbench_latencies(log: &str) -> impl Iterator<Item = f64> + '_ {
    log.lines().filter_map(|l| l.split_ascii_whitespace().nth(2)?.parse::<f64>().ok())
}

pub fn percentile(mut v: Vec<f64>, q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "an index into a short vector"
    )]
    let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk_durations() {
        assert_eq!(parse_wrk_duration("1.50ms"), Some(1.5));
        assert_eq!(parse_wrk_duration("850.00us"), Some(0.85));
        assert_eq!(parse_wrk_duration("1.02s"), Some(1020.0));
        assert_eq!(parse_wrk_duration("fast"), None);
    }

    #[test]
    fn parses_wrk_output_and_rejects_failing_runs() {
        let ok = "Running 3s test @ http://127.0.0.1:18080/\n  Latency Distribution\n     \
                  50%  200.00us\n     99%    1.50ms\n  30000 requests in 3.00s, 4 MB read\n\
                  Requests/sec:  10000.00\n";
        let r = parse_wrk(ok).unwrap();
        assert!((r.rps - 10000.0).abs() < 1e-9 && (r.p99_ms - 1.5).abs() < 1e-9);
        assert!((r.requests - 30000.0).abs() < 1e-9);
        let broken = format!("{ok}  Socket errors: connect 0, read 900, write 0, timeout 0\n");
        assert!(parse_wrk(&broken).is_err());
    }

    #[test]
    fn pgbench_log_p99() {
        let log: String = (1..=100).map(|i| format!("0 {i} {} 0 1700000000 1\n", i * 10)).collect();
        let v: Vec<f64> = pgbench_latencies(&log).collect();
        assert_eq!(v.len(), 100);
        assert!((percentile(v, 0.99) - 990.0).abs() < 1e-9);
    }
}
