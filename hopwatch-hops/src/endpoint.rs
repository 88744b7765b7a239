//! Which endpoint a flow's end is, for grouping flows into hops.
//!
//! The best identity the flow carries wins: a Kubernetes workload (or pod) with its namespace,
//! else a container or systemd unit named in the endpoint's labels, else the owning process's
//! command name, else a DNS name known for the address, else the address itself. Workloads come
//! before pods because pod names change with every rollout and would turn one hop into many
//! short-lived series.
//!
//! A flow names the process at the far end only when both ends run on this node and the agent has
//! already seen the far socket. So that one hop does not split into "by process" and "by address"
//! rows, the resolver remembers which process serves an address:port (learnt from the server's own
//! flows) and which process owns a client's address:port (from the client's), and fills the far
//! end from that when the flow leaves it out.

use std::{net::IpAddr, sync::Arc};

use hopwatch_proto::{
    compact::Compact as _,
    flow::{Endpoint, Flow, Process},
};

use super::{FastMap, FastSet};

/// How an endpoint was identified (best first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Workload,
    Pod,
    Container,
    Process,
    Dns,
    Ip,
    /// Stands for every endpoint past the series limit.
    Overflow,
}

/// One end of a hop.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointId {
    /// Kubernetes namespace; empty off Kubernetes.
    pub namespace: Arc<str>,
    /// Workload, pod, container, process, DNS name or address, as `kind` says.
    pub name: Arc<str>,
    pub kind: Kind,
}

impl EndpointId {
    /// `namespace/name`, or `name` without a namespace.
    #[must_use]
    pub fn display(&self) -> String {
        if self.namespace.is_empty() {
            self.name.to_string()
        } else {
            format!("{}/{}", self.namespace, self.name)
        }
    }
}

/// Label keys (as the identity layer writes `key=value` labels) naming a container or unit.
const CONTAINER_LABELS: [&str; 4] =
    ["container.name=", "container=", "container.id=", "systemd.unit="];
/// Container ids are shown shortened, as `docker ps` does.
const SHORT_CONTAINER_ID: usize = 12;
/// Address:port → process entries remembered per direction before the oldest half is dropped.
const PEER_CACHE_ENTRIES: usize = 65_536;

/// What one end of a flow says about itself, borrowed from the flow.
#[derive(Debug, Clone, Copy)]
pub struct EndView<'a> {
    pub endpoint: Option<&'a Endpoint>,
    pub process: Option<&'a Process>,
    pub names: &'a [String],
    pub ip: &'a str,
    pub port: u32,
}

impl<'a> EndView<'a> {
    /// The source end of `flow` (with `port` its source port).
    #[must_use]
    pub fn source(flow: &'a Flow, port: u32) -> Self {
        Self {
            endpoint: flow.source.as_ref(),
            process: flow.source_process.as_ref(),
            names: &flow.source_names,
            ip: flow.ip.as_ref().map_or("", |ip| ip.source.as_str()),
            port,
        }
    }

    /// The destination end of `flow`.
    #[must_use]
    pub fn destination(flow: &'a Flow, port: u32) -> Self {
        Self {
            endpoint: flow.destination.as_ref(),
            process: flow.destination_process.as_ref(),
            names: &flow.destination_names,
            ip: flow.ip.as_ref().map_or("", |ip| ip.destination.as_str()),
            port,
        }
    }
}

/// Turns flow ends into [`EndpointId`]s, sharing one copy of each name.
#[derive(Debug, Default)]
pub struct Resolver {
    names: FastSet<Arc<str>>,
    empty: Option<Arc<str>>,
    /// Server address:port → process serving it.
    servers: FastMap<(IpAddr, u32), Arc<str>>,
    /// Client address:port → process owning that socket.
    clients: FastMap<(IpAddr, u32), Arc<str>>,
}

impl Resolver {
    /// A shared copy of `s`.
    pub fn intern(&mut self, s: &str) -> Arc<str> {
        // The empty namespace of every endpoint off Kubernetes: no hashing for it.
        if s.is_empty() {
            return self.empty.get_or_insert_with(|| Arc::from("")).clone();
        }
        if let Some(a) = self.names.get(s) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(s);
        self.names.insert(a.clone());
        a
    }

    /// Identity of one end. `is_server` says which end it is (for the address:port memory).
    /// `local` is set when the flow was traced at this end (its process is then authoritative).
    pub fn resolve(&mut self, end: &EndView<'_>, is_server: bool, local: bool) -> EndpointId {
        if let Some(ep) = end.endpoint {
            let ns = ep.namespace.as_str();
            if let Some(w) = ep.workloads.iter().find(|w| !w.name.is_empty()) {
                return self.id(ns, &w.name, Kind::Workload);
            }
            if !ep.pod_name.is_empty() {
                return self.id(ns, &ep.pod_name, Kind::Pod);
            }
            if let Some(c) = container_label(&ep.labels) {
                return self.id(ns, c, Kind::Container);
            }
        }
        let key = || end.ip.parse::<IpAddr>().ok().map(|ip| (ip, end.port));
        if let Some(p) = end.process.filter(|p| !p.comm.is_empty()) {
            let name = self.intern(&p.comm);
            if local && let Some(key) = key() {
                // Server memory is per listening port; a client's port is per connection, so
                // client memory only helps the other end's flows of the same connection.
                let memory = if is_server { &mut self.servers } else { &mut self.clients };
                if memory.get(&key).is_none_or(|known| !Arc::ptr_eq(known, &name)) {
                    if memory.len() >= PEER_CACHE_ENTRIES {
                        forget_half(memory);
                    }
                    memory.insert(key, name.clone());
                }
            }
            return EndpointId { namespace: self.intern(""), name, kind: Kind::Process };
        }
        let memory = if is_server { &self.servers } else { &self.clients };
        if let Some(name) = key().and_then(|k| memory.get(&k)).cloned() {
            return EndpointId { namespace: self.intern(""), name, kind: Kind::Process };
        }
        if let Some(n) = end.names.iter().find(|n| !n.is_empty()) {
            return self.id("", n, Kind::Dns);
        }
        let ip = if end.ip.is_empty() { "unknown" } else { end.ip };
        self.id("", ip, Kind::Ip)
    }

    fn id(&mut self, ns: &str, name: &str, kind: Kind) -> EndpointId {
        EndpointId { namespace: self.intern(ns), name: self.intern(name), kind }
    }

    /// The endpoint standing for everything past the series limit.
    pub fn overflow(&mut self) -> EndpointId {
        self.id("", OVERFLOW, Kind::Overflow)
    }

    /// Forgets names nothing refers to any more (after hops were evicted).
    pub fn sweep(&mut self) {
        self.names.retain(|a| Arc::strong_count(a) > 1);
        self.names.compact();
        self.servers.compact();
        self.clients.compact();
    }

    /// Distinct names held.
    #[must_use]
    pub fn len(&self) -> usize {
        self.names.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// Label value of everything past a series limit.
pub const OVERFLOW: &str = "_overflow_";

fn container_label(labels: &[String]) -> Option<&str> {
    CONTAINER_LABELS.iter().find_map(|prefix| {
        labels.iter().find_map(|l| l.strip_prefix(prefix)).filter(|v| !v.is_empty()).map(|v| {
            if *prefix == "container.id=" { &v[..v.len().min(SHORT_CONTAINER_ID)] } else { v }
        })
    })
}

fn forget_half<K: Clone + Eq + std::hash::Hash, V>(m: &mut FastMap<K, V>) {
    let drop: Vec<K> = m.keys().take(m.len() / 2).cloned().collect();
    for k in drop {
        m.remove(&k);
    }
}

#[cfg(test)]
mod tests {
    use hopwatch_proto::flow::Workload;

    use super::*;

    fn end<'a>(
        ep: Option<&'a Endpoint>,
        p: Option<&'a Process>,
        ip: &'a str,
        port: u32,
    ) -> EndView<'a> {
        EndView { endpoint: ep, process: p, names: &[], ip, port }
    }

    #[test]
    fn the_best_identity_wins() {
        let mut r = Resolver::default();
        let proc_ = Process { pid: 1, comm: "uvicorn".into(), cgroup_id: 0 };
        let pod = Endpoint {
            namespace: "shop".into(),
            pod_name: "api-7d9f-x2".into(),
            workloads: vec![Workload { name: "api".into(), kind: "Deployment".into() }],
            ..Endpoint::default()
        };
        let id = r.resolve(&end(Some(&pod), Some(&proc_), "10.0.0.1", 80), true, true);
        assert_eq!((id.display(), id.kind), ("shop/api".into(), Kind::Workload));
        let bare_pod = Endpoint { workloads: vec![], ..pod.clone() };
        assert_eq!(r.resolve(&end(Some(&bare_pod), None, "x", 0), true, false).kind, Kind::Pod);
        let container = Endpoint {
            labels: vec!["container.id=0123456789abcdef".into()],
            ..Endpoint::default()
        };
        let id = r.resolve(&end(Some(&container), Some(&proc_), "x", 0), true, false);
        assert_eq!((id.name.as_ref(), id.kind), ("0123456789ab", Kind::Container));
        let id =
            r.resolve(&end(Some(&Endpoint::default()), Some(&proc_), "10.0.0.1", 80), true, true);
        assert_eq!((id.name.as_ref(), id.kind), ("uvicorn", Kind::Process));
        let names = ["db.internal".to_owned()];
        let dns =
            EndView { endpoint: None, process: None, names: &names, ip: "10.0.0.9", port: 5432 };
        assert_eq!(r.resolve(&dns, true, false).kind, Kind::Dns);
        let id = r.resolve(&end(None, None, "10.0.0.9", 5432), true, false);
        assert_eq!((id.name.as_ref(), id.kind), ("10.0.0.9", Kind::Ip));
    }

    #[test]
    fn the_far_end_is_filled_from_what_its_own_flows_said() {
        let mut r = Resolver::default();
        let server = Process { pid: 9, comm: "postgres".into(), cgroup_id: 0 };
        // Before the server's own flow: only the address is known.
        assert_eq!(r.resolve(&end(None, None, "10.0.0.2", 5432), true, false).kind, Kind::Ip);
        // The server's flow (traced at the server) names its process.
        r.resolve(&end(None, Some(&server), "10.0.0.2", 5432), true, true);
        let id = r.resolve(&end(None, None, "10.0.0.2", 5432), true, false);
        assert_eq!((id.name.as_ref(), id.kind), ("postgres", Kind::Process));
        // Another port on that address is another service.
        assert_eq!(r.resolve(&end(None, None, "10.0.0.2", 6379), true, false).kind, Kind::Ip);
    }

    #[test]
    fn names_are_shared_and_swept_when_unused() {
        let mut r = Resolver::default();
        let a = r.resolve(&end(None, None, "10.0.0.1", 1), false, false);
        let b = r.resolve(&end(None, None, "10.0.0.1", 2), false, false);
        assert!(Arc::ptr_eq(&a.name, &b.name));
        let before = r.len();
        drop((a, b));
        r.sweep();
        assert!(r.len() < before);
    }
}
