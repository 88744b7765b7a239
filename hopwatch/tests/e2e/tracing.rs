//! Request tracing on real software: client → nginx (TLS) → FastAPI (uvicorn) → PostgreSQL,
//! Redis and MariaDB. The truth is what the test sent: which request made which call.

use std::time::Duration;

use serde_json::Value;

use crate::support::{
    Pod, Testbed,
    agent::{Agent, ip_dst, ip_src},
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

/// An L7 flow of `protocol` at `direction` between two pods whose record satisfies `pred`.
fn exchange<'a>(
    protocol: &'a str,
    direction: &'a str,
    client: &'a Pod,
    server: &'a Pod,
    pred: impl Fn(&Value) -> bool + 'a,
) -> impl Fn(&Value) -> bool + 'a {
    move |f| {
        f["Type"] == "L7"
            && f["l7"]["protocol"] == protocol
            && f["traffic_direction"] == direction
            && ip_src(f) == client.ip.to_string()
            && ip_dst(f) == server.ip.to_string()
            && pred(&f["l7"][protocol])
    }
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
    // nginx's worker was serving exactly that request when it called the app; the app's event
    // loop was serving exactly the upstream request when it queried the databases.
    assert_eq!(parent(&upstream_c), span(&ingress_c), "{upstream_c}");
    assert_eq!(s(&upstream_c, &["l7", "span", "link"]), "thread");
    for call in [&pg, &redis, &mysql] {
        assert_eq!(parent(call), span(&upstream_c), "{call}");
    }
    let id = trace(&ingress_c);
    assert_eq!(id.len(), 32, "{ingress_c}");
    for f in [&ingress_s, &upstream_c, &upstream_s, &pg, &pg_s, &redis, &mysql] {
        assert_eq!(trace(f), id, "every exchange of the request is in its trace: {f}");
    }
}

#[test]
fn concurrent_requests_on_an_event_loop_are_linked_right_or_left_unlinked() {
    let _serial = serial();
    let mut tb = Testbed::new();
    let agent = Agent::start(&["--keep-full-statements"]);
    let t = Topology::start(&mut tb);
    // Eight clients at once, each with its own key: the key is the truth joining a request to
    // the Redis command the app sent for it.
    let keys: Vec<String> = (0..8).map(|i| format!("hwtrace{i}")).collect();
    std::thread::scope(|scope| {
        for k in &keys {
            let t = &t;
            scope.spawn(move || t.get(&format!("/cache/get?key={k}")));
        }
    });
    let upstream = |f: &Value| exchange("http", "EGRESS", &t.ingress, &t.app_pod, |_| true)(f);
    let gets = |f: &Value| {
        exchange("redis", "EGRESS", &t.app_pod, &t.cache, |r| s(r, &["command"]) == "GET")(f)
    };
    agent.wait_for_n("the eight Redis GETs", WAIT, 8, gets);
    agent.wait_for_n("the eight upstream requests", WAIT, 8, upstream);
    let flows = agent.flows();
    let key_of_request = |span_id: &str| {
        flows.iter().filter(|f| upstream(f)).find(|f| span(f) == span_id).map(|f| {
            let url = s(f, &["l7", "http", "url"]);
            url.rsplit_once("key=").map_or("", |(_, k)| k).to_owned()
        })
    };
    let (mut linked, mut unlinked) = (0, 0);
    for g in flows.iter().filter(|f| gets(f)) {
        let key = g["l7"]["redis"]["args"][0].as_str().unwrap_or_default();
        if !keys.iter().any(|k| k == key) {
            continue;
        }
        if parent(g).is_empty() {
            assert_eq!(s(g, &["l7", "span", "unlinked"]), "ambiguous", "{g}");
            unlinked += 1;
            continue;
        }
        linked += 1;
        assert_eq!(
            key_of_request(parent(g)).as_deref(),
            Some(key),
            "a GET linked to the request of another key: {g}"
        );
    }
    assert_eq!(linked + unlinked, 8, "every GET seen once");
    eprintln!("concurrency 8 on uvicorn: {linked} linked, {unlinked} left ambiguous");
}
