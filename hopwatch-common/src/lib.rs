//! Types shared by hopwatch's kernel programs (`hopwatch-ebpf`) and its userspace agent.
//!
//! Every kernel→user event is `#[repr(C)]`, `Copy`, has explicit padding, starts with an
//! [`EventHeader`] and has its size pinned by a compile-time assertion, so that the two sides can
//! never silently disagree on the layout. Flags are integers, never `bool` or `Option`.
#![no_std]
#![expect(
    clippy::pub_underscore_fields,
    reason = "explicit padding fields must be public for struct literals on both sides"
)]

pub mod detect;
pub mod exchange;
pub mod maps;

use core::mem::size_of;

/// What an event in the events ring buffer is; the first field of every [`EventHeader`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A [`TcpEvent`]: a TCP connection changed state or reported its counters.
    Tcp = 1,
    /// A [`DropEvent`]: the kernel freed a packet with a drop reason.
    Drop = 2,
    /// A [`DataEvent`] followed by captured payload bytes: application data a socket sent or
    /// received (from a syscall, or plaintext from a TLS library).
    Data = 3,
    /// An [`exchange::ExchangeEvent`] (possibly followed by the request's head and the
    /// response's first bytes): one request/response exchange measured in the kernel.
    Exchange = 4,
}

impl EventKind {
    #[must_use]
    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::Tcp),
            2 => Some(Self::Drop),
            3 => Some(Self::Data),
            4 => Some(Self::Exchange),
            _ => None,
        }
    }
}

/// The common first part of every event.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct EventHeader {
    /// An [`EventKind`] as `u32`.
    pub kind: u32,
    /// CPU the event was produced on.
    pub cpu: u32,
    /// `CLOCK_MONOTONIC` nanoseconds (`bpf_ktime_get_ns`).
    pub timestamp_ns: u64,
    /// Thread id of the task the event is attributed to (0 when none, e.g. in softirq).
    pub pid: u32,
    /// Process id (thread-group id) of that task.
    pub tgid: u32,
    /// cgroup v2 id of that task.
    pub cgroup_id: u64,
    /// Kernel socket cookie (`bpf_get_socket_cookie`), 0 when the event has no socket.
    pub socket_cookie: u64,
}
const _: () = assert!(size_of::<EventHeader>() == 40);
// Userspace reads the header of any record to learn its kind: the layout is the contract.
const _: () = {
    use core::mem::offset_of;
    assert!(offset_of!(EventHeader, kind) == 0);
    assert!(offset_of!(EventHeader, cpu) == 4);
    assert!(offset_of!(EventHeader, timestamp_ns) == 8);
    assert!(offset_of!(EventHeader, pid) == 16);
    assert!(offset_of!(EventHeader, tgid) == 20);
    assert!(offset_of!(EventHeader, cgroup_id) == 24);
    assert!(offset_of!(EventHeader, socket_cookie) == 32);
};

/// Address families as the kernel numbers them.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
/// IP protocol numbers.
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

/// A connection or packet 5-tuple plus the network namespace it was seen in.
///
/// Addresses are in network byte order; IPv4 addresses occupy the first four bytes. Ports are in
/// host byte order. For TCP connections `s*` is the local end and `d*` the remote end.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tuple {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u16,
    /// IP protocol number (`IPPROTO_*`).
    pub protocol: u8,
    pub _pad0: u8,
    /// Inode number of the network namespace (`/proc/<pid>/ns/net`), 0 if unknown.
    pub netns: u32,
    pub _pad1: u32,
}
const _: () = assert!(size_of::<Tuple>() == 48);

/// What happened to a TCP connection; [`TcpEvent::op`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpOp {
    /// Client side: the handshake completed (`SYN_SENT → ESTABLISHED`).
    Connected = 1,
    /// Client side: the handshake failed (`SYN_SENT → CLOSE`); see [`TcpEvent::error`].
    ConnectFailed = 2,
    /// Server side: a connection to a listening socket was established (`SYN_RECV → ESTABLISHED`).
    Accepted = 3,
    /// An established connection closed; carries the final counters.
    Closed = 4,
    /// A long-lived connection's periodic report of its counters so far.
    Update = 5,
}

impl TcpOp {
    #[must_use]
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Connected),
            2 => Some(Self::ConnectFailed),
            3 => Some(Self::Accepted),
            4 => Some(Self::Closed),
            5 => Some(Self::Update),
            _ => None,
        }
    }
}

/// Which end of the connection this host's socket is.
pub const ROLE_UNKNOWN: u8 = 0;
/// The socket called `connect()`.
pub const ROLE_CLIENT: u8 = 1;
/// The socket was created by a listening socket (`accept()` side).
pub const ROLE_SERVER: u8 = 2;

/// [`ConnState::flags`] / [`TcpEvent::flags`] bits.
pub const CONN_F_RESET_IN_SYN_SENT: u32 = 1 << 0;
/// The `sock_ops` program has seen this socket, so the [`TcpStats`] are live.
pub const CONN_F_STATS_VALID: u32 = 1 << 1;
/// The connection existed before hopwatch started (first seen mid-life).
pub const CONN_F_PREEXISTING: u32 = 1 << 2;
/// The peer's FIN arrived: it consumed one sequence number that `bytes_received` counts.
pub const CONN_F_FIN_IN: u32 = 1 << 3;
/// Our FIN was acknowledged: it consumed one sequence number that `bytes_acked` counts.
pub const CONN_F_FIN_OUT_ACKED: u32 = 1 << 4;

/// TCP counters of one socket, as `sock_ops` reports them (stable UAPI `struct bpf_sock_ops`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpStats {
    /// Smoothed RTT in microseconds (already unscaled: the kernel keeps it `<< 3`).
    pub srtt_us: u32,
    /// Segments retransmitted over the connection's life (`total_retrans`).
    pub total_retrans: u32,
    /// Bytes of our data the peer acknowledged (RFC 4898 `tcpEStatsAppHCThruOctetsAcked`).
    pub bytes_acked: u64,
    /// Bytes received in order (RFC 4898 `tcpEStatsAppHCThruOctetsReceived`).
    pub bytes_received: u64,
    pub segs_in: u32,
    pub segs_out: u32,
    /// RSTs this socket sent (from the `tcp_send_reset` tracepoint).
    pub resets_sent: u32,
    /// RSTs this socket received (from the `tcp_receive_reset` tracepoint).
    pub resets_received: u32,
    /// Retransmissions seen by the `tcp_retransmit_skb` tracepoint (also for sockets `sock_ops`
    /// never saw).
    pub retransmit_events: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<TcpStats>() == 48);

/// Kernel-side state of one tracked TCP socket, keyed by socket cookie in
/// [`maps::CONNS`](crate::maps::CONNS).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnState {
    /// `SYN_SENT` time for clients, `ESTABLISHED` time for servers (monotonic ns).
    pub start_ns: u64,
    /// Handshake duration for clients, 0 for servers.
    pub connect_latency_ns: u64,
    /// Last time an [`TcpOp::Update`] was emitted (monotonic ns).
    pub last_report_ns: u64,
    pub cgroup_id: u64,
    pub pid: u32,
    pub tgid: u32,
    pub comm: [u8; 16],
    pub stats: TcpStats,
    pub flags: u32,
    pub role: u8,
    pub _pad: u8,
    /// Local port as seen when the connection was set up: a failed connect has released it by
    /// the time its socket closes.
    pub sport: u16,
}
const _: () = assert!(size_of::<ConnState>() == 112);

/// A TCP connection event ([`EventKind::Tcp`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TcpEvent {
    pub header: EventHeader,
    pub tuple: Tuple,
    /// Command name of the owning process (NUL-padded).
    pub comm: [u8; 16],
    pub stats: TcpStats,
    /// When the connection started (see [`ConnState::start_ns`]).
    pub start_ns: u64,
    pub connect_latency_ns: u64,
    /// `sk_err` at the time of the event (e.g. `ECONNREFUSED`, `ETIMEDOUT`), 0 if none.
    pub error: u32,
    /// `CONN_F_*` bits.
    pub flags: u32,
    /// A [`TcpOp`] as `u8`.
    pub op: u8,
    /// `ROLE_*`.
    pub role: u8,
    /// TCP states (`TCP_ESTABLISHED` = 1, ...) before and after the transition.
    pub old_state: u8,
    pub new_state: u8,
    pub _pad: [u8; 4],
}
const _: () = assert!(size_of::<TcpEvent>() == 184);
const _: () = assert!(core::mem::offset_of!(TcpEvent, header) == 0);

/// A packet the kernel dropped ([`EventKind::Drop`]), from `skb:kfree_skb`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DropEvent {
    pub header: EventHeader,
    /// Addresses and ports as found in the packet (source = sender of the packet).
    pub tuple: Tuple,
    /// Kernel text address of the function that freed the packet.
    pub location: u64,
    /// `enum skb_drop_reason` value; its name is read from this kernel's BTF.
    pub reason: u32,
    /// Interface the packet was on (0 if none).
    pub ifindex: u32,
    /// `skb->len`.
    pub len: u32,
    /// ICMP type and code for ICMP packets.
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// `DROP_F_*` bits.
    pub flags: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<DropEvent>() == 112);
const _: () = assert!(core::mem::offset_of!(DropEvent, header) == 0);

/// [`DropEvent::flags`]: the packet's headers could not be read (tuple is empty).
pub const DROP_F_NO_HEADERS: u8 = 1 << 0;

/// Per-CPU counters the kernel side keeps about itself, indices into
/// [`maps::COUNTERS`](crate::maps::COUNTERS). Userspace sums them over CPUs and exports them.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// An event could not be reserved in the ring buffer (buffer full): the event is lost.
    RingbufFull = 0,
    /// A kernel memory read failed; the event was sent with fields missing or dropped.
    ReadFailed = 1,
    /// A `CONNS` insert failed.
    ConnMapFull = 2,
    /// Drop events skipped in the kernel: their reason is on the ignore list, or the packet is
    /// not IP (ARP, unix sockets).
    DropIgnored = 3,
    /// Drop events not sent because the drop-rate limit was hit.
    DropRateLimited = 4,
    /// TCP state transitions seen.
    TcpStateChanges = 5,
    /// `kfree_skb` calls seen.
    KfreeSkbCalls = 6,
    /// `sock_ops` callbacks run.
    SockOpsCalls = 7,
    /// Data events sent to userspace.
    DataEvents = 8,
    /// Messages larger than the capture size (only their prefix was sent).
    DataTruncated = 9,
    /// Connections given up as carrying no known protocol.
    L7Ignored = 10,
    /// Socket I/O not from a syscall hopwatch reads buffers of (io_uring, sendfile, kernel).
    L7UnsupportedCall = 11,
    /// TLS plaintext that could not be tied to a socket (dropped).
    TlsUnassociated = 12,
    /// Events put in the ring buffer (all kinds). With [`Counter::RingbufFull`] it is every event
    /// the programs produced, so userspace can prove it read all the others.
    EventsSent = 13,
    /// Exchanges measured on the kernel's fast path ([`EventKind::Exchange`] records sent).
    KernelExchanges = 14,
    /// Exchanges of the fast path given back to the capture path midway (a response that was not
    /// what the protocol allows there), so not measured: each is one exchange missing.
    ExchangeDemoted = 15,
    /// Sockets the fast path could not keep state for (socket storage refused, or a TLS
    /// connection's entry evicted from `TLS_EXCHANGES`): back on the capture path.
    ExchangeNoStorage = 16,
}

/// Number of [`Counter`] slots.
pub const COUNTER_COUNT: u32 = 17;

impl Counter {
    pub const ALL: [Counter; COUNTER_COUNT as usize] = [
        Counter::RingbufFull,
        Counter::ReadFailed,
        Counter::ConnMapFull,
        Counter::DropIgnored,
        Counter::DropRateLimited,
        Counter::TcpStateChanges,
        Counter::KfreeSkbCalls,
        Counter::SockOpsCalls,
        Counter::DataEvents,
        Counter::DataTruncated,
        Counter::L7Ignored,
        Counter::L7UnsupportedCall,
        Counter::TlsUnassociated,
        Counter::EventsSent,
        Counter::KernelExchanges,
        Counter::ExchangeDemoted,
        Counter::ExchangeNoStorage,
    ];

    /// Name as exported by the agent.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Counter::RingbufFull => "ringbuf_full",
            Counter::ReadFailed => "read_failed",
            Counter::ConnMapFull => "conn_map_full",
            Counter::DropIgnored => "drop_ignored",
            Counter::DropRateLimited => "drop_rate_limited",
            Counter::TcpStateChanges => "tcp_state_changes",
            Counter::KfreeSkbCalls => "kfree_skb_calls",
            Counter::SockOpsCalls => "sock_ops_calls",
            Counter::DataEvents => "data_events",
            Counter::DataTruncated => "data_truncated",
            Counter::L7Ignored => "l7_ignored_connections",
            Counter::L7UnsupportedCall => "l7_unsupported_calls",
            Counter::TlsUnassociated => "tls_unassociated",
            Counter::EventsSent => "events_sent",
            Counter::KernelExchanges => "kernel_exchanges",
            Counter::ExchangeDemoted => "exchange_demoted",
            Counter::ExchangeNoStorage => "exchange_no_storage",
        }
    }
}

/// Kernel struct field offsets, computed by userspace from `/sys/kernel/btf/vmlinux` and handed to
/// the programs as the global [`OFFSETS_GLOBAL`] (Rust eBPF has no CO-RE relocations).
///
/// `u16::MAX` marks a field this kernel does not have.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    // struct sock / struct sock_common
    pub sk_daddr: u16,
    pub sk_rcv_saddr: u16,
    pub sk_dport: u16,
    pub sk_num: u16,
    pub sk_family: u16,
    pub sk_net: u16,
    pub sk_v6_daddr: u16,
    pub sk_v6_rcv_saddr: u16,
    pub sk_protocol: u16,
    /// Size in bytes of `sk_protocol` (it was a bitfield before 5.6; we need 1 or 2).
    pub sk_protocol_size: u16,
    pub sk_err: u16,
    // struct net → ns.inum
    pub net_inum: u16,
    // struct sk_buff
    pub skb_head: u16,
    pub skb_network_header: u16,
    pub skb_transport_header: u16,
    pub skb_protocol: u16,
    pub skb_len: u16,
    pub skb_dev: u16,
    pub skb_sk: u16,
    // struct net_device
    pub dev_ifindex: u16,
    pub dev_nd_net: u16,
    // struct pt_regs: the syscall's arguments and number, as saved at syscall entry
    pub regs_di: u16,
    pub regs_si: u16,
    pub regs_dx: u16,
    pub regs_r10: u16,
    pub regs_r8: u16,
    pub regs_orig_ax: u16,
    // fd → socket, for the syscall capture path: `task_struct.files` → `files_struct.fdt` →
    // `fdtable.{max_fds, fd}[fd]` → `file.{f_inode → inode.i_mode, private_data}` →
    // `socket.sk`; and the socket's cookie as the kernel keeps it.
    pub task_files: u16,
    pub files_fdt: u16,
    pub fdt_max_fds: u16,
    pub fdt_fd: u16,
    pub file_inode: u16,
    pub file_private_data: u16,
    pub inode_mode: u16,
    pub socket_sk: u16,
    pub sk_cookie: u16,
}
const _: () = assert!(size_of::<KernelOffsets>() == 72);

/// Name of the global holding [`KernelOffsets`] in the kernel object.
pub const OFFSETS_GLOBAL: &str = "HOPWATCH_OFFSETS";

/// Runtime settings handed to the kernel programs as the global [`SETTINGS_GLOBAL`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelSettings {
    /// Minimum interval between two [`TcpOp::Update`] events of one connection (ns).
    pub update_interval_ns: u64,
    /// Drop events sent per CPU per second at most; the rest are counted.
    pub drops_per_sec_per_cpu: u32,
    /// The agent's own process id, whose sockets are not traced (0: trace everything).
    pub self_tgid: u32,
    /// Payload bytes copied per message (at most [`DATA_MAX`]); 0 disables L7 capture.
    pub capture_bytes: u32,
    /// Exchanges of the kernel's fast path recorded in full per CPU per second before sampling
    /// (0: all); see [`exchange`].
    pub exchange_rate_per_cpu: u32,
    /// Fast-path exchanges at least this slow (ns) are recorded in full.
    pub exchange_slow_ns: u64,
    /// Beyond the rate, one exchange in this many is recorded in full ([`exchange::sample_key`]).
    pub exchange_sample: u32,
    /// Request tracing's kernel side, bits: [`TRACE_THREADS`] keeps which request each thread
    /// serves ([`ThreadRequest`]), [`TRACE_COROUTINES`] also stamps Python coroutines
    /// ([`PyStep`]); 0: off.
    pub trace_threads: u32,
}
const _: () = assert!(size_of::<KernelSettings>() == 40);

impl Default for KernelSettings {
    fn default() -> Self {
        Self {
            update_interval_ns: 5_000_000_000,
            drops_per_sec_per_cpu: 1000,
            self_tgid: 0,
            capture_bytes: 512,
            exchange_rate_per_cpu: 0,
            exchange_slow_ns: u64::MAX,
            exchange_sample: 1,
            trace_threads: TRACE_THREADS,
        }
    }
}

/// This architecture's numbers for the syscalls whose buffers L7 capture reads, handed over by
/// userspace (from libc) as the global [`SYSCALLS_GLOBAL`]. `u32::MAX` for one the architecture
/// lacks.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyscallNumbers {
    pub read: u32,
    pub write: u32,
    pub readv: u32,
    pub writev: u32,
    pub sendto: u32,
    pub recvfrom: u32,
    pub sendmsg: u32,
    pub recvmsg: u32,
    pub sendmmsg: u32,
    pub recvmmsg: u32,
}
const _: () = assert!(size_of::<SyscallNumbers>() == 40);

/// Name of the global holding [`SyscallNumbers`] in the kernel object.
pub const SYSCALLS_GLOBAL: &str = "HOPWATCH_SYSCALLS";

/// Most payload bytes one [`DataEvent`] carries.
pub const DATA_MAX: usize = 1024;

/// [`DataEvent::direction`]: the socket sent the bytes.
pub const DIR_EGRESS: u8 = 1;
/// [`DataEvent::direction`]: the socket received the bytes.
pub const DIR_INGRESS: u8 = 2;

/// [`DataEvent::source`]: read from the syscall's buffer.
pub const SRC_SYSCALL: u8 = 0;
/// [`DataEvent::source`]: plaintext at a TLS library call (`SSL_read`/`SSL_write`).
pub const SRC_TLS: u8 = 1;

/// The kernel's guess of a connection's protocol from its first bytes ([`L7Conn::proto`],
/// [`DataEvent::protocol`]).
pub const PROTO_UNKNOWN: u8 = 0;
pub const PROTO_HTTP: u8 = 1;
pub const PROTO_POSTGRES: u8 = 2;
pub const PROTO_REDIS: u8 = 3;
pub const PROTO_MYSQL: u8 = 4;
pub const PROTO_DNS: u8 = 5;
/// TLS records on the wire: the syscall data is ciphertext, plaintext comes from uprobes.
pub const PROTO_TLS: u8 = 6;
/// Nothing recognisable in the first messages: not captured any more.
pub const PROTO_IGNORED: u8 = 7;
/// A TLS connection whose handshake is under way: its records (ClientHello, ServerHello,
/// alerts, the client's first encrypted record) are sent to userspace as [`PROTO_TLS`] data
/// events until the handshake is over at this end or [`TLS_HANDSHAKE_MESSAGES`] were sent, then
/// the connection is [`PROTO_TLS`]. [`L7Conn::attempts`] counts the messages sent and
/// [`L7Conn::last_direction`] is the direction of the ClientHello at this socket.
pub const PROTO_TLS_HANDSHAKE: u8 = 8;
/// Messages of a TLS handshake sent at most: a full TLS 1.2 handshake is about 17 calls at the
/// client when records are read header then body (as OpenSSL reads them).
pub const TLS_HANDSHAKE_MESSAGES: u8 = 32;

/// Messages inspected before a connection's protocol is given up as unknown.
pub const DETECT_ATTEMPTS: u8 = 3;

/// Per-socket L7 state, socket cookie → this, in [`maps::L7CONNS`](crate::maps::L7CONNS).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct L7Conn {
    pub proto: u8,
    /// Messages seen while the protocol was still unknown.
    pub attempts: u8,
    /// The connection is TLS: plaintext arrives from uprobes.
    pub tls: u8,
    /// Protocol detected in the TLS plaintext.
    pub inner: u8,
    /// The connection's addresses went out with an earlier data event.
    pub tuple_sent: u8,
    /// Set by userspace: exchanges are measured on the kernel's fast path ([`exchange`]), at the
    /// socket layer ([`FAST_SOCKET`]) or in the TLS probes ([`FAST_TLS`]); 0: not.
    pub fast: u8,
    /// Set with `fast`: this socket is the server end (it receives the requests).
    pub server: u8,
    /// Direction of the last message: [`DIR_EGRESS`], [`DIR_INGRESS`] or 0.
    pub last_direction: u8,
    /// Times the direction of the data changed (see [`exchange`]).
    pub turns: u32,
    /// Set with `fast`: an exchange index and the `turns` its response started at.
    pub anchor_turns: u32,
    pub anchor_index: u64,
    /// Thread that read the request this socket is serving, until its response starts (server
    /// sockets; see [`ThreadRequest`]). 0: none in progress.
    pub owner_tid: u32,
    /// A `ROLE_*`: which end of the connection this socket is, from the first message seen
    /// (requests come from the client).
    pub role: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<L7Conn>() == 32);

impl L7Conn {
    /// Applies userspace's promotion `p`: exchanges are measured by the engine `fast`
    /// ([`FAST_SOCKET`] or [`FAST_TLS`]) from now on.
    #[inline]
    pub fn promote(&mut self, p: &exchange::Promotion, fast: u8) {
        self.fast = fast;
        self.server = p.server;
        self.anchor_index = p.anchor_index;
        self.anchor_turns = p.anchor_turns;
    }
}

/// [`L7Conn::fast`]: the socket's exchanges are measured by the socket-layer hooks.
pub const FAST_SOCKET: u8 = 1;
/// [`L7Conn::fast`]: the TLS connection's exchanges are measured by the TLS probes.
pub const FAST_TLS: u8 = 2;

/// The inbound request a thread is serving: kept per thread id in
/// [`maps::THREAD_REQUESTS`](crate::maps::THREAD_REQUESTS) and copied into the first event of
/// each request the thread sends on a client socket, so userspace can tell which request an
/// outbound call was made for (request tracing's thread causality).
///
/// A server socket's request start (its first request-direction call after a response) sets the
/// thread's `cookie`/`turns` and adds one to `inflight`; the response's start (by any thread)
/// takes one from the reading thread's `inflight`. A thread that serves one request at a time
/// (thread- or process-per-request servers) has `inflight` 1 while it calls out for it; an
/// event loop interleaving requests has more, and its calls cannot be attributed this way.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadRequest {
    /// Socket cookie of the server socket whose request the thread read last; 0 once that
    /// request's response started (the thread may still serve others: which is not known).
    pub cookie: u64,
    /// [`L7Conn::turns`] of that socket at the request's first call.
    pub turns: u32,
    /// How the request was found: [`CALLER_THREAD`] (this thread read it), [`CALLER_NGINX`]
    /// (nginx named the request its upstream request serves) or [`CALLER_COROUTINE`] (`cookie`
    /// is the asyncio task's coroutine instead).
    pub method: u16,
    /// 1 when the request is recorded in full by the deterministic rules (its socket is on the
    /// capture path, or its exchange is the sample's: [`exchange::sample_key`]): the calls made
    /// for it are recorded with it (sampling is per trace).
    pub recorded: u16,
    /// Requests read by the thread whose responses have not started (64 bits: the BPF target's
    /// atomics are 64-bit).
    pub inflight: u64,
}
const _: () = assert!(size_of::<ThreadRequest>() == 24);

/// [`ThreadRequest::method`]: the calling thread's own request (thread causality).
pub const CALLER_THREAD: u16 = 0;
/// [`KernelSettings::trace_threads`]: thread causality (and nginx's upstream requests).
pub const TRACE_THREADS: u32 = 1;
/// [`KernelSettings::trace_threads`]: asyncio coroutine identity (the Python uprobes).
pub const TRACE_COROUTINES: u32 = 2;

/// [`ThreadRequest::method`]: nginx's upstream request for its downstream request, read from
/// nginx's own structures at `ngx_chain_writer` (exact on its event loop; see
/// [`maps::NGINX_UPSTREAMS`](crate::maps::NGINX_UPSTREAMS)).
pub const CALLER_NGINX: u16 = 1;
/// [`ThreadRequest::method`]: the message was written while the thread stepped an asyncio task
/// whose coroutine object is at `cookie` ([`PyStep`]); `inflight` is the thread's, `turns` 0. On
/// a client socket's request start it names the coroutine that made the call; on a server
/// socket's response start, the coroutine that answered the request. Userspace links the two
/// when the call falls inside that request (one object cannot be two live coroutines at once).
pub const CALLER_COROUTINE: u16 = 2;

/// The asyncio task step a Python thread is in, per thread id in
/// [`maps::PY_STEPS`](crate::maps::PY_STEPS): `_asyncio`'s task step resumes the task's
/// coroutine with `PyIter_Send`, which is also how awaits inside it resume theirs, so the
/// outermost of the nested calls (depth 0 → 1) names the task's coroutine and the step ends when
/// it returns.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyStep {
    /// The coroutine the outermost `PyIter_Send` resumed (0: none seen).
    pub coro: u64,
    /// `PyIter_Send` calls in progress on the thread (0: not in a step).
    pub depth: u64,
}
const _: () = assert!(size_of::<PyStep>() == 16);

/// Application data seen on a socket ([`EventKind::Data`]); `captured` payload bytes follow the
/// struct in the ring buffer record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DataEvent {
    pub header: EventHeader,
    /// Local (`s*`) and remote (`d*`) ends; for unconnected UDP the remote end comes from the
    /// syscall's address argument.
    pub tuple: Tuple,
    /// Bytes the call transferred.
    pub len: u32,
    /// Bytes of them captured after this struct (a prefix, at most the configured size).
    pub captured: u32,
    /// [`DIR_EGRESS`] or [`DIR_INGRESS`].
    pub direction: u8,
    /// [`SRC_SYSCALL`] or [`SRC_TLS`].
    pub source: u8,
    /// `PROTO_*` as detected by the kernel.
    pub protocol: u8,
    pub _pad: u8,
    /// [`L7Conn::turns`] after this message (the exchange engine's clock).
    pub turns: u32,
    pub comm: [u8; 16],
    /// On the first message of a request sent from a client socket: the inbound request the
    /// sending thread was serving. Zero otherwise.
    pub caller: ThreadRequest,
}
const _: () = assert!(size_of::<DataEvent>() == 144);
const _: () = assert!(core::mem::offset_of!(DataEvent, header) == 0);

/// Name of the global holding [`KernelSettings`] in the kernel object.
pub const SETTINGS_GLOBAL: &str = "HOPWATCH_SETTINGS";

/// Size of the drop-reason ignore bitmap ([`maps::DROP_IGNORE`](crate::maps::DROP_IGNORE)):
/// reasons ≥ this are never ignored.
pub const DROP_REASON_MAX: u32 = 1024;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are `#[repr(C)]`, `Copy`, made only of integers and integer arrays, with
    // every padding byte an explicit field, so any bit pattern is a valid value.
    unsafe impl aya::Pod for super::EventHeader {}
    unsafe impl aya::Pod for super::Tuple {}
    unsafe impl aya::Pod for super::TcpStats {}
    unsafe impl aya::Pod for super::ConnState {}
    unsafe impl aya::Pod for super::TcpEvent {}
    unsafe impl aya::Pod for super::DropEvent {}
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::KernelSettings {}
    unsafe impl aya::Pod for super::SyscallNumbers {}
    unsafe impl aya::Pod for super::L7Conn {}
    unsafe impl aya::Pod for super::DataEvent {}
    unsafe impl aya::Pod for super::ThreadRequest {}
    unsafe impl aya::Pod for super::exchange::ExchangeEvent {}
    unsafe impl aya::Pod for super::exchange::Promotion {}
}
