//! OpenSSL uprobes: find every `libssl` on the host (the host's own and those inside containers,
//! through `/proc/<pid>/root`), and attach the TLS programs to each file once. A uprobe on a
//! library file fires in every process that maps it, including processes started later; a
//! periodic rescan picks up library files that appear later (new container images).

use std::{
    collections::HashSet,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    programs::{ProgramError, UProbe, uprobe::UProbeScope},
};

use super::LoadError;

/// (program, function) pairs: entry probes, then the shared return probe for each function.
const ENTRY_PROBES: [(&str, &str); 5] = [
    ("ssl_write", "SSL_write"),
    ("ssl_write_ex", "SSL_write_ex"),
    ("ssl_read", "SSL_read"),
    ("ssl_read_ex", "SSL_read_ex"),
    ("ssl_do_handshake", "SSL_do_handshake"),
];
const RETURN_PROBE: &str = "ssl_return";
/// Entry only: forgets a freed `SSL*`'s socket.
const FREE_PROBE: (&str, &str) = ("ssl_free", "SSL_free");

/// Where distributions put libssl.
const DEFAULT_LIBSSL: [&str; 4] = [
    "/usr/lib/x86_64-linux-gnu/libssl.so.3",
    "/usr/lib/x86_64-linux-gnu/libssl.so.1.1",
    "/usr/lib64/libssl.so.3",
    "/lib/x86_64-linux-gnu/libssl.so.3",
];

/// The TLS uprobes and the library files they are attached to.
#[derive(Default)]
pub(crate) struct TlsProbes {
    attached: HashSet<(u64, u64)>,
}

impl TlsProbes {
    /// Loads the uprobe programs (attaching happens per library in [`TlsProbes::scan`]).
    pub(crate) fn load(ebpf: &mut Ebpf) -> Result<Self, LoadError> {
        for name in ENTRY_PROBES.iter().map(|(p, _)| *p).chain([RETURN_PROBE, FREE_PROBE.0]) {
            let prog: &mut UProbe = ebpf
                .program_mut(name)
                .ok_or(LoadError::NoProgram { program: name })?
                .try_into()
                .map_err(|source| LoadError::Program { program: name, source })?;
            prog.load().map_err(|e| super::rejected(name, e))?;
        }
        Ok(Self::default())
    }

    /// Attaches to every libssl file not attached yet; returns the paths newly attached and the
    /// failures (path, error).
    pub(crate) fn scan(&mut self, ebpf: &mut Ebpf) -> (Vec<PathBuf>, Vec<(PathBuf, String)>) {
        let mut attached = Vec::new();
        let mut failed = Vec::new();
        for path in candidate_libraries() {
            let Ok(meta) = std::fs::metadata(&path) else { continue };
            let id = (meta.dev(), meta.ino());
            if self.attached.contains(&id) {
                continue;
            }
            match attach_all(ebpf, &path) {
                Ok(()) => {
                    self.attached.insert(id);
                    attached.push(path);
                }
                Err(e) => {
                    // Remember failures too: a library without the symbols will not grow them.
                    self.attached.insert(id);
                    failed.push((path, crate::commands::error_chain(&e)));
                }
            }
        }
        (attached, failed)
    }
}

fn attach_all(ebpf: &mut Ebpf, lib: &Path) -> Result<(), ProgramError> {
    for (program, function) in ENTRY_PROBES {
        for name in [program, RETURN_PROBE] {
            let prog: &mut UProbe =
                ebpf.program_mut(name).expect("loaded in TlsProbes::load").try_into()?;
            prog.attach(function, lib, UProbeScope::AllProcesses)?;
        }
    }
    let prog: &mut UProbe =
        ebpf.program_mut(FREE_PROBE.0).expect("loaded in TlsProbes::load").try_into()?;
    prog.attach(FREE_PROBE.1, lib, UProbeScope::AllProcesses)?;
    Ok(())
}

/// The host's libssl files and those mapped by running processes (container roots included).
fn candidate_libraries() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> =
        DEFAULT_LIBSSL.iter().map(PathBuf::from).filter(|p| p.exists()).collect();
    let Ok(procs) = std::fs::read_dir("/proc") else { return out };
    let mut seen = HashSet::new();
    for entry in procs.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().filter(|s| s.bytes().all(|b| b.is_ascii_digit())) else {
            continue;
        };
        let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else { continue };
        for line in maps.lines() {
            let Some(path) = line.split_ascii_whitespace().nth(5) else { continue };
            let file = Path::new(path).file_name().and_then(|f| f.to_str()).unwrap_or("");
            if file.starts_with("libssl.so") && seen.insert((pid.to_owned(), path.to_owned())) {
                // Through the process's root, so a container's own libssl is reached.
                out.push(PathBuf::from(format!("/proc/{pid}/root{path}")));
            }
        }
    }
    out
}
