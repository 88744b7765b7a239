//! TCP counters from `sock_ops`.
//!
//! Why this hook: `struct bpf_sock_ops` exposes srtt, retransmits and byte/segment counters as
//! stable UAPI (4.13+, counters 4.16+), so no `tcp_sock` offsets are needed. Attached to the root
//! of the cgroup v2 hierarchy it sees every TCP socket on the host, in every network namespace.
//! We ask for state callbacks (to snapshot the final counters just before the `→ CLOSE`
//! tracepoint fires, which reads them) and RTT callbacks (to emit a periodic [`TcpOp::Update`]
//! for long-lived connections, at most once per configured interval). The RTT callback runs for
//! most ACKs, so on an established connection it only checks when the socket's next report is
//! due ([`TCP_REPORTS`], socket storage) and reads the counters then.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{
        BPF_SK_STORAGE_GET_F_CREATE, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RTT_CB, BPF_SOCK_OPS_RTT_CB_FLAG,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
    },
    helpers::{
        bpf_ktime_get_ns,
        generated::{bpf_get_socket_cookie, bpf_sk_storage_get},
    },
    macros::sock_ops,
    programs::SockOpsContext,
};
use hopwatch_common::{
    AF_INET, AF_INET6, CONN_F_FIN_IN, CONN_F_FIN_OUT_ACKED, CONN_F_STATS_VALID, ConnState, Counter,
    IPPROTO_TCP, TcpEvent, TcpOp,
};

use crate::{
    emit::{fill_from_conn, reserve, wakeup_flags},
    maps::{CONNS, HOPWATCH_SETTINGS, TCP_REPORTS, count},
};

#[sock_ops]
pub fn hopwatch_sockops(ctx: SockOpsContext) -> u32 {
    count(Counter::SockOpsCalls);
    let op = ctx.op();
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB || op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTT_CB_FLAG;
        let _ = ctx.set_cb_flags(flags as i32);
        snapshot(&ctx, false);
    } else if op == BPF_SOCK_OPS_RTT_CB {
        // Once per ACK that measures an RTT: on an established connection only a clock is
        // checked, and the counters are read when its next report is due.
        // SAFETY: a read of the program's own context.
        if unsafe { (*ctx.ops).state } != TCP_ESTABLISHED || report_due(&ctx) {
            snapshot(&ctx, true);
        }
    } else if op == BPF_SOCK_OPS_STATE_CB {
        snapshot(&ctx, false);
    } else if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        // The SYN is about to go out: the source port is chosen now (after SYN_SENT), and
        // released again if the connect fails.
        // SAFETY: the sock_ops context is what the helper expects.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
        if let Some(c) = CONNS.get_ptr_mut(cookie) {
            // SAFETY: map value pointer, valid until we return.
            unsafe { (*c).sport = ctx.local_port() as u16 };
        }
    }
    1
}

/// `include/net/tcp_states.h`
const TCP_ESTABLISHED: u32 = 1;

/// Connections get a report clock once they are this old: a short connection would pay for its
/// socket storage (allocated, then freed with the socket) more than the clock saves it.
const CLOCK_AFTER_NS: u64 = 1_000_000_000;

/// The socket's next [`TcpOp::Update`] is due, or it has no clock yet (every RTT callback then
/// takes the snapshot, which starts the clock once the connection is [`CLOCK_AFTER_NS`] old).
#[inline(always)]
fn report_due(ctx: &SockOpsContext) -> bool {
    // SAFETY: a read of the program's own context; the verifier types it as a socket or null.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return true;
    }
    let Some(due) = report_clock(sk.cast(), false) else { return true };
    // SAFETY: no arguments.
    (unsafe { bpf_ktime_get_ns() }) >= *due
}

/// The socket's [`TCP_REPORTS`] value (when its next report is due), created if `create`.
#[inline(always)]
fn report_clock(sk: *mut c_void, create: bool) -> Option<&'static mut u64> {
    let flags = if create { u64::from(BPF_SK_STORAGE_GET_F_CREATE) } else { 0 };
    // SAFETY: `sk` is the context's socket (non-null, checked by the caller); a null value asks
    // the kernel to create zeroed storage.
    let p = unsafe {
        bpf_sk_storage_get(
            core::ptr::from_ref(&TCP_REPORTS).cast_mut().cast(),
            sk,
            core::ptr::null_mut(),
            flags,
        )
    }
    .cast::<u64>();
    // SAFETY: socket storage of this socket, valid while the program runs.
    (!p.is_null()).then(|| unsafe { &mut *p })
}

#[inline(always)]
fn snapshot(ctx: &SockOpsContext, may_report: bool) {
    // SAFETY: the sock_ops context is what the helper expects.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    let Some(c) = CONNS.get_ptr_mut(cookie) else {
        return;
    };
    // SAFETY: `ctx.ops` is the program's context; `c` a map value pointer valid until we return.
    unsafe {
        let ops = &*ctx.ops;
        let s = &mut (*c).stats;
        s.srtt_us = ops.srtt_us >> 3;
        s.total_retrans = ops.total_retrans;
        s.bytes_acked = ops.bytes_acked;
        s.bytes_received = ops.bytes_received;
        s.segs_in = ops.segs_in;
        s.segs_out = ops.segs_out;
        (*c).flags |= CONN_F_STATS_VALID | fin_flags(ops.state, ops.snd_una, ops.snd_nxt);
        if !may_report {
            return;
        }
        let now = bpf_ktime_get_ns();
        let interval = HOPWATCH_SETTINGS.load().update_interval_ns;
        let since = if (*c).last_report_ns == 0 { (*c).start_ns } else { (*c).last_report_ns };
        let due = now.saturating_sub(since) >= interval;
        if due {
            (*c).last_report_ns = now;
            report(ctx, cookie, &*c, now);
        }
        let sk = (*ctx.ops).__bindgen_anon_2.sk;
        if !sk.is_null()
            && now.saturating_sub((*c).start_ns) >= CLOCK_AFTER_NS
            && let Some(clock) = report_clock(sk.cast(), true)
        {
            *clock = if due { now } else { since }.saturating_add(interval);
        }
    }
}

/// FIN sequence numbers already in the counters. The state tracepoint records them too, but an
/// RTT callback for the ACK of our FIN runs before the state moves on.
#[inline(always)]
fn fin_flags(state: u32, snd_una: u32, snd_nxt: u32) -> u32 {
    // include/net/tcp_states.h
    const FIN_WAIT1: u32 = 4;
    const CLOSE_WAIT: u32 = 8;
    const LAST_ACK: u32 = 9;
    const CLOSING: u32 = 11;
    let mut flags = 0;
    if matches!(state, CLOSE_WAIT | LAST_ACK | CLOSING) {
        flags |= CONN_F_FIN_IN;
    }
    if matches!(state, FIN_WAIT1 | CLOSING | LAST_ACK) && snd_una == snd_nxt {
        flags |= CONN_F_FIN_OUT_ACKED;
    }
    flags
}

/// Sends a [`TcpOp::Update`]. The tuple comes from the sock_ops context, which has no network
/// namespace; userspace keeps the one it learnt when the connection was established.
unsafe fn report(ctx: &SockOpsContext, cookie: u64, c: &ConnState, now: u64) {
    let Some(mut entry) = reserve::<TcpEvent>(now, cookie) else {
        return;
    };
    // SAFETY: `reserve` initialised every byte of the slot.
    let e = unsafe { entry.assume_init_mut() };
    fill_from_conn(e, c);
    // SAFETY: reads of the program's own context.
    unsafe {
        e.op = TcpOp::Update as u8;
        e.old_state = 1;
        e.new_state = 1;
        e.tuple.protocol = IPPROTO_TCP;
        let family = ctx.family();
        e.tuple.sport = ctx.local_port() as u16;
        // remote_port holds the network-order port in its upper 16 bits on little endian.
        e.tuple.dport = u16::from_be((ctx.remote_port() >> 16) as u16);
        if family == u32::from(AF_INET) {
            e.tuple.family = AF_INET;
            e.tuple.saddr[..4].copy_from_slice(&ctx.local_ip4().to_ne_bytes());
            e.tuple.daddr[..4].copy_from_slice(&ctx.remote_ip4().to_ne_bytes());
        } else if family == u32::from(AF_INET6) {
            e.tuple.family = AF_INET6;
            // The verifier only allows 4-byte loads of these context fields, so no array copy.
            let ops = ctx.ops;
            for i in 0..4 {
                let l = core::ptr::read_volatile(&raw const (*ops).local_ip6[i]);
                let r = core::ptr::read_volatile(&raw const (*ops).remote_ip6[i]);
                e.tuple.saddr[i * 4..i * 4 + 4].copy_from_slice(&l.to_ne_bytes());
                e.tuple.daddr[i * 4..i * 4 + 4].copy_from_slice(&r.to_ne_bytes());
            }
        }
    }
    entry.submit(wakeup_flags());
}
