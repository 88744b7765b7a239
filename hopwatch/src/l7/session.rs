//! One connection's application exchanges: its two streams, the requests waiting for an answer,
//! and the exchanges completed, matched FIFO (HTTP/1.1, PostgreSQL, Redis and MySQL answer in
//! order) or by the protocol's own id (DNS).

use std::collections::VecDeque;

use hopwatch_protocols::{Frame, ParseError};

#[cfg(test)]
use super::stream::StreamStats;
use super::stream::{Message, Stream};

/// Requests waiting for a response, per connection; older ones are reported as unanswered.
pub(crate) const MAX_PENDING: usize = 128;

/// What a session needs from a protocol parser (implemented by `protocols::Parser`).
pub(crate) trait MessageParser {
    type Req;
    type Resp;
    fn request(&mut self, buf: &[u8]) -> Result<Frame<Self::Req>, ParseError>;
    fn response(
        &mut self,
        buf: &[u8],
        pending: Option<&Self::Req>,
    ) -> Result<Frame<Self::Resp>, ParseError>;
    /// Whether `resp` answers `req`; protocols that answer in order keep the default.
    fn answers(_req: &Self::Req, _resp: &Self::Resp) -> bool {
        true
    }
    /// False for requests the server never answers (they are not waited for).
    fn expects_response(_req: &Self::Req) -> bool {
        true
    }
    /// The response at the start of `buf`, whose end is in the uncaptured tail of the syscall
    /// that carried it (see `Stream::next_or_cut`); `None` when the protocol cannot tell.
    fn response_cut(&mut self, _buf: &[u8]) -> Option<Self::Resp> {
        None
    }
    /// For a response the server sent before any request (an error greeting that refuses the
    /// connection): the request it answers, the connection itself. `None` for other responses.
    fn server_first(_resp: &Self::Resp) -> Option<Self::Req> {
        None
    }
    /// Whether the kernel's exchange engine can measure this protocol (see
    /// `hopwatch_common::exchange`).
    fn fast_path(&self) -> bool {
        false
    }
    /// The response the kernel's exchange engine read as `status`, for when its first bytes do
    /// not frame a whole response.
    fn status_response(_status: u16) -> Option<Self::Resp> {
        None
    }
}

/// A request and, unless it timed out, its response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Exchange<Req, Resp> {
    pub request: Req,
    pub response: Option<Resp>,
    /// Monotonic ns: request seen (its last byte written / first byte read).
    pub request_ns: u64,
    /// Monotonic ns: response seen; 0 when it timed out.
    pub response_ns: u64,
    /// Position of this exchange on its connection (0-based), to pair it with the other end.
    pub index: u64,
}

impl<Req, Resp> Exchange<Req, Resp> {
    pub(crate) fn latency_ns(&self) -> u64 {
        self.response_ns.saturating_sub(self.request_ns)
    }
}

/// What a session could not keep.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[cfg(test)]
pub(crate) struct SessionStats {
    pub requests: StreamStats,
    pub responses: StreamStats,
    /// Responses with no request waiting (e.g. the request preceded the agent).
    pub unmatched_responses: u64,
    /// Requests dropped because too many were waiting.
    pub pending_overflow: u64,
}

pub(crate) struct Session<P: MessageParser> {
    parser: P,
    requests: Stream,
    responses: Stream,
    pending: VecDeque<Message<P::Req>>,
    next_index: u64,
    /// Monotonic ns the connection was established, 0 if unknown.
    opened_ns: u64,
    /// A request or a response was framed: a response now is no longer the server's first word.
    started: bool,
    /// A request was sent while another waited for its answer.
    pipelined: bool,
    pub unmatched_responses: u64,
    pub pending_overflow: u64,
}

impl<P: MessageParser> Session<P> {
    pub(crate) fn new(parser: P, opened_ns: u64) -> Self {
        Self {
            parser,
            requests: Stream::default(),
            responses: Stream::default(),
            pending: VecDeque::new(),
            next_index: 0,
            opened_ns,
            started: false,
            pipelined: false,
            unmatched_responses: 0,
            pending_overflow: 0,
        }
    }

    #[cfg(test)]
    pub(crate) fn stats(&self) -> SessionStats {
        SessionStats {
            requests: self.requests.stats,
            responses: self.responses.stats,
            unmatched_responses: self.unmatched_responses,
            pending_overflow: self.pending_overflow,
        }
    }

    /// Request-direction data (client → server).
    pub(crate) fn on_request_data(&mut self, captured: &[u8], total: u64, ts: u64) {
        self.requests.push(captured, total, ts);
        let parser = &mut self.parser;
        while let Some(m) = self.requests.next(|b| parser.request(b)) {
            self.started = true;
            if !P::expects_response(&m.msg) {
                continue;
            }
            self.pipelined |= !self.pending.is_empty();
            if self.pending.len() >= MAX_PENDING {
                self.pending.pop_front();
                self.pending_overflow += 1;
            }
            self.pending.push_back(m);
        }
    }

    /// Response-direction data (server → client); returns the exchanges it completes.
    pub(crate) fn on_response_data(
        &mut self,
        captured: &[u8],
        total: u64,
        ts: u64,
    ) -> Vec<Exchange<P::Req, P::Resp>> {
        self.responses.push(captured, total, ts);
        let mut done = Vec::new();
        // One response at a time: the parser may need the request it answers.
        loop {
            let pending = self.pending.front().map(|m| &m.msg);
            let parser = std::cell::RefCell::new(&mut self.parser);
            let Some(resp) = self.responses.next_or_cut(
                |b| parser.borrow_mut().response(b, pending),
                |b| parser.borrow_mut().response_cut(b),
            ) else {
                break;
            };
            let first = !std::mem::replace(&mut self.started, true);
            let position = self.pending.iter().position(|p| P::answers(&p.msg, &resp.msg));
            if position.is_none()
                && first
                && let Some(request) = P::server_first(&resp.msg)
            {
                // Measured from the connection's establishment when it is known and earlier.
                let opened = self.opened_ns;
                let request_ns =
                    if opened != 0 && opened <= resp.first_ns { opened } else { resp.first_ns };
                done.push(Exchange {
                    request,
                    response: Some(resp.msg),
                    request_ns,
                    response_ns: resp.first_ns,
                    index: self.next_index,
                });
                self.next_index += 1;
                continue;
            }
            match position.and_then(|i| self.pending.remove(i)) {
                Some(req) => {
                    done.push(Exchange {
                        request: req.msg,
                        response: Some(resp.msg),
                        request_ns: req.last_ns,
                        response_ns: resp.first_ns,
                        index: self.next_index,
                    });
                    self.next_index += 1;
                }
                None => self.unmatched_responses += 1,
            }
        }
        done
    }

    /// Requests unanswered since before `deadline_ns`, reported as timed out.
    pub(crate) fn expire(&mut self, deadline_ns: u64) -> Vec<Exchange<P::Req, P::Resp>> {
        let mut out = Vec::new();
        while self.pending.front().is_some_and(|m| m.last_ns < deadline_ns) {
            let req = self.pending.pop_front().expect("checked");
            out.push(Exchange {
                request: req.msg,
                response: None,
                request_ns: req.last_ns,
                response_ns: 0,
                index: self.next_index,
            });
            self.next_index += 1;
        }
        out
    }

    #[cfg(test)]
    pub(crate) fn pending(&self) -> usize {
        self.pending.len()
    }

    pub(crate) fn parser(&self) -> &P {
        &self.parser
    }

    /// Every exchange so far was one request answered by one response, nothing is waiting, and
    /// nothing was lost: what the kernel's exchange engine takes over from.
    pub(crate) fn alternating(&self) -> bool {
        !self.pipelined
            && self.pending.is_empty()
            && self.unmatched_responses == 0
            && self.pending_overflow == 0
    }

    /// The requests waiting for an answer, dropped: the kernel measures the connection now.
    pub(crate) fn forget_pending(&mut self) {
        self.pending.clear();
    }

    /// The oldest request waiting for an answer.
    pub(crate) fn take_pending(&mut self) -> Option<Message<P::Req>> {
        self.pending.pop_front()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::l7::stream::tests::toy;

    /// Requests and responses in the toy framing; a response "!<id>" answers request "<id>",
    /// anything else answers in order.
    pub(crate) struct Toy;

    impl MessageParser for Toy {
        type Req = String;
        type Resp = String;
        fn request(&mut self, buf: &[u8]) -> Result<Frame<String>, ParseError> {
            toy(buf)
        }
        fn response(
            &mut self,
            buf: &[u8],
            _: Option<&String>,
        ) -> Result<Frame<String>, ParseError> {
            toy(buf)
        }
        fn answers(req: &String, resp: &String) -> bool {
            resp.strip_prefix('!').is_none_or(|id| id == req)
        }
        fn fast_path(&self) -> bool {
            true
        }
        fn status_response(status: u16) -> Option<String> {
            Some(format!("status {status}"))
        }
    }

    #[test]
    fn pipelined_requests_are_answered_in_order_with_latencies() {
        let mut s = Session::new(Toy, 0);
        s.on_request_data(b"1:a1:b1:c", 9, 100);
        assert_eq!(s.pending(), 3);
        let done = s.on_response_data(b"2:ra2:rb", 8, 150);
        assert_eq!(done.len(), 2);
        assert_eq!((done[0].request.as_str(), done[0].response.as_deref()), ("a", Some("ra")));
        assert_eq!((done[1].request.as_str(), done[1].index), ("b", 1));
        assert_eq!(done[0].latency_ns(), 50);
        let done = s.on_response_data(b"2:rc", 4, 170);
        assert_eq!((done[0].request.as_str(), done[0].latency_ns()), ("c", 70));
    }

    #[test]
    fn out_of_order_answers_match_by_id_and_unanswered_requests_time_out() {
        let mut s = Session::new(Toy, 0);
        s.on_request_data(b"1:x", 3, 10);
        s.on_request_data(b"1:y", 3, 20);
        let done = s.on_response_data(b"2:!y", 4, 30);
        assert_eq!((done[0].request.as_str(), done[0].latency_ns()), ("y", 10));
        let expired = s.expire(25);
        assert_eq!(expired.len(), 1);
        assert_eq!((expired[0].request.as_str(), expired[0].response.as_deref()), ("x", None));
        assert!(s.on_response_data(b"2:!z", 4, 40).is_empty());
        assert_eq!(s.stats().unmatched_responses, 1);
    }

    /// The toy's server-first error: "E" before any request answers the connection ("connect").
    struct Greeter;

    impl MessageParser for Greeter {
        type Req = String;
        type Resp = String;
        fn request(&mut self, buf: &[u8]) -> Result<Frame<String>, ParseError> {
            toy(buf)
        }
        fn response(
            &mut self,
            buf: &[u8],
            _: Option<&String>,
        ) -> Result<Frame<String>, ParseError> {
            toy(buf)
        }
        fn response_cut(&mut self, buf: &[u8]) -> Option<String> {
            // Digits the toy cannot frame without their colon: an error line cut short.
            buf.iter().all(u8::is_ascii_digit).then(|| "E".to_owned())
        }
        fn server_first(resp: &String) -> Option<String> {
            (resp == "E").then(|| "connect".to_owned())
        }
    }

    #[test]
    fn an_error_before_any_request_is_an_exchange_from_the_connections_start() {
        let mut s = Session::new(Greeter, 1000);
        let done = s.on_response_data(b"1:E", 3, 1500);
        assert_eq!(done.len(), 1);
        assert_eq!((done[0].request.as_str(), done[0].response.as_deref()), ("connect", Some("E")));
        assert_eq!(done[0].latency_ns(), 500, "from the connection's establishment");
        // Later, and once requests were seen, an unasked response is just unmatched.
        assert!(s.on_response_data(b"1:E", 3, 1600).is_empty());
        let mut s = Session::new(Greeter, 0);
        s.on_request_data(b"1:q", 3, 10);
        let done = s.on_response_data(b"1:E", 3, 30);
        assert_eq!((done[0].request.as_str(), done[0].latency_ns()), ("q", 20));
    }

    #[test]
    fn a_response_longer_than_the_capture_can_end_with_its_call() {
        let mut s = Session::new(Greeter, 0);
        s.on_request_data(b"1:q", 3, 10);
        // 11 bytes written, 5 captured: a message whose end is not known.
        let done = s.on_response_data(b"12345", 11, 40);
        assert_eq!((done[0].request.as_str(), done[0].response.as_deref()), ("q", Some("E")));
        // The stream is at a message boundary again.
        s.on_request_data(b"1:r", 3, 50);
        let done = s.on_response_data(b"1:s", 3, 60);
        assert_eq!((done[0].request.as_str(), done[0].response.as_deref()), ("r", Some("s")));
    }
}
