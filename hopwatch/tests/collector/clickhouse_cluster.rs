//! The cluster layout (`--clickhouse-cluster`): a `Distributed` table over two
//! `ReplicatedMergeTree` shards, each a private Debian 18.16 server, with a ZooKeeper the test
//! starts; two collectors, each given a different server, answer the same history.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::Path,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use hopwatch::harness::Queue;
use hopwatch_proto::observer::GetFlowsRequest;
use tokio_util::sync::CancellationToken;

use super::{
    clickhouse::{ch_collector, history, rich_flow, ts, uuids},
    clickhouse_server::ClickHouseServer,
    link_to,
    support::{free_port, now_ns},
    wait_until,
};

/// Debian's ZooKeeper jar (its manifest names the jars it needs, as Debian's own service uses it).
const ZK_JAR: &str = "/usr/share/java/zookeeper.jar";

/// A standalone ZooKeeper on loopback, killed when dropped.
struct ZooKeeper {
    child: Child,
    port: u16,
}

impl ZooKeeper {
    fn start(dir: &Path) -> Self {
        assert!(
            Path::new(ZK_JAR).exists() && Path::new("/usr/bin/java").exists(),
            "ZooKeeper is not installed ({ZK_JAR} or java missing): run `cargo xtask test-setup`, \
             which installs Debian's zookeeper and openjdk-17-jre-headless without starting services"
        );
        let port = free_port();
        let data = dir.join("zk-data");
        std::fs::create_dir_all(&data).expect("ZooKeeper data directory");
        let cfg = dir.join("zoo.cfg");
        std::fs::write(
            &cfg,
            format!(
                "tickTime=2000\ninitLimit=10\nsyncLimit=5\ndataDir={}\nclientPort={port}\n\
                 clientPortAddress=127.0.0.1\nadmin.enableServer=false\n\
                 4lw.commands.whitelist=ruok\n",
                data.display()
            ),
        )
        .expect("write zoo.cfg");
        let log = std::fs::File::create(dir.join("zk.log")).expect("ZooKeeper log");
        let child = Command::new("/usr/bin/java")
            .args(["-cp", ZK_JAR])
            .arg("-Xmx256m")
            .arg("org.apache.zookeeper.server.quorum.QuorumPeerMain")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("start ZooKeeper");
        let mut zk = Self { child, port };
        let deadline = Instant::now() + Duration::from_mins(1);
        while !zk.ruok() {
            if let Some(status) = zk.child.try_wait().unwrap() {
                let log = std::fs::read_to_string(dir.join("zk.log")).unwrap_or_default();
                panic!("ZooKeeper exited ({status}):\n{log}");
            }
            assert!(Instant::now() < deadline, "ZooKeeper not answering ruok after 60 s");
            std::thread::sleep(Duration::from_millis(200));
        }
        zk
    }

    /// One `ruok`, bounded: a JVM that has bound its port but not yet started serving accepts
    /// the connection and says nothing.
    fn ruok(&self) -> bool {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
            return false;
        };
        let mut answer = String::new();
        s.set_read_timeout(Some(Duration::from_secs(2))).is_ok()
            && s.set_write_timeout(Some(Duration::from_secs(2))).is_ok()
            && s.write_all(b"ruok").is_ok()
            && s.read_to_string(&mut answer).is_ok()
            && answer == "imok"
    }
}

impl Drop for ZooKeeper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The substitutions both servers include: the cluster (two shards, one replica each), ZooKeeper
/// and this server's macros.
fn metrika(zk: u16, shards: [u16; 2], shard: usize) -> String {
    let shard_xml = |port: u16| {
        format!(
            "<shard><internal_replication>true</internal_replication><replica>\
             <host>127.0.0.1</host><port>{port}</port></replica></shard>"
        )
    };
    format!(
        "<yandex><clickhouse_remote_servers><hw2>{}{}</hw2></clickhouse_remote_servers>\
         <zookeeper-servers><node><host>127.0.0.1</host><port>{zk}</port></node></zookeeper-servers>\
         <macros><shard>{:02}</shard><replica>r1</replica></macros></yandex>",
        shard_xml(shards[0]),
        shard_xml(shards[1]),
        shard + 1
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_cluster_two_shards_one_history() {
    const NODES: [&str; 6] = ["node-1", "node-2", "node-3", "node-4", "node-5", "node-6"];
    const PER_NODE: i64 = 500;
    let dir = tempfile::tempdir().unwrap();
    let zk = ZooKeeper::start(dir.path());
    // Ports first: each server's cluster names both.
    let tcp = [free_port(), free_port()];
    let servers: Vec<ClickHouseServer> = (0..2)
        .map(|i| {
            let d = dir.path().join(format!("ch{i}"));
            std::fs::create_dir_all(&d).unwrap();
            let inc = d.join("metrika.xml");
            std::fs::write(&inc, metrika(zk.port, tcp, i)).unwrap();
            ClickHouseServer::start_with_tcp_port(
                &d,
                tcp[i],
                &format!("<include_from>{}</include_from>", inc.display()),
            )
        })
        .collect();
    // 18.16's DDL worker connects to ZooKeeper once, at start; when that times out (a JVM
    // warming up on a loaded machine), the worker is left without a session and the next
    // `ON CLUSTER` statement crashes the server (a null session in
    // zkutil::ZooKeeper::createImpl). So: wait until each server's worker has its queue in
    // ZooKeeper and logged no failure, restarting a server whose worker failed.
    let mut servers = servers;
    for s in &mut servers {
        let deadline = Instant::now() + Duration::from_mins(2);
        loop {
            std::thread::sleep(Duration::from_millis(500));
            let failed = s.error_log(false).contains("DDLWorker::run");
            let ready = !failed
                && super::clickhouse_server::http(
                    s.http_port,
                    "POST",
                    "/",
                    "SELECT count() FROM system.zookeeper WHERE path = '/clickhouse/task_queue'",
                )
                .is_ok_and(|n| n.trim() == "1");
            if ready {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no DDL worker after 2 min:\n{}",
                s.error_log(false)
            );
            if failed {
                eprintln!("clickhouse-server's DDL worker has no ZooKeeper session; restarting it");
                s.kill();
                s.error_log(true);
                s.restart();
            }
        }
    }
    let cluster = ["--clickhouse-cluster", "hw2"];
    let a = ch_collector(&servers[0], "clustered", &cluster);
    let b = ch_collector(&servers[1], "clustered", &cluster);
    let stop = CancellationToken::new();
    let t0 = now_ns() - 600_000_000_000;
    let mut links = Vec::new();
    let mut queues = Vec::new();
    for (i, node) in NODES.iter().enumerate() {
        let q = Arc::new(Queue::new(100_000, node));
        let target = if i % 2 == 0 { &a } else { &b };
        links.push(link_to(&target.collector.url(), node, &q, &stop));
        for k in 0..PER_NODE {
            q.offer(rich_flow(node, k, t0 + k * 1_000_000));
        }
        queues.push(q);
    }
    crate::drain_and_stop(&queues, &stop, links).await;
    let total = NODES.len() * usize::try_from(PER_NODE).unwrap();
    let count = |s: &ClickHouseServer, table: &str| -> usize {
        s.query(&format!("SELECT count() FROM clustered.{table}")).trim().parse().unwrap()
    };
    // Distributed inserts reach the shards in the background.
    wait_until("every flow on a shard", Duration::from_mins(1), async || {
        count(&servers[0], "flows_local") + count(&servers[1], "flows_local") >= total
    })
    .await;
    let shard_rows = [count(&servers[0], "flows_local"), count(&servers[1], "flows_local")];
    assert_eq!(shard_rows[0] + shard_rows[1], total, "each flow on one shard: {shard_rows:?}");
    assert!(shard_rows.iter().all(|&n| n > 0), "both shards hold flows: {shard_rows:?}");
    for s in &servers {
        assert_eq!(count(s, "flows"), total, "the Distributed table on each server sees all");
        let engine = s.query(
            "SELECT engine FROM system.tables WHERE database = 'clustered' ORDER BY name FORMAT TSV",
        );
        assert_eq!(engine, "Distributed\nReplicatedMergeTree\n", "the layout");
    }
    let req = GetFlowsRequest { since: Some(ts(t0 - 1_000_000_000)), ..Default::default() };
    let (mut from_a, mut from_b) = (
        uuids(&history(&a.collector.url(), req.clone()).await),
        uuids(&history(&b.collector.url(), req).await),
    );
    from_a.sort();
    from_b.sort();
    assert_eq!(from_a.len(), total, "every node's flows through collector A");
    assert_eq!(from_a, from_b, "the same history through either collector");
    drop(zk);
}
