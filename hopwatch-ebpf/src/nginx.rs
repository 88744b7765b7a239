//! nginx's upstream requests linked to the downstream request each serves.
//!
//! Why here: an nginx worker is an event loop with many requests in flight, so "the request this
//! thread read last" (thread causality) cannot tell which one an upstream request was made for.
//! nginx knows: the upstream connection's `data` is the `ngx_http_request_t` it serves, whose
//! `connection` is the downstream connection. `ngx_chain_writer` is the function every upstream
//! request's bytes go through (proxy, FastCGI, uwsgi, gRPC; plain or TLS) and one of the symbols
//! nginx exports for its dynamic modules, so a uprobe on it works on distribution builds without
//! debug symbols. At its entry both connections' file descriptors name their sockets
//! (`task → files → fdtable`, as on the syscall path), and the downstream socket's current
//! request is the one its [`L7Conn::turns`](hopwatch_common::L7Conn) counts. The pair goes into
//! [`NGINX_UPSTREAMS`] for the upstream socket's request start ([`crate::causality::on_turn`]).
//!
//! The fields read are at the start of their structs, where they have been since nginx 1.0:
//! `ngx_chain_writer_ctx_t.connection` (after two pointers), `ngx_connection_t.data` (first) and
//! `.fd` (after three pointers), `ngx_http_request_t.signature` ("HTTP", checked) and
//! `.connection` (after it).

use aya_ebpf::{macros::uprobe, programs::ProbeContext};
use hopwatch_common::{
    CALLER_NGINX, ThreadRequest,
    exchange::{exchange_index, sampled},
};

use crate::{
    kernel::{Mem, fd_socket, offsets, read_cookie, read_user, sock_ports},
    maps::{HOPWATCH_SETTINGS, L7CONNS, NGINX_UPSTREAMS},
};

/// `ngx_chain_writer_ctx_t.connection`.
const WRITER_CONNECTION: u64 = 16;
/// `ngx_connection_t.data`: the request, on an upstream connection.
const CONNECTION_DATA: u64 = 0;
/// `ngx_connection_t.fd`.
const CONNECTION_FD: u64 = 24;
/// `ngx_http_request_t.signature` and its value, `"HTTP"` little-endian.
const REQUEST_SIGNATURE: u64 = 0;
const HTTP_SIGNATURE: u32 = u32::from_le_bytes(*b"HTTP");
/// `ngx_http_request_t.connection`.
const REQUEST_CONNECTION: u64 = 8;

/// `ngx_int_t ngx_chain_writer(void *data, ngx_chain_t *in)`.
#[uprobe]
pub fn nginx_chain_writer(ctx: ProbeContext) -> u32 {
    let _ = on_chain_writer(&ctx);
    0
}

#[inline(always)]
fn on_chain_writer(ctx: &ProbeContext) -> Option<()> {
    if HOPWATCH_SETTINGS.load().trace_threads == 0 {
        return None;
    }
    let writer: u64 = ctx.arg(0)?;
    let upstream = read_user::<u64>(writer + WRITER_CONNECTION)?;
    let request = read_user::<u64>(upstream + CONNECTION_DATA)?;
    if read_user::<u32>(request + REQUEST_SIGNATURE)? != HTTP_SIGNATURE {
        return None;
    }
    let downstream = read_user::<u64>(request + REQUEST_CONNECTION)?;
    let up_fd = read_user::<i32>(upstream + CONNECTION_FD)?;
    let down_fd = read_user::<i32>(downstream + CONNECTION_FD)?;
    if up_fd < 0 || down_fd < 0 {
        return None;
    }
    let o = offsets();
    let up = read_cookie(fd_socket(up_fd as u64, &o)?, &o);
    let down_sk = fd_socket(down_fd as u64, &o)?;
    let down = read_cookie(down_sk, &o);
    // SAFETY: map value, copied out at once.
    let c = unsafe { L7CONNS.get(down) }.copied()?;
    // The downstream request is recorded in full on the capture path, or when it is the
    // sample's on the fast path (its response will end turn `turns + 1`): the upstream request
    // is recorded with it.
    let recorded = c.fast == 0 || {
        // SAFETY: read through the probe helper.
        let (a, b) = unsafe { sock_ports(Mem::Probe, down_sk) };
        let index = exchange_index(c.anchor_index, c.anchor_turns, c.turns.wrapping_add(1));
        sampled(a, b, index, HOPWATCH_SETTINGS.load().exchange_sample)
    };
    let caller = ThreadRequest {
        cookie: down,
        turns: c.turns,
        method: CALLER_NGINX,
        recorded: u16::from(recorded),
        inflight: 1,
    };
    let _ = NGINX_UPSTREAMS.insert(up, caller, 0);
    Some(())
}
