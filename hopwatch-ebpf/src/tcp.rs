//! TCP connection lifecycle from BTF tracepoints.
//!
//! Why these hooks: `sock:inet_sock_set_state` is the kernel's stable tracepoint for every TCP
//! state change (4.16+), in every network namespace, IPv4 and IPv6; `tcp:tcp_retransmit_skb`,
//! `tcp:tcp_send_reset` and `tcp:tcp_receive_reset` are stable too (4.15+, 4.15+, 4.15+). We
//! attach them as `tp_btf` (5.5+) rather than classic tracepoints because the typed `struct sock *`
//! argument lets us ask for the socket cookie (`bpf_get_socket_cookie`), the key every other part
//! of hopwatch uses, and read `sk_err` and the network namespace at BTF-derived offsets.
//!
//! The process owning a client socket is the task calling `connect()` (the `CLOSE → SYN_SENT`
//! transition runs in its context). Server-side sockets are created in softirq context, so they
//! take the process of their listening socket, recorded at `listen()`.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use hopwatch_common::{
    CONN_F_FIN_IN, CONN_F_FIN_OUT_ACKED, CONN_F_PREEXISTING, CONN_F_RESET_IN_SYN_SENT, ConnState,
    Counter, IPPROTO_TCP, ROLE_CLIENT, ROLE_SERVER, TcpEvent, TcpOp, Tuple, maps::ListenKey,
};

use crate::{
    emit::{fill_from_conn, reserve, wakeup_flags},
    kernel::{
        Mem, current_process, load_at, offset, read_sock_tuple, sock_protocol, socket_cookie,
    },
    maps::{CONNS, HOPWATCH_SETTINGS, L7CONNS, LISTENERS, count},
};

// include/net/tcp_states.h
pub const TCP_ESTABLISHED: i32 = 1;
pub const TCP_SYN_SENT: i32 = 2;
pub const TCP_SYN_RECV: i32 = 3;
pub const TCP_FIN_WAIT1: i32 = 4;
pub const TCP_FIN_WAIT2: i32 = 5;
pub const TCP_CLOSE: i32 = 7;
pub const TCP_CLOSE_WAIT: i32 = 8;
pub const TCP_LAST_ACK: i32 = 9;
pub const TCP_LISTEN: i32 = 10;
pub const TCP_CLOSING: i32 = 11;

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: BtfTracePointContext) -> i32 {
    let sk: *const c_void = ctx.arg(0);
    let old: i32 = ctx.arg(1);
    let new: i32 = ctx.arg(2);
    // SAFETY: `sk` is the tracepoint's `struct sock *`, valid for the duration of the call.
    unsafe { on_state_change(sk, old, new) };
    0
}

/// # Safety
///
/// `sk` is the tracepoint's `struct sock *` (see [`socket_cookie`]).
unsafe fn on_state_change(sk: *const c_void, old: i32, new: i32) {
    count(Counter::TcpStateChanges);
    let skb = sk.cast::<u8>();
    // MPTCP's parent socket and SCTP share this tracepoint; their subflows are plain TCP.
    // SAFETY: `sk` is the tracepoint's socket (the caller's contract), typed.
    if unsafe { sock_protocol(Mem::Typed, skb) } != Some(u16::from(IPPROTO_TCP)) {
        return;
    }
    // SAFETY: as above.
    let cookie = unsafe { socket_cookie(sk) };
    note_fin(cookie, old, new);
    match (old, new) {
        (TCP_CLOSE, TCP_SYN_SENT) => on_connect_start(cookie),
        (TCP_SYN_SENT, TCP_ESTABLISHED) => {
            // SAFETY: no arguments.
            let now = unsafe { bpf_ktime_get_ns() };
            if let Some(c) = CONNS.get_ptr_mut(cookie) {
                // SAFETY: map value pointer, valid until this program returns.
                unsafe { (*c).connect_latency_ns = now.saturating_sub((*c).start_ns) };
            }
            // SAFETY: as above.
            unsafe { emit(TcpOp::Connected, skb, cookie, old, new, 0) };
        }
        (TCP_SYN_SENT, TCP_CLOSE) => {
            // SAFETY: as above.
            unsafe {
                let err = load_at::<i32>(skb, offset!(sk_err)).unwrap_or(0);
                emit(TcpOp::ConnectFailed, skb, cookie, old, new, err as u32);
            }
            let _ = CONNS.remove(cookie);
        }
        // SAFETY: as above.
        (_, TCP_LISTEN) => unsafe { on_listen(skb) },
        (TCP_LISTEN, TCP_CLOSE) => {
            // SAFETY: as above.
            let key = unsafe { listen_key(skb) };
            let _ = LISTENERS.remove(key);
        }
        // A child of a listening socket is born in SYN_RECV (cloned from the listener, so the
        // tracepoint shows the listener's state as `old`). Track it now: sock_ops' passive
        // established callback runs before the move to ESTABLISHED.
        // SAFETY: as above.
        (_, TCP_SYN_RECV) => unsafe { on_child_created(skb, cookie) },
        // SAFETY: as above.
        (TCP_SYN_RECV, TCP_ESTABLISHED) => unsafe {
            emit(TcpOp::Accepted, skb, cookie, old, new, 0);
        },
        (
            TCP_ESTABLISHED | TCP_FIN_WAIT1 | TCP_FIN_WAIT2 | TCP_CLOSE_WAIT | TCP_LAST_ACK
            | TCP_CLOSING | TCP_SYN_RECV,
            TCP_CLOSE,
        ) => {
            // SAFETY: as above.
            let err = unsafe { load_at::<i32>(skb, offset!(sk_err)) }.unwrap_or(0);
            // SAFETY: map value, copied out at once.
            if let Some(c) = unsafe { L7CONNS.get(cookie) }.copied() {
                // SAFETY: as above.
                unsafe { crate::exchange::on_close(sk, cookie, &c) };
                crate::causality::on_close(&c, cookie);
            }
            // SAFETY: as above.
            unsafe { emit(TcpOp::Closed, skb, cookie, old, new, err as u32) };
            let _ = CONNS.remove(cookie);
        }
        _ => {}
    }
}

/// Records which FINs consumed a sequence number, so userspace can report payload bytes only.
/// Peer FIN: ESTABLISHED→CLOSE_WAIT, FIN_WAIT1→CLOSING, FIN_WAIT2→CLOSE (time-wait). Our FIN
/// acknowledged: FIN_WAIT1→FIN_WAIT2, CLOSING→CLOSE, LAST_ACK→CLOSE.
#[inline(always)]
fn note_fin(cookie: u64, old: i32, new: i32) {
    let flag = match (old, new) {
        (_, TCP_CLOSE_WAIT | TCP_CLOSING) | (TCP_FIN_WAIT2, TCP_CLOSE) => CONN_F_FIN_IN,
        (TCP_FIN_WAIT1, TCP_FIN_WAIT2) | (TCP_CLOSING | TCP_LAST_ACK, TCP_CLOSE) => {
            CONN_F_FIN_OUT_ACKED
        }
        _ => return,
    };
    if let Some(c) = CONNS.get_ptr_mut(cookie) {
        // SAFETY: map value pointer, valid until this program returns.
        unsafe { (*c).flags |= flag };
    }
}

fn on_connect_start(cookie: u64) {
    let settings = HOPWATCH_SETTINGS.load();
    if settings.self_tgid != 0 && (bpf_get_current_pid_tgid() >> 32) as u32 == settings.self_tgid {
        return;
    }
    let mut c = ConnState {
        // SAFETY: no arguments.
        start_ns: unsafe { bpf_ktime_get_ns() },
        role: ROLE_CLIENT,
        ..ConnState::default()
    };
    current_process(&mut c);
    if CONNS.insert(cookie, c, 0).is_err() {
        count(Counter::ConnMapFull);
    }
}

/// # Safety
///
/// `sk` is the tracepoint's `struct sock *` (so are the callers' below).
unsafe fn listen_key(sk: *const u8) -> ListenKey {
    let mut t = Tuple::default();
    // SAFETY: the caller's contract.
    unsafe { read_sock_tuple(Mem::Typed, sk, &mut t) };
    ListenKey { netns: t.netns, port: t.sport, family: t.family }
}

unsafe fn on_listen(sk: *const u8) {
    // SAFETY: the caller's contract.
    let key = unsafe { listen_key(sk) };
    let mut c = ConnState::default();
    current_process(&mut c);
    if LISTENERS.insert(key, c, 0).is_err() {
        count(Counter::ConnMapFull);
    }
}

unsafe fn on_child_created(sk: *const u8, cookie: u64) {
    // SAFETY: the caller's contract.
    let mut key = unsafe { listen_key(sk) };
    let mut c = ConnState {
        // SAFETY: no arguments.
        start_ns: unsafe { bpf_ktime_get_ns() },
        role: ROLE_SERVER,
        ..ConnState::default()
    };
    // SAFETY: map value, copied out immediately.
    let listener = unsafe { LISTENERS.get(key) }.copied().or_else(|| {
        // An IPv4 connection to a dual-stack (`[::]`) listener has an AF_INET child.
        key.family = hopwatch_common::AF_INET6;
        // SAFETY: map value, copied out immediately.
        unsafe { LISTENERS.get(key) }.copied()
    });
    if let Some(l) = listener {
        c.pid = l.pid;
        c.tgid = l.tgid;
        c.cgroup_id = l.cgroup_id;
        c.comm = l.comm;
    }
    if CONNS.insert(cookie, c, 0).is_err() {
        count(Counter::ConnMapFull);
    }
}

/// Sends a [`TcpEvent`] for `sk`, taking process, timing and counters from its `CONNS` entry.
///
/// # Safety
///
/// `sk` is the tracepoint's `struct sock *`.
#[inline(always)]
unsafe fn emit(op: TcpOp, sk: *const u8, cookie: u64, old: i32, new: i32, error: u32) {
    // SAFETY: no arguments.
    let Some(mut entry) = reserve::<TcpEvent>(unsafe { bpf_ktime_get_ns() }, cookie) else {
        return;
    };
    // SAFETY: `reserve` initialised every byte of the slot.
    let e = unsafe { entry.assume_init_mut() };
    e.op = op as u8;
    e.old_state = old as u8;
    e.new_state = new as u8;
    e.error = error;
    e.tuple.protocol = IPPROTO_TCP;
    // SAFETY: the caller's contract.
    unsafe { read_sock_tuple(Mem::Typed, sk, &mut e.tuple) };
    // SAFETY: map value, only copied from (`fill_from_conn`, `sport`) before this program returns.
    match unsafe { CONNS.get(cookie) } {
        Some(c) => {
            fill_from_conn(e, c);
            if e.tuple.sport == 0 {
                e.tuple.sport = c.sport;
            }
        }
        None => e.flags = CONN_F_PREEXISTING,
    }
    entry.submit(wakeup_flags());
}

#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn tcp_retransmit_skb(ctx: BtfTracePointContext) -> i32 {
    let sk: *const c_void = ctx.arg(0);
    // SAFETY: `sk` is the tracepoint's `struct sock *`.
    unsafe { with_conn(sk, |c| c.stats.retransmit_events += 1) };
    0
}

#[btf_tracepoint(function = "tcp_send_reset")]
pub fn tcp_send_reset(ctx: BtfTracePointContext) -> i32 {
    // `sk` is NULL for resets answering a segment no socket owns (the drop tracepoint reports
    // those as NO_SOCKET drops).
    let sk: *const c_void = ctx.arg(0);
    if sk.is_null() {
        return 0;
    }
    // SAFETY: `sk` is the tracepoint's `struct sock *`, and not NULL.
    unsafe { with_conn(sk, |c| c.stats.resets_sent += 1) };
    0
}

#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn tcp_receive_reset(ctx: BtfTracePointContext) -> i32 {
    let sk: *const c_void = ctx.arg(0);
    // SAFETY: `sk` is the tracepoint's `struct sock *`.
    unsafe {
        with_conn(sk, |c| {
            c.stats.resets_received += 1;
            if c.role == ROLE_CLIENT && c.connect_latency_ns == 0 {
                c.flags |= CONN_F_RESET_IN_SYN_SENT;
            }
        });
    }
    0
}

/// Runs `f` on the tracked state of `sk`, if it is tracked.
///
/// # Safety
///
/// `sk` is a tracepoint's `struct sock *` (see [`socket_cookie`]).
#[inline(always)]
unsafe fn with_conn(sk: *const c_void, f: impl FnOnce(&mut ConnState)) {
    // SAFETY: `sk` is a tracepoint's socket argument (the caller's contract).
    let cookie = unsafe { socket_cookie(sk) };
    if let Some(c) = CONNS.get_ptr_mut(cookie) {
        // SAFETY: map value pointer, valid until the program returns.
        f(unsafe { &mut *c });
    }
}
