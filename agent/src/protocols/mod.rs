//! Application protocol parsers: pure functions over bytes, no I/O, no kernel types.
//!
//! # The contract every parser follows
//!
//! A connection carries two byte streams, client→server (requests) and server→client
//! (responses). The agent sees them as the data of individual read/write syscalls, of which only
//! a bounded prefix may have been captured. The session layer (`crate::l7`) keeps the known bytes
//! of each stream and calls a parser with a buffer that starts at a message boundary:
//!
//! - [`Frame::Complete`] `{ msg, len }`: one message, `len` bytes long in the stream. `len` may
//!   exceed the buffer when the message's body was not captured (e.g. a large HTTP body): the
//!   session then skips the missing bytes as they arrive. The parser must therefore learn a
//!   message's length from its header alone whenever the protocol allows it.
//! - [`Frame::Skip`] `{ len }`: a message that is not a request or response to pair (a MySQL
//!   server greeting, a PostgreSQL ParameterStatus, a RESP3 push).
//! - [`Frame::Incomplete`]: the buffer holds only the start of a message header; call again with
//!   more bytes.
//! - `Err(ParseError)`: not a message of this protocol at this position. The session drops the
//!   buffered bytes up to the next syscall boundary and tries again there.
//!
//! Parsers never panic and never allocate in proportion to a length read from the wire: strings
//! kept in records are capped ([`MAX_TEXT`]).

/// Longest text (query, path, command) kept in a record, in bytes.
pub const MAX_TEXT: usize = 1024;

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
