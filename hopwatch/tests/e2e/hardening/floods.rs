//! Floods: hundreds of thousands of short TCP connections, and SYNs by the hundred thousand
//! against a closed port. The agent must keep running within its memory bound, its kernel maps
//! must evict rather than refuse, and every event it could not keep must be counted the same way
//! in `/metrics` and in its `lost_events` lines.

use std::{
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use super::{CountingAgent, MIB, Metrics, RssSampler, Tally, accounting_gaps, in_netns};
use crate::support::{Pod, Testbed, serial};

/// Issue 7's memory target for the agent.
pub(super) const RSS_LIMIT_KIB: u64 = 128 * MIB;

/// What a flood did.
#[derive(Debug, Clone, Copy)]
pub(super) struct FloodReport {
    /// Connections established (then closed).
    pub connected: u64,
    /// Connection attempts refused or failed otherwise.
    pub failed: u64,
    pub elapsed: Duration,
}

impl FloodReport {
    #[expect(clippy::cast_precision_loss, reason = "a rate for messages")]
    pub(super) fn rate(&self) -> f64 {
        (self.connected + self.failed) as f64 / self.elapsed.as_secs_f64()
    }
}

/// Listeners in `pod` on `ports` that accept and close every connection until dropped.
pub(super) struct AcceptSink {
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl AcceptSink {
    pub(super) fn start(pod: &Pod, ports: &[u16]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let threads = ports
            .iter()
            .map(|&port| {
                let (stop, accepted, ready, ip) =
                    (stop.clone(), accepted.clone(), ready_tx.clone(), pod.ip);
                in_netns(pod, move || {
                    let l = TcpListener::bind(SocketAddrV4::new(ip, port))
                        .unwrap_or_else(|e| panic!("bind {ip}:{port}: {e}"));
                    // A flood outruns std's backlog of 128: SYNs dropped at a full accept queue
                    // would stall the client for a second each. listen() again only resizes it.
                    // SAFETY: listen on a valid, bound socket.
                    assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 4096) }, 0, "listen");
                    l.set_nonblocking(true).expect("nonblocking listener");
                    ready.send(()).expect("test waits");
                    while !stop.load(Ordering::Relaxed) {
                        match l.accept() {
                            Ok(_) => {
                                accepted.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                                std::thread::sleep(Duration::from_millis(1));
                            }
                            Err(e) => panic!("accept on {ip}:{port}: {e}"),
                        }
                    }
                })
            })
            .collect();
        for _ in ports {
            ready_rx.recv_timeout(Duration::from_secs(10)).expect("listeners up");
        }
        Self { stop, accepted, threads }
    }

    pub(super) fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for AcceptSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Widens the client pod's ephemeral port range and lets it reuse TIME_WAIT ports, so that a
/// flood is bounded by the test's count rather than by free ports.
pub(super) fn prepare_client(pod: &Pod) {
    pod.exec(&["sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=1024 65535"]);
    pod.exec(&["sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1"]);
}

/// Opens and closes up to `total` connections from `client` to `server` (one thread per port),
/// for at most `limit`. Refused or failed attempts are counted, not retried.
pub(super) fn connect_flood(
    client: &Pod,
    server: Ipv4Addr,
    ports: &[u16],
    total: u64,
    limit: Duration,
) -> FloodReport {
    let issued = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + limit;
    let threads: Vec<_> = ports
        .iter()
        .map(|&port| {
            let issued = issued.clone();
            in_netns(client, move || {
                let addr = SocketAddrV4::new(server, port).into();
                let (mut ok, mut failed) = (0u64, 0u64);
                while issued.fetch_add(1, Ordering::Relaxed) < total && Instant::now() < deadline {
                    match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                        Ok(s) => {
                            ok += 1;
                            drop(s);
                        }
                        Err(_) => failed += 1,
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    let (mut connected, mut failed) = (0, 0);
    for t in threads {
        let (ok, bad) = t.join().expect("flood thread");
        connected += ok;
        failed += bad;
    }
    FloodReport { connected, failed, elapsed: start.elapsed() }
}

/// Checks the agent's accounting at a moment it has caught up ([`CountingAgent::settle`]) and
/// prints the figures.
pub(super) fn settle_and_check(agent: &CountingAgent) -> (Metrics, Tally) {
    let (m, t) = agent.settle(Duration::from_secs(30));
    assert!(m.kernel("events_sent") > 0, "the kernel counted no events at all:\n{}", m.0);
    assert!(accounting_gaps(&m, &t).is_empty());
    (m, t)
}

/// Kernel maps are LRU: under a flood they evict, an insert never fails.
fn assert_maps_evict(m: &Metrics) {
    assert_eq!(m.kernel("conn_map_full"), 0, "a CONNS insert failed instead of evicting");
    for line in m.0.lines().filter(|l| l.starts_with("hopwatch_map_entries{")) {
        let (series, n) = line.rsplit_once(' ').expect("a sample");
        let cap_series = series.replace("hopwatch_map_entries", "hopwatch_map_capacity_entries");
        let cap = m.0.lines().find_map(|l| l.strip_prefix(&format!("{cap_series} ")));
        if let Some(cap) = cap {
            let (n, cap): (f64, f64) = (n.parse().expect("number"), cap.parse().expect("number"));
            assert!(n <= cap, "{series} holds {n} entries, more than its capacity {cap}");
        }
    }
}

/// Classifies `flood`'s client-side closes and connection failures from `client` to `server`.
fn flood_classifier(client: Ipv4Addr, server: Ipv4Addr) -> super::Classifier {
    let (src, dst) = (format!("\"source\":\"{client}\""), format!("\"destination\":\"{server}\""));
    Box::new(move |line: &str| {
        if !(line.contains(&src) && line.contains(&dst)) {
            return None;
        }
        if line.contains("\"socket_event\":\"CONNECT_FAILED\"") {
            Some(("connect_failed", false))
        } else if line.contains("\"socket_event\":\"CLOSE\"")
            && line.contains("\"traffic_direction\":\"EGRESS\"")
        {
            Some(("close", false))
        } else if line.contains("\"kernel_drop_reason\":\"NO_SOCKET\"") {
            Some(("no_socket_drop", false))
        } else {
            None
        }
    })
}

/// Stops the agent with SIGTERM (it must exit 0 promptly) and checks its last word: with its
/// programs detached and the ring buffer drained, every event the kernel put in the ring buffer
/// was read, and what did not fit matches the `lost_events` lines it printed. Returns how long
/// the exit took.
pub(super) fn stop_and_check_summary(agent: &mut CountingAgent) -> Duration {
    let t0 = Instant::now();
    let status = agent.stop_with(libc::SIGTERM, Duration::from_secs(10));
    let took = t0.elapsed();
    assert_eq!(status.code(), Some(0), "exit after SIGTERM: {status}\n{}", agent.stderr());
    // The reader threads see the end of the pipes just after the exit.
    std::thread::sleep(Duration::from_millis(300));
    let err = agent.stderr();
    let number_before = |text: &str| -> u64 {
        err.lines()
            .find_map(|l| {
                l.split_once(text)?.0.rsplit([' ', ':']).find(|w| !w.is_empty())?.parse().ok()
            })
            .unwrap_or_else(|| panic!("no {text:?} in the summary line:\n{err}"))
    };
    let sent = number_before(" events sent by the kernel");
    let read = number_before(" events read, ");
    let lost = number_before(" lost in the kernel ring buffer");
    assert_eq!(sent, read, "at exit: {sent} events put in the ring buffer, {read} read\n{err}");
    assert_eq!(
        agent.tally().lost("PERF_EVENT_RING_BUFFER"),
        lost,
        "the summary's ring buffer losses and the lost_events lines differ:\n{err}"
    );
    eprintln!(
        "agent exited in {took:?} after SIGTERM: {sent} events sent, {read} read, {lost} lost"
    );
    took
}

#[test]
fn a_connection_flood_stays_bounded_and_counts_what_it_cannot_keep() {
    const CONNECTIONS: u64 = 200_000;
    const PORTS: [u16; 4] = [7001, 7002, 7003, 7004];
    let _serial = serial();
    let mut tb = Testbed::new();
    let (client, server) = (tb.pod("flooder"), tb.pod("sink"));
    prepare_client(&client);
    let sink = AcceptSink::start(&server, &PORTS);
    let mut agent =
        CountingAgent::start(&["--no-collector"], flood_classifier(client.ip, server.ip));
    let idle_kib = agent.rss_kib();
    let rss = RssSampler::start(agent.pid);
    let report = connect_flood(&client, server.ip, &PORTS, CONNECTIONS, Duration::from_secs(45));
    eprintln!(
        "flood: {report:?}, {:.0} connections/s; agent idle RSS {idle_kib} KiB",
        report.rate()
    );
    agent.assert_running();
    let deadline = Instant::now() + Duration::from_secs(10);
    while sink.accepted() < report.connected {
        assert!(Instant::now() < deadline, "the server accepted {} of {report:?}", sink.accepted());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        report.connected >= CONNECTIONS / 4,
        "the flood made only {} connections in {:?} ({} failed): too few to test anything",
        report.connected,
        report.elapsed,
        report.failed
    );
    let (m, t) = settle_and_check(&agent);
    let peak = rss.peak_kib();
    eprintln!(
        "agent RSS peak {peak} KiB; {} lines, closes {}, lost {:?}; kernel sent {} full {}",
        t.lines,
        t.class("close"),
        t.lost,
        m.kernel("events_sent"),
        m.kernel("ringbuf_full")
    );
    assert!(peak < RSS_LIMIT_KIB, "agent RSS peaked at {peak} KiB, over {RSS_LIMIT_KIB} KiB");
    assert_maps_evict(&m);
    // Each connection the client closed is one client-side CLOSE flow, unless an event of it
    // was lost (counted) or the agent's connection table was full (counted too).
    let closes = t.class("close");
    let excused = t.lost_total() + m.count("hopwatch_table_full_total", &[]);
    assert!(
        closes <= report.connected,
        "{closes} CLOSE flows for {} connections",
        report.connected
    );
    assert!(
        closes + excused >= report.connected,
        "{} connections, {closes} CLOSE flows, only {excused} events counted as lost",
        report.connected
    );
    // Still tracing after the flood.
    let after = connect_flood(&client, server.ip, &PORTS[..1], 1, Duration::from_secs(5));
    assert_eq!(after.connected, 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while agent.tally().class("close") <= closes {
        assert!(Instant::now() < deadline, "no flow for a connection after the flood");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Memory comes back down once the flood's connections are gone from the tables.
    let settled_kib = agent.rss_kib();
    eprintln!("agent RSS after the flood {settled_kib} KiB");
    assert!(settled_kib < RSS_LIMIT_KIB);
    stop_and_check_summary(&mut agent);
}

/// A TCP SYN from `src:sport` to `dst:dport`, checksummed (the kernel adds the IP header).
fn syn_segment(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, seq: u32) -> [u8; 20] {
    let mut seg = [0u8; 20];
    seg[0..2].copy_from_slice(&sport.to_be_bytes());
    seg[2..4].copy_from_slice(&dport.to_be_bytes());
    seg[4..8].copy_from_slice(&seq.to_be_bytes());
    seg[12] = 5 << 4; // data offset: 5 words, no options
    seg[13] = 0x02; // SYN
    seg[14..16].copy_from_slice(&64_240u16.to_be_bytes());
    // Checksum over the pseudo-header (addresses, protocol, length) and the segment.
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        for w in b.chunks(2) {
            sum += u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&[0, 6, 0, 20]);
    add(&seg);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let sum = u16::try_from(sum).expect("folded");
    seg[16..18].copy_from_slice(&(!sum).to_be_bytes());
    seg
}

/// Sends up to `total` SYNs from `from` to `to:port` through a raw socket, from varying source
/// ports, for at most `limit`; returns how many were sent.
fn syn_flood(from: &Pod, to: Ipv4Addr, port: u16, total: u64, limit: Duration) -> u64 {
    let src = from.ip;
    in_netns(from, move || {
        // SAFETY: plain socket(2); the fd is closed below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP) };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let dst = libc::sockaddr_in {
            sin_family: libc::sa_family_t::try_from(libc::AF_INET).expect("small"),
            sin_port: 0,
            sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(to.octets()) },
            sin_zero: [0; 8],
        };
        let deadline = Instant::now() + limit;
        let mut sent = 0u64;
        while sent < total && Instant::now() < deadline {
            let sport = 20_000 + u16::try_from(sent % 40_000).expect("below 40000");
            let seg = syn_segment(src, to, sport, port, u32::try_from(sent).unwrap_or(0));
            // SAFETY: sendto with a valid buffer and address of the stated lengths.
            let n = unsafe {
                libc::sendto(
                    fd,
                    seg.as_ptr().cast(),
                    seg.len(),
                    0,
                    (&raw const dst).cast(),
                    u32::try_from(size_of::<libc::sockaddr_in>()).expect("small"),
                )
            };
            assert_eq!(n, 20, "sendto: {}", std::io::Error::last_os_error());
            sent += 1;
        }
        // SAFETY: closing the fd opened above.
        unsafe { libc::close(fd) };
        sent
    })
    .join()
    .expect("SYN flood thread")
}

#[test]
fn a_syn_flood_on_a_closed_port_is_rate_limited_and_counted() {
    const SYNS: u64 = 300_000;
    const REFUSED: u64 = 30_000;
    const CLOSED: u16 = 9;
    let _serial = serial();
    let mut tb = Testbed::new();
    let (client, server) = (tb.pod("synner"), tb.pod("closed"));
    prepare_client(&client);
    let mut agent =
        CountingAgent::start(&["--no-collector"], flood_classifier(client.ip, server.ip));
    let rss = RssSampler::start(agent.pid);
    let t0 = Instant::now();
    let syns = syn_flood(&client, server.ip, CLOSED, SYNS, Duration::from_secs(20));
    let syn_time = t0.elapsed();
    // And connect() calls that get a RST back: each is a failed connection for the agent.
    let refused = connect_flood(&client, server.ip, &[CLOSED; 4], REFUSED, Duration::from_secs(30));
    eprintln!("{syns} raw SYNs in {syn_time:?}; refused connects: {refused:?}");
    assert!(syns >= SYNS / 4, "only {syns} SYNs sent in {syn_time:?}");
    assert_eq!(refused.connected, 0, "nothing listens on port {CLOSED}");
    agent.assert_running();
    let (m, t) = settle_and_check(&agent);
    let peak = rss.peak_kib();
    let limited = m.kernel("drop_rate_limited");
    let no_socket = m.count("hopwatch_kernel_drops_total", &[("reason", "NO_SOCKET")]);
    eprintln!(
        "agent RSS peak {peak} KiB; NO_SOCKET drops {no_socket} reported, {limited} rate-limited; \
         {} CONNECT_FAILED flows; lost {:?}",
        t.class("connect_failed"),
        t.lost
    );
    assert!(peak < RSS_LIMIT_KIB, "agent RSS peaked at {peak} KiB, over {RSS_LIMIT_KIB} KiB");
    assert_maps_evict(&m);
    // Every SYN to the closed port is a NO_SOCKET drop in the server's namespace: reported,
    // rate-limited (counted), or lost in the ring buffer (counted).
    assert!(limited > 0, "{syns} SYNs in {syn_time:?} never hit the drop rate limit");
    assert!(
        no_socket + limited + t.lost_total() >= syns,
        "{syns} SYNs but only {no_socket} drops reported + {limited} rate-limited + {:?} lost",
        t.lost
    );
    // The drops of this flood that reached stdout are among those /metrics counted.
    let printed = t.class("no_socket_drop");
    assert!(
        printed > 0 && printed <= no_socket,
        "{printed} NO_SOCKET drop flows, {no_socket} in /metrics"
    );
    // Each refused connect is a CONNECT_FAILED flow, or an event of it was counted as lost.
    let failed = t.class("connect_failed");
    assert!(failed <= refused.failed, "{failed} CONNECT_FAILED flows for {refused:?}");
    assert!(
        failed + t.lost_total() + m.count("hopwatch_table_full_total", &[]) >= refused.failed,
        "{} refused connects, {failed} CONNECT_FAILED flows, {:?} lost",
        refused.failed,
        t.lost
    );
    stop_and_check_summary(&mut agent);
}
