//! The Kubernetes API watchers (kube-rs): list then watch each kind, re-listing when the watch
//! breaks (a `410 Gone` for a compacted resource version, a dropped connection), with kube-rs'
//! default back-off. Each object is stripped to the store's types as it arrives.

use std::{
    net::IpAddr,
    sync::{Arc, RwLock},
};

use futures_util::{Stream, StreamExt as _};
use k8s_openapi::{
    api::{
        apps::v1::ReplicaSet,
        batch::v1::Job,
        core::v1::{Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use kube::{
    Api, Client,
    core::PartialObjectMeta,
    runtime::{WatchStreamExt as _, watcher},
};

use super::store::{Kind, KubeState, PodMeta, ServiceMeta, SliceEndpoint, SliceMeta};
use crate::identity::now_ms;

/// Which pods to watch.
#[derive(Debug, Clone)]
pub enum PodScope {
    /// Pods scheduled on this node (`spec.nodeName`).
    Node(String),
    All,
}

/// Starts one watcher task per kind; each applies events to `state` until `cancel`.
pub(super) fn spawn(
    client: &Client,
    scope: &PodScope,
    state: &Arc<RwLock<KubeState>>,
    cancel: &tokio_util::sync::CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    let pods_config = match scope {
        PodScope::Node(node) => watcher::Config::default().fields(&format!("spec.nodeName={node}")),
        PodScope::All => watcher::Config::default(),
    };
    let pods = watcher(Api::<Pod>::all(client.clone()), pods_config);
    let services = watcher(Api::<Service>::all(client.clone()), watcher::Config::default());
    let slices = watcher(Api::<EndpointSlice>::all(client.clone()), watcher::Config::default());
    // Only owner references are needed: metadata-only watches keep the traffic and memory small.
    let replicasets = watcher(
        Api::<PartialObjectMeta<ReplicaSet>>::all(client.clone()),
        watcher::Config::default(),
    );
    let jobs =
        watcher(Api::<PartialObjectMeta<Job>>::all(client.clone()), watcher::Config::default());
    vec![
        run(Kind::Pod, pods, state.clone(), cancel.clone(), apply_pod),
        run(Kind::Service, services, state.clone(), cancel.clone(), apply_service),
        run(Kind::EndpointSlice, slices, state.clone(), cancel.clone(), apply_slice),
        run(Kind::ReplicaSet, replicasets, state.clone(), cancel.clone(), apply_replicaset),
        run(Kind::Job, jobs, state.clone(), cancel.clone(), apply_job),
    ]
}

/// Applies an object to the store: `true` for an add/update, `false` for a deletion.
type Apply<K> = fn(&mut KubeState, &K, bool);

fn run<K, S>(
    kind: Kind,
    stream: S,
    state: Arc<RwLock<KubeState>>,
    cancel: tokio_util::sync::CancellationToken,
    apply: Apply<K>,
) -> tokio::task::JoinHandle<()>
where
    K: Send + 'static,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream.default_backoff());
        let mut failures = 0u64;
        loop {
            let event = tokio::select! {
                () = cancel.cancelled() => return,
                e = stream.next() => e,
            };
            let Some(event) = event else { return };
            let event = match event {
                Ok(e) => e,
                Err(e) => {
                    // The watcher re-lists by itself after the back-off.
                    failures += 1;
                    if failures == 1 || failures.is_power_of_two() {
                        tracing::warn!(kind = ?kind, error = %e, failures, "Kubernetes watch failed; retrying");
                    }
                    continue;
                }
            };
            let mut s = state.write().unwrap_or_else(std::sync::PoisonError::into_inner);
            match event {
                watcher::Event::Init => s.init(kind),
                watcher::Event::InitApply(o) | watcher::Event::Apply(o) => apply(&mut s, &o, true),
                watcher::Event::Delete(o) => apply(&mut s, &o, false),
                watcher::Event::InitDone => {
                    s.init_done(kind, now_ms());
                    if failures > 0 {
                        tracing::info!(kind = ?kind, "Kubernetes watch resynchronised");
                    }
                    failures = 0;
                }
            }
        }
    })
}

fn controller(meta: &ObjectMeta) -> Option<&OwnerReference> {
    meta.owner_references.as_ref()?.iter().find(|o| o.controller == Some(true))
}

fn apply_pod(s: &mut KubeState, pod: &Pod, present: bool) {
    let meta = &pod.metadata;
    let Some(uid) = meta.uid.clone() else { return };
    if !present {
        s.delete_pod(&uid, now_ms());
        return;
    }
    let namespace = meta.namespace.clone().unwrap_or_default();
    let mut labels: Vec<String> =
        meta.labels.iter().flatten().map(|(k, v)| format!("k8s:{k}={v}")).collect();
    labels.push(format!("k8s:io.kubernetes.pod.namespace={namespace}"));
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let mut ips: Vec<IpAddr> = status
        .and_then(|st| st.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if let Some(ip) = status.and_then(|st| st.pod_ip.as_ref()).and_then(|ip| ip.parse().ok())
        && !ips.contains(&ip)
    {
        ips.push(ip);
    }
    // A finished pod (Succeeded/Failed) no longer holds its address: it may be reused already.
    let finished = status
        .and_then(|st| st.phase.as_deref())
        .is_some_and(|p| p == "Succeeded" || p == "Failed");
    if finished {
        ips.clear();
    }
    let containers = status
        .into_iter()
        .flat_map(|st| {
            st.container_statuses
                .iter()
                .flatten()
                .chain(st.init_container_statuses.iter().flatten())
        })
        .filter_map(|c| {
            let id = c.container_id.as_deref()?;
            let id = id.split_once("://").map_or(id, |(_, id)| id);
            Some((id.to_owned(), c.name.clone()))
        })
        .collect();
    s.apply_pod(PodMeta {
        uid,
        namespace,
        name: meta.name.clone().unwrap_or_default(),
        labels,
        owner: controller(meta).map(|o| (o.kind.clone(), o.name.clone())),
        template_hash: meta.labels.as_ref().and_then(|l| l.get("pod-template-hash").cloned()),
        ips,
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        created_ms: meta.creation_timestamp.as_ref().map_or(0, |t| t.0.as_millisecond()),
        containers,
    });
}

fn apply_service(s: &mut KubeState, svc: &Service, present: bool) {
    let namespace = svc.metadata.namespace.clone().unwrap_or_default();
    let name = svc.metadata.name.clone().unwrap_or_default();
    if !present {
        s.delete_service(&namespace, &name);
        return;
    }
    let spec = svc.spec.as_ref();
    let mut frontends: Vec<IpAddr> = Vec::new();
    let cluster_ips = spec.and_then(|s| s.cluster_ips.clone()).unwrap_or_default();
    let cluster_ip = spec.and_then(|s| s.cluster_ip.clone());
    let external = spec.and_then(|s| s.external_ips.clone()).unwrap_or_default();
    let ingress = svc
        .status
        .as_ref()
        .and_then(|st| st.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.clone());
    // Headless services ("None") have no frontend: their clients dial the backends directly.
    for ip in cluster_ips.into_iter().chain(cluster_ip).chain(external).chain(ingress) {
        if let Ok(ip) = ip.parse::<IpAddr>()
            && !frontends.contains(&ip)
        {
            frontends.push(ip);
        }
    }
    s.apply_service(ServiceMeta { namespace, name, frontends });
}

fn apply_slice(s: &mut KubeState, slice: &EndpointSlice, present: bool) {
    let namespace = slice.metadata.namespace.clone().unwrap_or_default();
    let name = slice.metadata.name.clone().unwrap_or_default();
    if !present {
        s.delete_slice(&namespace, &name);
        return;
    }
    let Some(service) =
        slice.metadata.labels.as_ref().and_then(|l| l.get("kubernetes.io/service-name")).cloned()
    else {
        return;
    };
    let ports = slice
        .ports
        .iter()
        .flatten()
        .filter_map(|p| p.port.and_then(|p| u16::try_from(p).ok()))
        .collect();
    let endpoints = slice
        .endpoints
        .iter()
        .flat_map(|ep| {
            let pod =
                ep.target_ref.as_ref().filter(|r| r.kind.as_deref() == Some("Pod")).map(|r| {
                    (
                        r.namespace.clone().unwrap_or_else(|| namespace.clone()),
                        r.name.clone().unwrap_or_default(),
                    )
                });
            ep.addresses
                .iter()
                .filter_map(|a| a.parse::<IpAddr>().ok())
                .map(move |ip| SliceEndpoint { ip, pod: pod.clone() })
        })
        .collect();
    s.apply_slice(SliceMeta { namespace, name, service, ports, endpoints });
}

fn apply_replicaset(s: &mut KubeState, obj: &PartialObjectMeta<ReplicaSet>, present: bool) {
    apply_owner(s, Kind::ReplicaSet, &obj.metadata, present);
}

fn apply_job(s: &mut KubeState, obj: &PartialObjectMeta<Job>, present: bool) {
    apply_owner(s, Kind::Job, &obj.metadata, present);
}

fn apply_owner(s: &mut KubeState, kind: Kind, meta: &ObjectMeta, present: bool) {
    let namespace = meta.namespace.clone().unwrap_or_default();
    let name = meta.name.clone().unwrap_or_default();
    if present {
        let owner = controller(meta).map(|o| (o.kind.clone(), o.name.clone()));
        s.apply_owner(kind, &namespace, &name, owner);
    } else {
        s.delete_owner(kind, &namespace, &name);
    }
}
