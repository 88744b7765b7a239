//! `observer.Observer`, Hubble's query API, served from the collector's store.

use std::sync::Arc;

use hopwatch_proto::observer::{
    GetFlowsRequest, GetFlowsResponse, GetNodesRequest, GetNodesResponse, ServerStatusRequest,
    ServerStatusResponse, observer_server::Observer,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{
    hub::{Hub, version},
    query::{self, Query},
};

/// Responses buffered per `GetFlows` stream; a slow client makes its reader wait (it then
/// catches up from memory or the history, or is told how many events it missed).
const STREAM_BUFFER: usize = 1024;

pub struct ObserverService {
    hub: Arc<Hub>,
}

impl ObserverService {
    pub fn new(hub: Arc<Hub>) -> Self {
        Self { hub }
    }
}

#[tonic::async_trait]
impl Observer for ObserverService {
    type GetFlowsStream = ReceiverStream<Result<GetFlowsResponse, Status>>;

    async fn get_flows(
        &self,
        request: Request<GetFlowsRequest>,
    ) -> Result<Response<Self::GetFlowsStream>, Status> {
        let q = Query::joined(request.into_inner(), &self.hub.traces)?;
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        tokio::spawn(query::run(self.hub.clone(), q, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_nodes(
        &self,
        _request: Request<GetNodesRequest>,
    ) -> Result<Response<GetNodesResponse>, Status> {
        let cap = self.hub.store.stats().capacity;
        Ok(Response::new(GetNodesResponse { nodes: self.hub.nodes.nodes(cap) }))
    }

    async fn server_status(
        &self,
        _request: Request<ServerStatusRequest>,
    ) -> Result<Response<ServerStatusResponse>, Status> {
        let stats = self.hub.store.stats();
        let (up, down) = self.hub.nodes.split();
        Ok(Response::new(ServerStatusResponse {
            num_flows: stats.held,
            max_flows: stats.capacity,
            seen_flows: stats.seen,
            uptime_ns: u64::try_from(self.hub.started.elapsed().as_nanos()).unwrap_or(u64::MAX),
            num_connected_nodes: Some(u32::try_from(up.len()).unwrap_or(u32::MAX)),
            num_unavailable_nodes: Some(u32::try_from(down.len()).unwrap_or(u32::MAX)),
            unavailable_nodes: down,
            version: version(),
            // Flows the ClickHouse write queue had no room for are not recorded either.
            flows_not_recorded: self.hub.nodes.not_recorded()
                + self.hub.clickhouse.as_ref().map_or(0, |c| c.dropped()),
        }))
    }
}
