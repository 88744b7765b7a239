//! TLS handshakes on the wire: the records of a TLS connection's handshake (ClientHello,
//! ServerHello, plaintext alerts, the client's first encrypted record) go to userspace, which
//! reads the version, server name, ALPN, cipher suite and resumption from them and times the
//! handshake (`hopwatch_protocols::tls`).
//!
//! Why here: the hellos are plaintext on the socket, so no keys and no library hooks are needed,
//! and any TLS stack is covered. Only a connection's first messages are sent: the handshake ends
//! at this end when the client's first encrypted record passes (a record header of type 23,
//! application data, in the direction the ClientHello went), and at most
//! [`TLS_HANDSHAKE_MESSAGES`] are sent in any case; then the connection is [`PROTO_TLS`] and
//! costs one map lookup per call, as before.

use aya_ebpf::helpers::bpf_get_current_pid_tgid;
use hopwatch_common::{
    Counter, DATA_MAX, L7Conn, PROTO_TLS, PROTO_TLS_HANDSHAKE, SRC_SYSCALL, TLS_HANDSHAKE_MESSAGES,
    ThreadRequest, detect::detect,
};

use crate::{
    kernel::{Mem, read_sock_tuple},
    l7::{UserData, copy_user_data, send, syscall_data, zero_tuple},
    maps::{DATA_SCRATCH, L7CONNS, count},
};

/// TLS content type of encrypted records (application data).
const CONTENT_APPLICATION_DATA: u8 = 23;

/// One socket call of a connection in [`PROTO_TLS_HANDSHAKE`] (or one that may start a
/// handshake, `state.proto` anything else: it starts only when the bytes are a TLS handshake
/// record). Sends the call's data and updates the socket's state in `L7CONNS`. `sk` is the socket
/// (for reads), `user` the call's buffers as in [`crate::l7::capture`] (`None`: from the task's
/// saved registers).
#[inline(always)]
pub fn on_message(
    sk: *const u8,
    cookie: u64,
    mut state: L7Conn,
    len: u32,
    direction: u8,
    user: Option<UserData>,
) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(user) = user.or_else(|| syscall_data(pid_tgid)) else {
        count(Counter::L7UnsupportedCall);
        return;
    };
    let Some(scratch) = DATA_SCRATCH.get_ptr_mut(0) else { return };
    // SAFETY: per-CPU scratch value, ours until the program returns.
    let scratch = unsafe { &mut *scratch };
    // All of DATA_MAX, whatever the capture size: a ClientHello with a session ticket is
    // 500-600 bytes, and only a handful of messages per connection come here.
    let captured = copy_user_data(&mut scratch.data, user, len.min(DATA_MAX as u32));
    let d = &scratch.data;
    if state.proto != PROTO_TLS_HANDSHAKE {
        let mut head = [0u8; hopwatch_common::detect::HEAD];
        head.copy_from_slice(&d[..hopwatch_common::detect::HEAD]);
        if detect(&head, (captured as usize).min(head.len())) != PROTO_TLS {
            // TLS seen mid-way (a connection older than the agent): nothing to time.
            state.proto = PROTO_TLS;
            let _ = L7CONNS.insert(cookie, state, 0);
            return;
        }
        state.proto = PROTO_TLS_HANDSHAKE;
        state.attempts = 0;
        state.last_direction = direction;
    }
    let client_record = direction == state.last_direction
        && captured >= 3
        && d[0] == CONTENT_APPLICATION_DATA
        && d[1] == 3
        && d[2] == 3;
    state.attempts = state.attempts.saturating_add(1);
    if client_record || state.attempts >= TLS_HANDSHAKE_MESSAGES {
        state.proto = PROTO_TLS;
    }
    let first = state.tuple_sent == 0;
    state.tuple_sent = 1;
    let _ = L7CONNS.insert(cookie, state, 0);
    let ev = &mut scratch.event;
    zero_tuple(&mut ev.tuple);
    if first {
        // SAFETY: read through the probe helper.
        unsafe { read_sock_tuple(Mem::Probe, sk, &mut ev.tuple) };
    }
    ev.tuple.protocol = hopwatch_common::IPPROTO_TCP;
    if len > captured {
        count(Counter::DataTruncated);
    }
    ev.len = len;
    ev.captured = captured;
    ev.direction = direction;
    ev.source = SRC_SYSCALL;
    ev.protocol = PROTO_TLS;
    ev.turns = 0;
    ev.caller = ThreadRequest::default();
    send(scratch, pid_tgid, cookie);
}
