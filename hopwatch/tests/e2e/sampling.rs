//! Exchanges recorded by policy: above `--l7-flow-rate` the agent records errors, slow
//! exchanges, a connection's first and one in `--l7-flow-sample` (the same ones at both ends of a
//! hop), while the hop metrics still count every exchange.

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader},
    process::Stdio,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    hardening::{Metrics, http_get},
    support::{
        Pod, Testbed,
        agent::{Agent, ip_dst, tcp_port, u64_at},
        serial,
    },
};

pub(crate) const PORT: u16 = 18_181;
const REQUESTS: u64 = 3000;
/// Every this many requests one goes to `/fail` (a 500).
const FAIL_EVERY: u64 = 100;
const SAMPLE: u64 = 10;

/// An HTTP/1.1 keep-alive server, a thread per connection: 500 for `/fail`, 200 otherwise
/// (after 20 ms for `/slow`), no answer for `/hang` (the connection is closed), each response in
/// one write (a header write then a body write waits on delayed ACKs); prints `ready`. Given a
/// backend (argv 3 and 4), it is a front instead: each request is passed on to the backend over
/// the thread's own keep-alive connection, then answered 200. With `TLS_CERT` and `TLS_KEY` in
/// its environment it serves HTTPS (Python's `ssl`: the system's OpenSSL).
pub(crate) const SERVER: &str = r#"
import os, sys, socket, ssl, threading, time
backend = (sys.argv[3], int(sys.argv[4])) if len(sys.argv) > 4 else None
tls = None
if os.environ.get("TLS_CERT"):
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(os.environ["TLS_CERT"], os.environ["TLS_KEY"])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(8)
def status(path, up):
    if up is not None:
        up.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: backend\r\n\r\n")
        got = b""
        while not got.endswith(b"\r\n\r\nx"):
            got += up.recv(65536)
        return b"200 OK"
    if path == b"/slow":
        time.sleep(0.02)
    return b"500 Internal Server Error" if path == b"/fail" else b"200 OK"
def serve(c):
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls is not None:
        c = tls.wrap_socket(c, server_side=True)
    up = socket.create_connection(backend) if backend else None
    if up is not None:
        up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = b""
    while True:
        data = c.recv(65536)
        if not data:
            break
        buf += data
        while b"\r\n\r\n" in buf:
            head, buf = buf.split(b"\r\n\r\n", 1)
            path = head.split(b" ")[1]
            if path == b"/hang":
                data = b""
                break
            c.sendall(b"HTTP/1.1 " + status(path, up) + b"\r\nContent-Length: 1\r\n\r\nx")
        if not data:
            break
    c.close()
print("ready", flush=True)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// `n` requests on one keep-alive connection, every `fail`th to `/fail`; prints the count of
/// answers.
const CLIENT: &str = r#"
import sys, http.client
c = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=10)
n, fail, done = int(sys.argv[3]), int(sys.argv[4]), 0
for i in range(n):
    c.request("GET", "/fail" if i % fail == fail - 1 else "/ok")
    r = c.getresponse()
    r.read()
    done += 1
print(done, flush=True)
"#;

/// Starts [`SERVER`] in `pod` on [`PORT`] and waits until it listens.
pub(crate) fn start_server(tb: &mut Testbed, pod: &Pod) {
    start_python(tb, pod, SERVER, &[&pod.ip.to_string(), &PORT.to_string()], &[]);
}

/// Runs `script` with `args` (and `env`) in `pod` until the test ends; waits for it to print
/// `ready`.
pub(crate) fn start_python(
    tb: &mut Testbed,
    pod: &Pod,
    script: &str,
    args: &[&str],
    env: &[(&str, &str)],
) {
    let mut cmd = vec!["python3", "-c", script];
    cmd.extend_from_slice(args);
    let mut server = pod
        .command(&cmd)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 is installed (`cargo xtask test` installs it)");
    let mut ready = String::new();
    BufReader::new(server.stdout.take().expect("piped"))
        .read_line(&mut ready)
        .expect("server prints ready");
    assert_eq!(ready.trim(), "ready", "server in {}", pod.netns);
    tb.adopt(server);
}

const FRONT_PORT: u16 = 18_182;

#[test]
fn above_the_rate_errors_and_samples_are_recorded_alike_at_both_ends_and_every_exchange_counted() {
    let _serial = serial();
    let mut tb = Testbed::new();
    let (a, b) = (tb.pod("client"), tb.pod("server"));
    // A budget of one exchange a second: nearly every recording decision is the sample's.
    let agent = Agent::start(&["--l7-flow-rate", "1", "--l7-flow-sample", &SAMPLE.to_string()]);
    start_server(&mut tb, &b);

    let started = Instant::now();
    let out = a.exec(&[
        "python3",
        "-c",
        CLIENT,
        &b.ip.to_string(),
        &PORT.to_string(),
        &REQUESTS.to_string(),
        &FAIL_EVERY.to_string(),
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), REQUESTS.to_string(), "{out:?}");
    // The once-a-second budget records up to this many more at either end.
    let budget = started.elapsed().as_secs() + 2;

    // Exact counts: every exchange at each end, in the hop metrics.
    let hop =
        |reporter| [("destination_port", "18181"), ("protocol", "http"), ("reporter", reporter)];
    let deadline = Instant::now() + Duration::from_secs(20);
    let metrics = loop {
        let m = Metrics(http_get(agent.metrics_addr(), "/metrics"));
        let counts = (
            m.count("hopwatch_hop_requests_total", &hop("client")),
            m.count("hopwatch_hop_requests_total", &hop("server")),
        );
        if counts == (REQUESTS, REQUESTS) {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "hop requests (client, server) {counts:?}, want {REQUESTS}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    let errors = REQUESTS / FAIL_EVERY;
    for reporter in ["client", "server"] {
        assert_eq!(
            metrics.count("hopwatch_hop_request_errors_total", &hop(reporter)),
            errors,
            "{reporter}"
        );
    }
    let not_recorded = metrics.count("hopwatch_l7_exchanges_total", &[("reason", "not_recorded")]);
    assert!(
        not_recorded > REQUESTS,
        "most of both ends' {} exchanges not recorded: {not_recorded}",
        2 * REQUESTS
    );

    // The recorded flows of this hop, by end.
    // Both ends' flows name the client as the source and the server as the destination.
    let ours = |f: &Value| {
        f["Type"] == "L7"
            && ip_dst(f) == b.ip.to_string()
            && tcp_port(f, "destination_port") == u64::from(PORT)
    };
    let wait = Instant::now() + Duration::from_secs(10);
    let (client, server) = loop {
        let flows: Vec<Value> = agent.flows().into_iter().filter(|f| ours(f)).collect();
        let by = |dir: &str| -> Vec<Value> {
            flows.iter().filter(|f| f["traffic_direction"] == dir).cloned().collect()
        };
        let (c, s) = (by("EGRESS"), by("INGRESS"));
        let errors_seen = |v: &[Value]| v.iter().filter(|f| f["verdict"] == "ERROR").count() as u64;
        if errors_seen(&c) == errors && errors_seen(&s) == errors || Instant::now() > wait {
            break (c, s);
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    let indexes = |v: &[Value], verdict: &str| -> BTreeSet<u64> {
        v.iter()
            .filter(|f| f["verdict"] == verdict)
            .map(|f| u64_at(f, &["l7", "exchange_index"]))
            .collect()
    };
    // Every error at both ends, whatever the rate.
    let want_errors: BTreeSet<u64> =
        (0..REQUESTS).filter(|i| i % FAIL_EVERY == FAIL_EVERY - 1).collect();
    assert_eq!(indexes(&client, "ERROR"), want_errors, "client end's errors");
    assert_eq!(indexes(&server, "ERROR"), want_errors, "server end's errors");
    // About one in SAMPLE of the rest (binomial, 3000 draws: 300 ± 60 is beyond 3 sigma) plus
    // what the once-a-second budget took while the client ran, and the same exchanges at both
    // ends except those the budget recorded at one end only (the node has one budget: the server
    // end, which completes an exchange first, usually takes it).
    let (c, s) = (indexes(&client, "FORWARDED"), indexes(&server, "FORWARDED"));
    let expected = REQUESTS / SAMPLE;
    for (end, set) in [("client", &c), ("server", &s)] {
        assert!(
            (expected - expected / 5..=expected + expected / 5 + budget)
                .contains(&(set.len() as u64)),
            "{end} end recorded {} exchanges, expected about {expected} plus up to {budget}",
            set.len()
        );
    }
    let differ = c.symmetric_difference(&s).count();
    assert!(
        differ <= 20,
        "{differ} exchanges recorded at one end only: client {c:?}, server {s:?}"
    );
    assert!(c.contains(&0) && s.contains(&0), "a connection's first exchange is always recorded");
}

/// Sampling is per trace: above the rate, a request the sample records has the call made for it
/// recorded too (and linked to it), and a call is not recorded for a request that was not: the
/// front's calls follow its requests' sampling decisions, not their own.
#[test]
fn a_sampled_request_s_calls_are_recorded_with_it_and_no_others() {
    let _serial = serial();
    let mut tb = Testbed::new();
    let (client, front, backend) = (tb.pod("client"), tb.pod("front"), tb.pod("backend"));
    let agent = Agent::start(&["--l7-flow-rate", "1", "--l7-flow-sample", &SAMPLE.to_string()]);
    start_server(&mut tb, &backend);
    let front_args = [
        &front.ip.to_string(),
        &FRONT_PORT.to_string(),
        &backend.ip.to_string(),
        &PORT.to_string(),
    ];
    start_python(&mut tb, &front, SERVER, &front_args.map(String::as_str), &[]);
    let started = Instant::now();
    let no_failures = (REQUESTS + 1).to_string();
    let out = client.exec(&[
        "python3",
        "-c",
        CLIENT,
        &front.ip.to_string(),
        &FRONT_PORT.to_string(),
        &REQUESTS.to_string(),
        &no_failures,
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), REQUESTS.to_string(), "{out:?}");
    let budget = started.elapsed().as_secs() + 2;

    let to = |ip: &str, port: u16| {
        let ip = ip.to_owned();
        move |f: &Value| {
            f["Type"] == "L7"
                && ip_dst(f) == ip
                && tcp_port(f, "destination_port") == u64::from(port)
        }
    };
    let (requests, calls) =
        (to(&front.ip.to_string(), FRONT_PORT), to(&backend.ip.to_string(), PORT));
    let span = |f: &Value| f["l7"]["span"]["span_id"].as_str().unwrap_or_default().to_owned();
    let parent =
        |f: &Value| f["l7"]["span"]["parent_span_id"].as_str().unwrap_or_default().to_owned();
    // Linked calls wait for their request's flow (the agent holds them up to 10 s).
    std::thread::sleep(Duration::from_secs(3));
    let wait = Instant::now() + Duration::from_secs(15);
    let (recorded, orphans, childless, calls_seen) = loop {
        let flows = agent.flows();
        let recorded: BTreeSet<String> = flows.iter().filter(|f| requests(f)).map(span).collect();
        let made_for: Vec<String> = flows
            .iter()
            .filter(|f| calls(f) && f["traffic_direction"] == "EGRESS")
            .map(parent)
            .collect();
        let orphans = made_for.iter().filter(|p| !recorded.contains(*p)).count() as u64;
        let with_calls: BTreeSet<&String> = made_for.iter().collect();
        let childless = recorded.iter().filter(|r| !with_calls.contains(r)).count() as u64;
        if childless <= budget || Instant::now() > wait {
            break (recorded.len() as u64, orphans, childless, made_for.len() as u64);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    eprintln!(
        "{REQUESTS} requests at 1 in {SAMPLE}: {recorded} recorded, {calls_seen} calls recorded \
         at the front, {orphans} of them for a request not recorded, {childless} recorded \
         requests without their call (budget {budget})"
    );
    let expected = REQUESTS / SAMPLE;
    assert!(
        recorded >= expected - expected / 5,
        "about one in {SAMPLE} requests recorded: {recorded}"
    );
    // What the once-a-second budget takes is recorded without the rest of its trace; everything
    // else follows the request's decision. (A call's server end, at the backend, cannot see its
    // client's request and is sampled by its own key.)
    assert!(orphans <= budget, "{orphans} calls recorded for requests that were not");
    assert!(childless <= budget, "{childless} recorded requests without their call");
}
