//! Identity end to end: Service translation behind kube-proxy-style DNAT, containers named by
//! their cgroups, Kubernetes metadata served by a test API server, the static endpoints file, and
//! the deployment manifests.

mod cgroups;
mod deploy;
mod dnat;
mod kube;
mod kubeapi;
mod static_file;

use std::{
    io::{BufRead as _, BufReader},
    net::IpAddr,
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::support::{Pod, Testbed, agent::Agent};

/// Waits until the agent's identity layer has started (it starts after the hooks attach).
pub(crate) fn wait_identity(agent: &Agent) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let err = agent.stderr();
        if let Some(line) = err.lines().find(|l| l.contains("hopwatch agent: identity:")) {
            return line.to_owned();
        }
        assert!(Instant::now() < deadline, "identity layer not started after 30s:\n{err}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Accepts connections on `port` in `pod`, reads each to EOF, and records each peer as
/// `ip:port` — the ground truth of which backend a connection reached.
const ACCEPT_LOGGER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(256)
print("ready", flush=True)
while True:
    c, peer = s.accept()
    print(f"{peer[0]}:{peer[1]}", flush=True)
    while c.recv(65536): pass
    c.close()
"#;

/// Peers (`ip:port`) a server saw, filled as they connect.
pub(crate) type Peers = Arc<Mutex<Vec<String>>>;

pub(crate) fn accept_logger(tb: &mut Testbed, pod: &Pod, port: u16) -> Peers {
    let mut child = pod
        .command(&["python3", "-c", ACCEPT_LOGGER, &port.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 is installed (`cargo xtask test` installs it)");
    let mut out = BufReader::new(child.stdout.take().expect("piped"));
    let mut line = String::new();
    out.read_line(&mut line).expect("server prints ready");
    assert_eq!(line.trim(), "ready", "accept logger in {} did not start", pod.netns);
    tb.adopt(child);
    let peers: Peers = Arc::default();
    std::thread::spawn({
        let peers = peers.clone();
        move || {
            for l in out.lines().map_while(Result::ok) {
                peers.lock().unwrap().push(l.trim().to_owned());
            }
        }
    });
    peers
}

/// Opens `n` connections one after another from one process, sends a few bytes on each and
/// closes it; prints the local ports as a JSON list.
const CONNECTOR: &str = r#"
import json, socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ports = []
for _ in range(n):
    s = socket.create_connection((host, port), timeout=5)
    ports.append(s.getsockname()[1])
    s.sendall(b"hello")
    s.close()
print(json.dumps(ports), flush=True)
"#;

/// Runs the connector in `pod` (its pid and the local ports it used).
pub(crate) fn connect_many(pod: &Pod, ip: IpAddr, port: u16, n: usize) -> (u32, Vec<u16>) {
    let child = pod
        .command(&["python3", "-c", CONNECTOR, &ip.to_string(), &port.to_string(), &n.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 is installed");
    let pid = child.id();
    let out = child.wait_with_output().expect("connector ran");
    assert!(out.status.success(), "connector failed: {}", String::from_utf8_lossy(&out.stderr));
    let ports: Vec<u16> = serde_json::from_slice(&out.stdout).expect("connector prints its ports");
    (pid, ports)
}

/// Waits until `peers` holds `n` entries (the servers log each connection as they accept it).
pub(crate) fn wait_peers(peers: &[&Peers], n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while peers.iter().map(|p| p.lock().unwrap().len()).sum::<usize>() < n {
        assert!(Instant::now() < deadline, "servers logged fewer than {n} connections");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `labels` of an endpoint as strings.
pub(crate) fn labels(ep: &Value) -> Vec<String> {
    ep["labels"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l.as_str().map(str::to_owned))
        .collect()
}

/// A temporary file removed on drop.
pub(crate) struct TempFile(pub std::path::PathBuf);

impl TempFile {
    pub(crate) fn new(name: &str, contents: &str) -> Self {
        let path = std::env::temp_dir().join(format!("hw-{}-{name}", std::process::id()));
        std::fs::write(&path, contents).expect("write temp file");
        Self(path)
    }

    pub(crate) fn path(&self) -> &str {
        self.0.to_str().expect("UTF-8 temp path")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
