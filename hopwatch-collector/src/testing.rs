//! What tests of the collector and of its clients (the agent's link) need: hubs in memory or on
//! disk, the gRPC APIs served over in-memory pipes (`tokio::io::duplex`, no ports), flows.

use std::{sync::Arc, time::Duration};

pub use hopwatch_proto::clock::now_ns;
use hopwatch_proto::{
    flow::{Flow, Layer4, Tcp, Verdict, layer4},
    hopwatch::v1::ingest_server::IngestServer,
    observer::{
        GetFlowsResponse, get_flows_response::ResponseTypes, observer_server::ObserverServer,
    },
};
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint, Server};

use crate::{
    hub::{Hub, HubConfig},
    ingest::IngestService,
    merge::MergeConfig,
    observer::ObserverService,
    store::{StoreConfig, disk::DiskConfig},
};

pub const SEC: i64 = 1_000_000_000;

pub fn ts(ns: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: ns / SEC, nanos: i32::try_from(ns % SEC).unwrap() }
}

/// A TCP flow from `node` at `time_ns` to port `port`; its uuid says where it came from.
pub fn flow(node: &str, time_ns: i64, port: u32, verdict: Verdict) -> GetFlowsResponse {
    GetFlowsResponse {
        time: Some(ts(time_ns)),
        node_name: node.to_owned(),
        response_types: Some(ResponseTypes::Flow(Flow {
            time: Some(ts(time_ns)),
            uuid: format!("{node}/{time_ns}/{port}"),
            verdict: verdict.into(),
            node_name: node.to_owned(),
            l4: Some(Layer4 {
                protocol: Some(layer4::Protocol::Tcp(Tcp {
                    source_port: 40_000,
                    destination_port: port,
                    flags: None,
                })),
            }),
            ..Default::default()
        })),
    }
}

pub fn memory_hub(window: Duration) -> Arc<Hub> {
    Hub::start(&HubConfig {
        store: StoreConfig { memory_flows: 65_536, disk: None },
        merge: MergeConfig { window, max_pending: 1 << 20 },
    })
    .expect("memory hub")
}

pub fn disk_hub(dir: &std::path::Path, memory_flows: usize, window: Duration) -> Arc<Hub> {
    Hub::start(&HubConfig {
        store: StoreConfig {
            memory_flows,
            disk: Some(DiskConfig {
                dir: dir.to_owned(),
                max_bytes: 1 << 30,
                max_age: Duration::from_hours(24),
                fsync_interval: Duration::from_secs(1),
            }),
        },
        merge: MergeConfig { window, max_pending: 1 << 20 },
    })
    .expect("disk hub")
}

/// Serves the hub's gRPC APIs over in-memory pipes; every `connect` opens a new pipe.
pub struct Pipe {
    conns: mpsc::UnboundedSender<tokio::io::DuplexStream>,
    server: tokio::task::JoinHandle<()>,
}

impl Pipe {
    pub fn serve(hub: Arc<Hub>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel::<tokio::io::DuplexStream>();
        let incoming = tokio_stream::StreamExt::map(
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
            Ok::<_, std::io::Error>,
        );
        let server = tokio::spawn(async move {
            Server::builder()
                .add_service(ObserverServer::new(ObserverService::new(hub.clone())))
                .add_service(IngestServer::new(IngestService::new(hub, false)))
                .serve_with_incoming(incoming)
                .await
                .expect("in-process server");
        });
        Self { conns: tx, server }
    }

    pub async fn connect(&self) -> Result<Channel, tonic::transport::Error> {
        let conns = self.conns.clone();
        Endpoint::from_static("http://in-process.test")
            .connect_with_connector(tower::service_fn(move |_| {
                let (client, server) = tokio::io::duplex(1 << 20);
                let sent = conns.send(server);
                async move {
                    sent.map_err(|_| std::io::Error::other("in-process server stopped"))?;
                    Ok::<_, std::io::Error>(TokioIo::new(client))
                }
            }))
            .await
    }

    /// Stops accepting and drops every open connection (a collector that went away).
    pub fn stop(&self) {
        self.server.abort();
    }
}

/// Every response of a (non-following) `GetFlows` call.
pub async fn get_flows(
    ch: Channel,
    req: hopwatch_proto::observer::GetFlowsRequest,
) -> Result<Vec<GetFlowsResponse>, tonic::Status> {
    let mut client = hopwatch_proto::observer::observer_client::ObserverClient::new(ch);
    let mut stream = client.get_flows(req).await?.into_inner();
    let mut out = Vec::new();
    while let Some(r) = stream.message().await? {
        out.push(r);
    }
    Ok(out)
}

/// The flows (not notices) of a response list.
pub fn flows(resps: &[GetFlowsResponse]) -> Vec<&Flow> {
    resps
        .iter()
        .filter_map(|r| match &r.response_types {
            Some(ResponseTypes::Flow(f)) => Some(f),
            _ => None,
        })
        .collect()
}

pub fn time_of(f: &Flow) -> i64 {
    let t = f.time.unwrap();
    t.seconds * SEC + i64::from(t.nanos)
}
