//! The tracker's pairing, promotion and session handling, fed hand-made data events.

use hopwatch_common::{EventKind, PROTO_HTTP};

use super::*;
use crate::l7::session::tests::Toy;

fn ev(cookie: u64, dir: u8, ts: u64, sport: u16, dport: u16) -> DataEvent {
    let mut e = DataEvent::default();
    e.header.kind = EventKind::Data as u32;
    e.header.socket_cookie = cookie;
    e.header.timestamp_ns = ts;
    e.direction = dir;
    e.len = 3;
    e.protocol = PROTO_HTTP;
    e.tuple.sport = sport;
    e.tuple.dport = dport;
    e
}

fn tracker() -> L7Tracker<Toy> {
    L7Tracker::new(Box::new(|ev: &DataEvent, _| (ev.protocol == PROTO_HTTP).then_some(Toy)))
}

#[test]
fn both_ends_of_a_hop_are_measured_and_paired() {
    let mut t = tracker();
    // Client socket 1 (port 40000) → server socket 2 (port 80), both on this node.
    assert!(t.on_data(&ev(1, DIR_EGRESS, 100, 40000, 80), b"1:q", Some(false), Some(2)).is_empty());
    assert!(t.on_data(&ev(2, DIR_INGRESS, 110, 80, 40000), b"1:q", Some(true), Some(1)).is_empty());
    let server = t.on_data(&ev(2, DIR_EGRESS, 150, 80, 40000), b"1:r", Some(true), Some(1));
    assert_eq!(server.len(), 1);
    assert!(server[0].server_side);
    assert_eq!(server[0].exchange.latency_ns(), 40);
    assert_eq!(server[0].peer_latency_ns, None, "the client has not seen the response yet");
    let client = t.on_data(&ev(1, DIR_INGRESS, 160, 40000, 80), b"1:r", Some(false), Some(2));
    assert_eq!(client[0].exchange.latency_ns(), 60);
    assert_eq!(client[0].peer_latency_ns, Some(40), "network + queueing share is 20 ns");
}

#[test]
fn the_server_end_pairs_after_it_closed_and_only_the_same_exchange_pairs() {
    let mut t = tracker();
    let (client, server) =
        (|ts| ev(1, DIR_EGRESS, ts, 40000, 80), |ts| ev(2, DIR_EGRESS, ts, 80, 40000));
    // Ten exchanges on one keep-alive connection, both ends seen, then the server closes
    // (`Connection: close`) before the client reads the last response.
    for i in 0..10u64 {
        let at = i * 1000;
        let mut q = client(at);
        t.on_data(&q, b"1:q", Some(false), Some(2));
        q = server(at + 10);
        q.direction = DIR_INGRESS;
        t.on_data(&q, b"1:q", Some(true), Some(1));
        t.on_data(&server(at + 50 + i), b"1:r", Some(true), Some(1));
        if i == 9 {
            t.close(2);
        }
        let mut r = client(at + 100);
        r.direction = DIR_INGRESS;
        let done = t.on_data(&r, b"1:r", Some(false), Some(2));
        assert_eq!(done[0].exchange.index, i);
        assert_eq!(done[0].peer_latency_ns, Some(40 + i), "exchange {i}");
    }
    // A peer that never completed this exchange pairs with nothing.
    let mut q = client(20_000);
    t.on_data(&q, b"1:q", Some(false), Some(3));
    q.direction = DIR_INGRESS;
    let done = t.on_data(&q, b"1:r", Some(false), Some(3));
    assert_eq!(done[0].peer_latency_ns, None);
}

#[test]
fn unknown_protocols_and_unanswered_requests_are_counted_and_reported() {
    let mut t = tracker();
    let mut other = ev(3, DIR_EGRESS, 1, 40001, 5000);
    other.protocol = 0;
    assert!(t.on_data(&other, b"1:x", Some(false), None).is_empty());
    assert_eq!(t.stats.unparsed_connections, 1);
    t.on_data(&ev(4, DIR_EGRESS, 10, 40002, 80), b"1:q", None, None);
    let closed = t.close(4);
    assert_eq!(closed.len(), 1);
    assert!(closed[0].exchange.response.is_none());
    assert!(!closed[0].server_side, "role guessed from ports");
    assert_eq!(t.sessions(), 0);
}

#[test]
fn a_reset_connection_keeps_its_session_for_the_reply_read_after_the_reset() {
    let mut t = tracker();
    t.on_data(&ev(5, DIR_EGRESS, 10, 40003, 80), b"1:q", Some(false), None);
    t.close_after(5, 1000);
    assert!(t.close_due(999).is_empty());
    let answered = t.on_data(&ev(5, DIR_INGRESS, 500, 40003, 80), b"1:r", None, None);
    assert_eq!(answered[0].exchange.response.as_deref(), Some("r"));
    t.on_data(&ev(5, DIR_EGRESS, 600, 40003, 80), b"1:z", None, None);
    let closed = t.close_due(1000);
    assert_eq!(closed.len(), 1, "the request sent after the reset is unanswered");
    assert_eq!(t.sessions(), 0);
    t.close_after(6, 2000);
    assert!(t.close_due(u64::MAX).is_empty(), "no session, nothing kept");
}

/// A data event of socket `cookie` (client end, port 40000 → 80) after `turns` turns.
fn turn(cookie: u64, dir: u8, ts: u64, turns: u32) -> DataEvent {
    let mut e = ev(cookie, dir, ts, 40000, 80);
    e.tuple.protocol = hopwatch_common::IPPROTO_TCP;
    e.turns = turns;
    e
}

#[test]
fn alternating_connections_are_promoted_at_an_exchange_they_framed() {
    let mut t = tracker().with_fast_path(FastPath::ALL);
    let mut turns = 0;
    for i in 0..3u64 {
        turns += 1;
        t.on_data(&turn(1, DIR_EGRESS, i * 100, turns), b"1:q", Some(false), None);
        turns += 1;
        t.on_data(&turn(1, DIR_INGRESS, i * 100 + 50, turns), b"1:r", Some(false), None);
    }
    let promoted = t.take_promotions();
    assert_eq!(promoted.len(), 1, "once, after the second exchange");
    let (cookie, p) = promoted[0];
    assert_eq!((cookie, p.anchor_index, p.anchor_turns, p.server), (1, 1, 4, 0));

    // Two requests in one call, then their answers: never promoted.
    let two = |dir, ts, turns| DataEvent { len: 6, ..turn(2, dir, ts, turns) };
    t.on_data(&two(DIR_EGRESS, 0, 1), b"1:a1:b", Some(false), None);
    t.on_data(&two(DIR_INGRESS, 10, 2), b"1:x1:y", Some(false), None);
    t.on_data(&turn(2, DIR_EGRESS, 20, 3), b"1:c", Some(false), None);
    t.on_data(&turn(2, DIR_INGRESS, 30, 4), b"1:z", Some(false), None);
    // A role only guessed from the ports: never promoted either.
    for (i, dir) in [DIR_EGRESS, DIR_INGRESS, DIR_EGRESS, DIR_INGRESS].into_iter().enumerate() {
        let n = u32::try_from(i).expect("small") + 1;
        t.on_data(&turn(3, dir, u64::from(n) * 10, n), b"1:q", None, None);
    }
    let p = t.take_promotions();
    assert!(p.is_empty(), "{p:?}");
}

fn record(cookie: u64, index: u64, request_ns: u64, at: u64, flags: u8) -> ExchangeEvent {
    let mut x = ExchangeEvent {
        request_ns,
        index,
        status: 200,
        protocol: PROTO_HTTP,
        ..ExchangeEvent::default()
    };
    x.header.socket_cookie = cookie;
    x.header.timestamp_ns = at;
    x.request_bytes = 3;
    x.response_bytes = 3;
    x.flags = flags;
    x
}

#[test]
fn kernel_records_are_counted_or_parsed_and_pair_across_the_hop() {
    use hopwatch_common::exchange::EXCH_F_FULL;
    let mut t = tracker().with_fast_path(FastPath::ALL);
    // Both ends known: client 1, server 2 (one exchange each on the capture path).
    t.on_data(&ev(1, DIR_EGRESS, 0, 40000, 80), b"1:q", Some(false), Some(2));
    t.on_data(&ev(2, DIR_INGRESS, 1, 80, 40000), b"1:q", Some(true), Some(1));
    t.on_data(&ev(1, DIR_EGRESS, 5, 40000, 80), b"1:w", Some(false), Some(2));
    // The server's record of exchange 7 is only counted...
    let Measured::Counted(c) =
        t.on_exchange(&record(2, 7, 100, 140, EXCH_F_SERVER), None, || Some(1))
    else {
        panic!("a record without bytes is counted")
    };
    assert_eq!(
        c,
        CountedExchange { cookie: 2, server_side: true, latency_ns: Some(40), failed: false }
    );
    // ...and the client's full record of it is an exchange paired with the server's time.
    let full = record(1, 7, 90, 160, EXCH_F_FULL);
    let Measured::Recorded(x) = t.on_exchange(&full, Some((b"1:q", b"1:r")), || Some(2)) else {
        panic!("a full record parses")
    };
    assert_eq!((x.exchange.request.as_str(), x.exchange.response.as_deref()), ("q", Some("r")));
    assert_eq!((x.exchange.index, x.exchange.latency_ns()), (7, 70));
    assert_eq!(x.peer_latency_ns, Some(40));
    assert!(t.close(1).is_empty(), "the capture path's waiting request was dropped");

    // A response whose first bytes do not frame it: the kernel's status stands in.
    let cut = record(2, 8, 200, 230, EXCH_F_FULL | EXCH_F_SERVER);
    let Measured::Recorded(x) = t.on_exchange(&cut, Some((b"1:q", b"99")), || None) else {
        panic!("the request parses")
    };
    assert_eq!(x.exchange.response.as_deref(), Some("status 200"));
    // The connection closed on a request: unanswered, a failed exchange without latency.
    let gone = record(2, 9, 300, 900, EXCH_F_FULL | EXCH_F_SERVER | EXCH_F_UNANSWERED);
    let Measured::Recorded(x) = t.on_exchange(&gone, Some((b"1:q", b"")), || None) else {
        panic!("the request parses")
    };
    assert_eq!((x.exchange.response, x.exchange.request_ns), (None, 300));
    // A head that does not parse is still counted, from the kernel's measurement.
    let bad = record(2, 10, 1000, 1010, EXCH_F_FULL | EXCH_F_SERVER);
    assert!(matches!(
        t.on_exchange(&bad, Some((b"x", b"1:r")), || None),
        Measured::Counted(CountedExchange { latency_ns: Some(10), .. })
    ));
    assert_eq!(t.stats.fast_unparsed, 1);
}
