//! Hops as rows a person (or a script) reads: rates over the window, error ratio, latency
//! quantiles per measuring side, TCP health and drops; with sorting and the filters `hopwatch hops`
//! shares with `observe`.
//!
//! Counts of one exchange reported by both ends are not added: a row takes the larger of the
//! client's and the server's count (they are equal when both ends are traced; when only one is,
//! that one is the count). Retransmits are per direction (each end counts its own), so both ends
//! add up.

use std::{cmp::Ordering, collections::BTreeMap, str::FromStr};

use serde::Serialize;

use super::{
    HopKey, Kind,
    histogram::Histogram,
    ledger::Ledger,
    stats::{Hop, Side, SideStats, Tally},
    table::HopTable,
};

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct EndpointView {
    pub namespace: String,
    pub name: String,
    pub kind: Kind,
}

impl EndpointView {
    /// `namespace/name`, or `name` without a namespace.
    #[must_use]
    pub fn display(&self) -> String {
        if self.namespace.is_empty() {
            self.name.clone()
        } else {
            format!("{}/{}", self.namespace, self.name)
        }
    }
}

/// Quantiles of one latency distribution, in ns.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_ns: u64,
    pub p90_ns: u64,
    pub p99_ns: u64,
    pub mean_ns: u64,
    pub max_ns: u64,
    /// Total time spent (for path shares).
    #[serde(skip)]
    pub sum_ns: u128,
}

impl Latency {
    #[must_use]
    pub fn of(h: &Histogram) -> Option<Self> {
        Some(Self {
            count: h.count(),
            p50_ns: h.quantile_ns(0.5)?,
            p90_ns: h.quantile_ns(0.9)?,
            p99_ns: h.quantile_ns(0.99)?,
            mean_ns: h.mean_ns()?,
            max_ns: h.max_ns()?,
            sum_ns: h.sum_ns(),
        })
    }
}

/// How the hop's client connections set up, on average, and the total's distribution.
#[derive(Debug, Clone, Serialize)]
pub struct SetupView {
    pub connections: u64,
    pub total: Latency,
    pub mean_dns_ns: u64,
    pub mean_connect_ns: u64,
    pub mean_tls_ns: u64,
    pub mean_first_byte_ns: u64,
}

impl SetupView {
    fn of(s: &crate::stats::SetupStats) -> Option<Self> {
        let n = s.total.count();
        let total = Latency::of(&s.total)?;
        Some(Self {
            connections: n,
            total,
            mean_dns_ns: s.dns_ns / n,
            mean_connect_ns: s.connect_ns / n,
            mean_tls_ns: s.tls_ns / n,
            mean_first_byte_ns: s.first_byte_ns / n,
        })
    }
}

/// One hop over the window.
#[derive(Debug, Clone, Serialize)]
pub struct HopRow {
    pub source: EndpointView,
    pub destination: EndpointView,
    pub port: u32,
    pub transport: &'static str,
    /// Application protocol when exchanges were parsed, else the transport.
    pub protocol: String,
    pub requests: u64,
    pub errors: u64,
    pub timeouts: u64,
    pub requests_per_second: f64,
    /// errors / requests; absent without requests.
    pub error_ratio: Option<f64>,
    /// Request → response as the client measured it (network included).
    pub client_latency: Option<Latency>,
    /// Request read → response written, as the server measured it.
    pub server_latency: Option<Latency>,
    pub connects: u64,
    pub connect_latency: Option<Latency>,
    pub connect_failures: BTreeMap<String, u64>,
    pub open_connections: u32,
    pub retransmits: u64,
    pub resets: u64,
    pub bytes_to_server: u64,
    pub bytes_to_client: u64,
    pub drops: BTreeMap<String, u64>,
    pub drops_total: u64,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub dns_rcodes: BTreeMap<String, u64>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub nxdomain: BTreeMap<String, u64>,
    /// TLS handshakes completed and their time, as the client and the server measured it.
    pub tls_handshakes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_tls_handshake: Option<Latency>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_tls_handshake: Option<Latency>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub tls_failures: BTreeMap<String, u64>,
    /// Client connections' set-up, from their first exchange.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_setup: Option<SetupView>,
    /// Which ends reported ("client", "server").
    pub reported_by: Vec<&'static str>,
}

pub(crate) fn endpoint(e: &super::EndpointId) -> EndpointView {
    EndpointView { namespace: e.namespace.to_string(), name: e.name.to_string(), kind: e.kind }
}

fn tally(t: &Tally) -> BTreeMap<String, u64> {
    t.iter().map(|(k, n)| (k.to_owned(), n)).collect()
}

/// The larger of both sides' tallies, name by name.
fn tally_max(a: Option<&Tally>, b: Option<&Tally>) -> BTreeMap<String, u64> {
    let mut out = a.map(tally).unwrap_or_default();
    for (k, n) in b.map(tally).unwrap_or_default() {
        let e = out.entry(k).or_default();
        *e = (*e).max(n);
    }
    out
}

/// A row for `hop`; `ledger` gives open connections, `window_s` turns counts into rates.
#[must_use]
#[expect(clippy::cast_precision_loss, reason = "rates and ratios are display values")]
pub fn row(key: &HopKey, hop: &Hop, ledger: Option<&Ledger>, window_s: f64) -> HopRow {
    let (c, s) = (hop.side(Side::Client), hop.side(Side::Server));
    let max = |f: fn(&SideStats) -> u64| c.map_or(0, f).max(s.map_or(0, f));
    let requests = max(|x| x.requests);
    let errors = max(|x| x.errors);
    let protocol = c
        .and_then(|x| x.protocol.as_deref())
        .or_else(|| s.and_then(|x| x.protocol.as_deref()))
        .unwrap_or(key.transport.as_str())
        .to_owned();
    let open = ledger
        .map_or(0, |l| Side::BOTH.iter().map(|side| l.open_on(key, *side)).max().unwrap_or(0));
    HopRow {
        source: endpoint(&key.source),
        destination: endpoint(&key.destination),
        port: key.port,
        transport: key.transport.as_str(),
        protocol,
        requests,
        errors,
        timeouts: max(|x| x.timeouts),
        requests_per_second: if window_s > 0.0 { requests as f64 / window_s } else { 0.0 },
        error_ratio: (requests > 0).then(|| errors as f64 / requests as f64),
        client_latency: c.and_then(|x| Latency::of(&x.latency)),
        server_latency: s.and_then(|x| Latency::of(&x.latency)),
        connects: max(|x| x.opened),
        connect_latency: c.and_then(|x| Latency::of(&x.connect)),
        connect_failures: tally_max(c.map(|x| &x.connect_failures), s.map(|x| &x.connect_failures)),
        open_connections: open,
        retransmits: c.map_or(0, |x| x.retransmits) + s.map_or(0, |x| x.retransmits),
        resets: max(|x| x.resets),
        bytes_to_server: c.map_or(0, |x| x.bytes_sent).max(s.map_or(0, |x| x.bytes_received)),
        bytes_to_client: s.map_or(0, |x| x.bytes_sent).max(c.map_or(0, |x| x.bytes_received)),
        drops: tally(&hop.drops),
        drops_total: hop.drops.total(),
        dns_rcodes: tally_max(c.map(|x| &x.dns_rcodes), s.map(|x| &x.dns_rcodes)),
        nxdomain: tally_max(c.map(|x| &x.nxdomain), s.map(|x| &x.nxdomain)),
        tls_handshakes: max(|x| x.tls_handshake.count()),
        client_tls_handshake: c.and_then(|x| Latency::of(&x.tls_handshake)),
        server_tls_handshake: s.and_then(|x| Latency::of(&x.tls_handshake)),
        tls_failures: tally_max(c.map(|x| &x.tls_failures), s.map(|x| &x.tls_failures)),
        connection_setup: c.and_then(|x| SetupView::of(&x.setup)),
        reported_by: Side::BOTH
            .iter()
            .filter(|x| hop.side(**x).is_some())
            .map(|x| x.as_str())
            .collect(),
    }
}

/// Every hop of `table` (the overflow hop last, when anything overflowed).
#[must_use]
pub fn rows(table: &HopTable, ledger: Option<&Ledger>, window_s: f64) -> Vec<HopRow> {
    let mut out: Vec<HopRow> = table.iter().map(|(k, h)| row(k, h, ledger, window_s)).collect();
    let o = table.overflow();
    if *o != Hop::default() {
        let overflow = super::EndpointId {
            namespace: "".into(),
            name: super::endpoint::OVERFLOW.into(),
            kind: Kind::Overflow,
        };
        let key = HopKey {
            source: overflow.clone(),
            destination: overflow,
            port: 0,
            transport: super::Transport::Other,
        };
        out.push(row(&key, o, None, window_s));
    }
    out
}

/// Columns rows sort by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SortKey {
    Source,
    Destination,
    Protocol,
    Port,
    Requests,
    Rps,
    Errors,
    ErrorRatio,
    P50,
    P90,
    P99,
    ServerP99,
    ConnectP99,
    Connects,
    Retransmits,
    Drops,
}

impl FromStr for SortKey {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        <Self as clap::ValueEnum>::from_str(s, true)
    }
}

impl SortKey {
    /// Numbers sort largest first, names alphabetically.
    #[must_use]
    pub fn descending_by_default(self) -> bool {
        !matches!(self, SortKey::Source | SortKey::Destination | SortKey::Protocol | SortKey::Port)
    }

    fn cmp(self, a: &HopRow, b: &HopRow) -> Ordering {
        let lat = |r: &HopRow, f: fn(&Latency) -> u64, side: u8| match side {
            0 => r.client_latency.as_ref().or(r.server_latency.as_ref()).map(f),
            1 => r.server_latency.as_ref().map(f),
            _ => r.connect_latency.as_ref().map(f),
        };
        match self {
            SortKey::Source => a.source.display().cmp(&b.source.display()),
            SortKey::Destination => a.destination.display().cmp(&b.destination.display()),
            SortKey::Protocol => a.protocol.cmp(&b.protocol),
            SortKey::Port => a.port.cmp(&b.port),
            SortKey::Requests | SortKey::Rps => a.requests.cmp(&b.requests),
            SortKey::Errors => a.errors.cmp(&b.errors),
            SortKey::ErrorRatio => {
                a.error_ratio.unwrap_or(-1.0).total_cmp(&b.error_ratio.unwrap_or(-1.0))
            }
            SortKey::P50 => lat(a, |l| l.p50_ns, 0).cmp(&lat(b, |l| l.p50_ns, 0)),
            SortKey::P90 => lat(a, |l| l.p90_ns, 0).cmp(&lat(b, |l| l.p90_ns, 0)),
            SortKey::P99 => lat(a, |l| l.p99_ns, 0).cmp(&lat(b, |l| l.p99_ns, 0)),
            SortKey::ServerP99 => lat(a, |l| l.p99_ns, 1).cmp(&lat(b, |l| l.p99_ns, 1)),
            SortKey::ConnectP99 => lat(a, |l| l.p99_ns, 2).cmp(&lat(b, |l| l.p99_ns, 2)),
            SortKey::Connects => a.connects.cmp(&b.connects),
            SortKey::Retransmits => a.retransmits.cmp(&b.retransmits),
            SortKey::Drops => a.drops_total.cmp(&b.drops_total),
        }
    }
}

/// Sorts `rows` by `key` (numbers largest first unless `reverse`); ties by requests, then name.
pub fn sort(rows: &mut [HopRow], key: SortKey, reverse: bool) {
    let descending = key.descending_by_default() != reverse;
    rows.sort_by(|a, b| {
        let primary = key.cmp(a, b);
        let primary = if descending { primary.reverse() } else { primary };
        primary
            .then_with(|| b.requests.cmp(&a.requests))
            .then_with(|| a.source.display().cmp(&b.source.display()))
            .then_with(|| a.destination.display().cmp(&b.destination.display()))
            .then_with(|| a.port.cmp(&b.port))
    });
}

/// Which hops to show, with `hubble observe`'s meaning: a hop matches when either end does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RowFilter {
    /// `-n`: either end in one of these namespaces.
    pub namespaces: Vec<String>,
    /// `--pod [namespace/]prefix`: either end's name starts with the prefix (in that namespace,
    /// when given).
    pub pods: Vec<String>,
    /// `--to-port`: the destination port is one of these.
    pub to_ports: Vec<u32>,
}

impl RowFilter {
    #[must_use]
    pub fn matches(&self, r: &HopRow) -> bool {
        let ends = [&r.source, &r.destination];
        let ns_ok = self.namespaces.is_empty()
            || ends.iter().any(|e| self.namespaces.contains(&e.namespace));
        let pod_ok = self.pods.is_empty()
            || ends.iter().any(|e| {
                self.pods.iter().any(|p| match p.split_once('/') {
                    Some((ns, prefix)) => e.namespace == ns && e.name.starts_with(prefix),
                    None => e.name.starts_with(p.as_str()),
                })
            });
        let port_ok = self.to_ports.is_empty() || self.to_ports.contains(&r.port);
        ns_ok && pod_ok && port_ok
    }
}
