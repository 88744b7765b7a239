//! Application protocol parsers: pure functions over bytes, no I/O, no kernel types.
//!
//! # The contract every parser follows
//!
//! A connection carries two byte streams, client→server (requests) and server→client
//! (responses). The agent sees them as the data of individual read/write syscalls, of which only
//! a bounded prefix may have been captured. The session layer (the agent's `l7` module) keeps the known bytes
//! of each stream and calls a parser with a buffer that starts at a message boundary:
//!
//! - [`Frame::Complete`] `{ msg, len }`: one message, `len` bytes long in the stream. `len` may
//!   exceed the buffer when the message's body was not captured (e.g. a large HTTP body): the
//!   session then skips the missing bytes as they arrive. The parser must therefore learn a
//!   message's length from its header alone whenever the protocol allows it.
//! - [`Frame::Skip`] `{ len }`: a message that is not a request or response to pair (a MySQL
//!   server greeting, a PostgreSQL `ParameterStatus`, a RESP3 push).
//! - [`Frame::Incomplete`]: the buffer holds only the start of a message header; call again with
//!   more bytes.
//! - `Err(ParseError)`: not a message of this protocol at this position. The session drops the
//!   buffered bytes up to the next syscall boundary and tries again there.
//!
//! Parsers never panic and never allocate in proportion to a length read from the wire: strings
//! kept in records are capped ([`MAX_TEXT`]).
//!
//! # Using them
//!
//! The kernel names a connection's protocol from its first bytes (`hopwatch_common::detect`); a
//! [`Parser`] (one per connection) frames [`Request`]s and [`Response`]s and keeps the
//! per-connection state some protocols need (statement names, the login, a body that spans
//! calls); [`Request::failure`] says whether an exchange failed and why. The agent turns an
//! exchange into the flow's `l7` record. The protocol modules document how each frames its
//! messages. What the session should know beyond the contract above:
//!
//! - An exchange made of several messages that spans buffers (a PostgreSQL extended-query batch
//!   up to `Sync`, a PostgreSQL response up to `ReadyForQuery`, a MySQL result set) comes as
//!   `Skip` frames for its first parts and a `Complete` frame for the part that ends it.
//! - A body or value that goes on past a `Complete` frame (chunked HTTP, a body until the
//!   connection closes, a large Redis array) comes as `Skip` frames on later calls: the
//!   [`Parser`] remembers where it is, so keep one per connection and feed each direction in
//!   order. After an `Err` it forgets that and expects a message boundary.
//! - A message whose text is kept (a query, an error reply) is framed once it is all in the
//!   buffer or [`READ_ENOUGH`] bytes of it are: until then the answer is `Incomplete` even though
//!   its header is known.
//! - [`Request::expects_response`] is false for requests no server answers;
//!   [`Request::matches`] pairs DNS answers by id (they may come out of order over UDP).
#![expect(clippy::doc_markdown, reason = "PostgreSQL and MySQL are product names, not code")]
#![forbid(unsafe_code)]

pub mod dns;
pub mod http1;
pub mod mysql;
pub mod postgres;
pub mod redis;
pub mod sql;
#[cfg(test)]
mod tests;
pub mod tls;

/// Longest text (query, path, command) kept in a record, in bytes.
pub const MAX_TEXT: usize = 1024;

/// A message whose text is kept (a query, an error) is read once it is all in the buffer, or
/// once the buffer holds this much of it: enough for the record, and the rest may never come
/// when the capture of a large message was cut.
pub const READ_ENOUGH: usize = 4096;

/// The application protocols hopwatch parses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http1,
    Postgres,
    Redis,
    Mysql,
    Dns,
}

impl Protocol {
    /// Name used in flows (`l7.protocol`) and filters.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Protocol::Http1 => "http",
            Protocol::Postgres => "postgres",
            Protocol::Redis => "redis",
            Protocol::Mysql => "mysql",
            Protocol::Dns => "dns",
        }
    }
}

/// The outcome of framing one message at the start of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<T> {
    /// A message `len` bytes long in the stream (possibly longer than the buffer).
    Complete { msg: T, len: usize },
    /// A message to step over without pairing, `len` bytes long.
    Skip { len: usize },
    /// More bytes are needed to frame the message.
    Incomplete,
}

/// Why bytes could not be parsed as this protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("not {protocol}: {reason}")]
    NotThisProtocol { protocol: &'static str, reason: &'static str },
    #[error("malformed {protocol} message: {reason}")]
    Malformed { protocol: &'static str, reason: &'static str },
}

/// What leaves the agent: by default statements are redacted (SQL literals become `?`, Redis
/// arguments are dropped, HTTP query strings and credential headers are never kept).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Redaction {
    /// Keep full statements and arguments (debugging only).
    pub keep_full_statements: bool,
}

impl<T> Frame<T> {
    /// The same frame with its message mapped.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Frame<U> {
        match self {
            Frame::Complete { msg, len } => Frame::Complete { msg: f(msg), len },
            Frame::Skip { len } => Frame::Skip { len },
            Frame::Incomplete => Frame::Incomplete,
        }
    }
}

/// A request of any protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Http(http1::Request),
    Postgres(postgres::Request),
    Redis(redis::Request),
    Mysql(mysql::Request),
    Dns(dns::Message),
}

/// A response of any protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Http(http1::Response),
    Postgres(postgres::Response),
    Redis(redis::Response),
    Mysql(mysql::Response),
    Dns(dns::Message),
}

impl Request {
    pub fn protocol(&self) -> Protocol {
        match self {
            Request::Http(_) => Protocol::Http1,
            Request::Postgres(_) => Protocol::Postgres,
            Request::Redis(_) => Protocol::Redis,
            Request::Mysql(_) => Protocol::Mysql,
            Request::Dns(_) => Protocol::Dns,
        }
    }

    /// False for requests the server never answers (PostgreSQL `CancelRequest`, MySQL
    /// `COM_QUIT`/`COM_STMT_CLOSE`/`COM_STMT_SEND_LONG_DATA`): their record is complete at once.
    pub fn expects_response(&self) -> bool {
        match self {
            Request::Postgres(postgres::Request::Cancel) => false,
            Request::Mysql(m) => m.expects_response(),
            _ => true,
        }
    }

    /// Whether `resp` can answer this request. DNS answers carry the query's id (and may come
    /// out of order over UDP); other protocols answer in order, so any response of the same
    /// protocol fits.
    pub fn matches(&self, resp: &Response) -> bool {
        match (self, resp) {
            (Request::Dns(q), Response::Dns(a)) => q.id == a.id,
            (Request::Http(_), Response::Http(_))
            | (Request::Postgres(_), Response::Postgres(_))
            | (Request::Redis(_), Response::Redis(_))
            | (Request::Mysql(_), Response::Mysql(_)) => true,
            _ => false,
        }
    }
}

#[derive(Debug)]
enum State {
    Http(http1::Parser),
    Postgres(postgres::Parser),
    Redis(redis::Parser),
    Mysql(mysql::Parser),
    Dns(dns::Parser),
}

/// The parser of one connection: the protocol's framing plus its per-connection state.
#[derive(Debug)]
pub struct Parser {
    state: State,
}

impl Parser {
    /// A parser for a connection of `protocol` (DNS: over UDP; see [`Parser::new_dns`]).
    pub fn new(protocol: Protocol, redaction: Redaction) -> Self {
        let state = match protocol {
            Protocol::Http1 => State::Http(http1::Parser::new(redaction)),
            Protocol::Postgres => State::Postgres(postgres::Parser::new(redaction)),
            Protocol::Redis => State::Redis(redis::Parser::new(redaction)),
            Protocol::Mysql => State::Mysql(mysql::Parser::new(redaction)),
            Protocol::Dns => State::Dns(dns::Parser::new(dns::Transport::Udp)),
        };
        Parser { state }
    }

    /// A DNS parser for `transport` (over TCP every message has a 2-byte length prefix).
    pub fn new_dns(transport: dns::Transport) -> Self {
        Parser { state: State::Dns(dns::Parser::new(transport)) }
    }

    pub fn protocol(&self) -> Protocol {
        match self.state {
            State::Http(_) => Protocol::Http1,
            State::Postgres(_) => Protocol::Postgres,
            State::Redis(_) => Protocol::Redis,
            State::Mysql(_) => Protocol::Mysql,
            State::Dns(_) => Protocol::Dns,
        }
    }

    /// Frames the client-to-server message at the start of `buf`.
    pub fn request(&mut self, buf: &[u8]) -> Result<Frame<Request>, ParseError> {
        Ok(match &mut self.state {
            State::Http(p) => p.request(buf)?.map(Request::Http),
            State::Postgres(p) => p.request(buf)?.map(Request::Postgres),
            State::Redis(p) => p.request(buf)?.map(Request::Redis),
            State::Mysql(p) => p.request(buf)?.map(Request::Mysql),
            State::Dns(p) => p.request(buf)?.map(Request::Dns),
        })
    }

    /// Frames the server-to-client message at the start of `buf`; `pending` is the oldest
    /// request not yet answered, when there is one (a request of another protocol counts as
    /// none).
    pub fn response(
        &mut self,
        buf: &[u8],
        pending: Option<&Request>,
    ) -> Result<Frame<Response>, ParseError> {
        Ok(match &mut self.state {
            State::Http(p) => {
                let pending =
                    pending.and_then(|r| if let Request::Http(r) = r { Some(r) } else { None });
                p.response(buf, pending)?.map(Response::Http)
            }
            State::Postgres(p) => {
                let pending =
                    pending.and_then(|r| if let Request::Postgres(r) = r { Some(r) } else { None });
                p.response(buf, pending)?.map(Response::Postgres)
            }
            State::Redis(p) => {
                let pending =
                    pending.and_then(|r| if let Request::Redis(r) = r { Some(r) } else { None });
                p.response(buf, pending)?.map(Response::Redis)
            }
            State::Mysql(p) => {
                let pending =
                    pending.and_then(|r| if let Request::Mysql(r) = r { Some(r) } else { None });
                p.response(buf, pending)?.map(Response::Mysql)
            }
            State::Dns(p) => {
                let pending =
                    pending.and_then(|r| if let Request::Dns(r) = r { Some(r) } else { None });
                p.response(buf, pending)?.map(Response::Dns)
            }
        })
    }
}

impl Response {
    /// For a response the server sent before any request, when it refuses the connection
    /// (Redis' `-DENIED` in protected mode, MySQL's ERR packet in place of the greeting): the
    /// request it answers, which is the connection itself. `None` for any other response: a
    /// PostgreSQL server speaks only after the client's startup message, which its error answers.
    pub fn server_first(&self) -> Option<Request> {
        match self {
            Response::Redis(r) => r.server_first().map(Request::Redis),
            Response::Mysql(m) => m.server_first().map(Request::Mysql),
            _ => None,
        }
    }
}

impl Parser {
    /// The server-to-client message at the start of `buf`, whose end is in the uncaptured tail
    /// of the syscall that carried it: a Redis reply line longer than the capture. `None` when
    /// the protocol needs the message's end to frame it.
    pub fn response_cut(&mut self, buf: &[u8]) -> Option<Response> {
        match &self.state {
            State::Redis(p) => p.response_cut(buf).map(Response::Redis),
            _ => None,
        }
    }
}

impl Request {
    /// Why the exchange of this request and `resp` failed, in the words users search for
    /// ("HTTP 503", "SQLSTATE 42P01", "WRONGTYPE", "NXDOMAIN"); `None` when it did not, or when
    /// no response was seen (an unanswered request is the caller's to call a timeout).
    pub fn failure(&self, resp: Option<&Response>) -> Option<String> {
        match (self, resp?) {
            (Request::Http(_), Response::Http(r)) => {
                (r.status >= 500).then(|| format!("HTTP {}", r.status))
            }
            (
                Request::Postgres(_),
                Response::Postgres(postgres::Response::Done { error_code, .. }),
            ) if !error_code.is_empty() => Some(format!("SQLSTATE {error_code}")),
            // The error's first word is its kind ("ERR", "WRONGTYPE", "NOAUTH").
            (Request::Redis(_), Response::Redis(r)) => r
                .error
                .as_ref()
                .map(|e| e.split_ascii_whitespace().next().unwrap_or("ERR").to_owned()),
            (Request::Mysql(_), Response::Mysql(r)) if r.error_code != 0 => {
                Some(if r.sql_state.is_empty() {
                    format!("MySQL error {}", r.error_code)
                } else {
                    format!("SQLSTATE {}", r.sql_state)
                })
            }
            (Request::Dns(_), Response::Dns(r)) if r.rcode != 0 => Some(dns::rcode_name(r.rcode)),
            _ => None,
        }
    }
}

impl Request {
    /// Every text this request and its response keep (what an agent's record is made of), for
    /// checks of the contract: each is at most [`MAX_TEXT`] bytes, and Redis arguments
    /// together too.
    pub fn texts<'a>(&'a self, resp: Option<&'a Response>) -> Vec<&'a str> {
        let mut t: Vec<&str> = Vec::new();
        match self {
            Request::Http(h) => {
                t.extend([&*h.method, &h.path, &h.host]);
                t.extend(h.headers.iter().map(|h| h.value.as_str()));
            }
            Request::Postgres(postgres::Request::Startup(login)) => {
                t.extend([login.user.as_str(), &login.database]);
            }
            Request::Postgres(postgres::Request::Query { query, .. }) => t.push(query),
            Request::Postgres(_) => {}
            Request::Redis(r) => t.push(&r.command),
            Request::Mysql(m) => t.push(&m.query),
            Request::Dns(d) => t.push(&d.query),
        }
        match resp {
            Some(Response::Http(h)) => t.extend(h.headers.iter().map(|h| h.value.as_str())),
            Some(Response::Postgres(postgres::Response::Done { command, error_code })) => {
                t.extend([command.as_str(), error_code]);
            }
            Some(Response::Redis(r)) => t.extend(r.error.as_deref()),
            Some(Response::Mysql(m)) => t.push(&m.sql_state),
            Some(Response::Dns(d)) => {
                t.push(&d.query);
                t.extend(d.ips.iter().chain(&d.cnames).map(String::as_str));
            }
            Some(Response::Postgres(postgres::Response::Encryption { .. })) | None => {}
        }
        t
    }
}
