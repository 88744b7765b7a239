//! PostgreSQL frontend/backend protocol v3.
#![expect(clippy::doc_markdown, reason = "PostgreSQL is a product name, not code")]
//!
//! # Requests (client to server)
//!
//! - The untyped first messages: `StartupMessage` (user and database are kept; it carries no
//!   password), `SSLRequest` and `GSSENCRequest` (the single-byte answer says whether the
//!   connection now turns encrypted), `CancelRequest` (sent on a new connection, never answered).
//! - Simple query `Q`: one request.
//! - Extended query: `Parse`/`Bind`/`Describe`/`Execute`/`Close`/`Flush` up to `Sync` form one
//!   logical request. When the batch spans several buffers (clients such as asyncpg send
//!   `Parse`/`Describe`/`Flush`, wait for the statement description, then `Bind`/`Execute`/`Sync`),
//!   the messages before `Sync` are [`Frame::Skip`]s and the request is the frame that ends with
//!   `Sync`. The query comes from the batch's `Parse`, or, for a statement prepared earlier, from
//!   the statement names this parser remembers (at most [`MAX_STATEMENTS`] per connection).
//! - Password/SASL messages `p` (never read), COPY data, function calls and `Terminate` are skipped.
//!
//! # Responses (server to client)
//!
//! A response runs up to `ReadyForQuery` (`Z`), or to a `FATAL`/`PANIC` `ErrorResponse` (after
//! which the server closes the connection). It keeps the last `CommandComplete` tag and the
//! first `ErrorResponse` SQLSTATE (field `C`; never the message, which can quote data). Messages
//! of a response that spans buffers are [`Frame::Skip`]s and the response is the frame that ends
//! with `Z`. `Authentication*`, `ParameterStatus`, `BackendKeyData`, `NoticeResponse` and
//! `NotificationResponse` are stepped over inside that span, or skipped alone when no response
//! is under way. A message whose body is not needed (rows) may be skipped past the buffer.

use std::{collections::HashMap, sync::Arc};

use super::{
    Frame, ParseError, READ_ENOUGH, Redaction,
    sql::{self, Dialect, capped_text},
};

/// Prepared statement names remembered per connection (for `Bind` without `Parse`).
pub const MAX_STATEMENTS: usize = 256;
/// Largest message length accepted (the server's own limit for most messages is 1 GiB).
const MAX_MESSAGE: usize = 1 << 30;
/// Largest startup-family message accepted (the server rejects more than 10000 bytes).
const MAX_STARTUP: usize = 10_000;

const PROTOCOL_3: u32 = 196_608;
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;

const fn malformed(reason: &'static str) -> ParseError {
    ParseError::Malformed { protocol: "postgres", reason }
}

const fn not_pg(reason: &'static str) -> ParseError {
    ParseError::NotThisProtocol { protocol: "postgres", reason }
}

/// Who logged in on this connection (from the startup message).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Login {
    pub user: String,
    pub database: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryKind {
    Simple,
    Extended,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Startup(Arc<Login>),
    SslRequest,
    GssEncRequest,
    /// Cancels a query on another connection; the server answers nothing.
    Cancel,
    Query {
        kind: QueryKind,
        /// Redacted unless full statements are kept; empty when the statement is unknown.
        query: String,
        /// The connection's login, when its startup message was seen.
        login: Option<Arc<Login>>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// The single-byte answer to `SSLRequest`/`GSSENCRequest`.
    Encryption { accepted: bool },
    /// Everything up to `ReadyForQuery` (or a fatal error).
    Done {
        /// Last `CommandComplete` tag ("SELECT 2", "INSERT 0 1"); empty if none.
        command: String,
        /// SQLSTATE of the first `ErrorResponse`; empty on success.
        error_code: String,
    },
}

/// What the messages of an unfinished response have said so far.
#[derive(Debug, Default)]
struct Partial {
    command: Option<String>,
    error_code: Option<String>,
}

/// An unfinished extended-query batch.
#[derive(Debug, Default)]
struct Batch {
    query: Option<String>,
}

/// The PostgreSQL state of one connection.
#[derive(Debug, Default)]
pub struct Parser {
    redaction: Redaction,
    login: Option<Arc<Login>>,
    statements: HashMap<Box<[u8]>, String>,
    batch: Option<Batch>,
    response: Partial,
}

impl Parser {
    pub fn new(redaction: Redaction) -> Self {
        Parser { redaction, ..Parser::default() }
    }

    pub fn request(&mut self, buf: &[u8]) -> Result<Frame<Request>, ParseError> {
        if buf.first() == Some(&0) {
            return self.startup_family(buf);
        }
        let mut pos = 0;
        while let Some(msg) = message_at(buf, pos, is_frontend_type)? {
            let body = msg.body(buf);
            let readable = msg.complete(buf) || body.len() >= READ_ENOUGH;
            match msg.kind {
                b'Q' | b'P' | b'B' | b'C' if !readable => break,
                b'Q' if self.batch.is_none() || pos == 0 => {
                    let query = self.redact(cstr(body).0);
                    let login = self.login.clone();
                    return Ok(Frame::Complete {
                        msg: Request::Query { kind: QueryKind::Simple, query, login },
                        len: msg.end,
                    });
                }
                b'P' | b'B' | b'C' | b'D' | b'E' | b'H' => self.batch_message(msg.kind, body),
                b'S' => {
                    let batch = self.batch.take().unwrap_or_default();
                    let login = self.login.clone();
                    let query = batch.query.unwrap_or_default();
                    return Ok(Frame::Complete {
                        msg: Request::Query { kind: QueryKind::Extended, query, login },
                        len: msg.end,
                    });
                }
                // Password/SASL, COPY from the client, function calls, Terminate: not requests;
                // alone they are skipped (a simple query after a batch is handled the same way).
                _ if pos == 0 => return Ok(Frame::Skip { len: msg.end }),
                _ => break,
            }
            pos = msg.end;
            if pos >= buf.len() {
                break;
            }
        }
        Ok(if pos == 0 { Frame::Incomplete } else { Frame::Skip { len: pos } })
    }

    pub fn response(
        &mut self,
        buf: &[u8],
        pending: Option<&Request>,
    ) -> Result<Frame<Response>, ParseError> {
        if let Some(Request::SslRequest | Request::GssEncRequest) = pending {
            let yes = if matches!(pending, Some(Request::SslRequest)) { b'S' } else { b'G' };
            match buf.first() {
                None => return Ok(Frame::Incomplete),
                Some(&b) if b == yes || b == b'N' => {
                    return Ok(Frame::Complete {
                        msg: Response::Encryption { accepted: b == yes },
                        len: 1,
                    });
                }
                _ => {} // e.g. an ErrorResponse from a server that does not know the request
            }
        }
        let mut pos = 0;
        while let Some(msg) = message_at(buf, pos, is_backend_type)? {
            let readable = msg.complete(buf) || buf.len() - msg.start >= READ_ENOUGH;
            match msg.kind {
                b'C' if readable => {
                    let tag = msg.body(buf);
                    self.response.command = Some(capped_text(cstr(tag).0));
                }
                b'E' if readable => {
                    let (code, fatal) = error_fields(msg.body(buf));
                    if self.response.error_code.is_none() {
                        self.response.error_code = Some(code);
                    }
                    if fatal {
                        return Ok(self.finish(msg.end));
                    }
                }
                // Needed but not all here: wait for it, or step over what came before it.
                b'C' | b'E' => break,
                b'Z' => return Ok(self.finish(msg.end)),
                _ => {}
            }
            pos = msg.end;
            if pos >= buf.len() {
                break;
            }
        }
        Ok(if pos == 0 { Frame::Incomplete } else { Frame::Skip { len: pos } })
    }

    fn finish(&mut self, len: usize) -> Frame<Response> {
        let partial = std::mem::take(&mut self.response);
        Frame::Complete {
            msg: Response::Done {
                command: partial.command.unwrap_or_default(),
                error_code: partial.error_code.unwrap_or_default(),
            },
            len,
        }
    }

    fn startup_family(&mut self, buf: &[u8]) -> Result<Frame<Request>, ParseError> {
        if buf.len() < 8 {
            return Ok(Frame::Incomplete);
        }
        let len = be_u32(buf, 0) as usize;
        let code = be_u32(buf, 4);
        let msg = match (code, len) {
            (SSL_REQUEST, 8) => Request::SslRequest,
            (GSSENC_REQUEST, 8) => Request::GssEncRequest,
            (CANCEL_REQUEST, 16) => Request::Cancel,
            (PROTOCOL_3, 9..=MAX_STARTUP) => {
                let Some(body) = buf.get(8..len) else { return Ok(Frame::Incomplete) };
                let login = Arc::new(startup_params(body)?);
                self.login = Some(Arc::clone(&login));
                Request::Startup(login)
            }
            (PROTOCOL_3, _) => return Err(malformed("bad startup message length")),
            _ => return Err(not_pg("unknown startup code")),
        };
        Ok(Frame::Complete { msg, len })
    }

    fn batch_message(&mut self, kind: u8, body: &[u8]) {
        let batch = self.batch.get_or_insert_with(Batch::default);
        match kind {
            b'P' => {
                let (name, rest) = cstr(body);
                let (query, _) = cstr(rest);
                let query = self.redact(query);
                if !name.is_empty() {
                    if self.statements.len() >= MAX_STATEMENTS {
                        // Bounded: forget an arbitrary statement; a later Bind of it has no text.
                        let victim = self.statements.keys().next().cloned();
                        victim.map(|k| self.statements.remove(&k));
                    }
                    self.statements.insert(name.into(), query.clone());
                }
                let batch = self.batch.get_or_insert_with(Batch::default);
                batch.query.get_or_insert(query);
            }
            b'B' if batch.query.is_none() => {
                let (_portal, rest) = cstr(body);
                let (statement, _) = cstr(rest);
                batch.query = self.statements.get(statement).cloned();
            }
            b'C' if body.first() == Some(&b'S') => {
                self.statements.remove(cstr(&body[1..]).0);
            }
            _ => {}
        }
    }

    fn redact(&self, query: &[u8]) -> String {
        if self.redaction.keep_full_statements {
            capped_text(query)
        } else {
            sql::redact(query, Dialect::Postgres)
        }
    }
}

/// A typed message's place in a buffer.
#[derive(Debug, Clone, Copy)]
struct Message {
    kind: u8,
    /// Offset of the body.
    start: usize,
    /// Offset after the message (may be past the buffer).
    end: usize,
}

impl Message {
    /// The body, or as much of it as the buffer holds.
    fn body(self, buf: &[u8]) -> &[u8] {
        &buf[self.start..self.end.min(buf.len())]
    }

    fn complete(self, buf: &[u8]) -> bool {
        self.end <= buf.len()
    }
}

/// The typed message whose header starts at `pos`, or `None` if the header is not all there.
fn message_at(
    buf: &[u8],
    pos: usize,
    known: fn(u8) -> bool,
) -> Result<Option<Message>, ParseError> {
    let Some(header) = buf.get(pos..pos + 5) else {
        if buf.get(pos).is_some_and(|&b| !known(b)) {
            return Err(not_pg("unknown message type"));
        }
        return Ok(None);
    };
    if !known(header[0]) {
        return Err(not_pg("unknown message type"));
    }
    let len = be_u32(header, 1) as usize;
    if !(4..=MAX_MESSAGE).contains(&len) {
        return Err(malformed("bad message length"));
    }
    Ok(Some(Message { kind: header[0], start: pos + 5, end: pos + 1 + len }))
}

fn is_frontend_type(b: u8) -> bool {
    matches!(
        b,
        b'Q' | b'P'
            | b'B'
            | b'D'
            | b'E'
            | b'S'
            | b'C'
            | b'H'
            | b'F'
            | b'p'
            | b'd'
            | b'c'
            | b'f'
            | b'X'
    )
}

fn is_backend_type(b: u8) -> bool {
    matches!(
        b,
        b'R' | b'S'
            | b'K'
            | b'Z'
            | b'T'
            | b'D'
            | b'C'
            | b'E'
            | b'N'
            | b'A'
            | b'I'
            | b'1'
            | b'2'
            | b'3'
            | b'n'
            | b't'
            | b's'
            | b'G'
            | b'H'
            | b'W'
            | b'd'
            | b'c'
            | b'V'
            | b'v'
    )
}

/// `user` and `database` from a startup message's parameters (`database` defaults to `user`).
fn startup_params(mut body: &[u8]) -> Result<Login, ParseError> {
    let mut login = Login::default();
    let mut database = None;
    for _ in 0..64 {
        let (key, rest) = cstr(body);
        if key.is_empty() {
            break;
        }
        let (value, rest) = cstr(rest);
        match key {
            b"user" => login.user = capped_text(value),
            b"database" => database = Some(capped_text(value)),
            _ => {}
        }
        body = rest;
    }
    if login.user.is_empty() {
        return Err(malformed("startup message without user"));
    }
    login.database = database.unwrap_or_else(|| login.user.clone());
    Ok(login)
}

/// SQLSTATE and whether the error ends the session, from an `ErrorResponse` body.
fn error_fields(mut body: &[u8]) -> (String, bool) {
    let mut code = String::new();
    let mut fatal = false;
    while let Some((&field, rest)) = body.split_first() {
        if field == 0 {
            break;
        }
        let (value, rest) = cstr(rest);
        match field {
            b'C' => code = capped_text(&value[..value.len().min(5)]),
            b'V' | b'S' => fatal |= matches!(value, b"FATAL" | b"PANIC"),
            _ => {}
        }
        body = rest;
    }
    (code, fatal)
}

/// The NUL-terminated string at the start of `b` and what follows its NUL (all of `b` and an
/// empty rest when there is no NUL).
fn cstr(b: &[u8]) -> (&[u8], &[u8]) {
    match b.iter().position(|&c| c == 0) {
        Some(n) => (&b[..n], &b[n + 1..]),
        None => (b, &[]),
    }
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![kind];
        m.extend_from_slice(&u32::try_from(body.len() + 4).expect("small").to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn extended_batch_across_buffers_uses_remembered_statement() {
        let mut p = Parser::default();
        let parse = msg(b'P', b"s1\0SELECT * FROM t WHERE id = $1 AND n = 'x'\0\0\0");
        let mut first = parse.clone();
        first.extend(msg(b'H', b""));
        assert_eq!(p.request(&first), Ok(Frame::Skip { len: first.len() }));
        let mut second = msg(b'B', b"\0s1\0\0\0\0\0\0\0");
        second.extend(msg(b'E', b"\0\0\0\0\0"));
        second.extend(msg(b'S', b""));
        let want = "SELECT * FROM t WHERE id = $1 AND n = ?";
        let Ok(Frame::Complete { msg: Request::Query { kind, query, .. }, len }) =
            p.request(&second)
        else {
            panic!("Bind/Execute/Sync is the request");
        };
        assert_eq!((kind, query.as_str(), len), (QueryKind::Extended, want, second.len()));
        // The same statement executed again without Parse still has its text.
        let Ok(Frame::Complete { msg: Request::Query { query, .. }, .. }) = p.request(&second)
        else {
            panic!("second execution");
        };
        assert_eq!(query, want);
    }

    #[test]
    fn response_spans_buffers_and_keeps_sqlstate() {
        let mut p = Parser::default();
        let rows = msg(b'D', &[0; 100]);
        assert_eq!(p.response(&rows[..20], None), Ok(Frame::Skip { len: rows.len() }));
        let err = msg(b'E', b"SERROR\0VERROR\0C42P01\0Mrelation \"x\" does not exist\0\0");
        assert_eq!(p.response(&err, None), Ok(Frame::Skip { len: err.len() }));
        let z = msg(b'Z', b"I");
        let Ok(Frame::Complete { msg: Response::Done { error_code, .. }, len: 6 }) =
            p.response(&z, None)
        else {
            panic!("ReadyForQuery ends the response");
        };
        assert_eq!(error_code, "42P01");
        assert!(matches!(p.response(&err[..10], None), Ok(Frame::Incomplete)));
        assert!(matches!(
            p.response(b"\x16\x03\x01\x02\x00", None),
            Err(ParseError::NotThisProtocol { .. })
        ));
    }
}
