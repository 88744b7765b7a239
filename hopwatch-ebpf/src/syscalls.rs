//! Application payload capture from syscall tracepoints, for kernels without the socket layer's
//! `sock:sock_send_length`/`sock_recv_length` (before 6.3/6.4: Debian 12, Amazon Linux 2023 and
//! GKE COS on 6.1, Ubuntu 22.04 on 5.15, RHEL 9 on 5.14).
//!
//! Why these hooks: `syscalls:sys_enter_*`/`sys_exit_*` exist on every kernel users run, and one
//! program serves every syscall of the read/write/send/recv families (their records share one
//! layout: the syscall number, then six arguments or the return value). Unlike the socket-layer
//! hooks they fire for file I/O too, so `sys_enter_*` first resolves the file descriptor to its
//! socket (`task → files → fdtable → file`, checked to be a socket by its inode's mode) and saves
//! the call only for TCP/UDP sockets whose bytes are wanted; `sys_exit_*` then hands the call and
//! its result to the capture shared with the socket-layer path ([`l7::capture`]).
//!
//! What this path cannot do: the socket is a pointer read from kernel memory, not one the kernel
//! handed over, so the verifier allows neither `bpf_get_socket_cookie` (the cookie is read from
//! the socket, where the kernel keeps it once anything asked for it, and is the socket's address
//! otherwise) nor the socket storage the exchange engine keeps its state in: every exchange is
//! measured in userspace on this path.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::tracepoint, programs::TracePointContext,
};
use hopwatch_common::{
    AF_INET, AF_INET6, Counter, DIR_EGRESS, DIR_INGRESS, IPPROTO_TCP, IPPROTO_UDP, PROTO_IGNORED,
    PROTO_TLS,
};

use crate::{
    kernel::{Mem, fd_socket, offsets, read_at, read_cookie, read_user, sock_protocol},
    l7::{self, UserData},
    maps::{
        DATA_SCRATCH, DETECT_STASH, HOPWATCH_SETTINGS, HOPWATCH_SYSCALLS, L7CONNS, PENDING_CALLS,
        PendingCall, SYSCALL_TAILS, TAIL_EXIT, count,
    },
    tls, tls_handshake,
};

/// Offsets in a `syscalls:sys_enter_*` record: the syscall number, then its arguments as 8-byte
/// slots. `sys_exit_*` records have the return value where the first argument would be.
const NR_OFFSET: usize = 8;
const ARGS_OFFSET: usize = 16;
/// `MSG_PEEK`: the data stays queued and will be read again.
const MSG_PEEK: u64 = 2;
/// Messages of one `sendmmsg`/`recvmmsg` captured at most (glibc's resolver sends its A and AAAA
/// queries as two), one tail call each; the rest are counted as unsupported calls.
const MAX_MMSG: u64 = 8;
/// `struct mmsghdr`: a `struct msghdr` (56 bytes), then the `msg_len` the kernel fills in.
const MMSGHDR_SIZE: u64 = 64;
const MMSG_LEN_OFFSET: u64 = 56;
const DNS_PORT: u16 = 53;

#[tracepoint]
pub fn sys_enter_socket_io(ctx: TracePointContext) -> u32 {
    let _ = on_enter(&ctx);
    0
}

#[tracepoint]
pub fn sys_exit_socket_io(ctx: TracePointContext) -> u32 {
    let _ = on_exit(&ctx);
    0
}

fn arg(ctx: &TracePointContext, i: usize) -> Option<u64> {
    // SAFETY: a read inside the tracepoint's record (bpf_probe_read_kernel copes with any
    // address).
    unsafe { ctx.read_at::<u64>(ARGS_OFFSET + 8 * i) }.ok()
}

fn on_enter(ctx: &TracePointContext) -> Option<()> {
    let settings = HOPWATCH_SETTINGS.load();
    if settings.capture_bytes == 0 {
        return None;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    if settings.self_tgid != 0 && (pid_tgid >> 32) as u32 == settings.self_tgid {
        return None;
    }
    // SAFETY: a read inside the tracepoint's record.
    let nr = unsafe { ctx.read_at::<i32>(NR_OFFSET) }.ok()?.cast_unsigned();
    let o = offsets();
    let sk = fd_socket(arg(ctx, 0)?, &o)?;
    let family = read_at::<u16>(sk, o.sk_family)?;
    if family != AF_INET && family != AF_INET6 {
        return None;
    }
    // SAFETY: read through the probe helper.
    let protocol = unsafe { sock_protocol(Mem::Probe, sk) }?;
    if protocol == u16::from(IPPROTO_UDP) {
        // Over UDP only DNS is parsed: a connected socket shows its ports here (an unconnected
        // one names its peer per datagram, and the capture checks that).
        let sport = read_at::<u16>(sk, o.sk_num)?;
        let dport = u16::from_be(read_at::<u16>(sk, o.sk_dport)?);
        if dport != 0 && sport != DNS_PORT && dport != DNS_PORT {
            return None;
        }
    } else if protocol != u16::from(IPPROTO_TCP) {
        return None;
    }
    let cookie = read_cookie(sk, &o);
    // Sockets whose bytes are not wanted cost only this: ignored ones, and TLS ones outside an
    // SSL call (their plaintext comes from the uprobes; inside a call the ciphertext ties the
    // `SSL*` to the socket).
    // SAFETY: map values, read at once.
    if let Some(state) = unsafe { L7CONNS.get(cookie) }
        && (state.proto == PROTO_IGNORED
            || (state.proto == PROTO_TLS && tls::call_in_progress(pid_tgid).is_none()))
    {
        return None;
    }
    let sc = HOPWATCH_SYSCALLS.load();
    let mut call = PendingCall {
        sk: sk as u64,
        cookie,
        ptr: arg(ctx, 1)?,
        count: 0,
        addr: 0,
        direction: DIR_EGRESS,
        mmsg: 0,
        _pad: [0; 2],
        index: 0,
    };
    if nr == sc.read || nr == sc.recvfrom {
        call.direction = DIR_INGRESS;
        if nr == sc.recvfrom && arg(ctx, 3)? & MSG_PEEK != 0 {
            return None;
        }
    } else if nr == sc.readv {
        call.direction = DIR_INGRESS;
        call.count = arg(ctx, 2)?;
    } else if nr == sc.writev {
        call.count = arg(ctx, 2)?;
    } else if nr == sc.sendto {
        call.addr = arg(ctx, 4)?;
    } else if nr == sc.sendmsg || nr == sc.recvmsg {
        let sending = nr == sc.sendmsg;
        if !sending {
            call.direction = DIR_INGRESS;
            if arg(ctx, 2)? & MSG_PEEK != 0 {
                return None;
            }
        }
        let user = l7::from_msghdr(call.ptr, sending)?;
        call.ptr = user.ptr;
        call.count = user.iov_count;
        call.addr = user.addr;
    } else if nr == sc.sendmmsg || nr == sc.recvmmsg {
        if nr == sc.recvmmsg {
            call.direction = DIR_INGRESS;
            if arg(ctx, 3)? & MSG_PEEK != 0 {
                return None;
            }
        }
        call.count = arg(ctx, 2)?;
        call.mmsg = 1;
    } else if nr != sc.write {
        return None;
    }
    PENDING_CALLS.insert(pid_tgid, call, 0).ok()
}

/// Protocol detection for a message of the syscall path ([`l7::capture`] stashed it and its bytes
/// are in the per-CPU scratch), then the next message of a `sendmmsg`/`recvmmsg` if any.
#[tracepoint]
pub fn syscall_detect(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if let (Some(stash), Some(scratch)) = (DETECT_STASH.get_ptr(0), DATA_SCRATCH.get_ptr_mut(0)) {
        // SAFETY: per-CPU values, written by the program that tail-called this one on this CPU.
        let (p, scratch) = unsafe { (*stash, &mut *scratch) };
        let proto =
            if p.handshake == 0 { l7::detect_head(&scratch.data, p.captured) } else { PROTO_TLS };
        if proto == PROTO_TLS {
            // A TLS handshake's record (detected here, or of a handshake under way).
            tls_handshake::on_message(
                p.sk as *const u8,
                p.cookie,
                p.state,
                p.len,
                p.direction,
                Some(p.user),
            );
        } else {
            l7::detected(scratch, p, proto, pid_tgid);
        }
    }
    // SAFETY: map value, read at once.
    if unsafe { PENDING_CALLS.get(pid_tgid) }.is_some() {
        // More messages of the call: the exit program again (see [`on_exit`]).
        // SAFETY: slot TAIL_EXIT holds `sys_exit_socket_io`; a tail call that succeeds does not
        // return.
        unsafe { SYSCALL_TAILS.tail_call(&ctx, TAIL_EXIT) };
    }
    0
}

/// One message per run: the call's only one, or the next of a `sendmmsg`/`recvmmsg`, after which
/// the program tail-calls itself ([`SYSCALL_TAILS`]) for the one after. One copy of the
/// capture in the program keeps it within what older verifiers accept (6.1 gave up on three).
/// Inlined: it tail-calls, which the verifier allows only in functions returning `int`.
#[inline(always)]
fn on_exit(ctx: &TracePointContext) -> Option<()> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let entry = PENDING_CALLS.get_ptr_mut(pid_tgid)?;
    // SAFETY: map value, copied out at once.
    let call = unsafe { *entry };
    let ret = arg(ctx, 0)?.cast_signed();
    if ret <= 0 {
        let _ = PENDING_CALLS.remove(pid_tgid);
        return None;
    }
    let (user, len, more) = if call.mmsg == 0 {
        let user = UserData { ptr: call.ptr, iov_count: call.count, addr: call.addr };
        (user, u32::try_from(ret).unwrap_or(u32::MAX), false)
    } else {
        // `ret` messages were sent or received, each with its length in its `msg_len`.
        let messages = ret.cast_unsigned();
        let i = u64::from(call.index);
        if i >= messages || i >= MAX_MMSG {
            let _ = PENDING_CALLS.remove(pid_tgid);
            return None;
        }
        let hdr = call.ptr + i * MMSGHDR_SIZE;
        let len = read_user::<u32>(hdr + MMSG_LEN_OFFSET).unwrap_or(0);
        let user = l7::from_msghdr(hdr, call.direction == DIR_EGRESS).unwrap_or(UserData {
            ptr: 0,
            iov_count: 0,
            addr: 0,
        });
        let more = i + 1 < messages;
        if more && i + 1 >= MAX_MMSG {
            count(Counter::L7UnsupportedCall);
        }
        // SAFETY: this thread's map value, valid while the program runs.
        unsafe { (*entry).index += 1 };
        (user, len, more && i + 1 < MAX_MMSG)
    };
    if !more {
        let _ = PENDING_CALLS.remove(pid_tgid);
    }
    if len > 0 && user.ptr != 0 {
        l7::capture(
            None,
            call.sk as *const u8,
            call.cookie,
            len,
            call.direction,
            Some(user),
            Some(ctx),
        );
    }
    if more {
        // SAFETY: the program array holds this program (userspace puts it there at load); the
        // tail call does not return when it succeeds.
        unsafe { SYSCALL_TAILS.tail_call(ctx, TAIL_EXIT) };
        count(Counter::L7UnsupportedCall);
        let _ = PENDING_CALLS.remove(pid_tgid);
    }
    Some(())
}
