//! Service translation from conntrack: where did a connection to a Service address really go?
//!
//! kube-proxy (iptables or IPVS) and Docker's published ports rewrite the destination of a
//! connection's first packet; the socket keeps the address the application dialled, and the
//! kernel's connection tracking keeps both: the original tuple (what the socket sees) and the reply
//! tuple, whose source is the backend actually reached. The rewrite happens in the namespace whose
//! rules matched: the host's for pods behind kube-proxy and for Docker, the socket's own for a
//! process on the host network or rules inside a container. So each connection is looked up first
//! in the socket's network namespace, then in the agent's (the host's).
//!
//! A netlink socket belongs to the namespace it was created in; this worker thread enters a
//! namespace (`setns`, which needs CAP_SYS_ADMIN) only to create a socket there, keeps it while
//! the namespace is in use, and closes it when idle (an open socket keeps the namespace alive).
//! Without CAP_SYS_ADMIN only the host's table is read. Cilium's socket load balancing rewrites
//! the address at `connect()` instead: the socket then already names the backend and no lookup
//! is needed.

use std::{
    collections::HashMap,
    fs::File,
    net::SocketAddr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::PathBuf,
    sync::mpsc,
    time::{Duration, Instant},
};

use super::ctnetlink::{self, CtError, Tuple};

/// Requests waiting for the worker; beyond this they are not looked up (and counted).
pub(crate) const QUEUE: usize = 4096;
/// A namespace's socket unused this long is closed.
const SOCKET_IDLE: Duration = Duration::from_mins(1);
/// Namespaces with an open socket at most.
const MAX_SOCKETS: usize = 512;
/// Shortest time between two scans of /proc and /run/netns for a namespace no process names.
const SCAN_GAP: Duration = Duration::from_secs(1);
const RECV_TIMEOUT: Duration = Duration::from_millis(200);

/// One connection to look up.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Request {
    pub cookie: u64,
    pub netns: u32,
    /// A process in that namespace (the socket's owner), 0 when unknown.
    pub pid: u32,
    pub tuple: Tuple,
}

/// The answer: the backend reached, if the destination was translated.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Answer {
    pub cookie: u64,
    pub translated: Option<SocketAddr>,
}

/// Lookups that could not be made, for the agent's log.
#[derive(Debug, Default)]
pub(crate) struct NatStats {
    pub lookups: std::sync::atomic::AtomicU64,
    pub translated: std::sync::atomic::AtomicU64,
    pub netns_unreachable: std::sync::atomic::AtomicU64,
    pub errors: std::sync::atomic::AtomicU64,
}

struct NetlinkSocket {
    fd: OwnedFd,
    seq: u32,
    last_used: Instant,
}

impl NetlinkSocket {
    /// A NETLINK_NETFILTER socket in the calling thread's current network namespace.
    fn new() -> std::io::Result<Self> {
        // SAFETY: plain socket(2); the fd is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by socket(2) and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: libc::suseconds_t::try_from(RECV_TIMEOUT.as_micros()).expect("below a second"),
        };
        // SAFETY: valid fd, option value of the size given.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                u32::try_from(size_of::<libc::timeval>()).expect("small"),
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { fd, seq: 0, last_used: Instant::now() })
    }

    fn get(&mut self, t: &Tuple) -> Result<Option<ctnetlink::Entry>, std::io::Error> {
        self.seq = self.seq.wrapping_add(1);
        self.last_used = Instant::now();
        let req = ctnetlink::get_request(t, self.seq);
        // SAFETY: valid fd and buffer; the kernel is the destination (zeroed sockaddr_nl via NULL
        // on a socket without connect: netlink sends to the kernel by default).
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
        if sent < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: valid fd and buffer of the length given.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let msg = &buf[..usize::try_from(n).expect("non-negative")];
            // Answers to earlier requests that timed out are skipped by sequence number.
            if msg.len() >= 12
                && u32::from_ne_bytes(msg[8..12].try_into().expect("4 bytes")) != self.seq
            {
                continue;
            }
            return match ctnetlink::parse_response(msg) {
                Ok(e) => Ok(Some(e)),
                Err(CtError::Errno(e)) if e == libc::ENOENT => Ok(None),
                Err(CtError::Errno(e)) => Err(std::io::Error::from_raw_os_error(e)),
                Err(e) => Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
            };
        }
    }
}

/// The worker's end: requests in, answers out (both bounded by the caller's polling).
pub(crate) struct Nat {
    pub requests: mpsc::SyncSender<Request>,
    pub answers: mpsc::Receiver<Answer>,
    pub stats: std::sync::Arc<NatStats>,
}

impl Nat {
    /// Starts the worker thread. `proc_root` is the host's /proc.
    pub(crate) fn start(proc_root: PathBuf) -> std::io::Result<Self> {
        let own = File::open("/proc/thread-self/ns/net")?;
        let own_ino = inode(&own)?;
        let host = NetlinkSocket::new()?;
        let (requests, rx) = mpsc::sync_channel(QUEUE);
        let (tx, answers) = mpsc::channel();
        let stats = std::sync::Arc::new(NatStats::default());
        let worker = Worker {
            proc_root,
            own,
            own_ino,
            host,
            sockets: HashMap::new(),
            last_scan: None,
            setns_denied: false,
            stats: stats.clone(),
        };
        std::thread::Builder::new()
            .name("hopwatch-nat".into())
            .spawn(move || worker.run(&rx, &tx))?;
        Ok(Self { requests, answers, stats })
    }
}

fn inode(f: &File) -> std::io::Result<u32> {
    use std::os::unix::fs::MetadataExt as _;
    // Namespace inodes are 32-bit (proc_inum); the kernel reports them so in events.
    Ok(u32::try_from(f.metadata()?.ino()).unwrap_or(0))
}

struct Worker {
    proc_root: PathBuf,
    own: File,
    own_ino: u32,
    host: NetlinkSocket,
    sockets: HashMap<u32, NetlinkSocket>,
    last_scan: Option<Instant>,
    setns_denied: bool,
    stats: std::sync::Arc<NatStats>,
}

impl Worker {
    fn run(mut self, rx: &mpsc::Receiver<Request>, tx: &mpsc::Sender<Answer>) {
        use std::sync::atomic::Ordering::Relaxed;
        while let Ok(req) = rx.recv() {
            self.stats.lookups.fetch_add(1, Relaxed);
            let mut translated = None;
            if req.netns != 0 && req.netns != self.own_ino {
                if let Some(sock) = self.socket_for(req.netns, req.pid) {
                    match sock.get(&req.tuple) {
                        Ok(entry) => translated = entry.and_then(|e| e.translated_destination()),
                        Err(e) => self.error(&e),
                    }
                } else {
                    self.stats.netns_unreachable.fetch_add(1, Relaxed);
                }
            }
            if translated.is_none() {
                match self.host.get(&req.tuple) {
                    Ok(entry) => translated = entry.and_then(|e| e.translated_destination()),
                    Err(e) => self.error(&e),
                }
            }
            if translated.is_some() {
                self.stats.translated.fetch_add(1, Relaxed);
            }
            if tx.send(Answer { cookie: req.cookie, translated }).is_err() {
                return;
            }
            let now = Instant::now();
            self.sockets.retain(|_, s| now.duration_since(s.last_used) < SOCKET_IDLE);
        }
    }

    fn error(&self, e: &std::io::Error) {
        if self.stats.errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed) == 0 {
            tracing::warn!(error = %e, "conntrack lookup failed (is nf_conntrack loaded, and the agent allowed CAP_NET_ADMIN?); further failures are counted");
        }
    }

    /// The socket for namespace `netns`, creating it through a process in it.
    fn socket_for(&mut self, netns: u32, pid: u32) -> Option<&mut NetlinkSocket> {
        if self.setns_denied {
            return None;
        }
        if !self.sockets.contains_key(&netns) {
            let ns = self.open_netns(netns, pid)?;
            if self.sockets.len() >= MAX_SOCKETS {
                let oldest = self.sockets.iter().min_by_key(|(_, s)| s.last_used).map(|(k, _)| *k);
                if let Some(k) = oldest {
                    self.sockets.remove(&k);
                }
            }
            let sock = self.create_in(&ns)?;
            self.sockets.insert(netns, sock);
        }
        self.sockets.get_mut(&netns)
    }

    /// Creates a netlink socket inside `ns` and returns to the agent's namespace.
    fn create_in(&mut self, ns: &File) -> Option<NetlinkSocket> {
        // SAFETY: setns on this dedicated thread only; both fds are valid namespace files.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EPERM) {
                self.setns_denied = true;
                tracing::warn!(
                    "cannot enter other network namespaces (CAP_SYS_ADMIN is needed): address translations are looked up in the host's connection table only"
                );
            }
            return None;
        }
        let sock = NetlinkSocket::new();
        // SAFETY: as above; returning to the namespace this thread started in.
        let back = unsafe { libc::setns(self.own.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(
            back,
            0,
            "cannot return to the agent's network namespace: {}",
            std::io::Error::last_os_error()
        );
        sock.ok()
    }

    /// A handle on namespace `netns`: through `pid` when it is still in it, else the first process
    /// or `ip netns` name found in it (a short-lived client may have exited already).
    fn open_netns(&mut self, netns: u32, pid: u32) -> Option<File> {
        let matches =
            |path: PathBuf| File::open(path).ok().filter(|f| inode(f).is_ok_and(|i| i == netns));
        if pid != 0
            && let Some(f) = matches(self.proc_root.join(format!("{pid}/ns/net")))
        {
            return Some(f);
        }
        if self.last_scan.is_some_and(|t| t.elapsed() < SCAN_GAP) {
            return None;
        }
        self.last_scan = Some(Instant::now());
        let mut named = ["/run/netns", "/var/run/netns", "/run/docker/netns"]
            .into_iter()
            .filter_map(|d| std::fs::read_dir(d).ok())
            .flatten()
            .flatten()
            .map(|e| e.path());
        let procs = std::fs::read_dir(&self.proc_root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
            })
            .map(|e| e.path().join("ns/net"));
        let want = format!("net:[{netns}]");
        named.find_map(matches).or_else(|| {
            procs
                .filter(|p| std::fs::read_link(p).is_ok_and(|l| l.as_os_str() == want.as_str()))
                .find_map(matches)
        })
    }
}
