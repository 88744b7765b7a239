//! TCP connections between pods: addresses, roles, processes, injected delay, bytes,
//! retransmits, refused and timed-out connects, periodic updates, IPv6.

use std::{net::IpAddr, time::Duration};

use serde_json::Value;

use crate::support::{
    Pod, Testbed,
    agent::{Agent, ip_dst, ip_src, socket_event, tcp_port, u64_at},
    peers, serial,
};

const WAIT: Duration = Duration::from_secs(15);

/// A flow of `event` for the connection from `client:port`, seen from `direction`'s end.
fn conn_flow<'a>(
    event: &'a str,
    direction: &'a str,
    client: IpAddr,
    port: u64,
) -> impl Fn(&Value) -> bool + 'a {
    move |f| {
        socket_event(f) == event
            && f["traffic_direction"] == direction
            && ip_src(f) == client.to_string()
            && tcp_port(f, "source_port") == port
    }
}

#[test]
fn connection_between_pods_reports_addresses_roles_processes_bytes_and_injected_delay() {
    let _serial = serial();
    let mut tb = Testbed::new();
    let (a, b) = (tb.pod("client"), tb.pod("server"));
    let agent = Agent::start(&[]);
    let server = peers::server(&mut tb, &b, b.ip.into(), 8080, 5000);
    // Every packet from the client to the server waits 40 ms: the SYN included, so the handshake
    // takes 40 ms plus the veth round trip (~0.1 ms) plus the delayer's wake-up jitter.
    let delay = Duration::from_millis(40);
    tb.delay(&a, &b, delay);
    let client =
        peers::client(&a, b.ip.into(), 8080, 100_000, Duration::from_secs(5), Duration::ZERO);
    assert!(client.ok, "client failed: {}", client.report);
    let port = client.local_port();

    let connect = agent.wait_for(
        "CONNECT from the client",
        WAIT,
        conn_flow("CONNECT", "EGRESS", a.ip.into(), port),
    );
    assert_eq!(ip_dst(&connect), b.ip.to_string());
    assert_eq!(tcp_port(&connect, "destination_port"), 8080);
    assert_eq!(connect["verdict"], "FORWARDED");
    assert_eq!(connect["Type"], "L3_L4");
    assert_eq!(connect["is_reply"], false);
    assert_eq!(connect["node_name"], "e2e-node");
    assert_eq!(connect["source_process"]["pid"], client.pid);
    assert_eq!(connect["source_process"]["comm"], "python3");
    assert_eq!(u64_at(&connect, &["netns_inode"]), a.netns_inode());
    assert!(connect["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{connect}");
    // Tolerance: never below the injected delay (the SYN is held at least that long); at most
    // 10 ms above it for the veth RTT and the delayer's and scheduler's jitter on a 2-core host.
    let latency = u64_at(&connect, &["tcp_stats", "connect_latency_ns"]);
    let d = u64::try_from(delay.as_nanos()).unwrap();
    eprintln!("injected {d} ns, reported connect latency {latency} ns");
    assert!(
        (d..=d + 10_000_000).contains(&latency),
        "connect latency {latency} ns, injected {d} ns: {connect}"
    );

    let accept = agent.wait_for(
        "ACCEPT on the server",
        WAIT,
        conn_flow("ACCEPT", "INGRESS", a.ip.into(), port),
    );
    assert_eq!(ip_dst(&accept), b.ip.to_string());
    assert_eq!(tcp_port(&accept, "destination_port"), 8080);
    assert_eq!(accept["destination_process"]["pid"], server.pid);
    assert_eq!(u64_at(&accept, &["netns_inode"]), b.netns_inode());

    let client_close = agent.wait_for(
        "CLOSE on the client",
        WAIT,
        conn_flow("CLOSE", "EGRESS", a.ip.into(), port),
    );
    assert_eq!(u64_at(&client_close, &["tcp_stats", "bytes_sent"]), 100_000, "{client_close}");
    assert_eq!(u64_at(&client_close, &["tcp_stats", "bytes_received"]), 5000, "{client_close}");
    assert_eq!(client_close["tcp_stats"]["complete"], true);
    // The smoothed RTT includes the injected delay (data segments are delayed too).
    assert!(u64_at(&client_close, &["tcp_stats", "srtt_ns"]) >= d / 2, "{client_close}");
    // Both ends are on this node, so the client's flow also names the server process.
    assert_eq!(client_close["destination_process"]["pid"], server.pid);

    let server_close = agent.wait_for(
        "CLOSE on the server",
        WAIT,
        conn_flow("CLOSE", "INGRESS", a.ip.into(), port),
    );
    assert_eq!(u64_at(&server_close, &["tcp_stats", "bytes_received"]), 100_000, "{server_close}");
    assert_eq!(u64_at(&server_close, &["tcp_stats", "bytes_sent"]), 5000, "{server_close}");
}

#[test]
fn ipv6_connections_are_reported_with_ipv6_addresses() {
    let _serial = serial();
    let mut tb = Testbed::new();
    let (a, b) = (tb.pod("c6"), tb.pod("s6"));
    let agent = Agent::start(&[]);
    peers::server(&mut tb, &b, b.ip6.into(), 8443, 10);
    let client =
        peers::client(&a, b.ip6.into(), 8443, 1234, Duration::from_secs(5), Duration::ZERO);
    assert!(client.ok, "client failed: {}", client.report);
    let port = client.local_port();
    let close =
        agent.wait_for("IPv6 CLOSE", WAIT, conn_flow("CLOSE", "EGRESS", a.ip6.into(), port));
    assert_eq!(ip_dst(&close), b.ip6.to_string());
    assert_eq!(close["IP"]["ipVersion"], "IPv6");
    assert_eq!(u64_at(&close, &["tcp_stats", "bytes_sent"]), 1234);
    assert_eq!(u64_at(&close, &["tcp_stats", "bytes_received"]), 10);
}

#[test]
fn retransmits_are_counted_under_injected_loss() {
    let _serial = serial();
    let mut tb = Testbed::new();
    let (a, b) = (tb.pod("lossy"), tb.pod("sink"));
    let agent = Agent::start(&[]);
    peers::server(&mut tb, &b, b.ip.into(), 9000, 100);
    // 20% of the client's packets (mostly 64 KiB GSO segments on veth) are dropped.
    b.lose_from(&a, 0.2);
    let client =
        peers::client(&a, b.ip.into(), 9000, 1_000_000, Duration::from_secs(10), Duration::ZERO);
    assert!(client.ok, "client failed under loss: {}", client.report);
    let close = agent.wait_for(
        "CLOSE after a lossy transfer",
        Duration::from_secs(30),
        conn_flow("CLOSE", "EGRESS", a.ip.into(), client.local_port()),
    );
    assert!(
        u64_at(&close, &["tcp_stats", "retransmits"]) > 0,
        "no retransmits under 20% loss: {close}"
    );
    assert_eq!(u64_at(&close, &["tcp_stats", "bytes_sent"]), 1_000_000, "{close}");
}

fn failed_connect<'a>(client: &'a Pod, server: &'a Pod, port: u64) -> impl Fn(&Value) -> bool + 'a {
    move |f| {
        socket_event(f) == "CONNECT_FAILED"
            && ip_src(f) == client.ip.to_string()
            && ip_dst(f) == server.ip.to_string()
            && tcp_port(f, "destination_port") == port
    }
}

#[test]
fn connect_to_a_closed_port_is_reported_as_refused() {
    let _serial = serial();
    let mut tb = Testbed::new();
    let (a, b) = (tb.pod("c"), tb.pod("closed"));
    let agent = Agent::start(&[]);
    let client = peers::client(&a, b.ip.into(), 9, 10, Duration::from_secs(5), Duration::ZERO);
    assert!(!client.ok, "connect to a closed port succeeded: {}", client.report);
    assert_eq!(client.report["error"], "ConnectionRefusedError");
    let f = agent.wait_for("CONNECT_FAILED (refused)", WAIT, failed_connect(&a, &b, 9));
    assert_eq!(f["verdict"], "ERROR");
    assert_eq!(f["tcp_stats"]["error"], "ECONNREFUSED");
    assert_eq!(f["source_process"]["pid"], client.pid);
    assert_ne!(tcp_port(&f, "source_port"), 0, "the failed socket's port is reported: {f}");
}

#[test]
fn connect_through_a_link_dropping_syns_is_reported_as_timed_out() {
    let _serial = serial();
    let mut tb = Testbed::new();
    let (a, b) = (tb.pod("c"), tb.pod("blackhole"));
    let agent = Agent::start(&[]);
    peers::server(&mut tb, &b, b.ip.into(), 8081, 10);
    b.nft("table inet hwtest {\n chain input {\n  type filter hook input priority 0;\n  tcp dport 8081 tcp flags syn drop\n }\n}\n");
    // The kernel retransmits the SYN after 1 s; the application gives up at 2.5 s.
    let client =
        peers::client(&a, b.ip.into(), 8081, 10, Duration::from_millis(2500), Duration::ZERO);
    assert_eq!(client.report["error"], "TimeoutError", "{}", client.report);
    let f = agent.wait_for("CONNECT_FAILED (timeout)", WAIT, failed_connect(&a, &b, 8081));
    assert_eq!(f["verdict"], "ERROR");
    assert_eq!(f["tcp_stats"]["error"], "ETIMEDOUT", "{f}");
    assert!(u64_at(&f, &["tcp_stats", "retransmits"]) >= 1, "SYN retransmits: {f}");
    let duration = u64_at(&f, &["tcp_stats", "duration_ns"]);
    assert!((2_400_000_000..3_500_000_000).contains(&duration), "failed after {duration} ns: {f}");
}

#[test]
fn long_lived_connections_report_counters_before_they_close() {
    let _serial = serial();
    let mut tb = Testbed::new();
    let (a, b) = (tb.pod("long"), tb.pod("srv"));
    let agent = Agent::start(&["--update-interval", "1s"]);
    peers::server(&mut tb, &b, b.ip.into(), 7000, 10);
    let pod = a.clone();
    let ip = b.ip;
    // 3.5 s of trickled sends keep the connection open and acknowledging.
    let handle = std::thread::spawn(move || {
        peers::client(
            &pod,
            ip.into(),
            7000,
            400_000,
            Duration::from_secs(5),
            Duration::from_millis(3500),
        )
    });
    let first = agent.wait_for("an UPDATE while the connection is open", WAIT, |f| {
        socket_event(f) == "UPDATE"
            && ip_src(f) == a.ip.to_string()
            && f["traffic_direction"] == "EGRESS"
    });
    let client = handle.join().expect("client thread");
    assert!(client.ok, "{}", client.report);
    assert_eq!(tcp_port(&first, "source_port"), client.local_port());
    assert_eq!(u64_at(&first, &["netns_inode"]), a.netns_inode(), "updates keep the namespace");
    let close = agent.wait_for(
        "CLOSE",
        WAIT,
        conn_flow("CLOSE", "EGRESS", a.ip.into(), client.local_port()),
    );
    let updates: Vec<Value> = agent
        .flows()
        .into_iter()
        .filter(|f| {
            socket_event(f) == "UPDATE"
                && tcp_port(f, "source_port") == client.local_port()
                && f["traffic_direction"] == "EGRESS"
        })
        .collect();
    assert!(updates.len() >= 2, "expected an update per second over 3.5 s: {updates:?}");
    let sent: Vec<u64> = updates.iter().map(|f| u64_at(f, &["tcp_stats", "bytes_sent"])).collect();
    assert!(sent.windows(2).all(|w| w[0] <= w[1]), "bytes only grow: {sent:?}");
    assert!(sent[0] < 400_000, "first update came mid-transfer: {sent:?}");
    assert_eq!(u64_at(&close, &["tcp_stats", "bytes_sent"]), 400_000);
}
