//! The fast path of L7 capture: exchanges of promoted sockets measured here, one record each
//! (see `hopwatch_common::exchange` for the protocol between the two sides).

use core::ffi::c_void;

use aya_ebpf::{
    bindings::BPF_SK_STORAGE_GET_F_CREATE,
    helpers::{
        bpf_ktime_get_ns,
        generated::{
            bpf_probe_read_kernel, bpf_probe_read_user as probe_read_user_raw, bpf_sk_storage_get,
        },
    },
};
use hopwatch_common::{
    CALLER_COROUTINE, Counter, DIR_INGRESS, FAST_TLS, KernelSettings, L7Conn, PROTO_HTTP,
    PROTO_TLS, ThreadRequest,
    exchange::{
        EXCH_F_FULL, EXCH_F_SERVER, EXCH_F_UNANSWERED, EXCHANGE_HEAD, ExchangeEvent,
        ExchangeRecord, ExchangeState, PHASE_IDLE, PHASE_REQUEST, PHASE_RESPONSE, exchange_index,
        http_status, sampled,
    },
};

use crate::{
    emit::{reserve, wakeup_flags},
    kernel::{Mem, read_user, sock_ports},
    l7::{UserData, syscall_data},
    maps::{
        EXCHANGE_CONTROL, EXCHANGE_SCRATCH, EXCHANGE_TOKENS, EXCHANGES, HOPWATCH_SETTINGS,
        PROMOTIONS, TLS_EXCHANGES, count,
    },
};

/// Status code that switches protocols (`101`): the connection stops being HTTP/1.
const SWITCHING_PROTOCOLS: u16 = 101;

/// Handles one call on a promoted socket. False when the call goes to the capture path instead:
/// the answer to a request sent before the promotion, or a response the fast path cannot read
/// (the socket is demoted).
///
/// # Safety
///
/// `sk` is the tracepoint's `struct sock *`; `conn` points at the socket's `L7CONNS` value.
#[inline(always)]
pub unsafe fn on_call(
    sk: *const c_void,
    cookie: u64,
    conn: *mut L7Conn,
    len: u32,
    direction: u8,
    pid_tgid: u64,
    caller: ThreadRequest,
) -> bool {
    // SAFETY: `sk` is a trusted socket pointer (the caller's contract); a null value asks the
    // kernel to create zeroed storage.
    let x = unsafe {
        bpf_sk_storage_get(
            core::ptr::from_ref(&EXCHANGES).cast_mut().cast(),
            sk.cast_mut(),
            core::ptr::null_mut(),
            u64::from(BPF_SK_STORAGE_GET_F_CREATE),
        )
    }
    .cast::<ExchangeState>();
    // SAFETY: `conn` is a live map value (the caller's contract).
    let c = unsafe { &mut *conn };
    if x.is_null() {
        count(Counter::ExchangeNoStorage);
        c.fast = 0;
        return false;
    }
    let call = Call {
        cookie,
        len,
        direction,
        pid_tgid,
        caller,
        // SAFETY: no arguments.
        now: unsafe { bpf_ktime_get_ns() },
    };
    // SAFETY: socket storage of this socket, valid while the program runs.
    measure(
        unsafe { &mut *x },
        c,
        &call,
        || syscall_data(pid_tgid).and_then(first_chunk),
        // SAFETY: the tracepoint's socket (the caller's contract).
        || unsafe { sock_ports(Mem::Typed, sk.cast()) },
    )
}

/// [`on_call`] for a promoted TLS connection's plaintext: `len` bytes at `buf`, the call's time
/// `now` (its socket I/O's), `c` the socket's state (the caller stores it back).
#[inline(always)]
pub fn on_tls_call(
    c: &mut L7Conn,
    cookie: u64,
    buf: u64,
    len: u32,
    direction: u8,
    pid_tgid: u64,
    caller: ThreadRequest,
    now: u64,
) -> bool {
    let Some(x) = TLS_EXCHANGES.get_ptr_mut(cookie) else {
        count(Counter::ExchangeNoStorage);
        c.fast = 0;
        return false;
    };
    // SAFETY: map value of this connection, valid while the program runs.
    let x = unsafe { &mut *x };
    let ports = (x.ports[0], x.ports[1]);
    let call = Call { cookie, len, direction, pid_tgid, caller, now };
    measure(x, c, &call, || Some((buf, len)), || ports)
}

/// Applies a promotion userspace made for TLS connection `cookie` (its state `c`, stored back
/// by the caller): the connection's exchange state is created here, with its ports.
#[inline(always)]
pub fn promote_tls(c: &mut L7Conn, cookie: u64) {
    // SAFETY: map value, copied out at once.
    let Some(p) = (unsafe { PROMOTIONS.get(cookie) }).copied() else { return };
    let _ = PROMOTIONS.remove(cookie);
    let Some(x) = EXCHANGE_SCRATCH.get_ptr_mut(0) else { return };
    // SAFETY: per-CPU scratch value, ours until the program returns.
    let x = unsafe { &mut *x };
    x.phase = PHASE_IDLE;
    x.ports = p.ports;
    if TLS_EXCHANGES.insert(cookie, x, 0).is_err() {
        count(Counter::ExchangeNoStorage);
        return;
    }
    c.promote(&p, FAST_TLS);
}

/// One call on a promoted connection, wherever it was seen.
struct Call {
    cookie: u64,
    len: u32,
    direction: u8,
    pid_tgid: u64,
    caller: ThreadRequest,
    /// Monotonic ns.
    now: u64,
}

/// The engine: `x` is the connection's exchange state, `c` its L7 state; `data` finds the
/// call's first buffer (address, length), `ports` the connection's ports for the sample.
#[inline(always)]
fn measure(
    x: &mut ExchangeState,
    c: &mut L7Conn,
    call: &Call,
    data: impl Fn() -> Option<(u64, u32)>,
    ports: impl Fn() -> (u16, u16),
) -> bool {
    let (len, now) = (call.len, call.now);
    let request = (call.direction == DIR_INGRESS) == (c.server != 0);
    if request {
        if x.phase != PHASE_REQUEST {
            x.phase = PHASE_REQUEST;
            x.request_bytes = 0;
            x.caller = call.caller;
            let cap = HOPWATCH_SETTINGS.load().capture_bytes;
            x.head_len = match data() {
                Some((ptr, n)) => copy_user(&mut x.head, ptr, n.min(len).min(cap)),
                None => 0,
            };
        }
        x.request_bytes = x.request_bytes.saturating_add(len);
        x.request_ns = now;
        return true;
    }
    match x.phase {
        PHASE_RESPONSE => return true,
        PHASE_IDLE => return false,
        _ => {}
    }
    let chunk = data();
    let line = chunk.and_then(|(ptr, _)| read_user::<[u8; 16]>(ptr));
    let status = line.as_ref().and_then(http_status);
    let Some(status) = status.filter(|&s| s != SWITCHING_PROTOCOLS) else {
        // Not a response the fast path can measure: the capture path takes the socket back, and
        // this exchange is counted as lost.
        count(Counter::ExchangeDemoted);
        c.fast = 0;
        x.phase = PHASE_IDLE;
        return false;
    };
    x.phase = PHASE_RESPONSE;
    if c.server != 0 && call.caller.method == CALLER_COROUTINE {
        // The asyncio task answering (see `causality::on_turn`).
        x.caller = call.caller;
    }
    let index = exchange_index(c.anchor_index, c.anchor_turns, c.turns);
    let latency = now.saturating_sub(x.request_ns);
    let settings = HOPWATCH_SETTINGS.load();
    let full = status >= 500
        || latency >= settings.exchange_slow_ns
        || followed()
        || under_rate(now, &settings)
        || match x.caller {
            // A call made for a request: recorded with that request (sampling is per trace).
            ThreadRequest { cookie, inflight: 1, recorded, method, .. }
                if cookie != 0 && method != CALLER_COROUTINE =>
            {
                recorded != 0
            }
            _ => {
                let (a, b) = ports();
                sampled(a, b, index, settings.exchange_sample)
            }
        };
    let fields = Fields {
        request_ns: x.request_ns,
        index,
        request_bytes: x.request_bytes,
        response_bytes: len,
        status,
        flags: if c.server != 0 { EXCH_F_SERVER } else { 0 },
        pid_tgid: call.pid_tgid,
        caller: x.caller,
    };
    if full {
        let Some(mut entry) = reserve::<ExchangeRecord>(now, call.cookie) else { return true };
        let rec = entry.as_mut_ptr();
        // SAFETY: `rec` is a reserved, zeroed, stamped record; the copies stay inside its arrays.
        unsafe {
            fields.fill(&mut (*rec).event);
            (*rec).event.flags |= EXCH_F_FULL;
            (*rec).event.head_len = x.head_len;
            if let Some((ptr, n)) = chunk {
                (*rec).event.response_len = copy_user(&mut (*rec).response, ptr, n.min(len));
            }
            let _ = bpf_probe_read_kernel(
                (*rec).head.as_mut_ptr().cast(),
                EXCHANGE_HEAD as u32,
                x.head.as_ptr().cast(),
            );
        }
        entry.submit(wakeup_flags());
    } else {
        let Some(mut entry) = reserve::<ExchangeEvent>(now, call.cookie) else { return true };
        // SAFETY: a reserved, zeroed, stamped event.
        unsafe { fields.fill(&mut *entry.as_mut_ptr()) };
        entry.submit(wakeup_flags());
    }
    count(Counter::KernelExchanges);
    true
}

/// The request a server socket on the fast path starts reading now (`c`: its state, the turn
/// counted) is the sample's: the calls the reading thread makes for it are recorded with it.
///
/// # Safety
///
/// `sk` is the tracepoint's `struct sock *`.
#[inline(always)]
pub unsafe fn request_sampled(sk: *const c_void, c: &L7Conn) -> bool {
    // SAFETY: the caller's contract.
    let (a, b) = unsafe { sock_ports(Mem::Typed, sk.cast()) };
    next_sampled(a, b, c)
}

/// [`request_sampled`] for a promoted TLS connection.
#[inline(always)]
pub fn tls_request_sampled(cookie: u64, c: &L7Conn) -> bool {
    // SAFETY: map value, read at once.
    match unsafe { TLS_EXCHANGES.get(cookie) } {
        Some(x) => next_sampled(x.ports[0], x.ports[1], c),
        None => true,
    }
}

#[inline(always)]
fn next_sampled(a: u16, b: u16, c: &L7Conn) -> bool {
    let index = exchange_index(c.anchor_index, c.anchor_turns, c.turns.wrapping_add(1));
    sampled(a, b, index, HOPWATCH_SETTINGS.load().exchange_sample)
}

/// What an exchange's record says besides its header's stamp.
struct Fields {
    request_ns: u64,
    index: u64,
    request_bytes: u32,
    response_bytes: u32,
    status: u16,
    flags: u8,
    pid_tgid: u64,
    caller: ThreadRequest,
}

impl Fields {
    #[inline(always)]
    fn fill(&self, e: &mut ExchangeEvent) {
        e.header.pid = self.pid_tgid as u32;
        e.header.tgid = (self.pid_tgid >> 32) as u32;
        e.request_ns = self.request_ns;
        e.index = self.index;
        e.request_bytes = self.request_bytes;
        e.response_bytes = self.response_bytes;
        e.status = self.status;
        e.protocol = PROTO_HTTP;
        e.flags = self.flags;
        e.caller = self.caller;
    }
}

/// The socket closed (`c`: its L7 state): an exchange whose request was sent and whose response
/// never started is reported unanswered, in full (it is an error).
///
/// # Safety
///
/// `sk` is the tracepoint's `struct sock *`.
#[inline(always)]
pub unsafe fn on_close(sk: *const c_void, cookie: u64, c: &L7Conn) {
    if c.proto == PROTO_TLS {
        // Promoted at some point (a demoted connection keeps its entry until now).
        if let Some(x) = TLS_EXCHANGES.get_ptr_mut(cookie) {
            // SAFETY: map value of this connection, valid while the program runs.
            unanswered(unsafe { &mut *x }, cookie, c);
            let _ = TLS_EXCHANGES.remove(cookie);
        }
        return;
    }
    if c.fast == 0 {
        // Never promoted, or demoted (its exchange state idle).
        return;
    }
    // SAFETY: `sk` is a trusted socket pointer (the caller's contract); no creation.
    let x = unsafe {
        bpf_sk_storage_get(
            core::ptr::from_ref(&EXCHANGES).cast_mut().cast(),
            sk.cast_mut(),
            core::ptr::null_mut(),
            0,
        )
    }
    .cast::<ExchangeState>();
    if !x.is_null() {
        // SAFETY: socket storage of this socket, valid while the program runs.
        unanswered(unsafe { &mut *x }, cookie, c);
    }
}

/// Reports the exchange in progress in `x` if its response never started.
#[inline(always)]
fn unanswered(x: &mut ExchangeState, cookie: u64, c: &L7Conn) {
    if x.phase != PHASE_REQUEST {
        return;
    }
    x.phase = PHASE_IDLE;
    // SAFETY: no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(mut entry) = reserve::<ExchangeRecord>(now, cookie) else { return };
    let rec = entry.as_mut_ptr();
    let fields = Fields {
        request_ns: x.request_ns,
        // The response would have started at the next turn.
        index: exchange_index(c.anchor_index, c.anchor_turns, c.turns.wrapping_add(1)),
        request_bytes: x.request_bytes,
        response_bytes: 0,
        status: 0,
        flags: EXCH_F_FULL | EXCH_F_UNANSWERED | if c.server != 0 { EXCH_F_SERVER } else { 0 },
        pid_tgid: 0,
        caller: x.caller,
    };
    // SAFETY: `rec` is a reserved, zeroed, stamped record; the copy stays inside its head.
    unsafe {
        fields.fill(&mut (*rec).event);
        (*rec).event.head_len = x.head_len;
        let _ = bpf_probe_read_kernel(
            (*rec).head.as_mut_ptr().cast(),
            EXCHANGE_HEAD as u32,
            x.head.as_ptr().cast(),
        );
    }
    entry.submit(wakeup_flags());
    count(Counter::KernelExchanges);
}

/// Someone follows the flows: every exchange is recorded in full.
#[inline(always)]
fn followed() -> bool {
    EXCHANGE_CONTROL.get(0).is_some_and(|&f| f != 0)
}

/// This CPU may still record an exchange in full this second (0: no limit).
#[inline(always)]
fn under_rate(now: u64, settings: &KernelSettings) -> bool {
    if settings.exchange_rate_per_cpu == 0 {
        return true;
    }
    let Some(t) = EXCHANGE_TOKENS.get_ptr_mut(0) else { return false };
    // SAFETY: per-CPU value, only this program touches it on this CPU while it runs.
    let t = unsafe { &mut *t };
    let second = now / 1_000_000_000;
    if t[0] != second {
        t[0] = second;
        t[1] = 0;
    }
    if t[1] < u64::from(settings.exchange_rate_per_cpu) {
        t[1] += 1;
        true
    } else {
        false
    }
}

/// The first buffer of a syscall's data and its length (`u32::MAX` for a flat buffer, whose
/// length is the call's).
#[inline(always)]
fn first_chunk(user: UserData) -> Option<(u64, u32)> {
    if user.iov_count == 0 {
        return Some((user.ptr, u32::MAX));
    }
    let v = read_user::<[u64; 2]>(user.ptr)?;
    Some((v[0], u32::try_from(v[1]).unwrap_or(u32::MAX)))
}

/// Copies up to `n` bytes of user memory at `src` into `dst`; returns how many were copied.
#[inline(always)]
fn copy_user<const N: usize>(dst: &mut [u8; N], src: u64, n: u32) -> u16 {
    // The verifier must see the bound: launder the value so the compiler keeps the check.
    // SAFETY: a read of a local.
    let mut n = unsafe { core::ptr::read_volatile(&raw const n) } as usize;
    if n > N {
        n = N;
    }
    if n == 0 {
        return 0;
    }
    // SAFETY: `n <= N` bytes into `dst`; a bad user address copies nothing.
    let rc =
        unsafe { probe_read_user_raw(dst.as_mut_ptr().cast(), n as u32, src as *const c_void) };
    if rc < 0 { 0 } else { n as u16 }
}
