//! Where `hopwatch hops` gets its flows: JSON flow lines (a file, a growing file, standard input)
//! or a collector's `GetFlows`.

use std::{
    io::BufRead,
    path::PathBuf,
    sync::{LazyLock, mpsc},
    time::Duration,
};

use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage};

use super::{FOLLOW_POLL, HopsArgs, HopsError};
use crate::{
    proto::{
        flow::{Flow, FlowFilter},
        observer::{
            GetFlowsRequest, GetFlowsResponse, get_flows_response::ResponseTypes,
            observer_client::ObserverClient,
        },
    },
    tls::{ClientFlags, ClientTls, Target, explain},
};

/// How to reach the collector (the flags of `hopwatch observe`).
#[derive(Debug, Clone, clap::Args)]
pub struct Connection {
    /// Use TLS to the server (implied by https://).
    #[arg(long)]
    pub tls: bool,
    /// CA certificate(s) that signed the server's certificate (PEM).
    #[arg(long, value_name = "PEM")]
    pub tls_ca_cert_files: Option<PathBuf>,
    /// Client certificate for mutual TLS (PEM).
    #[arg(long, value_name = "PEM")]
    pub tls_client_cert_file: Option<PathBuf>,
    /// Client private key for mutual TLS (PEM).
    #[arg(long, value_name = "PEM")]
    pub tls_client_key_file: Option<PathBuf>,
    /// Name expected in the server's certificate [default: the server's host].
    #[arg(long)]
    pub tls_server_name: Option<String>,
    /// Allow plaintext to a server that is not on loopback.
    #[arg(long)]
    pub allow_plaintext: bool,
    /// Give up connecting after this long.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// The `GetFlows` request for `args`: every flow since `since_ns` (following with `--watch`).
/// Only `-n` is also asked of the server: a flow is in a namespace exactly when its hop is.
/// `--pod` and `--to-port` stay client side: they match what a hop is named and which port it
/// serves, which a flow filter cannot see (a hop may be named by process; a dropped reply
/// travels to the client's port).
#[must_use]
pub fn request(args: &HopsArgs, since_ns: u64) -> GetFlowsRequest {
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

/// Connects to the collector and asks for the flows (errors here are the user's to fix: bad
/// address, TLS, unreachable server).
pub async fn query(
    args: &HopsArgs,
    since_ns: u64,
) -> Result<tonic::Streaming<GetFlowsResponse>, HopsError> {
    let c = &args.connection;
    let tls = ClientTls {
        ca: c.tls_ca_cert_files.clone(),
        cert: c.tls_client_cert_file.clone(),
        key: c.tls_client_key_file.clone(),
        server_name: c.tls_server_name.clone(),
        flags: ClientFlags {
            ca: "--tls-ca-cert-files",
            cert: "--tls-client-cert-file",
            key: "--tls-client-key-file",
        },
    };
    let target = Target::parse(&args.server, c.tls)
        .map_err(|e| HopsError::Usage(format!("--server: {e}")))?;
    let endpoint = target
        .endpoint(&tls, c.allow_plaintext)
        .map_err(|e| HopsError::Usage(e.to_string()))?
        .connect_timeout(c.timeout);
    let channel = endpoint.connect().await.map_err(|e| {
        HopsError::Server(format!("cannot connect to {}: {}", target.uri, explain(&e)))
    })?;
    let mut client = ObserverClient::new(channel).max_decoding_message_size(32 << 20);
    let req = request(args, since_ns);
    match client.get_flows(req).await {
        Ok(r) => Ok(r.into_inner()),
        Err(s) if s.code() == tonic::Code::InvalidArgument => {
            Err(HopsError::Usage(format!("the server rejected the request: {}", s.message())))
        }
        Err(s) => Err(HopsError::Server(format!("{}: {}", target.uri, explain(&s)))),
    }
}

/// Forwards the stream's flows into `tx` until it ends (or the table stops reading).
pub async fn pump(
    mut stream: tonic::Streaming<GetFlowsResponse>,
    server: String,
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
            Err(s) => return Err(HopsError::Server(format!("{server}: {}", explain(&s)))),
        }
    }
}

static DESCRIPTORS: LazyLock<DescriptorPool> = LazyLock::new(|| {
    DescriptorPool::decode(include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin")).as_ref())
        .expect("descriptor set generated by build.rs is valid")
});

/// One JSON line → a flow. Accepts a `GetFlowsResponse` (`{"flow": {...}}`, as `observe -o json`
/// and Hubble print it) or a bare flow; fields hopwatch does not model are ignored. `Ok(None)`
/// for a response that carries no flow (a lost-events or node notice).
pub fn flow_from_json(line: &str) -> Result<Option<Flow>, String> {
    let opts = DeserializeOptions::new().deny_unknown_fields(false);
    let value: serde_json::Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
    let is_response = ["flow", "lost_events", "node_status"].iter().any(|k| value.get(k).is_some());
    let name = if is_response { GetFlowsResponse::FULL_NAME } else { "flow.Flow" };
    let desc = DESCRIPTORS.get_message_by_name(name).expect("message is in proto/");
    let msg =
        DynamicMessage::deserialize_with_options(desc, value, &opts).map_err(|e| e.to_string())?;
    if is_response {
        let resp: GetFlowsResponse = msg.transcode_to().map_err(|e| e.to_string())?;
        Ok(match resp.response_types {
            Some(crate::proto::observer::get_flows_response::ResponseTypes::Flow(f)) => Some(f),
            _ => None,
        })
    } else {
        msg.transcode_to().map(Some).map_err(|e| e.to_string())
    }
}

/// Reads JSON flow lines into `tx` (at the end, waits for more when `follow`).
pub fn read_lines(
    mut reader: Box<dyn BufRead + Send>,
    name: &str,
    follow: bool,
    tx: &mpsc::SyncSender<Flow>,
) -> Result<(), HopsError> {
    let io_err = |source| HopsError::Input { path: name.to_owned(), source };
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
        match flow_from_json(line.trim()) {
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
