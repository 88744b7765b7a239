//! Real peer processes for the test bed: a TCP server and client (Python, so each is its own
//! process with its own pid and command name, as an application would be).

use std::{
    io::{BufRead, BufReader},
    net::IpAddr,
    process::{Child, Stdio},
    time::Duration,
};

use super::{Pod, Testbed};

/// Accepts connections forever; per connection reads until EOF, replies `reply` bytes, closes.
const SERVER: &str = r#"
import socket, sys
host, port, reply = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port)); s.listen(128)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    n = 0
    while True:
        b = c.recv(65536)
        if not b: break
        n += len(b)
    c.sendall(b"r" * reply)
    c.close()
"#;

/// Connects (with a timeout), sends `send` bytes, half-closes, reads the reply, prints a JSON
/// line with what happened. `hold` seconds of pause after connecting keep the connection open.
const CLIENT: &str = r#"
import json, socket, sys, time
host, port, send, timeout, hold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.settimeout(timeout)
t0 = time.monotonic()
try:
    s.connect((host, port))
except Exception as e:
    print(json.dumps({"error": type(e).__name__, "local_port": s.getsockname()[1]}), flush=True)
    sys.exit(1)
connect_s = time.monotonic() - t0
local_port = s.getsockname()[1]
s.settimeout(60)
chunk = b"s" * 65536
left = send
start = time.monotonic()
end = start + hold
# With a hold time, spread the bytes evenly over it (a steady trickle, 20 writes a second).
step = max(1, int(send / (hold * 20))) if hold else len(chunk)
while left > 0:
    n = s.send(chunk[:min(left, step, len(chunk))])
    left -= n
    if hold:
        time.sleep(0.05)
while time.monotonic() < end:
    time.sleep(0.05)
s.shutdown(socket.SHUT_WR)
got = 0
while True:
    b = s.recv(65536)
    if not b: break
    got += len(b)
s.close()
print(json.dumps({"local_port": local_port, "received": got, "connect_s": connect_s}), flush=True)
"#;

/// A running server.
pub(crate) struct Server {
    pub pid: u32,
}

/// Starts the TCP server in `pod` on `ip:port`, replying `reply` bytes; waits until it listens.
pub(crate) fn server(tb: &mut Testbed, pod: &Pod, ip: IpAddr, port: u16, reply: usize) -> Server {
    let mut child: Child = pod
        .command(&["python3", "-c", SERVER, &ip.to_string(), &port.to_string(), &reply.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 is installed (`cargo xtask test` installs it)");
    let pid = child.id();
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped"))
        .read_line(&mut line)
        .expect("server prints ready");
    assert_eq!(line.trim(), "ready", "server in {} did not start", pod.netns);
    tb.adopt(child);
    Server { pid }
}

/// What the client saw.
#[derive(Debug)]
pub(crate) struct ClientResult {
    pub pid: u32,
    pub report: serde_json::Value,
    pub ok: bool,
}

impl ClientResult {
    pub(crate) fn local_port(&self) -> u64 {
        self.report["local_port"].as_u64().expect("client reports its port")
    }
}

/// Runs the client in `pod` to completion.
pub(crate) fn client(
    pod: &Pod,
    ip: IpAddr,
    port: u16,
    send: usize,
    timeout: Duration,
    hold: Duration,
) -> ClientResult {
    let child = pod
        .command(&[
            "python3",
            "-c",
            CLIENT,
            &ip.to_string(),
            &port.to_string(),
            &send.to_string(),
            &timeout.as_secs_f64().to_string(),
            &hold.as_secs_f64().to_string(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 is installed");
    let pid = child.id();
    let out = child.wait_with_output().expect("client ran");
    let text = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("client printed {text:?}: {e}"));
    ClientResult { pid, report, ok: out.status.success() }
}
