#![no_main]

use hopwatch_protocols::detect;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Byte 0: direction; bytes 1-2: the server port; the rest: the first bytes seen.
    let [dir, hi, lo, first @ ..] = data else { return };
    let _ = detect(first, dir & 1 == 1, u16::from_be_bytes([*hi, *lo]));
});
