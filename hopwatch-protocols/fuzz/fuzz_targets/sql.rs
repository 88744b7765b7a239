#![no_main]

use hopwatch_protocols::{
    MAX_TEXT,
    sql::{Dialect, redact},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for dialect in [Dialect::Postgres, Dialect::Mysql] {
        let out = redact(data, dialect);
        assert!(out.len() <= MAX_TEXT, "redacted to {} bytes", out.len());
    }
});
