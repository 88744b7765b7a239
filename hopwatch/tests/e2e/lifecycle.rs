//! The agent's life: the probe, bad input, missing privileges, and leaving nothing behind after
//! SIGINT or SIGKILL.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use crate::support::{
    Testbed,
    agent::{Agent, BIN},
    require_root, serial,
};

/// hopwatch's program names as the kernel keeps them (truncated to 15 bytes).
const PROGRAM_NAMES: [&str; 6] = [
    "inet_sock_set_s",
    "tcp_retransmit_",
    "tcp_send_reset",
    "tcp_receive_res",
    "kfree_skb",
    "hopwatch_sockop",
];

fn our_programs() -> usize {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str().is_some_and(|n| PROGRAM_NAMES.contains(&n)))
        .count()
}

fn wait_until_unloaded(what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while our_programs() > 0 {
        assert!(
            Instant::now() < deadline,
            "{} hopwatch programs still loaded after {what}",
            our_programs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn assert_no_pins() {
    if let Ok(dir) = std::fs::read_dir("/sys/fs/bpf") {
        let pins: Vec<String> = dir
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("hopwatch"))
            .collect();
        assert!(pins.is_empty(), "pins left behind: {pins:?}");
    }
}

#[test]
fn probe_prints_one_line_per_capability() {
    let _serial = serial();
    require_root();
    let out = Command::new(BIN).args(["agent", "--probe"]).output().expect("run probe");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "probe failed: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    for check in [
        "privileges",
        "btf",
        "tracefs",
        "cgroup v2",
        "ringbuf",
        "tracepoint",
        "tp_btf",
        "sock_ops",
        "kprobe",
        "fentry",
    ] {
        assert!(
            stdout.lines().any(|l| l.trim_start().starts_with(check)),
            "no {check} line in:\n{stdout}"
        );
    }
    assert_eq!(our_programs(), 0, "--probe must not leave programs loaded");
}

#[test]
fn sigint_exits_zero_and_leaves_nothing_behind() {
    let _serial = serial();
    require_root();
    assert_eq!(our_programs(), 0, "another hopwatch agent is running on this host; stop it first");
    let mut agent = Agent::start(&[]);
    assert!(our_programs() >= 6, "expected all programs loaded, found {}", our_programs());
    let status = agent.stop_with(libc::SIGINT, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "exit status after SIGINT: {status}\n{}", agent.stderr());
    assert!(agent.stderr().contains("shutting down"), "{}", agent.stderr());
    wait_until_unloaded("SIGINT");
    assert_no_pins();
}

#[test]
fn sigkill_leaves_nothing_behind() {
    let _serial = serial();
    require_root();
    assert_eq!(our_programs(), 0, "another hopwatch agent is running on this host; stop it first");
    let mut agent = Agent::start(&[]);
    agent.stop_with(libc::SIGKILL, Duration::from_secs(10));
    // Every attachment is a BPF link held by the process: the kernel drops them with its fds.
    wait_until_unloaded("SIGKILL");
    assert_no_pins();
}

#[test]
fn bad_flags_exit_2_naming_the_flag() {
    let out = Command::new(BIN).args(["agent", "--output", "xml"]).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--output") && err.contains("xml"), "{err}");
    let out = Command::new(BIN).args(["agent", "--ringbuf-bytes", "1000"]).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--ringbuf-bytes"));
}

#[test]
fn unknown_drop_reason_is_a_one_line_error() {
    let _serial = serial();
    require_root();
    let out =
        Command::new(BIN).args(["agent", "--drop-ignore", "NOT_A_REASON"]).output().expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("hopwatch: error: ")
            && last.contains("NOT_A_REASON")
            && last.contains("NETFILTER_DROP"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(our_programs(), 0);
}

#[test]
fn without_privileges_the_agent_names_the_fix() {
    let _serial = serial();
    require_root();
    // Drop to nobody with no capabilities, as an unprivileged user would run it.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", BIN, "agent"])
        .output()
        .expect("setpriv (util-linux) is installed");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or_default();
    assert!(last.contains("privileges") && last.contains("run as root"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_full_ring_buffer_is_counted_and_reported_not_fatal() {
    use crate::support::{Testbed, peers};
    let _serial = serial();
    let mut tb = Testbed::new();
    let (a, b) = (tb.pod("burst"), tb.pod("srv"));
    // 4 KiB holds about twenty events; a burst of connections overflows it.
    let mut agent = Agent::start(&["--ringbuf-bytes", "4096"]);
    peers::server(&mut tb, &b, b.ip.into(), 6000, 1);
    let script = format!(
        "import socket\nfor _ in range(300):\n    s=socket.create_connection(('{}',6000))\n    s.shutdown(socket.SHUT_WR)\n    s.recv(10)\n    s.close()\n",
        b.ip
    );
    a.exec(&["python3", "-c", &script]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let lost = loop {
        let lost: u64 = agent
            .lines()
            .iter()
            .filter(|l| l["lost_events"]["source"] == "PERF_EVENT_RING_BUFFER")
            .filter_map(|l| l["lost_events"]["num_events_lost"].as_u64())
            .sum();
        if lost > 0 || Instant::now() > deadline {
            break lost;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        lost > 0,
        "no lost_events notice after overflowing a 4 KiB ring buffer:\n{}",
        agent.stderr()
    );
    assert!(agent.stderr().contains("events lost"), "{}", agent.stderr());
    // Still alive and still tracing after the overflow.
    let client = peers::client(&a, b.ip.into(), 6000, 5, Duration::from_secs(5), Duration::ZERO);
    let port = client.local_port();
    agent.wait_for("a flow after the overflow", Duration::from_secs(10), |f| {
        f["socket_event"] == "CLOSE" && f["l4"]["TCP"]["source_port"] == port
    });
    let status = agent.stop_with(libc::SIGINT, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
}

/// An optional part that cannot start (here: the Docker API socket is missing) is one line on
/// stderr and a 0 in `hopwatch_capability_up` with the reason; the agent runs without it and
/// still reports connections (here a refused one).
#[test]
fn a_missing_optional_part_is_reported_once_and_the_agent_runs_without_it() {
    let _serial = serial();
    let mut tb = Testbed::new();
    let (client, server) = (tb.pod("client"), tb.pod("server"));
    let agent = Agent::start(&["--docker-socket", "/nonexistent/docker.sock"]);
    // The capability lines come before the metrics line.
    let metrics_addr = agent.metrics_addr();
    let err = agent.stderr();
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("docker: unavailable")).collect();
    assert_eq!(lines.len(), 1, "one line about Docker:\n{err}");
    assert!(lines[0].contains("/nonexistent/docker.sock"), "names the socket: {}", lines[0]);
    let metrics = crate::hardening::http_get(metrics_addr, "/metrics");
    let gauge = |cap: &str, up: &str| {
        metrics.lines().any(|l| {
            l.starts_with(&format!("hopwatch_capability_up{{capability=\"{cap}\",detail=\""))
                && l.ends_with(&format!("}} {up}"))
        })
    };
    assert!(gauge("docker", "0"), "Docker reported down in /metrics:\n{metrics}");
    assert!(gauge("tcp", "1"), "TCP reported up in /metrics:\n{metrics}");
    assert!(
        metrics.lines().any(|l| l.starts_with("hopwatch_capability_up{capability=\"docker\"")
            && l.contains("no Docker API socket at /nonexistent/docker.sock")),
        "the reason is in the detail label:\n{metrics}"
    );
    let script = format!("import socket\nsocket.socket().connect_ex(('{}', 9))", server.ip);
    client.exec(&["python3", "-c", &script]);
    agent.wait_for("the refused connect", Duration::from_secs(15), |f| {
        f["socket_event"] == "CONNECT_FAILED" && f["IP"]["destination"] == server.ip.to_string()
    });
}
