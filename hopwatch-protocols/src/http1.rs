//! HTTP/1.0 and HTTP/1.1 (RFC 9112) requests and responses.
//!
//! # Message length
//!
//! A message is its head (start line and headers, at most [`MAX_HEAD`] bytes) plus a body whose
//! length comes from, in order: no body (requests without `Content-Length`/`Transfer-Encoding`;
//! responses to `HEAD`, `1xx`, `204`, `304`, and `2xx` to `CONNECT`), chunked
//! `Transfer-Encoding`, `Content-Length`, and for responses otherwise the rest of the connection.
//!
//! The message is framed as soon as its head is in the buffer, so the reported time is that of
//! its first byte and a large body never has to be buffered:
//! - `Content-Length`: [`Frame::Complete`] whose `len` covers the body, even past the buffer.
//! - Chunked: the chunk sizes are walked as far as the buffer allows. If the buffer holds the
//!   whole body, `len` covers it. Otherwise the message length is not known yet: `len` ends where
//!   the walk stopped (at the end of the last chunk that starts in the buffer, which may lie past
//!   it, or at the start of a chunk-size line that is not complete), and the parser remembers
//!   that it is inside a chunked body. Its next calls on that direction return [`Frame::Skip`]
//!   frames for the rest of the chunks (again walking as far as each buffer allows), up to and
//!   including the last chunk and trailers; then framing resumes with the next message.
//! - Until the connection closes (a response without a length, and everything after `101` or a
//!   successful `CONNECT`, in both directions): the first frame covers the buffer, and every
//!   later call returns a `Skip` over the whole buffer it is given.
//!
//! `1xx` responses other than `101` are interim: they are skipped, and the final response that
//! follows is paired with the request. Requests may be pipelined: each call frames one.
//!
//! # What is kept
//!
//! Method, path (its query string and fragment stripped unless [`Redaction`] keeps full
//! statements), version, `Host`, keep-alive, status, and the values of `X-Request-ID`,
//! `X-Correlation-ID`, `traceparent` and `CF-Ray` (request ids, for request tracing), and of
//! `X-Forwarded-For`, `Forwarded`, `X-Real-IP` and `CF-Connecting-IP` (the client behind a
//! proxy). No other header value is kept, so `Authorization`,
//! `Cookie` and `Set-Cookie` never leave the parser.

use std::borrow::Cow;

use super::{Frame, MAX_TEXT, ParseError, Redaction, sql::capped_text};

/// Longest request or response head (start line and headers) accepted, in bytes.
pub const MAX_HEAD: usize = 64 * 1024;
/// Longest header value kept (request ids, trace context).
const MAX_HEADER_VALUE: usize = 256;
/// Longest chunk-size line (size, extensions) accepted.
const MAX_CHUNK_LINE: usize = 1024;
/// Headers whose values are kept, as written in records.
const KEPT_HEADERS: [&str; 8] = [
    "x-request-id",
    "x-correlation-id",
    "traceparent",
    "cf-ray",
    "x-forwarded-for",
    "forwarded",
    "x-real-ip",
    "cf-connecting-ip",
];

const fn malformed(reason: &'static str) -> ParseError {
    ParseError::Malformed { protocol: "http", reason }
}

const fn not_http(reason: &'static str) -> ParseError {
    ParseError::NotThisProtocol { protocol: "http", reason }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

impl Version {
    pub const fn as_str(self) -> &'static str {
        match self {
            Version::Http10 => "HTTP/1.0",
            Version::Http11 => "HTTP/1.1",
        }
    }
}

/// A kept header: its lower-case name and its value (at most 256 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: &'static str,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: Cow<'static, str>,
    /// Request target without query string (unless full statements are kept).
    pub path: String,
    pub version: Version,
    /// `Host` header, empty when absent.
    pub host: String,
    /// Whether the client lets the connection stay open after the response.
    pub keep_alive: bool,
    pub headers: Vec<Header>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub version: Version,
    pub keep_alive: bool,
    pub headers: Vec<Header>,
}

/// Where a direction of the connection is, between calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Body {
    /// At a message boundary.
    #[default]
    Idle,
    /// Inside a chunked body.
    Chunked(Chunked),
    /// Everything until the connection closes belongs to the last message (or to a tunnel).
    UntilEof,
}

/// Position inside a chunked body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunked {
    /// At a chunk-size line.
    Size,
    /// In a chunk: this many bytes of data and its CRLF remain.
    Data(u64),
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
}

/// The HTTP/1 state of one connection.
#[derive(Debug, Default)]
pub struct Parser {
    redaction: Redaction,
    request_body: Body,
    response_body: Body,
}

impl Parser {
    pub fn new(redaction: Redaction) -> Self {
        Parser { redaction, ..Parser::default() }
    }

    /// Frames the request (or the rest of a request body) at the start of `buf`.
    pub fn request(&mut self, buf: &[u8]) -> Result<Frame<Request>, ParseError> {
        if let Some(frame) = continue_body(&mut self.request_body, buf)? {
            return Ok(frame);
        }
        let Some(head) = parse_request_head(buf, self.redaction)? else {
            return Ok(Frame::Incomplete);
        };
        let framing = if head.chunked {
            Framing::Chunked
        } else {
            Framing::Length(head.content_length.unwrap_or(0))
        };
        let len = self.frame_body(buf, head.len, framing, Direction::Request)?;
        Ok(Frame::Complete { msg: head.msg, len })
    }

    /// Frames the response (or the rest of a response body) at the start of `buf`; `pending` is
    /// the request it answers, when known (needed for `HEAD` and `CONNECT`).
    pub fn response(
        &mut self,
        buf: &[u8],
        pending: Option<&Request>,
    ) -> Result<Frame<Response>, ParseError> {
        if let Some(frame) = continue_body(&mut self.response_body, buf)? {
            return Ok(frame);
        }
        let Some(head) = parse_response_head(buf)? else {
            return Ok(Frame::Incomplete);
        };
        let status = head.msg.status;
        if (100..200).contains(&status) && status != 101 {
            return Ok(Frame::Skip { len: head.len });
        }
        let method = pending.map(|r| r.method.as_ref());
        let tunnel = status == 101 || (method == Some("CONNECT") && (200..300).contains(&status));
        let framing = if tunnel {
            self.request_body = Body::UntilEof;
            Framing::UntilEof
        } else if method == Some("HEAD") || status == 204 || status == 304 {
            Framing::Length(0)
        } else if head.chunked {
            Framing::Chunked
        } else if let Some(n) = head.content_length {
            Framing::Length(n)
        } else {
            Framing::UntilEof
        };
        let len = self.frame_body(buf, head.len, framing, Direction::Response)?;
        Ok(Frame::Complete { msg: head.msg, len })
    }

    /// Length of the message whose head is `head_len` bytes, remembering an unfinished body.
    fn frame_body(
        &mut self,
        buf: &[u8],
        head_len: usize,
        framing: Framing,
        dir: Direction,
    ) -> Result<usize, ParseError> {
        let state = match dir {
            Direction::Request => &mut self.request_body,
            Direction::Response => &mut self.response_body,
        };
        match framing {
            Framing::Length(n) => usize::try_from(n)
                .ok()
                .and_then(|n| head_len.checked_add(n))
                .ok_or(malformed("Content-Length too large")),
            Framing::UntilEof => {
                *state = Body::UntilEof;
                Ok(buf.len().max(head_len))
            }
            Framing::Chunked => {
                let mut chunked = Chunked::Size;
                match walk_chunks(buf, head_len, &mut chunked)? {
                    Walk::Done(end) => Ok(end),
                    Walk::Stopped(end) => {
                        *state = Body::Chunked(chunked);
                        Ok(end)
                    }
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Direction {
    Request,
    Response,
}

#[derive(Debug, Clone, Copy)]
enum Framing {
    Length(u64),
    Chunked,
    UntilEof,
}

/// A frame for the rest of an unfinished body, or `None` when at a message boundary.
fn continue_body<T>(state: &mut Body, buf: &[u8]) -> Result<Option<Frame<T>>, ParseError> {
    match *state {
        Body::Idle => Ok(None),
        Body::UntilEof if buf.is_empty() => Ok(Some(Frame::Incomplete)),
        Body::UntilEof => Ok(Some(Frame::Skip { len: buf.len() })),
        Body::Chunked(mut chunked) => match walk_chunks(buf, 0, &mut chunked) {
            Ok(Walk::Done(len)) => {
                *state = Body::Idle;
                Ok(Some(Frame::Skip { len }))
            }
            Ok(Walk::Stopped(0)) => Ok(Some(Frame::Incomplete)),
            Ok(Walk::Stopped(len)) => {
                *state = Body::Chunked(chunked);
                Ok(Some(Frame::Skip { len }))
            }
            Err(e) => {
                // Lost track of the body: start over at the next message the session finds.
                *state = Body::Idle;
                Err(e)
            }
        },
    }
}

enum Walk {
    /// The body ends at this offset.
    Done(usize),
    /// The walk stopped at this offset (possibly past the buffer); the state says where.
    Stopped(usize),
}

/// Walks chunks from `pos` as far as `buf` allows.
fn walk_chunks(buf: &[u8], mut pos: usize, state: &mut Chunked) -> Result<Walk, ParseError> {
    loop {
        match *state {
            Chunked::Data(n) => {
                let end = usize::try_from(n)
                    .ok()
                    .and_then(|n| pos.checked_add(n))
                    .ok_or(malformed("chunk size too large"))?;
                *state = Chunked::Size;
                if end > buf.len() {
                    return Ok(Walk::Stopped(end));
                }
                if n >= 2 && &buf[end - 2..end] != b"\r\n" {
                    return Err(malformed("chunk data not followed by CRLF"));
                }
                pos = end;
            }
            Chunked::Size => {
                let Some((line, next)) = line_at(buf, pos) else {
                    if buf.len() - pos > MAX_CHUNK_LINE {
                        return Err(malformed("chunk-size line too long"));
                    }
                    return Ok(Walk::Stopped(pos));
                };
                let size = parse_chunk_size(line)?;
                *state = if size == 0 {
                    Chunked::Trailers
                } else {
                    Chunked::Data(size.checked_add(2).ok_or(malformed("chunk size too large"))?)
                };
                pos = next;
            }
            Chunked::Trailers => {
                let Some((line, next)) = line_at(buf, pos) else {
                    if buf.len() - pos > MAX_HEAD {
                        return Err(malformed("trailer section too long"));
                    }
                    return Ok(Walk::Stopped(pos));
                };
                pos = next;
                if line.is_empty() {
                    return Ok(Walk::Done(pos));
                }
            }
        }
    }
}

fn parse_chunk_size(line: &[u8]) -> Result<u64, ParseError> {
    let end = line.iter().position(|&b| b == b';' || b == b' ' || b == b'\t').unwrap_or(line.len());
    let digits = &line[..end];
    if digits.is_empty() || digits.len() > 16 {
        return Err(malformed("bad chunk size"));
    }
    digits.iter().try_fold(0u64, |acc, &b| {
        let d = (b as char).to_digit(16).ok_or(malformed("bad chunk size"))?;
        Ok(acc << 4 | u64::from(d))
    })
}

/// The line starting at `pos` without its `\r\n` (or bare `\n`), and the offset after it.
fn line_at(buf: &[u8], pos: usize) -> Option<(&[u8], usize)> {
    let rest = buf.get(pos..)?;
    let nl = rest.iter().position(|&b| b == b'\n')?;
    let line = &rest[..nl];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    Some((line, pos + nl + 1))
}

/// What the head says about the message.
struct Head<T> {
    msg: T,
    len: usize,
    content_length: Option<u64>,
    chunked: bool,
}

/// Header values the framing and the records need, collected in one pass.
#[derive(Default)]
struct Fields {
    content_length: Option<u64>,
    chunked: bool,
    /// `Some(true)` for `Connection: keep-alive`, `Some(false)` for `close`.
    connection: Option<bool>,
    host: String,
    kept: Vec<Header>,
}

fn parse_request_head(
    buf: &[u8],
    redaction: Redaction,
) -> Result<Option<Head<Request>>, ParseError> {
    // Check the start line before looking for the end of the head, so other protocols are
    // rejected from their first bytes.
    let method_len = buf.iter().take(17).position(|&b| b == b' ');
    let method_bytes = &buf[..method_len.unwrap_or(buf.len().min(17))];
    if !method_bytes.iter().all(|&b| b.is_ascii_uppercase() || b == b'-' || b == b'_') {
        return Err(not_http("request does not start with a method"));
    }
    let Some(method_len) = method_len else {
        return if buf.len() >= 17 { Err(not_http("method too long")) } else { Ok(None) };
    };
    if method_len == 0 {
        return Err(not_http("request does not start with a method"));
    }
    let Some((line, mut pos)) = line_at(buf, 0) else {
        return if buf.len() > MAX_HEAD {
            Err(malformed("request line too long"))
        } else {
            Ok(None)
        };
    };
    let mut parts = line[method_len + 1..].rsplitn(2, |&b| b == b' ');
    let (version, target) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let version = match version {
        b"HTTP/1.1" => Version::Http11,
        b"HTTP/1.0" => Version::Http10,
        b"HTTP/2.0" => return Err(not_http("HTTP/2 connection preface")),
        _ => return Err(not_http("request line has no HTTP/1 version")),
    };
    if target.is_empty() || target.iter().any(|&b| b <= b' ' || b == 0x7f) {
        return Err(malformed("bad request target"));
    }
    let Some(fields) = parse_headers(buf, &mut pos)? else { return Ok(None) };
    let path = if redaction.keep_full_statements {
        target
    } else {
        let end = target.iter().position(|&b| b == b'?' || b == b'#').unwrap_or(target.len());
        &target[..end]
    };
    let keep_alive = fields.connection.unwrap_or(version == Version::Http11);
    let msg = Request {
        method: method_name(&line[..method_len]),
        path: capped_text(path),
        version,
        host: fields.host,
        keep_alive,
        headers: fields.kept,
    };
    Ok(Some(Head { msg, len: pos, content_length: fields.content_length, chunked: fields.chunked }))
}

fn parse_response_head(buf: &[u8]) -> Result<Option<Head<Response>>, ParseError> {
    let prefix = &buf[..buf.len().min(9)];
    if !b"HTTP/1.1 ".starts_with(prefix) && !b"HTTP/1.0 ".starts_with(prefix) {
        return Err(not_http("response does not start with HTTP/1.x"));
    }
    let Some((line, mut pos)) = line_at(buf, 0) else {
        return if buf.len() > MAX_HEAD {
            Err(malformed("status line too long"))
        } else {
            Ok(None)
        };
    };
    let version = if line.starts_with(b"HTTP/1.1") { Version::Http11 } else { Version::Http10 };
    let code = line.get(9..12).ok_or(malformed("status line too short"))?;
    if !code.iter().all(u8::is_ascii_digit) || line.get(12).is_some_and(|&b| b != b' ') {
        return Err(malformed("bad status code"));
    }
    let status = code.iter().fold(0u16, |acc, &d| acc * 10 + u16::from(d - b'0'));
    if status < 100 {
        return Err(malformed("bad status code"));
    }
    let Some(fields) = parse_headers(buf, &mut pos)? else { return Ok(None) };
    let keep_alive = fields.connection.unwrap_or(version == Version::Http11);
    let msg = Response { status, version, keep_alive, headers: fields.kept };
    Ok(Some(Head { msg, len: pos, content_length: fields.content_length, chunked: fields.chunked }))
}

/// Reads header lines from `*pos` up to the empty line; `None` when the buffer ends first.
fn parse_headers(buf: &[u8], pos: &mut usize) -> Result<Option<Fields>, ParseError> {
    let mut fields = Fields::default();
    loop {
        let Some((line, next)) = line_at(buf, *pos) else {
            return if buf.len() > MAX_HEAD { Err(malformed("head too long")) } else { Ok(None) };
        };
        *pos = next;
        if line.is_empty() {
            return Ok(Some(fields));
        }
        if line[0] == b' ' || line[0] == b'\t' {
            continue; // obsolete line folding: a continuation of a value we do not keep
        }
        let colon = line.iter().position(|&b| b == b':').ok_or(malformed("header without ':'"))?;
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if name.is_empty() || name.iter().any(|&b| b <= b' ' || b == 0x7f) {
            return Err(malformed("bad header name"));
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = parse_decimal(value).ok_or(malformed("bad Content-Length"))?;
            if fields.content_length.is_some_and(|m| m != n) {
                return Err(malformed("conflicting Content-Length headers"));
            }
            fields.content_length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // Chunked must be the final coding; other codings alone mean "until close".
            let last = value.rsplit(|&b| b == b',').next().unwrap_or_default().trim_ascii();
            fields.chunked = last.eq_ignore_ascii_case(b"chunked");
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if token.eq_ignore_ascii_case(b"close") {
                    fields.connection = Some(false);
                } else if token.eq_ignore_ascii_case(b"keep-alive") && fields.connection.is_none() {
                    fields.connection = Some(true);
                }
            }
        } else if name.eq_ignore_ascii_case(b"host") {
            fields.host = capped_text(&value[..value.len().min(MAX_TEXT)]);
        } else if let Some(kept) =
            KEPT_HEADERS.iter().find(|k| name.eq_ignore_ascii_case(k.as_bytes()))
        {
            let value = &value[..value.len().min(MAX_HEADER_VALUE)];
            fields.kept.push(Header { name: kept, value: capped_text(value) });
        }
    }
}

fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &b| b.is_ascii_digit().then(|| acc * 10 + u64::from(b - b'0')))
}

fn method_name(m: &[u8]) -> Cow<'static, str> {
    const KNOWN: [&str; 9] =
        ["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE"];
    match KNOWN.iter().find(|k| k.as_bytes() == m) {
        Some(k) => Cow::Borrowed(k),
        // Only ASCII upper-case letters, '-' and '_' get here.
        None => Cow::Owned(String::from_utf8_lossy(m).into_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete<T: std::fmt::Debug>(f: Result<Frame<T>, ParseError>) -> (T, usize) {
        match f {
            Ok(Frame::Complete { msg, len }) => (msg, len),
            other => panic!("expected a complete message, got {other:?}"),
        }
    }

    #[test]
    fn request_keeps_ids_and_drops_credentials_and_query() {
        let raw = b"GET /a/b?token=secret HTTP/1.1\r\nHost: shop\r\nAuthorization: Bearer x\r\n\
                    Cookie: sid=1\r\nX-Request-ID: r-1\r\ntraceparent: 00-ab-cd-01\r\n\r\n";
        let (req, len) = complete(Parser::new(Redaction::default()).request(raw));
        assert_eq!(len, raw.len());
        assert_eq!(
            (req.method.as_ref(), req.path.as_str(), req.host.as_str()),
            ("GET", "/a/b", "shop")
        );
        assert!(req.keep_alive);
        let names: Vec<_> = req.headers.iter().map(|h| (h.name, h.value.as_str())).collect();
        assert_eq!(names, [("x-request-id", "r-1"), ("traceparent", "00-ab-cd-01")]);
        let full = Redaction { keep_full_statements: true };
        assert_eq!(complete(Parser::new(full).request(raw)).0.path, "/a/b?token=secret");
    }

    #[test]
    fn bodies_past_the_buffer_and_chunks_across_calls() {
        let mut p = Parser::default();
        let raw = b"POST /u HTTP/1.0\r\nContent-Length: 1000\r\nConnection: keep-alive\r\n\r\nab";
        let (req, len) = complete(p.request(raw));
        assert_eq!(len, raw.len() - 2 + 1000);
        assert!(req.keep_alive);

        let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut raw = head.to_vec();
        raw.extend_from_slice(b"5\r\nhello\r\n10\r\n0123");
        let (_, len) = complete(p.response(&raw, None));
        // The second chunk (16 bytes + CRLF) starts in the buffer and ends past it.
        assert_eq!(len, head.len() + 10 + 4 + 18);
        assert_eq!(p.response(b"", None), Ok(Frame::Incomplete));
        assert_eq!(p.response(b"3\r\nabc\r\n", None), Ok(Frame::Skip { len: 8 }));
        assert_eq!(p.response(b"0\r\nX-T: 1\r\n\r\nHTTP/1.1", None), Ok(Frame::Skip { len: 13 }));
        let (resp, _) = complete(p.response(b"HTTP/1.1 204 No Content\r\n\r\n", None));
        assert_eq!(resp.status, 204);
    }

    #[test]
    fn head_interim_and_eof_responses() {
        let mut p = Parser::default();
        let (head_req, _) = complete(p.request(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n"));
        let r = b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n";
        assert_eq!(complete(p.response(r, Some(&head_req))).1, r.len());
        assert_eq!(p.response(b"HTTP/1.1 100 Continue\r\n\r\n", None), Ok(Frame::Skip { len: 25 }));
        let (resp, len) = complete(p.response(b"HTTP/1.0 200 OK\r\n\r\nbody", None));
        assert_eq!((resp.status, resp.keep_alive, len), (200, false, 23));
        assert_eq!(p.response(b"HTTP/1.1 200 OK\r\n\r\n", None), Ok(Frame::Skip { len: 19 }));
    }

    #[test]
    fn rejects_other_protocols_early() {
        let mut p = Parser::default();
        assert!(matches!(
            p.request(b"*1\r\n$4\r\nPING\r\n"),
            Err(ParseError::NotThisProtocol { .. })
        ));
        assert!(p.request(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").is_err());
        assert_eq!(p.request(b"GE"), Ok(Frame::Incomplete));
        assert!(matches!(p.response(b"+OK\r\n", None), Err(ParseError::NotThisProtocol { .. })));
        assert!(matches!(
            p.request(b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            Err(ParseError::Malformed { .. })
        ));
    }
}
