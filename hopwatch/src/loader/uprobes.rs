//! Uprobes attached to files: a uprobe on an ELF file fires in every process that maps it,
//! including processes started later, so each set of programs is attached once per file (by
//! device and inode), and a periodic rescan ([`FileProbes::scan`]) picks up files that appear
//! later (new container images, a library upgraded in place). Files inside containers are
//! reached through `/proc/<pid>/root`.

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

/// One set of uprobe programs and the files they are attached to.
pub(crate) struct FileProbes {
    /// What the set is for, in messages (`tls`, `nginx`).
    pub name: &'static str,
    /// (program, function) pairs attached to every file; a function may take several programs
    /// (an entry and a return probe).
    probes: &'static [(&'static str, &'static str)],
    /// The files to attach to, found now.
    candidates: fn() -> Vec<PathBuf>,
    attached: HashSet<(u64, u64)>,
}

impl FileProbes {
    /// Loads the programs (attaching happens per file in [`FileProbes::scan`]).
    pub(crate) fn load(
        ebpf: &mut Ebpf,
        name: &'static str,
        probes: &'static [(&'static str, &'static str)],
        candidates: fn() -> Vec<PathBuf>,
    ) -> Result<Self, LoadError> {
        let mut loaded = HashSet::new();
        for &(program, _) in probes {
            if !loaded.insert(program) {
                continue;
            }
            let prog: &mut UProbe = ebpf
                .program_mut(program)
                .ok_or(LoadError::NoProgram { program })?
                .try_into()
                .map_err(|source| LoadError::Program { program, source })?;
            prog.load().map_err(|e| super::rejected(program, e))?;
        }
        Ok(Self { name, probes, candidates, attached: HashSet::new() })
    }

    /// The functions probed, for reports: `uprobe/SSL_read,SSL_write`.
    pub(crate) fn functions(&self) -> String {
        let mut names: Vec<&str> = Vec::new();
        for &(_, f) in self.probes {
            if !names.contains(&f) {
                names.push(f);
            }
        }
        format!("uprobe/{}", names.join(","))
    }

    /// Attaches to every candidate file not attached yet; returns the paths newly attached and
    /// the failures (path, error).
    pub(crate) fn scan(&mut self, ebpf: &mut Ebpf) -> (Vec<PathBuf>, Vec<(PathBuf, String)>) {
        let mut attached = Vec::new();
        let mut failed = Vec::new();
        for path in (self.candidates)() {
            let Ok(meta) = std::fs::metadata(&path) else { continue };
            let id = (meta.dev(), meta.ino());
            // Failures are remembered too: a file without the symbols will not grow them.
            if !self.attached.insert(id) {
                continue;
            }
            match self.attach(ebpf, &path) {
                Ok(()) => attached.push(path),
                Err(e) => failed.push((path, crate::commands::error_chain(&e))),
            }
        }
        (attached, failed)
    }

    fn attach(&self, ebpf: &mut Ebpf, file: &Path) -> Result<(), ProgramError> {
        for &(program, function) in self.probes {
            let prog: &mut UProbe =
                ebpf.program_mut(program).expect("loaded in FileProbes::load").try_into()?;
            prog.attach(function, file, UProbeScope::AllProcesses)?;
        }
        Ok(())
    }
}

/// Files of running processes: `pick` gets each process's `/proc/<pid>` and names paths in its
/// mount namespace, returned as reached through the process's root so a container's own files
/// are found.
pub(crate) fn process_files(pick: impl Fn(&str) -> Vec<String>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else { return out };
    let mut seen = HashSet::new();
    for entry in procs.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().filter(|s| s.bytes().all(|b| b.is_ascii_digit())) else {
            continue;
        };
        for path in pick(&format!("/proc/{pid}")) {
            if seen.insert((pid.to_owned(), path.clone())) {
                out.push(PathBuf::from(format!("/proc/{pid}/root{path}")));
            }
        }
    }
    out
}
