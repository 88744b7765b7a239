//! Kernel text addresses → `function+0xoff`, from `/proc/kallsyms` (root sees real addresses).
//!
//! Modules loaded after the agent started (nf_tables on a host's first firewall rule) have text
//! the first read did not list: a drop there resolved to the last symbol before it, a wrong
//! function in another module. So when `/proc/modules` changes (looked at most once a second,
//! only while drops are being resolved), kallsyms is read again.

use std::{
    hash::{DefaultHasher, Hash as _, Hasher as _},
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

/// Where the loaded modules are listed.
const MODULES: &str = "/proc/modules";
/// How often, at most, `/proc/modules` is checked for a change.
const RECHECK: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum SymbolsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} shows only zero addresses (kptr_restrict): run as root or set \
         kernel.kptr_restrict=0 to symbolize drop locations"
    )]
    Restricted { path: String },
}

/// Text symbols sorted by address, their names in one string: about 120k symbols on a
/// distribution kernel, 4.4 MiB this way against 6.8 MiB as a boxed string each.
#[derive(Default)]
struct Symbols {
    addrs: Vec<u64>,
    /// Where symbol `i`'s name ends in `names` (it starts where `i - 1`'s ends).
    ends: Vec<u32>,
    names: String,
}

impl Symbols {
    fn is_empty(&self) -> bool {
        self.addrs.is_empty()
    }

    fn name(&self, i: usize) -> &str {
        let start = i.checked_sub(1).map_or(0, |p| self.ends[p] as usize);
        &self.names[start..self.ends[i] as usize]
    }

    /// `name+0xoffset` for `addr`, or the bare hex address when it is outside every symbol.
    fn lookup(&self, addr: u64) -> String {
        match self.addrs.partition_point(|a| *a <= addr).checked_sub(1) {
            Some(i) => format!("{}+{:#x}", self.name(i), addr - self.addrs[i]),
            None => format!("{addr:#x}"),
        }
    }
}

/// Sorted text symbols.
pub struct KernelSymbols {
    syms: Symbols,
    /// Where they were read from, to read them again when modules change (`None`: parsed text).
    source: Option<Source>,
}

struct Source {
    kallsyms: PathBuf,
    modules: PathBuf,
    /// When `/proc/modules` was last looked at, and a hash of what it said.
    seen: Mutex<(Instant, u64)>,
    /// Symbols read again after a module change (replacing `syms` in lookups).
    reread: Mutex<Option<Symbols>>,
}

fn modules_hash(path: &Path) -> u64 {
    let mut h = DefaultHasher::new();
    // Module names and load addresses; the reference counts in between change all the time.
    std::fs::read_to_string(path).unwrap_or_default().lines().for_each(|l| {
        let f: Vec<&str> = l.split_ascii_whitespace().collect();
        (f.first(), f.last()).hash(&mut h);
    });
    h.finish()
}

impl KernelSymbols {
    pub const KALLSYMS: &'static str = "/proc/kallsyms";

    pub fn load(path: impl AsRef<Path>) -> Result<Self, SymbolsError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|source| SymbolsError::Read { path: path.display().to_string(), source })?;
        let mut syms = Self::parse(&text);
        if syms.syms.is_empty() {
            return Err(SymbolsError::Restricted { path: path.display().to_string() });
        }
        let modules = PathBuf::from(MODULES);
        syms.source = Some(Source {
            kallsyms: path.to_owned(),
            seen: Mutex::new((Instant::now(), modules_hash(&modules))),
            modules,
            reread: Mutex::new(None),
        });
        Ok(syms)
    }

    /// Parses kallsyms text; keeps text symbols (`t`/`T`) with non-zero addresses.
    #[must_use]
    pub fn parse(text: &str) -> Self {
        let mut found: Vec<(u64, &str)> = text
            .lines()
            .filter_map(|line| {
                let mut parts = line.split_ascii_whitespace();
                let addr = u64::from_str_radix(parts.next()?, 16).ok()?;
                let kind = parts.next()?;
                let name = parts.next()?;
                (addr != 0 && matches!(kind, "t" | "T")).then_some((addr, name))
            })
            .collect();
        found.sort_unstable_by_key(|(a, _)| *a);
        let mut syms = Symbols {
            addrs: Vec::with_capacity(found.len()),
            ends: Vec::with_capacity(found.len()),
            names: String::with_capacity(found.iter().map(|(_, n)| n.len()).sum()),
        };
        for (addr, name) in found {
            // Past 4 GiB of names (never, for a kernel's text): the rest are left unnamed.
            let Ok(end) = u32::try_from(syms.names.len() + name.len()) else { break };
            syms.names.push_str(name);
            syms.addrs.push(addr);
            syms.ends.push(end);
        }
        Self { syms, source: None }
    }

    /// `name+0xoffset` for `addr`, or the bare hex address when it is outside every symbol.
    #[must_use]
    pub fn resolve(&self, addr: u64) -> String {
        let Some(src) = &self.source else { return self.syms.lookup(addr) };
        src.refresh();
        let reread = src.reread.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        reread.as_ref().unwrap_or(&self.syms).lookup(addr)
    }
}

impl Source {
    /// Reads kallsyms again when the list of modules changed since the last look.
    fn refresh(&self) {
        let mut seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if seen.0.elapsed() < RECHECK {
            return;
        }
        let now = modules_hash(&self.modules);
        let changed = now != seen.1;
        *seen = (Instant::now(), now);
        drop(seen);
        if changed && let Ok(text) = std::fs::read_to_string(&self.kallsyms) {
            let syms = KernelSymbols::parse(&text).syms;
            if !syms.is_empty() {
                *self.reread.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(syms);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_to_the_enclosing_function() {
        let syms = KernelSymbols::parse(
            "ffffffff81000000 T _stext\n\
             ffffffff81000100 t helper\n\
             ffffffff81000200 D some_data\n\
             ffffffff81000300 T nft_do_chain\t[nf_tables]\n",
        );
        assert_eq!(syms.resolve(0xffff_ffff_8100_0008), "_stext+0x8");
        assert_eq!(syms.resolve(0xffff_ffff_8100_0104), "helper+0x4");
        assert_eq!(syms.resolve(0xffff_ffff_8100_0210), "helper+0x110", "data symbols are skipped");
        assert_eq!(syms.resolve(0xffff_ffff_8100_03c4), "nft_do_chain+0xc4");
        assert_eq!(syms.resolve(0x10), "0x10");
    }

    #[test]
    fn a_module_loaded_later_is_named_once_the_module_list_changes() {
        let dir = std::env::temp_dir().join(format!("hopwatch-syms-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let (kallsyms, modules) = (dir.join("kallsyms"), dir.join("modules"));
        std::fs::write(&kallsyms, "ffffffffc0000000 t netem_init\t[sch_netem]\n").unwrap();
        std::fs::write(&modules, "sch_netem 20480 0 - Live 0xffffffffc0000000\n").unwrap();
        let mut syms = KernelSymbols::load(&kallsyms).expect("symbols");
        let src = syms.source.as_mut().expect("read from a file");
        src.modules.clone_from(&modules);
        *src.seen.get_mut().unwrap() = (
            Instant::now().checked_sub(RECHECK).expect("uptime over a second"),
            modules_hash(&modules),
        );
        // nf_tables is loaded after the agent started.
        std::fs::write(
            &kallsyms,
            "ffffffffc0000000 t netem_init\t[sch_netem]\nffffffffc0100000 t nft_do_chain\t[nf_tables]\n",
        )
        .unwrap();
        std::fs::write(
            &modules,
            "sch_netem 20480 0 - Live 0xffffffffc0000000\nnf_tables 1000 0 - Live 0xffffffffc0100000\n",
        )
        .unwrap();
        assert_eq!(syms.resolve(0xffff_ffff_c010_03c4), "nft_do_chain+0x3c4");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn restricted_kallsyms_is_empty() {
        assert!(KernelSymbols::parse("0000000000000000 T _stext\n").syms.is_empty());
    }
}
