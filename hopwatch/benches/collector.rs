//! Collector benchmarks (`cargo xtask bench`): figures, not pass/fail.
//!
//! 1. Ingest rate: four agents' worth of pre-built batches (1000 realistic flows each) pushed
//!    concurrently over loopback gRPC into a collector, until the last acknowledgement (i.e.
//!    stored; with history: written to disk with its checkpoint).
//! 2. `observe --last 1000` with a filter over a store of 1M flows (memory ring + history),
//!    timed as a gRPC call and as the `hopwatch observe` process.
//! 3. Kernel event to `observe -f` output (root): a refused connect on loopback, timed from just
//!    before `connect()` to the line `hopwatch observe -f` prints, through a real agent with its
//!    in-process collector.
#![allow(
    unused_crate_dependencies,
    reason = "a test or bench target links every dependency of the package; the lint is for the library"
)]

use std::{
    io::{BufRead as _, BufReader},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use hopwatch_collector::{
    StoreArgs,
    hub::{Hub, HubConfig},
    serve,
};
use hopwatch_proto::{
    flow::{
        CiliumEventType, Endpoint, Flow, FlowFilter, FlowType, Ip, Layer4, Process, SocketEvent,
        Tcp, TcpStats, TrafficDirection, Verdict, layer4,
    },
    hopwatch::v1::{Batch, Hello, PushRequest, push_request, push_response},
    observer::{
        GetFlowsRequest, GetFlowsResponse, get_flows_response::ResponseTypes,
        observer_client::ObserverClient,
    },
};
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_hopwatch");

// The allocator is the `hopwatch` binary's: the library sets it.

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn now_ns() -> i64 {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    i64::try_from(d.as_nanos()).unwrap()
}

/// A flow shaped like the agent's TCP close flows (~400 bytes encoded). `i` picks the port,
/// verdict and pods so that filters select known fractions: port 5432 5 %, 6379 4 %, 443 20 %,
/// 6380 0.1 %, 80 the rest; 0.5 % DROPPED.
fn make_flow(node: &str, i: u64, time_ns: i64) -> GetFlowsResponse {
    let port = match i % 1000 {
        0 => 6380,
        1..=50 => 5432,
        51..=90 => 6379,
        91..=290 => 443,
        _ => 80,
    };
    let verdict = if i % 200 == 7 { Verdict::Dropped } else { Verdict::Forwarded };
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
            verdict: verdict.into(),
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
            r#type: FlowType::L3L4.into(),
            node_name: node.to_owned(),
            event_type: Some(CiliumEventType { r#type: 4, sub_type: 0 }),
            traffic_direction: TrafficDirection::Egress.into(),
            is_reply: Some(false),
            socket_cookie: i,
            cgroup_id: 4242,
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
            source_process: Some(Process {
                pid: 4000 + u32::try_from(i % 50).unwrap(),
                comm: "uvicorn".into(),
                cgroup_id: 4242,
            }),
            socket_event: SocketEvent::Close.into(),
            netns_inode: 4_026_531_840,
            ..Default::default()
        })),
    }
}

/// A client codec that sends pre-encoded `PushRequest`s as they are, so the benchmark's own
/// encoding does not compete with the collector for the two cores (real agents run elsewhere).
#[derive(Default)]
struct RawCodec;

struct RawEncoder;

impl tonic::codec::Encoder for RawEncoder {
    type Item = bytes::Bytes;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: bytes::Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Codec for RawCodec {
    type Encode = bytes::Bytes;
    type Decode = hopwatch_proto::hopwatch::v1::PushResponse;
    type Encoder = RawEncoder;
    type Decoder = tonic_prost::ProstDecoder<hopwatch_proto::hopwatch::v1::PushResponse>;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::new(tonic::codec::BufferSettings::default())
    }
}

/// CPU time this process used so far (user + system).
fn cpu_time() -> Duration {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct we pass.
    let ru = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr());
        ru.assume_init()
    };
    let tv = |t: libc::timeval| {
        Duration::new(t.tv_sec.cast_unsigned(), u32::try_from(t.tv_usec).unwrap() * 1000)
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn hub(disk: Option<&std::path::Path>) -> Arc<Hub> {
    let store = StoreArgs {
        memory_flows: 65_536,
        retention_size: 8 << 30,
        retention_age: Duration::from_hours(24),
        fsync_interval: Duration::from_secs(1),
        sort_window: Duration::from_millis(100),
    };
    let cfg: HubConfig = store.hub_config(disk.map(std::path::Path::to_owned));
    Hub::start(&cfg).expect("start the collector core")
}

async fn start_server(hub: &Arc<Hub>) -> (SocketAddr, CancellationToken) {
    let stop = CancellationToken::new();
    let s = serve(hub.clone(), "127.0.0.1:0".parse().unwrap(), None, stop.clone())
        .await
        .expect("serve");
    (s.addr, stop)
}

async fn ingest(disk: bool, agents: usize, per_agent: usize) {
    let dir = tempfile::tempdir().unwrap();
    let hub = hub(disk.then(|| dir.path()));
    let (addr, stop) = start_server(&hub).await;
    let t0 = now_ns() - 3_600_000_000_000;
    // Pre-built batches, so the figure is the collector's (and the gRPC transport's), not the
    // generator's.
    let work: Vec<Vec<PushRequest>> = (0..agents)
        .map(|a| {
            let node = format!("node-{a}");
            let mut reqs = vec![PushRequest {
                message: Some(push_request::Message::Hello(Hello {
                    agent_id: format!("bench-{a}"),
                    node_name: node.clone(),
                    version: "bench".into(),
                    started: None,
                })),
            }];
            for (b, chunk) in (0..per_agent as u64).collect::<Vec<_>>().chunks(1000).enumerate() {
                let events = chunk
                    .iter()
                    .map(|&i| {
                        let flow = make_flow(&node, i, t0 + i64::try_from(i).unwrap() * 10_000);
                        prost::Message::encode_to_vec(&flow).into()
                    })
                    .collect();
                reqs.push(PushRequest {
                    message: Some(push_request::Message::Batch(Batch {
                        first_seq: 1 + b as u64 * 1000,
                        events,
                        status: None,
                    })),
                });
            }
            reqs
        })
        .collect();
    let work: Vec<Vec<bytes::Bytes>> = work
        .into_iter()
        .map(|reqs| {
            reqs.iter().map(|r| bytes::Bytes::from(prost::Message::encode_to_vec(r))).collect()
        })
        .collect();
    let bytes: usize = work.iter().flatten().map(bytes::Bytes::len).sum();
    let cpu0 = cpu_time();
    let start = Instant::now();
    let tasks: Vec<_> = work
        .into_iter()
        .map(|reqs| {
            tokio::spawn(async move {
                let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                    .unwrap()
                    .connect()
                    .await
                    .unwrap();
                let mut grpc = tonic::client::Grpc::new(ch);
                grpc.ready().await.unwrap();
                let total = per_agent as u64;
                let path = tonic::codegen::http::uri::PathAndQuery::from_static(
                    "/hopwatch.v1.Ingest/Push",
                );
                let mut resp = grpc
                    .streaming(tonic::Request::new(tokio_stream::iter(reqs)), path, RawCodec)
                    .await
                    .unwrap()
                    .into_inner();
                while let Some(m) = resp.message().await.unwrap() {
                    if let Some(push_response::Message::Ack(a)) = m.message
                        && a.stored_through >= total
                    {
                        break;
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = cpu_time().saturating_sub(cpu0).as_secs_f64();
    let n = agents * per_agent;
    #[expect(clippy::cast_precision_loss, reason = "figures")]
    let (rate, mb, per_cpu) = (n as f64 / secs, bytes as f64 / 1e6 / secs, n as f64 / cpu);
    println!(
        "ingest ({}): {n} flows from {agents} agents in {secs:.2}s = {rate:.0} flows/s ({mb:.0} MB/s of protobuf); {cpu:.2} CPU-s = {per_cpu:.0} flows per CPU-second",
        if disk { "memory + on-disk history" } else { "memory only" }
    );
    println!(
        "BENCH\tcollector_ingest_{}\t{rate:.0}\tflows/s\tcollector ingest from {agents} agents ({})",
        if disk { "disk" } else { "memory" },
        if disk { "memory + on-disk history" } else { "memory only" }
    );
    stop.cancel();
    hub.shutdown().await;
}

fn median(mut v: Vec<Duration>) -> (Duration, Duration, Duration) {
    v.sort();
    let p95 = v[(v.len() * 95 / 100).min(v.len() - 1)];
    (v[v.len() / 2], p95, *v.last().unwrap())
}

#[expect(clippy::too_many_lines, reason = "one table of cases")]
async fn query_store(flows: usize) {
    let dir = tempfile::tempdir().unwrap();
    let hub = hub(Some(dir.path()));
    let t0 = now_ns() - 2 * 3_600_000_000_000;
    let step = 2 * 3_600_000_000_000 / i64::try_from(flows).unwrap();
    let build = Instant::now();
    let agent = hub.agent("bench-store", "node-0");
    for chunk_start in (0..flows).step_by(10_000) {
        let events = (chunk_start..(chunk_start + 10_000).min(flows))
            .map(|i| {
                make_flow(
                    &format!("node-{}", i % 4),
                    i as u64,
                    t0 + i64::try_from(i).unwrap() * step,
                )
            })
            .collect();
        hub.accept(&agent, chunk_start as u64 + 1, events, None).await.unwrap();
    }
    hub.flush().await.unwrap();
    let stats = hub.store.stats();
    println!(
        "store: {} flows ({} in memory, the rest on disk: {:.0} MB) built in {:.1}s",
        stats.held,
        65_536,
        f64::from(u32::try_from(stats.disk_bytes / 1_000_000).unwrap_or(u32::MAX)),
        build.elapsed().as_secs_f64()
    );
    let (addr, server_stop) = start_server(&hub).await;
    // The rare matches (the issue's ≤ 100 ms target) are reported as `collector_observe_rare`.
    let rare = ["--verdict DROPPED (0.5%)", "--to-port 6380 (0.1%, spread over the whole store)"];
    let cases: [(&str, FlowFilter, &[&str]); 5] = [
        (
            "--to-port 5432 (5% of flows)",
            FlowFilter { destination_port: vec!["5432".into()], ..Default::default() },
            &["--to-port", "5432"],
        ),
        (
            "--verdict DROPPED (0.5%)",
            FlowFilter { verdict: vec![Verdict::Dropped.into()], ..Default::default() },
            &["--verdict", "DROPPED"],
        ),
        (
            "--to-port 6380 (0.1%, spread over the whole store)",
            FlowFilter { destination_port: vec!["6380".into()], ..Default::default() },
            &["--to-port", "6380"],
        ),
        (
            "--from-pod prod/api-1 --to-port 443",
            FlowFilter {
                source_pod: vec!["prod/api-1".into()],
                destination_port: vec!["443".into()],
                ..Default::default()
            },
            &["--from-pod", "prod/api-1", "--to-port", "443"],
        ),
        (
            "--to-port 9999 (no match: index skips every block)",
            FlowFilter { destination_port: vec!["9999".into()], ..Default::default() },
            &["--to-port", "9999"],
        ),
    ];
    let only_case = std::env::var("BENCH_CASE").ok();
    for (what, filter, flags) in cases {
        if only_case.as_deref().is_some_and(|c| !what.contains(c)) {
            continue;
        }
        let mut grpc = Vec::new();
        let mut got = 0;
        for _ in 0..5 {
            let start = Instant::now();
            let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .unwrap();
            let mut s = ObserverClient::new(ch)
                .get_flows(GetFlowsRequest {
                    number: 1000,
                    whitelist: vec![filter.clone()],
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            got = 0;
            while let Some(r) = s.message().await.unwrap() {
                if matches!(r.response_types, Some(ResponseTypes::Flow(_))) {
                    got += 1;
                }
            }
            grpc.push(start.elapsed());
        }
        let mut cli = Vec::new();
        for _ in 0..3 {
            let start = Instant::now();
            let out = Command::new(BIN)
                .args(["observe", "--server", &addr.to_string(), "--last", "1000", "-o", "json"])
                .args(flags)
                .stdout(Stdio::null())
                .status()
                .unwrap();
            assert!(out.success());
            cli.push(start.elapsed());
        }
        let (g, _, gmax) = median(grpc);
        let (c, _, _) = median(cli);
        println!(
            "observe --last 1000 {what}: {got} flows; GetFlows {:.1} ms (max {:.1}), `hopwatch observe -o json` process {:.1} ms",
            g.as_secs_f64() * 1e3,
            gmax.as_secs_f64() * 1e3,
            c.as_secs_f64() * 1e3
        );
        println!(
            "BENCH\t{}\t{:.1}\tms\tobserve --last 1000 {what} over {} flows (GetFlows median)",
            if rare.contains(&what) { "collector_observe_rare" } else { "collector_observe" },
            g.as_secs_f64() * 1e3,
            stats.held
        );
    }
    server_stop.cancel();
    hub.shutdown().await;
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn kernel_to_observe(label: &str, extra: &[&str], samples: usize) {
    let port = free_port();
    let mut agent = Command::new(BIN)
        .args([
            "agent",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--node-name",
            "bench",
            "-o",
            "json",
        ])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = BufReader::new(agent.stderr.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in err.lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let ready = format!("collector APIs on 127.0.0.1:{port}");
    loop {
        let line = rx.recv_timeout(Duration::from_mins(1)).expect("agent ready");
        if line.contains(&ready) {
            break;
        }
    }
    let closed = free_port();
    let mut observe = Command::new(BIN)
        .args(["observe", "--server", &format!("127.0.0.1:{port}"), "-f", "-o", "json"])
        .args(["--to-port", &closed.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = BufReader::new(observe.stdout.take().unwrap());
    let (ltx, lrx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in out.lines().map_while(Result::ok) {
            if l.contains("CONNECT_FAILED") {
                let _ = ltx.send(Instant::now());
            }
        }
    });
    std::thread::sleep(Duration::from_secs(1));
    let mut delays = Vec::new();
    for _ in 0..samples {
        let start = Instant::now();
        let _ = TcpStream::connect(("127.0.0.1", closed));
        let at = lrx.recv_timeout(Duration::from_secs(10)).expect("observe printed the flow");
        delays.push(at - start);
        std::thread::sleep(Duration::from_millis(100));
    }
    let (med, p95, max) = median(delays);
    println!(
        "kernel event -> `observe -f` line ({label}): median {:.1} ms, p95 {:.1} ms, max {:.1} ms over {samples} connects",
        med.as_secs_f64() * 1e3,
        p95.as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e3
    );
    println!(
        "BENCH\tcollector_kernel_to_observe\t{:.1}\tms\tkernel event -> observe -f line, median ({label})",
        med.as_secs_f64() * 1e3
    );
    let _ = observe.kill();
    let _ = observe.wait();
    // SAFETY: signalling a child we started and have not reaped.
    unsafe { libc::kill(i32::try_from(agent.id()).unwrap(), libc::SIGTERM) };
    let _ = agent.wait();
}

fn main() {
    // As the `hopwatch` binary does at start: without it, this process's allocator gets
    // transparent huge pages the collector never has, and the figures measure a different
    // allocator.
    assert!(hopwatch::harness::no_huge_pages(), "cannot turn huge pages off");
    let flows = arg("--flows", 1_000_000);
    let per_agent = arg("--ingest-per-agent", 125_000);
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    println!(
        "hopwatch collector benchmarks ({} CPUs)",
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get)
    );
    // `--only ingest|ingest-memory|ingest-history|query|kernel` runs one part (profiling).
    let args: Vec<String> = std::env::args().collect();
    let only = args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1)).cloned();
    let part = |name: &str| only.as_deref().is_none_or(|o| o == name);
    rt.block_on(async {
        if part("ingest") || part("ingest-memory") {
            ingest(false, 4, per_agent).await;
        }
        if part("ingest") || part("ingest-history") {
            ingest(true, 4, per_agent).await;
        }
        if part("query") {
            query_store(flows).await;
        }
    });
    if !part("kernel") {
        return;
    }
    let root = std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
    });
    if root {
        kernel_to_observe("defaults: batch 50ms, sort window 100ms", &[], 20);
        kernel_to_observe(
            "--batch-interval 1ms --sort-window 0s",
            &["--batch-interval", "1ms", "--sort-window", "0s"],
            20,
        );
    } else {
        println!(
            "kernel event -> `observe -f`: not measured (needs root to load the eBPF programs)"
        );
    }
}
