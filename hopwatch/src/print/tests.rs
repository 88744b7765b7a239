//! How flows read in each format: TCP and drop flows carry the answers users come for (the
//! drop reason and where the kernel dropped; a connection's duration, bytes and RTT), whoever
//! prints them.

use hopwatch_proto::{
    flow::{
        Endpoint, Flow, Ip, Layer4, LostEventSource, Process, SocketEvent, Tcp, TcpStats,
        TrafficDirection, Udp, Verdict, layer4,
    },
    lost,
    observer::{GetFlowsResponse, get_flows_response::ResponseTypes},
};

use super::{Format, Options, Printer, time::TimeFormat};

fn resp(f: Flow) -> GetFlowsResponse {
    GetFlowsResponse {
        time: f.time,
        node_name: f.node_name.clone(),
        response_types: Some(ResponseTypes::Flow(f)),
    }
}

/// 2026-11-03 06:01:02.123 UTC.
fn at() -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: 1_793_685_662, nanos: 123_000_000 }
}

fn close() -> Flow {
    Flow {
        time: Some(at()),
        node_name: "node-a".into(),
        verdict: Verdict::Forwarded.into(),
        ip: Some(Ip { source: "10.0.0.1".into(), destination: "10.0.0.2".into(), ..Ip::default() }),
        l4: Some(Layer4 {
            protocol: Some(layer4::Protocol::Tcp(Tcp {
                source_port: 54_116,
                destination_port: 8080,
                flags: None,
            })),
        }),
        source_process: Some(Process { pid: 12_824, comm: "python3".into(), cgroup_id: 0 }),
        destination: Some(Endpoint {
            namespace: "shop".into(),
            pod_name: "api-7d9c".into(),
            ..Endpoint::default()
        }),
        socket_event: SocketEvent::Close.into(),
        traffic_direction: TrafficDirection::Egress.into(),
        tcp_stats: Some(TcpStats {
            duration_ns: 44_100_000,
            bytes_sent: 184,
            bytes_received: 2_253,
            srtt_ns: 51_000,
            ..TcpStats::default()
        }),
        ..Flow::default()
    }
}

fn drop() -> Flow {
    Flow {
        time: Some(at()),
        node_name: "node-a".into(),
        verdict: Verdict::Dropped.into(),
        ip: Some(Ip { source: "fd00::3".into(), destination: "fd00::2".into(), ..Ip::default() }),
        l4: Some(Layer4 {
            protocol: Some(layer4::Protocol::Udp(Udp {
                source_port: 50_118,
                destination_port: 7777,
            })),
        }),
        kernel_drop_reason: "NO_SOCKET".into(),
        kernel_drop_location: "__udp6_lib_rcv+0x4c1".into(),
        ..Flow::default()
    }
}

fn print(format: Format, node: bool, flows: Vec<GetFlowsResponse>) -> String {
    let opts = Options {
        format,
        time: TimeFormat::StampMilli,
        node,
        color: false,
        follow: false,
        numeric: false,
        quiet: false,
        summary: true,
    };
    let mut p = Printer::new(Vec::new(), opts);
    for mut r in flows {
        p.write(&mut r).expect("write to a Vec");
    }
    p.flush().expect("flush a Vec");
    String::from_utf8(p.out).expect("UTF-8")
}

#[test]
fn compact_lines_carry_the_drop_reason_and_the_connection_figures() {
    let out = print(Format::Compact, true, vec![resp(close()), resp(drop())]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "Nov  3 06:01:02.123 [node-a]: 10.0.0.1:54116 (python3:12824) -> shop/api-7d9c:8080 \
             tcp-close FORWARDED close after 44.1ms, sent 184B received 2.2KiB srtt 51µs \
             retransmits 0",
            "Nov  3 06:01:02.123 [node-a]: [fd00::3]:50118 -> [fd00::2]:7777 udp-drop DROPPED \
             NO_SOCKET at __udp6_lib_rcv+0x4c1",
        ]
    );
    // Without the node column.
    let out = print(Format::Compact, false, vec![resp(drop())]);
    assert!(out.starts_with("Nov  3 06:01:02.123: [fd00::3]:50118"), "{out}");
}

#[test]
fn dict_and_table_show_the_same_summaries() {
    let dict = print(Format::Dict, false, vec![resp(drop())]);
    assert!(dict.contains("       TYPE: udp-drop\n"), "{dict}");
    assert!(dict.contains("    SUMMARY: NO_SOCKET at __udp6_lib_rcv+0x4c1\n"), "{dict}");
    let table = print(Format::Table, false, vec![resp(close()), resp(drop())]);
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(rows.len(), 3, "{table}");
    assert!(rows[0].starts_with("TIMESTAMP") && rows[0].ends_with("SUMMARY"), "{table}");
    // Columns are aligned: both rows' verdicts start where the header's does.
    let col = rows[0].find("VERDICT").expect("VERDICT column");
    assert_eq!(&rows[1][col..col + 9], "FORWARDED", "{table}");
    assert_eq!(&rows[2][col..col + 7], "DROPPED", "{table}");
    assert!(rows[1].ends_with("srtt 51µs retransmits 0"), "{table}");
}

#[test]
fn json_carries_the_summary_and_every_field() {
    let out = print(Format::Json, false, vec![resp(drop())]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON line");
    assert_eq!(v["flow"]["Summary"], "NO_SOCKET at __udp6_lib_rcv+0x4c1");
    assert_eq!(v["flow"]["kernel_drop_reason"], "NO_SOCKET");
    assert_eq!(v["flow"]["l4"]["UDP"]["destination_port"], 7777);
    // A summary already there is kept as it is.
    let mut f = close();
    f.summary = "as stored".into();
    let out = print(Format::Json, false, vec![resp(f)]);
    assert!(out.contains(r#""Summary":"as stored""#), "{out}");
}

#[test]
fn lost_events_are_a_line_of_their_own_and_none_prints_nothing() {
    let notice = lost::notice("node-a", LostEventSource::PerfEventRingBuffer, 42);
    let out = print(Format::Compact, false, vec![notice.clone()]);
    assert_eq!(out, "EVENTS LOST: PERF_EVENT_RING_BUFFER 42 events lost\n");
    assert_eq!(print(Format::None, false, vec![notice, resp(drop())]), "");
}
