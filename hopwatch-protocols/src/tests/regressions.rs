//! Inputs the property tests found during development, kept as unit tests.

use crate::{Frame, Redaction, mysql, redis};

fn packet(seq: u8, payload: &[u8]) -> Vec<u8> {
    let n = u32::try_from(payload.len()).expect("small").to_le_bytes();
    let mut p = vec![n[0], n[1], n[2], seq];
    p.extend_from_slice(payload);
    p
}

/// A prepare answer that waits for its final EOF (the client did not set
/// `CLIENT_DEPRECATE_EOF`) and then gets a packet out of sequence must fail, not end the
/// response with a frame of length 0.
#[test]
fn mysql_missing_final_eof_is_an_error_not_an_empty_frame() {
    let mut p = mysql::Parser::default();
    // Handshake response: CLIENT_PROTOCOL_41 only, user "u".
    let mut hs = vec![0x00, 0x02, 0, 0];
    hs.extend_from_slice(&[0; 28]);
    hs.extend_from_slice(b"u\0");
    assert_eq!(p.request(&packet(1, &hs)), Ok(Frame::Skip { len: hs.len() + 4 }));
    assert_eq!(p.user(), Some("u"));
    let Ok(Frame::Complete { msg: req, .. }) = p.request(&packet(0, b"\x16SELECT a FROM t")) else {
        panic!("COM_STMT_PREPARE");
    };
    // OK_Prepare: statement 7, one column, no parameters; then the column definition.
    let mut answer = packet(1, &[0, 7, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    answer.extend(packet(
        2,
        b"\x03def\x00\x00\x00\x01a\x00\x0c\x3f\x00\x0b\x00\x00\x00\x03\x00\x00\x00\x00\x00",
    ));
    assert_eq!(p.response(&answer, Some(&req)), Ok(Frame::Skip { len: answer.len() }));
    let stray = packet(1, &[0, 0, 0, 2, 0, 0, 0]);
    assert!(p.response(&stray, Some(&req)).is_err());
    // The EOF arriving is the normal case: the answer completes with the statement id.
    let mut p2 = mysql::Parser::default();
    assert!(p2.request(&packet(1, &hs)).is_ok());
    assert_eq!(p2.response(&answer, Some(&req)), Ok(Frame::Skip { len: answer.len() }));
    let Ok(Frame::Complete { msg, len: 9 }) =
        p2.response(&packet(3, b"\xfe\x00\x00\x02\x00"), Some(&req))
    else {
        panic!("EOF ends the prepare answer");
    };
    assert_eq!(msg.statement_id, 7);
}

/// An ERR packet cut by a read boundary is read once it is all there, not from its first half.
#[test]
fn mysql_err_packet_split_across_reads() {
    let mut p = mysql::Parser::default();
    let req = mysql::Request { command: 3, query: String::new(), statement_id: 0 };
    let err = packet(1, b"\xff\x7a\x04#42S02Table 'shop.missing' doesn't exist");
    assert_eq!(p.response(&err[..7], Some(&req)), Ok(Frame::Incomplete));
    let Ok(Frame::Complete { msg, .. }) = p.response(&err, Some(&req)) else { panic!("ERR") };
    assert_eq!((msg.error_code, msg.sql_state.as_str()), (1146, "42S02"));
}

/// With full statements kept, a command cut by a read boundary waits for its arguments.
#[test]
fn redis_arguments_split_across_reads() {
    let mut p = redis::Parser::new(Redaction { keep_full_statements: true });
    let cmd = b"*3\r\n$6\r\nCLIENT\r\n$7\r\nSETNAME\r\n$7\r\nfixture\r\n";
    assert_eq!(p.request(&cmd[..30]), Ok(Frame::Incomplete));
    let Ok(Frame::Complete { msg, len }) = p.request(cmd) else { panic!("CLIENT SETNAME") };
    assert_eq!(
        (msg.command.as_str(), msg.args.as_slice(), len),
        ("CLIENT SETNAME", &["fixture".to_owned()][..], cmd.len())
    );
}

/// PostgreSQL refusing a connection at start-up (`FATAL 53300 too many clients`) answers the
/// client's startup message: a failed exchange of that request, not a server-first error.
#[test]
fn postgres_too_many_clients_answers_the_startup_message() {
    use crate::{Parser, Protocol, Request, Response};
    let mut p = Parser::new(Protocol::Postgres, Redaction::default());
    let mut startup = Vec::new();
    let body = b"\x00\x03\x00\x00user\x00app\x00database\x00shop\x00\x00";
    startup.extend_from_slice(&u32::try_from(body.len() + 4).expect("small").to_be_bytes());
    startup.extend_from_slice(body);
    let Ok(Frame::Complete { msg: req, .. }) = p.request(&startup) else { panic!("startup") };
    let fields = b"SFATAL\x00VFATAL\x00C53300\x00Msorry, too many clients already\x00\x00";
    let mut err = vec![b'E'];
    err.extend_from_slice(&u32::try_from(fields.len() + 4).expect("small").to_be_bytes());
    err.extend_from_slice(fields);
    let Ok(Frame::Complete { msg: resp, .. }) = p.response(&err, Some(&req)) else {
        panic!("ErrorResponse")
    };
    assert_eq!(req.failure(Some(&resp)).as_deref(), Some("SQLSTATE 53300"));
    assert!(matches!(req, Request::Postgres(_)));
    assert_eq!(resp.server_first(), None, "PostgreSQL only answers");
    assert!(matches!(resp, Response::Postgres(_)));
}
