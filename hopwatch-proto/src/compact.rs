//! Giving back the memory of tables that emptied.
//!
//! A hash table keeps the capacity of its largest moment: after 100k connections closed, the
//! connection tables of a node agent still hold room for 100k, tens of MiB that nothing uses.
//! [`Compact::compact`] shrinks a table that is mostly empty (under a quarter full) to twice
//! what it holds, so a table that is still busy is not reallocated back and forth. Call it from
//! a periodic sweep, not per event.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    hash::{BuildHasher, Hash},
};

/// Tables smaller than this are left as they are (not worth a reallocation).
const FLOOR: usize = 1024;

/// A table that can give back room it does not use.
pub trait Compact {
    /// Shrinks the table when under a quarter of its capacity is used; returns whether it did.
    fn compact(&mut self) -> bool;
}

/// The capacity to shrink to, when `len` out of `capacity` calls for it.
fn target(len: usize, capacity: usize) -> Option<usize> {
    (capacity > FLOOR && len < capacity / 4).then(|| (len * 2).max(FLOOR / 2))
}

impl<K: Eq + Hash, V, S: BuildHasher> Compact for HashMap<K, V, S> {
    fn compact(&mut self) -> bool {
        target(self.len(), self.capacity()).map(|to| self.shrink_to(to)).is_some()
    }
}

impl<K: Eq + Hash, S: BuildHasher> Compact for HashSet<K, S> {
    fn compact(&mut self) -> bool {
        target(self.len(), self.capacity()).map(|to| self.shrink_to(to)).is_some()
    }
}

impl<T> Compact for VecDeque<T> {
    fn compact(&mut self) -> bool {
        target(self.len(), self.capacity()).map(|to| self.shrink_to(to)).is_some()
    }
}

impl<T> Compact for Vec<T> {
    fn compact(&mut self) -> bool {
        target(self.len(), self.capacity()).map(|to| self.shrink_to(to)).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_that_emptied_gives_its_room_back_and_a_busy_one_keeps_it() {
        let mut m: HashMap<u64, [u8; 64]> = (0..100_000).map(|i| (i, [0; 64])).collect();
        let peak = m.capacity();
        assert!(!m.compact(), "a full table is left alone");
        m.retain(|k, _| *k < 60_000);
        assert!(!m.compact(), "more than a quarter full: kept");
        m.retain(|k, _| *k < 1000);
        assert!(m.compact());
        assert!(m.capacity() < peak / 16, "{} of {peak}", m.capacity());
        assert!(m.capacity() >= 1000 && (0..1000).all(|k| m.contains_key(&k)), "nothing lost");
        let mut small: HashSet<u32> = (0..500).collect();
        small.clear();
        assert!(!small.compact(), "small tables are not worth a reallocation");
        let mut q: VecDeque<u64> = (0..50_000).collect();
        q.drain(..49_990);
        assert!(
            q.compact()
                && q.capacity() < 1024
                && q.iter().eq(&(49_990..50_000).collect::<Vec<_>>())
        );
    }
}
