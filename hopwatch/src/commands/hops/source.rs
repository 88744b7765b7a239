//! Where `hopwatch hops` gets its flows: JSON flow lines (a file, a growing file, standard input)
//! or a collector's `GetFlows`.

use std::{io::BufRead, path::Path, sync::mpsc};

use hopwatch_proto::{
    flow::{Flow, FlowFilter},
    observer::{GetFlowsRequest, GetFlowsResponse, get_flows_response::ResponseTypes},
};

use super::{FOLLOW_POLL, HopsArgs, HopsError, input_name};
use crate::commands::observe::ServerError;

/// The `GetFlows` request for `args`: every flow since `since_ns` (following with `--watch`).
/// Only `-n` is also asked of the server: a flow is in a namespace exactly when its hop is.
/// `--pod` and `--to-port` stay client side: they match what a hop is named and which port it
/// serves, which a flow filter cannot see (a hop may be named by process; a dropped reply
/// travels to the client's port).
#[must_use]
pub(super) fn request(args: &HopsArgs, since_ns: u64) -> GetFlowsRequest {
    let whitelist = if args.namespaces.is_empty() {
        Vec::new()
    } else {
        let prefixes: Vec<String> = args.namespaces.iter().map(|n| format!("{n}/")).collect();
        vec![
            FlowFilter { source_pod: prefixes.clone(), ..FlowFilter::default() },
            FlowFilter { destination_pod: prefixes, ..FlowFilter::default() },
        ]
    };
    GetFlowsRequest {
        // Every stored flow of the window (0 would mean none with `follow`).
        number: u64::MAX,
        follow: args.watch.is_some(),
        whitelist,
        since: Some(prost_types::Timestamp {
            seconds: i64::try_from(since_ns / 1_000_000_000).unwrap_or(i64::MAX),
            nanos: i32::try_from(since_ns % 1_000_000_000).unwrap_or(0),
        }),
        ..GetFlowsRequest::default()
    }
}

/// Connects to the collector and asks for the flows: the collector's URI (for messages) and the
/// stream.
pub(super) async fn query(
    args: &HopsArgs,
    since_ns: u64,
) -> Result<(String, tonic::Streaming<GetFlowsResponse>), HopsError> {
    let (uri, mut client) = args.connection.client(&args.server).await?;
    let req = request(args, since_ns);
    match client.get_flows(req).await {
        Ok(r) => Ok((uri, r.into_inner())),
        Err(s) => Err(ServerError::status(&uri, s).into()),
    }
}

/// Forwards the stream's flows into `tx` until it ends (or the table stops reading).
pub(super) async fn pump(
    mut stream: tonic::Streaming<GetFlowsResponse>,
    uri: String,
    tx: mpsc::SyncSender<Flow>,
) -> Result<(), HopsError> {
    let mut lost = 0u64;
    loop {
        match stream.message().await {
            Ok(Some(resp)) => match resp.response_types {
                Some(ResponseTypes::Flow(f)) => {
                    // The table drains the queue on another thread; a full queue waits for it.
                    // A closed queue means the table stopped reading: nothing more to fetch.
                    let gone = tokio::task::block_in_place(|| tx.send(f).is_err());
                    if gone {
                        return Ok(());
                    }
                }
                Some(ResponseTypes::LostEvents(l)) => {
                    lost += l.num_events_lost;
                    eprintln!(
                        "hopwatch hops: {} {} events lost upstream ({lost} so far): the table \
                         undercounts",
                        l.num_events_lost,
                        l.source().as_str_name()
                    );
                }
                _ => {}
            },
            Ok(None) => return Ok(()),
            Err(s) => return Err(ServerError::status(&uri, s).into()),
        }
    }
}

/// Reads JSON flow lines into `tx` (at the end, waits for more when `follow`).
pub(super) fn read_lines(
    mut reader: Box<dyn BufRead + Send>,
    input: &Path,
    follow: bool,
    tx: &mpsc::SyncSender<Flow>,
) -> Result<(), HopsError> {
    let io_err = |source| HopsError::Input { path: input.to_owned(), source };
    let name = input_name(input);
    let (mut line, mut n, mut bad) = (String::new(), 0u64, 0u64);
    loop {
        line.clear();
        let read = reader.read_line(&mut line).map_err(io_err)?;
        if read == 0 {
            if follow {
                std::thread::sleep(FOLLOW_POLL);
                continue;
            }
            break;
        }
        n += 1;
        if line.trim().is_empty() {
            continue;
        }
        match hopwatch_proto::flow_from_json(line.trim()) {
            Ok(Some(f)) => {
                if tx.send(f).is_err() {
                    break;
                }
            }
            Ok(None) => {}
            Err(e) => {
                bad += 1;
                if bad == 1 {
                    eprintln!(
                        "hopwatch hops: {name} line {n} is not a flow ({e}); skipping such lines"
                    );
                }
            }
        }
    }
    if bad > 0 {
        eprintln!("hopwatch hops: {bad} of {n} lines of {name} were not flows and were skipped");
    }
    Ok(())
}
