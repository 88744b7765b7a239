//! Each recorded session (see `../fixtures/README.md`) replayed through its parser, with what
//! the recording's client did checked against what the parser reports.

use super::{Conn, Replay, replay, transcript};
use crate::{
    proto::flow::layer7::Record,
    protocols::{
        Parser, Protocol, Redaction, Request, Response, detect, dns::Transport, l7_record, postgres,
    },
};

macro_rules! fixture {
    ($path:literal) => {
        transcript(include_str!(concat!("../fixtures/", $path)))
    };
}

/// Replays every connection of a transcript with a fresh parser; fails on any parse error.
fn replay_all(conns: &[Conn], new: impl Fn() -> Parser, datagrams: bool) -> Replay {
    let mut all = Replay::default();
    for conn in conns {
        let r = replay(new(), conn, datagrams);
        assert!(r.errors.is_empty(), "parse errors on a recorded session: {:?}", r.errors);
        assert!(r.unpaired.is_empty(), "responses without a request: {:?}", r.unpaired);
        all.exchanges.extend(r.exchanges);
        all.skips += r.skips;
    }
    all
}

fn http(conns: &[Conn]) -> Vec<(String, String, u32, Option<String>)> {
    let r = replay_all(conns, || Parser::new(Protocol::Http1, Redaction::default()), false);
    r.records()
        .into_iter()
        .map(|rec| match rec.record {
            Record::Http(h) => (h.method, h.url, h.code, rec.error),
            other => panic!("not an HTTP record: {other:?}"),
        })
        .collect()
}

fn s(x: &str) -> String {
    x.to_owned()
}

#[test]
fn http_keep_alive_strips_query_and_credentials() {
    let conns = fixture!("http/keepalive.hex");
    let r = replay_all(&conns, || Parser::new(Protocol::Http1, Redaction::default()), false);
    let records = r.records();
    let text = format!("{records:?}");
    for secret in ["secret", "alice", "user="] {
        assert!(!text.contains(secret), "{secret:?} leaked into {text}");
    }
    let Record::Http(first) = &records[0].record else { panic!("HTTP") };
    assert_eq!(first.headers.len(), 1);
    assert_eq!(
        (first.headers[0].key.as_str(), first.headers[0].value.as_str()),
        ("x-request-id", "req-1")
    );
    assert_eq!(
        http(&conns),
        [
            (s("GET"), s("http://127.0.0.1:18080/index.html"), 200, None),
            (s("GET"), s("http://127.0.0.1:18080/missing"), 404, None),
        ]
    );
}

#[test]
fn http_chunked_then_500_head_and_pipelining() {
    assert_eq!(
        http(&fixture!("http/chunked.hex")),
        [
            (s("GET"), s("http://127.0.0.1:18080/big.txt"), 200, None),
            (s("GET"), s("http://127.0.0.1:18080/fail"), 500, Some(s("HTTP 500"))),
        ]
    );
    assert_eq!(
        http(&fixture!("http/head.hex")),
        [(s("HEAD"), s("http://127.0.0.1:18080/big.txt"), 200, None)]
    );
    assert_eq!(
        http(&fixture!("http/pipelined.hex")),
        [
            (s("GET"), s("http://x/echo"), 200, None),
            (s("GET"), s("http://x/index.html"), 200, None)
        ]
    );
    assert_eq!(
        http(&fixture!("http/post_chunked.hex")),
        [(s("POST"), s("http://127.0.0.1:18080/echo"), 200, None)]
    );
}

#[test]
fn http_body_until_close_and_chunked_upload_headers() {
    let conns = fixture!("http/http10_eof.hex");
    let r = replay_all(&conns, || Parser::new(Protocol::Http1, Redaction::default()), false);
    let [(Request::Http(req), Some(Response::Http(resp)))] = r.exchanges.as_slice() else {
        panic!("one exchange: {:?}", r.exchanges);
    };
    assert_eq!((req.version.as_str(), resp.status, resp.keep_alive), ("HTTP/1.0", 200, false));
    let r = replay_all(
        &fixture!("http/post_chunked.hex"),
        || Parser::new(Protocol::Http1, Redaction::default()),
        false,
    );
    let Request::Http(req) = &r.exchanges[0].0 else { panic!("HTTP") };
    assert_eq!(req.headers[0].name, "traceparent");
    assert_eq!(req.headers[0].value, "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
    // The interim "100 Continue" and the chunked body, sent after the head, are skipped.
    assert!(r.skips >= 2, "{} skips", r.skips);
}

fn pg(conns: &[Conn]) -> Vec<(String, String, String, String, Option<String>)> {
    let r = replay_all(conns, || Parser::new(Protocol::Postgres, Redaction::default()), false);
    r.records()
        .into_iter()
        .map(|rec| match rec.record {
            Record::Postgres(p) => {
                assert!(
                    p.kind == "ssl" || p.kind == "gssenc" || p.kind == "cancel" || p.user == "hop"
                );
                (p.kind, p.query, p.command, p.error_code, rec.error)
            }
            other => panic!("not a PostgreSQL record: {other:?}"),
        })
        .collect()
}

#[test]
fn postgres_psql_simple_queries() {
    let conns = fixture!("postgres/psql_simple.hex");
    let got = pg(&conns);
    let want = [
        (s("ssl"), s(""), s("refused"), s(""), None),
        (s("startup"), s(""), s(""), s(""), None),
        (
            s("simple"),
            s("INSERT INTO items (name, price) VALUES (?, ?)"),
            s("INSERT 0 1"),
            s(""),
            None,
        ),
        (
            s("simple"),
            s("SELECT id, name, price FROM items WHERE price > ?"),
            s("SELECT 1"),
            s(""),
            None,
        ),
        (
            s("simple"),
            s("SELECT * FROM missing_table"),
            s(""),
            s("42P01"),
            Some(s("SQLSTATE 42P01")),
        ),
        (s("simple"), s("SELECT pg_sleep(?)"), s("SELECT 1"), s(""), None),
        // Two statements in one Query: one response, the last tag.
        (s("simple"), s("SELECT ?; SELECT ? || ?"), s("SELECT 1"), s(""), None),
    ];
    assert_eq!(got, want);
    // SCRAM messages are skipped unread.
    let r = replay_all(&conns, || Parser::new(Protocol::Postgres, Redaction::default()), false);
    let Request::Postgres(postgres::Request::Startup(login)) = &r.exchanges[1].0 else {
        panic!("startup second: {:?}", r.exchanges[1]);
    };
    assert_eq!((login.user.as_str(), login.database.as_str()), ("hop", "shop"));
    assert!(!format!("{:?}", r.records()).contains("SCRAM"));
}

#[test]
fn postgres_asyncpg_extended_queries() {
    let got = pg(&fixture!("postgres/asyncpg_extended.hex"));
    let want = [
        (s("startup"), s(""), s(""), s(""), None),
        (s("extended"), s("SELECT $1::int + ? AS n, ? AS s"), s("SELECT 1"), s(""), None),
        (
            s("extended"),
            s("INSERT INTO items (name, price) VALUES ($1, $2)"),
            s("INSERT 0 1"),
            s(""),
            None,
        ),
        (
            s("extended"),
            s("SELECT * FROM nope WHERE id = $1"),
            s(""),
            s("42P01"),
            Some(s("SQLSTATE 42P01")),
        ),
        (s("extended"), s("SELECT pg_sleep($1)"), s("SELECT 1"), s(""), None),
    ];
    assert_eq!(got, want);
}

#[test]
fn postgres_gssenc_and_cancel() {
    let conns = fixture!("postgres/gssenc_cancel.hex");
    let r = replay_all(&conns, || Parser::new(Protocol::Postgres, Redaction::default()), false);
    assert!(
        matches!(
            r.exchanges.as_slice(),
            [
                (
                    Request::Postgres(postgres::Request::GssEncRequest),
                    Some(Response::Postgres(postgres::Response::Encryption { accepted: true }))
                ),
                (Request::Postgres(postgres::Request::Cancel), None),
            ]
        ),
        "{:?}",
        r.exchanges
    );
}

fn redis(conns: &[Conn], redaction: Redaction) -> Vec<(String, Vec<String>, Option<String>)> {
    let r = replay_all(conns, || Parser::new(Protocol::Redis, redaction), false);
    r.records()
        .into_iter()
        .map(|rec| match rec.record {
            Record::Redis(x) => (x.command, x.args, rec.error),
            other => panic!("not a Redis record: {other:?}"),
        })
        .collect()
}

#[test]
fn redis_commands_errors_and_pipelining() {
    let none = Vec::new;
    let got = redis(&fixture!("redis/cli_basic.hex"), Redaction::default());
    let want = [
        (s("SET"), none(), None),
        (s("GET"), none(), None),
        (s("GETX"), none(), Some(s("ERR"))),
        (s("CLIENT SETNAME"), none(), None),
        (s("CONFIG GET"), none(), None),
        (s("LPUSH"), none(), Some(s("WRONGTYPE"))),
    ];
    assert_eq!(got, want);
    let full = Redaction { keep_full_statements: true };
    let got = redis(&fixture!("redis/pipeline.hex"), full);
    let names: Vec<_> = got.iter().map(|(c, _, _)| c.as_str()).collect();
    assert_eq!(
        names,
        [
            "CLIENT SETINFO",
            "CLIENT SETINFO",
            "SET",
            "GET",
            "INCRBY",
            "HSET",
            "HGETALL",
            "RPUSH",
            "LRANGE",
            "GET"
        ]
    );
    assert_eq!(got[0].2.as_deref(), Some("ERR"));
    assert_eq!(got[2].1, [s("k1"), s("v1")]);
    assert!(got[3..].iter().all(|(_, _, e)| e.is_none()));
}

#[test]
fn redis_resp3_and_inline() {
    let got = redis(&fixture!("redis/resp3_cli.hex"), Redaction::default());
    let names: Vec<_> = got.iter().map(|(c, _, e)| (c.as_str(), e.as_deref())).collect();
    assert_eq!(
        names,
        [
            ("HELLO", None),
            ("HGETALL", None),
            ("HELLO", None),
            ("SADD", None),
            ("HELLO", None),
            ("SMEMBERS", None),
            ("HELLO", None),
            ("INCRBYFLOAT", None),
            ("HELLO", None),
            ("GETX", Some("ERR")),
        ]
    );
    // The invalidation push after SET is skipped, so PING still pairs with PONG.
    let conns = fixture!("redis/resp3_push.hex");
    let r = replay_all(&conns, || Parser::new(Protocol::Redis, Redaction::default()), false);
    let names: Vec<_> = r
        .exchanges
        .iter()
        .map(|(q, a)| match (q, a) {
            (Request::Redis(q), Some(Response::Redis(a))) => {
                (q.command.as_str(), a.error.is_none())
            }
            other => panic!("unpaired: {other:?}"),
        })
        .collect();
    assert_eq!(
        names,
        [("HELLO", true), ("CLIENT TRACKING", true), ("GET", true), ("SET", true), ("PING", true)]
    );
    assert_eq!(r.skips, 1, "one push");
    let got = redis(&fixture!("redis/inline.hex"), Redaction { keep_full_statements: true });
    assert_eq!(
        got,
        [
            (s("PING"), vec![], None),
            (s("ECHO"), vec![s("hi")], None),
            (s("GET"), vec![s("k1")], None)
        ]
    );
}

fn mysql(conns: &[Conn]) -> Vec<(String, String, u32, String, u32, Option<String>)> {
    let r = replay_all(conns, || Parser::new(Protocol::Mysql, Redaction::default()), false);
    r.records()
        .into_iter()
        .map(|rec| match rec.record {
            Record::Mysql(m) => {
                (m.command, m.query, m.error_code, m.sql_state, m.statement_id, rec.error)
            }
            other => panic!("not a MySQL record: {other:?}"),
        })
        .collect()
}

#[test]
fn mysql_queries_result_sets_and_errors() {
    let conns = fixture!("mysql/cli_query.hex");
    let got = mysql(&conns);
    let q = |query: &str| (s("COM_QUERY"), s(query), 0, s(""), 0, None);
    assert_eq!(
        got,
        [
            q("SELECT id, name, price FROM items WHERE price > ?"),
            q("INSERT INTO items (name, price) VALUES (?, ?)"),
            q("CALL two_results()"),
            q("SELECT SLEEP(?)"),
            (
                s("COM_QUERY"),
                s("SELECT * FROM missing"),
                1146,
                s("42S02"),
                0,
                Some(s("SQLSTATE 42S02"))
            ),
            (s("COM_QUIT"), s(""), 0, s(""), 0, None),
        ]
    );
    let r = replay_all(&conns, || Parser::new(Protocol::Mysql, Redaction::default()), false);
    let rows: Vec<u64> = r
        .exchanges
        .iter()
        .map(|(_, resp)| match resp {
            Some(Response::Mysql(m)) => m.rows,
            _ => 0,
        })
        .collect();
    // cup and pen; the INSERT; one row from each of the procedure's two result sets (the first
    // ends with SERVER_MORE_RESULTS_EXISTS, the second arrives in another read); SLEEP's 0.
    assert_eq!(rows, [2, 0, 2, 1, 0, 0]);
}

#[test]
fn mysql_prepared_statements() {
    let got = mysql(&fixture!("mysql/prepared.hex"));
    let sel = s("SELECT id, name FROM items WHERE price > ?");
    let ins = s("INSERT INTO items (name, price) VALUES (?, ?)");
    let ok = |c: &str, q: &str, id| (s(c), s(q), 0, s(""), id, None);
    assert_eq!(
        got,
        [
            ok("COM_QUERY", "SET NAMES ? COLLATE ?", 0),
            ok("COM_QUERY", "SET @@session.autocommit = OFF", 0),
            ok("COM_PING", "", 0),
            ok("COM_STMT_PREPARE", &sel, 1),
            ok("COM_STMT_RESET", "", 1),
            ok("COM_STMT_EXECUTE", &sel, 1),
            ok("COM_STMT_CLOSE", "", 1),
            ok("COM_STMT_PREPARE", &ins, 2),
            ok("COM_STMT_RESET", "", 2),
            ok("COM_STMT_EXECUTE", &ins, 2),
            ok("COM_STMT_CLOSE", "", 2),
            (
                s("COM_STMT_PREPARE"),
                s("SELECT * FROM missing WHERE id = ?"),
                1146,
                s("42S02"),
                0,
                Some(s("SQLSTATE 42S02"))
            ),
            ok("COM_PING", "", 0),
            ok("COM_QUIT", "", 0),
        ]
    );
}

/// Query, query types, addresses, CNAMEs, error.
type DnsRow = (String, Vec<String>, Vec<String>, Vec<String>, Option<String>);

fn dns(conns: &[Conn], transport: Transport) -> Vec<DnsRow> {
    let r = replay_all(conns, || Parser::new_dns(transport), transport == Transport::Udp);
    r.records()
        .into_iter()
        .map(|rec| match rec.record {
            Record::Dns(d) => (d.query, d.qtypes, d.ips, d.cnames, rec.error),
            other => panic!("not a DNS record: {other:?}"),
        })
        .collect()
}

#[test]
fn dns_answers_from_dnsmasq() {
    let v = |x: &[&str]| x.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    assert_eq!(
        dns(&fixture!("dns/udp.hex"), Transport::Udp),
        [
            (s("www.hop.test."), v(&["A"]), v(&["10.0.0.5"]), v(&[]), None),
            (s("www.hop.test."), v(&["AAAA"]), v(&["fd00::5"]), v(&[]), None),
            (s("alias.hop.test."), v(&["A"]), v(&["10.0.0.5"]), v(&["www.hop.test."]), None),
            (s("nope.hop.test."), v(&["A"]), v(&[]), v(&[]), Some(s("NXDOMAIN"))),
        ]
    );
    assert_eq!(
        dns(&fixture!("dns/tcp.hex"), Transport::Tcp),
        [(s("alias.hop.test."), v(&["A"]), v(&["10.0.0.5"]), v(&["www.hop.test."]), None),]
    );
}

#[test]
fn detect_names_every_recorded_protocol() {
    let first = |conns: &[Conn], up: bool| {
        conns[0]
            .iter()
            .find(|(d, _)| (*d == super::Dir::Up) == up)
            .map(|(_, b)| b.clone())
            .expect("a chunk")
    };
    let cases = [
        (fixture!("http/keepalive.hex"), Protocol::Http1, 8080, true),
        (fixture!("http/keepalive.hex"), Protocol::Http1, 8080, false),
        (fixture!("postgres/psql_simple.hex"), Protocol::Postgres, 15432, true),
        (fixture!("postgres/asyncpg_extended.hex"), Protocol::Postgres, 15432, false),
        (fixture!("mysql/cli_query.hex"), Protocol::Mysql, 13306, false),
        (fixture!("redis/pipeline.hex"), Protocol::Redis, 16379, true),
        (fixture!("redis/inline.hex"), Protocol::Redis, 6379, true),
        (fixture!("redis/cli_basic.hex"), Protocol::Redis, 6379, false),
        (fixture!("dns/udp.hex"), Protocol::Dns, 53, true),
        (fixture!("dns/udp.hex"), Protocol::Dns, 53, false),
        (fixture!("dns/tcp.hex"), Protocol::Dns, 53, true),
    ];
    for (conns, want, port, up) in cases {
        assert_eq!(detect(&first(&conns, up), up, port), Some(want), "{want:?} from_client={up}");
    }
    assert_eq!(detect(&first(&fixture!("redis/inline.hex"), true), true, 8080), None);
    assert_eq!(detect(&first(&fixture!("dns/udp.hex"), true), true, 8053), None);
    // Records of unanswered requests carry no error.
    let q = &replay_all(&fixture!("dns/udp.hex"), || Parser::new_dns(Transport::Udp), true)
        .exchanges[0]
        .0;
    assert_eq!(l7_record(q, None).error, None);
}
