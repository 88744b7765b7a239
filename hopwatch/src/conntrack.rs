//! The connection table: socket cookie → what we know about a TCP connection (addresses, network
//! namespace, owning process, role), bounded in size.
//!
//! It lets later events name both ends: a periodic update carries no network namespace, a drop
//! carries no process, and a connection between two namespaces on this node shows up as two
//! sockets whose processes each flow can name.

use std::{
    collections::hash_map::Entry,
    hash::{Hash as _, Hasher as _},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use hopwatch_common::{ROLE_CLIENT, ROLE_SERVER, TcpEvent, TcpOp, Tuple};
use hopwatch_proto::compact::Compact as _;
use rustc_hash::{FxHashMap, FxHashSet, FxHasher};

use crate::events::addrs;

/// Which end of the connection the traced socket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Called `connect()`.
    Client,
    /// Accepted from a listening socket.
    Server,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Process {
    pub pid: u32,
    pub comm: Comm,
    pub cgroup_id: u64,
}

/// A task's command name as the kernel keeps it (at most 15 bytes), inline: no allocation per
/// connection or event. Bytes that are not UTF-8 are replaced, as far as the room allows.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Comm {
    len: u8,
    bytes: [u8; 15],
}

impl Comm {
    /// From the kernel's NUL-padded `comm`.
    #[must_use]
    pub fn from_raw(raw: &[u8; 16]) -> Self {
        Self::from(String::from_utf8_lossy(trim_nul(raw)).as_ref())
    }
}

impl From<&str> for Comm {
    /// The longest prefix of `s` that fits, cut at a character boundary.
    fn from(s: &str) -> Self {
        let mut len = s.len().min(15);
        while !s.is_char_boundary(len) {
            len -= 1;
        }
        let mut bytes = [0; 15];
        bytes[..len].copy_from_slice(&s.as_bytes()[..len]);
        Self { len: u8::try_from(len).unwrap_or(15), bytes }
    }
}

impl std::ops::Deref for Comm {
    type Target = str;
    fn deref(&self) -> &str {
        // Built from a `&str` cut at a character boundary.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl std::fmt::Display for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self)
    }
}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&**self, f)
    }
}

/// A socket address in 20 bytes: a `SocketAddr` takes 32 for an IPv6 flow label and scope that
/// connections here never carry (at 200k sockets, 6 MiB).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Addr {
    ip: IpAddr,
    port: u16,
}

impl From<SocketAddr> for Addr {
    fn from(a: SocketAddr) -> Self {
        Self { ip: a.ip(), port: a.port() }
    }
}

impl From<Addr> for SocketAddr {
    fn from(a: Addr) -> Self {
        SocketAddr::new(a.ip, a.port)
    }
}

/// A tracked connection, seen from its local socket.
#[derive(Debug, Clone)]
pub struct Conn {
    pub cookie: u64,
    local: Addr,
    remote: Addr,
    pub netns: u32,
    pub role: Role,
    /// Shared by the connections of one process (the table keeps one copy of each): 8 bytes a
    /// connection, not 40.
    pub process: Option<Arc<Process>>,
    /// Monotonic ns of the last event for this connection.
    pub last_seen_ns: u64,
    /// Monotonic ns the connection was established (connected or accepted); 0 when it was
    /// first seen later (it predates the agent, or its table entry was evicted).
    pub opened_ns: u64,
}

impl Conn {
    /// Builds the connection an event describes. `None` if its addresses are unusable.
    #[must_use]
    pub fn from_event(ev: &TcpEvent) -> Option<Self> {
        let (l, r) = addrs(&ev.tuple)?;
        let role = match ev.role {
            ROLE_CLIENT => Role::Client,
            ROLE_SERVER => Role::Server,
            // Started before hopwatch: guess from the ports. Servers listen on the lower port;
            // clients get an ephemeral one.
            _ if ev.tuple.sport < ev.tuple.dport => Role::Server,
            _ => Role::Client,
        };
        let process = (ev.header.tgid != 0).then(|| {
            Arc::new(Process {
                pid: ev.header.tgid,
                comm: Comm::from_raw(&ev.comm),
                cgroup_id: ev.header.cgroup_id,
            })
        });
        Some(Self {
            cookie: ev.header.socket_cookie,
            local: Addr { ip: l, port: ev.tuple.sport },
            remote: Addr { ip: r, port: ev.tuple.dport },
            netns: ev.tuple.netns,
            role,
            process,
            last_seen_ns: ev.header.timestamp_ns,
            opened_ns: match TcpOp::from_u8(ev.op) {
                Some(TcpOp::Connected | TcpOp::Accepted) => ev.header.timestamp_ns,
                _ => 0,
            },
        })
    }

    /// This socket's address.
    #[must_use]
    pub fn local(&self) -> SocketAddr {
        self.local.into()
    }

    /// The address of the other end.
    #[must_use]
    pub fn remote(&self) -> SocketAddr {
        self.remote.into()
    }
}

/// 80 bytes: at 200k sockets the table's buckets are most of the agent's memory.
const _: () = assert!(std::mem::size_of::<Conn>() == 80);

/// A bounded cookie → [`Conn`] table with an address index.
pub(crate) struct ConnTable {
    // Keyed by kernel socket cookies and addresses the kernel reported: a fast non-keyed hash.
    conns: FxHashMap<u64, Conn>,
    /// The address index: a hash of (local, remote) → a cookie, and in `more_by_addr` any
    /// others with the same hash (namespaces reusing addresses, loopback; or a collision).
    /// Lookups compare the connection's own addresses. 16 bytes a connection, not the 88 of an
    /// index keyed by the addresses themselves (which at 200k sockets was about 25 MiB).
    by_addr: FxHashMap<u64, u64>,
    more_by_addr: FxHashMap<u64, Vec<u64>>,
    /// One copy of each owning process the connections point to (those no connection points
    /// to any more go in [`ConnTable::compact`]).
    processes: FxHashSet<Arc<Process>>,
    capacity: usize,
    /// Connections not tracked because the table was full.
    pub overflow: u64,
}

impl ConnTable {
    #[must_use]
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            conns: FxHashMap::default(),
            by_addr: FxHashMap::default(),
            more_by_addr: FxHashMap::default(),
            processes: FxHashSet::default(),
            capacity,
            overflow: 0,
        }
    }

    #[cfg(test)]
    pub(crate) fn tracked(&self) -> usize {
        self.conns.len()
    }

    pub(crate) fn get(&self, cookie: u64) -> Option<&Conn> {
        self.conns.get(&cookie)
    }

    /// Records the process doing I/O on a tracked connection as its owner (without allocating
    /// when it already is).
    pub(crate) fn note_process(
        &mut self,
        cookie: u64,
        pid: u32,
        raw_comm: &[u8; 16],
        cgroup_id: u64,
    ) {
        let Some(conn) = self.conns.get(&cookie) else { return };
        let same = conn.process.as_ref().is_some_and(|p| {
            p.pid == pid && p.cgroup_id == cgroup_id && p.comm == Comm::from_raw(raw_comm)
        });
        if !same {
            let process =
                self.share(Arc::new(Process { pid, comm: Comm::from_raw(raw_comm), cgroup_id }));
            if let Some(conn) = self.conns.get_mut(&cookie) {
                conn.process = Some(process);
            }
        }
    }

    /// The table's copy of `process` (this one, when it is the first).
    fn share(&mut self, process: Arc<Process>) -> Arc<Process> {
        if let Some(shared) = self.processes.get(&*process) {
            return shared.clone();
        }
        self.processes.insert(process.clone());
        process
    }

    /// Applies a TCP event; returns the connection as known after the event (for `Closed` and
    /// `ConnectFailed`, the entry just removed).
    pub(crate) fn apply(&mut self, ev: &TcpEvent) -> Option<Conn> {
        let cookie = ev.header.socket_cookie;
        match TcpOp::from_u8(ev.op)? {
            TcpOp::Connected | TcpOp::Accepted => {
                let conn = Conn::from_event(ev)?;
                self.insert(conn.clone());
                Some(conn)
            }
            TcpOp::Update => {
                if let Some(c) = self.conns.get_mut(&cookie) {
                    c.last_seen_ns = ev.header.timestamp_ns;
                    return Some(c.clone());
                }
                // First sight of a connection older than the table entry (or evicted): track it
                // from what the update carries.
                let conn = Conn::from_event(ev)?;
                self.insert(conn.clone());
                Some(conn)
            }
            TcpOp::Closed | TcpOp::ConnectFailed => {
                self.remove(cookie).or_else(|| Conn::from_event(ev))
            }
        }
    }

    fn insert(&mut self, mut conn: Conn) {
        if !self.conns.contains_key(&conn.cookie) && self.conns.len() >= self.capacity {
            self.overflow += 1;
            return;
        }
        conn.process = conn.process.take().map(|p| self.share(p));
        // A socket connected anew (after a failed connect) is indexed by its new addresses.
        self.remove(conn.cookie);
        let (key, cookie) = (addr_key(conn.local, conn.remote), conn.cookie);
        match self.by_addr.entry(key) {
            Entry::Vacant(e) => {
                e.insert(cookie);
            }
            Entry::Occupied(_) => self.more_by_addr.entry(key).or_default().push(cookie),
        }
        self.conns.insert(cookie, conn);
    }

    fn remove(&mut self, cookie: u64) -> Option<Conn> {
        let conn = self.conns.remove(&cookie)?;
        let key = addr_key(conn.local, conn.remote);
        let more = self.more_by_addr.get_mut(&key);
        if self.by_addr.get(&key) == Some(&cookie) {
            // The first goes: one of the others (if any) takes its place.
            match more.and_then(Vec::pop) {
                Some(next) => self.by_addr.insert(key, next),
                None => self.by_addr.remove(&key),
            };
        } else if let Some(others) = more {
            others.retain(|c| *c != cookie);
        }
        if self.more_by_addr.get(&key).is_some_and(Vec::is_empty) {
            self.more_by_addr.remove(&key);
        }
        Some(conn)
    }

    /// The socket at the other end of `conn`, when it is also on this node.
    #[must_use]
    pub(crate) fn peer(&self, conn: &Conn) -> Option<&Conn> {
        self.find(conn.remote(), conn.local(), conn.netns).filter(|p| p.cookie != conn.cookie)
    }

    /// A local socket whose local end is `local` and remote end `remote`. Loopback addresses are
    /// only matched within `netns` (every namespace has its own 127.0.0.1).
    #[must_use]
    pub(crate) fn find(&self, local: SocketAddr, remote: SocketAddr, netns: u32) -> Option<&Conn> {
        let key = addr_key(local, remote);
        let first = self.by_addr.get(&key)?;
        let others = self.more_by_addr.get(&key).map_or(&[][..], Vec::as_slice);
        let loopback = is_loopback(local.ip());
        std::iter::once(first).chain(others).filter_map(|c| self.conns.get(c)).find(|c| {
            c.local() == local
                && c.remote() == remote
                && (!loopback || netns == 0 || c.netns == netns)
        })
    }

    /// Gives back the room of connections gone (after a burst of them).
    pub(crate) fn compact(&mut self) {
        self.conns.compact();
        self.by_addr.compact();
        self.more_by_addr.compact();
        self.processes.retain(|p| Arc::strong_count(p) > 1);
        self.processes.compact();
    }

    /// Drops the connections not seen since `before_ns` (monotonic) that `alive` says the kernel
    /// no longer has: their close was among the events the kernel could not hand over (a full
    /// ring buffer). Returns their cookies.
    pub(crate) fn forget_gone(&mut self, before_ns: u64, alive: impl Fn(u64) -> bool) -> Vec<u64> {
        self.remove_where(|c| c.last_seen_ns < before_ns && !alive(c.cookie))
    }

    /// Drops connections not seen since `before_ns` (monotonic); returns how many.
    pub(crate) fn sweep(&mut self, before_ns: u64) -> usize {
        self.remove_where(|c| c.last_seen_ns < before_ns).len()
    }

    /// Removes the connections `pick` selects; returns their cookies.
    fn remove_where(&mut self, pick: impl Fn(&Conn) -> bool) -> Vec<u64> {
        let picked: Vec<u64> = self.conns.values().filter(|c| pick(c)).map(|c| c.cookie).collect();
        for cookie in &picked {
            self.remove(*cookie);
        }
        picked
    }
}

fn trim_nul(raw: &[u8; 16]) -> &[u8] {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    &raw[..end]
}

/// The address index's key for a (local, remote) pair.
fn addr_key(local: impl Into<SocketAddr>, remote: impl Into<SocketAddr>) -> u64 {
    let mut h = FxHasher::default();
    let pair: (SocketAddr, SocketAddr) = (local.into(), remote.into());
    pair.hash(&mut h);
    h.finish()
}

fn is_loopback(ip: IpAddr) -> bool {
    ip.is_loopback()
}

/// A tuple's endpoints as socket addresses (source, destination).
#[must_use]
pub(crate) fn endpoints(t: &Tuple) -> Option<(SocketAddr, SocketAddr)> {
    let (s, d) = addrs(t)?;
    Some((SocketAddr::new(s, t.sport), SocketAddr::new(d, t.dport)))
}

#[cfg(test)]
mod tests {
    use hopwatch_common::{AF_INET, EventKind};

    use super::*;

    fn event(
        op: TcpOp,
        cookie: u64,
        role: u8,
        local: ([u8; 4], u16),
        remote: ([u8; 4], u16),
    ) -> TcpEvent {
        let mut ev = TcpEvent::default();
        ev.header.kind = EventKind::Tcp as u32;
        ev.header.socket_cookie = cookie;
        ev.header.tgid = 100 + u32::try_from(cookie).unwrap();
        ev.comm[..4].copy_from_slice(b"proc");
        ev.op = op as u8;
        ev.role = role;
        ev.tuple.family = AF_INET;
        ev.tuple.saddr[..4].copy_from_slice(&local.0);
        ev.tuple.sport = local.1;
        ev.tuple.daddr[..4].copy_from_slice(&remote.0);
        ev.tuple.dport = remote.1;
        ev.tuple.netns = 7;
        ev
    }

    const A: [u8; 4] = [10, 0, 0, 1];
    const B: [u8; 4] = [10, 0, 0, 2];

    #[test]
    fn pairs_the_two_ends_of_a_local_connection() {
        let mut t = ConnTable::new(10);
        let client =
            t.apply(&event(TcpOp::Connected, 1, ROLE_CLIENT, (A, 40000), (B, 80))).unwrap();
        let server = t.apply(&event(TcpOp::Accepted, 2, ROLE_SERVER, (B, 80), (A, 40000))).unwrap();
        assert_eq!(t.peer(&client).unwrap().cookie, 2);
        assert_eq!(t.peer(&server).unwrap().process.as_ref().unwrap().pid, 101);
        let closed = t.apply(&event(TcpOp::Closed, 1, ROLE_CLIENT, (A, 40000), (B, 80))).unwrap();
        assert_eq!(closed.role, Role::Client);
        assert_eq!(t.tracked(), 1);
        assert!(t.peer(&server).is_none());
    }

    #[test]
    fn the_connections_of_one_process_share_one_copy_of_it_until_none_is_left() {
        let mut t = ConnTable::new(10);
        let connect = |t: &mut ConnTable, cookie: u64, tgid: u32| {
            let mut ev = event(TcpOp::Connected, cookie, ROLE_CLIENT, (A, 40000), (B, 80));
            ev.tuple.sport += u16::try_from(cookie).unwrap();
            ev.header.tgid = tgid;
            t.apply(&ev);
        };
        let shared = |t: &ConnTable, a: u64, b: u64| {
            let p = |c| t.get(c).and_then(|c| c.process.clone()).expect("a process");
            Arc::ptr_eq(&p(a), &p(b))
        };
        connect(&mut t, 1, 7);
        connect(&mut t, 2, 7);
        connect(&mut t, 3, 8);
        assert!(shared(&t, 1, 2));
        assert!(!shared(&t, 1, 3));
        assert_eq!(t.processes.len(), 2);
        // Connection 3 turns out to be process 7's (it did the I/O): the same copy.
        let mut comm = [0; 16];
        comm[..4].copy_from_slice(b"proc");
        t.note_process(3, 7, &comm, 0);
        assert!(shared(&t, 1, 3));
        t.compact();
        assert_eq!(t.processes.len(), 1, "process 8 has no connection left");
        for cookie in 1..=3 {
            t.apply(&event(TcpOp::Closed, cookie, ROLE_CLIENT, (A, 40000), (B, 80)));
        }
        t.compact();
        assert!(t.processes.is_empty());
    }

    #[test]
    fn is_bounded_and_counts_what_it_cannot_keep() {
        let mut t = ConnTable::new(2);
        for cookie in 1..=5 {
            t.apply(&event(
                TcpOp::Connected,
                cookie,
                ROLE_CLIENT,
                (A, 40000 + u16::try_from(cookie).unwrap()),
                (B, 80),
            ));
        }
        assert_eq!(t.tracked(), 2);
        assert_eq!(t.overflow, 3);
    }

    #[test]
    fn guesses_the_role_of_preexisting_connections_from_ports() {
        let ev = event(TcpOp::Closed, 9, 0, (A, 5432), (B, 51000));
        assert_eq!(Conn::from_event(&ev).unwrap().role, Role::Server);
    }

    #[test]
    fn sweeps_idle_connections() {
        let mut t = ConnTable::new(10);
        let mut ev = event(TcpOp::Connected, 1, ROLE_CLIENT, (A, 40000), (B, 80));
        ev.header.timestamp_ns = 5;
        t.apply(&ev);
        assert_eq!(t.sweep(4), 0);
        assert_eq!(t.sweep(6), 1);
        assert_eq!(t.tracked(), 0);
    }

    #[test]
    fn forgets_only_quiet_connections_the_kernel_no_longer_has() {
        let mut t = ConnTable::new(10);
        for (cookie, port, at) in [(1, 40000, 5), (2, 40001, 5), (3, 40002, 50)] {
            let mut ev = event(TcpOp::Connected, cookie, ROLE_CLIENT, (A, port), (B, 80));
            ev.header.timestamp_ns = at;
            t.apply(&ev);
        }
        // 1: gone from the kernel and quiet; 2: still in the kernel; 3: gone, but just seen.
        let gone = t.forget_gone(10, |cookie| cookie == 2);
        assert_eq!(gone, [1]);
        assert!(t.get(1).is_none() && t.get(2).is_some() && t.get(3).is_some());
        assert!(t.find(SocketAddr::from((A, 40000)), SocketAddr::from((B, 80)), 0).is_none());
    }

    #[test]
    fn a_comm_is_kept_inline_as_text() {
        let raw = |b: &[u8]| {
            let mut r = [0u8; 16];
            r[..b.len()].copy_from_slice(b);
            r
        };
        assert_eq!(&*Comm::from_raw(&raw(b"nginx")), "nginx");
        assert_eq!(&*Comm::from_raw(&raw(b"0123456789abcde")), "0123456789abcde");
        // Not UTF-8: replaced, then cut at a character boundary within the room.
        assert_eq!(&*Comm::from_raw(&raw(b"worker\xff")), "worker\u{fffd}");
        assert_eq!(&*Comm::from_raw(&raw(b"0123456789abc\xff")), "0123456789abc");
        assert_eq!(format!("{:?}", Comm::from("py")), "\"py\"");
        assert!(size_of::<Conn>() <= 112, "a connection's entry in the table");
    }

    #[test]
    fn finds_each_namespace_s_socket_among_those_sharing_addresses() {
        const LO: [u8; 4] = [127, 0, 0, 1];
        let (local, remote) = (SocketAddr::from((LO, 40000)), SocketAddr::from((LO, 80)));
        let mut t = ConnTable::new(10);
        for (cookie, netns) in [(1, 7), (2, 8), (3, 9)] {
            let mut ev = event(TcpOp::Connected, cookie, ROLE_CLIENT, (LO, 40000), (LO, 80));
            ev.tuple.netns = netns;
            t.apply(&ev);
        }
        let in_ns = |t: &ConnTable, netns| t.find(local, remote, netns).map(|c| c.cookie);
        assert_eq!((in_ns(&t, 7), in_ns(&t, 8), in_ns(&t, 9)), (Some(1), Some(2), Some(3)));
        // The first indexed goes; the others stay found, each in its own namespace.
        t.apply(&event(TcpOp::Closed, 1, ROLE_CLIENT, (LO, 40000), (LO, 80)));
        assert_eq!((in_ns(&t, 7), in_ns(&t, 8), in_ns(&t, 9)), (None, Some(2), Some(3)));
        t.apply(&event(TcpOp::Closed, 3, ROLE_CLIENT, (LO, 40000), (LO, 80)));
        assert_eq!((in_ns(&t, 8), in_ns(&t, 9)), (Some(2), None));
        // A socket that connects anew (after a failed connect) is found by its new addresses.
        t.apply(&event(TcpOp::Connected, 2, ROLE_CLIENT, (A, 40001), (B, 80)));
        assert_eq!(in_ns(&t, 8), None);
        let moved = t.find(SocketAddr::from((A, 40001)), SocketAddr::from((B, 80)), 0);
        assert_eq!(moved.map(|c| c.cookie), Some(2));
        assert!(t.by_addr.len() == 1 && t.more_by_addr.is_empty(), "the index holds no leftovers");
    }
}
