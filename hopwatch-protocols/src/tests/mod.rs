//! Tests on byte streams recorded from real servers (`../fixtures/`, see its README), and
//! property tests on arbitrary and re-split input.
//!
//! [`replay`] plays a recorded connection through a [`Parser`] the way the session layer does:
//! it keeps the unparsed bytes of each direction, frames as many messages as it can after each
//! chunk, skips bytes a frame covers past the buffer as they arrive, pairs responses with the
//! oldest pending request, and after an error drops what it holds and starts again at the next
//! chunk. On the way it checks the parts of the contract that hold for any input.

mod fixtures;
mod props;
mod regressions;

use std::collections::VecDeque;

use super::{Frame, MAX_TEXT, ParseError, Parser, Request, Response};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dir {
    /// Client to server.
    Up,
    /// Server to client.
    Down,
}

/// One recorded connection: the chunks each side sent, in arrival order.
pub(super) type Conn = Vec<(Dir, Vec<u8>)>;

/// The connections of a transcript (`relay.py`'s format).
pub(super) fn transcript(text: &str) -> Vec<Conn> {
    let mut conns: Vec<Conn> = Vec::new();
    for line in text.lines() {
        if line.starts_with("# connection") {
            conns.push(Vec::new());
        }
        let (dir, hex) = match line.split_once(' ') {
            Some((">", hex)) => (Dir::Up, hex),
            Some(("<", hex)) => (Dir::Down, hex),
            _ => continue,
        };
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("transcript hex"))
            .collect();
        if conns.is_empty() {
            conns.push(Vec::new()); // datagram transcripts have no connection lines
        }
        conns.last_mut().expect("pushed above").push((dir, bytes));
    }
    assert!(!conns.is_empty(), "transcript without connections");
    conns
}

/// What a replay saw.
#[derive(Debug, Default)]
pub(super) struct Replay {
    /// Requests with their responses, in the order they completed (unanswered ones last).
    pub exchanges: Vec<(Request, Option<Response>)>,
    /// Responses with no pending request.
    pub unpaired: Vec<Response>,
    pub skips: usize,
    pub errors: Vec<ParseError>,
}

#[derive(Default)]
struct Stream {
    buf: Vec<u8>,
    to_skip: usize,
}

impl Stream {
    fn push(&mut self, mut chunk: &[u8]) {
        let skip = self.to_skip.min(chunk.len());
        self.to_skip -= skip;
        chunk = &chunk[skip..];
        self.buf.extend_from_slice(chunk);
    }

    fn consume(&mut self, len: usize) {
        if len <= self.buf.len() {
            self.buf.drain(..len);
        } else {
            self.to_skip = len - self.buf.len();
            self.buf.clear();
        }
    }
}

/// Plays `conn` through `parser`. `datagrams`: every chunk is a message of its own (DNS over
/// UDP), nothing carries over.
pub(super) fn replay(mut parser: Parser, conn: &Conn, datagrams: bool) -> Replay {
    let mut out = Replay::default();
    let mut pending: VecDeque<Request> = VecDeque::new();
    let (mut up, mut down) = (Stream::default(), Stream::default());
    for (dir, chunk) in conn {
        let stream = if *dir == Dir::Up { &mut up } else { &mut down };
        if datagrams {
            *stream = Stream::default();
        }
        stream.push(chunk);
        // Bounded: every frame consumes at least one byte, or the loop ends.
        for _ in 0..=stream.buf.len() {
            if stream.buf.is_empty() {
                break;
            }
            let errors_before = out.errors.len();
            let len = match *dir {
                Dir::Up => match parser.request(&stream.buf) {
                    Ok(Frame::Complete { msg, len }) => {
                        if msg.expects_response() {
                            pending.push_back(msg);
                        } else {
                            out.exchanges.push((msg, None));
                        }
                        Some(len)
                    }
                    other => frame_len(other, &mut out),
                },
                Dir::Down => match parser.response(&stream.buf, pending.front()) {
                    Ok(Frame::Complete { msg, len }) => {
                        match pending.iter().position(|q| q.matches(&msg)) {
                            Some(i) => {
                                let req = pending.remove(i).expect("index from position");
                                out.exchanges.push((req, Some(msg)));
                            }
                            None => out.unpaired.push(msg),
                        }
                        Some(len)
                    }
                    other => frame_len(other, &mut out),
                },
            };
            let Some(len) = len else {
                if out.errors.len() > errors_before {
                    // Resynchronise at the next chunk, as the session does.
                    *stream = Stream::default();
                }
                break;
            };
            assert!(
                len > 0,
                "a frame of length 0 ({:?}, {:?}) at {:02x?}",
                parser.protocol(),
                dir,
                &stream.buf[..stream.buf.len().min(64)]
            );
            stream.consume(len);
        }
        if datagrams {
            stream.buf.clear();
        }
    }
    out.exchanges.extend(pending.into_iter().map(|q| (q, None)));
    for (req, resp) in &out.exchanges {
        for text in req.texts(resp.as_ref()) {
            assert!(text.len() <= MAX_TEXT, "kept text of {} bytes: {text:.80}", text.len());
        }
        if let Request::Redis(r) = req {
            let args: usize = r.args.iter().map(String::len).sum();
            assert!(args <= MAX_TEXT, "{args} bytes of Redis arguments");
        }
    }
    out
}

/// The length of a Skip; `None` (stop for now) for Incomplete, or after an error, which drops
/// what the stream holds.
fn frame_len<T>(f: Result<Frame<T>, ParseError>, out: &mut Replay) -> Option<usize> {
    match f {
        Ok(Frame::Skip { len }) => {
            out.skips += 1;
            Some(len)
        }
        Ok(Frame::Complete { .. }) => unreachable!("handled by the caller"),
        Ok(Frame::Incomplete) => None,
        Err(e) => {
            out.errors.push(e);
            None
        }
    }
}
