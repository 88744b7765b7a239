//! The HTTP side of the topology: nginx terminating TLS in front of the `FastAPI` app on uvicorn.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
};

use super::{
    ServerProcess, TempDir,
    databases::{DB_NAME, DB_PASSWORD, DB_USER},
};
use crate::support::Pod;

// ============================================================================================
// nginx
// ============================================================================================

/// nginx (master and `workers` worker processes) serving HTTPS on 443 with a self-signed
/// certificate made for this run, and plain HTTP on 80, both proxied to one upstream over
/// HTTP/1.1 with keep-alive connections.
pub(crate) struct Nginx {
    process: ServerProcess,
    dir: TempDir,
    pub ip: Ipv4Addr,
    pub https_port: u16,
    pub http_port: u16,
}

impl Nginx {
    pub(crate) fn start(pod: &Pod, upstream: SocketAddrV4, workers: u32) -> Self {
        let dir = TempDir::new("nginx");
        let ip = pod.ip;
        let (cert, key) = dir.self_signed_cert(pod, "ingress.hopwatch.test", Some(ip));
        let preamble = nginx_preamble(&dir, workers, 512);
        let config = format!(
            "{preamble}
    upstream app {{
        server {upstream};
        keepalive 16;
    }}
    server {{
        listen {ip}:443 ssl;
        listen {ip}:80;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{
            proxy_pass http://app;
            # Keep-alive to the upstream needs HTTP/1.1 and no `Connection: close` from the
            # client passed on.
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $remote_addr;
        }}
    }}
}}
"
        );
        let conf = dir.write("nginx.conf", &config);
        let prefix = dir.file("");
        // -e: the compiled-in error log under /var/log/nginx is never touched.
        let args = ["nginx", "-e", "stderr", "-p", &prefix, "-c", &conf];
        // SIGTERM: fast shutdown, the master stops its workers.
        let process =
            ServerProcess::spawn("nginx", pod, &args, &[], dir.path().join("log"), libc::SIGTERM);
        let url = format!("https://{ip}/");
        let want = usize::try_from(workers).expect("small");
        process.wait_until(&format!("serving TLS with {workers} workers"), || {
            // Any HTTP answer will do (502 until the upstream runs): nginx finished TLS.
            super::succeeds(pod, &["curl", "-s", "-o", "/dev/null", "--cacert", &cert, &url])
                && process.children().len() == want
        });
        Self { process, dir, ip, https_port: 443, http_port: 80 }
    }

    /// The master's pid.
    pub(crate) fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub(crate) fn worker_pids(&self) -> Vec<u32> {
        self.process.children()
    }

    /// The self-signed certificate (PEM) clients can verify the server with.
    pub(crate) fn cert_path(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    /// nginx's error log (stderr), which also notes each worker start.
    pub(crate) fn log(&self) -> String {
        self.process.log()
    }

    /// The access log: one line per request.
    pub(crate) fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }
}

// ============================================================================================
// FastAPI app
// ============================================================================================

/// Where the app finds its backends: host NAMES (resolved through the pod's resolv.conf when
/// the app connects) and ports.
#[derive(Debug, Clone)]
pub(crate) struct AppBackends {
    pub postgres: (String, u16),
    pub redis: (String, u16),
    pub mysql: (String, u16),
    /// A name the DNS server does not know (`/dns/missing` looks it up).
    pub missing_name: String,
}

/// `hopwatch/tests/e2e/app/app.py` on uvicorn (one worker process, HTTP/1.1 via h11), run with the
/// virtualenv `cargo xtask test` builds. It connects to all its backends on start-up, so a
/// running app proves they resolve and answer.
pub(crate) struct FastApiApp {
    process: ServerProcess,
    _dir: TempDir,
    pub ip: Ipv4Addr,
    pub port: u16,
}

impl FastApiApp {
    pub(crate) const PORT: u16 = 8000;

    pub(crate) fn start(pod: &Pod, backends: &AppBackends) -> Self {
        let dir = TempDir::new("app");
        let python = venv_python();
        let app_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e/app");
        let ip = pod.ip;
        let (host, port) = (ip.to_string(), Self::PORT.to_string());
        let args = [
            python.to_str().expect("UTF-8 path"),
            "-m",
            "uvicorn",
            "app:app",
            "--app-dir",
            app_dir,
            "--host",
            &host,
            "--port",
            &port,
            "--workers",
            "1",
            "--http",
            "h11",
            "--loop",
            "asyncio",
            // Longer than nginx's idle upstream keep-alive (60 s): the app never closes a
            // connection nginx may be about to reuse.
            "--timeout-keep-alive",
            "75",
        ];
        let ports = [
            backends.postgres.1.to_string(),
            backends.redis.1.to_string(),
            backends.mysql.1.to_string(),
        ];
        let env = [
            ("APP_PG_HOST", backends.postgres.0.as_str()),
            ("APP_PG_PORT", &ports[0]),
            ("APP_PG_USER", DB_USER),
            ("APP_PG_DATABASE", DB_NAME),
            ("APP_REDIS_HOST", &backends.redis.0),
            ("APP_REDIS_PORT", &ports[1]),
            ("APP_MYSQL_HOST", &backends.mysql.0),
            ("APP_MYSQL_PORT", &ports[2]),
            ("APP_MYSQL_USER", DB_USER),
            ("APP_MYSQL_PASSWORD", DB_PASSWORD),
            ("APP_MYSQL_DATABASE", DB_NAME),
            ("APP_DNS_MISSING", &backends.missing_name),
            // No __pycache__ in the source tree.
            ("PYTHONDONTWRITEBYTECODE", "1"),
            ("PYTHONUNBUFFERED", "1"),
        ];
        // SIGTERM: uvicorn finishes in-flight requests and closes its pools.
        let process = ServerProcess::spawn(
            "uvicorn",
            pod,
            &args,
            &env,
            dir.path().join("log"),
            libc::SIGTERM,
        );
        let url = format!("http://{ip}:{}/health", Self::PORT);
        process.wait_until("answering /health", || {
            pod.command(&["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", &url])
                .output()
                .is_ok_and(|o| o.stdout == b"200")
        });
        Self { process, _dir: dir, ip, port: Self::PORT }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub(crate) fn addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.ip, self.port)
    }

    /// uvicorn's log, with one access line per request (`<peer ip>:<peer port> - "GET ..."`).
    pub(crate) fn log(&self) -> String {
        self.process.log()
    }
}

/// The start of an nginx configuration for a test server: in the foreground, everything it writes
/// under `dir`, its log on stderr, up to the `http {` block's own directives (the caller adds its
/// servers and closes the block).
pub(crate) fn nginx_preamble(dir: &TempDir, workers: u32, connections: u32) -> String {
    let d = dir.path().display();
    format!(
        "daemon off;
master_process on;
worker_processes {workers};
pid {d}/nginx.pid;
error_log stderr info;
events {{ worker_connections {connections}; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;"
    )
}

/// The virtualenv's python: `$HOPWATCH_E2E_VENV`, or `target/e2e-venv` (made by `cargo xtask
/// test` from `hopwatch/tests/e2e/requirements.txt`).
pub(crate) fn venv_python() -> PathBuf {
    let venv = std::env::var_os("HOPWATCH_E2E_VENV").map_or_else(
        || PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/e2e-venv")),
        PathBuf::from,
    );
    let python = venv.join("bin/python");
    assert!(
        python.exists(),
        "no Python virtualenv at {}: run `sudo -E cargo xtask test` once, which creates it from \
         hopwatch/tests/e2e/requirements.txt",
        venv.display()
    );
    python
}
