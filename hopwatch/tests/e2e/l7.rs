//! Application hops on real software: client → nginx (TLS) → FastAPI → PostgreSQL / Redis /
//! MariaDB, names through dnsmasq. Each test compares the agent's L7 flows with what the test
//! made the servers do (sleeps, errors, injected delays).

use std::time::Duration;

use serde_json::Value;

use crate::support::{
    Testbed,
    agent::{Agent, EXTRA_ARGS_VAR, exchange, ip_src, u64_at},
    serial,
    servers::topology::{MISSING_NAME, PG_NAME, Topology},
};

const WAIT: Duration = Duration::from_secs(20);
const MS: u64 = 1_000_000;

fn text<'a>(v: &'a Value, field: &str) -> &'a str {
    v[field].as_str().unwrap_or_default()
}

fn latency_ms(f: &Value) -> f64 {
    #[expect(clippy::cast_precision_loss, reason = "milliseconds for messages and tolerances")]
    let ms = u64_at(f, &["l7", "latency_ns"]) as f64 / 1e6;
    ms
}

/// Asserts `latency` is at least `at_least` ms and at most `slack` ms more.
fn assert_latency(f: &Value, at_least: u64, slack: u64) {
    let ns = u64_at(f, &["l7", "latency_ns"]);
    assert!(
        (at_least * MS..=(at_least + slack) * MS).contains(&ns),
        "latency {:.1} ms, expected {at_least} ms + up to {slack} ms: {f}",
        latency_ms(f)
    );
}

#[test]
fn database_cache_and_mysql_hops_report_statements_latencies_and_errors() {
    let _serial = serial();
    let mut tb = Testbed::new();
    let agent = Agent::start(&[]);
    let t = Topology::start(&mut tb);

    // PostgreSQL: a 50 ms statement, measured on the app's socket and on PostgreSQL's.
    assert_eq!(t.get("/db/sleep?ms=50").status, 200);
    let sleep = |q: &Value| text(q, "query").contains("pg_sleep");
    let client = agent.wait_for(
        "pg_sleep, app side",
        WAIT,
        exchange("postgres", "EGRESS", &t.app_pod, &t.db, sleep),
    );
    // Tolerance: the statement takes 50 ms; the app's socket adds the veth round trip and the
    // server's scheduling (a few ms on a loaded 2-core machine).
    assert_latency(&client, 50, 30);
    assert_eq!(client["verdict"], "FORWARDED");
    assert_eq!(text(&client["l7"]["postgres"], "command"), "SELECT 1");
    let server = agent.wait_for(
        "pg_sleep, PostgreSQL side",
        WAIT,
        exchange("postgres", "INGRESS", &t.app_pod, &t.db, sleep),
    );
    assert_latency(&server, 50, 20);
    assert_eq!(server["destination_process"]["comm"], "postgres");

    assert_eq!(t.get("/db/error").status, 500);
    let failed = agent.wait_for(
        "the failing query",
        WAIT,
        exchange("postgres", "EGRESS", &t.app_pod, &t.db, |q| {
            text(q, "query").contains("missing_table")
        }),
    );
    assert_eq!(text(&failed["l7"]["postgres"], "error_code"), "42P01");
    assert_eq!(failed["verdict"], "ERROR");
    assert!(text(&failed["l7"], "error").contains("42P01"), "{failed}");

    // Redis: DEBUG SLEEP, an error reply, and a pipeline answered in order.
    assert_eq!(t.get("/cache/sleep?ms=50").status, 200);
    let debug = agent.wait_for(
        "DEBUG SLEEP",
        WAIT,
        exchange("redis", "EGRESS", &t.app_pod, &t.cache, |r| {
            text(r, "command").starts_with("DEBUG")
        }),
    );
    assert_latency(&debug, 50, 30);
    assert!(
        debug["l7"]["redis"]["args"].as_array().is_none_or(Vec::is_empty),
        "arguments are dropped: {debug}"
    );
    assert_eq!(t.get("/cache/error").status, 500);
    let wrong = agent.wait_for(
        "a Redis error reply",
        WAIT,
        exchange("redis", "EGRESS", &t.app_pod, &t.cache, |r| text(r, "command") == "LPUSH"),
    );
    assert!(text(&wrong["l7"]["redis"], "error").starts_with("WRONGTYPE"), "{wrong}");
    assert_eq!(wrong["verdict"], "ERROR");
    assert_eq!(t.get("/cache/pipeline").status, 200);
    // redis-py sends INCR as INCRBY.
    let pipelined = ["SET", "INCRBY", "GET", "DEL"];
    agent.wait_for(
        "the pipeline's last command",
        WAIT,
        exchange("redis", "EGRESS", &t.app_pod, &t.cache, |r| text(r, "command") == "DEL"),
    );
    let commands: Vec<String> = agent
        .flows()
        .iter()
        .filter(|f| exchange("redis", "EGRESS", &t.app_pod, &t.cache, |_| true)(f))
        .map(|f| text(&f["l7"]["redis"], "command").to_owned())
        .collect();
    assert_eq!(
        commands[commands.len() - 4..],
        pipelined,
        "pipelined commands in order: {commands:?}"
    );

    // MariaDB: SELECT SLEEP() and an error code.
    assert_eq!(t.get("/mysql/sleep?ms=50").status, 200);
    let msleep = agent.wait_for(
        "SELECT SLEEP",
        WAIT,
        exchange("mysql", "EGRESS", &t.app_pod, &t.mysql, |m| text(m, "query").contains("SLEEP")),
    );
    assert_latency(&msleep, 50, 30);
    assert!(!text(&msleep["l7"]["mysql"], "query").contains("0.05"), "literals redacted: {msleep}");
    assert_eq!(t.get("/mysql/error").status, 500);
    let merr = agent.wait_for(
        "the MariaDB error",
        WAIT,
        exchange("mysql", "EGRESS", &t.app_pod, &t.mysql, |m| {
            text(m, "query").contains("missing_table")
        }),
    );
    assert_eq!(u64_at(&merr, &["l7", "mysql", "error_code"]), 1146, "{merr}");
    assert_eq!(merr["verdict"], "ERROR");
}

#[test]
fn a_delay_on_the_database_link_shows_on_the_client_side_only() {
    let _serial = serial();
    let mut tb = Testbed::new();
    let agent = Agent::start(&[]);
    let t = Topology::start(&mut tb);
    // Every packet the app sends to PostgreSQL waits 30 ms: the query leaves 30 ms late, the
    // server's own time is unchanged.
    tb.delay(&t.app_pod, &t.db, Duration::from_millis(30));
    assert_eq!(t.get("/db/users").status, 200);
    let users = |q: &Value| text(q, "query").contains("FROM users");
    let client = agent.wait_for(
        "the users query, app side",
        WAIT,
        exchange("postgres", "EGRESS", &t.app_pod, &t.db, users),
    );
    let server = agent.wait_for(
        "the users query, PostgreSQL side",
        WAIT,
        exchange("postgres", "INGRESS", &t.app_pod, &t.db, users),
    );
    assert_latency(&client, 30, 30);
    assert!(
        latency_ms(&server) < 10.0,
        "server side {:.1} ms should not include the link delay: {server}",
        latency_ms(&server)
    );
    // The client flow carries the server's measurement: their difference is the link's share.
    assert_eq!(
        u64_at(&client, &["l7", "peer_latency_ns"]),
        u64_at(&server, &["l7", "latency_ns"]),
        "client {client}\nserver {server}"
    );
}

#[test]
fn https_through_nginx_is_seen_on_the_ingress_and_upstream_hops() {
    let _serial = serial();
    let mut tb = Testbed::new();
    let agent = Agent::start(&[]);
    // Debian 12's OpenSSL 3.0: SSL_read/SSL_write are wrappers the agent sees through, so the
    // plaintext comes from probes on the internal functions (no debug trap per call), unless
    // the run asks for the exported ones (the syscall-path stage does, to test both).
    let tls = agent.announced("its TLS probes", |l| {
        l.strip_prefix("hopwatch agent: tls: on, via ").map(str::to_owned)
    });
    let exported = std::env::var(EXTRA_ARGS_VAR).is_ok_and(|a| a.contains("--tls-probes exported"));
    let want = if exported {
        "uprobe/SSL_read,SSL_read_ex,SSL_write,SSL_write_ex,SSL_do_handshake,SSL_free on "
    } else {
        "uprobe/ssl_read_internal,ssl_write_internal,SSL_do_handshake,SSL_free on "
    };
    assert!(tls.starts_with(want), "{tls}");
    let t = Topology::start(&mut tb);
    // Alternate statuses over nginx's keep-alive upstream connection: each response must be
    // matched to its own request.
    for path in ["/health", "/fail", "/db/users?secret=s3cr3t", "/fail", "/health"] {
        t.get(path);
    }
    let path_is = |want: &'static str| {
        move |h: &Value| text(h, "url").ends_with(want) && h["method"] == "GET"
    };
    // Ingress hop, TLS: curl's and nginx's plaintext through the OpenSSL uprobes.
    let ingress = agent.wait_for(
        "GET /db/users at the client",
        WAIT,
        exchange("http", "EGRESS", &t.client, &t.ingress, path_is("/db/users")),
    );
    assert_eq!(u64_at(&ingress, &["l7", "http", "code"]), 200);
    assert_eq!(ingress["l7"]["tls"], true, "{ingress}");
    assert!(text(&ingress["l7"]["http"], "url").starts_with("https://"), "{ingress}");
    assert!(
        !ingress.to_string().contains("s3cr3t"),
        "query strings never leave the agent: {ingress}"
    );
    let at_nginx = agent.wait_for(
        "GET /db/users at nginx",
        WAIT,
        exchange("http", "INGRESS", &t.client, &t.ingress, path_is("/db/users")),
    );
    assert_eq!(at_nginx["destination_process"]["comm"], "nginx");
    // Upstream hop, plain HTTP/1.1 with keep-alive.
    let upstream = agent.wait_for(
        "GET /db/users upstream",
        WAIT,
        exchange("http", "EGRESS", &t.ingress, &t.app_pod, path_is("/db/users")),
    );
    assert_eq!(u64_at(&upstream, &["l7", "http", "code"]), 200);
    assert!(!upstream["l7"]["tls"].as_bool().unwrap_or(false), "{upstream}");
    // Both /health and both /fail requests, as the app saw them (the first /health alone would
    // not mean the later exchanges were reported yet).
    for path in ["/health", "/fail"] {
        agent.wait_for_n(
            &format!("GET {path} twice upstream"),
            WAIT,
            2,
            exchange("http", "INGRESS", &t.ingress, &t.app_pod, path_is(path)),
        );
    }
    let statuses: Vec<(String, u64)> = agent
        .flows()
        .iter()
        .filter(|f| exchange("http", "INGRESS", &t.ingress, &t.app_pod, |_| true)(f))
        .map(|f| {
            let url = text(&f["l7"]["http"], "url");
            let path = url.rsplit_once('/').map_or(url, |(_, p)| p).to_owned();
            (path, u64_at(f, &["l7", "http", "code"]))
        })
        .collect();
    for (path, code) in &statuses {
        let want = match path.as_str() {
            "health" | "users" => 200,
            "fail" => 500,
            _ => continue,
        };
        assert_eq!(*code, want, "{path} matched to the wrong response: {statuses:?}");
    }
    assert!(statuses.iter().filter(|(p, _)| p == "fail").count() >= 2, "{statuses:?}");
    let fail = agent
        .flows()
        .into_iter()
        .find(|f| exchange("http", "EGRESS", &t.ingress, &t.app_pod, path_is("/fail"))(f))
        .expect("a /fail flow");
    assert_eq!(fail["verdict"], "ERROR");
    assert_eq!(text(&fail["l7"], "error"), "HTTP 500");
}

#[test]
fn dns_lookups_are_reported_with_rcode_answers_and_latency() {
    let _serial = serial();
    let mut tb = Testbed::new();
    let agent = Agent::start(&[]);
    let t = Topology::start(&mut tb);
    let r = t.get("/dns/missing");
    assert_eq!(r.body["resolved"], false);
    let nx = agent.wait_for(
        "the NXDOMAIN lookup",
        WAIT,
        exchange("dns", "EGRESS", &t.app_pod, &t.dns_pod, |d| {
            text(d, "query").starts_with(MISSING_NAME)
        }),
    );
    assert_eq!(u64_at(&nx, &["l7", "dns", "rcode"]), 3);
    assert_eq!(nx["verdict"], "ERROR");
    assert!(u64_at(&nx, &["l7", "latency_ns"]) > 0);
    let r = t.get(&format!("/dns/resolve?name={PG_NAME}"));
    assert_eq!(r.status, 200);
    let ok = agent.wait_for(
        "the A lookup",
        WAIT,
        exchange("dns", "EGRESS", &t.app_pod, &t.dns_pod, |d| {
            text(d, "query").starts_with(PG_NAME) && d["qtypes"].to_string().contains("\"A\"")
        }),
    );
    assert_eq!(u64_at(&ok, &["l7", "dns", "rcode"]), 0);
    let ips = ok["l7"]["dns"]["ips"].to_string();
    assert!(ips.contains(&t.db.ip.to_string()), "answer names the database pod: {ok}");
    // dnsmasq's side of the same lookup (an unconnected UDP socket).
    agent.wait_for(
        "the lookup at dnsmasq",
        WAIT,
        exchange("dns", "INGRESS", &t.app_pod, &t.dns_pod, |d| {
            text(d, "query").starts_with(PG_NAME)
        }),
    );
}

#[test]
fn garbage_on_a_connection_is_reported_at_l4_only() {
    use crate::support::peers;
    let _serial = serial();
    let mut tb = Testbed::new();
    let (a, b) = (tb.pod("noise"), tb.pod("sink"));
    let agent = Agent::start(&[]);
    peers::server(&mut tb, &b, b.ip.into(), 7070, 300);
    // The peers' payloads are runs of one letter: no protocol hopwatch parses.
    let c = peers::client(&a, b.ip.into(), 7070, 50_000, Duration::from_secs(5), Duration::ZERO);
    let port = c.local_port();
    agent.wait_for("the connection's close", WAIT, |f| {
        f["socket_event"] == "CLOSE" && u64_at(f, &["l4", "TCP", "source_port"]) == port
    });
    let l7_flows = agent
        .flows()
        .into_iter()
        .filter(|f| f["Type"] == "L7" && ip_src(f) == a.ip.to_string())
        .count();
    assert_eq!(l7_flows, 0);
}
