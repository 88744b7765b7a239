//! Service translation: iptables DNAT rules laid out as kube-proxy writes them (KUBE-SVC-* and
//! KUBE-SEP-* chains, `statistic` for the split, `recent` for session affinity) send a client's
//! connections to a service address to two backend pods. The servers log which connections
//! they accepted (the truth); the agent's flows must name the service dialled and, for every
//! connection, the backend it really reached — from the first (CONNECT) flow on.

use std::{collections::HashMap, net::Ipv4Addr, time::Duration};

use serde_json::Value;

use super::{TempFile, accept_logger, connect_many, labels, wait_identity, wait_peers};
use crate::support::{
    Pod, Testbed,
    agent::{Agent, ip_dst, ip_src, socket_event, tcp_port},
    serial,
};

const CONNECTIONS: usize = 40;
const SERVICE_PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;

#[derive(Debug, Clone, Copy)]
pub(super) enum Balancing {
    /// One ready endpoint: a plain jump to its DNAT chain.
    Single,
    /// Two endpoints, `-m statistic --mode random --probability 0.5` then the last one.
    Random,
    /// `sessionAffinity: ClientIP`: `-m recent --rcheck` per endpoint before the random split.
    Affinity,
}

/// kube-proxy's rules for one service, in the client pod's nat OUTPUT chain (kube-proxy jumps to
/// KUBE-SERVICES from both OUTPUT and PREROUTING; OUTPUT is where a node-local client's traffic
/// is translated).
pub(super) fn kube_proxy_rules(client: &Pod, vip: Ipv4Addr, backends: &[&Pod], mode: Balancing) {
    let ipt = |args: &[&str]| {
        let mut full = vec!["iptables", "-w", "-t", "nat"];
        full.extend_from_slice(args);
        client.exec(&full);
    };
    ipt(&["-N", "KUBE-SVC-TEST"]);
    for (i, b) in backends.iter().enumerate() {
        let sep = format!("KUBE-SEP-{i}");
        ipt(&["-N", &sep]);
        let dest = format!("{}:{BACKEND_PORT}", b.ip);
        if matches!(mode, Balancing::Affinity) {
            ipt(&[
                "-A",
                &sep,
                "-p",
                "tcp",
                "-m",
                "recent",
                "--name",
                &sep,
                "--set",
                "--rsource",
                "-j",
                "DNAT",
                "--to-destination",
                &dest,
            ]);
        } else {
            ipt(&["-A", &sep, "-p", "tcp", "-j", "DNAT", "--to-destination", &dest]);
        }
    }
    match mode {
        Balancing::Single => ipt(&["-A", "KUBE-SVC-TEST", "-j", "KUBE-SEP-0"]),
        Balancing::Random | Balancing::Affinity => {
            if matches!(mode, Balancing::Affinity) {
                for i in 0..backends.len() {
                    let sep = format!("KUBE-SEP-{i}");
                    ipt(&[
                        "-A",
                        "KUBE-SVC-TEST",
                        "-m",
                        "recent",
                        "--name",
                        &sep,
                        "--rcheck",
                        "--seconds",
                        "10800",
                        "--reap",
                        "--rsource",
                        "-j",
                        &sep,
                    ]);
                }
            }
            ipt(&[
                "-A",
                "KUBE-SVC-TEST",
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                "0.50000000000",
                "-j",
                "KUBE-SEP-0",
            ]);
            ipt(&["-A", "KUBE-SVC-TEST", "-j", "KUBE-SEP-1"]);
        }
    }
    let vip = format!("{vip}/32");
    let port = SERVICE_PORT.to_string();
    ipt(&["-A", "OUTPUT", "-d", &vip, "-p", "tcp", "--dport", &port, "-j", "KUBE-SVC-TEST"]);
}

/// Runs the scenario and returns (agent's backend per client port, truth per client port).
fn run(mode: Balancing) -> (HashMap<u16, String>, HashMap<u16, String>) {
    let _serial = serial();
    let mut tb = Testbed::new();
    let client = tb.pod("client");
    let (a, b) = (tb.pod("web-a"), tb.pod("web-b"));
    let [o0, o1, o2, _] = client.ip.octets();
    let vip = Ipv4Addr::new(o0, o1, o2, 250);
    // The service and its backends, named the way a host without Kubernetes names them.
    let endpoints = TempFile::new(
        "dnat-endpoints.yaml",
        &format!(
            "endpoints:\n  - name: web\n    namespace: shop\n    kind: service\n    ips: [{vip}]\n  - name: web-a\n    namespace: shop\n    labels: {{app: web}}\n    ips: [{}]\n  - name: web-b\n    namespace: shop\n    labels: {{app: web}}\n    ips: [{}]\n",
            a.ip, b.ip
        ),
    );
    let agent = Agent::start(&["--endpoints-file", endpoints.path()]);
    wait_identity(&agent);
    let peers_a = accept_logger(&mut tb, &a, BACKEND_PORT);
    let peers_b = accept_logger(&mut tb, &b, BACKEND_PORT);
    kube_proxy_rules(&client, vip, &[&a, &b], mode);

    let (pid, ports) = connect_many(&client, vip.into(), SERVICE_PORT, CONNECTIONS);
    wait_peers(&[&peers_a, &peers_b], CONNECTIONS);
    let mut truth = HashMap::new();
    for (pod, peers) in [(&a, &peers_a), (&b, &peers_b)] {
        for p in peers.lock().unwrap().iter() {
            let (ip, port) = p.rsplit_once(':').expect("ip:port");
            assert_eq!(ip, client.ip.to_string(), "a backend saw a connection from elsewhere: {p}");
            truth.insert(port.parse::<u16>().expect("port"), pod.ip.to_string());
        }
    }
    assert_eq!(truth.len(), CONNECTIONS, "every connection reached one backend");

    let mut seen = HashMap::new();
    for port in &ports {
        let is_connect = |f: &Value| {
            socket_event(f) == "CONNECT"
                && ip_src(f) == client.ip.to_string()
                && tcp_port(f, "source_port") == u64::from(*port)
        };
        let f = agent.wait_for(
            &format!("CONNECT from port {port}"),
            Duration::from_secs(15),
            is_connect,
        );
        // What the application dialled stays in IP/l4; the service is named; the backend is in
        // translated_destination and named as the destination endpoint.
        assert_eq!(ip_dst(&f), vip.to_string(), "{f}");
        assert_eq!(tcp_port(&f, "destination_port"), u64::from(SERVICE_PORT), "{f}");
        assert_eq!(f["destination_service"]["name"], "web", "{f}");
        assert_eq!(f["destination_service"]["namespace"], "shop", "{f}");
        assert_eq!(f["source_process"]["pid"], pid, "{f}");
        let t = &f["translated_destination"];
        assert_eq!(t["port"], u64::from(BACKEND_PORT), "CONNECT flow carries the backend: {f}");
        let backend = t["ip"].as_str().expect("translated ip").to_owned();
        let pod = if backend == a.ip.to_string() { "web-a" } else { "web-b" };
        assert_eq!(f["destination"]["pod_name"], pod, "{f}");
        assert!(labels(&f["destination"]).contains(&"app=web".to_owned()), "{f}");
        seen.insert(*port, backend);
        // The close flow of the same connection carries the same answer.
        let close = agent.wait_for("CLOSE", Duration::from_secs(15), |f| {
            socket_event(f) == "CLOSE"
                && f["traffic_direction"] == "EGRESS"
                && ip_src(f) == client.ip.to_string()
                && tcp_port(f, "source_port") == u64::from(*port)
        });
        assert_eq!(close["translated_destination"], *t, "{close}");
    }
    (seen, truth)
}

fn split(seen: &HashMap<u16, String>) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for backend in seen.values() {
        *counts.entry(backend.clone()).or_default() += 1;
    }
    counts
}

#[test]
fn dnat_to_a_single_endpoint_names_the_service_and_the_backend() {
    let (seen, truth) = run(Balancing::Single);
    assert_eq!(seen, truth);
    assert_eq!(split(&seen).len(), 1, "{seen:?}");
}

#[test]
fn random_dnat_split_reported_per_connection_matches_the_backends() {
    let (seen, truth) = run(Balancing::Random);
    assert_eq!(seen, truth, "the agent's backend per connection is the one that accepted it");
    let counts = split(&seen);
    eprintln!("split over {CONNECTIONS} connections: {counts:?}");
    // With p = 0.5 over 40 connections, a backend with none has probability 2^-39.
    assert_eq!(counts.len(), 2, "both backends were used: {counts:?}");
}

#[test]
fn session_affinity_pins_every_connection_to_one_backend() {
    let (seen, truth) = run(Balancing::Affinity);
    assert_eq!(seen, truth);
    let counts = split(&seen);
    eprintln!("split with affinity: {counts:?}");
    assert_eq!(counts.len(), 1, "100% of the traffic lands on one backend: {counts:?}");
    assert_eq!(counts.values().sum::<usize>(), CONNECTIONS);
}
