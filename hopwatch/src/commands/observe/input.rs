//! `observe --input-file`: the request's filters, time range, count and field mask applied to
//! flows read from JSON lines instead of a collector, in the order they are read (as `hubble
//! observe --input-file`).

use std::{
    collections::VecDeque,
    io::{BufRead, BufReader, Write},
    path::Path,
};

use hopwatch_collector::filter::FilterSet;
use hopwatch_proto::{
    FieldMask, flow,
    observer::{GetFlowsRequest, GetFlowsResponse, get_flows_response::ResponseTypes},
};

use super::ObserveError;
use crate::print::Printer;

fn ts_ns(t: &prost_types::Timestamp) -> i128 {
    i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos)
}

/// Reads `path` (`-`: standard input) and prints the flows `req` selects. A line that is not a
/// flow is skipped with a warning on standard error (none with `quiet`).
pub(super) fn replay<W: Write>(
    path: &Path,
    req: &GetFlowsRequest,
    quiet: bool,
    printer: &mut Printer<W>,
) -> Result<(), ObserveError> {
    let name = if path == Path::new("-") {
        "standard input".to_owned()
    } else {
        path.display().to_string()
    };
    let input_error = |source| ObserveError::Input { name: name.clone(), source };
    let reader: Box<dyn BufRead> = if path == Path::new("-") {
        Box::new(BufReader::new(std::io::stdin().lock()))
    } else {
        Box::new(BufReader::new(std::fs::File::open(path).map_err(input_error)?))
    };
    let filters = FilterSet::new(&req.whitelist, &req.blacklist)
        .expect("the filters were checked when the request was built");
    let mask = FieldMask::lenient(req.field_mask.as_ref().map_or(&[][..], |m| &m.paths[..]));
    let (since, until) = (req.since.as_ref().map(ts_ns), req.until.as_ref().map(ts_ns));
    let wanted = |f: &flow::Flow| {
        let t = f.time.as_ref().map_or(0, ts_ns);
        since.is_none_or(|s| t >= s) && until.is_none_or(|u| t <= u) && filters.matches(f)
    };
    let all = req.number == 0 || req.number == u64::MAX;
    let keep_last = !req.first && !all;
    let mut last: VecDeque<flow::Flow> = VecDeque::new();
    let mut sent = 0u64;
    let mut print = |f: &flow::Flow| {
        let mut resp = GetFlowsResponse {
            node_name: f.node_name.clone(),
            time: f.time,
            response_types: Some(ResponseTypes::Flow(mask.apply(f))),
        };
        printer.write(&mut resp).map_err(ObserveError::Stdout)
    };
    for (n, line) in reader.lines().enumerate() {
        let line = line.map_err(input_error)?;
        if line.trim().is_empty() {
            continue;
        }
        let flow = match hopwatch_proto::flow_from_json(&line) {
            Ok(Some(f)) => f,
            Ok(None) => continue,
            Err(e) => {
                if !quiet {
                    eprintln!("hopwatch observe: warning: {name} line {}: {e}; skipped", n + 1);
                }
                continue;
            }
        };
        if !wanted(&flow) {
            continue;
        }
        if keep_last {
            if last.len() as u64 == req.number {
                last.pop_front();
            }
            last.push_back(flow);
            continue;
        }
        print(&flow)?;
        sent += 1;
        if req.first && !all && sent >= req.number {
            return Ok(());
        }
    }
    last.iter().try_for_each(print)
}
