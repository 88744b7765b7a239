//! A real Prometheus server (Debian's `prometheus` package) started by the test with a config the
//! test writes, scraping the agent every second and evaluating hopwatch's rules; queried through
//! its HTTP API. Stopped (by PID) and its data removed on drop.

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

pub(super) struct Prometheus {
    child: Child,
    pub addr: SocketAddr,
    dir: PathBuf,
}

/// A free loopback port (bound and released; the small race is acceptable in a serial test).
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a loopback port")
        .port()
}

impl Prometheus {
    /// Starts Prometheus scraping `target` every second, with `rules` loaded; waits until ready.
    pub(super) fn start(target: SocketAddr, rules: &Path) -> Self {
        let dir =
            std::env::temp_dir().join(format!("hopwatch-e2e-prometheus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data")).expect("create the Prometheus directory");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: hopwatch\n    static_configs:\n      - targets: ['{target}']\n",
            rules.display()
        );
        std::fs::write(dir.join("prometheus.yml"), config).expect("write prometheus.yml");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("address");
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("create the log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus is installed (`cargo xtask test` installs Debian's prometheus)");
        let mut p = Self { child, addr, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!("prometheus exited ({status}):\n{}", p.log());
            }
            if http(addr, "GET", "/-/ready", "").is_ok_and(|(code, _)| code == 200) {
                return p;
            }
            assert!(Instant::now() < deadline, "prometheus not ready after 30 s:\n{}", p.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub(super) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// GET `path` → JSON `data`, panicking unless the API says success.
    pub(super) fn get(&self, path: &str) -> Value {
        let (code, body) = http(self.addr, "GET", path, "").expect("query prometheus");
        api_data(code, &body, path)
    }

    /// An instant query at `time` (Unix seconds): `Ok(result)` or `Err(error)` from the API.
    pub(super) fn query(&self, expr: &str, time: f64) -> Result<Vec<Value>, String> {
        let form = format!("query={}&time={time:.3}", urlencode(expr));
        let (code, body) =
            http(self.addr, "POST", "/api/v1/query", &form).expect("query prometheus");
        let v: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("non-JSON answer ({code}): {e}: {body}"));
        if v["status"] == "success" {
            Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
        } else {
            Err(format!("{}: {}", v["errorType"], v["error"]))
        }
    }
}

fn api_data(code: u16, body: &str, what: &str) -> Value {
    let v: Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("{what}: non-JSON answer ({code}): {e}: {body}"));
    assert_eq!(v["status"], "success", "{what}: {body}");
    v["data"].clone()
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `application/x-www-form-urlencoded` encoding of one value.
pub(super) fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A minimal HTTP/1.1 exchange on loopback (`Connection: close`): (status, body).
pub(crate) fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    form: &str,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if method == "POST" {
        let _ = write!(
            req,
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
            form.len()
        );
    }
    req.push_str("\r\n");
    req.push_str(form);
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok((code, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}
