//! Connections whose close was lost (a full ring buffer): forgotten once the kernel's
//! connection map no longer has them.

use std::time::Duration;

use super::PipelineStats;
use crate::{flow::Clock, loader, loss::Loss, pipeline::Pipeline};

/// After the kernel lost events (and now and then regardless), the connections the kernel no
/// longer tracks are forgotten: a lost close would otherwise keep its connection, and its room,
/// for an hour.
pub(super) struct GoneCheck {
    conns: loader::conns::KernelConns,
    lost_seen: u64,
    last_ns: u64,
    /// The last check forgot something.
    found: bool,
}

impl GoneCheck {
    /// Soonest check after a loss, and the longest time between checks.
    const AFTER_LOSS: Duration = Duration::from_secs(5);
    const EVERY: Duration = Duration::from_mins(5);

    pub(super) fn new(conns: loader::conns::KernelConns) -> Self {
        Self { conns, lost_seen: 0, last_ns: Clock::monotonic_now_ns(), found: false }
    }

    pub(super) fn run(
        &mut self,
        pipeline: &mut Pipeline,
        stats: &PipelineStats,
        flows: &mut Vec<hopwatch_proto::flow::Flow>,
    ) {
        let now = Clock::monotonic_now_ns();
        let since = Duration::from_nanos(now.saturating_sub(self.last_ns));
        let lost = stats.losses.total(Loss::KernelRingBuffer);
        // Again after a check that found some: flows of those connections may still have been
        // on their way (held for their names) and opened them anew in the hops.
        let again = self.found && since >= Self::AFTER_LOSS;
        if !((lost > self.lost_seen && since >= Self::AFTER_LOSS) || again || since >= Self::EVERY)
        {
            return;
        }
        self.lost_seen = lost;
        self.last_ns = now;
        let alive = |cookie| self.conns.tracks(cookie);
        let gone = pipeline.forget_gone(now, alive, flows);
        let in_hops = stats.metrics.forget_gone_sockets(&pipeline.builder().node_name, alive);
        self.found = gone + in_hops > 0;
        if self.found {
            tracing::info!(connections = gone, in_hops, "forgot connections whose close was lost");
        }
    }
}
