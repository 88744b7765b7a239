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

/// Where one program is attached in a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Probe {
    pub program: &'static str,
    pub site: Site,
}

/// A place in a file's code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Site {
    /// An exported function.
    Symbol(&'static str),
    /// A file offset found by reading the code, with the name reports give it.
    Offset { offset: u64, name: &'static str },
}

impl Site {
    fn name(self) -> &'static str {
        match self {
            Site::Symbol(name) | Site::Offset { name, .. } => name,
        }
    }
}

/// A file and what was done with it: the functions probed, or why it could not be.
pub(crate) type FileNote = (PathBuf, String);

/// What to attach in one file (nothing: the file is left alone).
pub(crate) type Plan = fn(&Path) -> Vec<Probe>;

/// One set of uprobe programs and the files they are attached to.
pub(crate) struct FileProbes {
    /// What the set is for, in messages (`tls`, `nginx`).
    pub name: &'static str,
    /// Where each program goes in a file; a function may take several programs (an entry and a
    /// return probe).
    plan: Plan,
    /// The files to attach to, found now.
    candidates: fn() -> Vec<PathBuf>,
    attached: HashSet<(u64, u64)>,
}

impl FileProbes {
    /// Loads `programs` (attaching happens per file in [`FileProbes::scan`]).
    pub(crate) fn load(
        ebpf: &mut Ebpf,
        name: &'static str,
        programs: &[&'static str],
        plan: Plan,
        candidates: fn() -> Vec<PathBuf>,
    ) -> Result<Self, LoadError> {
        for &program in programs {
            let prog: &mut UProbe = ebpf
                .program_mut(program)
                .ok_or(LoadError::NoProgram { program })?
                .try_into()
                .map_err(|source| LoadError::Program { program, source })?;
            prog.load().map_err(|e| super::rejected(program, e))?;
        }
        Ok(Self { name, plan, candidates, attached: HashSet::new() })
    }

    /// Attaches to every candidate file not attached yet; returns the files newly attached (each
    /// with the functions probed in it, for reports: `uprobe/SSL_read,SSL_write`) and the
    /// failures (path, error).
    pub(crate) fn scan(&mut self, ebpf: &mut Ebpf) -> (Vec<FileNote>, Vec<FileNote>) {
        let mut attached = Vec::new();
        let mut failed = Vec::new();
        for path in (self.candidates)() {
            let Ok(meta) = std::fs::metadata(&path) else { continue };
            let id = (meta.dev(), meta.ino());
            // Failures are remembered too: a file without the symbols will not grow them.
            if !self.attached.insert(id) {
                continue;
            }
            let probes = (self.plan)(&path);
            if probes.is_empty() {
                // A candidate with nothing to probe (the plan said so): not a failure.
                continue;
            }
            match attach(ebpf, &path, &probes) {
                Ok(()) => attached.push((path, functions(&probes))),
                Err(e) => failed.push((path, crate::commands::error_chain(&e))),
            }
        }
        (attached, failed)
    }
}

fn attach(ebpf: &mut Ebpf, file: &Path, probes: &[Probe]) -> Result<(), ProgramError> {
    for p in probes {
        let prog: &mut UProbe =
            ebpf.program_mut(p.program).expect("loaded in FileProbes::load").try_into()?;
        match p.site {
            Site::Symbol(function) => prog.attach(function, file, UProbeScope::AllProcesses)?,
            Site::Offset { offset, .. } => prog.attach(offset, file, UProbeScope::AllProcesses)?,
        };
    }
    Ok(())
}

/// The functions probed, for reports: `uprobe/SSL_read,SSL_write`.
fn functions(probes: &[Probe]) -> String {
    let mut names: Vec<&str> = Vec::new();
    for p in probes {
        if !names.contains(&p.site.name()) {
            names.push(p.site.name());
        }
    }
    format!("uprobe/{}", names.join(","))
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
