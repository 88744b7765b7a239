//! Python uprobes: where CPython's `_asyncio` module steps a task (`task_step` resuming the
//! task's coroutine with `PyIter_Send`), with the task-step programs
//! (`hopwatch-ebpf/src/python.rs`) attached once per file ([`FileProbes`]).
//!
//! `PyIter_Send` is also how every await resumes the coroutine it awaits, a dozen levels deep in
//! a FastAPI request: probing the function costs a probe pair per level. `_asyncio` is a shared
//! module that calls it through its PLT, from `task_step` only, so the probes go on that PLT
//! entry: one pair per task step, where the interpreter is built that way (Debian, Ubuntu, the
//! official images). An interpreter with `_asyncio` built in (it exports `PyInit__asyncio`) is
//! probed at `PyIter_Send` itself.

use std::path::{Path, PathBuf};

use aya::Ebpf;
use object::{Object as _, ObjectSection as _, ObjectSymbol as _, ObjectSymbolTable as _};

use super::{
    LoadError,
    tls::read_library,
    uprobes::{FileProbes, Probe, Site, process_files},
};

const ENTRY: &str = "py_send";
const RETURN: &str = "py_send_return";
const FUNCTION: &str = "PyIter_Send";

/// Loads the Python uprobes (attached by [`FileProbes::scan`]).
pub(crate) fn load(ebpf: &mut Ebpf) -> Result<FileProbes, LoadError> {
    FileProbes::load(ebpf, "python", &[ENTRY, RETURN], plan, candidate_files)
}

/// Both programs at `_asyncio`'s PLT entry for `PyIter_Send`, or at the function in an
/// interpreter with `_asyncio` built in; nothing for a file that is neither.
fn plan(path: &Path) -> Vec<Probe> {
    let Some(data) = read_library(path) else { return Vec::new() };
    let site = if is_asyncio_module(path) {
        match plt_entry(&data, FUNCTION) {
            Some(offset) => Site::Offset { offset, name: "PyIter_Send@plt" },
            None => return Vec::new(),
        }
    } else if exports(&data, "PyInit__asyncio") && exports(&data, FUNCTION) {
        Site::Symbol(FUNCTION)
    } else {
        return Vec::new();
    };
    [ENTRY, RETURN].into_iter().map(|program| Probe { program, site }).collect()
}

fn is_asyncio_module(path: &Path) -> bool {
    let named =
        path.file_name().and_then(|f| f.to_str()).is_some_and(|f| f.starts_with("_asyncio"));
    named && path.extension().is_some_and(|e| e == "so")
}

fn exports(data: &[u8], name: &str) -> bool {
    object::File::parse(data)
        .is_ok_and(|elf| elf.dynamic_symbols().any(|s| s.is_definition() && s.name() == Ok(name)))
}

/// The file offset of the PLT entry through which an x86-64 ELF file calls `function`: the
/// entry (in `.plt` or `.plt.sec`) whose `jmp *disp(%rip)` reads the GOT slot the function's
/// jump-slot relocation fills. Every number comes from the file: checked, never trusted.
fn plt_entry(data: &[u8], function: &str) -> Option<u64> {
    let elf = object::File::parse(data).ok()?;
    if elf.architecture() != object::Architecture::X86_64 {
        return None;
    }
    let symbols = elf.dynamic_symbol_table()?;
    let slot = elf.dynamic_relocations()?.find_map(|(slot, r)| match r.target() {
        object::RelocationTarget::Symbol(i) => {
            (symbols.symbol_by_index(i).ok()?.name() == Ok(function)).then_some(slot)
        }
        _ => None,
    })?;
    for section in elf.sections().filter(|s| matches!(s.name(), Ok(".plt" | ".plt.sec"))) {
        let (file_offset, _) = section.file_range()?;
        let code = section.data().ok()?;
        for (i, entry) in code.chunks_exact(16).enumerate() {
            // `jmp *disp32(%rip)` (ff 25), after an `endbr64` and a `bnd` prefix in `.plt.sec`.
            let Some(at) = entry.windows(2).position(|w| w == [0xff, 0x25]) else { continue };
            let Some(disp) = entry.get(at + 2..at + 6) else { continue };
            let disp = i64::from(i32::from_le_bytes(disp.try_into().ok()?));
            let start = u64::try_from(i * 16).ok()?;
            let next = section.address().checked_add(start + at as u64 + 6)?;
            if next.checked_add_signed(disp) == Some(slot) {
                return file_offset.checked_add(start);
            }
        }
    }
    None
}

/// Where distributions put `_asyncio` (for processes started after the agent).
const DEFAULT_DIRS: [&str; 2] = ["/usr/lib", "/usr/local/lib"];

/// The `_asyncio` modules of the host's interpreters and of running Python processes, and the
/// executable or `libpython3` of running interpreters (one with `_asyncio` built in is probed
/// there; [`plan`] leaves the others alone). Container roots included.
fn candidate_files() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for dir in DEFAULT_DIRS {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        for e in entries.flatten() {
            let name = e.file_name();
            if !name.to_str().is_some_and(|n| n.starts_with("python3")) {
                continue;
            }
            let Ok(modules) = std::fs::read_dir(e.path().join("lib-dynload")) else { continue };
            out.extend(modules.flatten().map(|m| m.path()).filter(|p| is_asyncio_module(p)));
        }
    }
    out.extend(process_files(|proc| {
        let Ok(exe) = std::fs::read_link(format!("{proc}/exe")) else { return Vec::new() };
        let exe = exe.to_string_lossy().into_owned();
        let named = Path::new(&exe)
            .file_name()
            .and_then(|f| f.to_str())
            .is_some_and(|f| f.starts_with("python3"));
        if !named {
            return Vec::new();
        }
        let maps = std::fs::read_to_string(format!("{proc}/maps")).unwrap_or_default();
        let mut files: Vec<String> = maps
            .lines()
            .filter_map(|l| l.split_whitespace().nth(5))
            .filter(|path| {
                let path = Path::new(path);
                let library = path.file_name().and_then(|f| f.to_str());
                library.is_some_and(|f| f.starts_with("libpython3")) || is_asyncio_module(path)
            })
            .map(str::to_owned)
            .collect();
        files.push(exe);
        files.dedup();
        // A file replaced on disk shows " (deleted)": not a file to attach to.
        files.retain(|path| !path.ends_with(" (deleted)"));
        files
    }));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debian_s_asyncio_module_is_probed_at_its_plt_entry_for_the_task_step() {
        let module = std::fs::read_dir("/usr/lib/python3.11/lib-dynload")
            .expect("Debian's python3.11 (cargo xtask installs it)")
            .flatten()
            .map(|e| e.path())
            .find(|p| is_asyncio_module(p))
            .expect("_asyncio in lib-dynload");
        let probes = plan(&module);
        assert_eq!(probes.len(), 2, "{probes:?}");
        let Site::Offset { offset, .. } = probes[0].site else { panic!("{probes:?}") };
        // The entry is a `jmp *disp(%rip)`, possibly after an `endbr64`.
        let data = std::fs::read(&module).expect("read");
        let at = usize::try_from(offset).expect("small");
        let entry = &data[at..at + 16];
        assert!(entry.windows(2).any(|w| w == [0xff, 0x25]), "{entry:x?}");
        // The interpreter itself: `_asyncio` is not built in, so it is left alone.
        assert!(plan(Path::new("/usr/bin/python3.11")).is_empty());
    }

    #[test]
    fn files_that_are_not_what_they_are_named_probe_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fake = dir.path().join("_asyncio.cpython-311-x86_64-linux-gnu.so");
        for bytes in [&b""[..], b"\x7fELF\x02\x01\x01", &[0xff; 4096]] {
            std::fs::write(&fake, bytes).expect("write");
            assert!(plan(&fake).is_empty());
        }
        let libc_like = Path::new("/usr/lib/x86_64-linux-gnu/libssl.so.3");
        assert!(plan(libc_like).is_empty(), "no PyInit__asyncio there");
    }
}
