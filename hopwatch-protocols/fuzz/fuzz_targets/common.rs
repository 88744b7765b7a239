//! The driver every parser target shares: it plays the input through a `Parser` the way the
//! agent's session layer does and checks the contract (no panic, no frame of length 0, no kept
//! text longer than `MAX_TEXT`).
//!
//! Input layout: byte 0 holds flags (bit 0: keep full statements; bits 1-7: directions of the
//! first chunks, 1 = client to server, then alternating), byte 1 the chunk size minus one;
//! the rest is the byte stream, cut into chunks of that size.

use std::collections::VecDeque;

use hopwatch_protocols::{Frame, MAX_TEXT, Parser, Protocol, Redaction, Request, Response};

pub fn drive(data: &[u8], new: impl Fn(Redaction) -> Parser) {
    let [flags, size, stream @ ..] = data else { return };
    let redaction = Redaction { keep_full_statements: flags & 1 == 1 };
    let mut parser = new(redaction);
    let mut pending: VecDeque<Request> = VecDeque::new();
    let mut bufs = [Vec::new(), Vec::new()];
    let mut to_skip = [0usize; 2];
    for (i, chunk) in stream.chunks(usize::from(*size) + 1).enumerate() {
        let up = if i < 7 { flags >> (i + 1) & 1 == 1 } else { i % 2 == 0 };
        let d = usize::from(!up);
        let skip = to_skip[d].min(chunk.len());
        to_skip[d] -= skip;
        bufs[d].extend_from_slice(&chunk[skip..]);
        while !bufs[d].is_empty() {
            let frame = if up {
                parser.request(&bufs[d]).map(|f| match f {
                    Frame::Complete { msg, len } => {
                        check(&msg, None);
                        pending.push_back(msg);
                        Some(len)
                    }
                    Frame::Skip { len } => Some(len),
                    Frame::Incomplete => None,
                })
            } else {
                parser.response(&bufs[d], pending.front()).map(|f| match f {
                    Frame::Complete { msg, len } => {
                        if let Some(req) = pending.pop_front() {
                            check(&req, Some(&msg));
                        }
                        Some(len)
                    }
                    Frame::Skip { len } => Some(len),
                    Frame::Incomplete => None,
                })
            };
            match frame {
                Ok(Some(len)) => {
                    assert!(len > 0, "frame of length 0");
                    if len <= bufs[d].len() {
                        bufs[d].drain(..len);
                    } else {
                        to_skip[d] = len - bufs[d].len();
                        bufs[d].clear();
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    bufs[d].clear();
                    break;
                }
            }
        }
        if pending.len() > 64 {
            pending.pop_front();
        }
    }
}

/// Every text the exchange keeps is at most `MAX_TEXT` bytes, Redis arguments together too,
/// and its failure (if any) is named.
pub fn check(req: &Request, resp: Option<&Response>) {
    for t in req.texts(resp) {
        assert!(t.len() <= MAX_TEXT, "text of {} bytes", t.len());
    }
    if let Request::Redis(r) = req {
        assert!(r.args.iter().map(String::len).sum::<usize>() <= MAX_TEXT);
    }
    if let Some(why) = req.failure(resp) {
        assert!(!why.is_empty() && why.len() <= MAX_TEXT, "failure {why:?}");
    }
}

#[allow(dead_code, reason = "not every target needs it")]
pub fn parser(p: Protocol) -> impl Fn(Redaction) -> Parser {
    move |r| Parser::new(p, r)
}
