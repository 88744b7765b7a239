//! The agent under stress and faults: connection and SYN floods, a ring buffer too small for the
//! load, SIGKILL and restart, traced servers that reload or restart. Every test asserts what a
//! user would see (flows, `lost_events` lines, `/metrics`), with the agent's memory measured
//! from outside, and is bounded in count and time.
//!
//! Floods produce far more flows than a test should hold, so the agent here is a
//! [`CountingAgent`]: it reads `hopwatch agent -o json` as it comes, sums every `lost_events`
//! line, and counts the flow lines a classifier picks (by substring: parsing every line would
//! cost the test more CPU than the agent), keeping only the few the test asks for.

mod floods;
mod restarts;
mod ringbuf;

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::support::{
    Pod,
    agent::{BIN, capture_stderr, signal_and_wait},
};

/// What a classifier makes of one flow line: its class, and whether to keep it parsed.
pub(crate) type Verdict = Option<(&'static str, bool)>;

/// Picks the flow lines a test counts (by substring; see the module comment).
pub(crate) type Classifier = Box<dyn Fn(&str) -> Verdict + Send>;

/// What the agent printed so far, summed.
#[derive(Debug, Default, Clone)]
pub(crate) struct Tally {
    pub lines: u64,
    /// `num_events_lost` summed by `source` (`PERF_EVENT_RING_BUFFER`, ...).
    pub lost: BTreeMap<String, u64>,
    /// Lines per class.
    pub classes: BTreeMap<&'static str, u64>,
    /// The flows the classifier asked to keep.
    pub kept: Vec<Value>,
}

impl Tally {
    pub(crate) fn class(&self, name: &str) -> u64 {
        self.classes.get(name).copied().unwrap_or(0)
    }

    pub(crate) fn lost(&self, source: &str) -> u64 {
        self.lost.get(source).copied().unwrap_or(0)
    }

    pub(crate) fn lost_total(&self) -> u64 {
        self.lost.values().sum()
    }
}

/// `hopwatch agent -o json` with its output counted rather than kept.
pub(crate) struct CountingAgent {
    child: Option<Child>,
    pub pid: u32,
    tally: Arc<Mutex<Tally>>,
    stderr: Arc<Mutex<String>>,
}

impl CountingAgent {
    /// Starts the agent with `extra` arguments and waits until its hooks are attached and its
    /// metrics are served.
    pub(crate) fn start(extra: &[&str], classify: Classifier) -> Self {
        let mut child = Command::new(BIN)
            .args(["agent", "-o", "json", "--node-name", "e2e-node"])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start hopwatch");
        let pid = child.id();
        let tally = Arc::new(Mutex::new(Tally::default()));
        let out = child.stdout.take().expect("piped");
        std::thread::spawn({
            let tally = tally.clone();
            move || count_lines(out, &classify, &tally)
        });
        let stderr = capture_stderr(&mut child);
        let mut agent = Self { child: Some(child), pid, tally, stderr };
        agent.wait_for_stderr("hopwatch agent: hooks", Duration::from_secs(30));
        agent.wait_for_stderr("metrics on http://", Duration::from_secs(10));
        agent
    }

    pub(crate) fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until stderr holds `text`; panics with stderr if the agent exits or time runs out.
    pub(crate) fn wait_for_stderr(&mut self, text: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.stderr().contains(text) {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().expect("wait")) {
                panic!("agent exited ({status}) before printing {text:?}:\n{}", self.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "agent did not print {text:?} within {timeout:?}:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Panics with stderr if the agent has exited.
    pub(crate) fn assert_running(&mut self) {
        if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().expect("wait")) {
            panic!("the agent exited ({status}):\n{}", self.stderr());
        }
    }

    pub(crate) fn tally(&self) -> Tally {
        self.tally.lock().unwrap().clone()
    }

    /// The agent's anonymous resident memory now (KiB, [`rss_kib`]).
    pub(crate) fn rss_kib(&self) -> u64 {
        rss_kib(self.pid).unwrap_or_else(|| panic!("the agent is gone:\n{}", self.stderr()))
    }

    /// Where the agent serves `/metrics`.
    pub(crate) fn metrics_addr(&self) -> SocketAddr {
        self.stderr()
            .lines()
            .find_map(|l| l.split("metrics on http://").nth(1)?.split('/').next()?.parse().ok())
            .expect("the agent printed its metrics address")
    }

    /// The `/metrics` exposition now.
    pub(crate) fn scrape(&self) -> Metrics {
        Metrics(http_get(self.metrics_addr(), "/metrics"))
    }

    /// Waits until the flows the classifier counts stop growing and the agent's accounting
    /// closes in one look: every event the kernel put in the ring buffer was read, and each
    /// loss in `/metrics` was also printed as a `lost_events` line. Other processes on the host
    /// keep the agent's totals moving a little, so this is a moment the agent has caught up,
    /// not a standstill. Returns that moment's scrape and tally; panics with the last ones.
    pub(crate) fn settle(&self, timeout: Duration) -> (Metrics, Tally) {
        let deadline = Instant::now() + timeout;
        let mut last_classes = self.tally().classes;
        // Two looks in a row with the accounting closed and the flows unchanged: a single one
        // can come before the agent printed anything (flows wait up to 250 ms for their
        // address translation; a loaded machine delays the printer further).
        let mut closed_before = false;
        loop {
            std::thread::sleep(Duration::from_millis(500));
            let m = self.scrape();
            let t = self.tally();
            let still = t.classes == last_classes;
            last_classes.clone_from(&t.classes);
            let off = accounting_gaps(&m, &t);
            let closed = off.is_empty();
            if still && closed && closed_before {
                return (m, t);
            }
            closed_before = closed;
            assert!(
                Instant::now() < deadline,
                "the agent's accounting did not close within {timeout:?}: {off:?} (classes \
                 {:?}, lost lines {:?})\n{}",
                t.classes,
                t.lost,
                self.stderr()
            );
        }
    }

    /// Sends `signal` and waits (up to `timeout`) for the exit status.
    pub(crate) fn stop_with(&mut self, signal: i32, timeout: Duration) -> ExitStatus {
        let child = self.child.take().expect("agent running");
        signal_and_wait(child, signal, timeout, || self.stderr())
    }
}

impl Drop for CountingAgent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn count_lines(out: impl std::io::Read, classify: &Classifier, tally: &Mutex<Tally>) {
    for line in BufReader::with_capacity(1 << 20, out).lines().map_while(Result::ok) {
        let lost = line.starts_with("{\"lost_events\"").then(|| {
            let v: Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("agent printed non-JSON {line:?}: {e}"));
            let l = &v["lost_events"];
            let source = l["source"].as_str().unwrap_or("UNKNOWN").to_owned();
            (source, l["num_events_lost"].as_u64().expect("num_events_lost is a number"))
        });
        let verdict = if lost.is_none() { classify(&line) } else { None };
        let kept = verdict.filter(|(_, keep)| *keep).map(|_| {
            let v: Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("agent printed non-JSON {line:?}: {e}"));
            v["flow"].clone()
        });
        let mut t = tally.lock().unwrap();
        t.lines += 1;
        if let Some((source, n)) = lost {
            *t.lost.entry(source).or_default() += n;
        }
        if let Some((class, _)) = verdict {
            *t.classes.entry(class).or_default() += 1;
        }
        t.kept.extend(kept);
    }
}

/// A `/metrics` exposition.
#[derive(Debug, Clone)]
pub(crate) struct Metrics(pub String);

impl Metrics {
    /// The value of `name` in the series whose labels include `labels` (summed over the series
    /// that match); 0 when there is none.
    pub(crate) fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                let (n, rest) = series.split_once('{').unwrap_or((series, "}"));
                (n == name).then_some(())?;
                let matches = labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
                matches.then(|| value.parse::<f64>().ok())?
            })
            .sum()
    }

    /// A counter as an integer.
    pub(crate) fn count(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let v = self.value(name, labels);
        assert!(v >= 0.0 && v.fract() == 0.0, "{name} {labels:?} is not a count: {v}");
        #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "checked")]
        let n = v as u64;
        n
    }

    /// A kernel counter (`hopwatch_kernel_events_total{event}`).
    pub(crate) fn kernel(&self, event: &str) -> u64 {
        self.count("hopwatch_kernel_events_total", &[("event", event)])
    }

    /// `hopwatch_lost_events_total{source}`.
    pub(crate) fn lost(&self, source: &str) -> u64 {
        self.count("hopwatch_lost_events_total", &[("source", source)])
    }
}

/// The agent's accounting identities that do not hold in `m` and `t` (empty when all do).
pub(crate) fn accounting_gaps(m: &Metrics, t: &Tally) -> Vec<String> {
    let sent = m.kernel("events_sent");
    let read = m.count("hopwatch_events_read_total", &[("source", "kernel_ring_buffer")]);
    let full = m.kernel("ringbuf_full");
    let mut gaps = Vec::new();
    // events_sent counts the events put in the ring buffer; ringbuf_full those that did not fit.
    if sent != read {
        gaps.push(format!("events_sent {sent} != read {read} (ringbuf_full {full})"));
    }
    if m.lost("kernel_ring_buffer") != full {
        gaps.push(format!(
            "lost{{kernel_ring_buffer}} {} != ringbuf_full {full}",
            m.lost("kernel_ring_buffer")
        ));
    }
    if t.lost("PERF_EVENT_RING_BUFFER") != full {
        gaps.push(format!(
            "ring buffer lost_events lines {} != ringbuf_full {full}",
            t.lost("PERF_EVENT_RING_BUFFER")
        ));
    }
    if t.lost("OBSERVER_EVENTS_QUEUE") != m.lost("output_queue") {
        gaps.push(format!(
            "output queue lost_events lines {} != lost{{output_queue}} {}",
            t.lost("OBSERVER_EVENTS_QUEUE"),
            m.lost("output_queue")
        ));
    }
    gaps
}

/// `GET path` on loopback; the body. Panics on failure.
pub(crate) fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("cannot reach {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").expect("send");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read the answer");
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    assert!(head.starts_with("HTTP/1.1 200"), "GET {path}: {head}");
    body.to_owned()
}

/// Memory `pid` allocated and touched (KiB, `RssAnon`: heap, stacks), `None` once it is gone.
/// The file-backed part of the resident set is left out: the tests run the unoptimised,
/// unstripped binary, whose mapped text alone is tens of MiB a release build does not have.
pub(crate) fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("RssAnon:")?.split_whitespace().next()?.parse().ok())
}

/// Samples `pid`'s anonymous resident memory ([`rss_kib`]) every 100 ms until dropped; keeps
/// the peak.
pub(crate) struct RssSampler {
    peak: Arc<Mutex<u64>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    pub(crate) fn start(pid: u32) -> Self {
        let peak = Arc::new(Mutex::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = std::thread::spawn({
            let (peak, stop) = (peak.clone(), stop.clone());
            move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Some(kib) = rss_kib(pid) {
                        let mut p = peak.lock().unwrap();
                        *p = (*p).max(kib);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        });
        Self { peak, stop, thread: Some(thread) }
    }

    /// The highest resident memory seen (KiB).
    pub(crate) fn peak_kib(&self) -> u64 {
        *self.peak.lock().unwrap()
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs `f` on a new thread inside `pod`'s network namespace (setns affects only that thread).
pub(crate) fn in_netns<T: Send + 'static>(
    pod: &Pod,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = pod.netns_path();
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: setns on a valid namespace fd; it changes only this thread's namespace.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
        f()
    })
}

pub(crate) const MIB: u64 = 1024;
