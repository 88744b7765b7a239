//! What the agent runs with: each capability (a group of kernel hooks, an identity source) is
//! either up, through a named hook or source, or unavailable, with the reason. An optional part
//! that cannot start is reported here — once on stderr and as `hopwatch_capability_up` — and the
//! agent runs without it; only a missing hard requirement stops it.

use std::fmt;

use prometheus::{IntGaugeVec, Opts, Registry};

/// One capability and how it runs, or why it does not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Capability {
    /// Stable name, also the metric label: `tcp`, `tcp_counters`, `drops`, `l7_capture`, `tls`,
    /// `nginx`, `python`, `kubernetes`, `docker`, `cgroup_names`, `address_translation`.
    pub name: &'static str,
    pub up: bool,
    /// When up: the hook or source it runs through; when down: why, and what to do.
    pub detail: String,
}

impl Capability {
    pub(crate) fn up(name: &'static str, via: impl Into<String>) -> Self {
        Self { name, up: true, detail: via.into() }
    }

    pub(crate) fn down(name: &'static str, reason: impl Into<String>) -> Self {
        Self { name, up: false, detail: reason.into() }
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.up {
            write!(f, "{}: on, via {}", self.name, self.detail)
        } else {
            write!(f, "{}: unavailable, running without it: {}", self.name, self.detail)
        }
    }
}

/// `hopwatch_capability_up{capability, detail}`: 1 when up (detail: the hook), 0 when not
/// (detail: the reason). One series per capability; a handful in all.
pub(crate) struct CapabilityGauge(IntGaugeVec);

impl CapabilityGauge {
    pub(crate) fn register(r: &Registry) -> Result<Self, prometheus::Error> {
        let g = IntGaugeVec::new(
            Opts::new(
                "hopwatch_capability_up",
                "Whether each capability of the agent runs (1) or is unavailable on this node \
                 (0); detail names the hook or source it runs through, or why it does not.",
            ),
            &["capability", "detail"],
        )?;
        r.register(Box::new(g.clone()))?;
        Ok(Self(g))
    }

    pub(crate) fn set(&self, caps: &[Capability]) {
        for c in caps {
            self.0.with_label_values(&[c.name, c.detail.as_str()]).set(i64::from(c.up));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_capability_is_one_series_with_its_hook_or_reason() {
        let r = Registry::new();
        let g = CapabilityGauge::register(&r).expect("registers");
        g.set(&[
            Capability::up("drops", "tp_btf/kfree_skb"),
            Capability::down("address_translation", "conntrack netlink: Protocol not supported"),
        ]);
        let text = crate::metrics::encode(&r.gather());
        for line in [
            "hopwatch_capability_up{capability=\"drops\",detail=\"tp_btf/kfree_skb\"} 1",
            "hopwatch_capability_up{capability=\"address_translation\",detail=\"conntrack \
             netlink: Protocol not supported\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from:\n{text}");
        }
        assert_eq!(
            Capability::down("tls", "no libssl found").to_string(),
            "tls: unavailable, running without it: no libssl found"
        );
    }
}
