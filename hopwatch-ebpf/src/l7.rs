//! Application payload capture at the socket layer.
//!
//! Why these hooks: `sock:sock_send_length` and `sock:sock_recv_length` (6.4+) fire for every
//! `sock_sendmsg`/`sock_recvmsg`, i.e. for every send/recv/read/write family syscall on a socket
//! and only on sockets, with the `struct sock *` (so the socket cookie) and the byte count. File
//! I/O never reaches them, so capture costs nothing for non-socket reads and writes, and no
//! per-syscall enter/exit bookkeeping is needed. The user buffer is found from the syscall's own
//! arguments, saved in the task's `pt_regs` (`bpf_task_pt_regs`); the syscall numbers come from
//! userspace (libc), the `pt_regs` offsets from BTF.
//!
//! Only a bounded prefix of each message is copied, and only for connections whose first bytes
//! look like a protocol hopwatch parses (see `hopwatch_common::detect`); a connection that shows
//! nothing recognisable within a few messages is ignored from then on for the price of one map
//! lookup per call. TLS connections are skipped here once their handshake is over (its records
//! go to `tls_handshake.rs`): their plaintext comes from the uprobes in `tls.rs`.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        generated::{
            bpf_get_current_task_btf, bpf_probe_read_user as probe_read_user_raw, bpf_task_pt_regs,
        },
    },
    macros::btf_tracepoint,
    programs::{BtfTracePointContext, TracePointContext},
};
use hopwatch_common::{
    AF_INET, AF_INET6, Counter, DATA_MAX, DETECT_ATTEMPTS, DIR_EGRESS, DIR_INGRESS, FAST_SOCKET,
    IPPROTO_TCP, IPPROTO_UDP, L7Conn, PROTO_DNS, PROTO_HTTP, PROTO_IGNORED, PROTO_TLS,
    PROTO_TLS_HANDSHAKE, PROTO_UNKNOWN, ROLE_UNKNOWN, SRC_SYSCALL, ThreadRequest,
    detect::{HEAD, detect, socket_role},
};

use crate::{
    causality,
    emit::output,
    exchange,
    kernel::{
        Mem, current_process_into, load_at, offset, read_sock_tuple, read_user, sock_protocol,
        socket_cookie,
    },
    maps::{
        DATA_SCRATCH, DETECT_STASH, DataScratch, HOPWATCH_SETTINGS, HOPWATCH_SYSCALLS, L7CONNS,
        MMSG_CURSORS, PROMOTIONS, SSL_SOCKETS, SYSCALL_TAILS, TAIL_DETECT, count,
    },
    tls, tls_handshake,
};

/// `MSG_PEEK`: the data stays queued and will be read again.
const MSG_PEEK: i32 = 2;
/// iovecs copied from per call at most (verifier-bounded loop).
const MAX_IOVS: u32 = 4;
const DNS_PORT: u16 = 53;
/// Userspace ABI sizes (LP64): `struct iovec`, `struct msghdr`, `struct mmsghdr`.
const IOVEC_SIZE: u64 = 16;
const MMSGHDR_SIZE: u64 = 64;

#[btf_tracepoint(function = "sock_send_length")]
pub fn sock_send_length(ctx: BtfTracePointContext) -> i32 {
    let sk: *const c_void = ctx.arg(0);
    let ret: i32 = ctx.arg(1);
    if ret > 0 {
        // SAFETY: `sk` is the tracepoint's socket.
        unsafe { on_socket_call(sk, ret.cast_unsigned(), DIR_EGRESS) };
    }
    0
}

#[btf_tracepoint(function = "sock_recv_length")]
pub fn sock_recv_length(ctx: BtfTracePointContext) -> i32 {
    let sk: *const c_void = ctx.arg(0);
    let ret: i32 = ctx.arg(1);
    let flags: i32 = ctx.arg(2);
    if ret > 0 && flags & MSG_PEEK == 0 {
        // SAFETY: `sk` is the tracepoint's socket.
        unsafe { on_socket_call(sk, ret.cast_unsigned(), DIR_INGRESS) };
    }
    0
}

/// Where a syscall's data lives in user memory.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UserData {
    /// A flat buffer, or the first `struct iovec` when `iov_count > 0`.
    pub ptr: u64,
    pub iov_count: u64,
    /// `struct sockaddr *` naming the peer (sendto/sendmsg to an unconnected socket), or 0.
    pub addr: u64,
}

/// # Safety
///
/// `sk` is the tracepoint's `struct sock *` (see [`socket_cookie`]).
#[inline(always)]
unsafe fn on_socket_call(sk: *const c_void, len: u32, direction: u8) {
    if HOPWATCH_SETTINGS.load().capture_bytes == 0 {
        return;
    }
    // SAFETY: `sk` is the tracepoint's socket (the caller's contract).
    let cookie = unsafe { socket_cookie(sk) };
    capture(Some(sk), sk.cast(), cookie, len, direction, None, None);
}

/// One socket call's data, from either capture path: `trusted` is the socket as the kernel handed
/// it to a socket-layer hook (what the exchange engine needs; `None` on the syscall path), `sk`
/// the same socket for reads, `user` the call's buffers (`None`: found from the task's saved
/// registers), `detect_elsewhere` the syscall path's context, from which protocol detection is a
/// tail call (`None`: detected here).
#[inline(always)]
pub fn capture(
    trusted: Option<*const c_void>,
    sk: *const u8,
    cookie: u64,
    len: u32,
    direction: u8,
    user: Option<UserData>,
    detect_elsewhere: Option<&TracePointContext>,
) {
    let settings = HOPWATCH_SETTINGS.load();
    if settings.capture_bytes == 0 {
        return;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    if settings.self_tgid != 0 && (pid_tgid >> 32) as u32 == settings.self_tgid {
        return;
    }
    let skb = sk;
    // The socket-layer hooks' socket is typed; the syscall path's was read from memory.
    let mem = if trusted.is_some() { Mem::Typed } else { Mem::Probe };
    // SAFETY: with `Mem::Typed`, `sk` is the socket the kernel handed over.
    let Some(family) = (unsafe { mem.read::<u16>(skb, offset!(sk_family)) }) else { return };
    if family != AF_INET && family != AF_INET6 {
        return;
    }
    let conn = L7CONNS.get_ptr_mut(cookie);
    // A promoted socket is plaintext HTTP over TCP: no protocol to read, and no TLS call can be
    // writing to it (a promoted TLS connection's plaintext is measured by the TLS probes).
    // SAFETY: map value of this socket, valid while the program runs.
    let promoted = trusted.is_some() && conn.is_some_and(|c| unsafe { (*c).fast } == FAST_SOCKET);
    let protocol = if promoted {
        u16::from(IPPROTO_TCP)
    } else {
        // SAFETY: as above.
        unsafe { sock_protocol(mem, skb) }.unwrap_or(0)
    };
    if protocol != u16::from(IPPROTO_TCP) && protocol != u16::from(IPPROTO_UDP) {
        return;
    }

    // Inside SSL_read/SSL_write: this is ciphertext. Remember which socket the SSL object uses;
    // the uprobe sends the plaintext.
    // Maps are updated only when the association changes: an update of an LRU map takes a lock
    // and may evict, and this runs on every ciphertext call.
    let mut handshake = None;
    if !promoted && let Some(call) = tls::call_in_progress(pid_tgid) {
        // SAFETY: map value pointer, valid until we return; the call's cookie is the one
        // remembered for its `SSL*` (or 0) when the call started.
        unsafe {
            if (*call).cookie != cookie {
                (*call).cookie = cookie;
                let _ = SSL_SOCKETS.insert((*call).ssl, cookie, 0);
            }
            (*call).io_ns = bpf_ktime_get_ns();
        }
        match conn {
            // SAFETY: map value pointer, valid until we return.
            Some(c) => unsafe {
                // A handshake under way, or one the library does inside SSL_read/SSL_write.
                if (*c).proto == PROTO_TLS_HANDSHAKE || (*c).proto == PROTO_UNKNOWN {
                    handshake = Some(L7Conn { tls: 1, ..*c });
                } else if (*c).proto != PROTO_TLS {
                    (*c).proto = PROTO_TLS;
                    (*c).tls = 1;
                }
            },
            None => handshake = Some(L7Conn { tls: 1, ..L7Conn::default() }),
        }
        if handshake.is_none() {
            return;
        }
    }
    // SAFETY: map value, copied out at once.
    let mut state = conn.map(|c| unsafe { *c }).unwrap_or_default();
    if let Some(h) = handshake.or((state.proto == PROTO_TLS_HANDSHAKE).then_some(state)) {
        let p = Pending {
            cookie,
            sk: sk as u64,
            user: user.unwrap_or(UserData { ptr: 0, iov_count: 0, addr: 0 }),
            state: h,
            len,
            captured: 0,
            direction,
            udp: 0,
            handshake: 1,
            turned: 0,
            _pad: [0; 4],
            caller: ThreadRequest::default(),
        };
        if let (Some(ctx), Some(_)) = (detect_elsewhere, user) {
            stash_and_detect(ctx, p);
        } else {
            tls_handshake::on_message(sk, cookie, h, len, direction, user);
        }
        return;
    }
    if state.proto == PROTO_IGNORED || state.proto == PROTO_TLS {
        return;
    }
    let udp = protocol == u16::from(IPPROTO_UDP);
    let mut turned = false;
    let mut caller = ThreadRequest::default();
    if !udp {
        if state.fast == 0
            && state.proto == PROTO_HTTP
            && trusted.is_some()
            && let Some(c) = conn
            // SAFETY: map value, copied out at once.
            && let Some(p) = unsafe { PROMOTIONS.get(cookie) }.copied()
        {
            // SAFETY: map value of this socket, valid while the program runs.
            unsafe { (*c).promote(&p, FAST_SOCKET) };
            state.fast = FAST_SOCKET;
            let _ = PROMOTIONS.remove(cookie);
        }
        // The exchange engine's clock: one turn per change of direction (see
        // `hopwatch_common::exchange`), kept on both paths.
        if state.last_direction != direction {
            turned = true;
            state.last_direction = direction;
            state.turns = state.turns.wrapping_add(1);
            if let Some(c) = conn {
                // SAFETY: map value of this socket, valid while the program runs.
                unsafe {
                    (*c).last_direction = direction;
                    (*c).turns = state.turns;
                    if state.role != ROLE_UNKNOWN {
                        let recorded = match trusted {
                            // A request read on the fast path: recorded by the sample.
                            Some(sk)
                                if (*c).fast != 0
                                    && (*c).server != 0
                                    && direction == DIR_INGRESS =>
                            {
                                exchange::request_sampled(sk, &*c)
                            }
                            _ => true,
                        };
                        caller = causality::on_turn(&mut *c, cookie, pid_tgid, direction, recorded);
                        state.owner_tid = (*c).owner_tid;
                    }
                }
            }
        }
        if state.fast != 0
            && let Some(sk) = trusted
            && let Some(c) = conn
            // SAFETY: the tracepoint's socket and its L7CONNS value.
            && unsafe { exchange::on_call(sk, cookie, c, len, direction, pid_tgid, caller) }
        {
            return;
        }
    }

    let Some(user) = user.or_else(|| syscall_data(pid_tgid)) else {
        count(Counter::L7UnsupportedCall);
        return;
    };
    let Some(scratch) = DATA_SCRATCH.get_ptr_mut(0) else { return };
    // SAFETY: per-CPU scratch value, ours until the program returns.
    let scratch = unsafe { &mut *scratch };
    let ev = &mut scratch.event;
    zero_tuple(&mut ev.tuple);
    // A TCP connection's addresses do not change: they are sent with its first captured message
    // (and userspace also has them from the connection's TCP events). UDP sockets may talk to
    // many peers, so every datagram carries them.
    if udp || state.tuple_sent == 0 {
        // SAFETY: as above.
        unsafe { read_sock_tuple(mem, skb, &mut ev.tuple) };
    }
    ev.tuple.protocol = protocol as u8;
    if udp {
        if ev.tuple.dport == 0 && user.addr != 0 {
            peer_from_sockaddr(user.addr, ev);
        }
        // Over UDP only DNS is parsed; everything else stays out of the ring buffer.
        if ev.tuple.sport != DNS_PORT && ev.tuple.dport != DNS_PORT {
            return;
        }
    }

    let cap = settings.capture_bytes.min(DATA_MAX as u32);
    let captured = copy_user_data(&mut scratch.data, user, len.min(cap));

    let pending = Pending {
        cookie,
        sk: sk as u64,
        user,
        state,
        len,
        captured,
        direction,
        udp: u8::from(udp),
        handshake: 0,
        turned: u8::from(turned),
        _pad: [0; 4],
        caller,
    };
    if state.proto == PROTO_UNKNOWN {
        let port_dns =
            scratch.event.tuple.sport == DNS_PORT || scratch.event.tuple.dport == DNS_PORT;
        let proto = if port_dns {
            PROTO_DNS
        } else if let Some(ctx) = detect_elsewhere {
            // The syscall path detects in a program of its own (older verifiers give up on the
            // detector's branches multiplied by this program's paths).
            stash_and_detect(ctx, pending);
            return;
        } else {
            detect_head(&scratch.data, captured)
        };
        if proto == PROTO_TLS {
            tls_handshake::on_message(sk, cookie, state, len, direction, Some(user));
            return;
        }
        detected(scratch, pending, proto, pid_tgid);
        return;
    }
    finish(scratch, pending, pid_tgid);
}

/// Hands a message to `syscall_detect` (tail call): protocol detection, or a TLS handshake's
/// record. Only returns if the tail call fails (counted).
#[inline(always)]
fn stash_and_detect(ctx: &TracePointContext, p: Pending) {
    if let Some(stash) = DETECT_STASH.get_ptr_mut(0) {
        // SAFETY: per-CPU value, ours until the program (and its tail call) returns.
        unsafe { *stash = p };
        // SAFETY: slot TAIL_DETECT holds `syscall_detect` (set by userspace at load); a tail
        // call that succeeds does not return.
        unsafe { SYSCALL_TAILS.tail_call(ctx, TAIL_DETECT) };
    }
    count(Counter::L7UnsupportedCall);
}

/// What [`capture`] knows about a message it hands on: to protocol detection (its bytes are in
/// the per-CPU scratch, `captured` of them) or, with `handshake`, to the TLS handshake capture.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Pending {
    pub cookie: u64,
    /// The socket, for reads.
    pub sk: u64,
    pub user: UserData,
    pub state: L7Conn,
    pub len: u32,
    pub captured: u32,
    pub direction: u8,
    pub udp: u8,
    pub handshake: u8,
    /// The message changed the socket's direction (see [`causality`]).
    pub turned: u8,
    pub _pad: [u8; 4],
    /// What [`causality::on_turn`] returned for it.
    pub caller: ThreadRequest,
}

/// The protocol of a connection still unknown was guessed from this message (`proto`): remember
/// it, and send the message if it is one hopwatch parses.
#[inline(always)]
pub fn detected(scratch: &mut DataScratch, mut p: Pending, proto: u8, pid_tgid: u64) {
    p.state.proto = proto;
    if p.state.role == ROLE_UNKNOWN && p.udp == 0 {
        p.state.role = socket_role(proto, scratch.data[0], p.direction);
        if p.state.role != ROLE_UNKNOWN && p.turned != 0 {
            p.caller = causality::on_turn(&mut p.state, p.cookie, pid_tgid, p.direction, true);
        }
    }
    if proto == PROTO_UNKNOWN {
        p.state.attempts += 1;
        if p.state.attempts >= DETECT_ATTEMPTS {
            p.state.proto = PROTO_IGNORED;
            count(Counter::L7Ignored);
        }
    }
    let _ = L7CONNS.insert(p.cookie, p.state, 0);
    if p.state.proto == PROTO_UNKNOWN
        || p.state.proto == PROTO_IGNORED
        || p.state.proto == PROTO_TLS
    {
        return;
    }
    finish(scratch, p, pid_tgid);
}

/// Sends a message of a connection whose protocol is known.
#[inline(always)]
fn finish(scratch: &mut DataScratch, mut p: Pending, pid_tgid: u64) {
    if p.len > p.captured {
        count(Counter::DataTruncated);
    }
    if p.state.tuple_sent == 0 && p.udp == 0 {
        p.state.tuple_sent = 1;
        let _ = L7CONNS.insert(p.cookie, p.state, 0);
    }
    let ev = &mut scratch.event;
    ev.len = p.len;
    ev.captured = p.captured;
    ev.direction = p.direction;
    ev.source = SRC_SYSCALL;
    ev.protocol = p.state.proto;
    ev.turns = p.state.turns;
    ev.caller = p.caller;
    send(scratch, pid_tgid, p.cookie);
}

/// Fills the event's process fields and sends the event plus its `captured` bytes.
#[inline(always)]
pub fn send(scratch: &mut DataScratch, pid_tgid: u64, cookie: u64) {
    // SAFETY: no arguments.
    send_at(scratch, pid_tgid, cookie, unsafe { bpf_ktime_get_ns() });
}

/// [`send`], stamped `ts` (monotonic ns).
#[inline(always)]
pub fn send_at(scratch: &mut DataScratch, pid_tgid: u64, cookie: u64, ts: u64) {
    current_process_into(pid_tgid, &mut scratch.event.header, &mut scratch.event.comm);
    let size = size_of::<hopwatch_common::DataEvent>() as u64
        + u64::from(scratch.event.captured.min(DATA_MAX as u32));
    if output(scratch, size, ts, cookie) {
        count(Counter::DataEvents);
    }
}

/// Zeroes a tuple word by word. `= Default::default()` becomes a call to a byte-by-byte `memset`
/// loop, which older verifiers (6.1) walk once per path into it, past their instruction limit.
#[inline(always)]
pub fn zero_tuple(t: &mut hopwatch_common::Tuple) {
    let words = (&raw mut *t).cast::<u32>();
    let mut i = 0;
    while i < size_of::<hopwatch_common::Tuple>() / 4 {
        // SAFETY: inside `t` (48 bytes, 4-aligned); volatile so that it stays word stores.
        unsafe { words.add(i).write_volatile(0) };
        i += 1;
    }
}

/// Protocol guess from the first bytes of the captured data.
#[inline(always)]
pub fn detect_head(data: &[u8; 2 * DATA_MAX], captured: u32) -> u8 {
    let mut head = [0u8; HEAD];
    head.copy_from_slice(&data[..HEAD]);
    detect(&head, (captured as usize).min(HEAD))
}

/// Finds the user buffer of the syscall in progress from its saved registers.
#[inline(always)]
pub fn syscall_data(pid_tgid: u64) -> Option<UserData> {
    // SAFETY: helpers valid in tracing programs, given the current task; `regs` (the task's saved
    // registers) is only read through `load_at`, which the verifier checks against its type.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as *const u8;
    if regs.is_null() {
        return None;
    }
    // SAFETY: `regs` is the BTF-typed `struct pt_regs *` the helper returned; the offsets are
    // its fields'.
    let nr = unsafe { load_at::<u64>(regs, offset!(regs_orig_ax)) }?;
    let arg = |off: u16| unsafe { load_at::<u64>(regs, off) };
    let sc = HOPWATCH_SYSCALLS.load();
    let nr = nr as u32;
    if nr == sc.read || nr == sc.write {
        Some(UserData { ptr: arg(offset!(regs_si))?, iov_count: 0, addr: 0 })
    } else if nr == sc.sendto || nr == sc.recvfrom {
        // recvfrom fills its address only after the socket layer returns: not usable here.
        let addr = if nr == sc.sendto { arg(offset!(regs_r8))? } else { 0 };
        Some(UserData { ptr: arg(offset!(regs_si))?, iov_count: 0, addr })
    } else if nr == sc.readv || nr == sc.writev {
        Some(UserData { ptr: arg(offset!(regs_si))?, iov_count: arg(offset!(regs_dx))?, addr: 0 })
    } else if nr == sc.sendmsg || nr == sc.recvmsg {
        from_msghdr(arg(offset!(regs_si))?, nr == sc.sendmsg)
    } else if nr == sc.sendmmsg || nr == sc.recvmmsg {
        let vec = arg(offset!(regs_si))?;
        let vlen = arg(offset!(regs_dx))?;
        let idx = mmsg_index(pid_tgid, vec, vlen);
        from_msghdr(vec + idx * MMSGHDR_SIZE, nr == sc.sendmmsg)
    } else {
        None
    }
}

/// Which message of a `sendmmsg`/`recvmmsg` vector this socket call is for: the kernel handles
/// them in order, one socket call each.
#[inline(always)]
fn mmsg_index(pid_tgid: u64, vec: u64, vlen: u64) -> u64 {
    // SAFETY: map value, read at once (only this task's syscall writes its entry).
    let idx = match unsafe { MMSG_CURSORS.get(pid_tgid) } {
        Some(c) if c[0] == vec && c[1] < c[2] => c[1],
        _ => 0,
    };
    let _ = MMSG_CURSORS.insert(pid_tgid, [vec, idx + 1, vlen], 0);
    idx.min(vlen.saturating_sub(1))
}

/// `struct msghdr` (userspace ABI): `msg_name` at 0, `msg_iov` at 16, `msg_iovlen` at 24.
#[inline(always)]
pub fn from_msghdr(msg: u64, sending: bool) -> Option<UserData> {
    let hdr = read_user::<[u64; 4]>(msg)?;
    // The receive side's `msg_name` is only filled after the socket layer returns.
    let addr = if sending { hdr[0] } else { 0 };
    Some(UserData { ptr: hdr[2], iov_count: hdr[3], addr })
}

/// Reads the peer of an unconnected UDP socket from a `struct sockaddr_in`/`sockaddr_in6`.
#[inline(always)]
fn peer_from_sockaddr(addr: u64, ev: &mut hopwatch_common::DataEvent) {
    let Some(sa) = read_user::<[u8; 28]>(addr) else { return };
    let family = u16::from_ne_bytes([sa[0], sa[1]]);
    ev.tuple.dport = u16::from_be_bytes([sa[2], sa[3]]);
    if family == AF_INET {
        ev.tuple.daddr[..4].copy_from_slice(&sa[4..8]);
    } else if family == AF_INET6 {
        ev.tuple.daddr.copy_from_slice(&sa[8..24]);
    }
}

/// Copies up to `want` bytes of the syscall's data into `dst`; returns how many were copied.
#[inline(always)]
pub fn copy_user_data(dst: &mut [u8; 2 * DATA_MAX], user: UserData, want: u32) -> u32 {
    if user.iov_count == 0 {
        return copy_chunk(dst, 0, user.ptr, want);
    }
    let mut copied = 0u32;
    let mut i = 0u32;
    while i < MAX_IOVS {
        if u64::from(i) >= user.iov_count || copied >= want {
            break;
        }
        let iov = user.ptr + u64::from(i) * IOVEC_SIZE;
        let Some(v) = read_user::<[u64; 2]>(iov) else { break };
        let room = want - copied;
        let n = if v[1] < u64::from(room) { v[1] as u32 } else { room };
        copied += copy_chunk(dst, copied, v[0], n);
        i += 1;
    }
    copied
}

/// Copies `n` bytes from user address `src` (any address: a bad one copies nothing) to
/// `dst[off..]`, within the verifier's view of the buffer: `off < DATA_MAX` and `n <= DATA_MAX`
/// keep the copy inside `2 * DATA_MAX`. Returns how many bytes were copied.
#[inline(always)]
pub fn copy_chunk(dst: &mut [u8; 2 * DATA_MAX], off: u32, src: u64, n: u32) -> u32 {
    // The compiler can prove `off < DATA_MAX` from the callers and would drop the mask; the
    // verifier cannot, so launder the value through memory to keep the mask in the code.
    // SAFETY: a read of a local.
    let off = unsafe { core::ptr::read_volatile(&raw const off) } as usize & (DATA_MAX - 1);
    // The same for the length: callers bound it by comparisons with other registers, which older
    // verifiers (6.1) do not carry over to it; the clamp below must stay in the code.
    // SAFETY: a read of a local.
    let mut n = unsafe { core::ptr::read_volatile(&raw const n) } as usize;
    if n > DATA_MAX {
        n = DATA_MAX;
    }
    if n == 0 {
        return 0;
    }
    // SAFETY: `off < DATA_MAX` (masked) and `n <= DATA_MAX`, so `dst[off..off + n]` is inside
    // `dst`; bpf_probe_read_user copes with any user address (a fault is an error).
    let rc = unsafe {
        probe_read_user_raw(dst.as_mut_ptr().add(off).cast(), n as u32, src as *const c_void)
    };
    if rc < 0 { 0 } else { n as u32 }
}
