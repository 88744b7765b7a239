//! The web UI in a real headless browser against the real agent and real traffic: pods named
//! by a static endpoints file (namespaces `shop` and `data`), front → app → db, front → slow
//! (every packet from front to slow delayed by SLOW), front → app:7777 dropped by an nft rule.
//! The browser half (`hopwatch/ui/tests/browser.mjs`: Debian's chromium driven by
//! playwright-core, both installed by `cargo xtask test`) checks that the map shows the
//! endpoints with the slow hop highlighted, that a click on it opens its histogram and flows,
//! that filters narrow the flow table and that follow shows a new flow within a second; it
//! writes screenshots (README's are these, from `HOPWATCH_UI_SCREENSHOTS=docs`).

use std::{
    io::Write as _,
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{
    metrics::{
        prometheus::{free_port, http},
        repo_root, start_server,
    },
    support::{Testbed, agent::Agent, serial},
};

const SLOW: Duration = Duration::from_millis(300);
/// The map's "slow above" in the test: below SLOW, above a delayed-ACK stall (200 ms) on the fast
/// hops of a loaded machine.
const THRESHOLD: Duration = Duration::from_millis(250);
/// A trace id the follow check's request carries (W3C traceparent).
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// Background traffic until killed: front → app:8080 (which calls db), front → slow:9090, and
/// now and then a connect to app:7777, which app's firewall drops.
const CLIENT: &str = r#"
import http.client, socket, sys, time
app, slow = sys.argv[1], sys.argv[2]
def get(host, port, path):
    c = http.client.HTTPConnection(host, port, timeout=5)
    c.request("GET", path)
    c.getresponse().read(); c.close()
i = 0
while True:
    try:
        get(app, 8080, "/orders")
        if i % 2 == 0:
            get(slow, 9090, "/report")
        if i % 10 == 0:
            s = socket.socket(); s.settimeout(0.2)
            try: s.connect((app, 7777))
            except OSError: pass
            s.close()
    except Exception as e:
        print(repr(e), file=sys.stderr, flush=True)
    i += 1
    time.sleep(0.1)
"#;

/// Writes the endpoints file naming the test's pods.
fn endpoints_file(pods: &[(&str, &str, std::net::Ipv4Addr)]) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new()
        .prefix("hopwatch-e2e-ui-endpoints-")
        .suffix(".yaml")
        .tempfile()
        .expect("temp file");
    writeln!(f, "endpoints:").expect("write");
    for (ns, name, ip) in pods {
        writeln!(f, "  - name: {name}\n    namespace: {ns}\n    ips: [{ip}]").expect("write");
    }
    f
}

fn ui_addr(agent: &Agent) -> SocketAddr {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let err = agent.stderr();
        if let Some(a) = err
            .lines()
            .find_map(|l| l.split("web UI on http://").nth(1)?.split('/').next()?.parse().ok())
        {
            return a;
        }
        assert!(Instant::now() < deadline, "the agent did not say where the web UI is:\n{err}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn hops(ui: SocketAddr) -> Value {
    let (status, body) = http(ui, "GET", "/api/hops?since=5m", "").expect("GET /api/hops");
    assert_eq!(status, 200, "/api/hops: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("/api/hops: {e}: {body}"))
}

/// Waits (up to 30 s) until `/api/hops` has each of `ids` with a few requests; returns it.
fn wait_for_hops(ui: SocketAddr, ids: &[&str], agent: &Agent) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = hops(ui);
        let ready = ids.iter().all(|id| {
            v["hops"].as_array().is_some_and(|hs| {
                hs.iter().any(|h| h["id"] == *id && h["requests"].as_u64().unwrap_or(0) >= 3)
            })
        });
        if ready {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "hops not all seen within 30 s: {v}\n{}",
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Runs the browser half against the UI at `ui`; panics with its report when it fails.
fn browser(ui: SocketAddr, expect: &Value, screenshots: &std::path::Path, agent: &Agent) {
    let script = repo_root().join("hopwatch/ui/tests/browser.mjs");
    let out = Command::new("node")
        .arg(&script)
        .current_dir(repo_root())
        .env("HOPWATCH_UI_URL", format!("http://{ui}/"))
        .env("HOPWATCH_UI_EXPECT", expect.to_string())
        .env("HOPWATCH_UI_SCREENSHOTS", screenshots)
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}{stderr}");
    assert!(
        out.status.success(),
        "the browser test failed ({}):\n{stdout}{stderr}\nagent stderr:\n{}",
        out.status,
        agent.stderr()
    );
}

#[test]
fn the_browser_shows_the_map_the_slow_hop_and_followed_flows() {
    let _serial = serial();
    let node = Command::new("node").arg("--version").output();
    assert!(
        node.as_ref().is_ok_and(|o| o.status.success()),
        "the browser test needs Node.js (`cargo xtask test` installs it): {node:?}"
    );
    let mut tb = Testbed::new();
    let (front, app, db, slow) = (tb.pod("front"), tb.pod("app"), tb.pod("db"), tb.pod("slow"));
    let endpoints = endpoints_file(&[
        ("shop", "front", front.ip),
        ("shop", "app", app.ip),
        ("data", "db", db.ip),
        ("shop", "slow", slow.ip),
    ]);
    let agent = Agent::start(&[
        "--endpoints-file",
        endpoints.path().to_str().expect("UTF-8 temp path"),
        "--listen",
        &format!("127.0.0.1:{}", free_port()),
        "--ui-listen",
        "127.0.0.1:0",
    ]);
    let ui = ui_addr(&agent);

    start_server(&mut tb, &db, "hwu-db", 5432, None);
    start_server(&mut tb, &app, "hwu-app", 8080, Some(&format!("http://{}:5432/", db.ip)));
    start_server(&mut tb, &slow, "hwu-slow", 9090, None);
    tb.delay(&front, &slow, SLOW);
    app.nft("table inet hwu {\n chain input {\n  type filter hook input priority 0;\n  tcp dport 7777 drop\n }\n}\n");
    let client = front
        .command(&["python3", "-c", CLIENT, &app.ip.to_string(), &slow.ip.to_string()])
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3 is installed");
    tb.adopt(client);

    // The API first: the hops the browser will draw, measured against the injected delay.
    let slow_id = "shop/front -> shop/slow:9090/tcp";
    let table = wait_for_hops(
        ui,
        &["shop/front -> shop/app:8080/tcp", "shop/app -> data/db:5432/tcp", slow_id],
        &agent,
    );
    let hop = |id: &str| -> Value {
        table["hops"]
            .as_array()
            .expect("hops")
            .iter()
            .find(|h| h["id"] == id)
            .cloned()
            .expect("hop")
    };
    let slow_p50 = hop(slow_id)["client_latency"]["p50_ns"].as_u64().expect("client latency");
    // Request and response each cross the delayed direction once or more (SLOW per packet).
    assert!(slow_p50 >= 290_000_000, "slow hop p50 {slow_p50} ns below the injected {SLOW:?}");
    let fast_p99 = hop("shop/front -> shop/app:8080/tcp")["client_latency"]["p99_ns"]
        .as_u64()
        .expect("client latency");
    assert!(
        u128::from(fast_p99) < THRESHOLD.as_nanos(),
        "front → app p99 {fast_p99} ns: not fast, the map's threshold would flag it"
    );

    let screenshots: std::path::PathBuf = std::env::var("HOPWATCH_UI_SCREENSHOTS")
        .map_or_else(|_| repo_root().join("target/ui-screenshots"), Into::into);
    let trigger = [
        "ip".to_owned(),
        "netns".to_owned(),
        "exec".to_owned(),
        front.netns.clone(),
        "curl".to_owned(),
        "-s".to_owned(),
        "-o".to_owned(),
        "/dev/null".to_owned(),
        "-m".to_owned(),
        "10".to_owned(),
        "-H".to_owned(),
        format!("traceparent: 00-{TRACE_ID}-00f067aa0ba902b7-01"),
        format!("http://{}:9090/follow-check-{}", slow.ip, std::process::id()),
    ];
    let expect = json!({
        "endpoints": ["shop/front", "shop/app", "data/db", "shop/slow"],
        "slow_hop": slow_id,
        "threshold_ms": u64::try_from(THRESHOLD.as_millis()).expect("small"),
        "narrow": "to-port:9090",
        "narrow_match": ":9090",
        "trigger": trigger,
        "trigger_mark": format!("/follow-check-{}", std::process::id()),
        "trace_rows": 2,
    });
    browser(ui, &expect, &screenshots, &agent);
    for shot in ["ui-map.png", "ui-hop.png", "ui-flows.png", "ui-map-dark.png"] {
        let len = std::fs::metadata(screenshots.join(shot)).map_or(0, |m| m.len());
        assert!(len > 10_000, "screenshot {shot} missing or empty in {}", screenshots.display());
    }
}
