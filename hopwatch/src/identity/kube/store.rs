//! What the agent keeps of the Kubernetes API: pods (this node's, or all), services,
//! EndpointSlices and the owners of ReplicaSets and Jobs, stripped to the fields flows need.
//!
//! Pure state with no I/O, fed by the watchers in `watch.rs`, read on the flow path. Bounded:
//! each table has a cap; objects past it are not kept and are counted.
//!
//! Pods that come and go keep their names at the time of the flow: an address remembers the pods
//! that held it, each with the interval it held it (from the pod's creation to its deletion as the
//! agent observed it), and a deleted pod stays resolvable for a grace period, so the close of a
//! connection that outlived its pod, or a flow decoded just after a scale-down, is still named.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    net::IpAddr,
    sync::Arc,
};

use hopwatch_proto::flow::{Endpoint, Service, Workload};

/// Pods kept (this node's pods by default; every pod with `--kube-all-pods`).
pub(crate) const MAX_PODS: usize = 262_144;
/// Services kept, cluster-wide.
pub(crate) const MAX_SERVICES: usize = 131_072;
/// EndpointSlice endpoints (address × slice) kept, cluster-wide.
pub(crate) const MAX_SLICE_ENDPOINTS: usize = 1_048_576;
/// ReplicaSet → Deployment and Job → CronJob links kept.
pub(crate) const MAX_OWNERS: usize = 262_144;
/// Pods that held one address remembered at once (older ones are forgotten first).
const IP_HISTORY: usize = 4;

/// A pod, stripped to what flows show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodMeta {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    /// `k8s:key=value`, plus Cilium's `k8s:io.kubernetes.pod.namespace=<ns>`.
    pub labels: Vec<String>,
    /// The controller owner reference (kind, name), if any.
    pub owner: Option<(String, String)>,
    /// `pod-template-hash` label, to name a Deployment before its ReplicaSet is known.
    pub template_hash: Option<String>,
    pub ips: Vec<IpAddr>,
    /// Shares the node's addresses: found through its processes' cgroups, never by address.
    pub host_network: bool,
    pub node: String,
    /// Creation time, Unix milliseconds.
    pub created_ms: i64,
    /// Container id (without the `runtime://` prefix) → container name.
    pub containers: Vec<(String, String)>,
}

/// A Service's frontends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceMeta {
    pub namespace: String,
    pub name: String,
    /// ClusterIPs, external IPs and load-balancer ingress IPs.
    pub frontends: Vec<IpAddr>,
}

/// One endpoint of an EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub ip: IpAddr,
    /// The pod behind the address (`targetRef`), namespace and name.
    pub pod: Option<(String, String)>,
}

/// An EndpointSlice: the backends of one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceMeta {
    pub namespace: String,
    pub name: String,
    /// The `kubernetes.io/service-name` label.
    pub service: String,
    /// Ports the backends serve (empty: all ports).
    pub ports: Vec<u16>,
    pub endpoints: Vec<SliceEndpoint>,
}

/// One pod's claim on an address, for the interval it held it.
#[derive(Debug, Clone)]
struct Tenure {
    pod: Arc<PodMeta>,
    from_ms: i64,
    /// When the agent learned the pod was gone; `None` while it exists.
    until_ms: Option<i64>,
}

/// Objects not kept because a table was full, per table.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Overflow {
    pub pods: u64,
    pub services: u64,
    pub slice_endpoints: u64,
    pub owners: u64,
}

#[derive(Debug, Default)]
pub struct KubeState {
    pods: HashMap<String, Arc<PodMeta>>,
    by_ip: HashMap<IpAddr, VecDeque<Tenure>>,
    /// Deleted pods still resolvable by uid (cgroups), with their deletion time.
    deleted: HashMap<String, (Arc<PodMeta>, i64)>,
    services: HashMap<(String, String), ServiceMeta>,
    by_frontend: HashMap<IpAddr, (String, String)>,
    slices: HashMap<(String, String), SliceMeta>,
    slice_endpoints: usize,
    /// Backend address → (service namespace, name, ports) for every slice listing it.
    by_backend: HashMap<IpAddr, Vec<(String, String, Vec<u16>)>>,
    /// Backend address → the pod behind it (any node).
    backend_pods: HashMap<IpAddr, (String, String)>,
    owners: HashMap<(String, String, String), (String, String)>,
    /// Objects listed since the last `Init`, per kind, for the resync.
    relist: HashMap<Kind, HashSet<(String, String)>>,
    pub overflow: Overflow,
    /// Watch streams that completed their initial list (ready to name flows).
    pub synced: HashSet<Kind>,
}

/// The object kinds watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Pod,
    Service,
    EndpointSlice,
    ReplicaSet,
    Job,
}

impl KubeState {
    // ---- updates (watch events) ----

    /// A (re)list of `kind` starts: objects not listed again before [`Self::init_done`] are gone.
    pub fn init(&mut self, kind: Kind) {
        self.relist.insert(kind, HashSet::new());
    }

    fn listed(&mut self, kind: Kind, key: (String, String)) {
        if let Some(seen) = self.relist.get_mut(&kind) {
            seen.insert(key);
        }
    }

    /// The (re)list of `kind` is complete: forgets what it did not list (what was deleted while
    /// the watch was down, e.g. after a `410 Gone`).
    pub fn init_done(&mut self, kind: Kind, now_ms: i64) {
        let Some(seen) = self.relist.remove(&kind) else { return };
        self.synced.insert(kind);
        match kind {
            Kind::Pod => {
                let gone: Vec<String> = self
                    .pods
                    .keys()
                    .filter(|uid| !seen.contains(&(String::new(), (*uid).clone())))
                    .cloned()
                    .collect();
                for uid in gone {
                    self.delete_pod(&uid, now_ms);
                }
            }
            Kind::Service => {
                let gone: Vec<_> =
                    self.services.keys().filter(|k| !seen.contains(k)).cloned().collect();
                for (ns, name) in gone {
                    self.delete_service(&ns, &name);
                }
            }
            Kind::EndpointSlice => {
                let gone: Vec<_> =
                    self.slices.keys().filter(|k| !seen.contains(k)).cloned().collect();
                for (ns, name) in gone {
                    self.delete_slice(&ns, &name);
                }
            }
            Kind::ReplicaSet | Kind::Job => {
                let kind_name = kind_name(kind);
                self.owners.retain(|(k, ns, name), _| {
                    k != kind_name || seen.contains(&(ns.clone(), name.clone()))
                });
            }
        }
    }

    /// A pod was added or changed.
    pub fn apply_pod(&mut self, pod: PodMeta) {
        self.listed(Kind::Pod, (String::new(), pod.uid.clone()));
        if !self.pods.contains_key(&pod.uid) && self.pods.len() >= MAX_PODS {
            self.overflow.pods += 1;
            return;
        }
        let pod = Arc::new(pod);
        let old = self.pods.insert(pod.uid.clone(), pod.clone());
        let old_ips: &[IpAddr] = old.as_ref().map_or(&[], |o| &o.ips);
        if pod.host_network {
            return;
        }
        for ip in &pod.ips {
            let history = self.by_ip.entry(*ip).or_default();
            if let Some(t) = history.iter_mut().find(|t| t.pod.uid == pod.uid) {
                // Same pod, newer object (labels may have changed).
                t.pod = pod.clone();
                t.until_ms = None;
                continue;
            }
            if history.len() >= IP_HISTORY {
                history.pop_front();
            }
            history.push_back(Tenure { pod: pod.clone(), from_ms: pod.created_ms, until_ms: None });
        }
        // An address the pod no longer has (it was replaced) ends its tenure now.
        for ip in old_ips.iter().filter(|ip| !pod.ips.contains(ip)) {
            if let Some(history) = self.by_ip.get_mut(ip) {
                history.retain(|t| t.pod.uid != pod.uid);
                if history.is_empty() {
                    self.by_ip.remove(ip);
                }
            }
        }
    }

    /// A pod was deleted (`now_ms`: when the agent learned it).
    pub fn delete_pod(&mut self, uid: &str, now_ms: i64) {
        let Some(pod) = self.pods.remove(uid) else { return };
        for ip in &pod.ips {
            if let Some(t) =
                self.by_ip.get_mut(ip).and_then(|h| h.iter_mut().find(|t| t.pod.uid == uid))
            {
                t.until_ms = Some(now_ms);
            }
        }
        self.deleted.insert(uid.to_owned(), (pod, now_ms));
    }

    /// Forgets pods deleted before `before_ms`.
    pub fn expire(&mut self, before_ms: i64) {
        self.deleted.retain(|_, (_, at)| *at >= before_ms);
        self.by_ip.retain(|_, history| {
            history.retain(|t| t.until_ms.is_none_or(|u| u >= before_ms));
            !history.is_empty()
        });
    }

    pub fn apply_service(&mut self, svc: ServiceMeta) {
        let key = (svc.namespace.clone(), svc.name.clone());
        self.listed(Kind::Service, key.clone());
        if !self.services.contains_key(&key) && self.services.len() >= MAX_SERVICES {
            self.overflow.services += 1;
            return;
        }
        self.delete_service(&key.0, &key.1);
        for ip in &svc.frontends {
            self.by_frontend.insert(*ip, key.clone());
        }
        self.services.insert(key, svc);
    }

    pub fn delete_service(&mut self, namespace: &str, name: &str) {
        let key = (namespace.to_owned(), name.to_owned());
        if let Some(old) = self.services.remove(&key) {
            for ip in &old.frontends {
                if self.by_frontend.get(ip) == Some(&key) {
                    self.by_frontend.remove(ip);
                }
            }
        }
    }

    pub fn apply_slice(&mut self, slice: SliceMeta) {
        let key = (slice.namespace.clone(), slice.name.clone());
        self.listed(Kind::EndpointSlice, key.clone());
        self.delete_slice(&key.0, &key.1);
        if self.slice_endpoints + slice.endpoints.len() > MAX_SLICE_ENDPOINTS {
            self.overflow.slice_endpoints += slice.endpoints.len() as u64;
            return;
        }
        self.slice_endpoints += slice.endpoints.len();
        for ep in &slice.endpoints {
            self.by_backend.entry(ep.ip).or_default().push((
                slice.namespace.clone(),
                slice.service.clone(),
                slice.ports.clone(),
            ));
            if let Some(pod) = &ep.pod {
                self.backend_pods.insert(ep.ip, pod.clone());
            }
        }
        self.slices.insert(key, slice);
    }

    pub fn delete_slice(&mut self, namespace: &str, name: &str) {
        let Some(old) = self.slices.remove(&(namespace.to_owned(), name.to_owned())) else {
            return;
        };
        self.slice_endpoints -= old.endpoints.len();
        for ep in &old.endpoints {
            if let Some(list) = self.by_backend.get_mut(&ep.ip) {
                if let Some(i) = list.iter().position(|(ns, svc, ports)| {
                    *ns == old.namespace && *svc == old.service && *ports == old.ports
                }) {
                    list.remove(i);
                }
                if list.is_empty() {
                    self.by_backend.remove(&ep.ip);
                    self.backend_pods.remove(&ep.ip);
                }
            }
        }
    }

    /// A ReplicaSet or Job and its controller (Deployment, CronJob), if it has one.
    pub fn apply_owner(
        &mut self,
        kind: Kind,
        namespace: &str,
        name: &str,
        owner: Option<(String, String)>,
    ) {
        self.listed(kind, (namespace.to_owned(), name.to_owned()));
        let key = (kind_name(kind).to_owned(), namespace.to_owned(), name.to_owned());
        match owner {
            Some(owner) => {
                if !self.owners.contains_key(&key) && self.owners.len() >= MAX_OWNERS {
                    self.overflow.owners += 1;
                    return;
                }
                self.owners.insert(key, owner);
            }
            None => {
                self.owners.remove(&key);
            }
        }
    }

    pub fn delete_owner(&mut self, kind: Kind, namespace: &str, name: &str) {
        self.owners.remove(&(kind_name(kind).to_owned(), namespace.to_owned(), name.to_owned()));
    }

    // ---- queries (the flow path) ----

    /// The pod that held `ip` at `at_ms` (Unix ms): among the pods whose tenure covers that
    /// time, the one whose tenure ended first (addresses are released when a pod is deleted, and
    /// IPAM hands them out again later, so a flow before the deletion was seen is the old pod's);
    /// else the current holder; else the last one within the grace period.
    pub fn pod_by_ip(&self, ip: IpAddr, at_ms: i64) -> Option<&Arc<PodMeta>> {
        let history = self.by_ip.get(&ip)?;
        history
            .iter()
            .filter(|t| t.from_ms <= at_ms && t.until_ms.is_none_or(|u| at_ms <= u))
            .min_by_key(|t| (t.until_ms.unwrap_or(i64::MAX), std::cmp::Reverse(t.from_ms)))
            .or_else(|| history.iter().filter(|t| t.until_ms.is_none()).max_by_key(|t| t.from_ms))
            .or_else(|| history.iter().max_by_key(|t| t.until_ms))
            .map(|t| &t.pod)
    }

    /// A pod by uid, also one deleted within the grace period.
    pub fn pod_by_uid(&self, uid: &str) -> Option<&Arc<PodMeta>> {
        self.pods.get(uid).or_else(|| self.deleted.get(uid).map(|(p, _)| p))
    }

    /// The service whose frontend (ClusterIP, external or load-balancer IP) is `ip`.
    pub fn service_by_frontend(&self, ip: IpAddr) -> Option<Service> {
        self.by_frontend
            .get(&ip)
            .map(|(ns, name)| Service { name: name.clone(), namespace: ns.clone() })
    }

    /// The service `ip:port` is a backend of (the first, when several list it).
    pub fn service_by_backend(&self, ip: IpAddr, port: u16) -> Option<Service> {
        self.by_backend
            .get(&ip)?
            .iter()
            .find(|(_, _, ports)| ports.is_empty() || ports.contains(&port))
            .map(|(ns, name, _)| Service { name: name.clone(), namespace: ns.clone() })
    }

    /// The pod behind a service backend address (any node): namespace and name only.
    pub fn backend_pod(&self, ip: IpAddr) -> Option<&(String, String)> {
        self.backend_pods.get(&ip)
    }

    /// The workloads that own `pod`: its controller resolved through ReplicaSets (to a
    /// Deployment) and Jobs (to a CronJob).
    pub fn workloads(&self, pod: &PodMeta) -> Vec<Workload> {
        let Some((kind, name)) = &pod.owner else { return Vec::new() };
        let lookup =
            |k: &str| self.owners.get(&(k.to_owned(), pod.namespace.clone(), name.clone()));
        let (kind, name) = match kind.as_str() {
            "ReplicaSet" => match lookup("ReplicaSet") {
                Some(owner) => owner.clone(),
                // The ReplicaSet is not known (yet): a Deployment's are named
                // `<deployment>-<pod-template-hash>`.
                None => match pod
                    .template_hash
                    .as_deref()
                    .and_then(|h| name.strip_suffix(&format!("-{h}")))
                {
                    Some(deployment) => ("Deployment".to_owned(), deployment.to_owned()),
                    None => (kind.clone(), name.clone()),
                },
            },
            "Job" => lookup("Job").cloned().unwrap_or_else(|| (kind.clone(), name.clone())),
            _ => (kind.clone(), name.clone()),
        };
        vec![Workload { name, kind }]
    }

    /// A flow endpoint for `pod`.
    pub fn endpoint(&self, pod: &PodMeta) -> Endpoint {
        Endpoint {
            namespace: pod.namespace.clone(),
            pod_name: pod.name.clone(),
            labels: pod.labels.clone(),
            workloads: self.workloads(pod),
            ..Endpoint::default()
        }
    }

    pub fn pod_count(&self) -> usize {
        self.pods.len()
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Pod => "Pod",
        Kind::Service => "Service",
        Kind::EndpointSlice => "EndpointSlice",
        Kind::ReplicaSet => "ReplicaSet",
        Kind::Job => "Job",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(uid: &str, name: &str, ip: &str, created_ms: i64) -> PodMeta {
        PodMeta {
            uid: uid.into(),
            namespace: "shop".into(),
            name: name.into(),
            labels: vec!["k8s:app=api".into()],
            owner: Some(("ReplicaSet".into(), "api-7d9f".into())),
            template_hash: Some("7d9f".into()),
            ips: vec![ip.parse().unwrap()],
            host_network: false,
            node: "n1".into(),
            created_ms,
            containers: Vec::new(),
        }
    }

    #[test]
    fn a_reused_address_names_the_pod_that_held_it_at_the_time() {
        let mut s = KubeState::default();
        let ip: IpAddr = "10.0.0.5".parse().unwrap();
        s.apply_pod(pod("a", "api-old", "10.0.0.5", 1_000));
        s.delete_pod("a", 5_000);
        s.apply_pod(pod("b", "api-new", "10.0.0.5", 6_000));
        assert_eq!(s.pod_by_ip(ip, 4_000).unwrap().name, "api-old");
        assert_eq!(s.pod_by_ip(ip, 7_000).unwrap().name, "api-new");
        // Before either: the current holder.
        assert_eq!(s.pod_by_ip(ip, 10).unwrap().name, "api-new");
        s.expire(5_001);
        assert_eq!(s.pod_by_ip(ip, 4_000).unwrap().name, "api-new");
        assert!(s.pod_by_uid("a").is_none());
    }

    #[test]
    fn a_deleted_pod_stays_resolvable_for_the_grace_period() {
        let mut s = KubeState::default();
        s.apply_pod(pod("a", "job-x", "10.0.0.9", 1_000));
        s.delete_pod("a", 2_000);
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        assert_eq!(s.pod_by_ip(ip, 2_500).unwrap().name, "job-x");
        assert_eq!(s.pod_by_uid("a").unwrap().name, "job-x");
        s.expire(3_000);
        assert!(s.pod_by_ip(ip, 2_500).is_none());
    }

    #[test]
    fn relist_forgets_what_was_deleted_while_the_watch_was_down() {
        let mut s = KubeState::default();
        s.init(Kind::Pod);
        s.apply_pod(pod("a", "a", "10.0.0.1", 0));
        s.apply_pod(pod("b", "b", "10.0.0.2", 0));
        s.init_done(Kind::Pod, 100);
        s.init(Kind::Pod);
        s.apply_pod(pod("b", "b", "10.0.0.2", 0));
        s.init_done(Kind::Pod, 200);
        assert_eq!(s.pod_count(), 1);
        // Deleted at the relist, resolvable during the grace period.
        assert_eq!(s.pod_by_uid("a").unwrap().name, "a");
        s.expire(201);
        assert!(s.pod_by_uid("a").is_none());
    }

    #[test]
    fn owners_resolve_to_deployments_and_cronjobs() {
        let mut s = KubeState::default();
        let p = pod("a", "api-7d9f-x", "10.0.0.1", 0);
        // Before the ReplicaSet is known: from the pod-template-hash.
        assert_eq!(
            s.workloads(&p),
            vec![Workload { name: "api".into(), kind: "Deployment".into() }]
        );
        s.apply_owner(
            Kind::ReplicaSet,
            "shop",
            "api-7d9f",
            Some(("Deployment".into(), "api-v2".into())),
        );
        assert_eq!(s.workloads(&p)[0].name, "api-v2");
        let mut j = pod("j", "backup-123-abc", "10.0.0.2", 0);
        j.owner = Some(("Job".into(), "backup-123".into()));
        assert_eq!(s.workloads(&j)[0].kind, "Job");
        s.apply_owner(Kind::Job, "shop", "backup-123", Some(("CronJob".into(), "backup".into())));
        assert_eq!(
            s.workloads(&j),
            vec![Workload { name: "backup".into(), kind: "CronJob".into() }]
        );
        let mut ss = pod("s", "pg-0", "10.0.0.3", 0);
        ss.owner = Some(("StatefulSet".into(), "pg".into()));
        assert_eq!(s.workloads(&ss)[0].kind, "StatefulSet");
    }

    #[test]
    fn services_by_frontend_and_backend() {
        let mut s = KubeState::default();
        s.apply_service(ServiceMeta {
            namespace: "shop".into(),
            name: "pg".into(),
            frontends: vec!["10.96.0.10".parse().unwrap()],
        });
        s.apply_slice(SliceMeta {
            namespace: "shop".into(),
            name: "pg-abc".into(),
            service: "pg".into(),
            ports: vec![5432],
            endpoints: vec![SliceEndpoint {
                ip: "10.0.1.7".parse().unwrap(),
                pod: Some(("shop".into(), "pg-0".into())),
            }],
        });
        assert_eq!(s.service_by_frontend("10.96.0.10".parse().unwrap()).unwrap().name, "pg");
        assert_eq!(s.service_by_backend("10.0.1.7".parse().unwrap(), 5432).unwrap().name, "pg");
        assert!(s.service_by_backend("10.0.1.7".parse().unwrap(), 22).is_none());
        assert_eq!(s.backend_pod("10.0.1.7".parse().unwrap()).unwrap().1, "pg-0");
        s.delete_slice("shop", "pg-abc");
        assert!(s.service_by_backend("10.0.1.7".parse().unwrap(), 5432).is_none());
        s.delete_service("shop", "pg");
        assert!(s.service_by_frontend("10.96.0.10".parse().unwrap()).is_none());
    }

    #[test]
    fn tables_are_bounded_and_count_what_they_drop() {
        let mut s = KubeState::default();
        for i in 0..MAX_OWNERS + 3 {
            s.apply_owner(Kind::Job, "ns", &format!("j{i}"), Some(("CronJob".into(), "c".into())));
        }
        assert_eq!(s.overflow.owners, 3);
    }
}
