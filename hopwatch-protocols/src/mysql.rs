//! MySQL / MariaDB client/server protocol (protocol 10, `CLIENT_PROTOCOL_41`).
#![expect(clippy::doc_markdown, reason = "MySQL and MariaDB are product names, not code")]
//!
//! Every message is one or more packets: a 3-byte little-endian payload length and a sequence
//! id. A command starts with sequence id 0 (`COM_QUERY`, `COM_STMT_PREPARE`,
//! `COM_STMT_EXECUTE`, `COM_PING`, `COM_QUIT`, ...); client packets with another sequence id are
//! the handshake response (its user and capabilities are read, never the auth data), further
//! authentication data, or continuation packets, and are [`Frame::Skip`]s. The server greeting
//! and the authentication exchange that follows it are skipped too.
//!
//! A response starts with sequence id 1 and is, depending on the command it answers (the
//! `pending` request): an OK, ERR (error code and SQLSTATE) or EOF packet; a whole result set
//! (column count, column definitions, the optional EOF, rows, and the terminating EOF or OK —
//! with or without `CLIENT_DEPRECATE_EOF`, told apart by packet length: an EOF is 5 bytes, an OK
//! sent in its place at least 7 — and following result sets while `SERVER_MORE_RESULTS_EXISTS`
//! is set); or the `COM_STMT_PREPARE` answer (statement id, parameter and column definitions).
//! A response that spans buffers is a series of [`Frame::Skip`]s and then the frame that ends
//! with its last packet; rows may be skipped past the buffer. Statement ids map to their
//! (redacted) statements for later `COM_STMT_EXECUTE`s, at most [`MAX_STATEMENTS`] per connection.

use std::collections::HashMap;

use super::{
    Frame, ParseError, READ_ENOUGH, Redaction,
    sql::{self, Dialect, capped_text},
};

/// Prepared statements remembered per connection.
pub const MAX_STATEMENTS: usize = 256;
/// A packet of this payload length is continued by the next one.
const MAX_PAYLOAD: usize = 0xFF_FFFF;

const CLIENT_PROTOCOL_41: u32 = 1 << 9;
const CLIENT_DEPRECATE_EOF: u32 = 1 << 24;
const CLIENT_QUERY_ATTRIBUTES: u32 = 1 << 27;
const SERVER_MORE_RESULTS_EXISTS: u16 = 0x0008;
const SERVER_STATUS_CURSOR_EXISTS: u16 = 0x0040;

/// The server's own name for a connection being set up (`Command: Connect` in the process
/// list); clients never send it, so it is not a [`command_name`]. The request of the exchange
/// an error greeting makes.
pub const COM_CONNECT: u8 = 0x0b;

const fn malformed(reason: &'static str) -> ParseError {
    ParseError::Malformed { protocol: "mysql", reason }
}

const fn not_mysql(reason: &'static str) -> ParseError {
    ParseError::NotThisProtocol { protocol: "mysql", reason }
}

/// The name of command byte `c`, or `None` for bytes that are not commands.
pub const fn command_name(c: u8) -> Option<&'static str> {
    Some(match c {
        0x01 => "COM_QUIT",
        0x02 => "COM_INIT_DB",
        0x03 => "COM_QUERY",
        0x04 => "COM_FIELD_LIST",
        0x05 => "COM_CREATE_DB",
        0x06 => "COM_DROP_DB",
        0x07 => "COM_REFRESH",
        0x08 => "COM_SHUTDOWN",
        0x09 => "COM_STATISTICS",
        0x0a => "COM_PROCESS_INFO",
        0x0c => "COM_PROCESS_KILL",
        0x0d => "COM_DEBUG",
        0x0e => "COM_PING",
        0x11 => "COM_CHANGE_USER",
        0x12 => "COM_BINLOG_DUMP",
        0x15 => "COM_REGISTER_SLAVE",
        0x16 => "COM_STMT_PREPARE",
        0x17 => "COM_STMT_EXECUTE",
        0x18 => "COM_STMT_SEND_LONG_DATA",
        0x19 => "COM_STMT_CLOSE",
        0x1a => "COM_STMT_RESET",
        0x1b => "COM_SET_OPTION",
        0x1c => "COM_STMT_FETCH",
        0x1e => "COM_BINLOG_DUMP_GTID",
        0x1f => "COM_RESET_CONNECTION",
        _ => return None,
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Command byte (`0x03` for `COM_QUERY`); [`command_name`] names it.
    pub command: u8,
    /// Statement (redacted unless full statements are kept) for `COM_QUERY`,
    /// `COM_STMT_PREPARE`, and `COM_STMT_EXECUTE` of a statement whose preparation was seen.
    pub query: String,
    /// Statement id of `COM_STMT_*` commands.
    pub statement_id: u32,
}

impl Request {
    pub fn name(&self) -> &'static str {
        if self.command == COM_CONNECT {
            return "COM_CONNECT";
        }
        command_name(self.command).unwrap_or("COM_UNKNOWN")
    }

    /// `COM_QUIT`, `COM_STMT_CLOSE` and `COM_STMT_SEND_LONG_DATA` get no answer.
    pub fn expects_response(&self) -> bool {
        !matches!(self.command, 0x01 | 0x18 | 0x19)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Response {
    /// ERR packet error code; 0 on success.
    pub error_code: u16,
    /// ERR packet SQLSTATE ("42S02"); empty on success or from pre-4.1 servers.
    pub sql_state: String,
    /// Statement id assigned by a `COM_STMT_PREPARE` answer.
    pub statement_id: u32,
    /// Rows of the result sets.
    pub rows: u64,
}

impl Response {
    /// An ERR packet the server sent in place of its greeting answers the connection: the
    /// request it completes.
    pub fn server_first(&self) -> Option<Request> {
        (self.error_code != 0).then(|| Request {
            command: COM_CONNECT,
            query: String::new(),
            statement_id: 0,
        })
    }
}

/// Where an unfinished response is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// At the first packet of a (next) result: OK, ERR, EOF or a column count.
    Start,
    /// Column definitions left, then the optional EOF and rows.
    Columns(u64),
    /// After the column definitions: an EOF (without `CLIENT_DEPRECATE_EOF`), or rows.
    ColumnsEof,
    /// Rows until EOF/OK (`0xFE`) or ERR.
    Rows,
    /// `COM_STMT_PREPARE`: parameter definitions left, then `columns` column definitions.
    PrepParams { left: u64, columns: u64 },
    /// `COM_STMT_PREPARE`: column definitions left.
    PrepColumns(u64),
    /// After a block of prepare definitions: an EOF (without `CLIENT_DEPRECATE_EOF`), then
    /// `columns` column definitions, or the end.
    PrepEof { columns: u64 },
    /// `COM_FIELD_LIST`: column definitions until EOF.
    FieldList,
}

#[derive(Debug)]
struct Progress {
    phase: Phase,
    next_seq: u8,
    msg: Response,
}

/// The MySQL state of one connection.
#[derive(Debug, Default)]
pub struct Parser {
    redaction: Redaction,
    /// Capabilities from the client's handshake response, when it was seen.
    client_caps: Option<u32>,
    user: Option<String>,
    statements: HashMap<u32, String>,
    progress: Option<Progress>,
}

impl Parser {
    pub fn new(redaction: Redaction) -> Self {
        Parser { redaction, ..Parser::default() }
    }

    /// The user of the handshake response, when it was seen.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    pub fn request(&mut self, buf: &[u8]) -> Result<Frame<Request>, ParseError> {
        let Some(p) = packet_at(buf, 0) else { return Ok(Frame::Incomplete) };
        let readable = p.end <= buf.len() || p.payload(buf).len() >= READ_ENOUGH;
        if p.seq != 0 {
            if p.seq == 1 && p.len >= 32 && !readable {
                return Ok(Frame::Incomplete);
            }
            if p.seq == 1 && p.len >= 32 {
                self.handshake_response(p.payload(buf));
            }
            return Ok(Frame::Skip { len: p.end });
        }
        let Some(&command) = p.payload(buf).first() else {
            return if p.len == 0 {
                Err(malformed("empty command"))
            } else {
                Ok(Frame::Incomplete)
            };
        };
        if command_name(command).is_none() {
            return Err(not_mysql("unknown command"));
        }
        let args = &p.payload(buf)[1..];
        let mut req = Request { command, query: String::new(), statement_id: 0 };
        match command {
            0x03 | 0x16 if !readable => return Ok(Frame::Incomplete),
            0x03 => req.query = self.redact(self.query_text(args)),
            0x16 => req.query = self.redact(args),
            0x17..=0x1a | 0x1c => {
                let Some(id) = args.get(..4) else { return Ok(Frame::Incomplete) };
                req.statement_id = u32::from_le_bytes([id[0], id[1], id[2], id[3]]);
                if command == 0x19 {
                    self.statements.remove(&req.statement_id);
                } else if command == 0x17 {
                    req.query = self.statements.get(&req.statement_id).cloned().unwrap_or_default();
                }
            }
            _ => {}
        }
        Ok(Frame::Complete { msg: req, len: p.end })
    }

    pub fn response(
        &mut self,
        buf: &[u8],
        pending: Option<&Request>,
    ) -> Result<Frame<Response>, ParseError> {
        let mut progress = if let Some(progress) = self.progress.take() {
            progress
        } else {
            let Some(p) = packet_at(buf, 0) else { return Ok(Frame::Incomplete) };
            let first = p.payload(buf).first().copied();
            // The greeting, the authentication exchange, and packets that do not start an
            // answer to a command (a response's first packet has sequence id 1).
            if p.seq == 0 && first == Some(0xFF) {
                // An ERR packet in place of the greeting: the server refuses the connection
                // (`Too many connections`, `Host ... is blocked`).
                if p.end > buf.len() && p.payload(buf).len() < 3 {
                    return Ok(Frame::Incomplete);
                }
                let mut msg = Response::default();
                read_err(p.payload(buf), &mut msg);
                return Ok(Frame::Complete { msg, len: p.end });
            }
            if p.seq != 1 {
                if p.seq == 0 && first.is_some_and(|b| b != 10) {
                    return Err(not_mysql("server packet with sequence id 0 is not a greeting"));
                }
                return Ok(Frame::Skip { len: p.end });
            }
            let phase = match pending.map(|r| r.command) {
                Some(0x04) => Phase::FieldList,
                Some(0x1c) => Phase::Rows,
                Some(0x09) => {
                    return Ok(Frame::Complete { msg: Response::default(), len: p.end });
                }
                _ => Phase::Start,
            };
            Progress { phase, next_seq: 1, msg: Response::default() }
        };
        let preparing = pending.is_some_and(|r| r.command == 0x16);
        match self.walk(buf, &mut progress, preparing) {
            Ok(Walk::Done(len)) => {
                if let Some(query) = pending.filter(|_| preparing).map(|r| r.query.clone())
                    && progress.msg.error_code == 0
                {
                    if self.statements.len() >= MAX_STATEMENTS {
                        let victim = self.statements.keys().next().copied();
                        victim.map(|k| self.statements.remove(&k));
                    }
                    self.statements.insert(progress.msg.statement_id, query);
                }
                Ok(Frame::Complete { msg: progress.msg, len })
            }
            Ok(Walk::Stopped(0)) => {
                self.progress = Some(progress);
                Ok(Frame::Incomplete)
            }
            Ok(Walk::Stopped(len)) => {
                self.progress = Some(progress);
                Ok(Frame::Skip { len })
            }
            Err(e) => Err(e), // progress dropped: the session resynchronises
        }
    }

    /// Walks the packets of a response from the start of `buf`.
    fn walk(&self, buf: &[u8], pr: &mut Progress, preparing: bool) -> Result<Walk, ParseError> {
        let mut pos = 0;
        // Each step consumes a 4-byte header, so this ends within buf.len() / 4 steps.
        while let Some(p) = packet_at(buf, pos) {
            if p.seq != pr.next_seq {
                if pr.phase == (Phase::PrepEof { columns: 0 }) && pos > 0 {
                    // The final EOF did not come (CLIENT_DEPRECATE_EOF): the answer ended.
                    return Ok(Walk::Done(pos));
                }
                return Err(malformed("packet out of sequence"));
            }
            let payload = p.payload(buf);
            // Packets that are read (OK, ERR, EOF, counts) must be all here; column definitions
            // and rows are skipped unread, also past the buffer.
            let first = payload.first().copied();
            let unread =
                matches!(
                    pr.phase,
                    Phase::Columns(_) | Phase::PrepParams { .. } | Phase::PrepColumns(_)
                ) || (matches!(pr.phase, Phase::Rows | Phase::ColumnsEof | Phase::FieldList)
                    && first.is_some_and(|b| b != 0xFE && b != 0xFF));
            if p.end > buf.len() && !unread {
                break;
            }
            pr.next_seq = p.seq.wrapping_add(1);
            let done = step(pr, payload, p.len, preparing)?;
            pos = p.end;
            if done {
                return Ok(Walk::Done(pos));
            }
            // A prepare answer may end without a final EOF (CLIENT_DEPRECATE_EOF): decide at the
            // end of the buffer from the capabilities, or assume it when they are unknown.
            if pos >= buf.len() {
                if let Phase::PrepEof { columns: 0 } = pr.phase
                    && self.client_caps.is_none_or(|c| c & CLIENT_DEPRECATE_EOF != 0)
                {
                    return Ok(Walk::Done(pos));
                }
                break;
            }
        }
        Ok(Walk::Stopped(pos))
    }

    fn handshake_response(&mut self, payload: &[u8]) {
        let caps = u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]);
        if caps & CLIENT_PROTOCOL_41 == 0 {
            return;
        }
        self.client_caps = Some(caps);
        if let Some(rest) = payload.get(32..).filter(|r| !r.is_empty()) {
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            self.user = Some(capped_text(&rest[..end]));
        }
    }

    /// The statement of a `COM_QUERY`, after the query attributes when the client sends them.
    fn query_text<'a>(&self, args: &'a [u8]) -> &'a [u8] {
        if self.client_caps.is_some_and(|c| c & CLIENT_QUERY_ATTRIBUTES != 0) {
            // parameter_count and parameter_set_count; with parameters the statement's place
            // depends on their types, which are not worth decoding: keep no text.
            return match args {
                [0, 1, rest @ ..] => rest,
                _ => &[],
            };
        }
        args
    }

    fn redact(&self, query: &[u8]) -> String {
        if self.redaction.keep_full_statements {
            capped_text(query)
        } else {
            sql::redact(query, Dialect::Mysql)
        }
    }
}

/// Takes one packet of a response (`payload`, `len` bytes long in the stream) into `pr`;
/// returns whether it ends the response.
fn step(
    pr: &mut Progress,
    payload: &[u8],
    len: usize,
    preparing: bool,
) -> Result<bool, ParseError> {
    let first = payload.first().copied();
    let eof = first == Some(0xFE) && len < 9;
    let terminator = first == Some(0xFE) && len < MAX_PAYLOAD;
    let mut done = false;
    match pr.phase {
        Phase::Start => match first {
            Some(0xFF) => done = read_err(payload, &mut pr.msg),
            Some(0x00) if preparing && len >= 12 => {
                pr.msg.statement_id =
                    u32::from_le_bytes([payload[1], payload[2], payload[3], payload[4]]);
                let columns = u64::from(u16::from_le_bytes([payload[5], payload[6]]));
                let params = u64::from(u16::from_le_bytes([payload[7], payload[8]]));
                pr.phase = match (params, columns) {
                    (0, 0) => {
                        done = true;
                        Phase::Start
                    }
                    (0, n) => Phase::PrepColumns(n),
                    (n, columns) => Phase::PrepParams { left: n, columns },
                };
            }
            Some(0x00 | 0xFE) => done = !more_results(payload, eof),
            Some(0xFB) => done = true, // LOCAL INFILE request: the client sends a file
            _ => {
                let (count, used) = lenenc(payload).ok_or(malformed("bad column count"))?;
                if count == 0 {
                    return Err(malformed("result set without columns"));
                }
                // MariaDB with cached metadata: a 0 after the count means no definitions.
                let metadata = payload.get(used) != Some(&0);
                pr.phase = if metadata { Phase::Columns(count) } else { Phase::Rows };
            }
        },
        Phase::Columns(n) => {
            pr.phase = if n > 1 { Phase::Columns(n - 1) } else { Phase::ColumnsEof }
        }
        Phase::ColumnsEof if eof => {
            done = status(payload, true) & SERVER_STATUS_CURSOR_EXISTS != 0;
            pr.phase = Phase::Rows;
        }
        Phase::ColumnsEof | Phase::Rows => {
            pr.phase = Phase::Rows;
            match first {
                Some(0xFF) => done = read_err(payload, &mut pr.msg),
                Some(0xFE) if terminator => {
                    done = !more_results(payload, eof);
                    pr.phase = Phase::Start;
                }
                _ => pr.msg.rows += 1,
            }
        }
        Phase::PrepParams { left, columns } => {
            pr.phase = if left > 1 {
                Phase::PrepParams { left: left - 1, columns }
            } else {
                Phase::PrepEof { columns }
            };
        }
        Phase::PrepColumns(left) => {
            pr.phase =
                if left > 1 { Phase::PrepColumns(left - 1) } else { Phase::PrepEof { columns: 0 } };
        }
        Phase::PrepEof { columns } if eof => {
            pr.phase = Phase::PrepColumns(columns);
            done = columns == 0;
        }
        Phase::PrepEof { columns: 0 } => {
            return Err(malformed("packet after the statement definitions"));
        }
        Phase::PrepEof { columns } => {
            // No EOF (CLIENT_DEPRECATE_EOF): this is the first column definition.
            pr.phase = if columns > 1 {
                Phase::PrepColumns(columns - 1)
            } else {
                Phase::PrepEof { columns: 0 }
            };
        }
        Phase::FieldList => match first {
            Some(0xFF) => done = read_err(payload, &mut pr.msg),
            Some(0xFE) if eof => done = true,
            _ => {}
        },
    }
    Ok(done)
}

enum Walk {
    Done(usize),
    Stopped(usize),
}

#[derive(Debug, Clone, Copy)]
struct Packet {
    seq: u8,
    len: usize,
    start: usize,
    end: usize,
}

impl Packet {
    /// The payload, or as much of it as the buffer holds.
    fn payload(self, buf: &[u8]) -> &[u8] {
        &buf[self.start.min(buf.len())..self.end.min(buf.len())]
    }
}

/// The packet whose header starts at `pos`, or `None` if the header is not all there.
fn packet_at(buf: &[u8], pos: usize) -> Option<Packet> {
    let h = buf.get(pos..pos + 4)?;
    let len = usize::from(h[0]) | usize::from(h[1]) << 8 | usize::from(h[2]) << 16;
    Some(Packet { seq: h[3], len, start: pos + 4, end: pos + 4 + len })
}

/// Reads an ERR packet into `msg`; always ends the response.
fn read_err(payload: &[u8], msg: &mut Response) -> bool {
    if let Some(code) = payload.get(1..3) {
        msg.error_code = u16::from_le_bytes([code[0], code[1]]);
    }
    // MariaDB progress reports use code 0xFFFF and do not end anything: rare enough to treat
    // as an error, since they need a capability clients rarely set.
    if payload.get(3) == Some(&b'#')
        && let Some(state) = payload.get(4..9)
    {
        msg.sql_state = capped_text(state);
    }
    true
}

/// Status flags of an OK (`eof == false`) or EOF packet.
fn status(payload: &[u8], eof: bool) -> u16 {
    let at = if eof {
        3
    } else {
        // header, affected rows, last insert id, then the status flags
        let Some((_, a)) = payload.get(1..).and_then(lenenc) else { return 0 };
        let Some((_, b)) = payload.get(1 + a..).and_then(lenenc) else { return 0 };
        1 + a + b
    };
    payload.get(at..at + 2).map_or(0, |s| u16::from_le_bytes([s[0], s[1]]))
}

fn more_results(payload: &[u8], eof: bool) -> bool {
    status(payload, eof) & SERVER_MORE_RESULTS_EXISTS != 0
}

/// A length-encoded integer and the bytes it used.
fn lenenc(b: &[u8]) -> Option<(u64, usize)> {
    let le = |n: usize| {
        let bytes = b.get(1..=n)?;
        Some((bytes.iter().rev().fold(0u64, |acc, &x| acc << 8 | u64::from(x)), n + 1))
    };
    match *b.first()? {
        x @ 0..=0xFA => Some((u64::from(x), 1)),
        0xFC => le(2),
        0xFD => le(3),
        0xFE => le(8),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(seq: u8, payload: &[u8]) -> Vec<u8> {
        let n = u32::try_from(payload.len()).expect("small").to_le_bytes();
        let mut p = vec![n[0], n[1], n[2], seq];
        p.extend_from_slice(payload);
        p
    }

    #[test]
    fn deprecate_eof_result_set_spanning_buffers() {
        let mut p = Parser::default();
        let Ok(Frame::Complete { msg: req, .. }) =
            p.request(&packet(0, b"\x03SELECT a FROM t WHERE b = 'x'"))
        else {
            panic!("COM_QUERY");
        };
        assert_eq!((req.name(), req.query.as_str()), ("COM_QUERY", "SELECT a FROM t WHERE b = ?"));
        let mut buf = packet(1, &[1]);
        buf.extend(packet(
            2,
            b"\x03def\x00\x00\x00\x01a\x00\x0c\x3f\x00\x0b\x00\x00\x00\x03\x00\x00\x00\x00\x00",
        ));
        buf.extend(packet(3, b"\x011"));
        assert_eq!(p.response(&buf, Some(&req)), Ok(Frame::Skip { len: buf.len() }));
        let mut rest = packet(4, b"\x012");
        rest.extend(packet(5, b"\xfe\x00\x00\x02\x00\x00\x00"));
        let Ok(Frame::Complete { msg, len }) = p.response(&rest, Some(&req)) else { panic!("end") };
        assert_eq!((msg.rows, msg.error_code, len), (2, 0, rest.len()));
    }

    #[test]
    fn error_packet_and_garbage() {
        let mut p = Parser::default();
        let req = Request { command: 3, query: String::new(), statement_id: 0 };
        let err = packet(1, b"\xff\x7a\x04#42S02Table 'shop.missing' doesn't exist");
        let Ok(Frame::Complete { msg, .. }) = p.response(&err, Some(&req)) else { panic!("ERR") };
        assert_eq!((msg.error_code, msg.sql_state.as_str()), (1146, "42S02"));
        assert!(matches!(
            p.request(&packet(0, b"\x42xyz")),
            Err(ParseError::NotThisProtocol { .. })
        ));
        assert!(matches!(
            p.response(&packet(5, b"\x00\x00\x00\x02\x00\x00\x00"), Some(&req)),
            Ok(Frame::Skip { .. })
        ));
    }

    #[test]
    fn an_err_packet_in_place_of_the_greeting_refuses_the_connection() {
        let mut p = Parser::default();
        // MariaDB out of connections: ERR 1040 with sequence 0, no SQLSTATE marker.
        let err = packet(0, b"\xff\x10\x04Too many connections");
        let Ok(Frame::Complete { msg, len }) = p.response(&err, None) else { panic!("ERR") };
        assert_eq!((msg.error_code, msg.sql_state.as_str(), len), (1040, "", err.len()));
        let connect = msg.server_first().expect("answers the connection");
        assert_eq!((connect.command, connect.name()), (COM_CONNECT, "COM_CONNECT"));
        assert_eq!(Response::default().server_first(), None);
        assert!(p.response(&err[..6], None) == Ok(Frame::Incomplete));
        // A real greeting is still stepped over.
        let greeting = packet(0, b"\x0a11.8.3-MariaDB\x00");
        assert!(matches!(p.response(&greeting, None), Ok(Frame::Skip { .. })));
    }
}
