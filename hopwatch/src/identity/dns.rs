//! DNS names for addresses, like Hubble's `source_names`/`destination_names`.
//!
//! - Observed answers: every L7 DNS flow the agent produces carries the query, its answers and
//!   their TTL; each answer address is remembered with the name asked for (and the CNAMEs on the
//!   way) until the TTL runs out, clamped to [`MIN_TTL`, `MAX_TTL`]. Names are per node, not per
//!   client: a name any pod on the node resolved names the address for all.
//! - Reverse lookups (PTR, hickory-resolver), off by default: for addresses nothing else names,
//!   asked in the background, rate-limited, cached positive and negative.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use hopwatch_proto::flow::{Flow, layer7::Record};
use tokio::sync::mpsc;

/// Addresses remembered from DNS answers; past this the entries closest to expiry go first.
pub(crate) const MAX_ANSWER_ADDRESSES: usize = 65_536;
/// Names kept per address.
const MAX_NAMES_PER_ADDRESS: usize = 4;
/// A name outlives a short TTL: connections to the address often last longer than the
/// answer's TTL (5 minutes is a common client cache time).
const MIN_TTL: Duration = Duration::from_mins(5);
const MAX_TTL: Duration = Duration::from_hours(24);
/// Reverse lookups: addresses cached, negative answers kept, queue length.
const MAX_REVERSE: usize = 65_536;
const REVERSE_NEGATIVE_TTL: Duration = Duration::from_mins(5);
const REVERSE_QUEUE: usize = 1024;
/// Longest a reverse lookup may take.
const REVERSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Names learned from DNS answers seen on the wire.
#[derive(Debug, Default)]
pub(crate) struct DnsNames {
    by_ip: HashMap<IpAddr, (Vec<String>, Instant)>,
    /// Entries dropped to stay under the cap.
    pub evicted: u64,
}

impl DnsNames {
    /// Learns from `flow` when it is a successful DNS response with addresses.
    pub(crate) fn learn(&mut self, flow: &Flow, now: Instant) {
        let Some(Record::Dns(dns)) = flow.l7.as_ref().and_then(|l7| l7.record.as_ref()) else {
            return;
        };
        if dns.rcode != 0 || dns.ips.is_empty() || dns.query.is_empty() {
            return;
        }
        let ttl = Duration::from_secs(u64::from(dns.ttl)).clamp(MIN_TTL, MAX_TTL);
        let until = now + ttl;
        let names: Vec<String> = std::iter::once(&dns.query)
            .chain(&dns.cnames)
            .map(|n| n.trim_end_matches('.').to_owned())
            .filter(|n| !n.is_empty())
            .collect();
        for ip in dns.ips.iter().filter_map(|ip| ip.parse::<IpAddr>().ok()) {
            if !self.by_ip.contains_key(&ip) && self.by_ip.len() >= MAX_ANSWER_ADDRESSES {
                self.make_room(now);
            }
            let (known, expiry) = self.by_ip.entry(ip).or_insert_with(|| (Vec::new(), until));
            *expiry = (*expiry).max(until);
            for n in &names {
                if !known.contains(n) {
                    if known.len() >= MAX_NAMES_PER_ADDRESS {
                        known.remove(0);
                    }
                    known.push(n.clone());
                }
            }
        }
    }

    fn make_room(&mut self, now: Instant) {
        let before = self.by_ip.len();
        self.by_ip.retain(|_, (_, until)| *until > now);
        if self.by_ip.len() >= MAX_ANSWER_ADDRESSES {
            // Still full of live entries: drop the quarter closest to expiry.
            let mut expiries: Vec<Instant> = self.by_ip.values().map(|(_, u)| *u).collect();
            let cut = expiries.len() / 4;
            expiries.select_nth_unstable(cut);
            let threshold = expiries[cut];
            self.by_ip.retain(|_, (_, until)| *until > threshold);
        }
        self.evicted += (before - self.by_ip.len()) as u64;
    }

    /// Names known for `ip` now.
    pub(crate) fn names(&self, ip: IpAddr, now: Instant) -> Option<&[String]> {
        self.by_ip.get(&ip).filter(|(_, until)| *until > now).map(|(n, _)| n.as_slice())
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.by_ip.len()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReverseError {
    #[error("cannot read the system resolver configuration for reverse lookups: {0}")]
    System(#[source] hickory_resolver::net::NetError),
    #[error("cannot build the reverse-lookup resolver: {0}")]
    Build(#[source] hickory_resolver::net::NetError),
}

type ReverseCache = Arc<RwLock<HashMap<IpAddr, (Option<String>, Instant)>>>;

/// Reverse lookups in the background.
#[derive(Clone)]
pub(crate) struct ReverseDns {
    cache: ReverseCache,
    pending: Arc<RwLock<HashSet<IpAddr>>>,
    queue: mpsc::Sender<IpAddr>,
    /// Lookups not asked because the queue was full or the rate was exceeded.
    pub skipped: Arc<std::sync::atomic::AtomicU64>,
}

impl ReverseDns {
    /// `server`: a name server address (port 53 unless given); `None` uses `/etc/resolv.conf`.
    pub(crate) fn start(
        server: Option<std::net::SocketAddr>,
        per_sec: u32,
        cancel: tokio_util::sync::CancellationToken,
    ) -> Result<Self, ReverseError> {
        use hickory_resolver::{
            TokioResolver,
            config::{ConnectionConfig, NameServerConfig, ResolverConfig},
            net::runtime::TokioRuntimeProvider,
        };
        let mut builder = match server {
            Some(addr) => {
                let mut udp = ConnectionConfig::udp();
                udp.port = addr.port();
                let ns = NameServerConfig::new(addr.ip(), true, vec![udp]);
                TokioResolver::builder_with_config(
                    ResolverConfig::from_name_servers(vec![ns]),
                    TokioRuntimeProvider::default(),
                )
            }
            None => TokioResolver::builder_tokio().map_err(ReverseError::System)?,
        };
        builder.options_mut().timeout = REVERSE_TIMEOUT;
        builder.options_mut().attempts = 1;
        let resolver = builder.build().map_err(ReverseError::Build)?;
        let (queue, rx) = mpsc::channel(REVERSE_QUEUE);
        let this =
            Self { cache: Arc::default(), pending: Arc::default(), queue, skipped: Arc::default() };
        tokio::spawn(reverse_loop(resolver, rx, this.clone(), per_sec.max(1), cancel));
        Ok(this)
    }

    /// The PTR name of `ip` if already known; otherwise asks for it in the background.
    pub(crate) fn name(&self, ip: IpAddr, now: Instant) -> Option<String> {
        if let Some((name, until)) =
            self.cache.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(&ip)
            && *until > now
        {
            return name.clone();
        }
        let mut pending = self.pending.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if pending.insert(ip) && self.queue.try_send(ip).is_err() {
            pending.remove(&ip);
            self.skipped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        None
    }
}

async fn reverse_loop(
    resolver: hickory_resolver::TokioResolver,
    mut rx: mpsc::Receiver<IpAddr>,
    this: ReverseDns,
    per_sec: u32,
    cancel: tokio_util::sync::CancellationToken,
) {
    let gap = Duration::from_secs(1) / per_sec;
    let mut next = tokio::time::Instant::now();
    loop {
        let ip = tokio::select! {
            () = cancel.cancelled() => return,
            ip = rx.recv() => match ip { Some(ip) => ip, None => return },
        };
        // The rate limit: one lookup per `gap`; a backlog waits in the queue (and new requests
        // are skipped and counted while it is full).
        tokio::time::sleep_until(next).await;
        next = tokio::time::Instant::now() + gap;
        let (name, ttl) = match resolver.reverse_lookup(ip).await {
            Ok(lookup) => {
                let ptr = lookup.answers().iter().find_map(|r| match &r.data {
                    hickory_resolver::proto::rr::RData::PTR(p) => {
                        Some((p.0.to_utf8().trim_end_matches('.').to_owned(), r.ttl))
                    }
                    _ => None,
                });
                match ptr {
                    Some((name, ttl)) => {
                        (Some(name), Duration::from_secs(u64::from(ttl)).clamp(MIN_TTL, MAX_TTL))
                    }
                    None => (None, REVERSE_NEGATIVE_TTL),
                }
            }
            Err(e) => {
                tracing::debug!(%ip, error = %e, "reverse lookup failed");
                (None, REVERSE_NEGATIVE_TTL)
            }
        };
        let mut cache = this.cache.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        if cache.len() >= MAX_REVERSE {
            cache.retain(|_, (_, until)| *until > now);
            if cache.len() >= MAX_REVERSE {
                cache.clear();
            }
        }
        cache.insert(ip, (name, now + ttl));
        drop(cache);
        this.pending.write().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&ip);
    }
}

#[cfg(test)]
mod tests {
    use hopwatch_proto::flow::{Dns, Layer7};

    use super::*;

    fn dns_flow(query: &str, ips: &[&str], ttl: u32, rcode: u32) -> Flow {
        Flow {
            l7: Some(Layer7 {
                record: Some(Record::Dns(Dns {
                    query: query.into(),
                    ips: ips.iter().map(|s| (*s).to_owned()).collect(),
                    ttl,
                    rcode,
                    cnames: vec!["edge.cdn.example.".into()],
                    ..Dns::default()
                })),
                ..Layer7::default()
            }),
            ..Flow::default()
        }
    }

    #[test]
    fn answers_name_their_addresses_until_the_ttl_runs_out() {
        let mut d = DnsNames::default();
        let now = Instant::now();
        d.learn(&dns_flow("api.example.com.", &["93.184.216.34", "2606:2800::1"], 3600, 0), now);
        d.learn(&dns_flow("gone.example.com", &["93.184.216.35"], 60, 3), now);
        let ip: IpAddr = "93.184.216.34".parse().unwrap();
        assert_eq!(d.names(ip, now).unwrap(), ["api.example.com", "edge.cdn.example"]);
        assert!(d.names("2606:2800::1".parse().unwrap(), now).is_some());
        assert!(d.names("93.184.216.35".parse().unwrap(), now).is_none(), "NXDOMAIN names nothing");
        assert!(d.names(ip, now + Duration::from_secs(3599)).is_some());
        assert!(d.names(ip, now + Duration::from_secs(3601)).is_none());
        // A 5 s TTL is kept for the minimum.
        d.learn(&dns_flow("short.example.com", &["10.1.1.1"], 5, 0), now);
        assert!(d.names("10.1.1.1".parse().unwrap(), now + Duration::from_mins(1)).is_some());
    }

    #[test]
    fn is_bounded() {
        let mut d = DnsNames::default();
        let now = Instant::now();
        for i in 0..u32::try_from(MAX_ANSWER_ADDRESSES + 10).unwrap() {
            let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i).to_string();
            d.learn(&dns_flow("x.example", &[&ip], 600, 0), now);
        }
        assert!(d.len() <= MAX_ANSWER_ADDRESSES);
        assert!(d.evicted > 0);
    }
}
