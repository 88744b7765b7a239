//! Protocol detection from the first bytes of a message, shared by the kernel programs (which
//! decide from it whether a connection's data is worth sending) and userspace (tests).
//!
//! Only cheap, unambiguous prefixes: anything else stays unknown, and after a few messages the
//! connection is ignored. Userspace parsers confirm or reject the guess.

use crate::{
    DIR_EGRESS, PROTO_HTTP, PROTO_MYSQL, PROTO_POSTGRES, PROTO_REDIS, PROTO_TLS, PROTO_UNKNOWN,
    ROLE_CLIENT, ROLE_SERVER, ROLE_UNKNOWN,
};

/// How many leading bytes detection looks at.
pub const HEAD: usize = 16;

const HTTP_PREFIXES: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"HEAD ",
    b"DELETE ",
    b"PATCH ",
    b"OPTIONS ",
    b"HTTP/1.",
    b"TRACE ",
];

/// PostgreSQL protocol 3.0 startup, SSLRequest and GSSENCRequest codes.
const PG_CODES: [u32; 3] = [196_608, 80_877_103, 80_877_104];

fn starts_with(head: &[u8; HEAD], n: usize, prefix: &[u8]) -> bool {
    if n < prefix.len() {
        return false;
    }
    let mut i = 0;
    while i < prefix.len() {
        if head[i] != prefix[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// Guesses the protocol of a message whose first `n` bytes (at most [`HEAD`]) are in `head`.
#[must_use]
pub fn detect(head: &[u8; HEAD], n: usize) -> u8 {
    // TLS record: handshake (22), version 3.x.
    if n >= 3 && head[0] == 0x16 && head[1] == 0x03 && head[2] <= 0x04 {
        return PROTO_TLS;
    }
    let mut i = 0;
    while i < HTTP_PREFIXES.len() {
        if starts_with(head, n, HTTP_PREFIXES[i]) {
            return PROTO_HTTP;
        }
        i += 1;
    }
    if n >= 8 {
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let code = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        if (8..=10_000).contains(&len) && PG_CODES.contains(&code) {
            return PROTO_POSTGRES;
        }
    }
    // MySQL server greeting: 3-byte length, sequence 0, protocol version 10.
    if n >= 5 {
        let len = u32::from_le_bytes([head[0], head[1], head[2], 0]);
        if (20..=1024).contains(&len) && head[3] == 0 && head[4] == 10 {
            return PROTO_MYSQL;
        }
    }
    // A server refusing the connection before any request, on a connection seen from then
    // (its server socket, or a client that reads first). MySQL: an ERR packet (0xff, an error
    // code, no SQLSTATE marker) with sequence 0 in place of the greeting.
    if n >= 7 {
        let len = u32::from_le_bytes([head[0], head[1], head[2], 0]);
        let code = u16::from_le_bytes([head[5], head[6]]);
        if (3..=1024).contains(&len)
            && head[3] == 0
            && head[4] == 0xff
            && (1000..10_000).contains(&code)
        {
            return PROTO_MYSQL;
        }
    }
    // Redis: an error reply line, `-` and an upper-case error kind (`-DENIED `, `-ERR `).
    if n >= 5 && head[0] == b'-' {
        let mut j = 1;
        while j < n && j < HEAD && head[j].is_ascii_uppercase() {
            j += 1;
        }
        if j >= 4 && j < n && j < HEAD && head[j] == b' ' {
            return PROTO_REDIS;
        }
    }
    // RESP command: `*<count>\r\n$`.
    if n >= 5 && head[0] == b'*' && head[1].is_ascii_digit() {
        let mut j = 2;
        while j + 2 < n && j < HEAD - 2 {
            if head[j] == b'\r' && head[j + 1] == b'\n' && head[j + 2] == b'$' {
                return PROTO_REDIS;
            }
            if !head[j].is_ascii_digit() {
                break;
            }
            j += 1;
        }
    }
    PROTO_UNKNOWN
}

/// The role of a socket that sent (`direction` [`DIR_EGRESS`]) or received a message whose
/// protocol [`detect`] guessed as `proto` and whose first byte is `first`: requests (HTTP request
/// lines, PostgreSQL startup codes, RESP commands) come from clients; status lines, MySQL
/// greetings and Redis error replies from servers.
#[must_use]
pub fn socket_role(proto: u8, first: u8, direction: u8) -> u8 {
    let sent_by_client = match proto {
        PROTO_HTTP => first != b'H',
        PROTO_POSTGRES => true,
        PROTO_MYSQL => false,
        PROTO_REDIS => first == b'*',
        _ => return ROLE_UNKNOWN,
    };
    if sent_by_client == (direction == DIR_EGRESS) { ROLE_CLIENT } else { ROLE_SERVER }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(b: &[u8]) -> ([u8; HEAD], usize) {
        let mut h = [0; HEAD];
        let n = b.len().min(HEAD);
        h[..n].copy_from_slice(&b[..n]);
        (h, n)
    }

    fn d(b: &[u8]) -> u8 {
        let (h, n) = head(b);
        detect(&h, n)
    }

    #[test]
    fn tells_the_socket_role_from_the_first_message() {
        use crate::DIR_INGRESS;
        let role = |b: &[u8], dir| socket_role(d(b), b[0], dir);
        assert_eq!(role(b"GET / HTTP/1.1\r\n", DIR_EGRESS), ROLE_CLIENT);
        assert_eq!(role(b"GET / HTTP/1.1\r\n", DIR_INGRESS), ROLE_SERVER);
        assert_eq!(role(b"HTTP/1.1 200 OK\r\n", DIR_EGRESS), ROLE_SERVER);
        assert_eq!(role(b"*2\r\n$3\r\nGET\r\n", DIR_EGRESS), ROLE_CLIENT);
        assert_eq!(role(b"-ERR unknown\r\n", DIR_INGRESS), ROLE_CLIENT);
        assert_eq!(role(b"\x5b\x00\x00\x00\x0a5.5.5-10.11", DIR_EGRESS), ROLE_SERVER);
        assert_eq!(role(b"\x00\x00\x00\x08\x04\xd2\x16\x2f", DIR_INGRESS), ROLE_SERVER);
        assert_eq!(socket_role(crate::PROTO_DNS, 0, DIR_EGRESS), ROLE_UNKNOWN);
    }

    #[test]
    fn recognises_each_protocol() {
        assert_eq!(d(b"GET /health HTTP/1.1\r\n"), PROTO_HTTP);
        assert_eq!(d(b"HTTP/1.1 200 OK\r\n"), PROTO_HTTP);
        assert_eq!(d(b"\x16\x03\x01\x02\x00\x01"), PROTO_TLS);
        // StartupMessage: length 41, protocol 3.0.
        assert_eq!(d(b"\x00\x00\x00\x29\x00\x03\x00\x00user\x00"), PROTO_POSTGRES);
        // SSLRequest.
        assert_eq!(d(b"\x00\x00\x00\x08\x04\xd2\x16\x2f"), PROTO_POSTGRES);
        // MariaDB greeting: length 0x5b, seq 0, protocol 10.
        assert_eq!(d(b"\x5b\x00\x00\x00\x0a5.5.5-10.11"), PROTO_MYSQL);
        assert_eq!(d(b"*2\r\n$3\r\nGET\r\n"), PROTO_REDIS);
        assert_eq!(d(b"*12\r\n$4\r\nMSET"), PROTO_REDIS);
    }

    #[test]
    fn recognises_servers_refusing_a_connection_before_any_request() {
        // Redis in protected mode; out of client slots.
        assert_eq!(d(b"-DENIED Redis is running in protected mode"), PROTO_REDIS);
        assert_eq!(d(b"-ERR max number of clients reached\r\n"), PROTO_REDIS);
        // MariaDB: ERR 1040 Too many connections, as the first packet.
        assert_eq!(d(b"\x17\x00\x00\x00\xff\x10\x04Too many connections"), PROTO_MYSQL);
        // ERR 1129, host blocked.
        assert_eq!(d(b"\x44\x00\x00\x00\xff\x69\x04Host '10.0.0.2' is blocked"), PROTO_MYSQL);
        assert_eq!(d(b"-nope lower case"), PROTO_UNKNOWN);
        assert_eq!(d(b"-AB x"), PROTO_UNKNOWN);
        assert_eq!(d(b"\x17\x00\x00\x01\xff\x10\x04Too many"), PROTO_UNKNOWN, "not sequence 0");
    }

    #[test]
    fn leaves_other_bytes_unknown() {
        assert_eq!(d(b"SSH-2.0-OpenSSH_9"), PROTO_UNKNOWN);
        assert_eq!(d(b""), PROTO_UNKNOWN);
        assert_eq!(d(b"GET"), PROTO_UNKNOWN);
        assert_eq!(d(b"*x\r\n"), PROTO_UNKNOWN);
        assert_eq!(d(&[0xff; 16]), PROTO_UNKNOWN);
    }
}
