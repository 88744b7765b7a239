//! Hop aggregation and metrics exposition cost, on one core (`cargo xtask bench` runs it; so does
//! `cargo bench -p hopwatch --bench hops`).
//!
//! - Aggregation throughput: flows per second into the hop state, for a mix shaped like a busy
//!   node's (two thirds L7 exchanges seen at both ends, connection events with running totals,
//!   some drops) over 1000 hops; once into the bare [`Aggregator`], once through the agent's path
//!   ([`Telemetry::observe`]: lock, flow counters, export lag, aggregation).
//! - Scrape time: a full `/metrics` rendering (registry gather + text encoding) with about 10k
//!   and about 100k series (one series per sample line, as Prometheus counts them).
#![allow(
    unused_crate_dependencies,
    reason = "a test or bench target links every dependency of the package; the lint is for the library"
)]

mod support;

use std::time::{Duration, Instant};

use hopwatch::harness::{MetricsAddr, MetricsArgs, Telemetry};
use hopwatch_hops::{Aggregator, HopConfig};
use hopwatch_proto::{
    clock::wall_now_ns,
    flow::{
        self as pb, Flow, FlowType, Ip, Layer4, Layer7, SocketEvent, TcpStats, TrafficDirection,
        Verdict, layer4::Protocol,
    },
};

fn ts(ns: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: i64::try_from(ns / 1_000_000_000).unwrap_or(0),
        nanos: i32::try_from(ns % 1_000_000_000).unwrap_or(0),
    }
}

/// A flow of hop `h` (of `hops`), kind chosen by `i`.
fn flow(i: u64, h: u64, now: u64) -> Flow {
    let src_ip = format!("10.1.{}.{}", h / 250 % 250, h % 250 + 1);
    let dst_ip = format!("10.2.{}.{}", h / 25 % 250, h % 25 + 1);
    let (sport, dport) = (
        u32::try_from(30_000 + i % 30_000).unwrap_or(0),
        8000 + u32::try_from(h % 50).unwrap_or(0),
    );
    let mut f = Flow {
        time: Some(ts(now)),
        ip: Some(Ip { source: src_ip, destination: dst_ip, ..Ip::default() }),
        l4: Some(Layer4 {
            protocol: Some(Protocol::Tcp(pb::Tcp {
                source_port: sport,
                destination_port: dport,
                flags: None,
            })),
        }),
        node_name: "bench".into(),
        source_process: Some(pb::Process { pid: 10, comm: format!("client-{h}"), cgroup_id: 0 }),
        destination_process: Some(pb::Process {
            pid: 20,
            comm: format!("server-{}", h % 97),
            cgroup_id: 0,
        }),
        socket_cookie: i,
        ..Flow::default()
    };
    match i % 12 {
        // L7 exchanges, client and server side.
        0..=7 => {
            f.r#type = FlowType::L7.into();
            let server = i % 2 == 1;
            f.traffic_direction =
                if server { TrafficDirection::Ingress } else { TrafficDirection::Egress }.into();
            let failed = i.is_multiple_of(50);
            f.verdict = if failed { Verdict::Error } else { Verdict::Forwarded }.into();
            f.l7 = Some(Layer7 {
                latency_ns: 200_000 + (i * 7919) % 50_000_000,
                protocol: "http".into(),
                error: if failed { "HTTP 503".into() } else { String::new() },
                ..Layer7::default()
            });
        }
        // Connection lifecycle with running totals.
        8..=10 => {
            f.r#type = FlowType::L3L4.into();
            f.traffic_direction = TrafficDirection::Egress.into();
            f.socket_cookie = i / 3;
            f.socket_event = match i % 12 {
                8 => SocketEvent::Connect,
                9 => SocketEvent::Update,
                _ => SocketEvent::Close,
            }
            .into();
            f.tcp_stats = Some(TcpStats {
                connect_latency_ns: 100_000 + i % 900_000,
                retransmits: u32::try_from(i % 3).unwrap_or(0),
                bytes_sent: i % 100_000,
                bytes_received: i % 70_000,
                ..TcpStats::default()
            });
        }
        // Drops.
        _ => {
            f.r#type = FlowType::L3L4.into();
            f.verdict = Verdict::Dropped.into();
            f.kernel_drop_reason =
                if i.is_multiple_of(2) { "NETFILTER_DROP" } else { "TCP_INVALID_SEQUENCE" }.into();
            f.kernel_drop_location = "nft_do_chain+0x3c4".into();
        }
    }
    f
}

fn flows(n: u64, hops: u64, now: u64) -> Vec<Flow> {
    (0..n).map(|i| flow(i, i * 2_654_435_761 % hops, now)).collect()
}

/// CPU time this thread has used: unlike wall time, it does not count time the thread waited for
/// the CPU on a machine busy with other work.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid clock id and out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) };
    Duration::new(u64::try_from(ts.tv_sec).unwrap_or(0), u32::try_from(ts.tv_nsec).unwrap_or(0))
}

fn throughput(label: &str, flows: &[Flow], rounds: usize, mut observe: impl FnMut(&Flow)) -> f64 {
    // Warm-up: hops, names and sockets exist before timing, as on a running node.
    for f in flows {
        observe(f);
    }
    let (start, cpu) = (Instant::now(), thread_cpu());
    for _ in 0..rounds {
        for f in flows {
            observe(f);
        }
    }
    let (elapsed, cpu) = (start.elapsed(), thread_cpu().saturating_sub(cpu));
    #[expect(clippy::cast_precision_loss, reason = "a rate")]
    let n = (flows.len() * rounds) as f64;
    let rate = n / cpu.as_secs_f64();
    println!(
        "| {label} | {n} | {:.2} s | {:.2} s | {rate:.0} | {:.0} ns |",
        elapsed.as_secs_f64(),
        cpu.as_secs_f64(),
        1e9 / rate
    );
    rate
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Telemetry with `hops` hops; returns (sample lines, bytes, median wall and CPU scrape time).
fn scrape(runtime: &tokio::runtime::Runtime, hops: u64) -> (usize, usize, Duration, Duration) {
    let args = MetricsArgs {
        metrics_addr: MetricsAddr(Some("127.0.0.1:0".parse().expect("address"))),
        metrics_series_limit: 1_000_000,
        metrics_stale_after: Duration::from_hours(1),
    };
    let t = runtime.block_on(Telemetry::serve(&args, "bench")).expect("metrics");
    let now = wall_now_ns();
    for h in 0..hops {
        // Each hop: client-side L7 (requests, errors, duration histogram) and a connect.
        for k in [0u64, 8] {
            t.observe(&flow(k + h * 12, h, now));
        }
    }
    let text = t.scrape();
    let samples = text.lines().filter(|l| !l.starts_with('#')).count();
    let times: Vec<(Duration, Duration)> = (0..15)
        .map(|_| {
            let (s, c) = (Instant::now(), thread_cpu());
            let body = t.scrape();
            let d = (s.elapsed(), thread_cpu().saturating_sub(c));
            assert!(body.len() > 1000);
            d
        })
        .collect();
    (
        samples,
        text.len(),
        median(times.iter().map(|t| t.0).collect()),
        median(times.iter().map(|t| t.1).collect()),
    )
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("hops: bench");
        return;
    }
    let cpu = support::pin_to_one_core();
    let now = wall_now_ns();
    let batch = flows(200_000, 1000, now);
    println!(
        "\nhop aggregation on one core (CPU {}), 1000 hops, mix: 8/12 L7 (client + server side), 3/12 connection events, 1/12 drops",
        cpu.map_or_else(|| "unpinned".to_owned(), |c| c.to_string())
    );
    println!("| path | flows | wall time | CPU time | flows per CPU second | CPU per flow |");
    println!("|---|---:|---:|---:|---:|---:|");
    let mut agg = Aggregator::new(HopConfig { series_limit: 10_000, ..HopConfig::default() });
    throughput("Aggregator::observe (hop state only)", &batch, 10, |f| {
        agg.observe(f, now);
    });
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let args = MetricsArgs {
        metrics_addr: MetricsAddr(Some("127.0.0.1:0".parse().expect("address"))),
        metrics_series_limit: 10_000,
        metrics_stale_after: Duration::from_mins(5),
    };
    let telemetry = runtime.block_on(Telemetry::serve(&args, "bench")).expect("metrics");
    throughput(
        "Telemetry::observe (agent path: lock, counters, lag, aggregation)",
        &batch,
        10,
        |f| {
            telemetry.observe(f);
        },
    );

    println!("\n/metrics rendering (registry gather + text encoding), median of 15");
    println!("| hops | series (sample lines) | body | wall time | CPU time |");
    println!("|---:|---:|---:|---:|---:|");
    // About 46 sample lines per hop (request counters, two histograms, TCP counters).
    for hops in [215, 2170] {
        let (samples, bytes, wall, cpu) = scrape(&runtime, hops);
        #[expect(clippy::cast_precision_loss, reason = "display")]
        let mib = bytes as f64 / 1_048_576.0;
        println!(
            "| {hops} | {samples} | {mib:.1} MiB | {:.1} ms | {:.1} ms |",
            wall.as_secs_f64() * 1e3,
            cpu.as_secs_f64() * 1e3
        );
    }
}
