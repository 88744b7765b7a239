//! The collector's core, shared by its gRPC services and the embedded (in-process) path: the
//! store, the merge stage, per-agent ingest progress, and the node registry.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime},
};

use hopwatch_proto::{
    flow::LostEventSource,
    hopwatch::v1::AgentStatus,
    lost,
    observer::{GetFlowsResponse, get_flows_response::ResponseTypes},
};
use prost::Message as _;
use tokio::sync::{mpsc, oneshot};

use super::{
    agents::AgentState,
    clickhouse::ClickHouse,
    merge::{self, MergeConfig, MergeMsg},
    nodes::NodeRegistry,
    store::{FlowStore, Incoming, Preparation, StoreConfig, StoreError},
    traces::TraceJoin,
};

/// Events waiting for the merge stage, in messages (each a batch); beyond this, ingest streams
/// wait, which pushes back on agents through HTTP/2 flow control.
const MERGE_QUEUE: usize = 256;
/// At shutdown, how long queued flows may take to reach ClickHouse.
const SHUTDOWN_WRITE_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct HubConfig {
    pub store: StoreConfig,
    pub merge: MergeConfig,
}

/// What [`Hub::accept`] did with a batch.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    pub new: u64,
    pub duplicates: u64,
    /// Sequence numbers the agent skipped (reported to readers as lost events).
    pub gap: u64,
    /// Events that did not decode or were neither a flow nor a lost-event notice (each stored
    /// as a one-event lost-event notice in its place).
    pub invalid: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("the collector is shutting down")]
pub struct Closed;

pub struct Hub {
    pub store: Arc<FlowStore>,
    pub nodes: NodeRegistry,
    pub sort_window: Duration,
    pub started: Instant,
    /// The shared history, when flows go to ClickHouse (history queries are answered there).
    pub clickhouse: Option<Arc<ClickHouse>>,
    /// Traces joined across nodes.
    pub traces: Arc<TraceJoin>,
    /// How entries are made ready for the store where they arrive.
    prepare: Preparation,
    merge_tx: Mutex<Option<mpsc::Sender<MergeMsg>>>,
    merge_thread: Mutex<Option<JoinHandle<()>>>,
    agents: Mutex<HashMap<String, Arc<AgentState>>>,
}

pub fn version() -> String {
    format!("hopwatch {}", env!("CARGO_PKG_VERSION"))
}

impl Hub {
    /// Opens the store (recovering its history) and starts the merge stage.
    pub fn start(cfg: &HubConfig) -> Result<Arc<Self>, StoreError> {
        Self::start_with(cfg, None)
    }

    /// [`Self::start`], with every stored event also written to ClickHouse, which then answers
    /// history queries.
    pub fn start_with(
        cfg: &HubConfig,
        clickhouse: Option<Arc<ClickHouse>>,
    ) -> Result<Arc<Self>, StoreError> {
        let (store, mut writer, recovery) = FlowStore::open(&cfg.store)?;
        if let Some(ch) = &clickhouse {
            writer.set_sink(ch.sink.clone());
        }
        if recovery.discarded > 0 {
            tracing::info!(
                entries = recovery.discarded,
                "history: dropped entries written after the last checkpoint (never acknowledged; their agents resend them)"
            );
        }
        let nodes = NodeRegistry::default();
        let mut agents = HashMap::new();
        for mark in &recovery.checkpoint.agents {
            nodes.remember(&mark.node_name);
            agents.insert(
                mark.agent_id.clone(),
                Arc::new(AgentState::new(&mark.agent_id, &mark.node_name, mark.seq)),
            );
        }
        let (tx, rx) = mpsc::channel(MERGE_QUEUE);
        let thread = merge::spawn(cfg.merge, writer, agents.values().cloned().collect(), rx);
        Ok(Arc::new(Self {
            store,
            nodes,
            sort_window: cfg.merge.window,
            started: Instant::now(),
            traces: Arc::default(),
            prepare: Preparation { index: cfg.store.disk.is_some(), decoded: clickhouse.is_some() },
            merge_tx: Mutex::new(Some(tx)),
            merge_thread: Mutex::new(Some(thread)),
            agents: Mutex::new(agents),
            clickhouse,
        }))
    }

    fn sender(&self) -> Result<mpsc::Sender<MergeMsg>, Closed> {
        self.merge_tx.lock().expect("merge sender lock").clone().ok_or(Closed)
    }

    /// The state of agent `id` (created on first contact).
    pub fn agent(&self, id: &str, node_name: &str) -> Arc<AgentState> {
        let mut agents = self.agents.lock().expect("agents lock");
        agents
            .entry(id.to_owned())
            .or_insert_with(|| Arc::new(AgentState::new(id, node_name, 0)))
            .clone()
    }

    /// Takes a batch of events numbered `first_seq..`: drops what was already accepted, reports
    /// skipped numbers as lost, and hands the rest to the merge stage (waiting while it is full).
    pub async fn accept(
        &self,
        agent: &Arc<AgentState>,
        first_seq: u64,
        events: Vec<GetFlowsResponse>,
        status: Option<&AgentStatus>,
    ) -> Result<Accepted, Closed> {
        let events = events.into_iter().map(|e| (e, None)).collect();
        self.take(agent, first_seq, events, status).await
    }

    /// [`accept`](Self::accept) for events as the ingest API carries them, each an encoded
    /// `GetFlowsResponse`, decoded one by one: one that does not decode is invalid (counted,
    /// and stored as a lost-event notice in its place); one stored as it came keeps the bytes
    /// it came in (the store does not encode it again).
    pub async fn accept_encoded(
        &self,
        agent: &Arc<AgentState>,
        first_seq: u64,
        events: Vec<bytes::Bytes>,
        status: Option<&AgentStatus>,
    ) -> Result<Accepted, Closed> {
        let events = events
            .into_iter()
            .map(|b| match GetFlowsResponse::decode(&b[..]) {
                // A copy of its own: `b` shares the buffer of the whole stream message, which
                // would stay allocated as long as any of its events is in the memory ring.
                Ok(e) => (e, Some(bytes::Bytes::copy_from_slice(&b))),
                Err(_) => (GetFlowsResponse::default(), None),
            })
            .collect();
        self.take(agent, first_seq, events, status).await
    }

    async fn take(
        &self,
        agent: &Arc<AgentState>,
        first_seq: u64,
        mut events: Vec<(GetFlowsResponse, Option<bytes::Bytes>)>,
        status: Option<&AgentStatus>,
    ) -> Result<Accepted, Closed> {
        let tx = self.sender()?;
        let mut out = Accepted::default();
        let n = events.len() as u64;
        if n == 0 || first_seq == 0 {
            out.invalid = n;
            return Ok(out);
        }
        let last_seq = first_seq + n - 1;
        let mut accepted = agent.accepted.lock().await;
        if last_seq <= *accepted {
            out.duplicates = n;
            return Ok(out);
        }
        if first_seq <= *accepted {
            let dup = *accepted + 1 - first_seq;
            events.drain(..usize::try_from(dup).expect("fewer than the batch"));
            out.duplicates = dup;
        } else if first_seq > *accepted + 1 {
            out.gap = first_seq - *accepted - 1;
            tracing::warn!(node = %agent.node_name, missing = out.gap, "agent skipped sequence numbers");
            let notice =
                lost::notice(&agent.node_name, LostEventSource::ObserverEventsQueue, out.gap);
            let notice = Incoming::new(notice, self.prepare);
            tx.send(MergeMsg::Notices(vec![notice])).await.map_err(|_| Closed)?;
        }
        let now = prost_types::Timestamp::from(SystemTime::now());
        for (e, encoded) in &mut events {
            let complete = match &mut e.response_types {
                Some(ResponseTypes::Flow(f)) => {
                    let named = !f.node_name.is_empty();
                    if !named {
                        f.node_name.clone_from(&agent.node_name);
                    }
                    let timed = e.time.is_some();
                    if !timed {
                        e.time = f.time.or(Some(now));
                    }
                    named && timed
                }
                Some(ResponseTypes::LostEvents(_)) => {
                    let timed = e.time.is_some();
                    if !timed {
                        e.time = Some(now);
                    }
                    timed
                }
                // Node status is the collector's to say; an empty (or undecodable) event says
                // nothing.
                Some(ResponseTypes::NodeStatus(_)) | None => {
                    out.invalid += 1;
                    *e = lost::notice(&agent.node_name, LostEventSource::ObserverEventsQueue, 1);
                    false
                }
            };
            if e.node_name.is_empty() {
                e.node_name.clone_from(&agent.node_name);
                *encoded = None;
            }
            if !complete {
                *encoded = None;
            }
        }
        out.new = events.len() as u64;
        self.traces.observe(events.iter().filter_map(|(e, _)| match &e.response_types {
            Some(ResponseTypes::Flow(f)) => Some(f),
            _ => None,
        }));
        self.nodes.received(&agent.node_name, out.new, status);
        let events = events
            .into_iter()
            .map(|(e, encoded)| Incoming::received(e, encoded, self.prepare))
            .collect();
        tx.send(MergeMsg::Batch { agent: agent.clone(), last_seq, events })
            .await
            .map_err(|_| Closed)?;
        *accepted = last_seq;
        Ok(out)
    }

    /// Stores events the collector produced itself (lost-event notices).
    pub async fn notices(&self, events: Vec<GetFlowsResponse>) -> Result<(), Closed> {
        let events = events.into_iter().map(|e| Incoming::new(e, self.prepare)).collect();
        self.sender()?.send(MergeMsg::Notices(events)).await.map_err(|_| Closed)
    }

    /// Releases everything in the sort window and waits until it is stored.
    pub async fn flush(&self) -> Result<(), Closed> {
        let (tx, rx) = oneshot::channel();
        self.sender()?.send(MergeMsg::Flush(tx)).await.map_err(|_| Closed)?;
        rx.await.map_err(|_| Closed)
    }

    /// Stops the merge stage after it has stored everything it was given.
    pub async fn shutdown(&self) {
        let tx = self.merge_tx.lock().expect("merge sender lock").take();
        drop(tx);
        let thread = self.merge_thread.lock().expect("merge thread lock").take();
        if let Some(t) = thread {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        if let Some(ch) = &self.clickhouse {
            ch.close(SHUTDOWN_WRITE_WAIT).await;
        }
    }
}
