//! A private Debian `clickhouse-server` (18.16) for tests: the system's config copied with its own
//! paths and ports, loopback only, killed when dropped. And the chdb-core virtualenv's Python,
//! for running SQL on a modern ClickHouse in process. Also used by `benches/clickhouse.rs`.
#![allow(dead_code, reason = "the tests and the benchmark each use part of it")]

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// A loopback port nothing listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind an ephemeral port")
        .local_addr()
        .unwrap()
        .port()
}

/// Where Debian installs it.
const SERVER: &str = "/usr/sbin/clickhouse-server";
const SYSTEM_CONFIG: &str = "/etc/clickhouse-server";

pub(crate) struct ClickHouseServer {
    child: Option<Child>,
    pub http_port: u16,
    pub tcp_port: u16,
    config: PathBuf,
    dir: PathBuf,
}

/// A test that needs a server fails (never skips) when it is not installed.
fn require_server() {
    assert!(
        Path::new(SERVER).exists() && Path::new(SYSTEM_CONFIG).join("config.xml").exists(),
        "{SERVER} is not installed: run `cargo xtask test-setup` (or `cargo xtask test`), which \
         installs Debian's clickhouse-server without starting its system-wide service"
    );
}

impl ClickHouseServer {
    /// Starts a server with its data, logs and config under `dir` (`extra`: XML put inside the
    /// config's root, e.g. clusters and macros) and waits until `GET /ping` answers `Ok.`.
    pub(crate) fn start(dir: &Path, extra: &str) -> Self {
        Self::start_with_tcp_port(dir, free_port(), extra)
    }

    /// [`Self::start`] on a native-protocol port chosen beforehand (a cluster's servers name
    /// each other's).
    pub(crate) fn start_with_tcp_port(dir: &Path, tcp_port: u16, extra: &str) -> Self {
        require_server();
        let (http_port, inter) = (free_port(), free_port());
        for sub in ["data", "log", "config"] {
            std::fs::create_dir_all(dir.join(sub)).expect("create the server's directories");
        }
        let data = format!("{}/", dir.join("data").display());
        let log = format!("{}/", dir.join("log").display());
        let config = std::fs::read_to_string(Path::new(SYSTEM_CONFIG).join("config.xml"))
            .expect("read the system clickhouse-server config")
            .replace("/var/lib/clickhouse/", &data)
            .replace("/var/log/clickhouse-server/", &log)
            .replace("<http_port>8123</http_port>", &format!("<http_port>{http_port}</http_port>"))
            .replace("<tcp_port>9000</tcp_port>", &format!("<tcp_port>{tcp_port}</tcp_port>"))
            .replace(
                "<interserver_http_port>9009</interserver_http_port>",
                &format!(
                    "<interserver_http_port>{inter}</interserver_http_port>\
                     <interserver_http_host>127.0.0.1</interserver_http_host>"
                ),
            )
            .replace("<listen_host>::1</listen_host>", "")
            .replace("</yandex>", &format!("{extra}\n</yandex>"));
        let config_path = dir.join("config/config.xml");
        std::fs::write(&config_path, config).expect("write the test server's config");
        std::fs::copy(Path::new(SYSTEM_CONFIG).join("users.xml"), dir.join("config/users.xml"))
            .expect("copy users.xml");
        let mut s = Self { child: None, http_port, tcp_port, config: config_path, dir: dir.into() };
        s.restart();
        s
    }

    /// (Re)starts the process on the same config, data and ports.
    pub(crate) fn restart(&mut self) {
        assert!(self.child.is_none(), "the server is already running");
        let out = std::fs::File::create(self.dir.join("log/stdout.log")).expect("server log");
        let child = Command::new(SERVER)
            .arg(format!("--config-file={}", self.config.display()))
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log handle"))
            .stderr(out)
            .spawn()
            .expect("start clickhouse-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_mins(1);
        loop {
            if http(self.http_port, "GET", "/ping", "").is_ok_and(|b| b == "Ok.\n") {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "clickhouse-server exited ({status}) before answering /ping:\n{}",
                    self.logs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "clickhouse-server not up after 60s:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The server's error log so far (and, with `clear`, starts it anew).
    pub(crate) fn error_log(&self, clear: bool) -> String {
        let path = self.dir.join("log/clickhouse-server.err.log");
        let log = std::fs::read_to_string(&path).unwrap_or_default();
        if clear {
            let _ = std::fs::remove_file(&path);
        }
        log
    }

    fn logs(&self) -> String {
        ["log/stdout.log", "log/clickhouse-server.err.log"]
            .iter()
            .filter_map(|f| std::fs::read_to_string(self.dir.join(f)).ok())
            .map(|s| s.lines().rev().take(30).collect::<Vec<_>>().join("\n"))
            .collect::<Vec<_>>()
            .join("\n---\n")
    }

    /// The server's process id (while it runs).
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub(crate) fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// SIGKILL and reap.
    pub(crate) fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs `sql`, returning the body (panics with the server's message on an error).
    pub(crate) fn query(&self, sql: &str) -> String {
        http(self.http_port, "POST", "/", sql).unwrap_or_else(|e| panic!("{e}\nquery: {sql}"))
    }
}

impl Drop for ClickHouseServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One HTTP/1.0 request to 127.0.0.1:`port`; `Ok(body)` on 200.
pub(crate) fn http(port: u16, method: &str, path: &str, body: &str) -> Result<String, String> {
    http_bytes(port, method, path, body).map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// [`http`], the body as bytes (binary columns in text formats).
pub(crate) fn http_bytes(
    port: u16,
    method: &str,
    path: &str,
    body: &str,
) -> Result<Vec<u8>, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_mins(1))).map_err(|e| e.to_string())?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| e.to_string())?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).map_err(|e| e.to_string())?;
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("bad response {:?}", String::from_utf8_lossy(&resp)))?;
    let head = String::from_utf8_lossy(&resp[..split]).into_owned();
    let body = resp[split + 4..].to_vec();
    if head.split(' ').nth(1) == Some("200") {
        Ok(body)
    } else {
        let first = head.lines().next().unwrap_or("").to_owned();
        Err(format!("{first}: {}", String::from_utf8_lossy(&body)))
    }
}

/// The compatibility virtualenv's Python (with chdb-core), failing clearly when it is missing.
pub(crate) fn chdb_python() -> PathBuf {
    let python = std::env::var_os("HOPWATCH_COMPAT_PYTHON").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/compat-venv/bin/python"),
        PathBuf::from,
    );
    let ok = Command::new(&python).args(["-c", "import chdb"]).status().is_ok_and(|s| s.success());
    assert!(
        ok,
        "{} cannot import chdb: run `cargo xtask test-setup` (it installs chdb-core from \
         hopwatch/tests/compat/requirements.txt into target/compat-venv)",
        python.display()
    );
    python
}
