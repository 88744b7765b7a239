//! A ring buffer far too small for the load: the agent must count exactly what the kernel could
//! not hand over, not keep connections whose close it lost as open, keep tracing new
//! connections once the burst is over, and stop promptly.

use std::time::{Duration, Instant};

use super::{
    CountingAgent,
    floods::{AcceptSink, connect_flood, prepare_client, settle_and_check, stop_and_check_summary},
    http_get,
    restarts::{free_port, observe_all},
};
use crate::support::{Testbed, serial};

/// The smallest ring buffer `--ringbuf-bytes` accepts (one page).
const TINY_RINGBUF: &str = "4096";

#[test]
fn a_tiny_ring_buffer_overflows_counted_exactly_and_does_not_stall() {
    const CONNECTIONS: u64 = 30_000;
    const PORTS: [u16; 4] = [7101, 7102, 7103, 7104];
    let _serial = serial();
    let mut tb = Testbed::new();
    let (client, server) = (tb.pod("burster"), tb.pod("rbsink"));
    prepare_client(&client);
    let _sink = AcceptSink::start(&server, &PORTS);
    let (src, dst) =
        (format!("\"source\":\"{}\"", client.ip), format!("\"destination\":\"{}\"", server.ip));
    // The in-process collector too: `hopwatch observe` must show the same losses.
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut agent = CountingAgent::start(
        &["--listen", &listen, "--ringbuf-bytes", TINY_RINGBUF],
        Box::new(move |line: &str| {
            (line.contains(&src)
                && line.contains(&dst)
                && line.contains("\"socket_event\":\"CLOSE\"")
                && line.contains("\"traffic_direction\":\"EGRESS\""))
            .then_some(("close", false))
        }),
    );
    let m = agent.scrape();
    assert_eq!(
        m.count("hopwatch_ringbuf_size_bytes", &[]),
        4096,
        "the agent did not take the ring buffer size asked for"
    );
    let report = connect_flood(&client, server.ip, &PORTS, CONNECTIONS, Duration::from_secs(30));
    eprintln!("burst: {report:?}, {:.0} connections/s", report.rate());
    agent.assert_running();
    let (m, t) = settle_and_check(&agent);
    let full = m.kernel("ringbuf_full");
    eprintln!(
        "kernel sent {} events, {full} did not fit; {} CLOSE flows for {} connections",
        m.kernel("events_sent"),
        t.class("close"),
        report.connected
    );
    assert!(
        full > 0,
        "{} connections never filled a {TINY_RINGBUF}-byte ring buffer",
        report.connected
    );
    assert!(t.class("close") <= report.connected);
    lost_closes_are_forgotten(&agent, &PORTS, report.connected);
    // The same count through the collector's API, as `hopwatch observe` shows it (both streams
    // get every notice; more may come from the host meanwhile, so until they agree).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let observed: u64 = observe_all(port)
            .iter()
            .filter(|l| l["lost_events"]["source"] == "PERF_EVENT_RING_BUFFER")
            .filter_map(|l| l["lost_events"]["num_events_lost"].as_u64())
            .sum();
        let printed = agent.tally().lost("PERF_EVENT_RING_BUFFER");
        if observed == printed {
            eprintln!("hopwatch observe shows {observed} events lost in the ring buffer");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "observe shows {observed} ring buffer losses, stdout {printed}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // No stall: the reader caught up (settled above), the agent is healthy, and connections
    // made after the burst are reported promptly.
    http_get(agent.metrics_addr(), "/healthz");
    // A single connection is about thirty events in under a millisecond, more than a page
    // holds, so some of each are lost even now; the reader must still take what fits at once,
    // so connections made one by one after the burst show up within a few tries.
    let before = t.class("close");
    let started = Instant::now();
    let mut tries = 0;
    while agent.tally().class("close") == before {
        assert!(
            tries < 50,
            "none of {tries} connections made one by one after the burst was reported:\n{}",
            agent.stderr()
        );
        tries += 1;
        let one = connect_flood(&client, server.ip, &PORTS[..1], 1, Duration::from_secs(5));
        assert_eq!(one.connected, 1);
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("a flow after the burst within {:?} ({tries} connections)", started.elapsed());
    settle_and_check(&agent);
    let took = stop_and_check_summary(&mut agent);
    assert!(took < Duration::from_secs(3), "SIGTERM took {took:?}");
}

/// Closes lost with the events are not connections left open: once the kernel's connection map
/// no longer has them, the agent forgets them (counted) and the hops say they are closed. A
/// residue of at most one in a thousand is tolerated (seen: one in 30 000 in one run of seven,
/// still open a minute later, not yet explained); without the reconciliation it was thousands.
fn lost_closes_are_forgotten(agent: &CountingAgent, ports: &[u16], connected: u64) {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(30);
    loop {
        let m = agent.scrape();
        let open: u64 = ports
            .iter()
            .map(|p| {
                m.count("hopwatch_hop_open_connections", &[("destination_port", &p.to_string())])
            })
            .sum();
        let forgotten = m.count("hopwatch_hop_state_events_total", &[("event", "closes_lost")]);
        if forgotten > 0 && open <= connected / 1000 {
            eprintln!(
                "{forgotten} connections whose close was lost were forgotten; {open} of \
                 {connected} open after {:?}",
                started.elapsed()
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{open} of {connected} connections still open on the burst's ports 30 s after it, \
             {forgotten} forgotten for a lost close"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}
