//! Completed application exchanges → L7 flows.
//!
//! One flow per exchange and per end that saw it: the client's socket (EGRESS) measures request
//! written → response read; the server's socket (INGRESS), when it runs on this node, measures
//! request read → response written. `source` is always the client, `destination` the server, as
//! for the connection's L3/L4 flows. The flow's `l7.type` is RESPONSE (it carries the response
//! and the latency, like Hubble's response flows); a request that got no answer before the
//! timeout or the connection's close is a REQUEST flow with `l7.timed_out`.
//!
//! Failed exchanges (HTTP status >= 500, an SQL error, a Redis error reply, a DNS rcode other than
//! NOERROR, no response) carry `l7.error` and the verdict ERROR, so `--verdict ERROR` finds them;
//! every other exchange is FORWARDED, as Hubble reports L7 traffic it let through.

use std::net::SocketAddr;

use hopwatch_proto::flow::{
    self as pb, CiliumEventType, Endpoint, Flow, FlowType, L7FlowType, Layer4, Layer7,
    TrafficDirection, Verdict, layer4::Protocol, layer7::Record,
};

use super::{EVENT_TYPE_L7, FlowBuilder, ip, new_uuid, process};
use crate::conntrack::Process;

/// Everything an L7 flow is built from.
#[derive(Debug, Clone)]
#[expect(clippy::struct_excessive_bools, reason = "independent facts about one exchange")]
pub struct L7Observation {
    /// `l7.protocol`: "http", "postgres", "redis", "mysql", "dns".
    pub protocol: &'static str,
    pub record: Option<Record>,
    /// Why the exchange failed, if it did.
    pub error: Option<String>,
    pub latency_ns: u64,
    pub timed_out: bool,
    pub peer_latency_ns: Option<u64>,
    /// The exchange's position on its connection, from 0.
    pub exchange_index: u64,
    pub tls: bool,
    /// The observing socket is the server's.
    pub server_side: bool,
    /// Monotonic ns the flow is stamped with (response seen, or request for a timeout).
    pub time_ns: u64,
    /// The observing socket's own address and its peer's.
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// UDP (DNS) rather than TCP.
    pub udp: bool,
    pub netns: u32,
    pub cookie: u64,
    /// Process owning the observing socket, and the one at the other end when it is on this node.
    pub process: Option<Process>,
    pub peer_process: Option<Process>,
}

impl FlowBuilder {
    /// An L7 flow for one exchange seen at one end of a hop.
    pub fn l7(&self, mut o: L7Observation) -> Flow {
        let (src, dst, direction) = if o.server_side {
            (o.remote, o.local, TrafficDirection::Ingress)
        } else {
            (o.local, o.remote, TrafficDirection::Egress)
        };
        let cgroup_id = o.process.as_ref().map_or(0, |p| p.cgroup_id);
        let (local_proc, peer_proc) =
            (o.process.as_ref().map(process), o.peer_process.as_ref().map(process));
        let (src_proc, dst_proc) =
            if o.server_side { (peer_proc, local_proc) } else { (local_proc, peer_proc) };
        let error = match (o.error.take(), o.timed_out) {
            (Some(e), _) => e,
            (None, true) => "timeout".to_owned(),
            (None, false) => String::new(),
        };
        let verdict = if error.is_empty() { Verdict::Forwarded } else { Verdict::Error };
        let l4 = if o.udp {
            Protocol::Udp(pb::Udp {
                source_port: src.port().into(),
                destination_port: dst.port().into(),
            })
        } else {
            Protocol::Tcp(pb::Tcp {
                source_port: src.port().into(),
                destination_port: dst.port().into(),
                flags: None,
            })
        };
        if let (true, Some(Record::Http(h))) = (o.tls, o.record.as_mut())
            && h.url.starts_with("http://")
        {
            // The parser saw plaintext; on the wire it was HTTPS.
            h.url.insert(4, 's');
        }
        let trace_context = super::records::trace_context(o.record.as_ref());
        Flow {
            time: Some(self.clock.timestamp(o.time_ns)),
            uuid: new_uuid(),
            verdict: verdict.into(),
            trace_context,
            ip: Some(ip(src.ip(), dst.ip())),
            l4: Some(Layer4 { protocol: Some(l4) }),
            source: Some(Endpoint::default()),
            destination: Some(Endpoint::default()),
            r#type: FlowType::L7.into(),
            node_name: self.node_name.clone(),
            l7: Some(Layer7 {
                r#type: if o.timed_out { L7FlowType::Request } else { L7FlowType::Response }.into(),
                latency_ns: o.latency_ns,
                record: o.record.take(),
                protocol: o.protocol.to_owned(),
                error,
                timed_out: o.timed_out,
                peer_latency_ns: o.peer_latency_ns.unwrap_or(0),
                tls: o.tls,
                exchange_index: o.exchange_index,
                // Set by request tracing (`crate::trace`).
                span: None,
            }),
            event_type: Some(CiliumEventType { r#type: EVENT_TYPE_L7, sub_type: 0 }),
            traffic_direction: direction.into(),
            is_reply: Some(!o.timed_out),
            socket_cookie: o.cookie,
            cgroup_id,
            source_process: src_proc,
            destination_process: dst_proc,
            netns_inode: o.netns,
            ..Flow::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{drops::DropReasons, flow::tests_support::clock_at};

    fn builder() -> FlowBuilder {
        FlowBuilder {
            node_name: "n".into(),
            clock: clock_at(0),
            reasons: DropReasons::from_pairs(&[]),
            symbols: None,
        }
    }

    fn obs(server_side: bool) -> L7Observation {
        L7Observation {
            protocol: "http",
            record: Some(Record::Http(pb::Http {
                code: 503,
                method: "GET".into(),
                url: "/api/items".into(),
                protocol: "HTTP/1.1".into(),
                headers: vec![],
            })),
            error: Some("HTTP 503".into()),
            latency_ns: 12_300_000,
            timed_out: false,
            peer_latency_ns: Some(10_100_000),
            exchange_index: 3,
            tls: true,
            server_side,
            time_ns: 5,
            local: "10.0.0.1:40000".parse().unwrap(),
            remote: "10.0.0.2:443".parse().unwrap(),
            udp: false,
            netns: 1,
            cookie: 9,
            process: Some(Process { pid: 7, comm: "curl".into(), cgroup_id: 1 }),
            peer_process: None,
        }
    }

    #[test]
    fn a_failed_exchange_is_an_error_flow_from_client_to_server() {
        let f = builder().l7(obs(false));
        assert_eq!(f.r#type(), FlowType::L7);
        assert_eq!(f.verdict(), Verdict::Error);
        assert_eq!(f.traffic_direction(), TrafficDirection::Egress);
        let l7 = f.l7.as_ref().unwrap();
        assert_eq!((l7.latency_ns, l7.peer_latency_ns, l7.tls), (12_300_000, 10_100_000, true));
        assert_eq!(l7.error, "HTTP 503");
        assert_eq!(f.ip.as_ref().unwrap().source, "10.0.0.1");
        assert_eq!(f.source_process.as_ref().unwrap().comm, "curl");
    }

    #[test]
    fn the_server_side_flow_keeps_client_to_server_orientation() {
        let mut o = obs(true);
        o.local = "10.0.0.2:443".parse().unwrap();
        o.remote = "10.0.0.1:40000".parse().unwrap();
        let f = builder().l7(o);
        assert_eq!(f.traffic_direction(), TrafficDirection::Ingress);
        assert_eq!(f.ip.as_ref().unwrap().source, "10.0.0.1");
        assert_eq!(f.destination_process.as_ref().unwrap().pid, 7);
    }

    #[test]
    fn an_unanswered_request_is_a_timed_out_request_flow() {
        let mut o = obs(false);
        o.error = None;
        o.timed_out = true;
        o.latency_ns = 0;
        let f = builder().l7(o);
        assert_eq!(f.verdict(), Verdict::Error);
        let l7 = f.l7.unwrap();
        assert_eq!(
            (l7.r#type(), l7.timed_out, l7.error.as_str()),
            (L7FlowType::Request, true, "timeout")
        );
    }
}
