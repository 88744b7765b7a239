//! The one-line human summary of a flow (Hubble's `Summary`), derived from the flow's fields
//! when it is printed, so flows that are only stored or counted never pay for the formatting.

use std::fmt::Write as _;

use hopwatch_proto::flow::{
    Flow, Layer7, SocketEvent, TcpStats, TlsHandshake, TrafficDirection, Verdict, layer7::Record,
};

/// `connect 20.3ms`, `NETFILTER_DROP at nft_do_chain+0x3c4`, `HTTP/1.1 GET /x → 200 in 1.2ms`.
pub(crate) fn summary(f: &Flow) -> String {
    if let (Some(l7), Some(t)) = (&f.l7, &f.tls_handshake)
        && l7.protocol == "tls"
    {
        return tls_summary(t);
    }
    if let Some(l7) = &f.l7 {
        return l7_summary(l7, f.traffic_direction() == TrafficDirection::Ingress);
    }
    if f.verdict() == Verdict::Dropped {
        // A flow from Hubble's output (observe --input-file) carries Cilium's reason instead.
        let reason = if f.kernel_drop_reason.is_empty() {
            f.drop_reason_desc().as_str_name()
        } else {
            &f.kernel_drop_reason
        };
        return match f.kernel_drop_location.as_str() {
            "" => reason.to_owned(),
            at => format!("{reason} at {at}"),
        };
    }
    match &f.tcp_stats {
        Some(s) => tcp_summary(f.socket_event(), s),
        None => String::new(),
    }
}

/// Human-readable duration: `850µs`, `20.3ms`, `1.52s`.
#[must_use]
#[expect(clippy::cast_precision_loss, reason = "a rounded display value")]
pub(crate) fn human_ns(ns: u64) -> String {
    match ns {
        0..1_000_000 => format!("{}µs", ns / 1000),
        1_000_000..1_000_000_000 => format!("{:.1}ms", ns as f64 / 1e6),
        _ => format!("{:.2}s", ns as f64 / 1e9),
    }
}

/// Human-readable byte count.
#[must_use]
#[expect(clippy::cast_precision_loss, reason = "a rounded display value")]
pub(crate) fn human_bytes(b: u64) -> String {
    match b {
        0..1024 => format!("{b}B"),
        1024..1_048_576 => format!("{:.1}KiB", b as f64 / 1024.0),
        _ => format!("{:.1}MiB", b as f64 / 1_048_576.0),
    }
}

fn tcp_summary(event: SocketEvent, s: &TcpStats) -> String {
    let counters = || {
        format!(
            "sent {} received {} srtt {} retransmits {}",
            human_bytes(s.bytes_sent),
            human_bytes(s.bytes_received),
            human_ns(s.srtt_ns),
            s.retransmits
        )
    };
    match event {
        SocketEvent::Connect => format!("connect {}", human_ns(s.connect_latency_ns)),
        SocketEvent::Accept => "accept".to_owned(),
        SocketEvent::ConnectFailed => format!(
            "connect failed {} after {} ({} SYN retransmits)",
            s.error,
            human_ns(s.duration_ns),
            s.retransmits
        ),
        SocketEvent::Close => {
            let how = if s.error.is_empty() { String::new() } else { format!(" {}", s.error) };
            format!("close{how} after {}, {}", human_ns(s.duration_ns), counters())
        }
        SocketEvent::Update | SocketEvent::Unknown => {
            format!("open {}, {}", human_ns(s.duration_ns), counters())
        }
    }
}

/// `GET /api/items → 200 in 12.3ms (server 10.1ms)`, and the like per protocol.
fn l7_summary(l7: &Layer7, server_side: bool) -> String {
    let mut out = l7_label(l7);
    if l7.timed_out {
        out.push_str(" no response");
    } else {
        let _ = write!(out, " in {}", human_ns(l7.latency_ns));
        if l7.peer_latency_ns > 0 {
            let other = if server_side { "client" } else { "server" };
            let _ = write!(out, " ({other} {})", human_ns(l7.peer_latency_ns));
        }
    }
    if !l7.error.is_empty() {
        let _ = write!(out, " [{}]", l7.error);
    }
    out
}

/// What an exchange was: `HTTP/1.1 GET /x → 200`, `PostgreSQL SELECT ...`, `Redis GET`.
pub(crate) fn l7_label(l7: &Layer7) -> String {
    match &l7.record {
        Some(Record::Http(h)) => match h.code {
            0 => format!("{} {} {}", h.protocol, h.method, h.url),
            code => format!("{} {} {} → {code}", h.protocol, h.method, h.url),
        },
        Some(Record::Dns(d)) => {
            let mut s = format!("DNS {} {}", d.qtypes.join(","), d.query);
            if !d.ips.is_empty() {
                let _ = write!(s, " → {}", d.ips.join(","));
            }
            s
        }
        Some(Record::Postgres(p)) => format!("PostgreSQL {}", first_nonempty(&p.query, &p.command)),
        Some(Record::Redis(r)) => format!("Redis {}", r.command),
        Some(Record::Mysql(m)) => format!("MySQL {}", first_nonempty(&m.query, &m.command)),
        None => l7.protocol.clone(),
    }
}

/// `TLS 1.3 handshake api.example.com (h2, resumed) in 41.2ms`, or its failure.
fn tls_summary(t: &TlsHandshake) -> String {
    let version = if t.version.is_empty() { "TLS" } else { &t.version };
    let mut out = format!("{version} handshake");
    if !t.server_name.is_empty() {
        let _ = write!(out, " {}", t.server_name);
    }
    let notes: Vec<&str> = [t.alpn.as_str(), if t.resumed { "resumed" } else { "" }]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect();
    if !notes.is_empty() {
        let _ = write!(out, " ({})", notes.join(", "));
    }
    if t.error.is_empty() {
        let _ = write!(out, " in {}", human_ns(t.latency_ns));
    } else {
        let _ = write!(out, " failed [{}]", t.error);
    }
    out
}

fn first_nonempty<'a>(a: &'a str, b: &'a str) -> &'a str {
    if a.is_empty() { b } else { a }
}

#[cfg(test)]
mod tests {
    use hopwatch_proto::flow::Http;

    use super::*;

    #[test]
    fn summaries_per_kind() {
        let mut f = Flow {
            tcp_stats: Some(TcpStats { connect_latency_ns: 20_300_000, ..TcpStats::default() }),
            socket_event: SocketEvent::Connect.into(),
            ..Flow::default()
        };
        assert_eq!(summary(&f), "connect 20.3ms");
        f.socket_event = SocketEvent::ConnectFailed.into();
        f.tcp_stats = Some(TcpStats {
            error: "ETIMEDOUT".into(),
            retransmits: 2,
            duration_ns: 2_500_000_000,
            ..TcpStats::default()
        });
        assert_eq!(summary(&f), "connect failed ETIMEDOUT after 2.50s (2 SYN retransmits)");
        let l7 = Flow {
            l7: Some(Layer7 {
                latency_ns: 12_300_000,
                peer_latency_ns: 10_100_000,
                error: "HTTP 503".into(),
                record: Some(Record::Http(Http {
                    code: 503,
                    method: "GET".into(),
                    url: "/api/items".into(),
                    protocol: "HTTP/1.1".into(),
                    headers: vec![],
                })),
                ..Layer7::default()
            }),
            ..Flow::default()
        };
        assert_eq!(
            summary(&l7),
            "HTTP/1.1 GET /api/items → 503 in 12.3ms (server 10.1ms) [HTTP 503]"
        );
        let drop = Flow {
            verdict: Verdict::Dropped.into(),
            kernel_drop_reason: "NO_SOCKET".into(),
            kernel_drop_location: "tcp_v4_rcv+0x91".into(),
            ..Flow::default()
        };
        assert_eq!(summary(&drop), "NO_SOCKET at tcp_v4_rcv+0x91");
        let cilium = Flow {
            verdict: Verdict::Dropped.into(),
            drop_reason_desc: hopwatch_proto::flow::DropReason::PolicyDenied.into(),
            ..Flow::default()
        };
        assert_eq!(summary(&cilium), "POLICY_DENIED");
    }

    #[test]
    fn tls_handshakes() {
        let mut f = Flow {
            l7: Some(Layer7 { protocol: "tls".into(), ..Layer7::default() }),
            tls_handshake: Some(TlsHandshake {
                version: "TLS 1.3".into(),
                server_name: "api.example.com".into(),
                alpn: "h2".into(),
                resumed: true,
                latency_ns: 41_200_000,
                ..TlsHandshake::default()
            }),
            ..Flow::default()
        };
        assert_eq!(summary(&f), "TLS 1.3 handshake api.example.com (h2, resumed) in 41.2ms");
        f.tls_handshake = Some(TlsHandshake {
            server_name: "old.example.com".into(),
            error: "server alert: protocol_version".into(),
            ..TlsHandshake::default()
        });
        assert_eq!(
            summary(&f),
            "TLS handshake old.example.com failed [server alert: protocol_version]"
        );
    }

    #[test]
    fn human_units() {
        assert_eq!(human_ns(850_000), "850µs");
        assert_eq!(human_ns(1_520_000_000), "1.52s");
        assert_eq!(human_bytes(1536), "1.5KiB");
    }
}
