//! Property tests: on arbitrary bytes and on recorded sessions split or cut at arbitrary points,
//! every parser frames without panicking, never reports a frame of length 0, and keeps no text
//! longer than `MAX_TEXT` ([`replay`] checks the last two on every frame); splitting a recorded
//! session differently never changes what it reports.

use proptest::prelude::*;

use super::{Conn, Dir, replay, transcript};
use crate::{Parser, Protocol, Redaction, dns::Transport};

/// Every recorded session with the parser it needs.
fn sessions() -> Vec<(Conn, Protocol, Option<Transport>)> {
    let files: [(&str, Protocol, Option<Transport>); 18] = [
        (include_str!("../fixtures/http/keepalive.hex"), Protocol::Http1, None),
        (include_str!("../fixtures/http/chunked.hex"), Protocol::Http1, None),
        (include_str!("../fixtures/http/head.hex"), Protocol::Http1, None),
        (include_str!("../fixtures/http/http10_eof.hex"), Protocol::Http1, None),
        (include_str!("../fixtures/http/post_chunked.hex"), Protocol::Http1, None),
        (include_str!("../fixtures/http/pipelined.hex"), Protocol::Http1, None),
        (include_str!("../fixtures/postgres/psql_simple.hex"), Protocol::Postgres, None),
        (include_str!("../fixtures/postgres/asyncpg_extended.hex"), Protocol::Postgres, None),
        (include_str!("../fixtures/postgres/gssenc_cancel.hex"), Protocol::Postgres, None),
        (include_str!("../fixtures/redis/cli_basic.hex"), Protocol::Redis, None),
        (include_str!("../fixtures/redis/pipeline.hex"), Protocol::Redis, None),
        (include_str!("../fixtures/redis/resp3_cli.hex"), Protocol::Redis, None),
        (include_str!("../fixtures/redis/resp3_push.hex"), Protocol::Redis, None),
        (include_str!("../fixtures/redis/inline.hex"), Protocol::Redis, None),
        (include_str!("../fixtures/mysql/cli_query.hex"), Protocol::Mysql, None),
        (include_str!("../fixtures/mysql/prepared.hex"), Protocol::Mysql, None),
        (include_str!("../fixtures/dns/udp.hex"), Protocol::Dns, Some(Transport::Udp)),
        (include_str!("../fixtures/dns/tcp.hex"), Protocol::Dns, Some(Transport::Tcp)),
    ];
    files
        .into_iter()
        .flat_map(|(text, p, t)| transcript(text).into_iter().map(move |c| (c, p, t)))
        .collect()
}

fn parser(p: Protocol, t: Option<Transport>, full: bool) -> Parser {
    match t {
        Some(t) => Parser::new_dns(t),
        None => Parser::new(p, Redaction { keep_full_statements: full }),
    }
}

/// `conn` with every chunk cut into pieces of the given sizes (cycled); with `cut`, pieces
/// of odd index lose their tail instead, as a capture limit would cut them.
fn resplit(conn: &Conn, sizes: &[usize], cut: bool) -> Conn {
    let mut out = Vec::new();
    let mut k = 0;
    for (dir, chunk) in conn {
        let mut rest = chunk.as_slice();
        while !rest.is_empty() {
            let n = sizes[k % sizes.len()].clamp(1, rest.len());
            let piece = &rest[..n];
            let kept = if cut && k % 2 == 1 { &piece[..piece.len().div_ceil(2)] } else { piece };
            out.push((*dir, kept.to_vec()));
            rest = &rest[n..];
            k += 1;
        }
    }
    out
}

const PROTOCOLS: [Protocol; 5] =
    [Protocol::Http1, Protocol::Postgres, Protocol::Redis, Protocol::Mysql, Protocol::Dns];

proptest! {
    // Failures are not persisted to a file outside this module: a failure found here becomes a
    // unit test next to the parser it concerns.
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes(chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 1..6),
                       ups in prop::collection::vec(any::<bool>(), 6)) {
        let conn: Conn = chunks.iter().zip(&ups)
            .map(|(c, &up)| (if up { Dir::Up } else { Dir::Down }, c.clone()))
            .collect();
        for p in PROTOCOLS {
            replay(Parser::new(p, Redaction::default()), &conn, false);
            replay(Parser::new(p, Redaction { keep_full_statements: true }), &conn, false);
        }
        replay(Parser::new_dns(Transport::Tcp), &conn, false);
    }

    #[test]
    fn recorded_sessions_split_anywhere(pick in any::<prop::sample::Index>(),
                                        sizes in prop::collection::vec(1usize..200, 1..8),
                                        full in any::<bool>()) {
        let all = sessions();
        let (conn, p, t) = &all[pick.index(all.len())];
        let datagrams = *t == Some(Transport::Udp);
        let whole = replay(parser(*p, *t, full), conn, datagrams);
        let split_conn = if datagrams { conn.clone() } else { resplit(conn, &sizes, false) };
        let split = replay(parser(*p, *t, full), &split_conn, datagrams);
        prop_assert!(split.errors.is_empty(), "{:?}", split.errors);
        prop_assert_eq!(whole.exchanges, split.exchanges);
    }

    #[test]
    fn recorded_sessions_cut_short(pick in any::<prop::sample::Index>(),
                                   sizes in prop::collection::vec(1usize..200, 1..8)) {
        let all = sessions();
        let (conn, p, t) = &all[pick.index(all.len())];
        // Errors are allowed here (bytes are missing); panics, empty frames and long texts not.
        replay(parser(*p, *t, false), &resplit(conn, &sizes, true), *t == Some(Transport::Udp));
    }
}

/// Byte-level mutations of every recorded session (a deterministic sweep, so every message
/// type sees them): each byte replaced in turn by 0x00, 0xFF and its bit-flipped value.
#[test]
fn recorded_sessions_with_corrupted_bytes() {
    for (conn, p, t) in sessions() {
        let total: usize = conn.iter().map(|(_, c)| c.len()).sum();
        // Stride keeps large sessions fast while still touching every region.
        let stride = (total / 400).max(1);
        for target in (0..total).step_by(stride) {
            for value in [0x00, 0xFF, 0x80] {
                let mut mutated = conn.clone();
                let mut at = target;
                for (_, c) in &mut mutated {
                    if at < c.len() {
                        c[at] = if value == 0x80 { c[at] ^ 0x80 } else { value };
                        break;
                    }
                    at -= c.len();
                }
                replay(parser(p, t, false), &mutated, t == Some(Transport::Udp));
            }
        }
    }
}
