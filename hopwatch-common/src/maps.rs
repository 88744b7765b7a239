//! Map names and capacities, used by both sides so they cannot drift apart.

/// Ring buffer carrying every [`crate::TcpEvent`] and [`crate::DropEvent`] to userspace.
pub const EVENTS: &str = "EVENTS";
/// Size of [`EVENTS`] in bytes (a power of two, multiple of the page size). 8 MiB holds about
/// 40k TCP events: several seconds of a connection flood at the rates one node sees.
pub const EVENTS_BYTES: u32 = 8 << 20;

/// Per-socket state, socket cookie → [`crate::ConnState`]. LRU: a socket whose close we never see
/// (agent started mid-life, or a lost event) is evicted instead of leaking.
pub const CONNS: &str = "CONNS";
pub const CONNS_ENTRIES: u32 = 262_144;

/// Listening sockets, [`ListenKey`] → owning process ([`crate::ConnState`] with only the process
/// fields set), used to name the process of server-side connections. LRU for the same reason.
pub const LISTENERS: &str = "LISTENERS";
pub const LISTENERS_ENTRIES: u32 = 16_384;

/// Per-CPU [`crate::Counter`] array.
pub const COUNTERS: &str = "COUNTERS";

/// Bitmap of `skb_drop_reason` values not worth reporting (e.g. `NOT_SPECIFIED`), filled by
/// userspace from the configured names. Array of `u32` words, [`crate::DROP_REASON_MAX`] bits.
pub const DROP_IGNORE: &str = "DROP_IGNORE";
pub const DROP_IGNORE_WORDS: u32 = crate::DROP_REASON_MAX / 32;

/// Per-CPU drop-event rate limiter state: `[window_start_ns, sent_in_window]`.
pub const DROP_RATE: &str = "DROP_RATE";

/// Per-socket L7 state, socket cookie → [`crate::L7Conn`]. LRU: sockets closing unseen.
pub const L7CONNS: &str = "L7CONNS";
pub const L7CONNS_ENTRIES: u32 = 262_144;

/// Sockets userspace promoted to the exchange engine's fast path and the kernel has not seen
/// since, socket cookie → [`crate::exchange::Promotion`]. LRU: a socket may close first.
pub const PROMOTIONS: &str = "PROMOTIONS";
pub const PROMOTIONS_ENTRIES: u32 = 16_384;

/// The exchange in progress on each promoted TLS connection, socket cookie →
/// [`crate::exchange::ExchangeState`]: the TLS probes have no socket for socket storage. LRU,
/// removed at the close; a promoted connection whose entry was evicted goes back to the capture
/// path (counted as `exchange_no_storage`). 8192 × 560 bytes: 4.6 MB of kernel memory.
pub const TLS_EXCHANGES: &str = "TLS_EXCHANGES";
pub const TLS_EXCHANGES_ENTRIES: u32 = 8_192;

/// The inbound request each thread is serving, thread id → [`crate::ThreadRequest`]. LRU:
/// every thread that ever served a request leaves an entry.
pub const THREAD_REQUESTS: &str = "THREAD_REQUESTS";
pub const THREAD_REQUESTS_ENTRIES: u32 = 65_536;

/// The asyncio task step each Python thread is in, thread id → [`crate::PyStep`], kept by the
/// uprobe and return probe on `PyIter_Send`. LRU: every thread that ever stepped a coroutine
/// leaves an entry.
pub const PY_STEPS: &str = "PY_STEPS";
pub const PY_STEPS_ENTRIES: u32 = 65_536;

/// nginx upstream sockets about to send a request, upstream socket cookie → the downstream
/// request it serves ([`crate::ThreadRequest`] with [`crate::CALLER_NGINX`]), set by the uprobe
/// on `ngx_chain_writer` and taken by the upstream socket's next request. LRU: a write that
/// starts no request (a body's later chunks) leaves its entry until the next one replaces it.
pub const NGINX_UPSTREAMS: &str = "NGINX_UPSTREAMS";
pub const NGINX_UPSTREAMS_ENTRIES: u32 = 16_384;

/// Threads inside `SSL_read`/`SSL_write`, pid_tgid → the call's arguments. LRU: a thread that
/// dies inside a call leaves its entry behind.
pub const TLS_CALLS: &str = "TLS_CALLS";
pub const TLS_CALLS_ENTRIES: u32 = 16_384;

/// OpenSSL `SSL*` → socket cookie, learnt from the socket I/O inside an SSL call. LRU.
pub const SSL_SOCKETS: &str = "SSL_SOCKETS";
pub const SSL_SOCKETS_ENTRIES: u32 = 65_536;

/// `sendmmsg`/`recvmmsg` position per thread: which message of the vector the next socket call
/// is for. LRU: every thread that ever used them leaves an entry.
pub const MMSG_CURSORS: &str = "MMSG_CURSORS";
pub const MMSG_CURSORS_ENTRIES: u32 = 16_384;

/// Socket calls in progress on the syscall capture path, pid_tgid → the call's socket and
/// buffers, saved at `sys_enter_*` for `sys_exit_*`. LRU: a thread that dies inside a call (or a
/// call the exit hook never sees) leaves its entry behind.
pub const PENDING_CALLS: &str = "PENDING_CALLS";
pub const PENDING_CALLS_ENTRIES: u32 = 16_384;

/// Program array of the syscall path's tail calls: slot 0 its exit program (which tail-calls
/// itself for each further message of a `sendmmsg`/`recvmmsg`), slot 1 its protocol detection.
pub const SYSCALL_TAILS: &str = "SYSCALL_TAILS";

/// Program array of the TLS return probe's tail call: slot 0 `ssl_exchange`, which measures a
/// promoted TLS connection's exchange (its own program: older verifiers give up on the engine's
/// branches multiplied by the capture path's).
pub const TLS_TAILS: &str = "TLS_TAILS";

/// Key of [`LISTENERS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenKey {
    pub netns: u32,
    pub port: u16,
    pub family: u16,
}
const _: () = assert!(core::mem::size_of::<ListenKey>() == 8);

#[cfg(feature = "user")]
// SAFETY: `#[repr(C)]`, integers only, no implicit padding.
unsafe impl aya::Pod for ListenKey {}
