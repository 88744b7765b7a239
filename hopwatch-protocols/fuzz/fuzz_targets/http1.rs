#![no_main]

#[path = "common.rs"]
mod common;

use hopwatch_protocols::Protocol;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| common::drive(data, common::parser(Protocol::Http1)));
