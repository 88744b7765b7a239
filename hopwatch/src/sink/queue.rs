//! The agent's bounded queue of events for the collector.
//!
//! Every event that enters gets the next sequence number and stays until the collector
//! acknowledges it (so it can be resent after a reconnection). When the queue is full, the
//! newest event is dropped and counted; the count goes out as a `LostEvent`
//! (`OBSERVER_EVENTS_QUEUE`) as soon as there is room, so nothing is lost silently.

use std::{
    collections::VecDeque,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use hopwatch_proto::{
    compact::Compact as _,
    flow::LostEventSource,
    hopwatch::v1::AgentStatus,
    lost,
    observer::{GetFlowsResponse, get_flows_response::ResponseTypes},
};
use tokio::sync::Notify;

#[derive(Debug, Default)]
struct Inner {
    /// Events with sequence numbers `first_seq ..`. An event is 1.5 kB in place (a decoded flow's
    /// strings and options), so room a burst made is given back once the queue is mostly empty
    /// (8192 slots are 12 MiB).
    items: VecDeque<GetFlowsResponse>,
    first_seq: u64,
    /// Sequence number of the next event to send (events before it are in flight).
    next_send: u64,
    /// Dropped events not yet reported in a notice.
    unreported: u64,
    closed: bool,
}

#[derive(Debug)]
pub struct Queue {
    inner: Mutex<Inner>,
    cap: usize,
    node_name: String,
    pub notify: Notify,
    offered: AtomicU64,
    dropped: AtomicU64,
    kernel_lost: AtomicU64,
    not_recorded: AtomicU64,
}

/// Events to send, numbered from `first_seq`.
#[derive(Debug)]
pub struct Outgoing {
    pub first_seq: u64,
    pub events: Vec<GetFlowsResponse>,
}

impl Queue {
    pub fn new(cap: usize, node_name: &str) -> Self {
        Self {
            inner: Mutex::new(Inner { first_seq: 1, next_send: 1, ..Inner::default() }),
            cap: cap.max(2),
            node_name: node_name.to_owned(),
            notify: Notify::new(),
            offered: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            kernel_lost: AtomicU64::new(0),
            not_recorded: AtomicU64::new(0),
        }
    }

    /// Adds an event; drops it (counted) when the queue is full. Never blocks on the collector.
    pub fn offer(&self, resp: GetFlowsResponse) {
        self.offered.fetch_add(1, Ordering::Relaxed);
        if let Some(ResponseTypes::LostEvents(l)) = &resp.response_types
            && l.source() == LostEventSource::PerfEventRingBuffer
        {
            self.kernel_lost.fetch_add(l.num_events_lost, Ordering::Relaxed);
        }
        {
            let mut q = self.inner.lock().expect("queue lock");
            if q.closed {
                return;
            }
            self.report_drops(&mut q);
            if q.items.len() >= self.cap {
                q.unreported += 1;
                drop(q);
                if self.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::warn!(
                        capacity = self.cap,
                        "collector queue full: dropping newest flows (counted, reported as lost events)"
                    );
                }
                return;
            }
            q.items.push_back(resp);
        }
        self.notify.notify_one();
    }

    /// Turns counted drops into a notice when there is room for it.
    fn report_drops(&self, q: &mut Inner) {
        if q.unreported > 0 && q.items.len() < self.cap {
            let notice =
                lost::notice(&self.node_name, LostEventSource::ObserverEventsQueue, q.unreported);
            q.items.push_back(notice);
            q.unreported = 0;
        }
    }

    /// Up to `max` events not sent yet (marking them in flight).
    pub fn take(&self, max: usize) -> Option<Outgoing> {
        let mut q = self.inner.lock().expect("queue lock");
        self.report_drops(&mut q);
        let start = usize::try_from(q.next_send - q.first_seq).expect("in-flight fits in memory");
        if start >= q.items.len() {
            return None;
        }
        let end = q.items.len().min(start + max);
        let events: Vec<_> = q.items.range(start..end).cloned().collect();
        let first_seq = q.next_send;
        q.next_send += events.len() as u64;
        Some(Outgoing { first_seq, events })
    }

    /// Up to `max` events, removed from the queue: for a collector in the same process, which
    /// has them once it is handed them (nothing to resend, so nothing to copy).
    pub fn pop(&self, max: usize) -> Option<Outgoing> {
        let mut q = self.inner.lock().expect("queue lock");
        self.report_drops(&mut q);
        debug_assert_eq!(q.next_send, q.first_seq, "pop is not mixed with take");
        if q.items.is_empty() {
            return None;
        }
        let n = q.items.len().min(max);
        let events: Vec<_> = q.items.drain(..n).collect();
        let first_seq = q.first_seq;
        q.first_seq += n as u64;
        q.next_send = q.first_seq;
        q.items.compact();
        // Room again: the count of what was dropped goes out next.
        self.report_drops(&mut q);
        Some(Outgoing { first_seq, events })
    }

    /// Unsent events waiting.
    pub fn unsent(&self) -> usize {
        let q = self.inner.lock().expect("queue lock");
        q.items.len() - usize::try_from(q.next_send - q.first_seq).expect("fits")
    }

    /// The collector stored everything through `seq`: forget it.
    pub fn ack(&self, seq: u64) {
        let mut q = self.inner.lock().expect("queue lock");
        while q.first_seq <= seq && q.items.pop_front().is_some() {
            q.first_seq += 1;
        }
        q.next_send = q.next_send.max(q.first_seq);
        q.items.compact();
        // Room again: the count of what was dropped goes out next.
        if q.unreported > 0 {
            self.report_drops(&mut q);
            drop(q);
            self.notify.notify_one();
        }
    }

    /// After a reconnection: the collector has everything through `resume_after`; everything
    /// after it is sent again.
    pub fn resume(&self, resume_after: u64) {
        self.ack(resume_after);
        let mut q = self.inner.lock().expect("queue lock");
        q.next_send = q.first_seq;
    }

    /// Highest sequence number handed out so far.
    pub fn last_seq(&self) -> u64 {
        let q = self.inner.lock().expect("queue lock");
        q.first_seq + q.items.len() as u64 - 1
    }

    /// Nothing waits for the collector, not even a count of dropped events.
    pub fn is_drained(&self) -> bool {
        let q = self.inner.lock().expect("queue lock");
        q.items.is_empty() && q.unreported == 0
    }

    /// No more events are accepted (shutdown).
    pub fn close(&self) {
        self.inner.lock().expect("queue lock").closed = true;
        self.notify.notify_one();
    }

    pub fn is_closed(&self) -> bool {
        self.inner.lock().expect("queue lock").closed
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The agent's running total of exchanges it did not record, for its status.
    pub fn set_not_recorded(&self, total: u64) {
        self.not_recorded.store(total, Ordering::Relaxed);
    }

    pub fn status(&self) -> AgentStatus {
        let len = self.inner.lock().expect("queue lock").items.len() as u64;
        AgentStatus {
            flows_seen: self.offered.load(Ordering::Relaxed),
            kernel_lost: self.kernel_lost.load(Ordering::Relaxed),
            queue_dropped: self.dropped.load(Ordering::Relaxed),
            queue_len: len,
            flows_not_recorded: self.not_recorded.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(n: u32) -> GetFlowsResponse {
        GetFlowsResponse { node_name: format!("{n}"), ..Default::default() }
    }

    #[test]
    fn sequence_numbers_acks_and_resume() {
        let q = Queue::new(10, "n");
        for i in 0..5 {
            q.offer(ev(i));
        }
        let a = q.take(3).unwrap();
        assert_eq!((a.first_seq, a.events.len()), (1, 3));
        let b = q.take(10).unwrap();
        assert_eq!((b.first_seq, b.events.len()), (4, 2));
        assert!(q.take(10).is_none());
        q.ack(2);
        // Reconnected; the collector says it has 3: resend 4 and 5.
        q.resume(3);
        let c = q.take(10).unwrap();
        assert_eq!(c.first_seq, 4);
        assert_eq!(c.events.iter().map(|e| e.node_name.as_str()).collect::<Vec<_>>(), ["3", "4"]);
        q.ack(5);
        assert!(q.is_drained());
    }

    #[test]
    fn pop_hands_events_over_in_order_and_reports_drops() {
        let q = Queue::new(3, "n");
        for i in 0..5 {
            q.offer(ev(i));
        }
        let a = q.pop(2).unwrap();
        assert_eq!(a.first_seq, 1);
        assert_eq!(a.events.iter().map(|e| e.node_name.as_str()).collect::<Vec<_>>(), ["0", "1"]);
        // Room again: the two dropped events are reported after what is left.
        let b = q.pop(10).unwrap();
        assert_eq!(b.first_seq, 3);
        assert_eq!(b.events[0].node_name, "2");
        let Some(ResponseTypes::LostEvents(l)) = &b.events[1].response_types else {
            panic!("expected a lost-event notice, got {:?}", b.events[1])
        };
        assert_eq!(l.num_events_lost, 2);
        assert!(q.pop(10).is_none());
        assert!(q.is_drained());
        assert_eq!(q.last_seq(), 4);
    }

    #[test]
    fn room_a_burst_made_is_given_back_once_handed_over_or_acknowledged() {
        let q = Queue::new(100_000, "n");
        let burst = |q: &Queue| (0..20_000).for_each(|i| q.offer(ev(i)));
        let capacity = |q: &Queue| q.inner.lock().unwrap().items.capacity();
        burst(&q);
        assert!(capacity(&q) >= 20_000);
        while q.pop(1000).is_some() {}
        assert!(capacity(&q) <= 1024, "after pop: {} slots kept", capacity(&q));
        burst(&q);
        let sent = q.take(usize::MAX).expect("events");
        q.ack(sent.first_seq + sent.events.len() as u64 - 1);
        assert!(capacity(&q) <= 1024, "after ack: {} slots kept", capacity(&q));
        assert!(q.is_drained());
    }

    #[test]
    fn overflow_is_counted_and_reported() {
        let q = Queue::new(4, "node-x");
        for i in 0..10 {
            q.offer(ev(i));
        }
        assert_eq!(q.dropped(), 6);
        let a = q.take(100).unwrap();
        assert_eq!(a.events.len(), 4, "the first four made it");
        q.ack(4);
        // Room again: the next take starts with a notice for the six dropped events.
        let b = q.take(100).unwrap();
        assert_eq!(b.first_seq, 5);
        let Some(ResponseTypes::LostEvents(l)) = &b.events[0].response_types else {
            panic!("expected a lost-event notice, got {:?}", b.events[0])
        };
        assert_eq!(l.num_events_lost, 6);
        assert_eq!(l.source(), LostEventSource::ObserverEventsQueue);
        assert_eq!(b.events[0].node_name, "node-x");
    }
}
