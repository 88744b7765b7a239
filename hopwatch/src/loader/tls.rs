//! OpenSSL uprobes: every `libssl` on the host (the host's own and those inside containers), with
//! the TLS programs (`hopwatch-ebpf/src/tls.rs`) attached once per file ([`FileProbes`]).

use std::{
    io::Read as _,
    path::{Path, PathBuf},
};

use aya::Ebpf;
use hopwatch_common::maps::TLS_TAILS;
use object::{Object as _, ObjectSection as _, ObjectSymbol as _};

use super::{
    LoadError,
    uprobes::{FileProbes, Probe, Site, process_files},
    x86,
};

/// The programs of the set: an entry program per call, the shared return program, and the
/// exchange engine's part of it (tail-called, not attached).
const PROGRAMS: [&str; 8] = [
    "ssl_read",
    "ssl_read_ex",
    "ssl_write",
    "ssl_write_ex",
    "ssl_do_handshake",
    "ssl_return",
    "ssl_free",
    EXCHANGE_PROGRAM,
];
const EXCHANGE_PROGRAM: &str = "ssl_exchange";

/// One direction of plaintext: the exported functions (plain and `_ex`, each with its entry
/// program) and the name reports give the internal function both call.
struct Calls {
    plain: (&'static str, &'static str),
    ex: (&'static str, &'static str),
    internal: &'static str,
}

const READ: Calls = Calls {
    plain: ("ssl_read", "SSL_read"),
    ex: ("ssl_read_ex", "SSL_read_ex"),
    internal: "ssl_read_internal",
};
const WRITE: Calls = Calls {
    plain: ("ssl_write", "SSL_write"),
    ex: ("ssl_write_ex", "SSL_write_ex"),
    internal: "ssl_write_internal",
};

/// Loads the TLS uprobes (attached by [`FileProbes::scan`]) to go where [`plan`] says.
pub(crate) fn load(ebpf: &mut Ebpf) -> Result<FileProbes, LoadError> {
    let probes = FileProbes::load(ebpf, "tls", &PROGRAMS, plan, candidate_libraries)?;
    super::set_tail_call(ebpf, TLS_TAILS, 0, EXCHANGE_PROGRAM)?;
    Ok(probes)
}

/// Loads the TLS uprobes to go on the exported functions only (`--tls-probes exported`).
pub(crate) fn load_exported(ebpf: &mut Ebpf) -> Result<FileProbes, LoadError> {
    let exported = |_: &Path| probes(&Internals::default());
    let probes = FileProbes::load(ebpf, "tls", &PROGRAMS, exported, candidate_libraries)?;
    super::set_tail_call(ebpf, TLS_TAILS, 0, EXCHANGE_PROGRAM)?;
    Ok(probes)
}

/// Where the programs go in one libssl.
///
/// Each read or write is probed at its entry and return. The exported functions start with an
/// instruction the kernel cannot emulate (`sub $n,%rsp`), so each hit single-steps it out of
/// line through a debug trap: in a virtual machine that trap costs microseconds, and HTTPS
/// through nginx kept a quarter of its throughput with nothing but entry probes on `SSL_read`
/// and `SSL_write` (about 67k → 16k requests/s, no BPF program attached; about 54k with entry
/// probes on the internal functions instead). So when `SSL_read` and `SSL_read_ex` are thin wrappers
/// around one internal function (`ssl_read_internal(ssl, buf, num, size_t *readbytes)`, the same
/// contract as `SSL_read_ex`) whose first instruction is emulated (`push`), that function is
/// probed instead, once for both; the same for writes. OpenSSL 3.2 added `SSL_write_ex2`, and a
/// `flags` argument to the internal write function (its `size_t *` moved): with it, writes stay
/// on the exported functions. Anything not recognised keeps the exported functions.
fn plan(path: &Path) -> Vec<Probe> {
    let internal = read_library(path).and_then(|data| Internals::find(&data)).unwrap_or_default();
    probes(&internal)
}

/// Largest library read to look for the internal functions (libssl is under 1 MiB; a file
/// named like it in a container could be anything).
const MAX_LIBRARY_BYTES: u64 = 64 << 20;

/// The file's bytes, when it is not larger than [`MAX_LIBRARY_BYTES`].
pub(super) fn read_library(path: &Path) -> Option<Vec<u8>> {
    let mut data = Vec::new();
    std::fs::File::open(path).ok()?.take(MAX_LIBRARY_BYTES + 1).read_to_end(&mut data).ok()?;
    (data.len() as u64 <= MAX_LIBRARY_BYTES).then_some(data)
}

/// The probes for a libssl whose internal functions are `internal`.
fn probes(internal: &Internals) -> Vec<Probe> {
    let mut probes = Vec::new();
    for (calls, offset) in [(READ, internal.read), (WRITE, internal.write)] {
        match offset {
            Some(offset) => {
                let site = Site::Offset { offset, name: calls.internal };
                probes.push(Probe { program: calls.ex.0, site });
                probes.push(Probe { program: "ssl_return", site });
            }
            None => {
                for (program, function) in [calls.plain, calls.ex] {
                    probes.push(Probe { program, site: Site::Symbol(function) });
                    probes.push(Probe { program: "ssl_return", site: Site::Symbol(function) });
                }
            }
        }
    }
    probes.extend([
        Probe { program: "ssl_do_handshake", site: Site::Symbol("SSL_do_handshake") },
        Probe { program: "ssl_return", site: Site::Symbol("SSL_do_handshake") },
        Probe { program: "ssl_free", site: Site::Symbol("SSL_free") },
    ]);
    probes
}

/// File offsets of the internal read and write functions, where they can be probed instead of
/// the exported ones.
#[derive(Debug, Default, PartialEq, Eq)]
struct Internals {
    read: Option<u64>,
    write: Option<u64>,
}

impl Internals {
    fn find(data: &[u8]) -> Option<Self> {
        let elf = object::File::parse(data).ok()?;
        if elf.architecture() != object::Architecture::X86_64 {
            return None;
        }
        let exported =
            |name: &str| elf.dynamic_symbols().find(|s| s.is_definition() && s.name() == Ok(name));
        let exported_at = |addr: u64| elf.dynamic_symbols().any(|s| s.address() == addr);
        // The code at `addr` and the file offset it is at.
        // Every number comes from the file (a container's, maybe hostile): checked, never
        // trusted to index.
        let code = |addr: u64| {
            let section = elf
                .sections()
                .find(|s| addr.checked_sub(s.address()).is_some_and(|at| at < s.size()))?;
            let (offset, _) = section.file_range()?;
            let at = addr - section.address();
            let bytes = section.data().ok()?.get(usize::try_from(at).ok()?..)?;
            Some((bytes, offset.checked_add(at)?))
        };
        // The function both exported wrappers call first, when they agree, it is not exported
        // itself (not some helper) and its entry is emulated.
        let callee = |calls: &Calls| {
            let targets = [calls.plain.1, calls.ex.1].map(|name| {
                let sym = exported(name)?;
                x86::first_call(code(sym.address())?.0, sym.address())
            });
            let [Some(a), Some(b)] = targets else { return None };
            let (entry, offset) = code(a)?;
            (a == b && !exported_at(a) && x86::emulated_entry(entry)).then_some(offset)
        };
        let write = if exported("SSL_write_ex2").is_some() { None } else { callee(&WRITE) };
        Some(Self { read: callee(&READ), write })
    }
}

/// Where distributions put libssl.
const DEFAULT_LIBSSL: [&str; 4] = [
    "/usr/lib/x86_64-linux-gnu/libssl.so.3",
    "/usr/lib/x86_64-linux-gnu/libssl.so.1.1",
    "/usr/lib64/libssl.so.3",
    "/lib/x86_64-linux-gnu/libssl.so.3",
];

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_library_it_cannot_read_keeps_the_exported_functions() {
        let probes = plan(Path::new("/nonexistent/libssl.so.3"));
        let symbols: Vec<&Site> = probes.iter().map(|p| &p.site).collect();
        for f in ["SSL_read", "SSL_read_ex", "SSL_write", "SSL_write_ex", "SSL_do_handshake"] {
            // An entry program and the return program on each.
            assert_eq!(symbols.iter().filter(|s| ***s == Site::Symbol(f)).count(), 2, "{f}");
        }
        assert!(probes.iter().all(|p| matches!(p.site, Site::Symbol(_))));
        assert!(Internals::find(b"not an ELF file").is_none());
    }

    #[test]
    fn a_cut_or_foreign_elf_file_is_read_without_a_panic() {
        // This test's own binary: an x86-64 ELF file without OpenSSL's functions.
        let exe = std::fs::read("/proc/self/exe").expect("the test binary is readable");
        assert_eq!(Internals::find(&exe), Some(Internals::default()));
        let mut cut = 0;
        while cut < exe.len() {
            let found = Internals::find(&exe[..cut]);
            assert!(found.is_none() || found == Some(Internals::default()), "{cut}: {found:?}");
            cut = cut * 2 + 61;
        }
    }
}
