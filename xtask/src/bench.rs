//! `cargo xtask bench`: overhead of the agent on real data paths, measured side by side in one
//! run. Inside a network namespace the bench creates, nginx serves a small response to `wrk` and
//! PostgreSQL answers `pgbench -S`, with the agent off, with TCP capture only
//! (`--capture-bytes 0 --no-tls`) and with full L7 capture, alternating the modes over several
//! rounds so drift hits all of them. Figures are ratios against "off" from the same run, plus the
//! agent's CPU time per 100k requests.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{apt_install, check, say, workspace_root};

/// Debian packages the benchmarks drive.
pub const BENCH_PACKAGES: &[&str] = &["nginx", "wrk", "iproute2", "postgresql"];

const NETNS: &str = "hwbench";
const PORT: u16 = 18080;
const PG_PORT: u16 = 15432;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Off,
    Tcp,
    Full,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::Off, Mode::Tcp, Mode::Full];

    fn name(self) -> &'static str {
        match self {
            Mode::Off => "no agent",
            Mode::Tcp => "TCP capture",
            Mode::Full => "full L7 capture",
        }
    }

    fn agent_args(self) -> Option<&'static [&'static str]> {
        match self {
            Mode::Off => None,
            Mode::Tcp => Some(&["--capture-bytes", "0", "--no-tls"]),
            Mode::Full => Some(&[]),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    rps: f64,
    /// wrk: p99; pgbench: average (pgbench prints no percentiles).
    latency_ms: f64,
    requests: f64,
    agent_cpu_s: f64,
}

/// A load generator against one server: returns (requests/s, latency ms, requests).
type Load<'a> = Box<dyn Fn() -> Result<(f64, f64, f64)> + 'a>;

pub struct BenchOptions {
    pub rounds: u32,
    pub seconds: u32,
    pub connections: u32,
}

pub fn run(opts: &BenchOptions) -> Result<()> {
    apt_install(BENCH_PACKAGES)?;
    crate::build(true)?;
    let bin = workspace_root().join("target/release/hopwatch");
    let _ns = Netns::create(NETNS)?;
    let dir = tempdir("hopwatch-bench")?;
    let nginx = Nginx::start(&dir)?;
    say(&format!("nginx (pid {}) on 127.0.0.1:{PORT} in netns {NETNS}", nginx.pid()));
    let pg = Postgres::start(&dir)?;
    say(&format!("PostgreSQL (pid {}) on 127.0.0.1:{PG_PORT} in netns {NETNS}", pg.pid()));

    let url = format!("http://127.0.0.1:{PORT}/");
    let workloads: Vec<(&str, &str, Load<'_>)> = vec![
        ("wrk against nginx", "p99 ms", Box::new(|| wrk(&url, opts.seconds, opts.connections))),
        (
            "pgbench -S against PostgreSQL",
            "avg ms",
            Box::new(|| pgbench(opts.seconds, opts.connections.min(8))),
        ),
    ];
    let mut report_text = String::new();
    for (name, latency_label, load) in &workloads {
        load().context("warm-up")?;
        let mut samples: Vec<(Mode, Sample)> = Vec::new();
        for round in 1..=opts.rounds {
            for mode in Mode::ALL {
                let sample = measure(&bin, mode, load)?;
                say(&format!(
                    "{name} round {round} {:<16} {:>10.0} req/s  {latency_label} {:.2}  agent CPU {:.2} s",
                    mode.name(),
                    sample.rps,
                    sample.latency_ms,
                    sample.agent_cpu_s
                ));
                samples.push((mode, sample));
            }
        }
        report_text.push_str(&report(name, latency_label, &samples));
    }
    println!("{report_text}");
    Ok(())
}

/// One load run in one mode, with the agent started for it (and stopped after).
fn measure(bin: &Path, mode: Mode, load: &Load<'_>) -> Result<Sample> {
    let agent = match mode.agent_args() {
        Some(args) => Some(Agent::start(bin, args)?),
        None => None,
    };
    let cpu_before = agent.as_ref().map_or(0.0, Agent::cpu_seconds);
    let (rps, latency_ms, requests) = load()?;
    let agent_cpu_s = agent.as_ref().map_or(0.0, |a| a.cpu_seconds() - cpu_before);
    Ok(Sample { rps, latency_ms, requests, agent_cpu_s })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn report(name: &str, latency_label: &str, samples: &[(Mode, Sample)]) -> String {
    let of = |mode: Mode, f: fn(&Sample) -> f64| {
        median(samples.iter().filter(|(m, _)| *m == mode).map(|(_, s)| f(s)).collect())
    };
    let base_rps = of(Mode::Off, |s| s.rps);
    let base_latency = of(Mode::Off, |s| s.latency_ms);
    let mut out = String::new();
    let _ = writeln!(out, "\n{name} (median of rounds, same run)");
    let _ = writeln!(
        out,
        "| mode | req/s | vs no agent | {latency_label} | vs no agent | agent CPU s / 100k req |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|");
    for mode in Mode::ALL {
        let rps = of(mode, |s| s.rps);
        let latency = of(mode, |s| s.latency_ms);
        let cpu_per_100k = median(
            samples
                .iter()
                .filter(|(m, _)| *m == mode)
                .map(|(_, s)| if s.requests > 0.0 { s.agent_cpu_s / s.requests * 1e5 } else { 0.0 })
                .collect(),
        );
        let _ = writeln!(
            out,
            "| {} | {rps:.0} | {:.1}% | {latency:.2} | {:.2}x | {cpu_per_100k:.3} |",
            mode.name(),
            rps / base_rps * 100.0,
            latency / base_latency,
        );
    }
    out
}

/// Runs `pgbench -S` (select-only) inside the bench namespace; returns (transactions/s, average
/// latency ms, transactions).
fn pgbench(seconds: u32, clients: u32) -> Result<(f64, f64, f64)> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            NETNS,
            "setpriv",
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
        ])
        .arg(pg_bin("pgbench")?)
        .args(["-h", "127.0.0.1", "-p", &PG_PORT.to_string(), "-S", "-n"])
        .args(["-c", &clients.to_string(), "-j", "1", "-T", &seconds.to_string(), "bench"])
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
    let tps = field("tps = ")?;
    let latency = field("latency average = ")?;
    let transactions = field("number of transactions actually processed: ")?;
    Ok((tps, latency, transactions))
}

/// A PostgreSQL binary of the installed server version.
fn pg_bin(name: &str) -> Result<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL is not installed (/usr/lib/postgresql)")?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin").join(name)))
        .filter(|p| p.exists())
        .collect();
    versions.sort();
    versions.pop().with_context(|| format!("no {name} under /usr/lib/postgresql"))
}

/// Runs wrk inside the bench namespace; returns (requests/s, p99 ms, requests).
fn wrk(url: &str, seconds: u32, connections: u32) -> Result<(f64, f64, f64)> {
    let out = Command::new("ip")
        .args(["netns", "exec", NETNS, "wrk", "--latency", "-t", "1"])
        .args(["-c", &connections.to_string(), "-d", &format!("{seconds}s"), url])
        .output()
        .context("running wrk")?;
    if !out.status.success() {
        bail!("wrk failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk output:\n{text}"))?;
    let p99 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .and_then(|v| parse_wrk_duration(v.trim()))
        .with_context(|| format!("no 99% latency in wrk output:\n{text}"))?;
    let requests = text
        .lines()
        .find_map(|l| l.split_once(" requests in ").map(|(n, _)| n.trim().to_owned()))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0.0);
    Ok((rps, p99, requests))
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

fn tempdir(prefix: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// A network namespace with loopback up, deleted on drop.
struct Netns(&'static str);

impl Netns {
    fn create(name: &'static str) -> Result<Self> {
        let _ = Command::new("ip").args(["netns", "del", name]).stderr(Stdio::null()).status();
        check(Command::new("ip").args(["netns", "add", name]))?;
        check(Command::new("ip").args(["netns", "exec", name, "ip", "link", "set", "lo", "up"]))?;
        Ok(Self(name))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", self.0]).status();
    }
}

/// nginx in the bench namespace, stopped (by PID) on drop.
struct Nginx {
    child: Child,
    dir: PathBuf,
}

impl Nginx {
    fn start(dir: &Path) -> Result<Self> {
        let conf = dir.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "daemon off;\nworker_processes 1;\npid {dir}/nginx.pid;\nerror_log {dir}/error.log;\n\
                 events {{ worker_connections 1024; }}\n\
                 http {{ access_log off; keepalive_requests 100000;\n\
                   client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir};\n\
                   uwsgi_temp_path {dir}; scgi_temp_path {dir};\n\
                   server {{ listen 127.0.0.1:{PORT}; location / {{ return 200 'hopwatch bench\\n'; }} }} }}\n",
                dir = dir.display()
            ),
        )?;
        let child = Command::new("ip")
            .args(["netns", "exec", NETNS, "nginx", "-c"])
            .arg(&conf)
            .stdin(Stdio::null())
            .spawn()
            .context("starting nginx")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let probe = Command::new("ip")
                .args(["netns", "exec", NETNS, "bash", "-c"])
                .arg(format!("exec 3<>/dev/tcp/127.0.0.1/{PORT}"))
                .stderr(Stdio::null())
                .status();
            if probe.is_ok_and(|s| s.success()) {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "nginx did not start: {}",
                    std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Self { child, dir: dir.to_owned() })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGQUIT: graceful stop of master and workers.
        let _ = Command::new("kill").args(["-QUIT", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// PostgreSQL in the bench namespace with a pgbench database, stopped (by PID) on drop.
struct Postgres {
    child: Child,
    data: PathBuf,
}

impl Postgres {
    fn start(dir: &Path) -> Result<Self> {
        let data = dir.join("pgdata");
        std::fs::create_dir_all(&data)?;
        check(Command::new("chown").arg("postgres:postgres").arg(dir).arg(&data))?;
        let as_postgres = |bin: &str| -> Result<Command> {
            let mut c = Command::new("ip");
            c.args([
                "netns",
                "exec",
                NETNS,
                "setpriv",
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
            ])
            .arg(pg_bin(bin)?);
            Ok(c)
        };
        check(
            as_postgres("initdb")?
                .args(["-A", "trust", "-U", "postgres", "-D"])
                .arg(&data)
                .stdout(Stdio::null()),
        )?;
        let child = as_postgres("postgres")?
            .arg("-D")
            .arg(&data)
            .args([
                "-k",
                &data.display().to_string(),
                "-h",
                "127.0.0.1",
                "-p",
                &PG_PORT.to_string(),
            ])
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("postgres.log"))?)
            .spawn()
            .context("starting PostgreSQL")?;
        let pg = Self { child, data };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = as_postgres("pg_isready")?
                .args(["-h", "127.0.0.1", "-p", &PG_PORT.to_string()])
                .stdout(Stdio::null())
                .status()?;
            if ready.success() {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "PostgreSQL did not start: {}",
                    std::fs::read_to_string(dir.join("postgres.log"))?
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        check(as_postgres("createdb")?.args([
            "-h",
            "127.0.0.1",
            "-p",
            &PG_PORT.to_string(),
            "bench",
        ]))?;
        check(
            as_postgres("pgbench")?
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &PG_PORT.to_string(),
                    "-i",
                    "-q",
                    "-s",
                    "2",
                    "bench",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )?;
        Ok(pg)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // SIGINT: PostgreSQL's fast shutdown (`ip netns exec` and setpriv exec, so this is it).
        let _ = Command::new("kill").args(["-INT", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

/// The release agent with its flows sent to /dev/null, stopped with SIGINT on drop.
struct Agent {
    child: Child,
}

impl Agent {
    fn start(bin: &Path, args: &[&str]) -> Result<Self> {
        let log =
            std::env::temp_dir().join(format!("hopwatch-bench-agent-{}.log", std::process::id()));
        let mut child = Command::new(bin)
            .args(["agent", "-o", "json"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting the agent")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !std::fs::read_to_string(&log).unwrap_or_default().contains("hopwatch agent: hooks") {
            if let Some(status) = child.try_wait()? {
                bail!("agent exited ({status}): {}", std::fs::read_to_string(&log)?);
            }
            if Instant::now() > deadline {
                bail!("agent not ready after 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Self { child })
    }

    /// User + system CPU seconds the agent has used.
    fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the parenthesised command: utime and stime are the 12th and 13th.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = rest.split_ascii_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        // /proc reports clock ticks of USER_HZ, which Linux fixes at 100.
        (ticks(11) + ticks(12)) / 100.0
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-INT", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
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
}
