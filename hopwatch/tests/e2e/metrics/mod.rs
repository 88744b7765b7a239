//! Per-hop metrics end to end: real traffic between pods (with one hop slowed by an injected
//! delay, drops by an nft rule, refused connects, DNS to dnsmasq), the real agent, a real
//! Prometheus scraping it with hopwatch's rules loaded; every dashboard query and every rule
//! evaluated through Prometheus' HTTP API; `hopwatch hops -o json` on the same flows.
//!
//! The application peers are small Python HTTP servers and a client, each naming itself
//! (`prctl(PR_SET_NAME)`) as a distinct program would be named, so hops have distinct endpoints:
//! hwm-front → hwm-app:8080 → hwm-db:5432 (a chain for `--path`), hwm-front → hwm-slow:9090 (the
//! slow hop: every packet from front to slow waits SLOW), hwm-front → dnsmasq:53.

pub(crate) mod prometheus;
mod synthetic;

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, SystemTime},
};

use serde_json::Value;

use self::prometheus::Prometheus;
use crate::support::{
    Pod, Testbed,
    agent::{Agent, BIN},
    serial,
};

/// Well above what the chain front → app → db takes even in its tail (its own 15 ms injected
/// twice, plus a delayed-ACK stall of up to 200 ms now and then), so the slow hop leads by p99 too.
const SLOW: Duration = Duration::from_millis(300);
const DB_DELAY: Duration = Duration::from_millis(15);
const SLOW_PORT: &str = "9090";
/// Seconds of client traffic.
const TRAFFIC_S: f64 = 12.0;
/// What dashboards' `$__rate_interval` and `$__range` stand for here (scrapes every second).
const RATE_INTERVAL: &str = "20s";
const RANGE: &str = "5m";

/// An HTTP server that names itself, optionally calling `upstream` once per request.
const SERVER: &str = r#"
import ctypes, sys, http.server, urllib.request
ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0)
host, port = sys.argv[2], int(sys.argv[3])
upstream = sys.argv[4] if len(sys.argv) > 4 else ""
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if upstream:
            urllib.request.urlopen(upstream, timeout=5).read()
        body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
srv = http.server.HTTPServer((host, port), H)
print("ready", flush=True)
srv.serve_forever()
"#;

/// An HTTPS server (TLS 1.3 only) named `hwm-tls`: argv host, port, certificate, key. A client
/// offering an older version is refused with an alert.
const TLS_SERVER: &str = r#"
import ctypes, sys, ssl, http.server
ctypes.CDLL(None).prctl(15, b"hwm-tls", 0, 0, 0)
host, port, cert, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
ctx.load_cert_chain(cert, key)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"ok\n")
    def log_message(self, *a):
        pass
class S(http.server.HTTPServer):
    def finish_request(self, request, client_address):
        try:
            tls = ctx.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return
        self.RequestHandlerClass(tls, client_address, self)
srv = S((host, port), H)
print("ready", flush=True)
srv.serve_forever()
"#;

/// The client: HTTP to app and slow, DNS to dnsmasq (answered, NXDOMAIN, REFUSED), a connect
/// that is dropped, one refused, HTTPS to the TLS server and a TLS 1.2 handshake it refuses.
const CLIENT: &str = r#"
import ctypes, http.client, json, socket, ssl, struct, sys, time
ctypes.CDLL(None).prctl(15, b"hwm-front", 0, 0, 0)
app, slow, dns, seconds, tls = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5]
counts = {"http": 0, "dns": 0, "dropped": 0, "refused": 0, "tls": 0, "tls_refused": 0, "errors": []}
any_cert = ssl.create_default_context()
any_cert.check_hostname = False
any_cert.verify_mode = ssl.CERT_NONE
old = ssl.create_default_context()
old.check_hostname = False
old.verify_mode = ssl.CERT_NONE
old.maximum_version = ssl.TLSVersion.TLSv1_2
def https(host, port):
    c = http.client.HTTPSConnection(host, port, timeout=5, context=any_cert)
    c.request("GET", "/")
    r = c.getresponse(); r.read(); c.close()
    counts["tls"] += 1
def tls_refused(host, port):
    with socket.create_connection((host, port), timeout=5) as s:
        try:
            old.wrap_socket(s, server_hostname="old.test")
        except ssl.SSLError:
            counts["tls_refused"] += 1
def get(host, port):
    c = http.client.HTTPConnection(host, port, timeout=5)
    c.request("GET", "/")
    r = c.getresponse(); r.read(); c.close()
    counts["http"] += 1
def query(name, qid):
    pkt = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    pkt += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
    # A connected socket, as the C library's resolver uses.
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
    s.connect((dns, 53)); s.send(pkt); s.recv(512); s.close()
    counts["dns"] += 1
def connect(host, port, timeout, key):
    s = socket.socket(); s.settimeout(timeout)
    try:
        s.connect((host, port))
    except (socket.timeout, ConnectionRefusedError):
        counts[key] += 1
    finally:
        s.close()
end = time.monotonic() + seconds
i = 0
while time.monotonic() < end:
    try:
        get(app, 8080); get(slow, 9090)
        query("ok.test", 2 * i % 65536); query("missing%d.test" % (i % 3), (2 * i + 1) % 65536)
        if i % 4 == 0:
            query("outside.example", 7)  # dnsmasq has no upstream: REFUSED
        if i % 3 == 0:
            connect(app, 7777, 0.3, "dropped")
        connect(app, 1, 1.0, "refused")
        https(tls, 8443)
        if i % 4 == 0:
            tls_refused(tls, 8443)
    except Exception as e:
        counts["errors"].append(repr(e))
    i += 1
    time.sleep(0.02)
print(json.dumps(counts), flush=True)
"#;

pub(crate) fn start_server(
    tb: &mut Testbed,
    pod: &Pod,
    name: &str,
    port: u16,
    upstream: Option<&str>,
) {
    let ip = pod.ip.to_string();
    let port = port.to_string();
    let mut args = vec!["python3", "-c", SERVER, name, &ip, &port];
    if let Some(u) = upstream {
        args.push(u);
    }
    spawn_ready(tb, pod, &args, name);
}

/// Starts a Python server in `pod` and waits for its `ready` line.
fn spawn_ready(tb: &mut Testbed, pod: &Pod, args: &[&str], name: &str) {
    let mut child = pod.command(args).stdout(Stdio::piped()).spawn().expect("python3 is installed");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped"))
        .read_line(&mut line)
        .expect("server says ready");
    assert_eq!(line.trim(), "ready", "{name} did not start");
    tb.adopt(child);
}

/// [`TLS_SERVER`] on port 8443 of `pod`, with a certificate made for it in the returned
/// directory.
fn start_tls_server(tb: &mut Testbed, pod: &Pod) -> crate::support::servers::TempDir {
    let dir = crate::support::servers::TempDir::new("hwm-tls");
    let (cert, key) = dir.self_signed_cert(pod, "hwm-tls", None);
    let ip = pod.ip.to_string();
    let args = ["python3", "-c", TLS_SERVER, &ip, "8443", &cert, &key];
    spawn_ready(tb, pod, &args, "hwm-tls");
    dir
}

fn start_dnsmasq(tb: &mut Testbed, pod: &Pod) {
    let child = pod
        .command(&[
            "dnsmasq",
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--conf-file=/dev/null",
            &format!("--listen-address={}", pod.ip),
            "--bind-interfaces",
            "--port=53",
            "--local=/test/",
            "--address=/ok.test/10.9.9.9",
            "--pid-file=",
        ])
        .stderr(Stdio::null())
        .spawn()
        .expect("dnsmasq is installed (`cargo xtask test` installs dnsmasq-base)");
    tb.adopt(child);
}

pub(crate) fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("hopwatch/ is in the repository")
        .to_owned()
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).expect("after 1970").as_secs_f64()
}

/// A dashboard target as the test evaluates it.
struct Query {
    board: String,
    panel: String,
    expr: String,
}

/// Every panel query of every dashboard, with Grafana's variables filled in: all nodes and
/// namespaces, and the workloads of this test (either end of a hop).
fn dashboard_queries(workloads: &str) -> (Vec<Query>, Vec<(String, String)>) {
    let mut queries = Vec::new();
    let mut variables = Vec::new();
    let dir = repo_root().join("dashboards");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("dashboards/ exists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 4, "four dashboards: {files:?}");
    let fill = |e: &str| {
        e.replace("$__rate_interval", RATE_INTERVAL)
            .replace("$__range", RANGE)
            .replace("$node", ".*")
            .replace("$namespace", ".*")
            .replace("$workload", workloads)
    };
    for f in files {
        let text = std::fs::read_to_string(&f).expect("read dashboard");
        let d: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let board = d["title"].as_str().expect("title").to_owned();
        assert!(d["schemaVersion"].as_u64().is_some_and(|v| v >= 36), "{board}: current schema");
        let vars = d["templating"]["list"].as_array().expect("variables");
        let names: Vec<&str> = vars.iter().filter_map(|v| v["name"].as_str()).collect();
        for want in ["datasource", "node", "namespace", "workload"] {
            assert!(names.contains(&want), "{board}: no ${want} variable");
        }
        for v in vars.iter().filter(|v| v["type"] == "query") {
            variables
                .push((board.clone(), fill(v["definition"].as_str().expect("variable query"))));
        }
        for p in d["panels"].as_array().expect("panels") {
            let panel = p["title"].as_str().unwrap_or("").to_owned();
            assert!(!panel.is_empty(), "{board}: a panel without a title");
            let unit = p["fieldConfig"]["defaults"]["unit"].as_str().unwrap_or("");
            assert!(!unit.is_empty(), "{board} / {panel}: no unit");
            assert_eq!(
                p["datasource"]["uid"], "${datasource}",
                "{board} / {panel}: datasource is the variable"
            );
            for t in p["targets"].as_array().expect("targets") {
                let expr = fill(t["expr"].as_str().expect("expr"));
                queries.push(Query { board: board.clone(), panel: panel.clone(), expr });
            }
        }
    }
    (queries, variables)
}

/// Families only application-protocol (L7) flows feed.
fn needs_l7(expr: &str) -> bool {
    [
        "hopwatch_hop_request",
        "hopwatch_dns_",
        "hopwatch:hop_request",
        "hopwatch:hop_requests",
        "hopwatch:hop_error",
        "hopwatch:dns",
    ]
    .iter()
    .any(|f| expr.contains(f))
}

fn value_of(sample: &Value) -> f64 {
    sample["value"][1].as_str().and_then(|v| v.parse().ok()).unwrap_or(f64::NAN)
}

#[test]
fn prometheus_scrapes_hops_and_every_dashboard_query_and_rule_works() {
    let _serial = serial();
    let mut tb = Testbed::new();
    let (front, app, db, slow, dns) =
        (tb.pod("front"), tb.pod("app"), tb.pod("db"), tb.pod("slow"), tb.pod("dns"));
    // The in-process collector on a port of its own: `hopwatch hops --server` reads from it.
    let collector = format!("127.0.0.1:{}", prometheus::free_port());
    let agent = Agent::start(&["--bpf-stats", "--listen", &collector]);
    let metrics = agent.metrics_addr();

    start_server(&mut tb, &db, "hwm-db", 5432, None);
    start_server(&mut tb, &app, "hwm-app", 8080, Some(&format!("http://{}:5432/", db.ip)));
    start_server(&mut tb, &slow, "hwm-slow", 9090, None);
    start_dnsmasq(&mut tb, &dns);
    let _tls_dir = start_tls_server(&mut tb, &db);
    tb.delay(&front, &slow, SLOW);
    tb.delay(&app, &db, DB_DELAY);
    app.nft("table inet hwm {\n chain input {\n  type filter hook input priority 0;\n  tcp dport 7777 drop\n }\n}\n");

    let rules = repo_root().join("deploy/prometheus/hopwatch-rules.yaml");
    let prom = Prometheus::start(metrics, &rules);

    let t0 = unix_now();
    let out = front
        .command(&[
            "python3",
            "-c",
            CLIENT,
            &app.ip.to_string(),
            &slow.ip.to_string(),
            &dns.ip.to_string(),
            &TRAFFIC_S.to_string(),
            &db.ip.to_string(),
        ])
        .output()
        .expect("client ran");
    let counts: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("client printed {:?}: {e}", String::from_utf8_lossy(&out.stdout))
    });
    eprintln!("client: {counts}");
    assert!(counts["http"].as_u64().unwrap_or(0) >= 20, "too little traffic: {counts}");
    assert!(counts["dropped"].as_u64().unwrap_or(0) >= 3, "{counts}");
    assert!(counts["refused"].as_u64().unwrap_or(0) >= 3, "{counts}");
    assert!(counts["tls"].as_u64().unwrap_or(0) >= 10, "{counts}");
    assert!(counts["tls_refused"].as_u64().unwrap_or(0) >= 3, "{counts}");
    assert_eq!(counts["errors"].as_array().map_or(0, Vec::len), 0, "{counts}");
    let t_traffic_end = unix_now();
    // A few scrapes and rule evaluations after the traffic.
    std::thread::sleep(Duration::from_secs(4));
    let t_eval = t_traffic_end + 2.0;

    // The agent's probes, and its scrape target as Prometheus sees it.
    assert_eq!(prometheus::http(metrics, "GET", "/readyz", "").expect("readyz").0, 200);
    assert_eq!(prometheus::http(metrics, "GET", "/healthz", "").expect("healthz").0, 200);
    let targets = prom.get("/api/v1/targets");
    let target = &targets["activeTargets"][0];
    assert_eq!(target["health"], "up", "scrape target: {target}\n{}", prom.log());

    let l7_flows = agent.flows().iter().filter(|f| f["Type"] == "L7").count();
    assert!(l7_flows > 0, "the agent produced no L7 flows for the HTTP and DNS traffic");

    let workloads = format!("hwm-.*|10\\\\.213\\\\.{}\\\\..*", front.ip.octets()[2]);
    let mut failures = Vec::new();
    // Every panel describes traffic this test generated: every query must return data.
    check_dashboards(&prom, &workloads, t_eval, |_| true, &mut failures);
    check_rules(&prom, &rules, t_eval, &mut failures);
    assert!(failures.is_empty(), "{} failed checks:\n{}", failures.len(), failures.join("\n"));

    // `hopwatch hops` over the collector's GetFlows, and over the same flows as JSON lines.
    check_hops_cli(&["--server", &collector], t0);
    let file = std::env::temp_dir().join(format!("hopwatch-e2e-flows-{}.json", std::process::id()));
    let lines: Vec<String> = agent.lines().iter().map(Value::to_string).collect();
    std::fs::write(&file, lines.join("\n") + "\n").expect("write flows");
    check_hops_cli(&["--input", file.to_str().expect("UTF-8 temp path")], t0);
    let _ = std::fs::remove_file(&file);
}

/// Evaluates every dashboard query (and variable) at `t_eval` with `$workload` = `workloads`: all
/// must be valid; those `must_have_data` selects must return data; latency rankings must put
/// the slow hop first.
fn check_dashboards(
    prom: &Prometheus,
    workloads: &str,
    t_eval: f64,
    must_have_data: impl Fn(&str) -> bool,
    failures: &mut Vec<String>,
) {
    let (queries, variables) = dashboard_queries(workloads);
    for (board, q) in &variables {
        check_variable(prom, board, q, failures);
    }
    for q in &queries {
        let result = match prom.query(&q.expr, t_eval) {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("{} / {}: invalid: {e}\n  {}", q.board, q.panel, q.expr));
                continue;
            }
        };
        let finite: Vec<&Value> = result.iter().filter(|s| value_of(s).is_finite()).collect();
        if must_have_data(&q.expr) && finite.is_empty() {
            failures.push(format!("{} / {}: no data\n  {}", q.board, q.panel, q.expr));
            continue;
        }
        eprintln!("ok {} / {}: {} series", q.board, q.panel, result.len());
        let by_hop = result.iter().any(|s| s["metric"]["destination_port"].is_string());
        if ranks_latency(&q.panel) && by_hop && !finite.is_empty() {
            let top = finite
                .iter()
                .max_by(|a, b| value_of(a).total_cmp(&value_of(b)))
                .expect("non-empty");
            eprintln!("   slowest: {} at {:.4} s", top["metric"], value_of(top));
            if top["metric"]["destination_port"] != SLOW_PORT {
                failures.push(format!(
                    "{} / {}: the slowest hop is {} ({} s), not the slow hop to port {SLOW_PORT}",
                    q.board,
                    q.panel,
                    top["metric"],
                    value_of(top)
                ));
            }
        }
    }
}

/// Panels that rank hops by a client-side or connect latency: the injected slow hop must lead.
fn ranks_latency(panel: &str) -> bool {
    let p = panel.to_lowercase();
    (p.contains("latency") || p.contains("slow") || p.contains("connect p99"))
        && !p.contains("server side")
        && !p.contains("dns")
}

/// `label_values(selector, label)` as Grafana asks Prometheus for it.
fn check_variable(prom: &Prometheus, board: &str, q: &str, failures: &mut Vec<String>) {
    let inner = q
        .strip_prefix("label_values(")
        .and_then(|r| r.strip_suffix(')'))
        .expect("label_values(...)");
    let (selector, label) = inner.rsplit_once(", ").expect("selector, label");
    let path = format!("/api/v1/label/{label}/values?match[]={}", prometheus::urlencode(selector));
    let values = prom.get(&path);
    let n = values.as_array().map_or(0, Vec::len);
    // Off Kubernetes every namespace is empty, which Prometheus does not list as a value.
    if n == 0 && !label.ends_with("namespace") {
        failures.push(format!("{board}: variable query {q} lists nothing"));
    }
}

/// `promtool check rules`, the rules' unit tests, the PrometheusRule copy, and every rule as the
/// Prometheus scraping the agent evaluated it.
fn check_rules(prom: &Prometheus, rules: &Path, t_eval: f64, failures: &mut Vec<String>) {
    for args in [vec!["check", "rules"], vec!["test", "rules"]] {
        let file =
            if args[0] == "test" { rules.with_extension("test.yaml") } else { rules.to_owned() };
        let out = Command::new("promtool")
            .args(&args)
            .arg(&file)
            .output()
            .expect("promtool is installed");
        assert!(
            out.status.success(),
            "promtool {} {}: {}{}",
            args.join(" "),
            file.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = std::fs::read_to_string(rules).expect("read rules");
    let groups = &text[text.find("groups:").expect("groups")..];
    let operator =
        std::fs::read_to_string(repo_root().join("deploy/kubernetes/prometheusrule.yaml"))
            .expect("read the PrometheusRule");
    let spec = &operator[operator.find("spec:\n").expect("spec") + "spec:\n".len()..];
    let dedented: String =
        spec.lines().map(|l| l.strip_prefix("  ").unwrap_or(l)).collect::<Vec<_>>().join("\n")
            + "\n";
    assert_eq!(
        dedented, groups,
        "deploy/kubernetes/prometheusrule.yaml differs from the rules file"
    );

    let loaded = prom.get("/api/v1/rules");
    let mut n = 0;
    for g in loaded["groups"].as_array().expect("rule groups") {
        for r in g["rules"].as_array().expect("rules") {
            n += 1;
            let name = r["name"].as_str().unwrap_or("?");
            if r["health"] != "ok" {
                failures.push(format!("rule {name}: health {} {}", r["health"], r["lastError"]));
            }
            let expr = r["query"].as_str().expect("rule query");
            if let Err(e) = prom.query(expr, t_eval) {
                failures.push(format!("rule {name}: invalid: {e}"));
            }
            // The signal an alert compares (its left operand, a recording rule), or the recording
            // rule itself, must have data for the traffic generated.
            let signal = if r["type"] == "alerting" {
                expr.split_whitespace().next().unwrap_or("")
            } else {
                name
            };
            match prom.query(signal, t_eval) {
                Ok(v) if !v.is_empty() => {
                    eprintln!("ok rule {name}: signal {signal}: {} series", v.len());
                }
                Ok(_) => failures.push(format!("rule {name}: signal {signal} has no data")),
                Err(e) => failures.push(format!("rule {name}: signal {signal}: {e}")),
            }
        }
    }
    assert_eq!(n, 22, "every rule of the file is loaded");
}

/// `hopwatch hops -o json` over the agent's flows from `source` (`--server` or `--input`): the
/// slow hop leads with its injected latency, and `--path` chains front → app → db.
fn check_hops_cli(source: &[&str], t0: f64) {
    // Everything since the test began (and a margin), in whole seconds.
    let since = format!("{:.0}s", (unix_now() - t0).ceil() + 5.0);
    let hops = |extra: &[&str]| -> Value {
        let out = Command::new(BIN)
            .arg("hops")
            .args(source)
            .args(["--since", &since, "--pod", "hwm-", "-o", "json"])
            .args(extra)
            .output()
            .expect("run hopwatch hops");
        assert!(
            out.status.success(),
            "hopwatch hops {source:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("hops -o json is JSON")
    };
    let by_connect = hops(&["--sort", "connect-p99"]);
    let top = &by_connect["hops"][0];
    assert_eq!(top["port"], 9090, "the slow hop leads by connect p99: {by_connect:#}");
    let ms = |v: &Value| v.as_f64().unwrap_or(0.0) / 1e6;
    let injected = SLOW.as_secs_f64() * 1e3;
    let connect = ms(&top["connect_latency"]["p50_ns"]);
    eprintln!("hops {source:?}: slow hop connect p50 {connect:.1} ms (injected {injected} ms)");
    // Tolerance: never below the injected delay; above it by the veth round trip and the
    // delayer's and scheduler's jitter on a busy 2-core machine.
    assert!((injected..injected + 25.0).contains(&connect), "connect p50 {connect} ms: {top:#}");
    let by_p99 = hops(&[]);
    let top = &by_p99["hops"][0];
    assert_eq!(top["port"], 9090, "the slow hop leads by p99: {by_p99:#}");
    let p50 = ms(&top["client_latency"]["p50_ns"]);
    eprintln!("hops {source:?}: slow hop request p50 {p50:.1} ms (client side)");
    assert!((injected..injected + 40.0).contains(&p50), "request p50 {p50} ms: {top:#}");
    let paths = hops(&["--path"]);
    let chained = paths["paths"].as_array().expect("paths").iter().any(|p| {
        let steps = p["steps"].as_array().expect("steps");
        steps.iter().any(|s| s["depth"] == 0 && s["hop"]["destination"]["name"] == "hwm-app")
            && steps.iter().any(|s| s["depth"] == 1 && s["hop"]["destination"]["name"] == "hwm-db")
    });
    assert!(chained, "no path hwm-front → hwm-app → hwm-db: {paths:#}");
}
