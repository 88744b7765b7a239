//! The application-protocol topology, every pod a network namespace on one test bed:
//!
//! ```text
//! client --HTTPS--> ingress (nginx) --HTTP/1.1 keep-alive--> app (`FastAPI` on uvicorn)
//!                                                              |-- `PostgreSQL`  (db pod)
//!                                                              |-- Redis       (cache pod)
//!                                                              |-- `MariaDB`     (mysql pod)
//!                                                              '-- DNS lookups (dns pod, dnsmasq)
//! ```
//!
//! The app knows its backends only by name (`db.hopwatch.test`, ...), which dnsmasq resolves.

use std::{
    collections::BTreeMap,
    io::Read as _,
    net::Ipv4Addr,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use serde_json::Value;

use super::{
    AppBackends, Dnsmasq, FastApiApp, MariaDb, Nginx, Postgres, Redis, ResolvConf, output_in,
};
use crate::support::{Pod, Testbed};

/// The DNS domain dnsmasq is authoritative for.
pub(crate) const DOMAIN: &str = "hopwatch.test";
pub(crate) const PG_NAME: &str = "db.hopwatch.test";
pub(crate) const REDIS_NAME: &str = "cache.hopwatch.test";
pub(crate) const MYSQL_NAME: &str = "mysql.hopwatch.test";
/// The name `/dns/missing` looks up: not in dnsmasq's records, so NXDOMAIN.
pub(crate) const MISSING_NAME: &str = "missing.hopwatch.test";
/// The rows the `users` table holds in both `PostgreSQL` and `MariaDB`.
pub(crate) const USERS: [(i64, &str); 3] = [(1, "ada"), (2, "grace"), (3, "edsger")];
/// nginx worker processes.
pub(crate) const NGINX_WORKERS: u32 = 2;

/// The whole chain, started and ready. Fields drop in declaration order: front to back, so no
/// server goes away under a client that still holds connections to it.
pub(crate) struct Topology {
    pub nginx: Nginx,
    pub app: FastApiApp,
    _resolv: ResolvConf,
    pub postgres: Postgres,
    pub redis: Redis,
    pub mariadb: MariaDb,
    pub dns: Dnsmasq,
    pub client: Pod,
    pub ingress: Pod,
    pub app_pod: Pod,
    pub db: Pod,
    pub cache: Pod,
    pub mysql: Pod,
    pub dns_pod: Pod,
    /// How long `start` took, pods included.
    pub startup: Duration,
    /// How long each step of `start` took (the backends' steps overlap: they run in parallel).
    pub phases: Vec<(&'static str, Duration)>,
}

impl Topology {
    /// Creates the seven pods on `tb` and starts every server, the independent ones in parallel.
    pub(crate) fn start(tb: &mut Testbed) -> Self {
        let t0 = Instant::now();
        let timed = |name: &'static str, since: Instant| (name, since.elapsed());
        let [client, ingress, app_pod, db, cache, mysql, dns_pod] =
            ["client", "ingress", "app", "db", "cache", "mysql", "dns"].map(|n| tb.pod(n));
        let mut phases = vec![timed("pods", t0)];
        let records = [(PG_NAME, db.ip), (REDIS_NAME, cache.ip), (MYSQL_NAME, mysql.ip)];
        // A panic in one thread drops the servers the others returned (their results are dropped
        // with their join handles), then propagates.
        let t = Instant::now();
        let ((postgres, pg_t), (redis, redis_t), (mariadb, maria_t), (dns, dns_t)) =
            std::thread::scope(|s| {
                let pg = s.spawn(|| (seed_postgres(Postgres::start(&db)), t.elapsed()));
                let redis = s.spawn(|| (Redis::start(&cache), t.elapsed()));
                let maria = s.spawn(|| (seed_mariadb(MariaDb::start(&mysql)), t.elapsed()));
                let dns = s.spawn(|| (Dnsmasq::start(&dns_pod, DOMAIN, &records), t.elapsed()));
                (join(pg), join(redis), join(maria), join(dns))
            });
        phases.extend([
            ("postgres", pg_t),
            ("redis", redis_t),
            ("mariadb", maria_t),
            ("dnsmasq", dns_t),
        ]);
        let resolv = dns.resolver_for(&app_pod);
        let backends = AppBackends {
            postgres: (PG_NAME.to_owned(), postgres.port),
            redis: (REDIS_NAME.to_owned(), redis.port),
            mysql: (MYSQL_NAME.to_owned(), mariadb.port),
            missing_name: MISSING_NAME.to_owned(),
        };
        let t = Instant::now();
        let app = FastApiApp::start(&app_pod, &backends);
        phases.push(timed("app", t));
        let t = Instant::now();
        let nginx = Nginx::start(&ingress, app.addr(), NGINX_WORKERS);
        phases.push(timed("nginx", t));
        Self {
            nginx,
            app,
            _resolv: resolv,
            postgres,
            redis,
            mariadb,
            dns,
            client,
            ingress,
            app_pod,
            db,
            cache,
            mysql,
            dns_pod,
            startup: t0.elapsed(),
            phases,
        }
    }

    /// `https://<ingress ip>` (the certificate names this address).
    pub(crate) fn base_url(&self) -> String {
        format!("https://{}:{}", self.nginx.ip, self.nginx.https_port)
    }

    /// One HTTPS request with curl from the client pod, verifying nginx's certificate.
    pub(crate) fn request(&self, method: &str, path: &str) -> Response {
        self.curl(method, &format!("{}{path}", self.base_url()), &[])
    }

    /// A GET over HTTPS with extra request headers (`Name: value`).
    pub(crate) fn get_with(&self, path: &str, headers: &[&str]) -> Response {
        self.curl("GET", &format!("{}{path}", self.base_url()), headers)
    }

    /// One plain-HTTP request (nginx's port 80) with curl from the client pod.
    pub(crate) fn request_plain(&self, method: &str, path: &str) -> Response {
        self.curl(method, &format!("http://{}:{}{path}", self.nginx.ip, self.nginx.http_port), &[])
    }

    fn curl(&self, method: &str, url: &str, headers: &[&str]) -> Response {
        let cert = self.nginx.cert_path();
        let mut args = vec![
            "curl",
            "-s",
            "-S",
            "--max-time",
            "20",
            "--cacert",
            cert.to_str().expect("UTF-8 path"),
            "-X",
            method,
            "-w",
            "\n%{http_code} %{time_total}",
        ];
        args.extend(headers.iter().flat_map(|h| ["-H", *h]));
        args.push(url);
        let out = output_in(&self.client, &args);
        let (body, last) = out.rsplit_once('\n').expect("curl printed the status line");
        let (status, time) = last.split_once(' ').expect("status and time");
        Response {
            status: status.parse().unwrap_or_else(|e| panic!("status {status:?}: {e}")),
            body: serde_json::from_str(body)
                .unwrap_or_else(|e| panic!("{method} {url}: body {body:?} is not JSON: {e}")),
            time: Duration::from_secs_f64(time.parse().expect("curl time_total is a number")),
        }
    }

    pub(crate) fn get(&self, path: &str) -> Response {
        self.request("GET", path)
    }

    /// Sends up to `count` GET requests for `path` from the client pod, one at a time, for at
    /// most `max`; see [`LoadReport`].
    pub(crate) fn load(
        &self,
        path: &str,
        count: u32,
        max: Duration,
        reuse_connection: bool,
    ) -> LoadReport {
        load(
            &self.client,
            self.ingress.ip,
            &self.nginx.cert_path(),
            path,
            count,
            max,
            reuse_connection,
        )
    }
}

fn join<T>(h: std::thread::ScopedJoinHandle<'_, T>) -> T {
    h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
}

fn seed_postgres(pg: Postgres) -> Postgres {
    let rows: Vec<String> = USERS.iter().map(|(id, name)| format!("({id}, '{name}')")).collect();
    pg.psql(&format!(
        "CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL); \
         INSERT INTO users VALUES {};",
        rows.join(", ")
    ));
    pg
}

fn seed_mariadb(db: MariaDb) -> MariaDb {
    let rows: Vec<String> = USERS.iter().map(|(id, name)| format!("({id}, '{name}')")).collect();
    db.sql(&format!(
        "CREATE TABLE users (id BIGINT PRIMARY KEY, name TEXT NOT NULL); \
         INSERT INTO users VALUES {};",
        rows.join(", ")
    ));
    db
}

/// What the client got back.
#[derive(Debug)]
pub(crate) struct Response {
    pub status: u16,
    pub body: Value,
    /// curl's total time for the request.
    pub time: Duration,
}

/// A bounded request loop, one process (Debian's python3, so TLS goes through the system's
/// OpenSSL; the server's certificate is verified): stops after `count` requests or once `max`
/// has passed, whichever comes first.
/// Each request's socket timeout is the time left, so the loop cannot outlive its deadline by
/// more than a moment.
const LOAD: &str = r#"
import http.client, json, ssl, sys, time
host, cafile, path, count, max_s = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
reuse = sys.argv[6] == "1"
ctx = ssl.create_default_context(cafile=cafile)
start = time.monotonic()
deadline = start + max_s
statuses, latencies, errors, conn, sent = {}, [], [], None, 0
while sent < count:
    left = deadline - time.monotonic()
    if left <= 0:
        break
    sent += 1
    t0 = time.monotonic()
    try:
        if conn is None:
            conn = http.client.HTTPSConnection(host, 443, context=ctx, timeout=left)
        elif conn.sock is not None:
            conn.sock.settimeout(left)
        conn.request("GET", path)
        r = conn.getresponse()
        r.read()
        statuses[r.status] = statuses.get(r.status, 0) + 1
        latencies.append(time.monotonic() - t0)
        if not reuse or r.will_close:
            conn.close()
            conn = None
    except Exception as e:
        errors.append(f"{type(e).__name__}: {e}")
        if conn is not None:
            conn.close()
        conn = None
if conn is not None:
    conn.close()
print(json.dumps({"sent": sent, "statuses": statuses, "latencies": latencies, "errors": errors[:10],
                  "error_count": len(errors), "elapsed": time.monotonic() - start}))
"#;

/// What a load loop did.
#[derive(Debug)]
pub(crate) struct LoadReport {
    /// The loop's pid (the client process hopwatch sees).
    pub pid: u32,
    /// Requests started (a request cut short by the deadline counts, as an error).
    pub sent: u32,
    /// Responses by HTTP status.
    pub statuses: BTreeMap<u16, u32>,
    /// Latency of every answered request.
    pub latencies: Vec<Duration>,
    /// Requests that got no response, and the first few reasons.
    pub error_count: u32,
    pub errors: Vec<String>,
    pub elapsed: Duration,
}

impl LoadReport {
    pub(crate) fn answered(&self) -> u32 {
        self.statuses.values().sum()
    }
}

/// Runs the load loop in `client` against `https://<ingress>:443<path>`, trusting the
/// certificate in `cert` (PEM). Fails if the loop process itself runs more than 10 s past `max`.
pub(crate) fn load(
    client: &Pod,
    ingress: Ipv4Addr,
    cert: &Path,
    path: &str,
    count: u32,
    max: Duration,
    reuse_connection: bool,
) -> LoadReport {
    let mut child = client
        .command(&[
            "/usr/bin/python3",
            "-c",
            LOAD,
            &ingress.to_string(),
            cert.to_str().expect("UTF-8 path"),
            path,
            &count.to_string(),
            &max.as_secs_f64().to_string(),
            if reuse_connection { "1" } else { "0" },
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 is installed (`cargo xtask test` installs it)");
    let pid = child.id();
    // Read while it runs: a long loop's output can exceed a pipe's buffer.
    let read = |mut pipe: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = pipe.read_to_string(&mut s);
            s
        })
    };
    let out = read(Box::new(child.stdout.take().expect("piped")));
    let err = read(Box::new(child.stderr.take().expect("piped")));
    let limit = Instant::now() + max + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the load loop") {
            break status;
        }
        if Instant::now() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("load loop for {path} still running 10 s after its {max:?} limit");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (out, err) = (out.join().expect("stdout reader"), err.join().expect("stderr reader"));
    assert!(status.success(), "load loop for {path} failed ({status}): {out}{err}");
    let v: Value = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("load loop printed {out:?} ({e}); stderr: {err}"));
    let n = |key: &str| u32::try_from(v[key].as_u64().expect("a count")).expect("small");
    LoadReport {
        pid,
        sent: n("sent"),
        statuses: v["statuses"]
            .as_object()
            .expect("statuses")
            .iter()
            .map(|(k, c)| (k.parse().expect("status"), u32::try_from(c.as_u64().unwrap()).unwrap()))
            .collect(),
        latencies: v["latencies"]
            .as_array()
            .expect("latencies")
            .iter()
            .map(|s| Duration::from_secs_f64(s.as_f64().expect("seconds")))
            .collect(),
        error_count: n("error_count"),
        errors: v["errors"]
            .as_array()
            .expect("errors")
            .iter()
            .map(|e| e.as_str().unwrap_or_default().to_owned())
            .collect(),
        elapsed: Duration::from_secs_f64(v["elapsed"].as_f64().expect("elapsed")),
    }
}
