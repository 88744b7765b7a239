//! Which nodes stream to the collector, and what they last reported. Changes are broadcast so
//! following `GetFlows` streams can tell their clients about nodes that come and go (Hubble
//! Relay's `NodeStatusEvent`s).

use std::{
    collections::BTreeMap,
    sync::Mutex,
    time::{Duration, Instant, SystemTime},
};

use hopwatch_proto::{
    hopwatch::v1::AgentStatus,
    observer::{Node, Tls},
    relay::{NodeState, NodeStatusEvent},
};
use tokio::sync::broadcast;

#[derive(Debug, Clone, Default)]
struct NodeInfo {
    connections: usize,
    version: String,
    address: String,
    tls: Option<String>,
    started: Option<SystemTime>,
    received: u64,
    status: AgentStatus,
    last_change: Option<Instant>,
    message: String,
}

/// How a node's agent is connected.
#[derive(Debug, Clone)]
pub struct Connection {
    pub node_name: String,
    pub version: String,
    pub address: String,
    /// Server name the agent verified, when the connection is TLS.
    pub tls: Option<String>,
    pub started: Option<SystemTime>,
}

pub struct NodeRegistry {
    nodes: Mutex<BTreeMap<String, NodeInfo>>,
    events: broadcast::Sender<NodeStatusEvent>,
}

impl Default for NodeRegistry {
    fn default() -> Self {
        Self { nodes: Mutex::default(), events: broadcast::channel(256).0 }
    }
}

impl NodeRegistry {
    /// Nodes known from the history (after a restart), not connected yet.
    pub fn remember(&self, node_name: &str) {
        let mut nodes = self.nodes.lock().expect("nodes lock");
        nodes.entry(node_name.to_owned()).or_insert_with(|| NodeInfo {
            message: "not connected since the collector started".into(),
            ..Default::default()
        });
    }

    pub fn connected(&self, c: &Connection) {
        let first = {
            let mut nodes = self.nodes.lock().expect("nodes lock");
            let n = nodes.entry(c.node_name.clone()).or_default();
            n.connections += 1;
            n.version.clone_from(&c.version);
            n.address.clone_from(&c.address);
            n.tls.clone_from(&c.tls);
            n.started = c.started;
            n.last_change = Some(Instant::now());
            n.message.clear();
            n.connections == 1
        };
        if first {
            tracing::info!(node = %c.node_name, address = %c.address, "agent connected");
            let _ = self.events.send(NodeStatusEvent {
                state_change: NodeState::NodeConnected.into(),
                node_names: vec![c.node_name.clone()],
                message: String::new(),
            });
        }
    }

    pub fn disconnected(&self, node_name: &str, why: &str) {
        let last = {
            let mut nodes = self.nodes.lock().expect("nodes lock");
            let Some(n) = nodes.get_mut(node_name) else { return };
            n.connections = n.connections.saturating_sub(1);
            n.last_change = Some(Instant::now());
            if n.connections == 0 {
                why.clone_into(&mut n.message);
            }
            n.connections == 0
        };
        if last {
            tracing::warn!(node = %node_name, reason = why, "agent disconnected");
            let _ = self.events.send(NodeStatusEvent {
                state_change: NodeState::NodeUnavailable.into(),
                node_names: vec![node_name.to_owned()],
                message: why.to_owned(),
            });
        }
    }

    pub fn received(&self, node_name: &str, n: u64, status: Option<&AgentStatus>) {
        let mut nodes = self.nodes.lock().expect("nodes lock");
        if let Some(info) = nodes.get_mut(node_name) {
            info.received += n;
            if let Some(s) = status {
                info.status = *s;
            }
        }
    }

    /// Exchanges the agents counted but did not record as flows, summed over every node seen.
    pub fn not_recorded(&self) -> u64 {
        let nodes = self.nodes.lock().expect("nodes lock");
        nodes.values().map(|n| n.status.flows_not_recorded).sum()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<NodeStatusEvent> {
        self.events.subscribe()
    }

    /// (connected, unavailable) node names.
    pub fn split(&self) -> (Vec<String>, Vec<String>) {
        let nodes = self.nodes.lock().expect("nodes lock");
        let (up, down): (Vec<_>, Vec<_>) = nodes.iter().partition(|(_, n)| n.connections > 0);
        (
            up.into_iter().map(|(k, _)| k.clone()).collect(),
            down.into_iter().map(|(k, _)| k.clone()).collect(),
        )
    }

    /// The status notices a new `GetFlows` stream starts with: who is connected, who is not
    /// (with why, when known).
    pub fn snapshot_events(&self) -> Vec<NodeStatusEvent> {
        let nodes = self.nodes.lock().expect("nodes lock");
        let mut out = Vec::new();
        let up: Vec<String> =
            nodes.iter().filter(|(_, n)| n.connections > 0).map(|(k, _)| k.clone()).collect();
        if !up.is_empty() {
            out.push(NodeStatusEvent {
                state_change: NodeState::NodeConnected.into(),
                node_names: up,
                message: String::new(),
            });
        }
        for (name, n) in nodes.iter().filter(|(_, n)| n.connections == 0) {
            out.push(NodeStatusEvent {
                state_change: NodeState::NodeUnavailable.into(),
                node_names: vec![name.clone()],
                message: n.message.clone(),
            });
        }
        out
    }

    pub fn nodes(&self, max_flows: u64) -> Vec<Node> {
        let nodes = self.nodes.lock().expect("nodes lock");
        nodes
            .iter()
            .map(|(name, n)| Node {
                name: name.clone(),
                version: n.version.clone(),
                address: n.address.clone(),
                state: if n.connections > 0 {
                    NodeState::NodeConnected
                } else {
                    NodeState::NodeUnavailable
                }
                .into(),
                tls: Some(Tls {
                    enabled: n.tls.is_some(),
                    server_name: n.tls.clone().unwrap_or_default(),
                }),
                uptime_ns: n
                    .started
                    .and_then(|s| SystemTime::now().duration_since(s).ok())
                    .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
                num_flows: n.received,
                max_flows,
                seen_flows: n.status.flows_seen.max(n.received),
            })
            .collect()
    }
}

/// For tests: a short wait for a node to reach a state.
#[cfg(test)]
pub async fn wait_connected(reg: &NodeRegistry, node: &str, want: bool) {
    for _ in 0..200 {
        if reg.split().0.iter().any(|n| n == node) == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("node {node} never became connected={want}");
}

#[cfg(not(test))]
const _: Duration = Duration::ZERO;
