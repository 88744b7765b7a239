//! What the kernel's drop reasons are called on this kernel, which of them are worth reporting,
//! and where in the kernel a packet was dropped.

pub(crate) mod symbols;

use std::collections::{BTreeMap, BTreeSet};

use hopwatch_common::{DROP_REASON_MAX, maps::DROP_IGNORE_WORDS};

use crate::loader::btf::{Btf, BtfError};

/// Reasons not reported by default: they are frees, not losses. `NOT_SPECIFIED` is what plain
/// `kfree_skb()` calls pass, overwhelmingly on paths that are not packet loss; the rest free queued
/// packets when a socket closes or a queue is purged.
pub(crate) const DEFAULT_IGNORED: &[&str] =
    &["NOT_SPECIFIED", "SOCKET_CLOSE", "QUEUE_PURGE", "UNIX_DISCONNECT", "UNIX_SKIP_OOB"];

const PREFIX: &str = "SKB_DROP_REASON_";

#[derive(Debug, thiserror::Error)]
pub enum DropReasonError {
    #[error("reading enum skb_drop_reason from BTF: {0}")]
    Btf(#[from] BtfError),
    #[error("unknown drop reason {name:?} in --drop-ignore; this kernel knows: {known}")]
    UnknownReason { name: String, known: String },
}

/// `enum skb_drop_reason` of this kernel.
#[derive(Debug, Clone)]
pub struct DropReasons {
    by_value: BTreeMap<u32, String>,
    /// The kernel's `kfree_skb` passes no reason (before 5.17): every drop reads as
    /// [`UNKNOWN_ON_THIS_KERNEL`].
    reasonless: bool,
}

/// What a drop's reason reads as on a kernel whose `kfree_skb` has none (before 5.17).
pub(crate) const UNKNOWN_ON_THIS_KERNEL: &str = "reason unknown on this kernel";

impl DropReasons {
    /// Reads the enum from BTF (its values differ between kernel versions).
    pub fn from_btf(btf: &Btf) -> Result<Self, DropReasonError> {
        let by_value = btf
            .enum_values("skb_drop_reason")?
            .into_iter()
            .filter_map(|(v, name)| {
                let v = u32::try_from(v).ok()?;
                let name = name.strip_prefix(PREFIX).unwrap_or(&name).to_owned();
                Some((v, name))
            })
            .collect();
        Ok(Self { by_value, reasonless: false })
    }

    /// This kernel's `kfree_skb` passes no drop reason (before 5.17, where BTF has no `enum
    /// skb_drop_reason`): every reason is [`UNKNOWN_ON_THIS_KERNEL`].
    pub fn reasonless() -> Self {
        Self { by_value: BTreeMap::new(), reasonless: true }
    }

    /// Whether drops carry no reason on this kernel.
    pub fn is_reasonless(&self) -> bool {
        self.reasonless
    }

    /// No names known (reasons print as `UNKNOWN_<n>`).
    pub fn empty() -> Self {
        Self { by_value: BTreeMap::new(), reasonless: false }
    }

    #[cfg(test)]
    pub fn from_pairs(pairs: &[(u32, &str)]) -> Self {
        Self {
            by_value: pairs.iter().map(|(v, n)| (*v, (*n).to_owned())).collect(),
            reasonless: false,
        }
    }

    /// The name of `reason`, or `UNKNOWN_<n>` for a value this kernel's BTF does not list.
    #[must_use]
    pub fn name(&self, reason: u32) -> String {
        if self.reasonless {
            return UNKNOWN_ON_THIS_KERNEL.to_owned();
        }
        self.by_value.get(&reason).cloned().unwrap_or_else(|| format!("UNKNOWN_{reason}"))
    }

    /// The ignore bitmap the kernel program reads, one bit per reason value. With `strict`, a
    /// name this kernel does not know is an error (a user typo); otherwise it is skipped (the
    /// default list names reasons older kernels lack).
    pub fn ignore_bitmap(
        &self,
        names: &[String],
        strict: bool,
    ) -> Result<Vec<u32>, DropReasonError> {
        let wanted: BTreeSet<&str> = names.iter().map(String::as_str).collect();
        let mut words = vec![0u32; DROP_IGNORE_WORDS as usize];
        for name in &wanted {
            let name = name.strip_prefix(PREFIX).unwrap_or(name);
            let Some((&v, _)) = self.by_value.iter().find(|(_, n)| n.as_str() == name) else {
                if !strict || self.reasonless {
                    continue;
                }
                return Err(DropReasonError::UnknownReason {
                    name: (*name).to_owned(),
                    known: self.by_value.values().cloned().collect::<Vec<_>>().join(", "),
                });
            };
            if v < DROP_REASON_MAX {
                words[(v / 32) as usize] |= 1 << (v % 32);
            }
        }
        Ok(words)
    }

    /// How many reasons this kernel defines.
    pub fn count(&self) -> usize {
        self.by_value.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_sets_the_named_bits() {
        let r = DropReasons::from_pairs(&[(2, "NOT_SPECIFIED"), (12, "NETFILTER_DROP"), (40, "X")]);
        let words =
            r.ignore_bitmap(&["NOT_SPECIFIED".into(), "SKB_DROP_REASON_X".into()], true).unwrap();
        assert_eq!(words[0], 1 << 2);
        assert_eq!(words[1], 1 << 8);
        assert_eq!(r.name(12), "NETFILTER_DROP");
        assert_eq!(r.name(999), "UNKNOWN_999");
    }

    #[test]
    fn unknown_names_are_an_error_listing_the_known_ones() {
        let r = DropReasons::from_pairs(&[(2, "NOT_SPECIFIED")]);
        let err = r.ignore_bitmap(&["NOPE".into()], true).unwrap_err().to_string();
        assert!(err.contains("NOPE") && err.contains("NOT_SPECIFIED"), "{err}");
        assert_eq!(r.ignore_bitmap(&["NOPE".into()], false).unwrap()[0], 0);
    }

    #[test]
    fn without_reasons_every_drop_says_so_and_nothing_is_filtered() {
        let r = DropReasons::reasonless();
        assert_eq!(r.name(0), "reason unknown on this kernel");
        assert_eq!(r.name(7), "reason unknown on this kernel");
        let words = r.ignore_bitmap(&["NOT_SPECIFIED".into()], true).unwrap();
        assert!(words.iter().all(|w| *w == 0));
    }

    #[test]
    fn this_kernel_names_netfilter_drops() {
        let btf = Btf::from_file(Btf::VMLINUX).expect("vmlinux BTF");
        let r = DropReasons::from_btf(&btf).expect("enum present");
        assert!(r.count() > 10);
        assert!(r.by_value.values().any(|n| n == "NETFILTER_DROP"));
        r.ignore_bitmap(&DEFAULT_IGNORED.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(), true)
            .expect("the default ignore list exists on this kernel");
    }
}
