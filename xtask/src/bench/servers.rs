//! What the benchmarks run: the bench network namespace, nginx (HTTP and HTTPS), PostgreSQL, a
//! FastAPI app on uvicorn and the release agent, each stopped by PID when dropped.

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::check;

pub const NETNS: &str = "hwbench";
pub const PORT: u16 = 18080;
pub const TLS_PORT: u16 = 18443;
/// nginx proxying to itself on [`PORT`] over keep-alive upstream connections.
pub const PROXY_PORT: u16 = 18081;
pub const PG_PORT: u16 = 15432;

pub fn tempdir(prefix: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// `ip netns exec NETNS <program>`.
pub fn in_netns(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", NETNS]).arg(program);
    c
}

/// A network namespace with loopback up, deleted on drop.
pub struct Netns(&'static str);

impl Netns {
    pub fn create() -> Result<Self> {
        let name = NETNS;
        let _ = Command::new("ip").args(["netns", "del", name]).stderr(Stdio::null()).status();
        check(Command::new("ip").args(["netns", "add", name]))?;
        let ns = Self(name);
        check(in_netns("ip").args(["link", "set", "lo", "up"]))?;
        // Churn loads open tens of thousands of connections a second: every local port, and
        // TIME_WAIT sockets (on the side that closes first) reused for new outgoing connections.
        for (key, value) in [
            // Listeners sit below 20000 so that no client end holds their port.
            ("net.ipv4.ip_local_port_range", "20000 65535"),
            ("net.ipv4.tcp_tw_reuse", "1"),
            ("net.core.somaxconn", "65535"),
            ("net.ipv4.tcp_max_syn_backlog", "65535"),
        ] {
            check(in_netns("sysctl").args(["-q", "-w", &format!("{key}={value}")]))?;
        }
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", self.0]).status();
    }
}

/// Waits until something accepts TCP connections on 127.0.0.1:`port` in the bench namespace.
fn wait_listening(port: u16, what: &str, log: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let probe = in_netns("bash")
            .arg("-c")
            .arg(format!("exec 3<>/dev/tcp/127.0.0.1/{port}"))
            .stderr(Stdio::null())
            .status();
        if probe.is_ok_and(|s| s.success()) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{what} did not start listening on port {port}: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// nginx in the bench namespace: plain HTTP on [`PORT`], a proxy to that on [`PROXY_PORT`],
/// HTTPS (a self-signed certificate made for the run) on [`TLS_PORT`]; stopped (by PID) on drop.
pub struct Nginx {
    child: Child,
    dir: PathBuf,
}

impl Nginx {
    pub fn start(parent: &Path) -> Result<Self> {
        let dir = parent.join("nginx");
        std::fs::create_dir_all(&dir)?;
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        check(
            Command::new("openssl")
                .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"])
                .args(["-nodes", "-days", "1", "-subj", "/CN=hopwatch-bench", "-keyout"])
                .arg(&key)
                .arg("-out")
                .arg(&cert)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .context("making the self-signed certificate for the HTTPS bench (openssl)")?;
        let conf = dir.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "daemon off;\nworker_processes 1;\npid {dir}/nginx.pid;\nerror_log {dir}/error.log;\n\
                 events {{ worker_connections 4096; }}\n\
                 http {{ access_log off; keepalive_requests 100000;\n\
                   client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir};\n\
                   uwsgi_temp_path {dir}; scgi_temp_path {dir};\n\
                   server {{ listen 127.0.0.1:{PORT}; location / {{ return 200 'hopwatch bench\\n'; }} }}\n\
                   upstream self {{ server 127.0.0.1:{PORT}; keepalive 64; }}\n\
                   server {{ listen 127.0.0.1:{PROXY_PORT}; location / {{ proxy_pass http://self; \
                 proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}\n\
                   server {{ listen 127.0.0.1:{TLS_PORT} ssl; ssl_certificate {cert}; \
                 ssl_certificate_key {key};\n\
                     location / {{ return 200 'hopwatch bench\\n'; }} }} }}\n",
                dir = dir.display(),
                cert = cert.display(),
                key = key.display(),
            ),
        )?;
        let child = in_netns("nginx")
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .spawn()
            .context("starting nginx")?;
        let nginx = Self { child, dir };
        let log = nginx.dir.join("error.log");
        wait_listening(PORT, "nginx", &log)?;
        wait_listening(TLS_PORT, "nginx (HTTPS)", &log)?;
        Ok(nginx)
    }

    pub fn pid(&self) -> u32 {
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

/// A PostgreSQL binary of the installed server version.
pub fn pg_bin(name: &str) -> Result<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL is not installed (/usr/lib/postgresql)")?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin").join(name)))
        .filter(|p| p.exists())
        .collect();
    versions.sort();
    versions.pop().with_context(|| format!("no {name} under /usr/lib/postgresql"))
}

/// A PostgreSQL program run as the `postgres` user inside the bench namespace.
pub fn as_postgres(bin: &str) -> Result<Command> {
    let mut c = in_netns("setpriv");
    c.args(["--reuid=postgres", "--regid=postgres", "--init-groups"]).arg(pg_bin(bin)?);
    Ok(c)
}

/// PostgreSQL in the bench namespace with a pgbench database, stopped (by PID) on drop.
pub struct Postgres {
    child: Child,
    data: PathBuf,
}

impl Postgres {
    pub fn start(dir: &Path) -> Result<Self> {
        let data = dir.join("pgdata");
        std::fs::create_dir_all(&data)?;
        check(Command::new("chown").arg("postgres:postgres").arg(dir).arg(&data))?;
        check(
            as_postgres("initdb")?
                .args(["-A", "trust", "-U", "postgres", "-D"])
                .arg(&data)
                .stdout(Stdio::null()),
        )?;
        let port = PG_PORT.to_string();
        let child = as_postgres("postgres")?
            .arg("-D")
            .arg(&data)
            .args(["-k", &data.display().to_string(), "-h", "127.0.0.1", "-p", &port])
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("postgres.log"))?)
            .spawn()
            .context("starting PostgreSQL")?;
        let pg = Self { child, data };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = as_postgres("pg_isready")?
                .args(["-h", "127.0.0.1", "-p", &port])
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
        check(as_postgres("createdb")?.args(["-h", "127.0.0.1", "-p", &port, "bench"]))?;
        check(
            as_postgres("pgbench")?
                .args(["-h", "127.0.0.1", "-p", &port, "-i", "-q", "-s", "2", "bench"])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )?;
        Ok(pg)
    }

    pub fn pid(&self) -> u32 {
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

/// The asyncio bench's app ([`Uvicorn`]).
pub const UVICORN_PORT: u16 = 18090;

/// What the asyncio bench's app serves: one await per request, as small as a FastAPI request is.
const BENCH_APP: &str = "import asyncio\n\nfrom fastapi import FastAPI\n\napp = FastAPI()\n\n\n\
@app.get(\"/\")\nasync def root():\n    await asyncio.sleep(0)\n    return {\"ok\": True}\n";

/// A FastAPI app on uvicorn (one worker, the asyncio loop, h11) from the end-to-end tests'
/// virtualenv, on 127.0.0.1:[`UVICORN_PORT`] in the bench namespace.
pub struct Uvicorn {
    child: Child,
}

impl Uvicorn {
    pub fn start(parent: &Path) -> Result<Self> {
        let dir = parent.join("uvicorn");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("benchapp.py"), BENCH_APP)?;
        let python = crate::workspace_root().join(crate::E2E_VENV).join("bin/python");
        let log = dir.join("uvicorn.log");
        let child = in_netns(&python)
            .args(["-m", "uvicorn", "benchapp:app", "--app-dir"])
            .arg(&dir)
            .args(["--host", "127.0.0.1", "--port", &UVICORN_PORT.to_string()])
            .args(["--http", "h11", "--loop", "asyncio", "--log-level", "warning"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting uvicorn")?;
        let app = Self { child };
        wait_listening(UVICORN_PORT, "uvicorn", &log)?;
        Ok(app)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Uvicorn {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}

/// The release agent (in the root namespace: it sees every namespace) with its flows serialized
/// as JSON to /dev/null and its metrics on a free loopback port; stopped with SIGINT on drop.
pub struct Agent {
    child: Child,
    metrics_port: u16,
    log: PathBuf,
}

impl Agent {
    pub fn start(bin: &Path, args: &[&str]) -> Result<Self> {
        let log =
            std::env::temp_dir().join(format!("hopwatch-bench-agent-{}.log", std::process::id()));
        // Not the default port: other agents may run on this machine.
        let metrics_port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        // As a node runs it (the DaemonSet, the systemd unit): no printing, every flow to the
        // in-process collector. Printing JSON costs more than the whole pipeline (see
        // BENCHMARKS.md's pipeline figures) and is not what this measures.
        let mut child = Command::new(bin)
            .args(["agent", "-o", "none", "--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
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
        Ok(Self { child, metrics_port, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the agent printed on stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// User + system CPU seconds the agent has used.
    pub fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the parenthesised command: utime and stime are the 12th and 13th.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = rest.split_ascii_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        // /proc reports clock ticks of USER_HZ, which Linux fixes at 100.
        (ticks(11) + ticks(12)) / 100.0
    }

    /// CPU seconds and context switches of each of the agent's threads, summed by thread name
    /// (the tokio workers share one name), sorted by name.
    pub fn threads(&self) -> Vec<ThreadCost> {
        let mut by_name: Vec<ThreadCost> = Vec::new();
        let dir = format!("/proc/{}/task", self.child.id());
        for task in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = task.path();
            let Some(t) = ThreadCost::read(&path) else { continue };
            match by_name.iter_mut().find(|c| c.name == t.name) {
                Some(c) => c.add(&t),
                None => by_name.push(t),
            }
        }
        by_name.sort_by(|a, b| a.name.cmp(&b.name));
        by_name
    }

    /// Stops the agent (SIGINT, as a node would) and returns what it printed on stderr, its
    /// final lines (`--bpf-stats` run times) included.
    pub fn stop(mut self) -> String {
        let _ = Command::new("kill").args(["-INT", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
        self.log()
    }

    /// A `/proc/PID/status` field in KiB (`VmRSS`, `VmHWM`), as MiB.
    pub fn status_mib(&self, field: &str) -> Result<f64> {
        self.proc_mib("status", field)
    }

    /// Where the agent's resident memory is: anonymous (of it, transparent huge pages) and
    /// file-backed, from `/proc/PID/status` and `smaps_rollup`.
    pub fn rss_breakdown(&self) -> Result<String> {
        let anon = self.proc_mib("status", "RssAnon")?;
        let file = self.proc_mib("status", "RssFile")?;
        let huge = self.proc_mib("smaps_rollup", "AnonHugePages")?;
        Ok(format!("{anon:.1} MiB anonymous ({huge:.1} MiB of it huge pages), {file:.1} MiB file"))
    }

    /// A `Field: N kB` line of a `/proc/PID/` file, in MiB.
    fn proc_mib(&self, file: &str, field: &str) -> Result<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/{file}", self.child.id()))
            .with_context(|| format!("reading the agent's /proc {file}"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse::<f64>().ok())
            .map(|kib| kib / 1024.0)
            .with_context(|| format!("no {field} in the agent's /proc {file}"))
    }

    /// The agent's `/metrics` text.
    pub fn metrics(&self) -> Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.metrics_port))
            .context("connecting to the agent's metrics")?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body).context("reading the agent's metrics")?;
        Ok(body)
    }

    /// Sum of the samples of metric `name` whose labels contain `labels` (e.g.
    /// `event="events_sent"`); 0 when there is none.
    pub fn metric(&self, name: &str, labels: &str) -> Result<f64> {
        Ok(sum_metric(&self.metrics()?, name, labels))
    }
}

/// One thread's (or one thread name's) CPU time and context switches.
#[derive(Debug, Clone, Default)]
pub struct ThreadCost {
    pub name: String,
    pub threads: u32,
    pub cpu_s: f64,
    pub voluntary_switches: f64,
    pub involuntary_switches: f64,
}

impl ThreadCost {
    /// From `/proc/PID/task/TID`: `stat` for utime + stime, `status` for the switches.
    fn read(task: &Path) -> Option<Self> {
        let stat = std::fs::read_to_string(task.join("stat")).ok()?;
        let status = std::fs::read_to_string(task.join("status")).ok()?;
        let (head, rest) = stat.rsplit_once(')')?;
        let name = head.split_once('(')?.1.to_owned();
        let f: Vec<&str> = rest.split_ascii_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        Some(Self {
            name,
            threads: 1,
            // USER_HZ is 100 on Linux.
            cpu_s: (ticks(11) + ticks(12)) / 100.0,
            voluntary_switches: field("voluntary_ctxt_switches"),
            involuntary_switches: field("nonvoluntary_ctxt_switches"),
        })
    }

    fn add(&mut self, other: &Self) {
        self.threads += other.threads;
        self.cpu_s += other.cpu_s;
        self.voluntary_switches += other.voluntary_switches;
        self.involuntary_switches += other.involuntary_switches;
    }

    /// What each thread name used between `before` and `self` (threads that ended in between
    /// are missing from `self` and not counted).
    pub fn since(after: &[Self], before: &[Self]) -> Vec<Self> {
        after
            .iter()
            .map(|a| {
                let b = before.iter().find(|b| b.name == a.name).cloned().unwrap_or_default();
                Self {
                    name: a.name.clone(),
                    threads: a.threads,
                    cpu_s: a.cpu_s - b.cpu_s,
                    voluntary_switches: a.voluntary_switches - b.voluntary_switches,
                    involuntary_switches: a.involuntary_switches - b.involuntary_switches,
                }
            })
            .collect()
    }
}

pub fn sum_metric(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name && rest.contains(labels)).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

impl Drop for Agent {
    fn drop(&mut self) {
        // Not signalled again once reaped (by `stop`): its PID may belong to another process.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = Command::new("kill").args(["-INT", &self.child.id().to_string()]).status();
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_metric_samples_by_label() {
        let text = "# HELP x\nhopwatch_kernel_events_total{event=\"events_sent\"} 12\n\
                    hopwatch_kernel_events_total{event=\"data_events\"} 5\n\
                    hopwatch_flows_total{type=\"l7\"} 3\nhopwatch_flows_total{type=\"drop\"} 4\n";
        assert!(
            (sum_metric(text, "hopwatch_kernel_events_total", "events_sent") - 12.0).abs() < 1e-9
        );
        assert!((sum_metric(text, "hopwatch_flows_total", "") - 7.0).abs() < 1e-9);
        assert!(sum_metric(text, "hopwatch_nothing", "").abs() < 1e-9);
    }
}
