//! The kernel's exchange engine against the capture path: the same HTTP/1 keep-alive load (errors,
//! slow answers, a request the server closes on) measured both ways gives the same hop counts and
//! records the same exchanges with the same fields, and the engine really measured them; in clear
//! (the socket hooks) and over TLS (the TLS probes, OpenSSL at both ends).

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    hardening::{Metrics, http_get},
    sampling::{PORT, SERVER, start_python},
    support::{
        Testbed,
        agent::{Agent, ip_dst, tcp_port, u64_at},
        serial,
        servers::TempDir,
    },
};

const REQUESTS: u64 = 600;
const FAIL_EVERY: u64 = 50;
const SLOW_EVERY: u64 = 40;
/// The server's delay on `/slow`.
const SLOW: Duration = Duration::from_millis(20);

/// `n` requests on one keep-alive connection (every `fail`th to `/fail`, every `slow`th to
/// `/slow`), then one to `/hang`, which the server closes on; prints the answers and how the last
/// one ended. Over TLS when argv 6 is `tls`.
const CLIENT: &str = r#"
import sys, ssl, http.client
host, port = sys.argv[1], int(sys.argv[2])
if sys.argv[6] == "tls":
    c = http.client.HTTPSConnection(host, port, timeout=10, context=ssl._create_unverified_context())
else:
    c = http.client.HTTPConnection(host, port, timeout=10)
n, fail, slow, done = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), 0
for i in range(n):
    path = "/fail" if i % fail == fail - 1 else "/slow" if i % slow == slow - 1 else "/ok"
    c.request("GET", path)
    r = c.getresponse()
    r.read()
    done += 1
c.request("GET", "/hang")
try:
    c.getresponse()
    print(done, "answered", flush=True)
except (http.client.RemoteDisconnected, ssl.SSLEOFError):
    print(done, "closed", flush=True)
"#;

/// Recorded error and slow exchanges of one end: index → (url, code, verdict, latency ns).
type Recorded = BTreeMap<u64, (String, u64, String, u64)>;

/// What one run showed: hop totals per end and the recorded exchanges per end by index.
#[derive(Debug)]
struct Run {
    /// (requests, errors) at the client and at the server end.
    counts: [(u64, u64); 2],
    kernel_exchanges: u64,
    recorded: [Recorded; 2],
}

/// Clear text or TLS.
#[derive(Clone, Copy, PartialEq)]
enum Wire {
    Clear,
    Tls,
}

fn run(wire: Wire, extra: &[&str]) -> Run {
    let mut tb = Testbed::new();
    let (a, b) = (tb.pod("client"), tb.pod("server"));
    let mut args = vec!["--l7-flow-rate", "1", "--l7-flow-sample", "1000000", "--l7-flow-slow"];
    args.push("10ms");
    args.extend_from_slice(extra);
    let agent = Agent::start(&args);
    let dir = TempDir::new("exchange-engine");
    let (cert, key) = dir.self_signed_cert(&b, "api.hopwatch.test", None);
    let env: &[(&str, &str)] =
        if wire == Wire::Tls { &[("TLS_CERT", &cert), ("TLS_KEY", &key)] } else { &[] };
    start_python(&mut tb, &b, SERVER, &[&b.ip.to_string(), &PORT.to_string()], env);
    let out = a.exec(&[
        "python3",
        "-c",
        CLIENT,
        &b.ip.to_string(),
        &PORT.to_string(),
        &REQUESTS.to_string(),
        &FAIL_EVERY.to_string(),
        &SLOW_EVERY.to_string(),
        if wire == Wire::Tls { "tls" } else { "clear" },
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{REQUESTS} closed"),
        "{out:?}"
    );

    let hop = |reporter| [("destination_port", "18181"), ("reporter", reporter)];
    let per_end = REQUESTS + 1;
    let deadline = Instant::now() + Duration::from_secs(20);
    let metrics = loop {
        let m = Metrics(http_get(agent.metrics_addr(), "/metrics"));
        let requests = (
            m.count("hopwatch_hop_requests_total", &hop("client")),
            m.count("hopwatch_hop_requests_total", &hop("server")),
        );
        if requests == (per_end, per_end) {
            // The kernel's counters are read once a second.
            std::thread::sleep(Duration::from_millis(1500));
            break Metrics(http_get(agent.metrics_addr(), "/metrics"));
        }
        assert!(
            Instant::now() < deadline,
            "hop requests (client, server) {requests:?}, want {per_end}; the agent's metrics:\n{}",
            m.0.lines()
                .filter(|l| l.contains("kernel_events")
                    || l.contains("hop_requests")
                    || l.contains("l7_exchanges")
                    || l.contains("parse_failures")
                    || l.contains("hop_flows"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    let counts = ["client", "server"].map(|r| {
        (
            metrics.count("hopwatch_hop_requests_total", &hop(r)),
            metrics.count("hopwatch_hop_request_errors_total", &hop(r)),
        )
    });
    let kernel_exchanges =
        metrics.count("hopwatch_kernel_events_total", &[("event", "kernel_exchanges")]);

    let recorded = recorded(&agent, b.ip, wire);
    Run { counts, kernel_exchanges, recorded }
}

/// The error and slow exchanges the agent recorded at each end (client, server) for the server
/// at `ip`, once each end has them all (or after 10 s).
fn recorded(agent: &Agent, ip: Ipv4Addr, wire: Wire) -> [Recorded; 2] {
    let ours = |f: &Value| {
        f["Type"] == "L7"
            && ip_dst(f) == ip.to_string()
            && tcp_port(f, "destination_port") == u64::from(PORT)
            && (f["verdict"] == "ERROR" || u64_at(f, &["l7", "latency_ns"]) >= 10_000_000)
    };
    let flows_per_end = REQUESTS / FAIL_EVERY + 1 + slow_count();
    let wait = Instant::now() + Duration::from_secs(10);
    loop {
        let flows: Vec<Value> = agent.flows().into_iter().filter(|f| ours(f)).collect();
        let by = |dir: &str| -> Recorded {
            flows
                .iter()
                .filter(|f| f["traffic_direction"] == dir)
                .map(|f| {
                    let http = &f["l7"]["http"];
                    (
                        u64_at(f, &["l7", "exchange_index"]),
                        (
                            // The path: each run's server has its own address.
                            http["url"].as_str().unwrap_or_default().replace(
                                &format!(
                                    "{}://{}:{PORT}",
                                    if wire == Wire::Tls { "https" } else { "http" },
                                    ip
                                ),
                                "",
                            ),
                            http["code"].as_u64().unwrap_or(0),
                            f["verdict"].as_str().unwrap_or_default().to_owned(),
                            u64_at(f, &["l7", "latency_ns"]),
                        ),
                    )
                })
                .collect()
        };
        let ends = [by("EGRESS"), by("INGRESS")];
        if ends.iter().all(|e| e.len() as u64 == flows_per_end) || Instant::now() > wait {
            break ends;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Requests to `/slow` among the first [`REQUESTS`] (those not sent to `/fail`).
fn slow_count() -> u64 {
    (0..REQUESTS)
        .filter(|i| i % FAIL_EVERY != FAIL_EVERY - 1 && i % SLOW_EVERY == SLOW_EVERY - 1)
        .count() as u64
}

#[test]
fn the_kernel_engine_counts_and_records_what_the_capture_path_does() {
    let _serial = serial();
    same_both_ways(Wire::Clear);
}

#[test]
fn over_tls_the_kernel_engine_counts_and_records_what_the_capture_path_does() {
    let _serial = serial();
    same_both_ways(Wire::Tls);
}

fn same_both_ways(wire: Wire) {
    let kernel = run(wire, &[]);
    let capture = run(wire, &["--no-kernel-exchanges"]);

    let errors = REQUESTS / FAIL_EVERY + 1;
    for r in [&kernel, &capture] {
        assert_eq!(r.counts, [(REQUESTS + 1, errors); 2], "every exchange and error");
    }
    // Both ends after the promotion were measured in the kernel (the capture path measures the
    // connection's first exchanges, and those its data was already in flight for when the
    // promotion landed: tens at this rate), and none without it.
    assert!(
        kernel.kernel_exchanges >= REQUESTS,
        "{} exchanges measured in the kernel",
        kernel.kernel_exchanges
    );
    assert_eq!(capture.kernel_exchanges, 0);

    for (end, (k, c)) in
        ["client", "server"].iter().zip(kernel.recorded.iter().zip(&capture.recorded))
    {
        let keys = |m: &Recorded| -> Vec<(u64, String, u64, String)> {
            m.iter()
                .map(|(i, (url, code, verdict, _))| (*i, url.clone(), *code, verdict.clone()))
                .collect()
        };
        assert_eq!(keys(k), keys(c), "{end} end: the same exchanges recorded with the same fields");
        let hang =
            k.get(&REQUESTS).unwrap_or_else(|| panic!("{end}: the unanswered request {k:?}"));
        assert_eq!((hang.0.as_str(), hang.1, hang.2.as_str()), ("/hang", 0, "ERROR"));
        // The injected delay, measured at both ends (tolerance: scheduling on a busy machine).
        for (i, (url, _, _, latency)) in k {
            if url == "/slow" {
                let took = Duration::from_nanos(*latency);
                assert!(
                    (SLOW..SLOW + Duration::from_millis(15)).contains(&took),
                    "{end} exchange {i}: {took:?} for a {SLOW:?} delay"
                );
            }
        }
    }
}
