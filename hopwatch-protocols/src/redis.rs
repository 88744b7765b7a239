//! Redis serialization protocol, RESP2 and RESP3.
//!
//! A request is an array of bulk strings (or an inline command: one line of words). Its command
//! name is kept upper-cased, with the subcommand for container commands (`CLIENT SETNAME`,
//! `CONFIG GET`); arguments only when [`Redaction::keep_full_statements`] (capped in total at
//! [`MAX_TEXT`]). A reply is any RESP value; error replies (`-ERR ..`, RESP3 `!` blob errors)
//! keep their text. RESP3 pushes (`>`, e.g. client-tracking invalidations) and attributes (`|`)
//! are [`Frame::Skip`]s.
//!
//! Each call frames one command or one reply, so pipelined commands and their replies pair in
//! order. A value is framed as soon as its first element is known: when an array or a bulk
//! string extends past the buffer, the frame's `len` ends where the walk stopped (inside a bulk
//! string that may end past the buffer, or at an element not yet in it) and the parser counts the
//! values still to come; its next calls on that direction skip them.

use super::{Frame, MAX_TEXT, ParseError, READ_ENOUGH, Redaction, sql::capped_text};

/// Longest line (simple string, error, number, inline command) accepted, in bytes.
const MAX_LINE: usize = 64 * 1024;
/// Largest element count accepted in one aggregate.
const MAX_COUNT: u64 = 1 << 32;
/// Largest bulk string accepted (Redis' own `proto-max-bulk-len` is 512 MiB by default; larger
/// values can be configured).
const MAX_BULK: u64 = 1 << 40;
/// Commands whose first argument is a subcommand kept in the name.
const CONTAINERS: [&str; 16] = [
    "ACL", "CLIENT", "CLUSTER", "COMMAND", "CONFIG", "DEBUG", "FUNCTION", "LATENCY", "MEMORY",
    "MODULE", "OBJECT", "PUBSUB", "SCRIPT", "SLOWLOG", "XGROUP", "XINFO",
];

const fn malformed(reason: &'static str) -> ParseError {
    ParseError::Malformed { protocol: "redis", reason }
}

const fn not_redis(reason: &'static str) -> ParseError {
    ParseError::NotThisProtocol { protocol: "redis", reason }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Upper case, with the subcommand of container commands ("CLIENT SETNAME").
    pub command: String,
    /// Arguments after the command (and subcommand), only when full statements are kept.
    pub args: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Error reply text ("ERR unknown command ..."), `None` for any other reply.
    pub error: Option<String>,
}

/// The command of the exchange an error sent before any command makes: the connection itself
/// (not a Redis command; the parentheses say so).
pub const CONNECT: &str = "(connect)";

impl Response {
    /// An error the server sent before any command (protected mode's `-DENIED`, `-ERR max
    /// number of clients reached`) answers the connection: the request it completes.
    pub fn server_first(&self) -> Option<Request> {
        self.error.as_ref().map(|_| Request { command: CONNECT.to_owned(), args: Vec::new() })
    }
}

/// The Redis state of one connection: values still to skip in each direction.
#[derive(Debug, Default)]
pub struct Parser {
    redaction: Redaction,
    request_values_left: u64,
    response_values_left: u64,
}

impl Parser {
    pub fn new(redaction: Redaction) -> Self {
        Parser { redaction, ..Parser::default() }
    }

    pub fn request(&mut self, buf: &[u8]) -> Result<Frame<Request>, ParseError> {
        if self.request_values_left > 0 {
            return continue_skip(buf, &mut self.request_values_left);
        }
        match buf.first() {
            None => Ok(Frame::Incomplete),
            Some(b'*') => self.array_request(buf),
            Some(b'\r' | b'\n') => match line_at(buf, 0)? {
                Some((_, end)) => Ok(Frame::Skip { len: end }),
                None => Ok(Frame::Incomplete),
            },
            Some(b) if b.is_ascii_alphabetic() => self.inline_request(buf),
            Some(_) => Err(not_redis("request is neither an array nor an inline command")),
        }
    }

    pub fn response(
        &mut self,
        buf: &[u8],
        _pending: Option<&Request>,
    ) -> Result<Frame<Response>, ParseError> {
        if self.response_values_left > 0 {
            return continue_skip(buf, &mut self.response_values_left);
        }
        let Some(head) = head_at(buf, 0)? else { return Ok(Frame::Incomplete) };
        let error = match head {
            Head::Line { kind: b'-', line, .. } => Some(capped_text(line)),
            Head::Blob { kind: b'!', start, end } => {
                let text = &buf[start..(end - 2).min(buf.len())];
                if end > buf.len() && text.len() < MAX_TEXT {
                    return Ok(Frame::Incomplete);
                }
                Some(capped_text(text))
            }
            _ => None,
        };
        // Walk the whole value, as far as the buffer allows.
        let mut left = 1;
        let len = skip_values(buf, 0, &mut left)?;
        self.response_values_left = left;
        Ok(match head {
            Head::Aggregate { kind: b'>' | b'|', .. } => Frame::Skip { len },
            _ => Frame::Complete { msg: Response { error }, len },
        })
    }

    /// A reply line (`+OK..`, `-ERR ..`) at the start of `buf` whose CRLF was not captured: Redis
    /// writes a reply in one call, so it ends with the call (`-DENIED ...`, the protected-mode
    /// refusal, is over a kilobyte long).
    pub fn response_cut(&self, buf: &[u8]) -> Option<Response> {
        if self.response_values_left > 0 || buf.contains(&b'\n') {
            return None;
        }
        match buf.first()? {
            b'-' => Some(Response { error: Some(capped_text(&buf[1..])) }),
            b'+' => Some(Response { error: None }),
            _ => None,
        }
    }

    fn array_request(&mut self, buf: &[u8]) -> Result<Frame<Request>, ParseError> {
        let Some(head) = head_at(buf, 0)? else { return Ok(Frame::Incomplete) };
        let (count, mut pos) = match head {
            Head::Aggregate { kind: b'*', count: 0, end } => return Ok(Frame::Skip { len: end }),
            Head::Aggregate { kind: b'*', count, end } => (count, end),
            _ => return Err(malformed("request array is null or not an array")),
        };
        // The command name (and a container's subcommand) must be all there.
        let Some((name, next)) = bulk_at(buf, pos)? else { return Ok(Frame::Incomplete) };
        if next > buf.len() || name.is_empty() || !name.iter().all(u8::is_ascii_graphic) {
            return Err(malformed("bad command name"));
        }
        pos = next;
        let mut left = count - 1;
        let mut command = upper(name);
        if left > 0 && CONTAINERS.contains(&command.as_str()) {
            let Some((sub, next)) = bulk_at(buf, pos)? else { return Ok(Frame::Incomplete) };
            if next <= buf.len() && !sub.is_empty() && sub.iter().all(u8::is_ascii_alphanumeric) {
                command.push(' ');
                command.push_str(&upper(sub));
                pos = next;
                left -= 1;
            }
        }
        let mut args = Vec::new();
        if self.redaction.keep_full_statements {
            let mut room = MAX_TEXT.saturating_sub(command.len());
            while left > 0 && room > 0 {
                let arg = bulk_at(buf, pos)?.filter(|&(_, next)| next <= buf.len());
                let Some((arg, next)) = arg else {
                    // Arguments are read once all there, or once enough of them is.
                    if buf.len() < READ_ENOUGH {
                        return Ok(Frame::Incomplete);
                    }
                    break; // the rest is skipped below
                };
                let arg = &arg[..arg.len().min(room)];
                room -= arg.len();
                args.push(capped_text(arg));
                pos = next;
                left -= 1;
            }
        }
        let len = if pos >= buf.len() { pos } else { skip_values(buf, pos, &mut left)? };
        self.request_values_left = left;
        Ok(Frame::Complete { msg: Request { command, args }, len })
    }

    fn inline_request(&self, buf: &[u8]) -> Result<Frame<Request>, ParseError> {
        let Some((line, end)) = line_at(buf, 0)? else {
            if buf.iter().any(|&b| !(b.is_ascii_graphic() || b == b' ' || b == b'\t' || b == b'\r'))
            {
                return Err(not_redis("inline command is not text"));
            }
            return Ok(Frame::Incomplete);
        };
        if !line.iter().all(|&b| b.is_ascii_graphic() || b == b' ' || b == b'\t') {
            return Err(not_redis("inline command is not text"));
        }
        let mut words = line.split(|&b| b == b' ' || b == b'\t').filter(|w| !w.is_empty());
        let name = words.next().ok_or(malformed("empty inline command"))?;
        if name.len() > 64 {
            return Err(malformed("bad command name"));
        }
        let mut command = upper(name);
        let mut words = words.peekable();
        if CONTAINERS.contains(&command.as_str())
            && let Some(sub) = words.next_if(|w| w.len() <= 64)
        {
            command.push(' ');
            command.push_str(&upper(sub));
        }
        let mut args = Vec::new();
        if self.redaction.keep_full_statements {
            let mut room = MAX_TEXT.saturating_sub(command.len());
            for arg in words {
                let arg = &arg[..arg.len().min(room)];
                room -= arg.len();
                args.push(capped_text(arg));
                if room == 0 {
                    break;
                }
            }
        }
        Ok(Frame::Complete { msg: Request { command, args }, len: end })
    }
}

/// A `Skip` over the values left of an earlier frame.
fn continue_skip<T>(buf: &[u8], left: &mut u64) -> Result<Frame<T>, ParseError> {
    match skip_values(buf, 0, left) {
        Ok(0) => Ok(Frame::Incomplete),
        Ok(len) => Ok(Frame::Skip { len }),
        Err(e) => {
            *left = 0;
            Err(e)
        }
    }
}

/// One value's header.
#[derive(Debug, Clone, Copy)]
enum Head<'a> {
    /// `+ - : _ , # (` and null bulk/array: the line after the type byte, and the end.
    Line { kind: u8, line: &'a [u8], end: usize },
    /// `$ ! =`: content from `start`, value ends at `end` (after the CRLF; maybe past the buffer).
    Blob { kind: u8, start: usize, end: usize },
    /// `* % ~ | >`: `count` values follow (twice the pairs for maps and attributes).
    Aggregate { kind: u8, count: u64, end: usize },
}

/// The header of the value at `pos`, or `None` if its first line is not all there.
fn head_at(buf: &[u8], pos: usize) -> Result<Option<Head<'_>>, ParseError> {
    let Some(&kind) = buf.get(pos) else { return Ok(None) };
    if !matches!(
        kind,
        b'+' | b'-'
            | b':'
            | b'$'
            | b'*'
            | b'_'
            | b','
            | b'#'
            | b'!'
            | b'='
            | b'('
            | b'%'
            | b'~'
            | b'|'
            | b'>'
    ) {
        return Err(not_redis("unknown RESP type"));
    }
    let Some((line, end)) = line_at(buf, pos + 1)? else {
        // Length lines are short: a long one without CRLF is not RESP.
        if matches!(kind, b'$' | b'*' | b'!' | b'=' | b'%' | b'~' | b'|' | b'>')
            && buf.len() - pos > 24
        {
            return Err(malformed("length line too long"));
        }
        return Ok(None);
    };
    Ok(Some(match kind {
        b'$' | b'!' | b'=' | b'*' | b'%' | b'~' | b'|' | b'>' => {
            if line == b"-1" && matches!(kind, b'$' | b'*') {
                return Ok(Some(Head::Line { kind: b'_', line: &[], end }));
            }
            let n = parse_count(line)?;
            match kind {
                b'$' | b'!' | b'=' => {
                    if n > MAX_BULK {
                        return Err(malformed("bulk string too long"));
                    }
                    let n = usize::try_from(n).map_err(|_| malformed("bulk string too long"))?;
                    Head::Blob { kind, start: end, end: end + n + 2 }
                }
                _ => {
                    if n > MAX_COUNT {
                        return Err(malformed("aggregate too large"));
                    }
                    let count = if matches!(kind, b'%' | b'|') { n * 2 } else { n };
                    Head::Aggregate { kind, count, end }
                }
            }
        }
        _ => Head::Line { kind, line, end },
    }))
}

/// The bulk string at `pos` (as much of it as the buffer holds) and the offset after it, or
/// `None` when its header is not all there.
fn bulk_at(buf: &[u8], pos: usize) -> Result<Option<(&[u8], usize)>, ParseError> {
    match head_at(buf, pos)? {
        None => Ok(None),
        Some(Head::Blob { kind: b'$', start, end }) => {
            if end > buf.len() && end - 2 - start <= 64 {
                return Ok(None); // a short string not all here yet
            }
            Ok(Some((&buf[start..(end - 2).min(buf.len())], end)))
        }
        Some(_) => Err(malformed("request element is not a bulk string")),
    }
}

/// Steps over `*left` values from `pos` as far as `buf` allows; returns where it stopped (past
/// the buffer inside a bulk string) and leaves the count of values not reached in `*left`.
fn skip_values(buf: &[u8], mut pos: usize, left: &mut u64) -> Result<usize, ParseError> {
    // Each step consumes at least 3 bytes of the buffer, so this ends within buf.len() / 3 steps.
    while *left > 0 && pos < buf.len() {
        let Some(head) = head_at(buf, pos)? else { break };
        *left -= 1;
        match head {
            Head::Line { end, .. } => pos = end,
            Head::Blob { start, end, .. } => {
                if end <= buf.len() && &buf[end - 2..end] != b"\r\n" {
                    return Err(malformed("bulk string not followed by CRLF"));
                }
                debug_assert!(end > start);
                pos = end;
            }
            Head::Aggregate { count, end, .. } => {
                *left = left
                    .checked_add(count)
                    .filter(|&n| n <= MAX_COUNT * 4)
                    .ok_or(malformed("too many nested values"))?;
                pos = end;
            }
        }
    }
    Ok(pos)
}

/// The line starting at `pos` without its CRLF, and the offset after it.
fn line_at(buf: &[u8], pos: usize) -> Result<Option<(&[u8], usize)>, ParseError> {
    let rest = buf.get(pos..).unwrap_or_default();
    match rest.iter().take(MAX_LINE).position(|&b| b == b'\n') {
        Some(n) => {
            let line = &rest[..n];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            Ok(Some((line, pos + n + 1)))
        }
        None if rest.len() >= MAX_LINE => Err(malformed("line too long")),
        None => Ok(None),
    }
}

fn parse_count(s: &[u8]) -> Result<u64, ParseError> {
    if s.is_empty() || s.len() > 19 || !s.iter().all(u8::is_ascii_digit) {
        return Err(malformed("bad length"));
    }
    Ok(s.iter().fold(0u64, |acc, &d| acc * 10 + u64::from(d - b'0')))
}

fn upper(name: &[u8]) -> String {
    capped_text(name).to_ascii_uppercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipelined_commands_frame_one_at_a_time() {
        let mut p = Parser::new(Redaction { keep_full_statements: true });
        let buf =
            b"*3\r\n$6\r\nclient\r\n$7\r\nsetname\r\n$1\r\nx\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n";
        let Ok(Frame::Complete { msg, len }) = p.request(buf) else { panic!("first command") };
        assert_eq!(
            (msg.command.as_str(), msg.args.as_slice(), len),
            ("CLIENT SETNAME", &["x".to_owned()][..], 36)
        );
        let Ok(Frame::Complete { msg, len }) = p.request(&buf[36..]) else { panic!("second") };
        assert_eq!((msg.command.as_str(), len), ("GET", 20));
        let mut r = Parser::default();
        assert_eq!(
            r.request(buf).map(|f| matches!(f, Frame::Complete { msg, .. } if msg.args.is_empty())),
            Ok(true)
        );
    }

    #[test]
    fn big_values_span_calls() {
        let mut p = Parser::default();
        let buf = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$100\r\nabc";
        let Ok(Frame::Complete { len, .. }) = p.request(buf) else { panic!("SET") };
        assert_eq!(len, buf.len() - 3 + 102);
        // A reply array whose second element is not here yet.
        let reply = b"*3\r\n$1\r\na\r\n";
        assert_eq!(
            p.response(reply, None),
            Ok(Frame::Complete { msg: Response { error: None }, len: reply.len() })
        );
        assert_eq!(p.response(b"$", None), Ok(Frame::Incomplete));
        assert_eq!(p.response(b":1\r\n_\r\n+OK\r\n", None), Ok(Frame::Skip { len: 7 }));
        let Ok(Frame::Complete { msg, len: 5 }) = p.response(b"+OK\r\n", None) else {
            panic!("OK")
        };
        assert_eq!(msg.error, None);
    }

    #[test]
    fn errors_pushes_and_garbage() {
        let mut p = Parser::default();
        let Ok(Frame::Complete { msg, .. }) = p.response(b"!21\r\nSYNTAX invalid syntax\r\n", None)
        else {
            panic!("blob error");
        };
        assert_eq!(msg.error.as_deref(), Some("SYNTAX invalid syntax"));
        assert_eq!(
            p.response(b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n", None),
            Ok(Frame::Skip { len: 32 })
        );
        assert!(matches!(
            p.response(b"HTTP/1.1 200 OK\r\n", None),
            Err(ParseError::NotThisProtocol { .. })
        ));
        assert!(matches!(p.request(b"\x16\x03\x01"), Err(ParseError::NotThisProtocol { .. })));
        assert!(matches!(p.request(b"*1\r\n:1\r\n"), Err(ParseError::Malformed { .. })));
    }

    #[test]
    fn a_reply_line_longer_than_the_capture_ends_with_its_call() {
        let mut p = Parser::default();
        // The first 64 bytes of protected mode's refusal: no CRLF yet.
        let cut = b"-DENIED Redis is running in protected mode because protected mo";
        assert_eq!(p.response(cut, None), Ok(Frame::Incomplete));
        let r = p.response_cut(cut).expect("a reply line");
        assert!(r.error.as_deref().is_some_and(|e| e.starts_with("DENIED Redis is running")));
        let connect = r.server_first().expect("an error before any command answers the connection");
        assert_eq!(connect.command, CONNECT);
        assert_eq!(p.response_cut(b"+OK"), Some(Response { error: None }));
        assert_eq!(Response { error: None }.server_first(), None, "only errors refuse");
        assert_eq!(p.response_cut(b"$5\r\nhel"), None, "a bulk string has a length");
        assert_eq!(p.response_cut(b"-ERR x\r\n"), None, "a whole line is framed by response()");
    }
}
