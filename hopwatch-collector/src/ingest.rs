//! `hopwatch.v1.Ingest`: agents stream batches in; the collector answers with where to resume
//! and with acknowledgements as their events are stored.

use std::{sync::Arc, time::Duration};

use hopwatch_proto::hopwatch::v1::{
    Ack, Batch, Hello, PushRequest, PushResponse, Welcome, ingest_server::Ingest, push_request,
    push_response,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{
    hub::{Hub, version},
    nodes::Connection,
};

/// After an agent closes its side, how long the collector keeps the stream open to send the
/// final acknowledgement.
const FINAL_ACK_WAIT: Duration = Duration::from_secs(10);
const MAX_NAME: usize = 253;

pub struct IngestService {
    hub: Arc<Hub>,
    tls: bool,
}

impl IngestService {
    pub fn new(hub: Arc<Hub>, tls: bool) -> Self {
        Self { hub, tls }
    }
}

/// What the service checks in an agent's Hello before anything else.
pub fn check_hello(h: &Hello) -> Result<(), Status> {
    if h.agent_id.is_empty() || h.agent_id.len() > MAX_NAME {
        return Err(Status::invalid_argument("hello: agent_id must be 1 to 253 bytes"));
    }
    if h.node_name.is_empty() || h.node_name.len() > MAX_NAME {
        return Err(Status::invalid_argument("hello: node_name must be 1 to 253 bytes"));
    }
    Ok(())
}

fn ack(seq: u64) -> PushResponse {
    PushResponse { message: Some(push_response::Message::Ack(Ack { stored_through: seq })) }
}

#[tonic::async_trait]
impl Ingest for IngestService {
    type PushStream = ReceiverStream<Result<PushResponse, Status>>;

    async fn push(
        &self,
        request: Request<Streaming<PushRequest>>,
    ) -> Result<Response<Self::PushStream>, Status> {
        let address = request.remote_addr().map_or_else(|| "unknown".to_owned(), |a| a.to_string());
        let mut stream = request.into_inner();
        let Some(push_request::Message::Hello(hello)) =
            stream.message().await?.and_then(|m| m.message)
        else {
            return Err(Status::invalid_argument("the first message must be a Hello"));
        };
        check_hello(&hello)?;
        let agent = self.hub.agent(&hello.agent_id, &hello.node_name);
        if agent.node_name != hello.node_name {
            return Err(Status::invalid_argument(format!(
                "agent {} was node {:?}; an agent id cannot change nodes",
                hello.agent_id, agent.node_name
            )));
        }
        let (tx, rx) = mpsc::channel(16);
        let welcome = PushResponse {
            message: Some(push_response::Message::Welcome(Welcome {
                resume_after: agent.stored_through(),
                version: version(),
            })),
        };
        tx.send(Ok(welcome)).await.map_err(|_| Status::cancelled("client left"))?;
        let conn = Connection {
            node_name: hello.node_name.clone(),
            version: hello.version.clone(),
            address,
            tls: self.tls.then(String::new),
            started: hello.started.and_then(|t| std::time::SystemTime::try_from(t).ok()),
        };
        self.hub.nodes.connected(&conn);
        let hub = self.hub.clone();
        tokio::spawn(async move {
            let why = serve(&hub, &agent, &mut stream, &tx).await;
            hub.nodes.disconnected(&agent.node_name, &why);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Reads batches until the agent leaves; returns why it left.
async fn serve(
    hub: &Hub,
    agent: &Arc<super::agents::AgentState>,
    stream: &mut Streaming<PushRequest>,
    tx: &mpsc::Sender<Result<PushResponse, Status>>,
) -> String {
    let mut stored = agent.watch_stored();
    let mut acked = 0;
    loop {
        tokio::select! {
            msg = stream.message() => match msg {
                Ok(Some(PushRequest { message: Some(push_request::Message::Batch(b)) })) => {
                    let Batch { first_seq, events, status } = b;
                    match hub.accept_encoded(agent, first_seq, events, status.as_ref()).await {
                        Ok(a) if a.invalid > 0 => tracing::warn!(node = %agent.node_name, invalid = a.invalid, "agent sent events that do not decode or are neither flows nor lost-event notices (each stored as one lost event)"),
                        Ok(_) => {}
                        Err(e) => {
                            let _ = tx.send(Err(Status::unavailable(e.to_string()))).await;
                            return e.to_string();
                        }
                    }
                }
                Ok(Some(_)) => {
                    let _ = tx.send(Err(Status::invalid_argument("only batches may follow the Hello"))).await;
                    return "protocol error: a second Hello".into();
                }
                Ok(None) => {
                    final_ack(agent, &mut stored, &mut acked, tx).await;
                    return "agent closed its stream".into();
                }
                Err(status) => return format!("connection lost: {}", status.message()),
            },
            changed = stored.changed() => {
                if changed.is_err() {
                    return "collector shutting down".into();
                }
                let seq = *stored.borrow_and_update();
                if seq > acked {
                    acked = seq;
                    if tx.send(Ok(ack(seq))).await.is_err() {
                        return "agent stopped reading".into();
                    }
                }
            }
            () = tx.closed() => return "agent stopped reading".into(),
        }
    }
}

/// The agent is done sending: acknowledge everything it sent, once stored.
async fn final_ack(
    agent: &super::agents::AgentState,
    stored: &mut tokio::sync::watch::Receiver<u64>,
    acked: &mut u64,
    tx: &mpsc::Sender<Result<PushResponse, Status>>,
) {
    let target = agent.accepted_through().await;
    let reached =
        tokio::time::timeout(FINAL_ACK_WAIT, stored.wait_for(|s| *s >= target)).await.is_ok();
    let seq = *stored.borrow();
    if seq > *acked {
        *acked = seq;
        let _ = tx.send(Ok(ack(seq))).await;
    }
    if !reached {
        tracing::warn!(node = %agent.node_name, "final acknowledgement timed out");
    }
}
