//! The agent's own plumbing: connections to its own listening sockets (the in-process
//! collector's API, `/metrics`) are left out of its output by default, as Hubble leaves out its
//! own API traffic, and counted.
//!
//! A flow is the agent's own when its server end (`destination`) is one of the agent's listening
//! sockets: the listener's port, its address (or, for a wildcard listener, an address of the
//! agent's network namespace), in the agent's network namespace. A client in another namespace
//! reaches the agent only through a non-loopback address (a loopback address there is its own
//! namespace's); its flows are the agent's when that address is one of the agent's.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use hopwatch_proto::flow::{Flow, Verdict, layer4::Protocol};

/// How long "is this address one of ours" answers are kept (addresses come and go).
const LOCAL_ADDR_TTL: Duration = Duration::from_secs(30);
/// Answers kept at most (a bound against a scan of many addresses to a listener's port).
const LOCAL_ADDR_CACHE: usize = 1024;

/// The agent's listening sockets and a count of the flows left out because they were theirs.
#[derive(Debug)]
pub(crate) struct OwnListeners {
    listeners: Vec<SocketAddr>,
    /// Inode of the agent's network namespace (what flows carry as `netns_inode`).
    netns: u32,
    local: Mutex<LocalAddrs>,
    hidden: AtomicU64,
}

impl OwnListeners {
    /// The listeners at `addrs`, opened in this process's network namespace.
    pub(crate) fn new(addrs: impl IntoIterator<Item = SocketAddr>) -> Self {
        use std::os::unix::fs::MetadataExt as _;
        // Inodes of namespaces fit in 32 bits (the kernel hands them out from a 32-bit counter),
        // as the flows carry them.
        let netns = std::fs::metadata("/proc/self/ns/net")
            .ok()
            .and_then(|m| u32::try_from(m.ino()).ok())
            .unwrap_or(0);
        Self::in_netns(addrs, netns)
    }

    fn in_netns(addrs: impl IntoIterator<Item = SocketAddr>, netns: u32) -> Self {
        Self {
            listeners: addrs.into_iter().collect(),
            netns,
            local: Mutex::new(LocalAddrs::default()),
            hidden: AtomicU64::new(0),
        }
    }

    /// The listening addresses, for the start-up report.
    pub(crate) fn addrs(&self) -> &[SocketAddr] {
        &self.listeners
    }

    /// Flows left out so far.
    pub(crate) fn hidden(&self) -> u64 {
        self.hidden.load(Ordering::Relaxed)
    }

    /// True (and counted) if `flow` is a connection to one of the agent's listeners. Drops are
    /// never the agent's plumbing: a packet dropped on its way to the agent is worth seeing.
    pub(crate) fn hide(&self, flow: &Flow) -> bool {
        let own = self.is_own(flow, is_local_addr);
        if own {
            self.hidden.fetch_add(1, Ordering::Relaxed);
        }
        own
    }

    fn is_own(&self, flow: &Flow, is_local: impl Fn(IpAddr) -> bool) -> bool {
        if flow.verdict() == Verdict::Dropped {
            return false;
        }
        let Some(Protocol::Tcp(tcp)) = flow.l4.as_ref().and_then(|l| l.protocol.as_ref()) else {
            return false;
        };
        let Ok(port) = u16::try_from(tcp.destination_port) else { return false };
        // Cheap first: almost no flow goes to one of these ports.
        if !self.listeners.iter().any(|l| l.port() == port) {
            return false;
        }
        let Some(dst) = flow.ip.as_ref().and_then(|ip| ip.destination.parse::<IpAddr>().ok())
        else {
            return false;
        };
        let dst = dst.to_canonical();
        let same_netns = self.netns != 0 && flow.netns_inode == self.netns;
        if !same_netns && dst.is_loopback() {
            return false;
        }
        let mut cached = None;
        let mut local = |ip: IpAddr| {
            *cached.get_or_insert_with(|| {
                self.local
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .get(ip, &is_local)
            })
        };
        self.listeners.iter().filter(|l| l.port() == port).any(|l| {
            let ip = l.ip().to_canonical();
            if ip.is_unspecified() {
                // A `[::]` listener also takes IPv4 (dual stack); `0.0.0.0` only IPv4.
                (ip.is_ipv6() || dst.is_ipv4()) && local(dst)
            } else {
                ip == dst && (same_netns || local(dst))
            }
        })
    }
}

/// Answers to "is this an address of the agent's network namespace", kept a while.
#[derive(Debug, Default)]
struct LocalAddrs {
    answers: HashMap<IpAddr, (bool, Instant)>,
}

impl LocalAddrs {
    fn get(&mut self, ip: IpAddr, is_local: impl Fn(IpAddr) -> bool) -> bool {
        let now = Instant::now();
        if let Some((answer, at)) = self.answers.get(&ip)
            && now.duration_since(*at) < LOCAL_ADDR_TTL
        {
            return *answer;
        }
        if self.answers.len() >= LOCAL_ADDR_CACHE {
            self.answers.clear();
        }
        let answer = is_local(ip);
        self.answers.insert(ip, (answer, now));
        answer
    }
}

/// Whether `ip` is an address of this process's network namespace: binding to it works only if
/// it is (the kernel's own answer, without enumerating interfaces).
fn is_local_addr(ip: IpAddr) -> bool {
    UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

#[cfg(test)]
mod tests {
    use hopwatch_proto::flow::{self as pb, Ip, Layer4};

    use super::*;

    const NETNS: u32 = 4_026_531_840;

    fn flow(dst: &str, port: u16, netns: u32) -> Flow {
        Flow {
            ip: Some(Ip { source: "10.0.0.9".into(), destination: dst.into(), ..Ip::default() }),
            l4: Some(Layer4 {
                protocol: Some(Protocol::Tcp(pb::Tcp {
                    source_port: 40000,
                    destination_port: port.into(),
                    flags: None,
                })),
            }),
            verdict: Verdict::Forwarded.into(),
            netns_inode: netns,
            ..Flow::default()
        }
    }

    /// This host's addresses, for the tests: loopback and 192.0.2.1.
    fn local(ip: IpAddr) -> bool {
        ip.is_loopback() || ip == IpAddr::from([192, 0, 2, 1])
    }

    #[test]
    fn a_listener_on_loopback_takes_its_own_namespace_only() {
        let own = OwnListeners::in_netns(["127.0.0.1:4245".parse().unwrap()], NETNS);
        assert!(own.is_own(&flow("127.0.0.1", 4245, NETNS), local));
        // Another namespace's loopback is another host.
        assert!(!own.is_own(&flow("127.0.0.1", 4245, NETNS + 1), local));
        assert!(!own.is_own(&flow("127.0.0.1", 4246, NETNS), local));
        assert!(!own.is_own(&flow("127.0.0.2", 4245, NETNS), local));
    }

    #[test]
    fn a_wildcard_listener_takes_the_namespaces_addresses() {
        let own = OwnListeners::in_netns(["0.0.0.0:9965".parse().unwrap()], NETNS);
        assert!(own.is_own(&flow("127.0.0.1", 9965, NETNS), local));
        assert!(own.is_own(&flow("192.0.2.1", 9965, NETNS), local));
        // A pod scraping the node's address from its own namespace.
        assert!(own.is_own(&flow("192.0.2.1", 9965, NETNS + 1), local));
        // Another node's agent, or a pod's own metrics port.
        assert!(!own.is_own(&flow("192.0.2.7", 9965, NETNS), local));
        assert!(!own.is_own(&flow("127.0.0.1", 9965, NETNS + 1), local));
        // 0.0.0.0 does not take IPv6; [::] takes both.
        assert!(!own.is_own(&flow("::1", 9965, NETNS), local));
        let dual = OwnListeners::in_netns(["[::]:9965".parse().unwrap()], NETNS);
        assert!(dual.is_own(&flow("::1", 9965, NETNS), local));
        assert!(dual.is_own(&flow("::ffff:127.0.0.1", 9965, NETNS), local));
    }

    #[test]
    fn drops_and_udp_are_never_hidden_and_hidden_flows_are_counted() {
        let own = OwnListeners::in_netns(["127.0.0.1:4245".parse().unwrap()], NETNS);
        let mut dropped = flow("127.0.0.1", 4245, NETNS);
        dropped.verdict = Verdict::Dropped.into();
        assert!(!own.is_own(&dropped, local));
        let mut udp = flow("127.0.0.1", 4245, NETNS);
        udp.l4 = Some(Layer4 {
            protocol: Some(Protocol::Udp(pb::Udp { source_port: 1, destination_port: 4245 })),
        });
        assert!(!own.is_own(&udp, local));
        let own = OwnListeners::in_netns(["127.0.0.1:4245".parse().unwrap()], 0);
        assert!(!own.hide(&flow("127.0.0.1", 4245, NETNS)), "unknown namespace: shown");
        let own = OwnListeners::in_netns(["127.0.0.1:4245".parse().unwrap()], NETNS);
        assert!(own.hide(&flow("127.0.0.1", 4245, NETNS)));
        assert_eq!(own.hidden(), 1);
    }

    #[test]
    fn this_hosts_loopback_is_local_and_a_documentation_address_is_not() {
        assert!(is_local_addr(IpAddr::from([127, 0, 0, 1])));
        assert!(!is_local_addr(IpAddr::from([192, 0, 2, 123])));
    }
}
