//! The kernel's exchange engine: request/response exchanges measured in the kernel, one record
//! per exchange, for connections userspace has promoted to it.
//!
//! Every connection starts on the capture path (each message's first bytes go to userspace,
//! whose parsers frame the messages). Once userspace has seen an HTTP/1 connection alternate
//! strictly between one request and one response, it promotes the socket ([`crate::L7Conn::fast`]):
//! from then on the kernel keeps the exchange in progress in the socket's storage (a TLS
//! connection's, whose plaintext the TLS probes see with no socket at hand, in `TLS_EXCHANGES` by
//! socket cookie, and its calls are the `SSL_read`/`SSL_write` calls). The first
//! request-direction call of an exchange copies the request's head into that storage; later
//! calls in the same direction only move its time and length (counted, not copied); the first
//! response-direction call reads the status line, and one fixed-size [`ExchangeEvent`] goes to
//! userspace, carrying the head and the response's first bytes only when the exchange is
//! recorded in full (errors, slow ones, samples, everything while someone follows). A response
//! that is not an HTTP/1 status line demotes the socket back to the capture path.
//!
//! Exchange positions: the kernel counts the times a connection's data changes direction
//! ([`crate::L7Conn::turns`], on both paths). While a connection alternates strictly, each
//! exchange adds two turns, so an exchange's index is
//! `anchor_index + (turns - anchor_turns) / 2`, with the anchor userspace sets from an exchange
//! it framed itself; data still in flight when the promotion lands does not shift it.

use core::mem::size_of;

use crate::{EventHeader, ThreadRequest};

/// Request head bytes kept per exchange (and sent with a full record).
pub const EXCHANGE_HEAD: usize = 512;
/// Response bytes sent with a full record (the status line and the first headers).
pub const EXCHANGE_RESPONSE: usize = 256;

/// [`ExchangeState::phase`]: no exchange in progress since the promotion.
pub const PHASE_IDLE: u8 = 0;
/// Request bytes are being sent.
pub const PHASE_REQUEST: u8 = 1;
/// The response has started; the exchange was reported.
pub const PHASE_RESPONSE: u8 = 2;

/// [`ExchangeEvent::flags`]: the record carries the request head and the response's first bytes.
pub const EXCH_F_FULL: u8 = 1 << 0;
/// [`ExchangeEvent::flags`]: the socket is the server end of the connection.
pub const EXCH_F_SERVER: u8 = 1 << 1;
/// [`ExchangeEvent::flags`]: the connection closed before the response started (the record's
/// time is the close; `status` is 0).
pub const EXCH_F_UNANSWERED: u8 = 1 << 2;

/// Per-socket state of the fast path, in the socket's storage (freed with the socket).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ExchangeState {
    /// Monotonic ns of the exchange's last request-direction call.
    pub request_ns: u64,
    /// Bytes of the request so far.
    pub request_bytes: u32,
    /// Head bytes in `head`.
    pub head_len: u16,
    /// A `PHASE_*`.
    pub phase: u8,
    pub _pad: u8,
    /// Client sockets: the inbound request the sending thread was serving at the request's start.
    pub caller: ThreadRequest,
    /// TLS connections: the connection's two ports (local, remote), for the sampling decision
    /// (the TLS probes have no socket to read them from). Given by the promotion.
    pub ports: [u16; 2],
    pub _pad2: [u8; 4],
    pub head: [u8; EXCHANGE_HEAD],
}
const _: () = assert!(size_of::<ExchangeState>() == 48 + EXCHANGE_HEAD);

/// One exchange measured on the fast path ([`crate::EventKind::Exchange`]). The header's time is
/// the response's first byte, its process the task that read or wrote it (no comm or cgroup: the
/// connection's are known). A full record ([`EXCH_F_FULL`]) is an [`ExchangeRecord`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ExchangeEvent {
    pub header: EventHeader,
    /// Monotonic ns of the request's last byte (latency = header time − this).
    pub request_ns: u64,
    /// Position of the exchange on its connection.
    pub index: u64,
    pub request_bytes: u32,
    /// Bytes of the response's first call.
    pub response_bytes: u32,
    /// HTTP status code parsed in the kernel.
    pub status: u16,
    /// `PROTO_*`.
    pub protocol: u8,
    /// `EXCH_F_*`.
    pub flags: u8,
    /// Bytes of [`ExchangeRecord::head`] and [`ExchangeRecord::response`] that are valid.
    pub head_len: u16,
    pub response_len: u16,
    /// Client sockets: the inbound request the sending thread was serving (see
    /// [`ThreadRequest`]).
    pub caller: ThreadRequest,
}
const _: () = assert!(size_of::<ExchangeEvent>() == 96);
const _: () = assert!(core::mem::offset_of!(ExchangeEvent, header) == 0);

/// A full record: the event, the request's head, the response's first bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ExchangeRecord {
    pub event: ExchangeEvent,
    pub head: [u8; EXCHANGE_HEAD],
    pub response: [u8; EXCHANGE_RESPONSE],
}
const _: () = assert!(
    size_of::<ExchangeRecord>() == size_of::<ExchangeEvent>() + EXCHANGE_HEAD + EXCHANGE_RESPONSE
);

/// A promotion userspace hands the kernel (socket cookie → this, in the `PROMOTIONS` map); the
/// kernel applies it to the socket's [`crate::L7Conn`] at its next call and removes it, so the
/// kernel stays the only writer of that state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Promotion {
    pub anchor_index: u64,
    pub anchor_turns: u32,
    /// The connection's ports (local, remote): TLS connections' exchanges are measured where no
    /// socket can be read (see [`ExchangeState::ports`]).
    pub ports: [u16; 2],
    /// The socket is the server end.
    pub server: u8,
    pub _pad: [u8; 7],
}
const _: () = assert!(size_of::<Promotion>() == 24);

/// The index of the exchange whose response starts at `turns` on a connection anchored at
/// (`anchor_index`, `anchor_turns`).
#[inline]
#[must_use]
pub const fn exchange_index(anchor_index: u64, anchor_turns: u32, turns: u32) -> u64 {
    anchor_index + (turns.wrapping_sub(anchor_turns) / 2) as u64
}

/// The number both ends of one exchange compute for the sampling decision: the connection's two
/// ports in a fixed order and the exchange's position (splitmix64's finaliser spreads it).
#[inline]
#[must_use]
pub const fn sample_key(port_a: u16, port_b: u16, index: u64) -> u64 {
    let (lo, hi) = if port_a <= port_b { (port_a, port_b) } else { (port_b, port_a) };
    let mut x = ((lo as u64) << 16 | hi as u64) ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Whether the exchange at `index` between ports `port_a` and `port_b` is the sample's: one in
/// `sample`, the same ones at both ends.
#[inline]
#[must_use]
pub const fn sampled(port_a: u16, port_b: u16, index: u64, sample: u32) -> bool {
    let n = if sample == 0 { 1 } else { sample as u64 };
    sample_key(port_a, port_b, index).is_multiple_of(n)
}

/// The status code of an HTTP/1 status line (`HTTP/1.x NNN`), `None` for anything else.
#[inline]
#[must_use]
pub fn http_status(b: &[u8; 16]) -> Option<u16> {
    if b[0] != b'H' || b[1] != b'T' || b[2] != b'T' || b[3] != b'P' || b[4] != b'/' {
        return None;
    }
    if b[5] != b'1' || b[6] != b'.' || b[8] != b' ' {
        return None;
    }
    let d = |c: u8| if c.is_ascii_digit() { Some(u16::from(c - b'0')) } else { None };
    let code = d(b[9])? * 100 + d(b[10])? * 10 + d(b[11])?;
    if code < 100 { None } else { Some(code) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_index_advances_one_per_two_turns_from_the_anchor() {
        assert_eq!(exchange_index(7, 15, 15), 7);
        assert_eq!(exchange_index(7, 15, 17), 8);
        assert_eq!(exchange_index(7, 15, 21), 10);
        assert_eq!(exchange_index(0, u32::MAX, 1), 1, "the turn counter wraps");
    }

    #[test]
    fn both_ends_sample_the_same_exchanges() {
        for i in 0..100 {
            assert_eq!(sample_key(40_000, 80, i), sample_key(80, 40_000, i));
        }
        let hits = (0..10_000).filter(|&i| sample_key(40_000, 80, i).is_multiple_of(100)).count();
        assert!((50..=150).contains(&hits), "{hits} of 10000 sampled at 1 in 100");
    }

    #[test]
    fn status_lines_and_not() {
        let line = |s: &[u8]| {
            let mut b = [0u8; 16];
            let n = s.len().min(16);
            b[..n].copy_from_slice(&s[..n]);
            http_status(&b)
        };
        assert_eq!(line(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(line(b"HTTP/1.0 503 Se"), Some(503));
        assert_eq!(line(b"HTTP/2 200"), None);
        assert_eq!(line(b"HTTP/1.1 20x"), None);
        assert_eq!(line(b"GET / HTTP/1.1"), None);
        assert_eq!(line(b"HTTP/1.1 099 "), None);
    }
}
