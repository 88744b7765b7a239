//! A real `hopwatch agent` (root: it loads eBPF programs) delivering kernel flows to a collector
//! process, and to its own in-process collector, read back with `hopwatch observe`.

use std::{
    net::TcpStream,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hopwatch_proto::{
    flow::{FlowFilter, SocketEvent, Verdict},
    observer::{GetFlowsRequest, get_flows_response::ResponseTypes},
};

use super::support::{capture::capture, *};

fn require_root() {
    let uid = uid();
    assert_eq!(uid, 0, "this test loads eBPF programs: run it as root (cargo xtask test does)");
}

fn uid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("Uid line in /proc/self/status")
}

struct Agent {
    child: Child,
    stderr: Arc<Mutex<String>>,
    /// What the agent printed, when started with [`Agent::printing`].
    stdout: Option<Arc<Mutex<String>>>,
}

impl Agent {
    fn start(args: &[&str]) -> Self {
        Self::spawn(args, false)
    }

    /// An agent whose stdout (its printed flows) is kept.
    fn printing(args: &[&str]) -> Self {
        Self::spawn(args, true)
    }

    fn spawn(args: &[&str], keep_stdout: bool) -> Self {
        let mut child = Command::new(BIN)
            .arg("agent")
            .args(args)
            .stdout(if keep_stdout { Stdio::piped() } else { Stdio::null() })
            .stderr(Stdio::piped())
            .spawn()
            .expect("start hopwatch agent");
        let stderr = capture_stderr(&mut child);
        let stdout = child.stdout.take().map(capture);
        let mut a = Self { child, stderr, stdout };
        let deadline = Instant::now() + Duration::from_mins(1);
        while !a.stderr().contains("hopwatch agent: hooks") {
            if let Some(status) = a.child.try_wait().unwrap() {
                panic!("agent exited ({status}):\n{}", a.stderr());
            }
            assert!(Instant::now() < deadline, "agent not ready after 60s:\n{}", a.stderr());
            std::thread::sleep(Duration::from_millis(50));
        }
        a
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until the agent says its in-process collector serves on `port`.
    fn wait_for_collector(&self, port: u16) {
        let ready = format!("collector APIs on 127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.stderr().contains(&ready) {
            assert!(Instant::now() < deadline, "no in-process collector:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let pid = i32::try_from(self.child.id()).unwrap();
        // SAFETY: signalling a child we started and have not reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// A connection refused on loopback: the kernel reports a failed connect to `port`.
fn refused_connect(port: u16) {
    let err = TcpStream::connect(("127.0.0.1", port)).expect_err("nothing listens there");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_agent_streams_kernel_flows_to_a_collector_process() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let collector = Collector::start(free_port(), dir.path(), &[]);
    let agent = Agent::start(&[
        "--collector",
        &collector.url(),
        "--node-name",
        "coll-e2e",
        "--batch-interval",
        "20ms",
    ]);
    let closed = free_port();
    let started = Instant::now();
    refused_connect(closed);
    let req = GetFlowsRequest {
        whitelist: vec![FlowFilter {
            destination_port: vec![closed.to_string()],
            node_name: vec!["coll-e2e".into()],
            ..Default::default()
        }],
        ..Default::default()
    };
    let mut found = None;
    while found.is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no flow at the collector:\n{}",
            agent.stderr()
        );
        let mut c = client(&collector.url()).await.expect("collector up");
        let mut s = c.get_flows(req.clone()).await.unwrap().into_inner();
        while let Some(r) = s.message().await.unwrap() {
            if let Some(ResponseTypes::Flow(f)) = r.response_types
                && f.socket_event() == SocketEvent::ConnectFailed
            {
                found = Some(f);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let f = found.unwrap();
    assert_eq!(f.verdict(), Verdict::Error);
    assert_eq!(f.node_name, "coll-e2e");
    assert_eq!(f.tcp_stats.unwrap().error, "ECONNREFUSED");
    let nodes = client(&collector.url())
        .await
        .unwrap()
        .get_nodes(hopwatch_proto::observer::GetNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes;
    let node = nodes.iter().find(|n| n.name == "coll-e2e").expect("the agent's node is listed");
    assert_eq!(node.state(), hopwatch_proto::relay::NodeState::NodeConnected);
    assert!(node.version.starts_with("hopwatch "));
}

#[test]
fn the_agent_serves_its_own_flows_to_observe_by_default() {
    require_root();
    let port = free_port();
    let agent =
        Agent::start(&["--listen", &format!("127.0.0.1:{port}"), "--node-name", "embedded-e2e"]);
    agent.wait_for_collector(port);
    let closed = free_port();
    refused_connect(closed);
    let started = Instant::now();
    loop {
        let out = Command::new(BIN)
            .args([
                "observe",
                "--server",
                &format!("127.0.0.1:{port}"),
                "--to-port",
                &closed.to_string(),
            ])
            .args(["--verdict", "ERROR", "-o", "json", "--all"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if let Some(l) = lines.iter().find(|l| l["flow"]["socket_event"] == "CONNECT_FAILED") {
            assert_eq!(l["flow"]["node_name"], "embedded-e2e");
            assert_eq!(l["flow"]["l4"]["TCP"]["destination_port"], u64::from(closed));
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no flow from observe:\n{}",
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One printer: the same flows read the same in the agent's own `-o json` and through
/// `observe -o json` (summary included), and `observe`'s compact lines carry what the agent's
/// do for TCP flows: the errno of a failed connect, a connection's duration, bytes and RTT.
#[test]
fn agent_and_observe_print_the_same_flows_the_same_way() {
    require_root();
    let port = free_port();
    let agent = Agent::printing(&[
        "-o",
        "json",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--node-name",
        "printer-e2e",
    ]);
    agent.wait_for_collector(port);
    // A refused connect and a connection that carries bytes and closes.
    let closed = free_port();
    refused_connect(closed);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let open = listener.local_addr().unwrap().port();
    {
        use std::io::{Read as _, Write as _};
        let mut c = TcpStream::connect(("127.0.0.1", open)).unwrap();
        let (mut s, _) = listener.accept().unwrap();
        c.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).unwrap();
        s.write_all(b"pong!").unwrap();
        c.read_exact(&mut [0u8; 5]).unwrap();
    }
    let observe = |format: &str, to_port: u16| {
        let out = Command::new(BIN)
            .args(["observe", "--server", &format!("127.0.0.1:{port}")])
            .args(["--to-port", &to_port.to_string(), "-o", format, "--all"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let to = |line: &str, port: u16| {
        let v: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
        v["flow"]["l4"]["TCP"]["destination_port"] == u64::from(port)
    };
    let started = Instant::now();
    let (printed, queried) = loop {
        let printed: Vec<String> = agent
            .stdout
            .as_ref()
            .unwrap()
            .lock()
            .unwrap()
            .lines()
            .filter(|l| to(l, closed) || to(l, open))
            .map(str::to_owned)
            .collect();
        let mut queried: Vec<String> = observe("json", closed).lines().map(str::to_owned).collect();
        queried.extend(observe("json", open).lines().map(str::to_owned));
        let has_close = printed.iter().any(|l| l.contains("\"CLOSE\""));
        if has_close && printed.iter().any(|l| l.contains("CONNECT_FAILED")) {
            // The collector has what was printed (it may have more: flows still queued for the
            // printer are not compared).
            if printed.iter().all(|l| queried.contains(l)) {
                break (printed, queried);
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "flows missing; printed:\n{}\nqueried:\n{}\nagent:\n{}",
            printed.join("\n"),
            queried.join("\n"),
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(printed.len() >= 3, "connect failed, connect, close: {printed:?}");
    for line in &printed {
        assert!(queried.contains(line), "observe -o json differs from the agent's:\n{line}");
        assert!(line.contains("\"Summary\":"), "no summary: {line}");
    }
    // Compact lines from observe: the answers users come for.
    let refused = observe("compact", closed);
    assert!(refused.contains("tcp-connect-failed ERROR connect failed ECONNREFUSED"), "{refused}");
    let to_open = observe("compact", open);
    let close = to_open.lines().find(|l| l.contains("tcp-close")).expect("a close line");
    assert!(close.contains("close after"), "{close}");
    assert!(
        close.contains("sent 4B received 5B") || close.contains("sent 5B received 4B"),
        "{close}"
    );
    assert!(close.contains("srtt "), "{close}");
}

/// Flows of this test among whatever else the machine does: ports it chose.
fn ours(v: &serde_json::Value, http: u16, udp: u16) -> bool {
    let f = &v["flow"];
    let ports = [&f["l4"]["TCP"], &f["l4"]["UDP"]];
    ports.iter().any(|p| {
        p["destination_port"] == u64::from(http)
            || p["source_port"] == u64::from(http)
            || p["destination_port"] == u64::from(udp)
    })
}

/// The Hubble flags whose fields a real agent fills, against its own kernel flows (an HTTP
/// exchange with a W3C traceparent and an x-request-id, and a UDP datagram the kernel drops
/// for want of a socket), through its in-process collector and through a recording of them read
/// back with `--input-file`.
#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, flag by flag")]
fn hubble_flags_select_a_real_agent_s_flows() {
    use std::io::{Read as _, Write as _};

    use super::flag_cases::{TRACE, run};

    require_root();
    let port = free_port();
    let agent =
        Agent::start(&["--listen", &format!("127.0.0.1:{port}"), "--node-name", "flags-e2e"]);
    agent.wait_for_collector(port);
    let server = ["--server".to_owned(), format!("127.0.0.1:{port}")];
    // An HTTP exchange answered 503.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let http = listener.local_addr().unwrap().port();
    let srv = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 1024];
        let mut got = Vec::new();
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "request cut short");
            got.extend_from_slice(&buf[..n]);
        }
        s.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n").unwrap();
        let _ = s.read(&mut buf);
    });
    {
        let mut c = TcpStream::connect(("127.0.0.1", http)).unwrap();
        let req = format!(
            "GET /api/v1/users?id=3 HTTP/1.1\r\nHost: api\r\nX-Request-ID: r-9\r\n\
             traceparent: 00-{TRACE}-00f067aa0ba902b7-01\r\n\r\n"
        );
        c.write_all(req.as_bytes()).unwrap();
        let mut resp = [0u8; 256];
        let n = c.read(&mut resp).unwrap();
        assert!(resp[..n].starts_with(b"HTTP/1.1 503"));
    }
    srv.join().unwrap();
    // A datagram to a closed UDP port.
    let udp = free_port();
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.send_to(b"hopwatch", ("127.0.0.1", udp)).unwrap();

    let query = |source: &[String], args: &[&str]| -> Vec<serde_json::Value> {
        let args: Vec<String> = args.iter().map(|&a| a.to_owned()).collect();
        let json = ["-o", "json", "--all", "-s"].map(String::from);
        let (code, out, err) = run(&[source, &args[..], &json[..]].concat(), None);
        assert_eq!(code, Some(0), "{args:?}: {err}");
        out.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| ours(v, http, udp))
            .collect()
    };
    let is_l7 = |v: &serde_json::Value| v["flow"]["l7"]["http"].is_object();
    let is_drop = |v: &serde_json::Value| v["flow"]["verdict"] == "DROPPED";
    let started = Instant::now();
    let mine = loop {
        let mine = query(&server, &[]);
        if mine.iter().any(is_l7) && mine.iter().any(is_drop) {
            break mine;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no HTTP and drop flows: {mine:?}\n{}",
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let uuid = |v: &serde_json::Value| v["flow"]["uuid"].as_str().unwrap().to_owned();
    let set = |pred: &dyn Fn(&serde_json::Value) -> bool| -> Vec<String> {
        let mut s: Vec<String> = mine.iter().filter(|v| pred(v)).map(uuid).collect();
        s.sort();
        s
    };
    let l7 = set(&is_l7);
    let drops = set(&is_drop);
    let all = set(&|_| true);
    let none = Vec::<String>::new();
    let drop = mine.iter().find(|v| is_drop(v)).unwrap();
    assert_eq!(drop["flow"]["kernel_drop_reason"], "NO_SOCKET", "{drop}");
    let l7_flow = mine.iter().find(|v| is_l7(v)).unwrap();
    assert_eq!(l7_flow["flow"]["trace_context"]["parent"]["trace_id"], TRACE, "{l7_flow}");
    let ifindex = drop["flow"]["interface"]["index"].as_u64().expect("the drop's interface");
    let ifindex = ifindex.to_string();
    let not_drops: Vec<String> = all.iter().filter(|u| !drops.contains(u)).cloned().collect();
    // The agent derives TCP flags from socket events: SYN for a handshake, FIN for a clean close.
    let event = |v: &serde_json::Value, names: &[&str]| {
        names.iter().any(|n| v["flow"]["socket_event"] == *n)
    };
    let handshakes = set(&|v| event(v, &["CONNECT", "ACCEPT", "CONNECT_FAILED"]));
    let closes = set(&|v| event(v, &["CLOSE"]));
    assert!(!handshakes.is_empty() && !closes.is_empty(), "{mine:?}");

    // The recording, replayed through --input-file.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.json");
    let (_, recorded, _) =
        run(&[&server[..], &["-o", "json", "--all"].map(String::from)].concat(), None);
    std::fs::write(&file, recorded).unwrap();
    let from_file = ["--input-file".to_owned(), file.display().to_string()];

    let cases: Vec<(Vec<&str>, &Vec<String>)> = vec![
        (vec!["--trace-id", TRACE], &l7),
        (vec!["--http-header", "x-request-id:r-9"], &l7),
        // The agent keeps no query string unless told to keep full statements.
        (vec!["--http-url", "^http://api/api/v1/users$"], &l7),
        (vec!["--http-url", r"\?id=3"], &none),
        (vec!["--http-status", "503", "--http-method", "get"], &l7),
        (vec!["--cel-expression", "_flow.l7.http.code == 503"], &l7),
        (vec!["--drop-reason-desc", "NO_SOCKET"], &drops),
        (vec!["--not", "--drop-reason-desc", "no_socket"], &not_drops),
        (vec!["--allowlist", r#"{"kernel_drop_reason":["NO_SOCKET"]}"#], &drops),
        (vec!["--denylist", r#"{"verdict":["DROPPED"]}"#], &not_drops),
        (vec!["--interface", &ifindex], &drops),
        (vec!["--ipv4"], &all),
        (vec!["-4", "-6"], &all),
        (vec!["--ipv6"], &none),
        (vec!["--tcp-flags", "syn"], &handshakes),
        (vec!["--tcp-flags", "fin"], &closes),
        (vec!["--tcp-flags", "syn,fin"], &none),
        // No Kubernetes here: no pods, workloads or node labels.
        (vec!["-A"], &none),
        (vec!["--workload", "api"], &none),
        (vec!["--node-label", "zone=a"], &none),
    ];
    for (args, want) in &cases {
        for source in [&server[..], &from_file[..]] {
            let mut got: Vec<String> = query(source, args).iter().map(uuid).collect();
            got.sort();
            assert_eq!(&got, *want, "{args:?} from {source:?}; this test's flows: {mine:#?}");
        }
    }
    // --field-mask: only the asked fields (the ports are masked away: the flows are told apart
    // by uuid); --numeric: addresses.
    for source in [&server[..], &from_file[..]] {
        let args =
            ["--trace-id", TRACE, "--field-mask", "uuid,l7.http.code", "-o", "json", "--all"];
        let (code, out, err) = run(&[source, &args.map(String::from)[..]].concat(), None);
        assert_eq!(code, Some(0), "{err}");
        let masked: Vec<serde_json::Value> =
            out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let masked: Vec<&serde_json::Value> =
            masked.iter().filter(|v| l7.contains(&uuid(v))).collect();
        assert_eq!(masked.len(), l7.len(), "{out}");
        for v in masked {
            assert_eq!(v["flow"]["l7"], serde_json::json!({"http": {"code": 503}}), "{v}");
            assert_eq!(v["flow"].as_object().unwrap().len(), 2, "{v}");
        }
    }
    let (code, compact, err) = run(
        &[&server[..], &["--all", "--numeric", "--trace-id", TRACE].map(String::from)].concat(),
        None,
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(compact.contains(&format!("127.0.0.1:{http}")), "{compact}");
    assert!(compact.contains("http-"), "{compact}");
}
