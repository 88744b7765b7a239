//! The agent's kernel event decoding (`hopwatch::events::decode`) and everything after it in the
//! pipeline: connection table, L7 sessions and parsers, flow building, the JSON printer.
//!
//! The ring buffer is written by hopwatch's own programs, but a version mismatch, a kernel that
//! fills a field differently or an event stream cut by losses must never bring the agent down.
//!
//! Input layout: records, each a little-endian `u16` length and that many bytes (the last one
//! cut short if the input ends), decoded and fed to one pipeline in order.
#![no_main]

use std::time::Duration;

use hopwatch::{
    drops::DropReasons,
    events::decode,
    flow::{Clock, FlowBuilder},
    output::{self, Format},
    pipeline::{Pipeline, PipelineOptions},
    proto::{
        flow::Flow,
        observer::{GetFlowsResponse, get_flows_response::ResponseTypes},
    },
    protocols::Redaction,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let builder = FlowBuilder {
        node_name: "fuzz".to_owned(),
        clock: Clock::now(),
        reasons: DropReasons::empty(),
        symbols: None,
    };
    let keep_full_statements = data.first().is_some_and(|b| b & 0x80 != 0);
    let mut pipeline = Pipeline::new(
        builder,
        PipelineOptions {
            l7_timeout: Duration::from_secs(30),
            redaction: Redaction { keep_full_statements },
        },
    );
    let mut flows = Vec::new();
    let mut out = Vec::new();
    let mut rest = data;
    while let [lo, hi, tail @ ..] = rest {
        let len = usize::from(u16::from_le_bytes([*lo, *hi])).min(tail.len());
        let (record, next) = tail.split_at(len);
        rest = next;
        if let Ok(event) = decode(record) {
            pipeline.on_event(&event, &mut flows);
        }
        print(&mut flows, &mut out);
    }
    // Everything still open times out and is reported; idle connections are forgotten.
    pipeline.tick(Clock::monotonic_now_ns().saturating_add(2 * 3_600_000_000_000), &mut flows);
    print(&mut flows, &mut out);
});

/// Prints flows as `hopwatch agent -o json` does (a `Vec` never fails to take them).
fn print(flows: &mut Vec<Flow>, out: &mut Vec<u8>) {
    for flow in flows.drain(..) {
        let mut resp = GetFlowsResponse {
            time: flow.time,
            node_name: "fuzz".to_owned(),
            response_types: Some(ResponseTypes::Flow(flow)),
        };
        output::write(out, Format::Json, &mut resp).expect("writing to memory");
        output::write(out, Format::Compact, &mut resp).expect("writing to memory");
        out.clear();
    }
}
