//! Putting events in the ring buffer: one place that stamps their headers (kind, CPU, time,
//! socket cookie), chooses the wake-up, and counts what was sent and what a full buffer turned
//! away. Fixed-size events are reserved in place ([`reserve`]); variable-length ones (a data
//! event and the bytes captured after it) are assembled in a per-CPU scratch map and copied
//! whole ([`output`]).

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_smp_processor_id, generated::bpf_ringbuf_output},
    maps::ring_buf::RingBufEntry,
};
use hopwatch_common::{
    ConnState, Counter, DropEvent, EventHeader, EventKind, TcpEvent,
    exchange::{ExchangeEvent, ExchangeRecord},
};

use crate::maps::{DataScratch, EVENTS, WAKEUP_CHECKS, count};

/// Wake the agent only once this much is waiting; it also drains on a short timer. A wake-up per
/// event (the ring buffer's default when the reader keeps up) costs an interrupt-work item and a
/// context switch per event, which at tens of thousands of events a second dominates the cost.
const WAKEUP_BYTES: u64 = 256 * 1024;

/// How often (in events, per CPU) the fill level is checked: the check is a helper call, and
/// between two checks the level rises by a few kilobytes at most, against [`WAKEUP_BYTES`].
const WAKEUP_CHECK_EVERY: u64 = 16;

/// Ring buffer commit flags: wake the reader only when enough data waits.
#[inline(always)]
pub fn wakeup_flags() -> u64 {
    if let Some(n) = WAKEUP_CHECKS.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, this program is the only writer on this CPU while it runs.
        let n = unsafe {
            *n += 1;
            *n
        };
        if n % WAKEUP_CHECK_EVERY != 0 {
            return u64::from(BPF_RB_NO_WAKEUP);
        }
    }
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

impl Event for ExchangeEvent {
    const KIND: EventKind = EventKind::Exchange;
    fn header_mut(&mut self) -> &mut EventHeader {
        &mut self.header
    }
}

impl Event for ExchangeRecord {
    const KIND: EventKind = EventKind::Exchange;
    fn header_mut(&mut self) -> &mut EventHeader {
        &mut self.event.header
    }
}

impl Event for DataScratch {
    const KIND: EventKind = EventKind::Data;
    fn header_mut(&mut self) -> &mut EventHeader {
        &mut self.event.header
    }
}

/// Sets what every event's header says, whichever way it is sent.
#[inline(always)]
fn stamp<T: Event>(ev: &mut T, timestamp_ns: u64, cookie: u64) {
    let h = ev.header_mut();
    h.kind = T::KIND as u32;
    // SAFETY: no arguments; valid in every program type.
    h.cpu = unsafe { bpf_get_smp_processor_id() };
    h.timestamp_ns = timestamp_ns;
    h.socket_cookie = cookie;
}

/// Copies the first `size` bytes of `record` (at most its size) into the ring buffer, its header
/// stamped as [`reserve`] stamps it. False (and a [`Counter::RingbufFull`]) when the buffer is
/// full: the event is lost, never waited for.
#[inline(always)]
pub fn output<T: Event>(record: &mut T, size: u64, timestamp_ns: u64, cookie: u64) -> bool {
    stamp(record, timestamp_ns, cookie);
    let size = size.min(size_of::<T>() as u64);
    // SAFETY: `record` is `size_of::<T>()` readable bytes (at least `size`); EVENTS is a ring
    // buffer map.
    let rc = unsafe {
        bpf_ringbuf_output(
            (&raw const EVENTS).cast_mut().cast(),
            core::ptr::from_mut(record).cast(),
            size,
            wakeup_flags(),
        )
    };
    if rc < 0 {
        count(Counter::RingbufFull);
        false
    } else {
        count(Counter::EventsSent);
        true
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
        stamp(&mut *ev, timestamp_ns, cookie);
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
