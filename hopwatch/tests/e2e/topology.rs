//! The application-protocol topology itself (client → nginx/TLS → `FastAPI` → `PostgreSQL`, Redis,
//! `MariaDB`, names through dnsmasq): every endpoint answers across all hops as the app promises,
//! with data the test put into the real backends. These tests prove the test bed, not hopwatch;
//! the protocol tests assert hopwatch's view on top of it.

use std::{
    collections::BTreeSet,
    panic::{AssertUnwindSafe, catch_unwind},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};

use crate::support::{
    Pod, Testbed, serial,
    servers::{
        Redis, output_in, temp_base,
        topology::{MISSING_NAME, MYSQL_NAME, NGINX_WORKERS, PG_NAME, REDIS_NAME, Topology, USERS},
    },
};

/// Whether `pid` is still a live process (zombies count as gone).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

/// Inode of the network namespace `pid` lives in.
fn netns_of(pid: u32) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .unwrap_or_else(|e| panic!("pid {pid} has no netns: {e}"))
        .ino()
}

/// The real uid `pid` runs as.
fn uid_of(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("process status");
    let line = status.lines().find(|l| l.starts_with("Uid:")).expect("Uid line");
    line.split_whitespace().nth(1).expect("real uid").parse().expect("number")
}

fn uid_of_user(user: &str) -> u32 {
    let passwd = std::fs::read_to_string("/etc/passwd").expect("/etc/passwd");
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f[0] == user).then(|| f[2].parse().expect("uid"))
        })
        .unwrap_or_else(|| panic!("no user {user}"))
}

/// This process's leftover temp dirs (servers' data, config and logs).
fn our_temp_dirs() -> Vec<String> {
    let marker = format!("-{}-", std::process::id());
    std::fs::read_dir(temp_base())
        .expect("temp dir")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("hopwatch-e2e-") && n.contains(&marker))
        .collect()
}

fn users_json() -> Value {
    Value::Array(USERS.iter().map(|(id, name)| json!({"id": id, "name": name})).collect())
}

/// Every server runs in its own pod, `PostgreSQL` and `MariaDB` not as root; returns the pids.
fn check_processes(topo: &Topology) -> Vec<(&'static str, u32)> {
    let mut pids: Vec<(&str, u32, &Pod)> = vec![
        ("nginx", topo.nginx.pid(), &topo.ingress),
        ("uvicorn", topo.app.pid(), &topo.app_pod),
        ("postgres", topo.postgres.pid(), &topo.db),
        ("redis", topo.redis.pid(), &topo.cache),
        ("mariadb", topo.mariadb.pid(), &topo.mysql),
        ("dnsmasq", topo.dns.pid(), &topo.dns_pod),
    ];
    let workers = topo.nginx.worker_pids();
    assert_eq!(
        workers.len(),
        usize::try_from(NGINX_WORKERS).unwrap(),
        "nginx workers; its log:\n{}",
        topo.nginx.log()
    );
    pids.extend(workers.iter().map(|&w| ("nginx worker", w, &topo.ingress)));
    for (name, pid, pod) in &pids {
        assert_eq!(netns_of(*pid), pod.netns_inode(), "{name} (pid {pid}) not in {}", pod.netns);
    }
    assert_eq!(uid_of(topo.postgres.pid()), uid_of_user("postgres"));
    assert_eq!(uid_of(topo.mariadb.pid()), uid_of_user("mysql"));
    pids.into_iter().map(|(name, pid, _)| (name, pid)).collect()
}

/// The rows the test inserted, a server-side sleep, a missing table.
fn check_postgres(topo: &Topology) {
    let r = topo.get("/db/users");
    assert_eq!((r.status, &r.body["users"]), (200, &users_json()));
    let r = topo.get("/db/sleep?ms=150");
    assert_eq!((r.status, &r.body), (200, &json!({"slept_ms": 150})));
    assert!(r.time >= Duration::from_millis(150), "pg_sleep(0.15) answered in {:?}", r.time);
    let r = topo.get("/db/error");
    assert_eq!((r.status, &r.body["sqlstate"]), (500, &json!("42P01")), "{:?}", r.body);
    let log = topo.postgres.log();
    assert!(log.contains("relation \"missing_table\" does not exist"), "postgres log:\n{log}");
}

/// A value written through the app is in Redis, one written into Redis comes back; a sleep, an
/// error reply, a pipeline.
fn check_redis(topo: &Topology) {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_nanos();
    let value = format!("v{}-{nanos}", std::process::id());
    let key = format!("topology:{}", std::process::id());
    let r = topo.request("POST", &format!("/cache/set?key={key}&value={value}"));
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(topo.redis.cli(&["GET", &key]).trim(), value, "redis log:\n{}", topo.redis.log());
    topo.redis.cli(&["SET", "topology:direct", "from-redis-cli"]);
    let r = topo.get("/cache/get?key=topology:direct");
    assert_eq!((r.status, &r.body["value"]), (200, &json!("from-redis-cli")));
    let r = topo.get("/cache/sleep?ms=150");
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(r.time >= Duration::from_millis(150), "DEBUG SLEEP 0.15 answered in {:?}", r.time);
    let r = topo.get("/cache/error");
    assert_eq!(r.status, 500);
    assert!(r.body["error"].as_str().is_some_and(|e| e.starts_with("WRONGTYPE")), "{:?}", r.body);
    let first = topo.get("/cache/pipeline");
    let second = topo.get("/cache/pipeline");
    assert_eq!((first.status, second.status), (200, 200));
    let count = first.body["results"][1].as_i64().expect("INCR result");
    assert_eq!(second.body["results"], json!([true, count + 1, "1", 1]), "{:?}", second.body);
    assert_eq!(topo.redis.cli(&["GET", "hopwatch:counter"]).trim(), (count + 1).to_string());
}

/// The same rows as in `PostgreSQL`, a server-side sleep, a missing table.
fn check_mariadb(topo: &Topology) {
    let r = topo.get("/mysql/users");
    assert_eq!((r.status, &r.body["users"]), (200, &users_json()));
    let r = topo.get("/mysql/sleep?ms=150");
    assert_eq!((r.status, &r.body), (200, &json!({"slept_ms": 150})));
    assert!(r.time >= Duration::from_millis(150), "SLEEP(0.15) answered in {:?}", r.time);
    let r = topo.get("/mysql/error");
    assert_eq!((r.status, &r.body["errno"]), (500, &json!(1146)), "{:?}", r.body);
}

/// An unknown name is NXDOMAIN from dnsmasq, a known one resolves to its pod, and the app found
/// every backend by name through dnsmasq.
fn check_dns(topo: &Topology) {
    let r = topo.get("/dns/missing");
    assert_eq!((r.status, &r.body["resolved"]), (200, &json!(false)), "{:?}", r.body);
    assert!(r.body["error"].as_str().is_some_and(|e| !e.is_empty()), "{:?}", r.body);
    let r = topo.get(&format!("/dns/resolve?name={PG_NAME}"));
    assert_eq!((r.status, &r.body["addresses"]), (200, &json!([topo.db.ip.to_string()])));
    let server = format!("@{}", topo.dns.ip);
    let port = topo.dns.port.to_string();
    let answer = output_in(
        &topo.client,
        &["dig", "+short", "+time=1", "+tries=1", &server, "-p", &port, REDIS_NAME],
    );
    assert_eq!(answer.trim(), topo.cache.ip.to_string(), "dnsmasq answers every pod");
    let log = topo.dns.log();
    assert!(log.contains(&format!("{MISSING_NAME} is NXDOMAIN")), "dnsmasq log:\n{log}");
    for name in [PG_NAME, REDIS_NAME, MYSQL_NAME, MISSING_NAME] {
        let query = format!("query[A] {name} from {}", topo.app_pod.ip);
        assert!(log.contains(&query), "no `{query}` in the dnsmasq log:\n{log}");
    }
}

/// nginx passed every client request to the app over HTTP/1.1 and kept its connections: at
/// most one per worker for one-at-a-time requests.
fn check_nginx_to_app(topo: &Topology) {
    let app_log = topo.app.log();
    let from_nginx: Vec<&str> = app_log
        .lines()
        .filter(|l| l.contains(&format!(" {}:", topo.ingress.ip)) && l.contains(" - \""))
        .collect();
    assert!(from_nginx.iter().all(|l| l.contains(" HTTP/1.1\" ")), "{from_nginx:#?}");
    let peers: BTreeSet<&str> = from_nginx
        .iter()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with(&topo.ingress.ip.to_string())))
        .collect();
    assert!(
        (1..=usize::try_from(NGINX_WORKERS).unwrap()).contains(&peers.len()),
        "{} upstream connections for {} requests: {peers:?}",
        peers.len(),
        from_nginx.len()
    );
    // nginx's own readiness probe for `/` came from its pod, not the client.
    let from_client = topo
        .nginx
        .access_log()
        .lines()
        .filter(|l| l.starts_with(&format!("{} ", topo.client.ip)))
        .count();
    let proxied = from_nginx.iter().filter(|l| !l.contains("\"GET / HTTP/1.1\"")).count();
    assert!(from_client >= 18, "nginx logged {from_client} requests from the client");
    assert_eq!(proxied, from_client, "uvicorn's requests from nginx:\n{from_nginx:#?}");
}

#[test]
fn every_endpoint_answers_across_client_nginx_app_and_backends() {
    let _serial = serial();
    let mut tb = Testbed::new();
    let topo = Topology::start(&mut tb);
    eprintln!("topology up in {:?}: {:?}", topo.startup, topo.phases);
    let pids = check_processes(&topo);

    for r in [topo.get("/health"), topo.request_plain("GET", "/health")] {
        assert_eq!((r.status, &r.body), (200, &json!({"status": "ok"})));
    }
    check_postgres(&topo);
    check_redis(&topo);
    check_mariadb(&topo);
    check_dns(&topo);
    let r = topo.get("/chain");
    assert_eq!(r.status, 200);
    assert_eq!((&r.body["pg_users"], &r.body["mysql"]), (&json!(USERS.len()), &json!(1)));
    let r = topo.get("/fail");
    assert_eq!((r.status, &r.body["error"]), (500, &json!("failure requested by the test")));
    check_nginx_to_app(&topo);

    // Dropping the topology stops every process and removes every file it made.
    let dropped = Instant::now();
    let app_netns_dir = format!("/etc/netns/{}", topo.app_pod.netns);
    drop(topo);
    eprintln!("topology down in {:?}", dropped.elapsed());
    for (name, pid) in &pids {
        assert!(!alive(*pid), "{name} (pid {pid}) still running");
    }
    assert!(our_temp_dirs().is_empty(), "left behind: {:?}", our_temp_dirs());
    assert!(!std::path::Path::new(&app_netns_dir).exists(), "{app_netns_dir} left behind");
}

#[test]
fn load_loop_stops_at_its_count_or_at_its_time_limit() {
    let _serial = serial();
    let mut tb = Testbed::new();
    let topo = Topology::start(&mut tb);
    eprintln!("topology up in {:?}: {:?}", topo.startup, topo.phases);

    // Count-bound: every request answered, over one kept-alive TLS connection.
    let r = topo.load("/health", 40, Duration::from_secs(30), true);
    eprintln!("load loop pid {}: {:?} in {:?}", r.pid, r.statuses, r.elapsed);
    assert_eq!((r.sent, r.answered(), r.error_count), (40, 40, 0), "errors: {:?}", r.errors);
    assert_eq!(r.statuses.get(&200), Some(&40), "{r:?}");
    assert!(r.elapsed < Duration::from_secs(30), "{r:?}");

    // Time-bound: 100 ms queries, a new TLS connection each, for 1.5 s: the loop stops at its
    // deadline long before its count, every answered request having waited for PostgreSQL.
    let limit = Duration::from_millis(1500);
    let r = topo.load("/db/sleep?ms=100", 10_000, limit, false);
    eprintln!("{} requests in {:?}", r.sent, r.elapsed);
    assert!(r.elapsed >= limit && r.elapsed < limit + Duration::from_secs(1), "{r:?}");
    assert!((5..=15).contains(&r.answered()), "{r:?}");
    assert_eq!(r.statuses.get(&200), Some(&r.answered()), "{r:?}");
    // At most the last request, cut short by the deadline, got no answer.
    assert!(r.error_count <= 1 && r.sent == r.answered() + r.error_count, "{r:?}");
    assert!(r.latencies.iter().all(|l| *l >= Duration::from_millis(100)), "{r:?}");
}

#[test]
fn a_server_that_cannot_start_fails_with_its_log_and_a_panic_cleans_up() {
    let _serial = serial();
    let mut tb = Testbed::new();
    let pod = tb.pod("cache");
    let redis = Redis::start(&pod);

    // Same address and port: Redis exits, and the panic carries its own explanation.
    let Err(err) = catch_unwind(AssertUnwindSafe(|| Redis::start_on(&pod, redis.port))) else {
        panic!("a second Redis on the same port started");
    };
    let msg = err
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| err.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_default();
    assert!(msg.contains("redis-server") && msg.contains("exited"), "{msg}");
    assert!(msg.contains("Address already in use"), "no server log in the panic: {msg}");

    // A test that panics while a server runs: unwinding stops it and removes its files.
    let mut pid = 0;
    let _ = catch_unwind(AssertUnwindSafe(|| {
        let other = Redis::start_on(&pod, redis.port + 1);
        pid = other.pid();
        panic!("a failing test");
    }));
    assert!(pid != 0 && !alive(pid), "Redis (pid {pid}) outlived the panic");
    assert!(alive(redis.pid()), "the first Redis must be untouched");
    let ours = our_temp_dirs();
    assert_eq!(ours.len(), 1, "only the first Redis's directory should remain: {ours:?}");
}
