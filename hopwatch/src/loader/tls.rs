//! OpenSSL uprobes: every `libssl` on the host (the host's own and those inside containers), with
//! the TLS programs (`hopwatch-ebpf/src/tls.rs`) attached once per file ([`FileProbes`]).

use std::path::{Path, PathBuf};

use aya::Ebpf;

use super::{
    LoadError,
    uprobes::{FileProbes, process_files},
};

/// (program, function): an entry probe and the shared return probe for each call, and an entry
/// probe that forgets a freed `SSL*`'s socket.
const PROBES: [(&str, &str); 11] = [
    ("ssl_read", "SSL_read"),
    ("ssl_return", "SSL_read"),
    ("ssl_read_ex", "SSL_read_ex"),
    ("ssl_return", "SSL_read_ex"),
    ("ssl_write", "SSL_write"),
    ("ssl_return", "SSL_write"),
    ("ssl_write_ex", "SSL_write_ex"),
    ("ssl_return", "SSL_write_ex"),
    ("ssl_do_handshake", "SSL_do_handshake"),
    ("ssl_return", "SSL_do_handshake"),
    ("ssl_free", "SSL_free"),
];

/// Where distributions put libssl.
const DEFAULT_LIBSSL: [&str; 4] = [
    "/usr/lib/x86_64-linux-gnu/libssl.so.3",
    "/usr/lib/x86_64-linux-gnu/libssl.so.1.1",
    "/usr/lib64/libssl.so.3",
    "/lib/x86_64-linux-gnu/libssl.so.3",
];

/// Loads the TLS uprobes (attached by [`FileProbes::scan`]).
pub(crate) fn load(ebpf: &mut Ebpf) -> Result<FileProbes, LoadError> {
    FileProbes::load(ebpf, "tls", &PROBES, candidate_libraries)
}

/// The host's libssl files and those mapped by running processes (container roots included).
fn candidate_libraries() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> =
        DEFAULT_LIBSSL.iter().map(PathBuf::from).filter(|p| p.exists()).collect();
    out.extend(process_files(|proc| {
        let Ok(maps) = std::fs::read_to_string(format!("{proc}/maps")) else { return Vec::new() };
        let mut libs: Vec<String> = maps
            .lines()
            .filter_map(|line| line.split_ascii_whitespace().nth(5))
            .filter(|path| {
                let file = Path::new(path).file_name().and_then(|f| f.to_str()).unwrap_or("");
                file.starts_with("libssl.so")
            })
            .map(str::to_owned)
            .collect();
        libs.dedup();
        libs
    }));
    out
}
