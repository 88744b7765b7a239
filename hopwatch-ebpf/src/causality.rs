//! Which inbound request each thread is serving, for request tracing's thread causality.
//!
//! Why here: the link between "the request this thread read" and "the query it then sent" exists
//! only in the order of one thread's socket calls, and most of those calls never reach userspace
//! (the exchange engine measures promoted connections in the kernel). So the kernel keeps, per
//! thread, the last request it read on a server socket and how many it has read whose responses
//! have not started ([`ThreadRequest`]), and copies that into the first event of every request
//! the thread sends on a client socket. Userspace links the two only when the thread had exactly
//! one request in flight: an event loop interleaving requests stays unlinked, never guessed.
//!
//! nginx's workers are event loops, so thread causality rarely links their upstream requests;
//! nginx itself knows which request each serves, and [`crate::nginx`] reads it from nginx's
//! structures into [`NGINX_UPSTREAMS`], which a client socket's request start checks first.
//!
//! An asyncio event loop interleaves its requests on one thread; there the task making a call
//! names its request instead: [`crate::python`] keeps the coroutine each thread is stepping, and
//! it is stamped on a client socket's request start and on a server socket's response start.
//!
//! It runs only at turns (a socket's change of direction): two map operations per exchange on a
//! server socket, two lookups per request on a client socket (one more on each with the Python
//! probes).

use hopwatch_common::{
    CALLER_COROUTINE, CALLER_THREAD, DIR_EGRESS, DIR_INGRESS, L7Conn, ROLE_CLIENT, ROLE_SERVER,
    TRACE_COROUTINES, ThreadRequest,
};

use crate::{
    maps::{HOPWATCH_SETTINGS, NGINX_UPSTREAMS, THREAD_REQUESTS},
    python,
};

/// A turn of a socket whose role is known: `c` is its state with `turns` already advanced, and
/// `recorded` says whether a request read now is recorded (the fast path's sample; every request
/// is on the capture path). Returns the caller to attach to the message when the turn starts a
/// request on a client socket, or the coroutine answering when it starts a response on a server
/// socket (zero otherwise).
#[inline(always)]
pub fn on_turn(
    c: &mut L7Conn,
    cookie: u64,
    pid_tgid: u64,
    direction: u8,
    recorded: bool,
) -> ThreadRequest {
    let tracing = HOPWATCH_SETTINGS.load().trace_threads;
    if tracing == 0 {
        return ThreadRequest::default();
    }
    let tid = pid_tgid as u32;
    let coroutines = tracing & TRACE_COROUTINES != 0;
    if c.role == ROLE_SERVER {
        if direction == DIR_INGRESS {
            request_read(c, cookie, tid, u16::from(recorded));
            return ThreadRequest::default();
        }
        if c.owner_tid != 0 {
            response_started(c.owner_tid, cookie);
            c.owner_tid = 0;
        }
        // The asyncio task answering the request: its calls were made for it.
        let coro = if coroutines { python::current_coroutine(tid) } else { 0 };
        // (None: all zero, as for any other server turn.)
        let method = if coro != 0 { CALLER_COROUTINE } else { CALLER_THREAD };
        return ThreadRequest { cookie: coro, method, ..Default::default() };
    }
    if c.role == ROLE_CLIENT && direction == DIR_EGRESS {
        // nginx said which request this upstream request serves: exact, whatever else the
        // worker's event loop has in flight.
        // SAFETY: map values, copied out at once.
        if let Some(t) = unsafe { NGINX_UPSTREAMS.get(cookie) }.copied() {
            let _ = NGINX_UPSTREAMS.remove(cookie);
            return t;
        }
        // SAFETY: as above.
        let mut t = unsafe { THREAD_REQUESTS.get(tid) }.copied().unwrap_or_default();
        // With one request in flight the thread's is the call's; with more, an asyncio task's
        // call names its task, which says which request it was made for.
        let exact = t.inflight == 1 && t.cookie != 0;
        let coro = if coroutines && !exact { python::current_coroutine(tid) } else { 0 };
        if coro != 0 {
            t.cookie = coro;
            t.method = CALLER_COROUTINE;
            t.turns = 0;
            t.recorded = 0;
        }
        return t;
    }
    ThreadRequest::default()
}

/// A server socket whose request started was closed before its response started: the reading
/// thread is no longer serving it.
#[inline(always)]
pub fn on_close(c: &L7Conn, cookie: u64) {
    if c.role == ROLE_SERVER && c.owner_tid != 0 {
        response_started(c.owner_tid, cookie);
    }
}

#[inline(always)]
fn request_read(c: &mut L7Conn, cookie: u64, tid: u32, recorded: u16) {
    // A second request before the first's response (pipelining) is still one request in flight
    // for the socket's owner.
    let fresh = c.owner_tid == 0;
    if fresh {
        c.owner_tid = tid;
    }
    match THREAD_REQUESTS.get_ptr_mut(tid) {
        // SAFETY: map value of this thread, valid while the program runs; `inflight` is also
        // decremented by the threads that write responses, hence the atomic add.
        Some(t) => unsafe {
            (*t).cookie = cookie;
            (*t).turns = c.turns;
            (*t).recorded = recorded;
            if fresh {
                atomic_add(&raw mut (*t).inflight, 1);
            }
        },
        None => {
            let t = ThreadRequest {
                cookie,
                turns: c.turns,
                method: CALLER_THREAD,
                recorded,
                inflight: u64::from(fresh),
            };
            let _ = THREAD_REQUESTS.insert(tid, t, 0);
        }
    }
}

#[inline(always)]
fn response_started(owner: u32, cookie: u64) {
    if let Some(t) = THREAD_REQUESTS.get_ptr_mut(owner) {
        // SAFETY: map value, valid while the program runs. A lost race leaves `inflight` too
        // high, which makes the thread's calls unlinked (never linked wrongly); it never goes
        // below zero because only a socket's owner is decremented, once per request.
        unsafe {
            // The thread's latest request is answered: whichever request it still serves is
            // not known any more (an event loop that read A then B and answered B first is
            // serving A), so its calls stay unlinked until it reads another.
            if (*t).cookie == cookie {
                (*t).cookie = 0;
            }
            if (*t).inflight > 0 {
                atomic_add(&raw mut (*t).inflight, u64::MAX);
            }
        }
    }
}

/// `*p += v` as one BPF atomic add (`u64::MAX` subtracts one). The BPF target has no atomic
/// read-modify-write in `core`, but the instruction exists on every kernel.
///
/// # Safety
///
/// `p` points at a live map value.
#[inline(always)]
unsafe fn atomic_add(p: *mut u64, v: u64) {
    // SAFETY: the caller's contract; the instruction touches only `*p`.
    unsafe {
        core::arch::asm!("lock *(u64 *)({p} + 0) += {v}", p = in(reg) p, v = in(reg) v, options(nostack));
    }
}
