//! Putting events in the ring buffer: one place that reserves, zeroes and stamps them, and counts
//! the ones a full buffer turns away.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::bpf_get_smp_processor_id,
    maps::ring_buf::RingBufEntry,
};
use hopwatch_common::{ConnState, Counter, DropEvent, EventHeader, EventKind, TcpEvent};

use crate::maps::{EVENTS, count};

/// Wake the agent only once this much is waiting; it also drains on a short timer. A wake-up per
/// event (the ring buffer's default when the reader keeps up) costs an interrupt-work item and a
/// context switch per event, which at tens of thousands of events a second dominates the cost.
const WAKEUP_BYTES: u64 = 256 * 1024;

/// Ring buffer commit flags: wake the reader only when enough data waits.
#[inline(always)]
pub fn wakeup_flags() -> u64 {
    if EVENTS.query(u64::from(BPF_RB_AVAIL_DATA)) >= WAKEUP_BYTES {
        u64::from(BPF_RB_FORCE_WAKEUP)
    } else {
        u64::from(BPF_RB_NO_WAKEUP)
    }
}

/// An event type with a common header.
pub trait Event: 'static {
    const KIND: EventKind;
    fn header_mut(&mut self) -> &mut EventHeader;
}

impl Event for TcpEvent {
    const KIND: EventKind = EventKind::Tcp;
    fn header_mut(&mut self) -> &mut EventHeader {
        &mut self.header
    }
}

impl Event for DropEvent {
    const KIND: EventKind = EventKind::Drop;
    fn header_mut(&mut self) -> &mut EventHeader {
        &mut self.header
    }
}

/// Reserves a zeroed `T` with its header's kind, CPU, time and socket cookie set. `None` (and a
/// [`Counter::RingbufFull`]) when the buffer is full: the event is lost, never waited for.
#[inline(always)]
pub fn reserve<T: Event>(timestamp_ns: u64, cookie: u64) -> Option<RingBufEntry<T>> {
    let Some(mut entry) = EVENTS.reserve::<T>(0) else {
        count(Counter::RingbufFull);
        return None;
    };
    // A reserved slot is always submitted (the verifier refuses a program that could leak it).
    count(Counter::EventsSent);
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` is a reserved slot of `size_of::<T>()` bytes; zeroing makes every byte
    // initialised (T is plain old data) before we hand out a reference.
    unsafe {
        core::ptr::write_bytes(ev, 0, 1);
        let h = (*ev).header_mut();
        h.kind = T::KIND as u32;
        h.cpu = bpf_get_smp_processor_id();
        h.timestamp_ns = timestamp_ns;
        h.socket_cookie = cookie;
    }
    Some(entry)
}

/// Copies what hopwatch knows about a tracked connection (process, timings, counters) into `e`.
#[inline(always)]
pub fn fill_from_conn(e: &mut TcpEvent, c: &ConnState) {
    e.header.pid = c.pid;
    e.header.tgid = c.tgid;
    e.header.cgroup_id = c.cgroup_id;
    e.comm = c.comm;
    e.stats = c.stats;
    e.start_ns = c.start_ns;
    e.connect_latency_ns = c.connect_latency_ns;
    e.flags = c.flags;
    e.role = c.role;
}
