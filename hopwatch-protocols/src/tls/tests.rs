//! Handshakes recorded from real OpenSSL peers (`../fixtures/tls/`, made by its `record.sh`),
//! replayed the ways the agent sees them: whole records, records read header then body (as
//! OpenSSL reads them), several records per call, and captures cut short.

use proptest::prelude::*;

use super::*;

/// The records of a recorded handshake, in order: direction and bytes.
fn records(text: &str) -> Vec<(Dir, Vec<u8>)> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (d, hex) = l.split_once(' ').expect("direction and hex");
            let dir = if d == "C" { Dir::ClientToServer } else { Dir::ServerToClient };
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
                .collect();
            (dir, bytes)
        })
        .collect()
}

const TLS13: &str = include_str!("../fixtures/tls/tls13.txt");
const TLS12: &str = include_str!("../fixtures/tls/tls12.txt");
const TLS13_RESUMED: &str = include_str!("../fixtures/tls/tls13_resumed.txt");
const TLS12_RESUMED: &str = include_str!("../fixtures/tls/tls12_resumed.txt");
const PROTOCOL_VERSION: &str = include_str!("../fixtures/tls/protocol_version.txt");

/// How the agent sees the records: one call per record, or header and body as two reads.
#[derive(Clone, Copy)]
enum Split {
    Whole,
    HeaderThenBody,
}

/// Replays a recorded handshake; record `i` is seen at `i` ms. Returns the outcome and the
/// index of the record it came at.
fn replay(text: &str, split: Split, capture: usize) -> Option<(Outcome, usize)> {
    let mut h = Handshake::default();
    for (i, (dir, rec)) in records(text).into_iter().enumerate() {
        let ts = i as u64 * 1_000_000;
        let chunks: Vec<&[u8]> = match split {
            Split::Whole => vec![&rec],
            Split::HeaderThenBody => vec![&rec[..5], &rec[5..]],
        };
        for c in chunks {
            if let Some(o) = h.on_data(dir, &c[..c.len().min(capture)], c.len() as u64, ts) {
                return Some((o, i));
            }
        }
    }
    None
}

fn established(o: Option<(Outcome, usize)>) -> (Established, usize) {
    match o {
        Some((Outcome::Established(e), i)) => (e, i),
        other => panic!("expected an established handshake, got {other:?}"),
    }
}

#[test]
fn tls13_full_handshake() {
    for split in [Split::Whole, Split::HeaderThenBody] {
        let (e, at) = established(replay(TLS13, split, 512));
        assert_eq!(e.version, "TLS 1.3");
        assert_eq!(e.server_name, "api.example.test");
        assert_eq!(e.alpn, "http/1.1", "the client's only offer");
        assert_eq!(e.cipher_suite, "TLS_AES_256_GCM_SHA384");
        assert!(!e.resumed);
        // The client's Finished (record 8) ends it: 8 ms after its ClientHello.
        assert_eq!((at, e.latency_ns), (8, 8_000_000));
    }
}

#[test]
fn tls12_full_handshake_reads_alpn_from_the_server_hello() {
    for split in [Split::Whole, Split::HeaderThenBody] {
        let (e, at) = established(replay(TLS12, split, 512));
        assert_eq!(e.version, "TLS 1.2");
        assert_eq!(e.server_name, "api.example.test");
        assert_eq!(e.alpn, "h2", "the server's choice of h2,http/1.1");
        assert_eq!(e.cipher_suite, "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384");
        assert!(!e.resumed);
        // Two round trips: the client's first application data is record 11.
        assert_eq!((at, e.latency_ns), (11, 11_000_000));
    }
}

#[test]
fn resumed_sessions_are_recognised_in_both_versions() {
    let (e, at) = established(replay(TLS13_RESUMED, Split::HeaderThenBody, 512));
    assert_eq!((e.version.as_str(), e.resumed, at), ("TLS 1.3", true, 6));
    let (e, at) = established(replay(TLS12_RESUMED, Split::HeaderThenBody, 512));
    assert_eq!((e.version.as_str(), e.resumed, at), ("TLS 1.2", true, 6));
}

#[test]
fn a_refused_version_fails_with_the_servers_alert() {
    let Some((Outcome::Failed(f), 1)) = replay(PROTOCOL_VERSION, Split::HeaderThenBody, 512) else {
        panic!("the server's alert ends the handshake")
    };
    assert_eq!(f.reason, "protocol_version");
    assert_eq!(f.alert_from, Some(Dir::ServerToClient));
    assert_eq!(f.partial.server_name, "old.example.test");
}

#[test]
fn small_captures_still_read_the_hellos() {
    // The ClientHello is 0x104 + 5 bytes: cut at 200 bytes its server name (early in its
    // extensions) is still read, and the stream goes on (the record's length is in its header).
    let (e, at) = established(replay(TLS13, Split::Whole, 200));
    assert_eq!(
        (e.server_name.as_str(), e.version.as_str(), at),
        ("api.example.test", "TLS 1.3", 8)
    );
    // Cut at 100 bytes the name is lost, the ServerHello still read.
    let (e, at) = established(replay(TLS13, Split::Whole, 100));
    assert_eq!((e.server_name.as_str(), e.version.as_str(), at), ("", "TLS 1.3", 8));
}

#[test]
fn a_connection_closed_mid_handshake_fails_once() {
    let mut h = Handshake::default();
    assert_eq!(h.on_close("reset"), None, "nothing seen: not a handshake");
    let recs = records(TLS13);
    h.on_data(Dir::ClientToServer, &recs[0].1, recs[0].1.len() as u64, 5);
    let Some(Outcome::Failed(f)) = h.on_close("reset by the peer") else { panic!("failed") };
    assert_eq!((f.reason.as_str(), f.alert_from), ("reset by the peer", None));
    assert_eq!(h.on_close("again"), None);
    assert!(h.done());
}

#[test]
fn an_encrypted_alert_in_place_of_the_clients_finished_is_a_failure() {
    let mut recs = records(TLS13);
    recs.truncate(8);
    // The client's CCS, then a 19-byte encrypted record: an alert, not a Finished.
    recs.push((Dir::ClientToServer, [&[0x17, 3, 3, 0, 19][..], &[0; 19]].concat()));
    let mut h = Handshake::default();
    let mut out = None;
    for (dir, r) in &recs {
        out = out.or(h.on_data(*dir, r, r.len() as u64, 0));
    }
    let Some(Outcome::Failed(f)) = out else { panic!("{out:?}") };
    assert_eq!(f.reason, "encrypted alert (from the client)");
}

#[test]
fn bytes_that_are_not_records_lose_the_stream() {
    let mut h = Handshake::default();
    assert_eq!(h.on_data(Dir::ClientToServer, b"GET / HTTP/1.1\r\n", 16, 0), None);
    assert!(h.hopeless());
}

#[test]
fn names_of_versions_suites_and_alerts() {
    assert_eq!(version_name(0x0303), "TLS 1.2");
    assert_eq!(version_name(0x7f1c), "0x7f1c");
    assert_eq!(cipher_suite_name(0x1301), "TLS_AES_128_GCM_SHA256");
    assert_eq!(cipher_suite_name(0xabcd), "0xabcd");
    assert_eq!(alert_name(70), "protocol_version");
    assert_eq!(alert_name(200), "alert 200");
}

proptest! {
    /// Any cut of the recorded streams into calls gives the same outcome as whole records.
    #[test]
    fn any_split_of_the_streams_gives_the_same_outcome(cuts in prop::collection::vec(1usize..64, 1..40)) {
        for text in [TLS13, TLS12, TLS13_RESUMED, TLS12_RESUMED, PROTOCOL_VERSION] {
            let want = replay(text, Split::Whole, usize::MAX).map(|(o, _)| o);
            let mut h = Handshake::default();
            let mut got = None;
            let mut k = 0;
            for (dir, rec) in records(text) {
                let mut off = 0;
                while off < rec.len() && got.is_none() {
                    let n = cuts[k % cuts.len()].min(rec.len() - off);
                    k += 1;
                    // Timestamps are per record, as in `replay`, so latencies compare equal
                    // only when they are measured at the same records: use 0.
                    got = h.on_data(dir, &rec[off..off + n], n as u64, 0);
                    off += n;
                }
            }
            let strip = |o: Option<Outcome>| o.map(|o| match o {
                Outcome::Established(mut e) => { e.latency_ns = 0; Outcome::Established(e) }
                Outcome::Failed(mut f) => { f.partial.latency_ns = 0; Outcome::Failed(f) }
            });
            prop_assert_eq!(strip(got), strip(want));
        }
    }

    /// Arbitrary bytes, cut anywhere and captured in part, never panic.
    #[test]
    fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..2048), cut in 0usize..2048, cap in 0usize..2048) {
        let mut h = Handshake::default();
        let cut = cut.min(data.len());
        for (i, part) in [&data[..cut], &data[cut..]].into_iter().enumerate() {
            let dir = if i == 0 { Dir::ClientToServer } else { Dir::ServerToClient };
            let _ = h.on_data(dir, &part[..part.len().min(cap)], part.len() as u64 + 3, 1);
        }
        let _ = client_hello(&data);
        let _ = server_hello(&data);
    }
}
