//! Where the agent can lose events, and the one way each loss is handled: counted here (the
//! running totals that `/metrics`, the exit line and the notices all read, so they agree
//! exactly), logged once per report (a warning per second at most, never per event), and turned
//! into a Hubble `LostEvent` notice in the flow stream ([`hopwatch_proto::lost::notice`]).
//!
//! The collector queue (`sink::queue`) reports its own drops in band, inside the queue it
//! drops from, with the same notice.

use std::sync::atomic::{AtomicU64, Ordering};

use hopwatch_proto::{flow::LostEventSource, lost, observer::GetFlowsResponse};

/// A place where the agent's events can be lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Loss {
    /// The kernel's ring buffer was full (counted by the kernel programs).
    KernelRingBuffer,
    /// The printer fell behind and its queue was full (newest dropped).
    OutputQueue,
}

impl Loss {
    const ALL: [Loss; 2] = [Loss::KernelRingBuffer, Loss::OutputQueue];

    /// Hubble's name for the place.
    pub(crate) fn source(self) -> LostEventSource {
        match self {
            Loss::KernelRingBuffer => LostEventSource::PerfEventRingBuffer,
            Loss::OutputQueue => LostEventSource::ObserverEventsQueue,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Running totals per place, and how much of each was already reported.
#[derive(Debug, Default)]
pub(crate) struct Losses {
    counted: [AtomicU64; 2],
    reported: [AtomicU64; 2],
}

impl Losses {
    /// `n` more events lost at `at` (hot path: one relaxed add).
    pub(crate) fn count(&self, at: Loss, n: u64) {
        self.counted[at.index()].fetch_add(n, Ordering::Relaxed);
    }

    /// The kernel keeps its own running total of `at`: ours follows it.
    pub(crate) fn follow_total(&self, at: Loss, total: u64) {
        self.counted[at.index()].fetch_max(total, Ordering::Relaxed);
    }

    /// Everything lost at `at` since the agent started.
    pub(crate) fn total(&self, at: Loss) -> u64 {
        self.counted[at.index()].load(Ordering::Relaxed)
    }

    /// A notice (logged) for each place that lost events since its last report.
    pub(crate) fn reports(&self, node: &str) -> Vec<GetFlowsResponse> {
        let mut out = Vec::new();
        for at in Loss::ALL {
            let total = self.total(at);
            let before = self.reported[at.index()].swap(total, Ordering::Relaxed);
            if total > before {
                let n = total - before;
                tracing::warn!(source = at.source().as_str_name(), lost = n, "events lost");
                out.push(lost::notice(node, at.source(), n));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use hopwatch_proto::observer::get_flows_response::ResponseTypes;

    use super::*;

    fn lost_in(notices: &[GetFlowsResponse]) -> Vec<(LostEventSource, u64)> {
        notices
            .iter()
            .map(|r| match &r.response_types {
                Some(ResponseTypes::LostEvents(l)) => (l.source(), l.num_events_lost),
                other => panic!("not a notice: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn each_loss_is_reported_once_and_the_totals_add_up() {
        let l = Losses::default();
        assert!(l.reports("n").is_empty());
        l.count(Loss::OutputQueue, 3);
        l.follow_total(Loss::KernelRingBuffer, 10);
        l.follow_total(Loss::KernelRingBuffer, 7); // a stale read never goes back
        assert_eq!(
            lost_in(&l.reports("n")),
            [(LostEventSource::PerfEventRingBuffer, 10), (LostEventSource::ObserverEventsQueue, 3)]
        );
        assert!(l.reports("n").is_empty(), "nothing new, nothing reported");
        l.count(Loss::OutputQueue, 2);
        assert_eq!(lost_in(&l.reports("n")), [(LostEventSource::ObserverEventsQueue, 2)]);
        assert_eq!((l.total(Loss::KernelRingBuffer), l.total(Loss::OutputQueue)), (10, 5));
    }
}
