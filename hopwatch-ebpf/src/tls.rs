//! TLS plaintext from OpenSSL (`libssl.so.3`/`libssl.so.1.1`) uprobes.
//!
//! Why these hooks: the ingress hop is usually TLS-terminated, so the socket carries only
//! ciphertext. `SSL_read`/`SSL_write` (and their `_ex` variants) see the plaintext buffer; the
//! socket I/O OpenSSL does inside the call (seen by `sock_send_length`/`sock_recv_length`, see
//! `l7.rs`) tells us which socket the `SSL*` uses. Uprobes are attached to the library file, so
//! every process mapping it is covered, including ones started later. Where the loader finds the
//! internal function both variants call (`hopwatch/src/loader/tls.rs`), it attaches the `_ex`
//! entry program and the return program there instead: same arguments, same return.
//!
//! `SSL_do_handshake` (which `SSL_connect`/`SSL_accept` call) is followed like a read or write
//! without plaintext, so the handshake's socket I/O ties a new `SSL*` to its socket before the
//! first `SSL_read`, whose request may already sit in OpenSSL's buffer (no socket I/O inside the
//! call to learn from). `SSL_free` forgets the tie: servers reuse the freed `SSL*`'s address for
//! the next connection, whose data would otherwise go to the closed one.
//!
//! A TLS connection userspace has promoted to the exchange engine (see `exchange.rs`) has its
//! exchanges measured in the return probe: the plaintext is read there for the request's head
//! and the status line, and nothing else goes to userspace but one record per exchange.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use hopwatch_common::{
    Counter, DATA_MAX, DETECT_ATTEMPTS, DIR_EGRESS, DIR_INGRESS, L7Conn, PROTO_HTTP, PROTO_IGNORED,
    PROTO_TLS, PROTO_UNKNOWN, ROLE_UNKNOWN, SRC_TLS, ThreadRequest, detect::socket_role,
};

use crate::{
    causality, exchange,
    kernel::read_user,
    l7::{copy_chunk, detect_head, send_at},
    maps::{
        DATA_SCRATCH, HOPWATCH_SETTINGS, L7CONNS, SSL_SOCKETS, TLS_CALLS, TLS_EXCHANGES,
        TLS_PLAINTEXT, TLS_TAILS, TlsCall, TlsPlaintext, count,
    },
};

/// [`TlsCall::ssl`] of a thread's entry while it is not inside a call (no `SSL*` is null).
const IDLE: u64 = 0;

#[uprobe]
pub fn ssl_write(ctx: ProbeContext) -> u32 {
    enter(&ctx, DIR_EGRESS, false);
    0
}

#[uprobe]
pub fn ssl_write_ex(ctx: ProbeContext) -> u32 {
    enter(&ctx, DIR_EGRESS, true);
    0
}

#[uprobe]
pub fn ssl_do_handshake(ctx: ProbeContext) -> u32 {
    enter(&ctx, 0, false);
    0
}

#[uprobe]
pub fn ssl_free(ctx: ProbeContext) -> u32 {
    if HOPWATCH_SETTINGS.load().capture_bytes == 0 {
        return 0;
    }
    let ssl: u64 = ctx.arg(0).unwrap_or(0);
    let _ = SSL_SOCKETS.remove(ssl);
    0
}

#[uprobe]
pub fn ssl_read(ctx: ProbeContext) -> u32 {
    enter(&ctx, DIR_INGRESS, false);
    0
}

#[uprobe]
pub fn ssl_read_ex(ctx: ProbeContext) -> u32 {
    enter(&ctx, DIR_INGRESS, true);
    0
}

/// Shared by all four functions: the return says how many bytes the buffer holds.
#[uretprobe]
pub fn ssl_return(ctx: RetProbeContext) -> u32 {
    // All four return an `int`: the upper half of the register is not part of it (-1 arrives
    // as 0xffff_ffff, which as 64 bits would read as four billion bytes of plaintext).
    let ret = i64::from(ctx.ret::<i64>() as i32);
    exit(&ctx, ret);
    0
}

/// A promoted TLS connection's plaintext ([`TLS_PLAINTEXT`]), tail-called from `ssl_return`:
/// its exchange measured (see `exchange.rs`), or the plaintext sent on the capture path when
/// the engine gives the connection back.
#[uretprobe]
pub fn ssl_exchange(_ctx: RetProbeContext) -> u32 {
    let Some(p) = TLS_PLAINTEXT.get_ptr(0) else { return 0 };
    // SAFETY: per-CPU value `ssl_return` filled on this CPU before its tail call; copied out.
    let p = unsafe { *p };
    let mut state = p.state;
    let len = u32::try_from(p.len).unwrap_or(u32::MAX);
    let took = exchange::on_tls_call(
        &mut state,
        p.cookie,
        p.buf,
        len,
        p.direction,
        p.pid_tgid,
        p.caller,
        p.ts,
    );
    if state.fast == 0 {
        // Demoted: the capture path has the connection back.
        store(p.cookie, &state);
        let _ = TLS_EXCHANGES.remove(p.cookie);
    }
    if !took {
        send_plaintext(&p);
    }
    0
}

/// `SSL_write(ssl, buf, num)`, `SSL_write_ex(ssl, buf, num, size_t *written)`, and the same for
/// reads.
#[inline(always)]
fn enter(ctx: &ProbeContext, direction: u8, ex: bool) {
    if HOPWATCH_SETTINGS.load().capture_bytes == 0 {
        return;
    }
    let ssl: u64 = ctx.arg(0).unwrap_or(0);
    let buf: u64 = ctx.arg(1).unwrap_or(0);
    let out_len: u64 = if ex { ctx.arg(3).unwrap_or(0) } else { 0 };
    // SAFETY: copied out at once.
    let cookie = unsafe { SSL_SOCKETS.get(ssl) }.copied().unwrap_or(0);
    let call = TlsCall { ssl, buf, out_len, cookie, io_ns: 0, direction, _pad: [0; 7] };
    let pid_tgid = bpf_get_current_pid_tgid();
    // A thread's entry stays in the map between calls (marked idle by the return): written in
    // place, it costs neither an LRU insert (a lock, maybe an eviction) nor a delete per call.
    match TLS_CALLS.get_ptr_mut(pid_tgid) {
        // SAFETY: map value of this thread, valid while the program runs.
        Some(c) => unsafe { *c = call },
        None => {
            let _ = TLS_CALLS.insert(pid_tgid, call, 0);
        }
    }
}

/// Stores a TLS connection's L7 state: in place when it has its entry (no LRU insert).
#[inline(always)]
fn store(cookie: u64, state: &L7Conn) {
    match L7CONNS.get_ptr_mut(cookie) {
        // SAFETY: map value of this socket, valid while the program runs.
        Some(c) => unsafe { *c = *state },
        None => {
            let _ = L7CONNS.insert(cookie, state, 0);
        }
    }
}

/// The `SSL_*` call the thread `pid_tgid` is inside, if any.
#[inline(always)]
pub fn call_in_progress(pid_tgid: u64) -> Option<*mut TlsCall> {
    // SAFETY: map value, read at once.
    TLS_CALLS.get_ptr_mut(pid_tgid).filter(|&c| unsafe { (*c).ssl } != IDLE)
}

fn exit(ctx: &RetProbeContext, ret: i64) {
    if HOPWATCH_SETTINGS.load().capture_bytes == 0 {
        return;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(c) = call_in_progress(pid_tgid) else { return };
    // SAFETY: map value of this thread, copied out and marked idle at once.
    let call = unsafe {
        let call = *c;
        (*c).ssl = IDLE;
        call
    };
    if call.direction == 0 {
        // A handshake: its socket I/O tied the `SSL*` to its socket; no plaintext.
        return;
    }
    let len = if call.out_len != 0 {
        if ret != 1 {
            return;
        }
        // The caller's `size_t *` out-parameter.
        read_user::<u64>(call.out_len).unwrap_or(0)
    } else if ret > 0 {
        ret as u64
    } else {
        return;
    };
    if len == 0 {
        return;
    }
    let cookie = if call.cookie != 0 {
        call.cookie
    } else {
        // SAFETY: copied out at once.
        unsafe { SSL_SOCKETS.get(call.ssl) }.copied().unwrap_or(0)
    };
    if cookie == 0 {
        // Data OpenSSL had buffered before we ever saw this SSL object touch its socket.
        count(Counter::TlsUnassociated);
        return;
    }
    // SAFETY: map value, copied out at once.
    let mut state = unsafe { L7CONNS.get(cookie) }.copied().unwrap_or(L7Conn {
        proto: PROTO_TLS,
        tls: 1,
        ..L7Conn::default()
    });
    if state.inner == PROTO_IGNORED {
        return;
    }
    // When the call's bytes crossed the socket (or now, for bytes OpenSSL had buffered).
    // SAFETY: no arguments.
    let ts = if call.io_ns != 0 { call.io_ns } else { unsafe { bpf_ktime_get_ns() } };
    // The plaintext's turns (the socket's own carry ciphertext and are not counted for TLS):
    // thread causality for requests served or sent over TLS. Only once the handshake is over
    // (until then `last_direction` is the ClientHello's); the first plaintext message is a turn.
    let turned = state.proto == PROTO_TLS
        && (state.inner == PROTO_UNKNOWN || state.last_direction != call.direction);
    if turned {
        state.last_direction = call.direction;
        state.turns = state.turns.wrapping_add(1);
    }
    let detecting = state.inner == PROTO_UNKNOWN;
    if detecting {
        let Some(scratch) = DATA_SCRATCH.get_ptr_mut(0) else { return };
        // SAFETY: per-CPU scratch value, ours until the program returns.
        let scratch = unsafe { &mut *scratch };
        let captured = copy_chunk(&mut scratch.data, 0, call.buf, want(len));
        state.inner = detect_head(&scratch.data, captured);
        if state.inner == PROTO_UNKNOWN {
            state.attempts += 1;
            if state.attempts >= DETECT_ATTEMPTS {
                state.inner = PROTO_IGNORED;
                count(Counter::L7Ignored);
            }
        } else {
            state.role = socket_role(state.inner, scratch.data[0], call.direction);
        }
    }
    if turned && state.fast == 0 && state.inner == PROTO_HTTP {
        // Userspace may have handed this connection to the exchange engine (applied at a turn).
        exchange::promote_tls(&mut state, cookie);
    }
    let mut caller = ThreadRequest::default();
    if turned && state.role != ROLE_UNKNOWN {
        // A request read on the fast path: recorded by the sample.
        let recorded = if state.fast != 0 && state.server != 0 && call.direction == DIR_INGRESS {
            exchange::tls_request_sampled(cookie, &state)
        } else {
            true
        };
        caller = causality::on_turn(&mut state, cookie, pid_tgid, call.direction, recorded);
    }
    if turned || detecting {
        store(cookie, &state);
    }
    if state.inner == PROTO_UNKNOWN || state.inner == PROTO_IGNORED {
        return;
    }
    let p = TlsPlaintext {
        state,
        caller,
        cookie,
        pid_tgid,
        buf: call.buf,
        len,
        ts,
        direction: call.direction,
        _pad: [0; 7],
    };
    if state.fast != 0 {
        if let Some(slot) = TLS_PLAINTEXT.get_ptr_mut(0) {
            // SAFETY: per-CPU value, ours until this program (and its tail call) returns.
            unsafe { *slot = p };
            // SAFETY: slot 0 holds `ssl_exchange` (set by userspace at load); a tail call that
            // succeeds does not return.
            let _ = unsafe { TLS_TAILS.tail_call(ctx, 0) };
        }
        // No engine to hand the plaintext to: the capture path takes the connection back.
        count(Counter::ExchangeNoStorage);
        let mut state = state;
        state.fast = 0;
        store(cookie, &state);
    }
    send_plaintext(&p);
}

/// Of `len` plaintext bytes, how many the capture path copies.
#[inline(always)]
fn want(len: u64) -> u32 {
    let cap = HOPWATCH_SETTINGS.load().capture_bytes.min(DATA_MAX as u32);
    if len < u64::from(cap) { len as u32 } else { cap }
}

/// Sends a call's plaintext to userspace (the capture path).
#[inline(always)]
fn send_plaintext(p: &TlsPlaintext) {
    let Some(scratch) = DATA_SCRATCH.get_ptr_mut(0) else { return };
    // SAFETY: per-CPU scratch value, ours until the program returns.
    let scratch = unsafe { &mut *scratch };
    // The call's own buffer, `len` bytes of which hold plaintext.
    let captured = copy_chunk(&mut scratch.data, 0, p.buf, want(p.len));
    if p.len > u64::from(captured) {
        count(Counter::DataTruncated);
    }
    let ev = &mut scratch.event;
    // The socket's addresses are known to userspace from the connection's TCP events.
    ev.tuple = Default::default();
    ev.len = u32::try_from(p.len).unwrap_or(u32::MAX);
    ev.captured = captured;
    ev.direction = p.direction;
    ev.source = SRC_TLS;
    ev.protocol = p.state.inner;
    ev.turns = p.state.turns;
    ev.caller = p.caller;
    send_at(scratch, p.pid_tgid, p.cookie, p.ts);
}
