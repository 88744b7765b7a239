//! The requests asyncio tasks answered, kept per coroutine for the calls those tasks made
//! ([`super::Link::Coroutine`]): a call links to the request whose window contains it.

use std::collections::VecDeque;

use hopwatch_proto::compact::Compact as _;
use rustc_hash::FxHashMap;

/// Requests answered by asyncio tasks remembered for the calls their coroutines made.
const MAX_SERVED: usize = 262_144;
/// Of one coroutine (object address), the latest requests it answered kept.
const SERVED_PER_COROUTINE: usize = 4;

/// An inbound request an asyncio task answered: its coroutine (`key`, as in
/// [`Link::Coroutine`]) wrote the response, which started at `to_ns`; the request ended at
/// `from_ns`. A call that coroutine made in between was made for it: one object is one live
/// coroutine at a time, and a request's task is made after its request is read (uvicorn,
/// aiohttp), so no other coroutine at that address can have made a call in that window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Served {
    pub key: u64,
    pub from_ns: u64,
    pub to_ns: u64,
}

/// One answered request: its window, its span and when the tracer saw it.
#[derive(Debug, Clone, Copy)]
struct Window {
    from_ns: u64,
    to_ns: u64,
    span: u64,
    seen_ns: u64,
}

/// Coroutine → the latest requests it answered, oldest first; every window's key in the order
/// seen, with when, for forgetting.
#[derive(Default)]
pub(super) struct Answered {
    windows: FxHashMap<u64, VecDeque<Window>>,
    order: VecDeque<(u64, u64)>,
}

impl Answered {
    /// The request `span` answered as `s` says, seen at `now_ns`; windows older than `hold_ns`
    /// (or past [`MAX_SERVED`]) are forgotten.
    pub(super) fn remember(&mut self, s: Served, span: u64, now_ns: u64, hold_ns: u64) {
        while let Some(&(old, seen)) = self.order.front() {
            if self.order.len() < MAX_SERVED && now_ns.saturating_sub(seen) < hold_ns {
                break;
            }
            self.order.pop_front();
            if let Some(windows) = self.windows.get_mut(&old) {
                windows.retain(|w| w.seen_ns > seen);
                if windows.is_empty() {
                    self.windows.remove(&old);
                }
            }
        }
        let windows = self.windows.entry(s.key).or_default();
        if windows.len() >= SERVED_PER_COROUTINE {
            windows.pop_front();
        }
        windows.push_back(Window { from_ns: s.from_ns, to_ns: s.to_ns, span, seen_ns: now_ns });
        self.order.push_back((s.key, now_ns));
    }

    /// The request coroutine `key` answered around a call it made at `at_ns`, if known.
    pub(super) fn parent(&self, key: u64, at_ns: u64) -> Option<u64> {
        let windows = self.windows.get(&key)?;
        windows.iter().find(|w| w.from_ns <= at_ns && at_ns <= w.to_ns).map(|w| w.span)
    }

    /// Gives back the room of windows gone.
    pub(super) fn compact(&mut self) {
        self.windows.compact();
        self.order.compact();
    }
}
