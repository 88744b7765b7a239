#![no_main]

#[path = "common.rs"]
mod common;

use hopwatch_protocols::{Parser, dns::Transport};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Bit 0 of the flags (otherwise "keep full statements", which DNS has no use for) picks the
    // transport.
    let transport =
        if data.first().is_some_and(|f| f & 1 == 1) { Transport::Tcp } else { Transport::Udp };
    common::drive(data, |_| Parser::new_dns(transport));
});
