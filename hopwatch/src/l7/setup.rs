//! How a client connection's set-up time splits: the DNS exchange that resolved the dialled
//! address (from the same process, when seen), the TCP connect, the TLS handshake, and the wait
//! for the first response byte. Reported once per connection, on its first exchange's flow at the
//! client (`.flow.connection_setup`).

use std::{collections::VecDeque, net::IpAddr};

use hopwatch_proto::{compact::Compact as _, flow::ConnectionSetup};
use rustc_hash::FxHashMap;

/// Client connections waiting for their first answered exchange, at most.
const MAX_PENDING: usize = 65_536;
/// DNS answers remembered (process, address), at most; the oldest go first.
const MAX_ANSWERS: usize = 4096;
/// A DNS answer older than this when the connect starts did not resolve it (a cached address).
const DNS_FRESH_NS: u64 = 10_000_000_000;

/// 16 bytes: up to 65 536 connections that never answered (held idle) are pending. Who dialled
/// what comes with the first exchange, to find the DNS answer.
#[derive(Debug, Clone, Copy)]
struct Pending {
    /// SYN sent (monotonic ns).
    start_ns: u64,
    connect_ns: u64,
}

#[derive(Debug, Clone)]
struct Answer {
    query: String,
    request_ns: u64,
    response_ns: u64,
}

#[derive(Default)]
pub(crate) struct SetupTracker {
    pending: FxHashMap<u64, Pending>,
    answers: FxHashMap<(u32, IpAddr), Answer>,
    order: VecDeque<(u32, IpAddr)>,
}

impl SetupTracker {
    /// Gives back the room of connections gone.
    pub(crate) fn compact(&mut self) {
        self.pending.compact();
        self.answers.compact();
        self.order.compact();
    }

    /// A client connection was established: SYN sent at `start_ns`, `connect_ns` later.
    pub(crate) fn on_connect(&mut self, cookie: u64, start_ns: u64, connect_ns: u64) {
        if start_ns == 0 || self.pending.len() >= MAX_PENDING {
            return;
        }
        self.pending.insert(cookie, Pending { start_ns, connect_ns });
    }

    /// A DNS exchange answered at the client: the process `tgid` asked `query` and learnt `ips`.
    pub(crate) fn on_dns_answer(
        &mut self,
        tgid: u32,
        query: &str,
        ips: &[String],
        request_ns: u64,
        response_ns: u64,
    ) {
        if tgid == 0 {
            return;
        }
        for ip in ips.iter().filter_map(|s| s.parse::<IpAddr>().ok()) {
            let key = (tgid, ip);
            let answer = Answer { query: query.to_owned(), request_ns, response_ns };
            if self.answers.insert(key, answer).is_none() {
                self.order.push_back(key);
                if self.order.len() > MAX_ANSWERS
                    && let Some(old) = self.order.pop_front()
                {
                    self.answers.remove(&old);
                }
            }
        }
    }

    /// Forgets connections `alive` no longer knows (a close lost with the events that were).
    pub(crate) fn sweep(&mut self, alive: impl Fn(u64) -> bool) {
        self.pending.retain(|cookie, _| alive(*cookie));
    }

    pub(crate) fn on_close(&mut self, cookie: u64) {
        self.pending.remove(&cookie);
    }

    /// The connection's first exchange was answered at the client: its request's last byte went
    /// out at `request_ns`, the first response byte came at `response_ns`; the process `tgid`
    /// made it to `remote`. `tls_ns` is the TLS handshake's time, if the connection is TLS. Once
    /// per connection.
    pub(crate) fn first_response(
        &mut self,
        cookie: u64,
        (tgid, remote): (u32, IpAddr),
        tls_ns: Option<u64>,
        request_ns: u64,
        response_ns: u64,
    ) -> Option<ConnectionSetup> {
        let p = self.pending.remove(&cookie)?;
        let dns = self
            .answers
            .get(&(tgid, remote))
            .filter(|a| a.response_ns <= p.start_ns && p.start_ns - a.response_ns <= DNS_FRESH_NS);
        let start = dns.map_or(p.start_ns, |a| a.request_ns);
        Some(ConnectionSetup {
            dns_query: dns.map(|a| a.query.clone()).unwrap_or_default(),
            dns_ns: dns.map_or(0, |a| a.response_ns.saturating_sub(a.request_ns)),
            connect_ns: p.connect_ns,
            tls_ns: tls_ns.unwrap_or(0),
            first_byte_ns: response_ns.saturating_sub(request_ns),
            total_ns: response_ns.saturating_sub(start),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn a_cold_connection_adds_up_from_the_dns_query_to_the_first_byte() {
        let mut s = SetupTracker::default();
        let ip: IpAddr = "10.0.0.9".parse().expect("ip");
        // DNS 0 → 20 ms, connect 21 → 61 ms, TLS 62 → 102 ms, request 103 ms, answer 145 ms.
        s.on_dns_answer(7, "api.test", &["10.0.0.9".into(), "bad".into()], 0, 20 * MS);
        s.on_connect(1, 21 * MS, 40 * MS);
        let x = s.first_response(1, (7, ip), Some(40 * MS), 103 * MS, 145 * MS).expect("pending");
        assert_eq!(x.dns_query, "api.test");
        assert_eq!(
            (x.dns_ns, x.connect_ns, x.tls_ns, x.first_byte_ns),
            (20 * MS, 40 * MS, 40 * MS, 42 * MS)
        );
        assert_eq!(x.total_ns, 145 * MS);
        assert_eq!(s.first_response(1, (7, ip), None, 0, 0), None, "once per connection");
    }

    #[test]
    fn answers_of_other_processes_or_stale_ones_are_not_the_connections() {
        let mut s = SetupTracker::default();
        let ip: IpAddr = "10.0.0.9".parse().expect("ip");
        s.on_dns_answer(8, "api.test", &["10.0.0.9".into()], 0, MS);
        s.on_connect(1, 2 * MS, MS);
        let x = s.first_response(1, (7, ip), None, 4 * MS, 5 * MS).expect("pending");
        assert_eq!((x.dns_query.as_str(), x.dns_ns, x.total_ns), ("", 0, 3 * MS));
        s.on_dns_answer(7, "api.test", &["10.0.0.9".into()], 0, MS);
        s.on_connect(2, DNS_FRESH_NS + 2 * MS, MS);
        let x = s.first_response(2, (7, ip), None, 0, 0).expect("pending");
        assert_eq!(x.dns_query, "", "resolved long before: a cached address");
        s.on_connect(3, 5, 1);
        s.on_close(3);
        assert_eq!(s.first_response(3, (7, ip), None, 0, 0), None);
    }
}
