//! Each recorded session (see `../fixtures/README.md`) replayed through its parser, with what
//! the recording's client did checked against what the parser reports.

use hopwatch_common::{PROTO_HTTP, PROTO_MYSQL, PROTO_POSTGRES, PROTO_REDIS, detect::HEAD};

use super::{Conn, Replay, replay, transcript};
use crate::{Parser, Protocol, Redaction, Request, Response, dns, dns::Transport, mysql, postgres};

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

/// Method, host, path, status, failure.
fn http(conns: &[Conn]) -> Vec<(String, String, String, u16, Option<String>)> {
    let r = replay_all(conns, || Parser::new(Protocol::Http1, Redaction::default()), false);
    r.exchanges
        .iter()
        .map(|(q, a)| match (q, a) {
            (Request::Http(h), Some(Response::Http(resp))) => (
                h.method.to_string(),
                h.host.clone(),
                h.path.clone(),
                resp.status,
                q.failure(a.as_ref()),
            ),
            other => panic!("not an answered HTTP request: {other:?}"),
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
    let text = format!("{:?}", r.exchanges);
    for secret in ["secret", "alice", "user="] {
        assert!(!text.contains(secret), "{secret:?} leaked into {text}");
    }
    let Request::Http(first) = &r.exchanges[0].0 else { panic!("HTTP") };
    assert_eq!(first.headers.len(), 1);
    assert_eq!((first.headers[0].name, first.headers[0].value.as_str()), ("x-request-id", "req-1"));
    assert_eq!(
        http(&conns),
        [
            (s("GET"), s("127.0.0.1:18080"), s("/index.html"), 200, None),
            (s("GET"), s("127.0.0.1:18080"), s("/missing"), 404, None),
        ]
    );
}

#[test]
fn http_chunked_then_500_head_and_pipelining() {
    assert_eq!(
        http(&fixture!("http/chunked.hex")),
        [
            (s("GET"), s("127.0.0.1:18080"), s("/big.txt"), 200, None),
            (s("GET"), s("127.0.0.1:18080"), s("/fail"), 500, Some(s("HTTP 500"))),
        ]
    );
    assert_eq!(
        http(&fixture!("http/head.hex")),
        [(s("HEAD"), s("127.0.0.1:18080"), s("/big.txt"), 200, None)]
    );
    assert_eq!(
        http(&fixture!("http/pipelined.hex")),
        [
            (s("GET"), s("x"), s("/echo"), 200, None),
            (s("GET"), s("x"), s("/index.html"), 200, None)
        ]
    );
    assert_eq!(
        http(&fixture!("http/post_chunked.hex")),
        [(s("POST"), s("127.0.0.1:18080"), s("/echo"), 200, None)]
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

/// Kind, query, command tag (or the encryption answer), SQLSTATE, failure.
fn pg(conns: &[Conn]) -> Vec<(String, String, String, String, Option<String>)> {
    use postgres::{QueryKind, Request as Q, Response as R};
    let r = replay_all(conns, || Parser::new(Protocol::Postgres, Redaction::default()), false);
    r.exchanges
        .iter()
        .map(|(q, a)| {
            let Request::Postgres(req) = q else { panic!("not a PostgreSQL request: {q:?}") };
            let (kind, query, user) = match req {
                Q::Startup(login) => ("startup", String::new(), login.user.as_str()),
                Q::SslRequest => ("ssl", String::new(), "hop"),
                Q::GssEncRequest => ("gssenc", String::new(), "hop"),
                Q::Cancel => ("cancel", String::new(), "hop"),
                Q::Query { kind, query, login } => (
                    if *kind == QueryKind::Simple { "simple" } else { "extended" },
                    query.clone(),
                    login.as_ref().map_or("", |l| l.user.as_str()),
                ),
            };
            assert_eq!(user, "hop", "the session's login on {req:?}");
            let (command, code) = match a {
                Some(Response::Postgres(R::Encryption { accepted })) => {
                    ((if *accepted { "accepted" } else { "refused" }).to_owned(), String::new())
                }
                Some(Response::Postgres(R::Done { command, error_code })) => {
                    (command.clone(), error_code.clone())
                }
                _ => (String::new(), String::new()),
            };
            (kind.to_owned(), query, command, code, q.failure(a.as_ref()))
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
    assert!(!format!("{:?}", r.exchanges).contains("SCRAM"));
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
    r.exchanges
        .iter()
        .map(|(q, a)| match q {
            Request::Redis(x) => (x.command.clone(), x.args.clone(), q.failure(a.as_ref())),
            other => panic!("not a Redis request: {other:?}"),
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

/// Command, query, error code, SQLSTATE, statement id (the answer's, for a prepare), failure.
fn mysql(conns: &[Conn]) -> Vec<(String, String, u16, String, u32, Option<String>)> {
    let r = replay_all(conns, || Parser::new(Protocol::Mysql, Redaction::default()), false);
    r.exchanges
        .iter()
        .map(|(q, a)| {
            let Request::Mysql(m) = q else { panic!("not a MySQL request: {q:?}") };
            let resp = match a {
                Some(Response::Mysql(x)) => x.clone(),
                _ => mysql::Response::default(),
            };
            let id = if resp.statement_id == 0 { m.statement_id } else { resp.statement_id };
            let fail = q.failure(a.as_ref());
            (m.name().to_owned(), m.query.clone(), resp.error_code, resp.sql_state, id, fail)
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
    r.exchanges
        .iter()
        .map(|(q, a)| match (q, a) {
            (Request::Dns(d), Some(Response::Dns(answer))) => (
                d.query.clone(),
                vec![dns::type_name(d.qtype)],
                answer.ips.clone(),
                answer.cnames.clone(),
                q.failure(a.as_ref()),
            ),
            other => panic!("not an answered DNS query: {other:?}"),
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

/// The kernel decides which connections' bytes are sent at all, from the first bytes of a
/// message (`hopwatch_common::detect`): every recorded session must be recognised there, by the
/// side that speaks first in its protocol.
#[test]
fn the_kernel_detector_names_every_recorded_protocol() {
    let first = |conns: &[Conn], up: bool| {
        conns[0]
            .iter()
            .find(|(d, _)| (*d == super::Dir::Up) == up)
            .map(|(_, b)| b.clone())
            .expect("a chunk")
    };
    let detect = |bytes: &[u8]| {
        let mut head = [0; HEAD];
        let n = bytes.len().min(HEAD);
        head[..n].copy_from_slice(&bytes[..n]);
        hopwatch_common::detect::detect(&head, n)
    };
    let cases = [
        ("http/keepalive.hex", PROTO_HTTP, true),
        ("http/keepalive.hex", PROTO_HTTP, false),
        ("http/pipelined.hex", PROTO_HTTP, true),
        ("postgres/psql_simple.hex", PROTO_POSTGRES, true),
        ("postgres/asyncpg_extended.hex", PROTO_POSTGRES, true),
        ("postgres/gssenc_cancel.hex", PROTO_POSTGRES, true),
        ("mysql/cli_query.hex", PROTO_MYSQL, false),
        ("mysql/prepared.hex", PROTO_MYSQL, false),
        ("redis/pipeline.hex", PROTO_REDIS, true),
        ("redis/cli_basic.hex", PROTO_REDIS, true),
    ];
    for (path, want, up) in cases {
        let text = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/fixtures").join(path),
        )
        .expect("fixture");
        assert_eq!(detect(&first(&transcript(&text), up)), want, "{path} from_client={up}");
    }
    // Unanswered requests carry no failure.
    let q = &replay_all(&fixture!("dns/udp.hex"), || Parser::new_dns(Transport::Udp), true)
        .exchanges[0]
        .0;
    assert_eq!(q.failure(None), None);
}
