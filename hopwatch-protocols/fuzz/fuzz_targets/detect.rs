//! The kernel's protocol detector (`hopwatch_common::detect`, compiled into the eBPF programs and
//! run on the first bytes of every captured message) on arbitrary bytes: it never panics and
//! names a protocol only for bytes that start like one.
#![no_main]

use hopwatch_common::{
    PROTO_HTTP, PROTO_MYSQL, PROTO_POSTGRES, PROTO_REDIS, PROTO_TLS, PROTO_UNKNOWN,
    detect::{HEAD, detect},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut head = [0u8; HEAD];
    let n = data.len().min(HEAD);
    head[..n].copy_from_slice(&data[..n]);
    let p = detect(&head, n);
    match p {
        PROTO_TLS => assert_eq!(&data[..2], [0x16, 0x03]),
        PROTO_HTTP => assert!(data[0].is_ascii_uppercase()),
        // A command array, or an error reply refusing the connection (`-DENIED `).
        PROTO_REDIS => assert!(matches!(data[0], b'*' | b'-')),
        PROTO_POSTGRES | PROTO_MYSQL => assert!(n >= 5),
        other => assert_eq!(other, PROTO_UNKNOWN, "an unknown protocol number"),
    }
});
