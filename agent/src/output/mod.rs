//! Printers for flow streams: `compact` (one readable line per flow, in the spirit of
//! `hubble observe`) and `json` (one protobuf-JSON `GetFlowsResponse` per line, as
//! `hubble observe -o json` prints).

mod summary;

use std::io::{self, Write};

pub use self::summary::{human_bytes, human_ns, summary};
use crate::proto::{
    flow::{Flow, LostEvent, SocketEvent, Verdict, layer4::Protocol},
    observer::{GetFlowsResponse, get_flows_response::ResponseTypes},
    relay::NodeStatusEvent,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One human-readable line per flow.
    Compact,
    /// One protobuf-JSON `GetFlowsResponse` per line (Hubble's `-o json`).
    Json,
    /// Nothing on stdout (flows still go to the collector and the metrics): for daemons.
    None,
}

/// Writes one response in `format`; returns the write error (e.g. a closed pipe). Fills in the
/// flow's `Summary` first (flows are built without it; only printing needs it).
pub fn write(out: &mut impl Write, format: Format, resp: &mut GetFlowsResponse) -> io::Result<()> {
    if let Some(ResponseTypes::Flow(f)) = &mut resp.response_types
        && f.summary.is_empty()
    {
        f.summary = summary(f);
    }
    match format {
        Format::None => Ok(()),
        Format::Json => writeln!(out, "{}", resp.to_json()),
        Format::Compact => match &resp.response_types {
            Some(ResponseTypes::Flow(f)) => writeln!(out, "{}", compact(f)),
            Some(ResponseTypes::LostEvents(l)) => writeln!(out, "{}", compact_lost(l)),
            Some(ResponseTypes::NodeStatus(n)) => writeln!(out, "{}", compact_node_status(n)),
            None => Ok(()),
        },
    }
}

#[must_use]
pub fn compact_lost(l: &LostEvent) -> String {
    format!("EVENTS LOST: {} {} events lost", l.source().as_str_name(), l.num_events_lost)
}

/// `NODE STATUS: NODE_UNAVAILABLE node-a, node-b (agent disconnected)`
#[must_use]
pub fn compact_node_status(n: &NodeStatusEvent) -> String {
    let mut s =
        format!("NODE STATUS: {} {}", n.state_change().as_str_name(), n.node_names.join(", "));
    if !n.message.is_empty() {
        use std::fmt::Write as _;
        let _ = write!(s, " ({})", n.message);
    }
    s
}

/// `Nov 23 16:01:02.123 [node]: 10.0.0.1:40000 (curl:4242) -> 10.0.0.2:80 (nginx:99) tcp-connect FORWARDED connect 20.3ms`
#[must_use]
pub fn compact(f: &Flow) -> String {
    let time = f.time.as_ref().map_or_else(String::new, |t| format_time(t.seconds, t.nanos));
    let (src_ip, dst_ip) =
        f.ip.as_ref().map_or(("?", "?"), |ip| (ip.source.as_str(), ip.destination.as_str()));
    let (src_port, dst_port, proto) = match f.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
        Some(Protocol::Tcp(t)) => (Some(t.source_port), Some(t.destination_port), "tcp"),
        Some(Protocol::Udp(u)) => (Some(u.source_port), Some(u.destination_port), "udp"),
        Some(Protocol::IcmPv4(_)) => (None, None, "icmp"),
        Some(Protocol::IcmPv6(_)) => (None, None, "icmpv6"),
        _ => (None, None, "ip"),
    };
    let endpoint = |ip: &str,
                    port: Option<u32>,
                    ep: Option<&crate::proto::flow::Endpoint>,
                    proc_: Option<&crate::proto::flow::Process>| {
        // A pod (or container, static endpoint) name reads better than its address, as in
        // `hubble observe`: `namespace/pod:port`.
        let host = match ep.filter(|e| !e.pod_name.is_empty()) {
            Some(e) if e.namespace.is_empty() => e.pod_name.clone(),
            Some(e) => format!("{}/{}", e.namespace, e.pod_name),
            None if ip.contains(':') && port.is_some() => format!("[{ip}]"),
            None => ip.to_owned(),
        };
        let mut s = match port {
            Some(p) => format!("{host}:{p}"),
            None => host,
        };
        if let Some(p) = proc_ {
            use std::fmt::Write as _;
            let _ = write!(s, " ({}:{})", p.comm, p.pid);
        }
        s
    };
    let src = endpoint(src_ip, src_port, f.source.as_ref(), f.source_process.as_ref());
    let dst = endpoint(dst_ip, dst_port, f.destination.as_ref(), f.destination_process.as_ref());
    let event = match (f.verdict(), f.socket_event()) {
        (Verdict::Dropped, _) => format!("{proto}-drop"),
        _ if f.l7.is_some() => {
            let l7 = f.l7.as_ref().expect("checked");
            let kind = if l7.timed_out { "request" } else { "response" };
            format!("{}-{kind}", l7.protocol)
        }
        (_, SocketEvent::Connect) => "tcp-connect".to_owned(),
        (_, SocketEvent::ConnectFailed) => "tcp-connect-failed".to_owned(),
        (_, SocketEvent::Accept) => "tcp-accept".to_owned(),
        (_, SocketEvent::Close) => "tcp-close".to_owned(),
        (_, SocketEvent::Update) => "tcp-update".to_owned(),
        (_, SocketEvent::Unknown) => proto.to_owned(),
    };
    let node = if f.node_name.is_empty() { String::new() } else { format!(" [{}]", f.node_name) };
    format!("{time}{node}: {src} -> {dst} {event} {} {}", f.verdict().as_str_name(), f.summary)
}

/// `Mon DD HH:MM:SS.mmm` in UTC.
fn format_time(seconds: i64, nanos: i32) -> String {
    const MONTHS: [&str; 12] =
        ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let days = seconds.div_euclid(86_400);
    let secs = seconds.rem_euclid(86_400);
    let (_, month, day) = civil_from_days(days);
    format!(
        "{} {:02} {:02}:{:02}:{:02}.{:03}",
        MONTHS[usize::try_from(month - 1).expect("month is 1..=12")],
        day,
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        nanos / 1_000_000
    )
}

/// Days since 1970-01-01 → (year, month 1..=12, day 1..=31), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_times() {
        // 2026-11-23 16:01:02.123 UTC
        assert_eq!(format_time(1_795_449_662, 123_000_000), "Nov 23 16:01:02.123");
        assert_eq!(format_time(0, 0), "Jan 01 00:00:00.000");
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }
}
