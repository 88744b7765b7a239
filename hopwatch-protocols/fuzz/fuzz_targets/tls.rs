//! The TLS handshake reader (`hopwatch_protocols::tls`) on arbitrary bytes: the first byte picks
//! how the rest is cut into calls, each call's direction and how much of it was captured. It
//! never panics, and it reports an outcome at most once.
#![no_main]

use hopwatch_protocols::tls::{Dir, Handshake};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&seed, mut rest)) = data.split_first() else { return };
    let mut h = Handshake::default();
    let mut outcomes = 0;
    let mut i = 0usize;
    while !rest.is_empty() {
        // Call sizes and captures from the seed, so any split is reachable.
        let n = (usize::from(seed) * (i + 7) % 97 + 1).min(rest.len());
        let (call, tail) = rest.split_at(n);
        let dir = if (usize::from(seed) >> (i % 8)) & 1 == 0 {
            Dir::ClientToServer
        } else {
            Dir::ServerToClient
        };
        let captured = if seed & 0x80 != 0 { call.len() / 2 } else { call.len() };
        let extra = u64::from(seed & 0x03);
        if h.on_data(dir, &call[..captured], call.len() as u64 + extra, i as u64).is_some() {
            outcomes += 1;
        }
        rest = tail;
        i += 1;
    }
    if h.on_close("closed").is_some() {
        outcomes += 1;
    }
    assert!(outcomes <= 1, "an outcome is reported once");
    let _ = hopwatch_protocols::tls::client_hello(data);
    let _ = hopwatch_protocols::tls::server_hello(data);
});
