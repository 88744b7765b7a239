//! Errors a server sends before any request, when it refuses a connection: Redis in protected
//! mode (`-DENIED ...` at once, then close) and MariaDB out of connections (an ERR packet in place
//! of its greeting). Each is a failed exchange with the server's error, measured from the
//! connection's establishment, not a request left unanswered.

use std::{process::Command, time::Duration};

use serde_json::Value;

use crate::support::{
    Pod, Testbed,
    agent::{Agent, u64_at},
    serial,
    servers::databases::{MariaDb, Redis},
};

const WAIT: Duration = Duration::from_secs(20);

/// An L7 flow of `protocol` between the two pods, seen at `direction`.
fn l7_flow<'a>(
    protocol: &'a str,
    direction: &'a str,
    client: &'a Pod,
    server: &'a Pod,
) -> impl Fn(&Value) -> bool + 'a {
    crate::support::agent::exchange(protocol, direction, client, server, |_| true)
}

/// No exchange of `protocol` between the pods was reported unanswered.
fn assert_none_unanswered(agent: &Agent, protocol: &str, client: &Pod, server: &Pod) {
    let unanswered: Vec<Value> = agent
        .flows()
        .into_iter()
        .filter(|f| {
            (l7_flow(protocol, "EGRESS", client, server)(f)
                || l7_flow(protocol, "INGRESS", client, server)(f))
                && f["l7"]["type"] == "REQUEST"
        })
        .collect();
    assert!(unanswered.is_empty(), "requests reported unanswered: {unanswered:#?}");
}

#[test]
fn redis_in_protected_mode_is_a_failed_exchange_with_its_denial() {
    let _serial = serial();
    let mut tb = Testbed::new();
    let (client, cache) = (tb.pod("client"), tb.pod("cache"));
    let redis = Redis::start_protected(&cache);
    let agent = Agent::start(&[]);
    let out = client
        .command(&["redis-cli", "-h", &redis.ip.to_string(), "-p", &redis.port.to_string(), "PING"])
        .output()
        .expect("redis-cli runs");
    let said = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("DENIED"), "redis-cli got {said:?}; server log:\n{}", redis.log());
    for direction in ["EGRESS", "INGRESS"] {
        let f = agent.wait_for(
            &format!("the refusal seen at {direction}"),
            WAIT,
            l7_flow("redis", direction, &client, &cache),
        );
        assert_eq!(f["verdict"], "ERROR", "{f}");
        let error = f["l7"]["redis"]["error"].as_str().unwrap_or_default();
        assert!(error.starts_with("DENIED Redis is running in protected mode"), "{f}");
        assert_eq!(f["l7"]["type"], "RESPONSE", "{f}");
        assert!(u64_at(&f, &["l7", "latency_ns"]) > 0, "a latency: {f}");
        if direction == "INGRESS" {
            // The server refused before reading anything: the exchange is the connection's.
            assert_eq!(f["l7"]["redis"]["command"], "(connect)", "{f}");
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    assert_none_unanswered(&agent, "redis", &client, &cache);
}

#[test]
fn mariadb_out_of_connections_is_a_failed_exchange_with_its_error_code() {
    let _serial = serial();
    let mut tb = Testbed::new();
    let (client, db) = (tb.pod("client"), tb.pod("mysql"));
    // MariaDB's smallest max_connections is 10.
    let mariadb = MariaDb::start_with(&db, &["--max-connections=10"]);
    // Ten connections for the user and the one spare kept for an administrator: the next one is
    // refused before the handshake (a user's eleventh would be refused after logging in).
    let mut held: Vec<_> = (0..10).map(|_| mariadb.hold_connection(30, false)).collect();
    std::thread::sleep(Duration::from_secs(1));
    held.push(mariadb.hold_connection(30, true));
    std::thread::sleep(Duration::from_millis(500));
    let agent = Agent::start(&[]);
    let out = Command::new("ip")
        .args(["netns", "exec", &client.netns, "mariadb", "--no-defaults", "--skip-ssl"])
        .args(["-h", &mariadb.ip.to_string(), "-P", &mariadb.port.to_string(), "-uhopwatch"])
        .args(["-phopwatch", "-e", "SELECT 1"])
        .output()
        .expect("mariadb client runs");
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    for mut c in held {
        let _ = c.kill();
        let _ = c.wait();
    }
    assert!(said.contains("1040"), "the client was refused with 1040: {said:?}\n{}", mariadb.log());
    for direction in ["EGRESS", "INGRESS"] {
        let f = agent.wait_for(
            &format!("the refusal seen at {direction}"),
            WAIT,
            l7_flow("mysql", direction, &client, &db),
        );
        assert_eq!(f["verdict"], "ERROR", "{f}");
        assert_eq!(u64_at(&f, &["l7", "mysql", "error_code"]), 1040, "{f}");
        assert_eq!(f["l7"]["mysql"]["command"], "COM_CONNECT", "{f}");
        assert!(u64_at(&f, &["l7", "latency_ns"]) > 0, "a latency: {f}");
    }
    std::thread::sleep(Duration::from_secs(1));
    assert_none_unanswered(&agent, "mysql", &client, &db);
}
