//! One direction of a connection as a byte stream rebuilt from captured syscall data.
//!
//! The kernel sends a bounded prefix of each read/write, so the stream has gaps: the uncaptured
//! tail of a long message. A parser that learns a message's length from its header can step over
//! a gap (its bytes are skipped as they would have arrived); one that cannot (a body without a
//! length) loses its place, and the stream resynchronises at the next syscall boundary, where a
//! new message most likely starts.

use std::collections::VecDeque;

use hopwatch_protocols::{Frame, ParseError};

/// Bytes kept waiting for a message's end; beyond this the stream resynchronises.
pub(crate) const MAX_BUFFERED: usize = 64 * 1024;

/// A parsed message and when its first byte was seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Message<T> {
    pub msg: T,
    /// Monotonic ns of the syscall that carried the message's first byte.
    pub first_ns: u64,
    /// Monotonic ns of the syscall that carried its last captured byte.
    pub last_ns: u64,
}

/// What the stream could not keep.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StreamStats {
    /// Times the stream lost its place and restarted at a syscall boundary.
    pub resyncs: u64,
    /// Bytes a parser rejected.
    pub parse_errors: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Stream {
    /// Known bytes not consumed yet, from a message boundary (or a resync point).
    data: Vec<u8>,
    /// Stream bytes to discard before `data` may grow again (rest of a message already framed).
    skip: u64,
    /// Unknown bytes that follow `data` (uncaptured tail of the last syscall).
    gap: u64,
    /// Syscall boundaries inside `data`: (offset, monotonic ns).
    chunks: VecDeque<(usize, u64)>,
    pub stats: StreamStats,
}

impl Stream {
    /// Appends one syscall's data: `captured` is the prefix the kernel copied of `total` bytes.
    pub(crate) fn push(&mut self, captured: &[u8], total: u64, ts: u64) {
        let captured =
            &captured[..captured.len().min(usize::try_from(total).unwrap_or(usize::MAX))];
        if self.gap > 0 {
            // The previous call's tail is unknown and nothing could frame across it: whatever
            // is buffered cannot be completed. Start again at this call.
            self.resync();
        }
        let mut offset = 0u64;
        if self.skip > 0 {
            let skipped = self.skip.min(total);
            self.skip -= skipped;
            offset = skipped;
            if offset == total {
                return;
            }
        }
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(captured.len());
        let known = &captured[start..];
        if self.data.len() + known.len() > MAX_BUFFERED {
            self.resync();
            return;
        }
        self.chunks.push_back((self.data.len(), ts));
        self.data.extend_from_slice(known);
        self.gap = total - offset - known.len() as u64;
    }

    fn resync(&mut self) {
        if !self.data.is_empty() || self.gap > 0 {
            self.stats.resyncs += 1;
        }
        self.data.clear();
        self.chunks.clear();
        self.gap = 0;
        self.skip = 0;
    }

    /// Frames and parses the next message the buffered bytes hold, stepping over messages to
    /// skip and bytes the parser rejects; `None` when more bytes are needed.
    pub(crate) fn next<T>(
        &mut self,
        parse: impl FnMut(&[u8]) -> Result<Frame<T>, ParseError>,
    ) -> Option<Message<T>> {
        self.next_or_cut(parse, |_| None)
    }

    /// [`Stream::next`], and when a message's end is in the uncaptured tail of the last
    /// syscall, `cut` may still take it as a message ending with that syscall (a line reply
    /// written in one call, longer than the capture).
    pub(crate) fn next_or_cut<T>(
        &mut self,
        mut parse: impl FnMut(&[u8]) -> Result<Frame<T>, ParseError>,
        mut cut: impl FnMut(&[u8]) -> Option<T>,
    ) -> Option<Message<T>> {
        while !self.data.is_empty() {
            let first_ns = self.chunks.front().map_or(0, |c| c.1);
            match parse(&self.data) {
                Ok(Frame::Complete { msg, len }) => {
                    let last_ns = self.consume(len);
                    return Some(Message { msg, first_ns, last_ns });
                }
                Ok(Frame::Skip { len }) => {
                    self.consume(len);
                }
                Ok(Frame::Incomplete) => {
                    if self.gap > 0 {
                        if self.chunks.len() == 1
                            && let Some(msg) = cut(&self.data)
                        {
                            let len = self.data.len() + usize::try_from(self.gap).unwrap_or(0);
                            let last_ns = self.consume(len);
                            return Some(Message { msg, first_ns, last_ns });
                        }
                        // The rest of the header is in bytes we will never see.
                        self.resync();
                    }
                    return None;
                }
                Err(_) => {
                    self.stats.parse_errors += 1;
                    self.drop_to_next_chunk();
                }
            }
        }
        None
    }

    /// Removes a framed message of `len` bytes; returns the timestamp of its last known chunk.
    fn consume(&mut self, len: usize) -> u64 {
        let len = len.max(1);
        let have = self.data.len();
        // Chunks starting inside the message; the last one may run past its end.
        let mut last = None;
        while let Some(&(off, ts)) = self.chunks.front() {
            if off >= len {
                break;
            }
            last = Some(ts);
            self.chunks.pop_front();
        }
        let last_ns = last.unwrap_or(0);
        if len <= have {
            self.data.drain(..len);
            for c in &mut self.chunks {
                c.0 -= len;
            }
            // The next message starts inside the last chunk: keep that boundary.
            if !self.data.is_empty() && self.chunks.front().is_none_or(|c| c.0 > 0) {
                self.chunks.push_front((0, last_ns));
            }
            return last_ns;
        }
        // The message runs past what we have: the rest is in the gap and beyond.
        let rest = (len - have) as u64;
        self.data.clear();
        self.chunks.clear();
        if self.gap >= rest {
            // It ends inside the gap; the next message starts in unknown bytes.
            if self.gap > rest {
                self.stats.resyncs += 1;
            }
        } else {
            self.skip = rest - self.gap;
        }
        self.gap = 0;
        last_ns
    }

    /// After a parse error: drop bytes up to the next syscall boundary, where a message may start.
    fn drop_to_next_chunk(&mut self) {
        self.chunks.pop_front();
        if let Some((off, _)) = self.chunks.front().copied() {
            self.data.drain(..off);
            for c in &mut self.chunks {
                c.0 -= off;
            }
        } else {
            self.data.clear();
            self.gap = 0;
        }
    }

    #[cfg(test)]
    fn buffered(&self) -> usize {
        self.data.len()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A toy protocol for stream tests: `<len>:<payload>` where `len` is the payload length in
    /// decimal; the whole message is `digits + 1 + len` bytes.
    pub(crate) fn toy(buf: &[u8]) -> Result<Frame<String>, ParseError> {
        let Some(colon) = buf.iter().position(|&b| b == b':') else {
            if buf.iter().all(u8::is_ascii_digit) && buf.len() < 8 {
                return Ok(Frame::Incomplete);
            }
            return Err(ParseError::Malformed { protocol: "toy", reason: "no colon" });
        };
        let n: usize = std::str::from_utf8(&buf[..colon])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or(ParseError::Malformed { protocol: "toy", reason: "bad length" })?;
        let body = &buf[colon + 1..];
        let shown = String::from_utf8_lossy(&body[..body.len().min(n)]).into_owned();
        Ok(Frame::Complete { msg: shown, len: colon + 1 + n })
    }

    fn all(s: &mut Stream) -> Vec<Message<String>> {
        std::iter::from_fn(|| s.next(toy)).collect()
    }

    fn drain(s: &mut Stream) -> Vec<String> {
        all(s).into_iter().map(|m| m.msg).collect()
    }

    #[test]
    fn frames_pipelined_messages_in_one_call_and_split_across_calls() {
        let mut s = Stream::default();
        // A header split across calls waits; a body still arriving is stepped over once its
        // length is known (latency needs the header, not the body).
        s.push(b"3:abc1", 6, 1);
        assert_eq!(drain(&mut s), vec!["abc"]);
        s.push(b"0:hellowor", 10, 2);
        let out = all(&mut s);
        assert_eq!(out[0].msg, "hellowor");
        assert_eq!((out[0].first_ns, out[0].last_ns), (1, 2));
        s.push(b"ld2:xy", 6, 3);
        assert_eq!(drain(&mut s), vec!["xy"]);
        assert_eq!(s.buffered(), 0);
        assert_eq!(s.stats, StreamStats::default());
    }

    #[test]
    fn skips_the_uncaptured_body_of_a_long_message() {
        let mut s = Stream::default();
        // A 20-byte payload of which only 6 bytes were captured, then the rest arrives in a
        // second call, then a new message.
        s.push(b"20:abc", 23, 1);
        assert_eq!(drain(&mut s), vec!["abc"]);
        s.push(b"", 0, 2);
        s.push(b"2:ok", 4, 3);
        assert_eq!(drain(&mut s), vec!["ok"], "the gap was skipped exactly");
        assert_eq!(s.stats.resyncs, 0);
        // Body split over two later calls: skip carries over.
        s.push(b"10:12", 13, 4);
        assert_eq!(drain(&mut s), vec!["12"]);
        s.push(b"3456", 4, 5);
        s.push(b"7890", 4, 6);
        s.push(b"1:z", 3, 7);
        assert_eq!(drain(&mut s), vec!["z"]);
    }

    #[test]
    fn resyncs_at_the_next_call_after_garbage_or_a_lost_header() {
        let mut s = Stream::default();
        s.push(b"garbage!", 8, 1);
        s.push(b"2:ok", 4, 2);
        assert_eq!(drain(&mut s), vec!["ok"]);
        assert_eq!(s.stats.parse_errors, 1);
        // A header cut by the capture limit can never complete: drop it at the next call.
        s.push(b"12", 9, 3);
        assert!(drain(&mut s).is_empty());
        s.push(b"1:a", 3, 4);
        assert_eq!(drain(&mut s), vec!["a"]);
        assert_eq!(s.stats.resyncs, 1);
    }

    #[test]
    fn memory_stays_bounded() {
        let mut s = Stream::default();
        for i in 0..100 {
            s.push(&[b'9'; 1000], 1000, i);
            let _ = drain(&mut s);
            assert!(s.buffered() <= MAX_BUFFERED);
        }
    }
}
