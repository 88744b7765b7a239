//! The agent's kernel event decoding and everything after it in the pipeline: connection table,
//! L7 sessions and parsers, flow building, the JSON and compact printers.
//!
//! The ring buffer is written by hopwatch's own programs, but a version mismatch, a kernel that
//! fills a field differently or an event stream cut by losses must never bring the agent down.
//!
//! Input layout: records, each a little-endian `u16` length and that many bytes (the last one
//! cut short if the input ends), decoded and fed to one pipeline in order.
#![no_main]

use std::time::Duration;

use hopwatch::harness::{
    Clock, DropReasons, FastPath, FlowBuilder, Format, PROPAGATED_HEADERS, Pipeline,
    PipelineOptions, PrintOptions, Printer, TrustedProxies, decode,
};
use hopwatch_proto::{
    flow::Flow,
    observer::{GetFlowsResponse, get_flows_response::ResponseTypes},
};
use hopwatch_protocols::Redaction;
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
            fast_path: FastPath::ALL,
            tracing: true,
            trace_headers: PROPAGATED_HEADERS.to_vec(),
            // Every peer trusted: every request's forwarding headers are parsed.
            trusted_proxies: TrustedProxies::everyone(),
        },
    );
    let mut flows = Vec::new();
    let printer = |format| Printer::new(Vec::new(), PrintOptions::streaming(format));
    let mut out = [printer(Format::Json), printer(Format::Compact)];
    let mut rest = data;
    while let [lo, hi, tail @ ..] = rest {
        let len = usize::from(u16::from_le_bytes([*lo, *hi])).min(tail.len());
        let (record, next) = tail.split_at(len);
        rest = next;
        if let Ok(event) = decode(record) {
            pipeline.on_event(&event, &mut flows);
            let _ = pipeline.take_counted().count();
            let _ = pipeline.take_promotions();
        }
        print(&mut flows, &mut out);
    }
    // Everything still open times out and is reported; idle connections are forgotten.
    pipeline.tick(Clock::monotonic_now_ns().saturating_add(2 * 3_600_000_000_000), &mut flows);
    print(&mut flows, &mut out);
});

/// Prints flows as `hopwatch agent -o json` and `-o compact` do (a `Vec` never fails to take
/// them).
fn print(flows: &mut Vec<Flow>, out: &mut [Printer<Vec<u8>>; 2]) {
    for flow in flows.drain(..) {
        let mut resp = GetFlowsResponse {
            time: flow.time,
            node_name: "fuzz".to_owned(),
            response_types: Some(ResponseTypes::Flow(flow)),
        };
        for printer in out.iter_mut() {
            printer.write(&mut resp).expect("writing to memory");
            printer.flush().expect("writing to memory");
        }
    }
}
