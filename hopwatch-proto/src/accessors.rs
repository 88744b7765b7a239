//! Facts about a flow that the collector's filters, the printers and hop aggregation all read.

use crate::flow::{Flow, layer4, layer7::Record};

impl Flow {
    /// The flow's L4 ports (source, destination), when it has any.
    pub fn ports(&self) -> Option<(u32, u32)> {
        match self.l4.as_ref()?.protocol.as_ref()? {
            layer4::Protocol::Tcp(t) => Some((t.source_port, t.destination_port)),
            layer4::Protocol::Udp(u) => Some((u.source_port, u.destination_port)),
            layer4::Protocol::Sctp(s) => Some((s.source_port, s.destination_port)),
            layer4::Protocol::IcmPv4(_) | layer4::Protocol::IcmPv6(_) => None,
        }
    }

    /// The application protocol of an L7 flow ("http", "postgres", ...).
    pub fn l7_protocol(&self) -> Option<&str> {
        let l7 = self.l7.as_ref()?;
        if !l7.protocol.is_empty() {
            return Some(&l7.protocol);
        }
        Some(match l7.record.as_ref()? {
            Record::Http(_) => "http",
            Record::Dns(_) => "dns",
            Record::Postgres(_) => "postgres",
            Record::Redis(_) => "redis",
            Record::Mysql(_) => "mysql",
        })
    }

    /// The latency a flow measured: request to response for L7 flows, the TCP handshake for
    /// connect flows.
    pub fn latency_ns(&self) -> Option<u64> {
        if let Some(l7) = self.l7.as_ref().filter(|l| l.latency_ns > 0) {
            return Some(l7.latency_ns);
        }
        self.tcp_stats.as_ref().map(|t| t.connect_latency_ns).filter(|&n| n > 0)
    }
}
