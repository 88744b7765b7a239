//! The flow history on ClickHouse, on a private Debian 18.16 server this benchmark starts:
//!
//! 1. Write rate: flows offered to one collector's ClickHouse write queue, timed until all are
//!    written (RowBinary, HTTP inserts of `--clickhouse-batch` rows, the server's insert).
//!    Flows are generated and encoded before each timed round, as the store hands them over
//!    (decoded, and encoded as it keeps them), so neither is counted.
//! 2. `GetFlows` for the newest 1000 flows with a rare filter (0.1 % of flows) over everything
//!    stored, through the collector's gRPC API (median of 5).
//! 3. Bytes per stored flow (the server's compressed column bytes over its rows).
//!
//! `--flows N` (default 10 000 000) sets how many flows are stored. Prints `BENCH` lines.
#![allow(
    unused_crate_dependencies,
    reason = "a test or bench target links every dependency of the package; the lint is for the library"
)]

#[path = "../tests/collector/clickhouse_server.rs"]
mod clickhouse_server;

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use hopwatch_collector::{
    StoreArgs,
    clickhouse::{ClickHouse, ClickHouseArgs, writer::Queued},
    hub::Hub,
    serve,
    store::Stored,
};
use hopwatch_proto::{
    flow::{Endpoint, Flow, FlowFilter, Ip, Layer4, Tcp, TcpStats, Verdict, layer4},
    observer::{
        GetFlowsRequest, GetFlowsResponse, get_flows_response::ResponseTypes,
        observer_client::ObserverClient,
    },
};
use tokio_util::sync::CancellationToken;

use self::clickhouse_server::ClickHouseServer;

const ROUND: usize = 1_000_000;
const RARE_PORT: u32 = 6380;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A TCP close flow (~300 bytes encoded); port 6380 for 0.1 % of them.
fn make_flow(i: u64, time_ns: i64) -> GetFlowsResponse {
    let node = ["node-a", "node-b", "node-c", "node-d"][usize::try_from(i % 4).unwrap()];
    let port = match i % 1000 {
        0 => RARE_PORT,
        1..=50 => 5432,
        51..=290 => 443,
        _ => 80,
    };
    let ts = prost_types::Timestamp {
        seconds: time_ns / 1_000_000_000,
        nanos: i32::try_from(time_ns % 1_000_000_000).unwrap(),
    };
    let ns = ["prod", "staging", "dev"][usize::try_from(i % 3).unwrap()];
    GetFlowsResponse {
        time: Some(ts),
        node_name: node.to_owned(),
        response_types: Some(ResponseTypes::Flow(Flow {
            time: Some(ts),
            uuid: format!("{:08x}-{node}-4000-8000-{i:012x}", i & 0xffff_ffff),
            verdict: if i % 200 == 7 { Verdict::Dropped } else { Verdict::Forwarded }.into(),
            node_name: node.to_owned(),
            ip: Some(Ip {
                source: format!("10.{}.{}.{}", i % 4, (i / 7) % 250, 1 + i % 200),
                destination: format!("10.96.{}.{}", port % 250, 1 + (i / 13) % 50),
                ip_version: 1,
                encrypted: false,
            }),
            l4: Some(Layer4 {
                protocol: Some(layer4::Protocol::Tcp(Tcp {
                    source_port: 32_768 + u32::try_from(i % 28_000).unwrap(),
                    destination_port: port,
                    flags: None,
                })),
            }),
            source: Some(Endpoint {
                namespace: ns.into(),
                pod_name: format!("api-{}", i % 17),
                ..Default::default()
            }),
            destination: Some(Endpoint {
                namespace: ns.into(),
                pod_name: format!("db-{}", i % 3),
                ..Default::default()
            }),
            is_reply: Some(false),
            summary: "close after 1.2ms, sent 1000B received 300B srtt 52µs retransmits 0".into(),
            tcp_stats: Some(TcpStats {
                connect_latency_ns: 200_000 + i % 10_000,
                srtt_ns: 52_000,
                bytes_sent: 1000,
                bytes_received: 300,
                duration_ns: 1_200_000,
                complete: true,
                ..Default::default()
            }),
            ..Default::default()
        })),
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// User + system CPU seconds of a process (`self` or a pid), from /proc.
fn cpu(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = stat.rsplit_once(')').map_or("", |x| x.1).split_whitespace().collect();
    let ticks: f64 =
        f.get(11..13).map_or(0.0, |t| t.iter().filter_map(|x| x.parse::<f64>().ok()).sum());
    ticks / 100.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // The collector's allocator as it runs: huge pages off, as the `hopwatch` binary turns
    // them at start, and mimalloc, which the `hopwatch` library (used here) sets; without a use
    // of that library this benchmark ran on the system allocator.
    assert!(hopwatch::harness::no_huge_pages(), "cannot turn huge pages off");
    let flows = arg("--flows", 10_000_000);
    let dir = tempfile::tempdir().expect("a temporary directory");
    let ch = ClickHouseServer::start(dir.path(), "");
    let args = ClickHouseArgs {
        clickhouse: Some(ch.url()),
        clickhouse_database: "bench".into(),
        clickhouse_table: "flows".into(),
        clickhouse_cluster: None,
        clickhouse_user: "default".into(),
        clickhouse_password: None,
        clickhouse_retention: Duration::from_hours(24 * 7),
        clickhouse_queue: ROUND,
        clickhouse_batch: 100_000,
        clickhouse_flush_interval: Duration::from_millis(100),
        clickhouse_writers: arg("--writers", 2),
    };
    let store = StoreArgs {
        memory_flows: 4096,
        retention_size: 1 << 30,
        retention_age: Duration::from_hours(24),
        fsync_interval: Duration::from_secs(1),
        sort_window: Duration::from_millis(100),
    };
    let clickhouse = ClickHouse::connect(&args, &ch.url()).await.expect("connect to ClickHouse");
    let hub = Hub::start_with(&store.hub_config(None), Some(clickhouse.clone())).expect("hub");
    write_rate(&ch, &clickhouse, flows, args.clickhouse_writers).await;
    observe_rare(&hub, flows).await;
    bytes_per_flow(&ch);
    hub.shutdown().await;
}

/// 1. Write rate, in rounds of [`ROUND`] flows (one day back to now, oldest first).
#[expect(clippy::cast_precision_loss, reason = "figures")]
async fn write_rate(ch: &ClickHouseServer, clickhouse: &ClickHouse, flows: usize, writers: usize) {
    let t0 = hopwatch_proto::clock::now_ns() - 86_400_000_000_000;
    let step = 86_400_000_000_000 / i64::try_from(flows.max(1)).unwrap();
    let stats = &clickhouse.sink.stats;
    let server_pid = ch.pid().map_or_else(String::new, |p| p.to_string());
    let (mut own_cpu, mut server_cpu) = (0.0, 0.0);
    let mut busy = Duration::ZERO;
    let mut done = 0usize;
    while done < flows {
        let n = ROUND.min(flows - done);
        // Encoded here, before the clock starts: the store hands the sink the bytes it keeps
        // (the agent's, or encoded by the ingest tasks).
        let batch: Vec<Queued> = (done..done + n)
            .map(|i| {
                let i = i as u64;
                let flow = make_flow(i, t0 + i64::try_from(i).unwrap() * step);
                let encoded = prost::Message::encode_to_vec(&flow).into();
                Queued { entry: Stored::new(flow), encoded }
            })
            .collect();
        let target = stats.written.load(Ordering::Relaxed) + n as u64;
        let start = Instant::now();
        let (own0, server0) = (cpu("self"), cpu(&server_pid));
        clickhouse.sink.offer(batch.into_iter());
        while stats.written.load(Ordering::Relaxed) < target {
            assert_eq!(stats.dropped.load(Ordering::Relaxed), 0, "the write queue overflowed");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        busy += start.elapsed();
        own_cpu += cpu("self") - own0;
        server_cpu += cpu(&server_pid) - server0;
        done += n;
        eprintln!("clickhouse bench: {done} flows written");
    }
    println!(
        "BENCH\tclickhouse_write_per_core\t{:.0}\tflows/s\tflows written per second of the collector's CPU (the figure where ClickHouse has cores of its own; the server used {:.1} µs of CPU per flow here)",
        flows as f64 / own_cpu.max(0.01),
        server_cpu / flows as f64 * 1e6
    );
    println!(
        "BENCH\tclickhouse_write\t{:.0}\tflows/s\tone collector's ClickHouse writes ({writers} concurrent inserts of 100k rows, 18.16 on loopback, 2 cores shared by both)",
        flows as f64 / busy.as_secs_f64()
    );
}

/// 2. The newest 1000 flows to a rare port, through gRPC.
async fn observe_rare(hub: &Arc<Hub>, flows: usize) {
    let stop = CancellationToken::new();
    let s = serve(hub.clone(), "127.0.0.1:0".parse().unwrap(), None, stop.clone())
        .await
        .expect("serve");
    let mut client = ObserverClient::connect(format!("http://{}", s.addr)).await.expect("connect");
    let req = GetFlowsRequest {
        number: 1000,
        whitelist: vec![FlowFilter {
            destination_port: vec![RARE_PORT.to_string()],
            ..Default::default()
        }],
        ..Default::default()
    };
    let mut times = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        let mut stream = client.get_flows(req.clone()).await.expect("GetFlows").into_inner();
        let mut got = 0;
        while let Some(r) = stream.message().await.expect("stream") {
            got += usize::from(matches!(r.response_types, Some(ResponseTypes::Flow(_))));
        }
        times.push(start.elapsed());
        assert_eq!(got, 1000.min(flows / 1000), "the newest matches");
    }
    let ms = median(times).as_secs_f64() * 1e3;
    println!(
        "BENCH\tclickhouse_observe_rare\t{ms:.1}\tms\tobserve --last 1000 --to-port {RARE_PORT} (0.1 % of flows) over {flows} flows in ClickHouse (GetFlows median)"
    );
    stop.cancel();
}

/// 3. Bytes per stored flow.
fn bytes_per_flow(ch: &ClickHouseServer) {
    let sizes = ch.query(
        "SELECT sum(rows), sum(data_compressed_bytes), sum(data_uncompressed_bytes) \
         FROM system.parts WHERE active AND database = 'bench' AND table = 'flows'",
    );
    let v: Vec<f64> = sizes.split_whitespace().map(|x| x.parse().expect("a number")).collect();
    let (rows, compressed, raw) = (v[0], v[1], v[2]);
    println!(
        "BENCH\tclickhouse_bytes_per_flow\t{:.0}\tB\tbytes per stored flow on 18.16 (LZ4, compressed; {:.0} uncompressed)",
        compressed / rows,
        raw / rows
    );
}
