//! The one way a loss becomes visible on the wire: a Hubble `LostEvent` notice in the flow
//! stream. Whoever drops events counts them and calls [`notice`] with the count not reported
//! yet; printers, the collector's history and `observe` then carry it like any flow. (The
//! agent counts, logs and reports its losses in one place, `hopwatch::loss`.)

use crate::{
    clock::now_ns,
    flow::{LostEvent, LostEventSource},
    observer::{GetFlowsResponse, get_flows_response::ResponseTypes},
};

/// A `LostEvent` notice for `n` events of `source` lost on `node` (empty: the collector's own),
/// stamped now.
#[must_use]
pub fn notice(node: &str, source: LostEventSource, n: u64) -> GetFlowsResponse {
    let ns = now_ns();
    GetFlowsResponse {
        time: Some(prost_types::Timestamp {
            seconds: ns.div_euclid(1_000_000_000),
            nanos: i32::try_from(ns.rem_euclid(1_000_000_000)).expect("below 1e9"),
        }),
        node_name: node.to_owned(),
        response_types: Some(ResponseTypes::LostEvents(LostEvent {
            source: source.into(),
            num_events_lost: n,
            cpu: None,
        })),
    }
}
