//! Kernel text addresses → `function+0xoff`, from `/proc/kallsyms` (root sees real addresses).

use std::path::Path;

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

/// Sorted text symbols.
pub struct KernelSymbols {
    /// `(address, name)`, sorted by address.
    syms: Vec<(u64, Box<str>)>,
}

impl KernelSymbols {
    pub const KALLSYMS: &'static str = "/proc/kallsyms";

    pub fn load(path: impl AsRef<Path>) -> Result<Self, SymbolsError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|source| SymbolsError::Read { path: path.display().to_string(), source })?;
        let syms = Self::parse(&text);
        if syms.syms.is_empty() {
            return Err(SymbolsError::Restricted { path: path.display().to_string() });
        }
        Ok(syms)
    }

    /// Parses kallsyms text; keeps text symbols (`t`/`T`) with non-zero addresses.
    #[must_use]
    pub fn parse(text: &str) -> Self {
        let mut syms: Vec<(u64, Box<str>)> = text
            .lines()
            .filter_map(|line| {
                let mut parts = line.split_ascii_whitespace();
                let addr = u64::from_str_radix(parts.next()?, 16).ok()?;
                let kind = parts.next()?;
                let name = parts.next()?;
                (addr != 0 && matches!(kind, "t" | "T")).then(|| (addr, name.into()))
            })
            .collect();
        syms.sort_unstable_by_key(|(a, _)| *a);
        Self { syms }
    }

    /// `name+0xoffset` for `addr`, or the bare hex address when it is outside every symbol.
    #[must_use]
    pub fn resolve(&self, addr: u64) -> String {
        let idx = self.syms.partition_point(|(a, _)| *a <= addr);
        match idx.checked_sub(1).map(|i| &self.syms[i]) {
            Some((base, name)) => format!("{name}+{:#x}", addr - base),
            None => format!("{addr:#x}"),
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
        assert_eq!(syms.resolve(0xffff_ffff_8100_0104), "helper+0x4");
        assert_eq!(syms.resolve(0xffff_ffff_8100_0210), "helper+0x110", "data symbols are skipped");
        assert_eq!(syms.resolve(0xffff_ffff_8100_03c4), "nft_do_chain+0xc4");
        assert_eq!(syms.resolve(0x10), "0x10");
    }

    #[test]
    fn restricted_kallsyms_is_empty() {
        assert!(KernelSymbols::parse("0000000000000000 T _stext\n").syms.is_empty());
    }
}
