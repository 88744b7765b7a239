//! Python uprobes: `PyIter_Send` in every running CPython (the interpreter binary, or the
//! `libpython3` a process maps), with the asyncio task-step programs (`hopwatch-ebpf/src/python.rs`)
//! attached once per file ([`FileProbes`]). The function is part of CPython's C API (3.10+), so
//! distribution builds without debug symbols are covered; an interpreter older than 3.10, or a
//! build that exports nothing, is reported as a failure to attach.

use std::path::{Path, PathBuf};

use aya::Ebpf;

use super::{
    LoadError,
    uprobes::{FileProbes, Probe, Site, process_files},
};

const ENTRY: &str = "py_send";
const RETURN: &str = "py_send_return";

/// Loads the Python uprobes (attached by [`FileProbes::scan`]).
pub(crate) fn load(ebpf: &mut Ebpf) -> Result<FileProbes, LoadError> {
    FileProbes::load(ebpf, "python", &[ENTRY, RETURN], plan, candidate_files)
}

fn plan(_: &Path) -> Vec<Probe> {
    [ENTRY, RETURN]
        .into_iter()
        .map(|program| Probe { program, site: Site::Symbol("PyIter_Send") })
        .collect()
}

/// Where distributions put the interpreter (a symlink to the versioned binary, attached by the
/// file it names): processes started after the agent are covered from their first request.
const DEFAULT_PYTHON: [&str; 2] = ["/usr/bin/python3", "/usr/local/bin/python3"];

/// The host's interpreter, and those of running Python processes: the `libpython3` they map (a
/// shared build), or else their executable when it is named `python3*` (container roots
/// included).
fn candidate_files() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> =
        DEFAULT_PYTHON.iter().filter_map(|p| std::fs::canonicalize(p).ok()).collect();
    out.extend(process_files(|proc| {
        let Ok(exe) = std::fs::read_link(format!("{proc}/exe")) else { return Vec::new() };
        let exe = exe.to_string_lossy().into_owned();
        // A file replaced on disk shows " (deleted)": not a file to attach to.
        let live = |path: &str| !path.ends_with(" (deleted)");
        let named = Path::new(&exe)
            .file_name()
            .and_then(|f| f.to_str())
            .is_some_and(|f| f.starts_with("python3"));
        if !named {
            return Vec::new();
        }
        let maps = std::fs::read_to_string(format!("{proc}/maps")).unwrap_or_default();
        let library = maps.lines().filter_map(|l| l.split_whitespace().nth(5)).find(|path| {
            Path::new(path)
                .file_name()
                .and_then(|f| f.to_str())
                .is_some_and(|f| f.starts_with("libpython3") && f.contains(".so"))
        });
        match library {
            Some(lib) if live(lib) => vec![lib.to_owned()],
            None if live(&exe) => vec![exe],
            _ => Vec::new(),
        }
    }));
    out
}
