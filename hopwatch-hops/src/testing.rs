//! Synthetic flows for the aggregation and metrics tests.

use hopwatch_proto::flow::{
    self as pb, Flow, FlowType, Ip, Layer4, Layer7, SocketEvent, TcpStats, TrafficDirection,
    Verdict, layer4::Protocol,
};

pub const T0: u64 = 1_800_000_000_000_000_000;
pub const MS: u64 = 1_000_000;
pub const S: u64 = 1_000_000_000;

pub fn ts(ns: u64) -> hopwatch_proto::prost_types::Timestamp {
    hopwatch_proto::prost_types::Timestamp {
        seconds: i64::try_from(ns / S).unwrap(),
        nanos: i32::try_from(ns % S).unwrap(),
    }
}

pub fn proc_(comm: &str) -> pb::Process {
    pb::Process { pid: 1, comm: comm.into(), cgroup_id: 0 }
}

/// A flow between two named processes at `src`:`sport` → `dst`:`dport`.
pub fn base(src: (&str, &str, u32), dst: (&str, &str, u32), at: u64, udp: bool) -> Flow {
    let l4 = if udp {
        Protocol::Udp(pb::Udp { source_port: src.2, destination_port: dst.2 })
    } else {
        Protocol::Tcp(pb::Tcp { source_port: src.2, destination_port: dst.2, flags: None })
    };
    Flow {
        time: Some(ts(at)),
        ip: Some(Ip { source: src.1.into(), destination: dst.1.into(), ..Ip::default() }),
        l4: Some(Layer4 { protocol: Some(l4) }),
        source_process: (!src.0.is_empty()).then(|| proc_(src.0)),
        destination_process: (!dst.0.is_empty()).then(|| proc_(dst.0)),
        node_name: "n1".into(),
        ..Flow::default()
    }
}

pub fn l7(
    src: (&str, &str, u32),
    dst: (&str, &str, u32),
    at: u64,
    latency_ns: u64,
    server_side: bool,
    error: &str,
) -> Flow {
    let mut f = base(src, dst, at, false);
    f.r#type = FlowType::L7.into();
    f.verdict = if error.is_empty() { Verdict::Forwarded } else { Verdict::Error }.into();
    f.traffic_direction =
        if server_side { TrafficDirection::Ingress } else { TrafficDirection::Egress }.into();
    f.l7 = Some(Layer7 {
        latency_ns,
        protocol: "http".into(),
        error: error.into(),
        ..Layer7::default()
    });
    f
}

pub fn tcp(
    src: (&str, &str, u32),
    dst: (&str, &str, u32),
    at: u64,
    event: SocketEvent,
    cookie: u64,
    stats: TcpStats,
) -> Flow {
    let mut f = base(src, dst, at, false);
    f.r#type = FlowType::L3L4.into();
    f.socket_event = event.into();
    f.socket_cookie = cookie;
    f.traffic_direction = match event {
        SocketEvent::Accept => TrafficDirection::Ingress,
        _ => TrafficDirection::Egress,
    }
    .into();
    f.verdict =
        if event == SocketEvent::ConnectFailed { Verdict::Error } else { Verdict::Forwarded }
            .into();
    f.tcp_stats = Some(stats);
    f
}

pub fn dropped(src: (&str, &str, u32), dst: (&str, &str, u32), at: u64, reason: &str) -> Flow {
    let mut f = base(src, dst, at, false);
    f.r#type = FlowType::L3L4.into();
    f.verdict = Verdict::Dropped.into();
    f.kernel_drop_reason = reason.into();
    f
}

pub const APP: (&str, &str, u32) = ("app", "10.0.0.2", 41000);
pub const DB: (&str, &str, u32) = ("postgres", "10.0.0.3", 5432);
pub const FRONT: (&str, &str, u32) = ("nginx", "10.0.0.1", 40000);
pub const APP_SVC: (&str, &str, u32) = ("app", "10.0.0.2", 8000);
