//! The hop table: hops by key, with a hard limit on series per metric family.
//!
//! Every family a hop feeds has one series per hop side (client / server), or per hop side and
//! name for the tallies (failure cause, rcode, query name, drop reason). The table admits a new
//! series only while its family has fewer than `series_limit`; what does not fit is counted in
//! one overflow hop whose endpoints are `_overflow_`. Admission is sticky: a series, once
//! admitted, keeps its counts until its hop is evicted, so exported counters never jump between
//! series.

use std::collections::hash_map::Entry;

use super::{
    FastMap, HopKey,
    stats::{Budget, Hop, Side, SideStats, Tally, TallyKind},
};

/// Where an observation landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Landed {
    Own,
    Overflow,
}

#[derive(Debug)]
pub struct HopTable {
    hops: FastMap<HopKey, Hop>,
    /// Counts of everything that did not fit.
    overflow: Hop,
    /// Hop sides held (each is one series in every per-side family).
    sides: Budget,
    tallies: [Budget; TallyKind::COUNT],
    /// Names one hop side keeps per tally before the rest go to the overflow hop.
    per_hop_values: usize,
    /// Observations that went to the overflow hop.
    pub overflowed: u64,
}

impl HopTable {
    #[must_use]
    pub fn new(series_limit: usize, per_hop_values: usize) -> Self {
        Self {
            hops: FastMap::default(),
            overflow: Hop::default(),
            sides: Budget::new(series_limit),
            tallies: [Budget::new(series_limit); TallyKind::COUNT],
            per_hop_values,
            overflowed: 0,
        }
    }

    /// The stats `side` of `key` reports into, creating them if the limit allows; otherwise the
    /// overflow hop's.
    pub fn side_mut(&mut self, key: &HopKey, side: Side, at_ns: u64) -> (&mut SideStats, Landed) {
        let Self { hops, overflow, sides, overflowed, .. } = self;
        // One lookup (cloning a key is four reference counts, cheaper than hashing it twice).
        // A hop is only created together with its first series, so hops ≤ series limit.
        let hop = match hops.entry(key.clone()) {
            Entry::Occupied(o) => Some(o.into_mut()),
            Entry::Vacant(v) if sides.used < sides.limit => Some(v.insert(Hop::default())),
            Entry::Vacant(_) => None,
        };
        if let Some(hop) = hop {
            hop.last_seen_ns = hop.last_seen_ns.max(at_ns);
            let slot = hop.side_slot(side);
            if slot.is_some() || sides.take() {
                return (slot.get_or_insert_with(Box::default), Landed::Own);
            }
        }
        *overflowed += 1;
        overflow.last_seen_ns = overflow.last_seen_ns.max(at_ns);
        (overflow.side_slot(side).get_or_insert_with(Box::default), Landed::Overflow)
    }

    /// Counts `n` under `name` in `kind`'s tally of `key`'s `side`, within the limits.
    pub fn tally(
        &mut self,
        key: &HopKey,
        side: Side,
        kind: TallyKind,
        name: &str,
        n: u64,
        at_ns: u64,
    ) {
        let cap = self.per_hop_values;
        let (stats, landed) = self.side_mut(key, side, at_ns);
        if landed == Landed::Own {
            let budget = &mut self.tallies[kind as usize];
            // Re-borrow: side_mut's borrow ended; look the side up again.
            let stats = self
                .hops
                .get_mut(key)
                .and_then(|h| h.side_slot(side).as_deref_mut())
                .expect("side_mut created it");
            if stats.tally_mut(kind).try_add(name, n, cap, budget) {
                return;
            }
            self.overflowed += 1;
            let o = self.overflow.side_slot(side).get_or_insert_with(Box::default);
            o.tally_mut(kind).add_capped(name, n, cap);
            return;
        }
        stats.tally_mut(kind).add_capped(name, n, cap);
    }

    /// Counts `n` drops for `reason` on `key`.
    pub fn drop(&mut self, key: &HopKey, reason: &str, n: u64, at_ns: u64) {
        let cap = self.per_hop_values;
        let budget = &mut self.tallies[TallyKind::Drops as usize];
        // Drops are hop-level: a hop may exist with drops only. Creating it takes no side series,
        // so the drop budget alone bounds these hops.
        let fits = if let Some(hop) = self.hops.get_mut(key) {
            let ok = hop.drops.try_add(reason, n, cap, budget);
            if ok {
                hop.last_seen_ns = hop.last_seen_ns.max(at_ns);
            }
            ok
        } else {
            let mut drops = Tally::default();
            let ok = drops.try_add(reason, n, cap, budget);
            if ok {
                self.hops.insert(key.clone(), Hop { drops, last_seen_ns: at_ns, ..Hop::default() });
            }
            ok
        };
        if !fits {
            self.overflowed += 1;
            self.overflow.drops.add_capped(reason, n, cap);
            self.overflow.last_seen_ns = self.overflow.last_seen_ns.max(at_ns);
        }
    }

    /// Removes hops for which `evict` says so, giving their series back.
    pub fn evict(&mut self, mut evict: impl FnMut(&HopKey, &Hop) -> bool) -> usize {
        let before = self.hops.len();
        let Self { hops, sides, tallies, .. } = self;
        hops.retain(|k, hop| {
            if !evict(k, hop) {
                return true;
            }
            let (s, t) = hop.series();
            sides.give_back(s);
            for (b, n) in tallies.iter_mut().zip(t) {
                b.give_back(n);
            }
            false
        });
        before - self.hops.len()
    }

    /// Resets the overflow hop when nothing reached it since `cutoff_ns`.
    pub fn expire_overflow(&mut self, cutoff_ns: u64) {
        if self.overflow.last_seen_ns < cutoff_ns {
            self.overflow = Hop::default();
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&HopKey, &Hop)> {
        self.hops.iter()
    }

    #[must_use]
    pub fn get(&self, key: &HopKey) -> Option<&Hop> {
        self.hops.get(key)
    }

    /// The overflow hop (empty when everything fitted).
    #[must_use]
    pub fn overflow(&self) -> &Hop {
        &self.overflow
    }

    /// Hops held (the overflow hop not included).
    #[must_use]
    pub fn len(&self) -> usize {
        self.hops.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.hops.is_empty()
    }

    /// Series held in the per-side families, and in each tally family.
    #[must_use]
    pub fn series_used(&self) -> (usize, [usize; TallyKind::COUNT]) {
        (self.sides.used, self.tallies.map(|b| b.used))
    }

    /// Adds every hop of `other` (window merges; no limits: both were bounded).
    pub fn merge(&mut self, other: &HopTable) {
        for (k, hop) in &other.hops {
            self.hops.entry(k.clone()).or_default().merge(hop);
        }
        self.overflow.merge(&other.overflow);
        self.overflowed += other.overflowed;
    }
}
