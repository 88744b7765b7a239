//! Every map the programs use, sized by the constants in `hopwatch_common::maps`, and the globals
//! userspace fills in at load time.

use aya_ebpf::{
    Global,
    btf_maps::SkStorage,
    macros::{btf_map, map},
    maps::{Array, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
};
use hopwatch_common::{
    COUNTER_COUNT, ConnState, Counter, DATA_MAX, DataEvent, KernelOffsets, KernelSettings, L7Conn,
    PyStep, SyscallNumbers, TRACE_THREADS, ThreadRequest,
    exchange::{ExchangeState, Promotion},
    maps::{
        CONNS_ENTRIES, DROP_IGNORE_WORDS, EVENTS_BYTES, L7CONNS_ENTRIES, LISTENERS_ENTRIES,
        ListenKey, MMSG_CURSORS_ENTRIES, NGINX_UPSTREAMS_ENTRIES, PENDING_CALLS_ENTRIES,
        PROMOTIONS_ENTRIES, PY_STEPS_ENTRIES, SSL_SOCKETS_ENTRIES, THREAD_REQUESTS_ENTRIES,
        TLS_CALLS_ENTRIES, TLS_EXCHANGES_ENTRIES,
    },
};

#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

#[map]
pub static CONNS: LruHashMap<u64, ConnState> = LruHashMap::with_max_entries(CONNS_ENTRIES, 0);

#[map]
pub static LISTENERS: LruHashMap<ListenKey, ConnState> =
    LruHashMap::with_max_entries(LISTENERS_ENTRIES, 0);

/// Events committed on this CPU, for `emit::wakeup_flags`.
#[map]
pub static WAKEUP_CHECKS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

#[map]
pub static DROP_IGNORE: Array<u32> = Array::with_max_entries(DROP_IGNORE_WORDS, 0);

/// `[window_start_ns, sent_in_window]` per CPU.
#[map]
pub static DROP_RATE: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub static L7CONNS: LruHashMap<u64, L7Conn> = LruHashMap::with_max_entries(L7CONNS_ENTRIES, 0);

/// The fast path's exchange in progress, per promoted socket (freed with the socket).
#[btf_map]
pub static EXCHANGES: SkStorage<ExchangeState> = SkStorage::new();

/// When a connection's next periodic report is due (monotonic ns), so that `sock_ops`' RTT
/// callback, which runs for most ACKs, reads the counters only then.
#[btf_map]
pub static TCP_REPORTS: SkStorage<u64> = SkStorage::new();

#[map]
pub static PROMOTIONS: LruHashMap<u64, Promotion> =
    LruHashMap::with_max_entries(PROMOTIONS_ENTRIES, 0);

/// See `hopwatch_common::maps::TLS_EXCHANGES`.
#[map]
pub static TLS_EXCHANGES: LruHashMap<u64, ExchangeState> =
    LruHashMap::with_max_entries(TLS_EXCHANGES_ENTRIES, 0);

/// A zeroed [`ExchangeState`] to insert from (it does not fit on the stack).
#[map]
pub static EXCHANGE_SCRATCH: PerCpuArray<ExchangeState> = PerCpuArray::with_max_entries(1, 0);

/// `[0]`: non-zero while someone follows the flows (every exchange is recorded in full).
#[map]
pub static EXCHANGE_CONTROL: Array<u32> = Array::with_max_entries(1, 0);

/// `[second, exchanges recorded in full in it]` per CPU.
#[map]
pub static EXCHANGE_TOKENS: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

/// The arguments of an `SSL_read`/`SSL_write` call in progress on a thread.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TlsCall {
    pub ssl: u64,
    pub buf: u64,
    /// `size_t *` out-parameter of the `_ex` variants, 0 for the plain ones.
    pub out_len: u64,
    /// Learnt from socket I/O inside the call (or remembered for this `SSL*`).
    pub cookie: u64,
    /// Monotonic ns of the last socket I/O inside the call: when a write's bytes left (its
    /// return can come much later, if the writer is preempted by the reader it woke) or a read's
    /// arrived. 0: none (the data was buffered).
    pub io_ns: u64,
    pub direction: u8,
    pub _pad: [u8; 7],
}

/// See `hopwatch_common::maps::NGINX_UPSTREAMS`.
#[map]
pub static NGINX_UPSTREAMS: LruHashMap<u64, ThreadRequest> =
    LruHashMap::with_max_entries(NGINX_UPSTREAMS_ENTRIES, 0);

/// See `hopwatch_common::maps::THREAD_REQUESTS`.
#[map]
pub static THREAD_REQUESTS: LruHashMap<u32, ThreadRequest> =
    LruHashMap::with_max_entries(THREAD_REQUESTS_ENTRIES, 0);

/// See `hopwatch_common::maps::PY_STEPS`.
#[map]
pub static PY_STEPS: LruHashMap<u32, PyStep> = LruHashMap::with_max_entries(PY_STEPS_ENTRIES, 0);

/// LRU: a thread that dies inside an SSL call never reaches the return probe; with a plain hash
/// map such leftovers would fill it and new calls would lose their plaintext without a trace.
#[map]
pub static TLS_CALLS: LruHashMap<u64, TlsCall> = LruHashMap::with_max_entries(TLS_CALLS_ENTRIES, 0);

#[map]
pub static SSL_SOCKETS: LruHashMap<u64, u64> = LruHashMap::with_max_entries(SSL_SOCKETS_ENTRIES, 0);

/// Position in a `sendmmsg`/`recvmmsg` vector: `[vector address, next index, length]`. LRU:
/// entries are never removed (a thread's last call leaves one behind, e.g. every process that
/// resolved a name with glibc, which sends its A and AAAA queries with one `sendmmsg`); a full
/// plain hash map would refuse new threads, whose later messages would then be captured from the
/// first message's buffer.
#[map]
pub static MMSG_CURSORS: LruHashMap<u64, [u64; 3]> =
    LruHashMap::with_max_entries(MMSG_CURSORS_ENTRIES, 0);

/// A socket call in progress on the syscall capture path, as `sys_enter_*` saw it.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PendingCall {
    /// The `struct sock *` behind the call's file descriptor (read, not a BTF pointer).
    pub sk: u64,
    pub cookie: u64,
    /// A flat buffer or the first `struct iovec`; for `sendmmsg`/`recvmmsg` the `struct mmsghdr`
    /// vector.
    pub ptr: u64,
    /// iovecs at `ptr` (0: a flat buffer); for `*mmsg` the vector's length.
    pub count: u64,
    /// `struct sockaddr *` naming the peer of a `sendto`/`sendmsg`, or 0.
    pub addr: u64,
    pub direction: u8,
    /// `ptr` is a `struct mmsghdr` vector.
    pub mmsg: u8,
    pub _pad: [u8; 2],
    /// The `struct mmsghdr` the exit hook captures next.
    pub index: u32,
}

/// The syscall path's tail calls (set by userspace after loading the programs):
/// [`TAIL_EXIT`] is `sys_exit_socket_io` itself, which tail-calls itself once per further message
/// of a `sendmmsg`/`recvmmsg`; [`TAIL_DETECT`] is `syscall_detect`, protocol detection.
#[map]
pub static SYSCALL_TAILS: ProgramArray = ProgramArray::with_max_entries(2, 0);

/// See `hopwatch_common::maps::TLS_TAILS`.
#[map]
pub static TLS_TAILS: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// What `ssl_return` hands to `ssl_exchange` (per CPU: the tail call runs on the same CPU).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TlsPlaintext {
    pub state: L7Conn,
    pub caller: ThreadRequest,
    pub cookie: u64,
    pub pid_tgid: u64,
    /// The call's buffer and the plaintext bytes it holds.
    pub buf: u64,
    pub len: u64,
    /// When the call's bytes crossed the socket (monotonic ns).
    pub ts: u64,
    pub direction: u8,
    pub _pad: [u8; 7],
}

#[map]
pub static TLS_PLAINTEXT: PerCpuArray<TlsPlaintext> = PerCpuArray::with_max_entries(1, 0);
pub const TAIL_EXIT: u32 = 0;
pub const TAIL_DETECT: u32 = 1;

/// A message handed from the syscall path's capture to `syscall_detect`.
#[map]
pub static DETECT_STASH: PerCpuArray<crate::l7::Pending> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub static PENDING_CALLS: LruHashMap<u64, PendingCall> =
    LruHashMap::with_max_entries(PENDING_CALLS_ENTRIES, 0);

/// A data event being assembled: the event, then room for twice the largest capture so that a
/// copy at any offset below `DATA_MAX` stays inside the buffer (what the verifier checks).
#[repr(C)]
pub struct DataScratch {
    pub event: DataEvent,
    pub data: [u8; 2 * DATA_MAX],
}
// `emit::output` copies the event and the first captured bytes as one record, and userspace
// reads the payload at `size_of::<DataEvent>()`: the bytes must follow the event directly.
const _: () = assert!(core::mem::offset_of!(DataScratch, event) == 0);
const _: () = assert!(core::mem::offset_of!(DataScratch, data) == size_of::<DataEvent>());

#[map]
pub static DATA_SCRATCH: PerCpuArray<DataScratch> = PerCpuArray::with_max_entries(1, 0);

#[unsafe(no_mangle)]
pub static HOPWATCH_SYSCALLS: Global<SyscallNumbers> = Global::new(SyscallNumbers {
    read: u32::MAX,
    write: u32::MAX,
    readv: u32::MAX,
    writev: u32::MAX,
    sendto: u32::MAX,
    recvfrom: u32::MAX,
    sendmsg: u32::MAX,
    recvmsg: u32::MAX,
    sendmmsg: u32::MAX,
    recvmmsg: u32::MAX,
});

#[unsafe(no_mangle)]
pub static HOPWATCH_OFFSETS: Global<KernelOffsets> = Global::new(KernelOffsets {
    sk_daddr: u16::MAX,
    sk_rcv_saddr: u16::MAX,
    sk_dport: u16::MAX,
    sk_num: u16::MAX,
    sk_family: u16::MAX,
    sk_net: u16::MAX,
    sk_v6_daddr: u16::MAX,
    sk_v6_rcv_saddr: u16::MAX,
    sk_protocol: u16::MAX,
    sk_protocol_size: 0,
    sk_err: u16::MAX,
    net_inum: u16::MAX,
    skb_head: u16::MAX,
    skb_network_header: u16::MAX,
    skb_transport_header: u16::MAX,
    skb_protocol: u16::MAX,
    skb_len: u16::MAX,
    skb_dev: u16::MAX,
    skb_sk: u16::MAX,
    dev_ifindex: u16::MAX,
    dev_nd_net: u16::MAX,
    regs_di: u16::MAX,
    regs_si: u16::MAX,
    regs_dx: u16::MAX,
    regs_r10: u16::MAX,
    regs_r8: u16::MAX,
    regs_orig_ax: u16::MAX,
    task_files: u16::MAX,
    files_fdt: u16::MAX,
    fdt_max_fds: u16::MAX,
    fdt_fd: u16::MAX,
    file_inode: u16::MAX,
    file_private_data: u16::MAX,
    inode_mode: u16::MAX,
    socket_sk: u16::MAX,
    sk_cookie: u16::MAX,
});

#[unsafe(no_mangle)]
pub static HOPWATCH_SETTINGS: Global<KernelSettings> = Global::new(KernelSettings {
    update_interval_ns: 5_000_000_000,
    drops_per_sec_per_cpu: 1000,
    self_tgid: 0,
    capture_bytes: 0,
    exchange_rate_per_cpu: 0,
    exchange_slow_ns: u64::MAX,
    exchange_sample: 1,
    trace_threads: TRACE_THREADS,
});

/// Adds one to a per-CPU counter.
#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, this program is the only writer on this CPU while it runs.
        unsafe { *slot += 1 };
    }
}
