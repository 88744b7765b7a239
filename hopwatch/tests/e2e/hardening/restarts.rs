//! Restarts: the agent killed with SIGKILL and started again, traced servers that reload or
//! restart (nginx's new workers, a new PostgreSQL postmaster), and a collector that is not there
//! yet, then killed and started again.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4, TcpListener},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use super::{
    CountingAgent,
    floods::{AcceptSink, connect_flood, prepare_client},
};
use crate::support::{
    Testbed,
    agent::BIN,
    serial,
    servers::{Nginx, Postgres, ServerProcess, TempDir, children_of, output_in, succeeds},
};

const WAIT: Duration = Duration::from_secs(20);

/// The BPF objects (programs, links, maps) `pid` holds open, from its fdinfo.
fn bpf_objects(pid: u32) -> BTreeSet<(&'static str, u32)> {
    let dir = format!("/proc/{pid}/fdinfo");
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("read {dir}: {e}"));
    let mut out = BTreeSet::new();
    for e in entries.flatten() {
        let Ok(info) = std::fs::read_to_string(e.path()) else { continue };
        for line in info.lines() {
            for kind in ["prog_id", "link_id", "map_id"] {
                if let Some(id) = line.strip_prefix(kind).and_then(|r| r.strip_prefix(':')) {
                    out.insert((kind, id.trim().parse().expect("a numeric id")));
                }
            }
        }
    }
    out
}

/// Which of `objects` the kernel still has.
fn still_loaded(objects: &BTreeSet<(&'static str, u32)>) -> Vec<(&'static str, u32)> {
    let progs: BTreeSet<u32> =
        aya::programs::loaded_programs().filter_map(Result::ok).map(|p| p.id()).collect();
    let links: BTreeSet<u32> =
        aya::programs::loaded_links().filter_map(Result::ok).map(|l| l.id()).collect();
    let maps: BTreeSet<u32> =
        aya::maps::loaded_maps().filter_map(Result::ok).map(|m| m.id()).collect();
    objects
        .iter()
        .filter(|(kind, id)| match *kind {
            "prog_id" => progs.contains(id),
            "link_id" => links.contains(id),
            _ => maps.contains(id),
        })
        .copied()
        .collect()
}

fn pins() -> Vec<String> {
    std::fs::read_dir("/sys/fs/bpf")
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.to_lowercase().contains("hopwatch"))
                .collect()
        })
        .unwrap_or_default()
}

/// Client-side CLOSE flows from `client` to `server`.
fn closes(client: Ipv4Addr, server: Ipv4Addr) -> super::Classifier {
    let (src, dst) = (format!("\"source\":\"{client}\""), format!("\"destination\":\"{server}\""));
    Box::new(move |line: &str| {
        (line.contains(&src)
            && line.contains(&dst)
            && line.contains("\"socket_event\":\"CLOSE\"")
            && line.contains("\"traffic_direction\":\"EGRESS\""))
        .then_some(("close", true))
    })
}

fn wait_for_class(agent: &CountingAgent, class: &str, at_least: u64, what: &str) {
    let deadline = Instant::now() + WAIT;
    while agent.tally().class(class) < at_least {
        assert!(
            Instant::now() < deadline,
            "{what}: {} of {at_least} {class} flows within {WAIT:?}\n{}",
            agent.tally().class(class),
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn after_sigkill_a_new_agent_starts_clean_and_traces() {
    let _serial = serial();
    let mut tb = Testbed::new();
    let (client, server) = (tb.pod("victim"), tb.pod("ksink"));
    let _sink = AcceptSink::start(&server, &[7201]);
    let mut first = CountingAgent::start(&["--no-collector"], closes(client.ip, server.ip));
    connect_flood(&client, server.ip, &[7201], 3, WAIT);
    wait_for_class(&first, "close", 3, "first agent");
    let held = bpf_objects(first.pid);
    let progs = held.iter().filter(|(k, _)| *k == "prog_id").count();
    assert!(progs >= 6, "the agent holds only {progs} programs: {held:?}");
    first.stop_with(libc::SIGKILL, Duration::from_secs(5));

    // Started at once, as a supervisor would.
    let started = Instant::now();
    let second = CountingAgent::start(&["--no-collector"], closes(client.ip, server.ip));
    eprintln!("second agent ready {:?} after the SIGKILL", started.elapsed());
    // The first run's programs, links and maps went with its file descriptors: nothing of it
    // stays attached next to the new run (the kernel frees them shortly after the exit).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = still_loaded(&held);
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "left by the killed agent: {left:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(pins().is_empty(), "pinned objects in /sys/fs/bpf: {:?}", pins());
    let now = bpf_objects(second.pid);
    assert_eq!(
        now.iter().filter(|(k, _)| *k == "prog_id").count(),
        progs,
        "the new run holds a different set of programs: {now:?}"
    );
    // And it traces: each connection made now is reported once.
    connect_flood(&client, server.ip, &[7201], 5, WAIT);
    wait_for_class(&second, "close", 5, "after the restart");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(second.tally().class("close"), 5, "a connection reported twice");
}

// ============================================================================================
// Traced servers that reload or restart
// ============================================================================================

/// L7 flows (kept), by protocol.
fn l7_flows() -> super::Classifier {
    Box::new(|line: &str| {
        if !line.contains("\"Type\":\"L7\"") {
            None
        } else if line.contains("\"http\"") {
            Some(("http", true))
        } else if line.contains("\"postgres\"") {
            Some(("postgres", true))
        } else {
            None
        }
    })
}

/// Waits for a kept flow matching `pred`.
fn wait_for_flow(agent: &CountingAgent, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(f) = agent.tally().kept.into_iter().find(|f| pred(f)) {
            return f;
        }
        assert!(
            Instant::now() < deadline,
            "no flow {what} within {WAIT:?}; kept {:?}\n{}",
            agent.tally().kept.iter().map(Value::to_string).collect::<Vec<_>>(),
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn pid_of(f: &Value, side: &str) -> u32 {
    u32::try_from(f[side]["pid"].as_u64().unwrap_or(0)).expect("a pid")
}

/// nginx's answer seen at nginx (server side, the plaintext from the TLS uprobes) for `path`.
fn https_at_nginx(f: &Value, path: &str) -> bool {
    f["traffic_direction"] == "INGRESS"
        && f["l7"]["protocol"] == "http"
        && f["l7"]["http"]["url"].as_str().is_some_and(|u| u.ends_with(path))
        && f["destination_process"]["comm"] == "nginx"
}

#[test]
fn reloaded_nginx_and_restarted_postgres_stay_traced_tls_included() {
    let _serial = serial();
    let mut tb = Testbed::new();
    let (client, ingress, app, db) =
        (tb.pod("rclient"), tb.pod("ringress"), tb.pod("rapp"), tb.pod("rdb"));
    let agent = CountingAgent::start(&["--no-collector"], l7_flows());
    // A plain HTTP upstream (Python's), enough for nginx to answer 200 through it.
    let upstream_dir = TempDir::new("upstream");
    let files = upstream_dir.path().join("files");
    std::fs::create_dir(&files).expect("upstream files directory");
    for name in ["before-reload", "after-reload-0", "after-reload-1", "after-reload-2"] {
        std::fs::write(files.join(name), name).expect("an upstream file");
    }
    let files = files.to_str().expect("UTF-8 path").to_owned();
    let upstream = ServerProcess::spawn(
        "http.server",
        &app,
        &[
            "python3",
            "-m",
            "http.server",
            "8000",
            "--bind",
            &app.ip.to_string(),
            "--directory",
            &files,
        ],
        &[],
        upstream_dir.path().join("log"),
        libc::SIGTERM,
    );
    let probe = format!("http://{}:8000/before-reload", app.ip);
    upstream.wait_until("serving files", || {
        succeeds(&app, &["curl", "-sf", "-o", "/dev/null", &probe])
    });
    let nginx = Nginx::start(&ingress, SocketAddrV4::new(app.ip, 8000), 2);
    let mut postgres = Postgres::start(&db);
    let cert = nginx.cert_path();
    let cert = cert.to_str().expect("UTF-8 path");
    let get = |path: &str| {
        let url = format!("https://{}{path}", ingress.ip);
        output_in(
            &client,
            &["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", cert, &url],
        )
    };

    // Before: TLS plaintext at nginx's workers.
    assert_eq!(get("/before-reload"), "200", "{}", nginx.log());
    let before = wait_for_flow(&agent, "for /before-reload at nginx", |f| {
        https_at_nginx(f, "/before-reload")
    });
    assert_eq!(before["l7"]["tls"], true, "{before}");
    let old_workers: BTreeSet<u32> = nginx.worker_pids().into_iter().collect();

    // nginx reload (SIGHUP, as `nginx -s reload` sends): new workers, the old ones leave.
    // SAFETY: signalling a server this test started.
    unsafe { libc::kill(nginx.pid().cast_signed(), libc::SIGHUP) };
    let deadline = Instant::now() + WAIT;
    let new_workers = loop {
        let now: BTreeSet<u32> = children_of(nginx.pid()).into_iter().collect();
        if now.len() == 2 && now.is_disjoint(&old_workers) {
            break now;
        }
        assert!(Instant::now() < deadline, "nginx did not reload: {now:?}\n{}", nginx.log());
        std::thread::sleep(Duration::from_millis(50));
    };
    for n in 0..3 {
        assert_eq!(get(&format!("/after-reload-{n}")), "200", "{}", nginx.log());
    }
    for n in 0..3 {
        let path = format!("/after-reload-{n}");
        let f =
            wait_for_flow(&agent, &format!("for {path} at nginx"), |f| https_at_nginx(f, &path));
        assert_eq!(f["l7"]["tls"], true, "{f}");
        assert_eq!(f["l7"]["http"]["code"], 200, "{f}");
        let pid = pid_of(&f, "destination_process");
        assert!(
            new_workers.contains(&pid),
            "served by {pid}, not a new worker {new_workers:?}: {f}"
        );
    }

    // PostgreSQL: a statement before the restart and one after, each seen at the server.
    let statement_at_server = |table: &'static str| {
        move |f: &Value| {
            f["traffic_direction"] == "INGRESS"
                && f["l7"]["protocol"] == "postgres"
                && f["l7"]["postgres"]["query"].as_str().is_some_and(|q| q.contains(table))
        }
    };
    postgres.psql("SELECT count(*) FROM pg_class");
    let first = wait_for_flow(&agent, "pg_class at postgres", statement_at_server("pg_class"));
    let old_pid = postgres.pid();
    postgres = postgres.restart();
    assert_ne!(postgres.pid(), old_pid);
    postgres.psql("SELECT count(*) FROM pg_namespace");
    let second = wait_for_flow(
        &agent,
        "pg_namespace after the restart",
        statement_at_server("pg_namespace"),
    );
    assert_eq!(second["destination_process"]["comm"], "postgres", "{second}");
    assert_ne!(
        pid_of(&second, "destination_process"),
        pid_of(&first, "destination_process"),
        "the same backend before and after a restart?"
    );
    assert_eq!(second["verdict"], "FORWARDED", "{second}");
}

// ============================================================================================
// The collector away, then killed
// ============================================================================================

pub(super) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// `hopwatch collector` on loopback `port` with its history in `dir`.
struct Collector {
    child: Child,
    log: std::path::PathBuf,
}

impl Collector {
    fn start(port: u16, dir: &Path, name: &str) -> Self {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("collector log");
        let child = Command::new(BIN)
            .args(["collector", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("start hopwatch collector");
        let mut c = Self { child, log };
        let deadline = Instant::now() + WAIT;
        while !c.log().contains("listening on") {
            if let Some(s) = c.child.try_wait().expect("wait") {
                panic!("collector exited ({s}):\n{}", c.log());
            }
            assert!(Instant::now() < deadline, "collector not listening:\n{}", c.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        c
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill(mut self) {
        self.child.kill().expect("kill the collector");
        self.child.wait().expect("reap the collector");
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Everything the collector on `port` stored, as JSON lines from `hopwatch observe`.
pub(super) fn observe_all(port: u16) -> Vec<Value> {
    let out = Command::new(BIN)
        .args(["observe", "--server", &format!("127.0.0.1:{port}"), "--all", "-o", "json"])
        .output()
        .expect("run hopwatch observe");
    assert!(out.status.success(), "observe failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("observe printed {l:?}: {e}")))
        .collect()
}

/// Flows from `client` to `server` and the collector-queue losses in `lines`.
fn count_at_collector(lines: &[Value], client: Ipv4Addr, server: Ipv4Addr) -> (u64, u64) {
    let (mut flows, mut lost) = (0, 0);
    for l in lines {
        if l["lost_events"]["source"] == "OBSERVER_EVENTS_QUEUE" {
            lost += l["lost_events"]["num_events_lost"].as_u64().unwrap_or(0);
        }
        let f = &l["flow"];
        if f["IP"]["source"] == client.to_string()
            && f["IP"]["destination"] == server.to_string()
            && f["socket_event"] == "CLOSE"
            && f["traffic_direction"] == "EGRESS"
        {
            flows += 1;
        }
    }
    (flows, lost)
}

#[test]
fn a_collector_away_then_killed_costs_counted_flows_and_delivery_resumes() {
    const QUEUE: u64 = 2000;
    let _serial = serial();
    let mut tb = Testbed::new();
    let (client, server) = (tb.pod("cclient"), tb.pod("csink"));
    prepare_client(&client);
    let _sink = AcceptSink::start(&server, &[7301, 7302]);
    let port = free_port();
    let dir = TempDir::new("collector");
    let agent = CountingAgent::start(
        &[
            "--collector",
            &format!("http://127.0.0.1:{port}"),
            "--queue-flows",
            &QUEUE.to_string(),
            "--reconnect-max",
            "500ms",
        ],
        closes(client.ip, server.ip),
    );
    // Nothing listens yet: far more flows than the queue holds.
    let away = connect_flood(&client, server.ip, &[7301, 7302], 3000, Duration::from_secs(30));
    assert_eq!(away.connected, 3000);
    // What the agent produced (some events of so many connections at once may be lost in the
    // ring buffer, counted: settle checks that), as its stdout shows.
    let (_, t) = agent.settle(Duration::from_secs(30));
    let produced = t.class("close");
    assert!(produced > 0, "no flow for {away:?}");
    std::thread::sleep(Duration::from_millis(1100));
    let m = agent.scrape();
    let queued = m.count("hopwatch_collector_queue_events", &[]);
    let dropped = m.lost("collector_queue");
    eprintln!("collector away: {queued} queued, {dropped} dropped");
    assert!(queued <= QUEUE, "the collector queue holds {queued} events, over --queue-flows");
    assert!(dropped > 0, "3000 flows into a queue of {QUEUE} and none dropped");
    assert_eq!(m.count("hopwatch_queue_dropped_events_total", &[("queue", "collector")]), dropped);

    // The collector appears: the queue drains into it and the drops arrive as a count.
    let collector = Collector::start(port, dir.path(), "first");
    // Other processes on the host keep adding flows, so the queue is drained when it stops
    // dropping and holds a small part of what it can.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut dropped_before = agent.scrape().lost("collector_queue");
    loop {
        std::thread::sleep(Duration::from_millis(1100));
        let m = agent.scrape();
        let (queued, dropped) =
            (m.count("hopwatch_collector_queue_events", &[]), m.lost("collector_queue"));
        eprintln!("queue {queued}, dropped {dropped}");
        if dropped == dropped_before && queued < QUEUE / 4 {
            break;
        }
        dropped_before = dropped;
        assert!(
            Instant::now() < deadline,
            "the queue never drained:\n{}\n{}",
            agent.stderr(),
            collector.log()
        );
    }
    let stored = observe_all(port);
    let (flows, lost) = count_at_collector(&stored, client.ip, server.ip);
    let dropped = agent.scrape().lost("collector_queue");
    eprintln!("after it appeared: {flows} of our flows stored, {lost} counted lost ({dropped})");
    assert_eq!(lost, dropped, "the collector was told of every drop");
    // The queue was full when the collector appeared (of every flow on the host, the oldest):
    // all of that is delivered, then what came since.
    let delivered = u64::try_from(stored.len()).expect("fits");
    assert!(delivered >= QUEUE, "only {delivered} events delivered from a full queue of {QUEUE}");
    assert!(flows <= produced, "{flows} stored, {produced} produced");

    // Killed (no goodbye) and back on the same port and history: new flows get there.
    collector.kill();
    let during = connect_flood(&client, server.ip, &[7301], 20, WAIT);
    assert_eq!(during.connected, 20);
    std::thread::sleep(Duration::from_millis(700));
    let collector = Collector::start(port, dir.path(), "restarted");
    let after = connect_flood(&client, server.ip, &[7302], 20, WAIT);
    assert_eq!(after.connected, 20);
    let (m, t) = agent.settle(Duration::from_secs(30));
    let produced_since = t.class("close") - produced;
    assert!(produced_since > 0, "no flow for 40 connections:\n{}", agent.stderr());
    assert_eq!(m.lost("collector_queue"), dropped, "the queue had room: nothing more dropped");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stored = observe_all(port);
        let (now, lost) = count_at_collector(&stored, client.ip, server.ip);
        // Nothing was dropped since, so every flow the agent produced while the collector was
        // dead or back must arrive, and once only.
        assert!(now <= flows + produced_since, "{now} stored, more than produced");
        if now == flows + produced_since && lost == dropped {
            eprintln!("after the restart: {now} flows stored, {lost} counted lost");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "delivery did not resume: {now} stored (want {flows} + {produced_since}), {lost} lost \
             vs {dropped}\n{}\n{}",
            agent.stderr(),
            collector.log()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let mut agent = agent;
    agent.assert_running();
    let status = agent.stop_with(libc::SIGTERM, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{}", agent.stderr());
}
