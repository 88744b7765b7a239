//! The hopwatch agent under test, run as a user would run it (`hopwatch agent -o json`), with its
//! JSON flow stream collected for assertions.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::Value;

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_hopwatch");
/// Extra arguments for every agent the tests start (whitespace-separated), e.g.
/// `--l7-hook syscalls` to run the L7 tests through the syscall capture path.
pub(crate) const EXTRA_ARGS_VAR: &str = "HOPWATCH_E2E_AGENT_ARGS";

pub(crate) struct Agent {
    child: Option<Child>,
    lines: Arc<Mutex<Vec<Value>>>,
    stderr: Arc<Mutex<String>>,
}

impl Agent {
    /// Starts `hopwatch agent -o json <extra>` and waits until its hooks are attached.
    pub(crate) fn start(extra: &[&str]) -> Self {
        let mut child = Command::new(BIN)
            // Port 0: tests (and other agents on this machine) never compete for the metrics port;
            // the chosen address is printed on stderr ([`Agent::metrics_addr`]).
            .args([
                "agent",
                "-o",
                "json",
                "--node-name",
                "e2e-node",
                "--metrics-addr",
                "127.0.0.1:0",
            ])
            .args(extra)
            .args(std::env::var(EXTRA_ARGS_VAR).unwrap_or_default().split_whitespace())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start hopwatch");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().expect("piped");
        std::thread::spawn({
            let lines = lines.clone();
            move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    let v: Value = serde_json::from_str(&line)
                        .unwrap_or_else(|e| panic!("agent printed non-JSON {line:?}: {e}"));
                    lines.lock().unwrap().push(v);
                }
            }
        });
        let stderr = capture_stderr(&mut child);
        let mut agent = Self { child: Some(child), lines, stderr };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !agent.stderr().contains("hopwatch agent: hooks") {
            if let Some(status) = agent.exited() {
                panic!("agent exited ({status}) before attaching:\n{}", agent.stderr());
            }
            assert!(Instant::now() < deadline, "agent not ready after 30s:\n{}", agent.stderr());
            std::thread::sleep(Duration::from_millis(50));
        }
        agent
    }

    /// Where the agent serves `/metrics` (from its start-up line on stderr, which follows the
    /// hooks line; waits up to 10 s for it).
    pub(crate) fn metrics_addr(&self) -> std::net::SocketAddr {
        self.announced("where it serves metrics", |l| {
            l.split("metrics on http://").nth(1)?.split('/').next()?.parse().ok()
        })
    }

    /// Where the agent's in-process collector listens (from its start-up line).
    pub(crate) fn collector_addr(&self) -> String {
        self.announced("where its collector is", |l| {
            let a = l.split("collector APIs on ").nth(1)?.split(' ').next()?;
            a.parse::<std::net::SocketAddr>().ok().map(|a| a.to_string())
        })
    }

    /// The first stderr line `parse` accepts, waiting up to 10 s for it.
    pub(crate) fn announced<T>(&self, what: &str, parse: impl Fn(&str) -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let err = self.stderr();
            if let Some(v) = err.lines().find_map(&parse) {
                return v;
            }
            assert!(Instant::now() < deadline, "the agent did not say {what}:\n{err}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub(crate) fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().expect("wait for the agent")
    }

    /// Every flow (the `flow` member of each response) seen so far.
    pub(crate) fn flows(&self) -> Vec<Value> {
        self.lines.lock().unwrap().iter().filter_map(|v| v.get("flow").cloned()).collect()
    }

    /// Every response line (flows and lost-event notices) seen so far.
    pub(crate) fn lines(&self) -> Vec<Value> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits up to `timeout` for a flow matching `pred`; panics with the flows seen otherwise.
    pub(crate) fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        self.wait_for_n(what, timeout, 1, pred).swap_remove(0)
    }

    /// Waits until `n` flows match `pred`; returns them in the order they were printed.
    pub(crate) fn wait_for_n(
        &self,
        what: &str,
        timeout: Duration,
        n: usize,
        pred: impl Fn(&Value) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let found: Vec<Value> = self.flows().into_iter().filter(|f| pred(f)).collect();
            if found.len() >= n {
                return found;
            }
            if Instant::now() >= deadline {
                let flows = self.flows();
                let tail: Vec<String> = flows.iter().rev().take(30).map(Value::to_string).collect();
                panic!(
                    "not {n} flows {what} within {timeout:?}; {} flows seen, latest:\n{}\nagent stderr:\n{}",
                    flows.len(),
                    tail.join("\n"),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `signal` and waits for exit; returns the exit status.
    pub(crate) fn stop_with(&mut self, signal: i32, timeout: Duration) -> ExitStatus {
        let child = self.child.take().expect("agent running");
        signal_and_wait(child, signal, timeout, || self.stderr())
    }
}

/// Sends `signal` to an agent this test started and waits (up to `timeout`) for its exit
/// status; past that, kills it and panics with its stderr.
pub(crate) fn signal_and_wait(
    mut child: Child,
    signal: i32,
    timeout: Duration,
    stderr: impl Fn() -> String,
) -> ExitStatus {
    // SAFETY: signalling our own child, not yet reaped.
    unsafe { libc::kill(child.id().cast_signed(), signal) };
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("agent did not exit within {timeout:?} of signal {signal}:\n{}", stderr());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Flow field helpers for assertions.
/// `hopwatch observe --all -o json <args>` against `collector`: the flows it printed.
pub(crate) fn observe(collector: &str, args: &[&str]) -> Vec<Value> {
    let out = Command::new(BIN)
        .args(["observe", "--server", collector, "--all", "-o", "json"])
        .args(args)
        .output()
        .expect("run hopwatch observe");
    assert!(out.status.success(), "observe {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok()?.get("flow").cloned())
        .collect()
}

/// An L7 flow of `protocol` measured at `direction` (EGRESS: client side, INGRESS: server side)
/// between two pods, whose record satisfies `pred`.
pub(crate) fn exchange<'a>(
    protocol: &'a str,
    direction: &'a str,
    client: &'a super::Pod,
    server: &'a super::Pod,
    pred: impl Fn(&Value) -> bool + 'a,
) -> impl Fn(&Value) -> bool + 'a {
    move |f| {
        f["Type"] == "L7"
            && f["l7"]["protocol"] == protocol
            && f["traffic_direction"] == direction
            && ip_src(f) == client.ip.to_string()
            && ip_dst(f) == server.ip.to_string()
            && pred(&f["l7"][protocol])
    }
}

pub(crate) fn ip_src(f: &Value) -> &str {
    f["IP"]["source"].as_str().unwrap_or("")
}
pub(crate) fn ip_dst(f: &Value) -> &str {
    f["IP"]["destination"].as_str().unwrap_or("")
}
pub(crate) fn socket_event(f: &Value) -> &str {
    f["socket_event"].as_str().unwrap_or("")
}
pub(crate) fn tcp_port(f: &Value, which: &str) -> u64 {
    f["l4"]["TCP"][which].as_u64().unwrap_or(0)
}
pub(crate) fn u64_at(f: &Value, path: &[&str]) -> u64 {
    let mut v = f;
    for p in path {
        v = &v[*p];
    }
    v.as_u64().unwrap_or(0)
}

#[path = "../../shared/capture.rs"]
mod capture;
pub(crate) use self::capture::capture_stderr;
