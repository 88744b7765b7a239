//! The agent's own plumbing: `hopwatch observe` against its in-process collector and scrapes of
//! its `/metrics` are connections to its own listeners; they are left out (and counted) unless
//! `--show-own-traffic` asks for them, while the traffic between pods on fresh veths is shown.

use std::{
    net::SocketAddr,
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    hardening::{Metrics, http_get},
    support::{
        Testbed,
        agent::{Agent, BIN, ip_dst, tcp_port},
        peers, serial,
    },
};

const WAIT: Duration = Duration::from_secs(15);

/// Where the in-process collector's APIs listen (from the agent's start-up line).
fn collector_addr(agent: &Agent) -> SocketAddr {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let err = agent.stderr();
        let addr = err
            .lines()
            .find_map(|l| l.split("collector APIs on ").nth(1)?.split(' ').next()?.parse().ok());
        if let Some(a) = addr {
            return a;
        }
        assert!(Instant::now() < deadline, "the agent did not say where its collector is:\n{err}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The flows `hopwatch observe --all` gets from the collector at `addr` (a connection to it).
fn observe_all(addr: SocketAddr) -> Vec<Value> {
    let out = Command::new(BIN)
        .args(["observe", "--server", &addr.to_string(), "--all", "-o", "json"])
        .output()
        .expect("run hopwatch observe");
    assert!(out.status.success(), "observe failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let v: Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("observe printed {l:?}: {e}"));
            v.get("flow").cloned()
        })
        .collect()
}

/// A flow of a connection to `addr` (TCP or L7: both carry the server as destination).
fn to(addr: SocketAddr) -> impl Fn(&Value) -> bool {
    move |f| {
        ip_dst(f) == addr.ip().to_string()
            && tcp_port(f, "destination_port") == u64::from(addr.port())
    }
}

/// Starts the agent, queries its collector and scrapes its metrics, then has two pods talk.
/// Returns the agent, its two listeners, and the flows the collector stored.
fn observe_and_scrape(extra: &[&str]) -> (Agent, SocketAddr, SocketAddr, Vec<Value>, Testbed) {
    let mut tb = Testbed::new();
    let (a, b) = (tb.pod("client"), tb.pod("server"));
    let mut args = vec!["--listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let agent = Agent::start(&args);
    let (collector, metrics) = (collector_addr(&agent), agent.metrics_addr());
    let _ = observe_all(collector);
    let text = http_get(metrics, "/metrics");
    assert!(text.contains("hopwatch_agent_info"), "a /metrics scrape: {text}");
    // Traffic that is not the agent's, after the agent's own: once its flow is out, the flows
    // of the connections before it are too.
    peers::server(&mut tb, &b, b.ip.into(), 8080, 10);
    let c = peers::client(&a, b.ip.into(), 8080, 100, WAIT, Duration::ZERO);
    assert!(c.ok, "{:?}", c.report);
    let port = c.local_port();
    agent.wait_for("the pods' connection closing", WAIT, |f| {
        tcp_port(f, "source_port") == port && f["socket_event"] == "CLOSE"
    });
    std::thread::sleep(Duration::from_secs(1));
    let stored = observe_all(collector);
    (agent, collector, metrics, stored, tb)
}

#[test]
fn connections_to_the_agents_own_listeners_are_counted_not_shown() {
    let _serial = serial();
    let (agent, collector, metrics, stored, _tb) = observe_and_scrape(&[]);
    for (name, addr) in [("collector", collector), ("metrics", metrics)] {
        let own: Vec<Value> = agent.flows().into_iter().filter(to(addr)).collect();
        assert!(
            own.is_empty(),
            "{} flows to the agent's {name} listener {addr}: {own:#?}",
            own.len()
        );
        let stored: Vec<&Value> = stored.iter().filter(|f| to(addr)(f)).collect();
        assert!(stored.is_empty(), "the collector stored flows to {name} {addr}: {stored:#?}");
    }
    assert!(
        stored.iter().any(|f| tcp_port(f, "destination_port") == 8080),
        "the pods' connection is in the collector's history"
    );
    // Counted: two observe connections and a scrape, at both ends, opened and closed (the
    // count is exported once a second).
    let deadline = Instant::now() + WAIT;
    loop {
        let hidden = Metrics(http_get(metrics, "/metrics"))
            .count("hopwatch_flows_hidden_total", &[("reason", "own_traffic")]);
        if hidden >= 6 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "hopwatch_flows_hidden_total{{own_traffic}} is {hidden}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(agent.stderr().contains("--show-own-traffic"), "the agent says what it leaves out");
}

#[test]
fn show_own_traffic_shows_them() {
    let _serial = serial();
    let (agent, collector, metrics, stored, _tb) = observe_and_scrape(&["--show-own-traffic"]);
    for (name, addr) in [("collector", collector), ("metrics", metrics)] {
        // Both ends: `hopwatch observe` (or this test) connecting, the agent accepting.
        for direction in ["EGRESS", "INGRESS"] {
            agent.wait_for(&format!("{direction} to the {name} listener {addr}"), WAIT, |f| {
                to(addr)(f) && f["traffic_direction"] == direction
            });
        }
    }
    assert!(stored.iter().any(|f| to(collector)(f)), "the collector stored its own connections");
}
