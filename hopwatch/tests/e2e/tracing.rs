//! Request tracing on real software: client → nginx (TLS) → FastAPI (uvicorn) → PostgreSQL,
//! Redis and MariaDB. The truth is what the test sent: which request made which call.

use std::time::Duration;

use serde_json::Value;

use crate::support::{
    Testbed,
    agent::{Agent, BIN, exchange, observe},
    serial,
    servers::topology::Topology,
};

const WAIT: Duration = Duration::from_secs(30);

fn s<'a>(f: &'a Value, path: &[&str]) -> &'a str {
    path.iter().fold(f, |v, k| &v[k]).as_str().unwrap_or_default()
}

fn span(f: &Value) -> &str {
    s(f, &["l7", "span", "span_id"])
}

fn parent(f: &Value) -> &str {
    s(f, &["l7", "span", "parent_span_id"])
}

fn trace(f: &Value) -> &str {
    s(f, &["trace_context", "parent", "trace_id"])
}

#[test]
fn one_request_is_one_trace_from_the_ingress_socket_to_its_database_calls() {
    let _serial = serial();
    let mut tb = Testbed::new();
    let agent = Agent::start(&[]);
    let t = Topology::start(&mut tb);
    assert_eq!(t.get("/chain").status, 200);
    let chain = |h: &Value| s(h, &["url"]).ends_with("/chain");
    let wait = |what: &str, p: &dyn Fn(&Value) -> bool| agent.wait_for(what, WAIT, p);
    let ingress_c =
        wait("GET /chain at curl", &exchange("http", "EGRESS", &t.client, &t.ingress, chain));
    let ingress_s =
        wait("GET /chain at nginx", &exchange("http", "INGRESS", &t.client, &t.ingress, chain));
    let upstream_c =
        wait("GET /chain from nginx", &exchange("http", "EGRESS", &t.ingress, &t.app_pod, chain));
    let upstream_s =
        wait("GET /chain at the app", &exchange("http", "INGRESS", &t.ingress, &t.app_pod, chain));
    let count = |q: &Value| s(q, &["query"]).contains("count(*) FROM users");
    let pg = wait(
        "the app's PostgreSQL query",
        &exchange("postgres", "EGRESS", &t.app_pod, &t.db, count),
    );
    let pg_s =
        wait("the query at PostgreSQL", &exchange("postgres", "INGRESS", &t.app_pod, &t.db, count));
    let incr = |r: &Value| s(r, &["command"]).starts_with("INCR");
    let redis =
        wait("the app's Redis INCR", &exchange("redis", "EGRESS", &t.app_pod, &t.cache, incr));
    let select = |m: &Value| s(m, &["query"]).contains("SELECT");
    let mysql =
        wait("the app's MariaDB query", &exchange("mysql", "EGRESS", &t.app_pod, &t.mysql, select));

    // Both ends of each exchange are one span.
    for (c, srv) in [(&ingress_c, &ingress_s), (&upstream_c, &upstream_s), (&pg, &pg_s)] {
        assert_eq!(span(c).len(), 16, "{c}");
        assert_eq!(span(c), span(srv), "one span per exchange:\n{c}\n{srv}");
    }
    // curl serves nothing: its request starts the trace.
    assert_eq!(parent(&ingress_c), "", "{ingress_c}");
    // nginx named the request its upstream request serves; the app's event loop was serving
    // exactly the upstream request when it queried the databases.
    assert_eq!(parent(&upstream_c), span(&ingress_c), "{upstream_c}");
    assert_eq!(s(&upstream_c, &["l7", "span", "link"]), "nginx");
    for call in [&pg, &redis, &mysql] {
        assert_eq!(parent(call), span(&upstream_c), "{call}");
    }
    let id = trace(&ingress_c);
    assert_eq!(id.len(), 32, "{ingress_c}");
    for f in [&ingress_s, &upstream_c, &upstream_s, &pg, &pg_s, &redis, &mysql] {
        assert_eq!(trace(f), id, "every exchange of the request is in its trace: {f}");
    }

    // The same trace through the agent's collector: Hubble's trace-id filter, and the waterfall.
    let collector = agent.collector_addr();
    let wanted: Vec<&str> = [&ingress_c, &upstream_c, &pg, &redis, &mysql].map(span).to_vec();
    let deadline = std::time::Instant::now() + WAIT;
    let in_trace = loop {
        // The agent ships flows to its collector in batches: wait for the last of them.
        let got = observe(&collector, &["--trace-id", id]);
        let spans: Vec<&str> = got.iter().map(span).collect();
        if wanted.iter().all(|w| spans.contains(w)) {
            break got;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "observe --trace-id {id} has spans {spans:?}, not all of {wanted:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(in_trace.iter().all(|f| trace(f) == id), "{in_trace:?}");
    let out = std::process::Command::new(BIN)
        .args(["trace", "--server", &collector, id])
        .output()
        .expect("run hopwatch trace");
    let waterfall = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    eprintln!("{waterfall}");
    let line = |needle: &str| {
        waterfall
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("{needle}: {waterfall}"))
    };
    let (entry, proxied, query) =
        (line("curl → nginx"), line("nginx → python"), line("python → postgres"));
    assert!(entry.contains("100%"), "the entry exchange spans the trace: {waterfall}");
    assert!(proxied.contains("via nginx") && query.contains("via thread"), "{waterfall}");
    // The app's queries (asyncpg also resets the pooled connection while serving it).
    let calls = proxied.split('(').nth(1).and_then(|c| c.split(' ').next()?.parse::<u32>().ok());
    assert!(calls.is_some_and(|n| n >= 3), "{waterfall}");

    linked_path_through(&collector);
}

/// `hops --path` through the collector at `collector` chains the hops along the tracer's links:
/// curl → nginx → the app → PostgreSQL.
fn linked_path_through(collector: &str) {
    let out = std::process::Command::new(BIN)
        .args(["hops", "--path", "--server", collector, "--since", "5m", "-o", "json"])
        .output()
        .expect("run hopwatch hops --path");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let hops: Value = serde_json::from_slice(&out.stdout).expect("hops -o json is JSON");
    let step = |st: &Value| {
        let to = st["hop"]["destination"]["name"].as_str().unwrap_or_default().to_owned();
        (st["depth"].as_u64().unwrap_or(99), to, st["via"].as_str().unwrap_or_default().to_owned())
    };
    let chained = hops["paths"].as_array().expect("paths").iter().any(|p| {
        let steps: Vec<_> = p["steps"].as_array().expect("steps").iter().map(step).collect();
        let has = |d: u64, to: &str, via: &str| {
            steps.iter().any(|(sd, sto, svia)| *sd == d && sto.contains(to) && svia == via)
        };
        has(0, "nginx", "entry") && has(1, "python", "link") && has(2, "postgres", "link")
    });
    let table = std::process::Command::new(BIN)
        .args(["hops", "--path", "--server", collector, "--since", "5m"])
        .output()
        .expect("run hopwatch hops --path");
    eprintln!("{}", String::from_utf8_lossy(&table.stdout));
    assert!(chained, "no linked path curl → nginx → python → postgres: {hops:#}");
    assert!(hops["links"]["linked"].as_u64().unwrap_or(0) >= 4, "{:#}", hops["links"]);
}

#[test]
fn concurrent_requests_on_event_loops_are_linked_right_or_left_unlinked() {
    // Blind (the client's X-Request-ID is there, not looked at): nginx names the request each
    // upstream request serves, whatever its worker has in flight; on uvicorn's event loop the
    // asyncio task that sent a query answered the request it was made for. The truth is each
    // request's token, in its URL, its SQL literal and its Redis key.
    for n in [1, 8, 32] {
        let run = concurrent_through_nginx(n, &["--trace-headers", "none"]);
        eprintln!("concurrency {n}, blind: {run:?}");
        assert_eq!(
            run.nginx.by.get("nginx"),
            Some(&n),
            "every upstream request, by nginx: {run:?}"
        );
        // Every query: by thread causality while the loop served one request, else by the task
        // that sent it (asyncpg writes from the caller's task).
        let linked: usize = run.postgres.by.values().sum();
        assert_eq!(linked, n, "every PostgreSQL query linked: {run:?}");
        if n == 1 {
            // One request in flight: its Redis GET too, though redis-py sends it from a task of
            // its own (at higher concurrency those stay unlinked, and every link is checked).
            assert_eq!(run.redis.by.get("thread"), Some(&1), "{run:?}");
        } else {
            assert!(run.postgres.by.contains_key("coroutine"), "{run:?}");
            // The naive rule (an event loop's current request is the one it read last) links
            // some query to another request on the same data.
            assert!(run.naive_wrong > 0, "the naive rule was right every time: {run:?}");
        }
    }
    // Without the nginx uprobe, the client's X-Request-ID (which nginx passes on) links each of
    // nginx's upstream requests to the one inbound request that carried the same id.
    let run = concurrent_through_nginx(8, &["--no-nginx-uprobe"]);
    eprintln!("concurrency 8, X-Request-ID, no nginx uprobe: {run:?}");
    // (Thread causality still links those made while the worker served one request alone.)
    let linked: usize = run.nginx.by.values().sum();
    assert!(linked == 8 && !run.nginx.by.contains_key("nginx"), "every upstream request: {run:?}");
    assert!(run.nginx.by.contains_key("header:x-request-id"), "{run:?}");
}

/// How the calls of one kind were linked, all checked against the truth.
#[derive(Debug, Default)]
struct Score {
    /// Linked calls by link method (every one to the right request).
    by: std::collections::BTreeMap<String, usize>,
    /// Calls left unlinked (ambiguous or unfollowed).
    unlinked: usize,
}

/// One run of [`concurrent_through_nginx`], scored against the truth.
#[derive(Debug, Default)]
struct Run {
    /// nginx's upstream requests.
    nginx: Score,
    /// The app's PostgreSQL queries (sent from the request's task).
    postgres: Score,
    /// The app's Redis GETs (redis-py sends each from a task of its own, `asyncio.wait_for`'s
    /// on Python 3.11: no coroutine link; linked by thread causality at most).
    redis: Score,
    /// The naive rule on the queries: linked to the request the app read last before each.
    naive_right: usize,
    naive_wrong: usize,
}

/// `n` clients at once through nginx, each with its own token (in the URL, the SQL literal, the
/// Redis key and `X-Request-ID`) and a random sleep: the truth joining a request to the request
/// nginx made for it and to the query and Redis command the app sent for that. Checks every
/// link against it.
fn concurrent_through_nginx(n: usize, extra: &[&str]) -> Run {
    let _serial = serial();
    let mut tb = Testbed::new();
    let mut args = vec!["--keep-full-statements"];
    args.extend_from_slice(extra);
    let agent = Agent::start(&args);
    let t = Topology::start(&mut tb);
    let keys: Vec<String> = (0..n).map(|i| format!("hwtrace{i}n{n}")).collect();
    // Sleeps spread over 0–40 ms, different for each request (deterministic, so a failure
    // replays).
    let sleep = |i: usize| (i * 37 + n * 11) % 41;
    std::thread::scope(|scope| {
        for (i, k) in keys.iter().enumerate() {
            let t = &t;
            let path = format!("/trace?token={k}&ms={}", sleep(i));
            scope.spawn(move || t.get_with(&path, &[&format!("X-Request-ID: {k}")]));
        }
    });
    let ingress = |f: &Value| exchange("http", "EGRESS", &t.client, &t.ingress, |_| true)(f);
    let upstream = |f: &Value| exchange("http", "EGRESS", &t.ingress, &t.app_pod, |_| true)(f);
    let served = |f: &Value| exchange("http", "INGRESS", &t.ingress, &t.app_pod, |_| true)(f);
    let gets = |f: &Value| {
        exchange("redis", "EGRESS", &t.app_pod, &t.cache, |r| s(r, &["command"]) == "GET")(f)
    };
    let queries = |f: &Value| {
        exchange("postgres", "EGRESS", &t.app_pod, &t.db, |q| s(q, &["query"]).contains("hwtrace"))(
            f,
        )
    };
    agent.wait_for_n("the Redis GETs", WAIT, n, gets);
    agent.wait_for_n("the PostgreSQL queries", WAIT, n, queries);
    agent.wait_for_n("the upstream requests", WAIT, n, upstream);
    agent.wait_for_n("the upstream requests at the app", WAIT, n, served);
    agent.wait_for_n("the requests to nginx", WAIT, n, ingress);
    let flows = agent.flows();
    let redis_key = |f: &Value| f["l7"]["redis"]["args"][0].as_str().unwrap_or_default().to_owned();
    let query_key = |f: &Value| {
        let q = s(&f["l7"]["postgres"], &["query"]);
        q.split('\'').nth(1).unwrap_or_default().to_owned()
    };
    let mut run = Run {
        nginx: score_n(&flows, &keys, &upstream, &url_key, &ingress),
        postgres: score_n(&flows, &keys, &queries, &query_key, &upstream),
        redis: score_n(&flows, &keys, &gets, &redis_key, &upstream),
        ..Run::default()
    };
    // The naive rule: each query's parent is the request the app started reading last before it.
    for q in flows.iter().filter(|f| queries(f)) {
        let at = start_ns(q);
        let last_read = flows
            .iter()
            .filter(|f| served(f) && keys.contains(&url_key(f)) && start_ns(f) <= at)
            .max_by_key(|f| start_ns(f));
        if last_read.is_some_and(|r| url_key(r) == query_key(q)) {
            run.naive_right += 1;
        } else {
            run.naive_wrong += 1;
        }
    }
    run
}

/// The request token of an HTTP exchange's URL (`...token=T&...` or `...key=T`).
fn url_key(f: &Value) -> String {
    let url = s(f, &["l7", "http", "url"]);
    let after =
        url.rsplit_once("token=").or_else(|| url.rsplit_once("key=")).map_or("", |(_, k)| k);
    after.split('&').next().unwrap_or_default().to_owned()
}

/// When an exchange's request started: its time (the response's) less its latency, in ns of
/// the month (a run does not span months).
fn start_ns(f: &Value) -> i128 {
    let time = s(f, &["time"]);
    let field = |from: usize, to: usize| time.get(from..to).and_then(|v| v.parse::<i128>().ok());
    let (Some(day), Some(h), Some(m), Some(sec)) =
        (field(8, 10), field(11, 13), field(14, 16), field(17, 19))
    else {
        panic!("a flow time as RFC 3339: {time}");
    };
    let frac = time.get(20..).unwrap_or("").trim_end_matches('Z');
    let nanos: i128 = format!("{frac:0<9}").get(..9).and_then(|v| v.parse().ok()).unwrap_or(0);
    let latency = &f["l7"]["latency_ns"];
    let latency =
        latency.as_u64().or_else(|| latency.as_str().and_then(|v| v.parse().ok())).unwrap_or(0);
    (((day * 24 + h) * 60 + m) * 60 + sec) * 1_000_000_000 + nanos - i128::from(latency)
}

/// Checks every call (`is_call`, keyed by `key`) against the truth: linked to the request
/// (`is_request`, keyed by its URL) with the same key, or left unlinked saying why.
fn score_n(
    flows: &[Value],
    keys: &[String],
    is_call: &dyn Fn(&Value) -> bool,
    key: &dyn Fn(&Value) -> String,
    is_request: &dyn Fn(&Value) -> bool,
) -> Score {
    let request_key = |span_id: &str| {
        let f = flows.iter().filter(|f| is_request(f)).find(|f| span(f) == span_id)?;
        Some(url_key(f))
    };
    let mut score = Score::default();
    for call in flows.iter().filter(|f| is_call(f)) {
        let k = key(call);
        if !keys.contains(&k) {
            continue;
        }
        if parent(call).is_empty() {
            // Unlinked, and saying why: never a guess.
            let why = s(call, &["l7", "span", "unlinked"]);
            assert!(["ambiguous", "unfollowed"].contains(&why), "{call}");
            score.unlinked += 1;
            continue;
        }
        assert_eq!(
            request_key(parent(call)).as_deref(),
            Some(k.as_str()),
            "a call linked to the request of another key: {call}"
        );
        *score.by.entry(s(call, &["l7", "span", "link"]).to_owned()).or_default() += 1;
    }
    let linked: usize = score.by.values().sum();
    assert_eq!(linked + score.unlinked, keys.len(), "every call seen once");
    score
}

/// Arize Phoenix, a real OTLP trace receiver with a span query API, on loopback (from
/// target/otlp-venv, which `cargo xtask test` makes); stopped on drop.
struct Phoenix {
    child: std::process::Child,
    http: u16,
    grpc: u16,
    _dir: tempfile::TempDir,
}

impl Phoenix {
    fn start() -> Self {
        let bin = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/otlp-venv/bin/phoenix");
        assert!(
            std::path::Path::new(bin).exists(),
            "{bin} is missing: `cargo xtask test` installs Arize Phoenix (the OTLP receiver) there"
        );
        let port = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .expect("a free port")
                .local_addr()
                .unwrap()
                .port()
        };
        let (http, grpc) = (port(), port());
        let dir = tempfile::tempdir().expect("a working directory");
        let child = std::process::Command::new(bin)
            .arg("serve")
            .env("PHOENIX_WORKING_DIR", dir.path())
            .env("PHOENIX_HOST", "127.0.0.1")
            .env("PHOENIX_PORT", http.to_string())
            .env("PHOENIX_GRPC_PORT", grpc.to_string())
            .env("PHOENIX_TELEMETRY_ENABLED", "false")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start phoenix");
        let phoenix = Self { child, http, grpc, _dir: dir };
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        while phoenix.get("/healthz").is_none() {
            assert!(std::time::Instant::now() < deadline, "Phoenix not ready after 90 s");
            std::thread::sleep(Duration::from_millis(250));
        }
        phoenix
    }

    fn get(&self, path: &str) -> Option<String> {
        let out = std::process::Command::new("curl")
            .args(["-sf", "--max-time", "5", &format!("http://127.0.0.1:{}{path}", self.http)])
            .output()
            .ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The spans Phoenix stored (its default project), as its REST API returns them.
    fn spans(&self) -> Vec<Value> {
        let body = self.get("/v1/projects/default/spans?limit=1000").unwrap_or_default();
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        v["data"].as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Phoenix {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn traces_reach_an_otlp_receiver_as_spans_with_their_parents() {
    let _serial = serial();
    let phoenix = Phoenix::start();
    let mut tb = Testbed::new();
    let endpoint = format!("http://127.0.0.1:{}", phoenix.grpc);
    let agent = Agent::start(&["--otlp-endpoint", &endpoint]);
    let t = Topology::start(&mut tb);
    assert_eq!(t.get("/chain").status, 200);
    let chain = |h: &Value| s(h, &["url"]).ends_with("/chain");
    let upstream = agent.wait_for(
        "GET /chain from nginx",
        WAIT,
        exchange("http", "EGRESS", &t.ingress, &t.app_pod, chain),
    );
    let count = |q: &Value| s(q, &["query"]).contains("count(*) FROM users");
    let pg = agent.wait_for(
        "the app's PostgreSQL query",
        WAIT,
        exchange("postgres", "EGRESS", &t.app_pod, &t.db, count),
    );
    let id = trace(&pg).to_owned();
    // Phoenix's spans of this trace: one per exchange, both ends merged into one.
    let deadline = std::time::Instant::now() + WAIT;
    let spans = loop {
        let spans: Vec<Value> = phoenix
            .spans()
            .into_iter()
            .filter(|sp| s(sp, &["context", "trace_id"]) == id)
            .collect();
        let has = |want: &str| spans.iter().any(|sp| s(sp, &["context", "span_id"]) == want);
        if has(span(&upstream)) && has(span(&pg)) {
            break spans;
        }
        assert!(std::time::Instant::now() < deadline, "Phoenix has {spans:?} for trace {id}");
        std::thread::sleep(Duration::from_millis(500));
    };
    let by_id = |want: &str| {
        spans.iter().find(|sp| s(sp, &["context", "span_id"]) == want).expect("the span")
    };
    let query = by_id(span(&pg));
    assert_eq!(s(query, &["parent_id"]), span(&upstream), "{query}");
    assert_eq!(s(query, &["attributes", "hopwatch.link"]), "thread", "{query}");
    assert_eq!(s(query, &["attributes", "db.system.name"]), "postgresql", "{query}");
    let proxied = by_id(span(&upstream));
    assert_eq!(s(proxied, &["name"]), "GET /chain", "{proxied}");
    let ids: Vec<&str> = spans.iter().map(|sp| s(sp, &["context", "span_id"])).collect();
    let mut unique = ids.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(ids.len(), unique.len(), "one span per exchange: {ids:?}");
}

#[test]
fn a_thread_per_request_server_links_every_call_to_its_request_at_any_concurrency() {
    let _serial = serial();
    let mut tb = Testbed::new();
    // Full statements: the keys (the truth) stay in the URLs and the Redis arguments.
    let agent = Agent::start(&["--keep-full-statements"]);
    let t = Topology::start(&mut tb);
    let app = ThreadedApp::start(&t);
    for (round, concurrency) in [1usize, 8, 32].into_iter().enumerate() {
        let keys: Vec<String> = (0..concurrency).map(|i| format!("thr{round}k{i}")).collect();
        std::thread::scope(|scope| {
            for k in &keys {
                let url = format!("http://{}:{}/work?key={k}", t.app_pod.ip, ThreadedApp::PORT);
                let client = &t.client;
                scope.spawn(move || {
                    crate::support::servers::output_in(
                        client,
                        &["curl", "-sf", "--max-time", "20", &url],
                    )
                });
            }
        });
        let of_round = |k: &str| keys.iter().any(|x| x == k);
        let requests = |f: &Value| {
            exchange("http", "EGRESS", &t.client, &t.app_pod, |h| {
                s(h, &["url"]).rsplit_once("/work?key=").is_some_and(|(_, k)| of_round(k))
            })(f)
        };
        let gets = |f: &Value| {
            exchange("redis", "EGRESS", &t.app_pod, &t.cache, |r| s(r, &["command"]) == "GET")(f)
                && f["l7"]["redis"]["args"][0].as_str().is_some_and(of_round)
        };
        // Both: a request's flow ends with its response, after the call made for it.
        agent.wait_for_n(&format!("the {concurrency} GETs"), WAIT, concurrency, gets);
        agent.wait_for_n(&format!("the {concurrency} requests"), WAIT, concurrency, requests);
        let flows = agent.flows();
        let redis_key =
            |f: &Value| f["l7"]["redis"]["args"][0].as_str().unwrap_or_default().to_owned();
        let score = score_n(&flows, &keys, &gets, &redis_key, &requests);
        let linked = score.by.get("thread").copied().unwrap_or(0);
        eprintln!("thread-per-request, concurrency {concurrency}: {score:?}");
        if linked != concurrency {
            // Why the others were not: the tracer's outcomes and everything the agent lost.
            // Every link made is right (score_n) and every call is accounted for; on this
            // 2-core VM, at concurrency 32 a call has (rarely, in CI) been left unlinked on the
            // syscall path, with its reason. Up to one in 16 may be, never at lower concurrency.
            let metrics = crate::hardening::http_get(agent.metrics_addr(), "/metrics");
            let why: Vec<&str> = metrics
                .lines()
                .filter(|l| {
                    !l.starts_with('#')
                        && ["trace_links", "lost", "dropped", "full", "overflow"]
                            .iter()
                            .any(|w| l.contains(w))
                })
                .collect();
            eprintln!("not linked, and why:\n{}", why.join("\n"));
            assert!(
                concurrency >= 32 && linked >= concurrency - concurrency / 16,
                "every call of a thread-per-request server is linked: {linked} of {concurrency}"
            );
        }
    }
    drop(app);
}

/// The thread-per-request app (tests/e2e/app/threaded.py) in the app pod.
struct ThreadedApp {
    _process: crate::support::servers::ServerProcess,
    _dir: crate::support::servers::TempDir,
}

impl ThreadedApp {
    const PORT: u16 = 8100;

    fn start(t: &Topology) -> Self {
        let dir = crate::support::servers::TempDir::new("threaded-app");
        let python = crate::support::servers::web::venv_python();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e/app/threaded.py");
        let (host, port) = (t.app_pod.ip.to_string(), Self::PORT.to_string());
        let redis_port = t.redis.port.to_string();
        let redis_host = t.redis.ip.to_string();
        let env = [
            ("APP_HOST", host.as_str()),
            ("APP_PORT", port.as_str()),
            ("APP_REDIS_HOST", redis_host.as_str()),
            ("APP_REDIS_PORT", redis_port.as_str()),
            ("PYTHONDONTWRITEBYTECODE", "1"),
        ];
        let process = crate::support::servers::ServerProcess::spawn(
            "threaded-app",
            &t.app_pod,
            &[python.to_str().expect("UTF-8 path"), script],
            &env,
            dir.path().join("log"),
            libc::SIGTERM,
        );
        let url = format!("http://{host}:{port}/health");
        process.wait_until("answering /health", || {
            t.app_pod
                .command(&["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", &url])
                .output()
                .is_ok_and(|o| o.stdout == b"200")
        });
        Self { _process: process, _dir: dir }
    }
}

#[test]
fn the_client_behind_a_trusted_proxy_is_named_and_a_stranger_s_header_is_not_believed() {
    let _serial = serial();
    let mut tb = Testbed::new();
    let t = Topology::start(&mut tb);
    // nginx sets `X-Forwarded-For: $remote_addr` on its upstream requests.
    let agent = Agent::start(&["--trusted-proxies", &t.ingress.ip.to_string()]);
    assert_eq!(t.get("/health").status, 200);
    let health = |h: &Value| s(h, &["url"]).ends_with("/health");
    let at_app = agent.wait_for(
        "GET /health at the app, from nginx",
        WAIT,
        exchange("http", "INGRESS", &t.ingress, &t.app_pod, health),
    );
    assert_eq!(s(&at_app, &["client_ip"]), t.client.ip.to_string(), "{at_app}");
    // The same header sent straight to the app by the client itself names nobody.
    let url = format!("http://{}:8000/health", t.app_pod.ip);
    crate::support::servers::output_in(
        &t.client,
        &["curl", "-sf", "-H", "X-Forwarded-For: 203.0.113.66", &url],
    );
    let direct = agent.wait_for(
        "GET /health at the app, from the client",
        WAIT,
        exchange("http", "INGRESS", &t.client, &t.app_pod, health),
    );
    assert_eq!(s(&direct, &["client_ip"]), "", "a header from an untrusted peer: {direct}");
    // The field is a filter: the client's request through nginx, not nginx's own.
    let collector = agent.collector_addr();
    let client_ip = t.client.ip.to_string();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let found = observe(&collector, &["--client-ip", &client_ip]);
        if found.iter().any(|f| span(f) == span(&at_app)) {
            assert!(found.iter().all(|f| s(f, &["client_ip"]) == client_ip), "{found:?}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "observe --client-ip: {found:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
