//! One flow's endpoints, services and names, from what the sources know now. No I/O: every
//! source is a cache its background task keeps current.
//!
//! An end is named by the best source that knows it:
//! 1. its process's cgroup, when the process runs on this node: the kubelet's pod cgroup names
//!    the pod (also a host-network pod, whose address is the node's), else the container id
//!    (with Docker's name and compose service when the Docker API is there), else the systemd
//!    unit;
//! 2. its address: the pod that held it at the flow's time, a static endpoints entry, or the pod
//!    behind a Service backend address (pods on other nodes, from EndpointSlices).
//!
//! With a translated destination (a Service's ClusterIP rewritten by kube-proxy), the destination
//! endpoint is the backend reached, `destination_service` the Service dialled, and
//! `translated_destination` the backend's address; `IP.destination` stays what the socket says.

use std::{
    net::{IpAddr, SocketAddr},
    time::Instant,
};

use hopwatch_proto::flow::{
    Endpoint, Flow, Process, Service, SocketAddress, Workload, layer4::Protocol,
};

use super::{
    cgroup::{CgroupCache, CgroupInfo},
    dns::{DnsNames, ReverseDns},
    kube::store::KubeState,
    static_endpoints::StaticEndpoints,
};

/// Read access to every source, for one batch of flows.
pub(crate) struct Sources<'a> {
    pub kube: Option<&'a KubeState>,
    pub statics: Option<&'a StaticEndpoints>,
    pub cgroups: Option<&'a CgroupCache>,
    #[cfg(feature = "docker")]
    pub docker: Option<&'a super::docker::DockerNames>,
    pub dns: Option<&'a DnsNames>,
    pub reverse: Option<&'a ReverseDns>,
    pub now: Instant,
}

fn ports(flow: &Flow) -> (u16, u16) {
    let (s, d) = match flow.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
        Some(Protocol::Tcp(t)) => (t.source_port, t.destination_port),
        Some(Protocol::Udp(u)) => (u.source_port, u.destination_port),
        _ => (0, 0),
    };
    (u16::try_from(s).unwrap_or(0), u16::try_from(d).unwrap_or(0))
}

/// The flow's time in Unix milliseconds.
fn flow_ms(flow: &Flow) -> i64 {
    flow.time
        .as_ref()
        .map_or_else(super::now_ms, |t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
}

/// Fills `flow`'s endpoints, services and names; `translated` is the backend a translated
/// destination really reached.
pub(crate) fn enrich(flow: &mut Flow, translated: Option<SocketAddr>, s: &Sources<'_>) {
    let Some(ip) = flow.ip.as_ref() else { return };
    let (Ok(src), Ok(dst)) = (ip.source.parse::<IpAddr>(), ip.destination.parse::<IpAddr>()) else {
        return;
    };
    let (_, dport) = ports(flow);
    let at = flow_ms(flow);
    if let Some(t) = translated {
        flow.translated_destination =
            Some(SocketAddress { ip: t.ip().to_string(), port: t.port().into() });
    }
    let (backend, backend_port) = translated.map_or((dst, dport), |t| (t.ip(), t.port()));
    let source = endpoint(src, flow.source_process.as_ref(), at, s);
    let destination = endpoint(backend, flow.destination_process.as_ref(), at, s);
    flow.destination_service = service_by_frontend(dst, s)
        .or_else(|| s.kube.and_then(|k| k.service_by_backend(backend, backend_port)));
    flow.source_service = service_by_frontend(src, s);
    flow.source_names = names(src, source.is_some(), s);
    flow.destination_names =
        names(dst, destination.is_some() || flow.destination_service.is_some(), s);
    if flow.destination_names.is_empty() && translated.is_some() {
        flow.destination_names = names(backend, destination.is_some(), s);
    }
    flow.source = Some(source.unwrap_or_default());
    flow.destination = Some(destination.unwrap_or_default());
}

fn service_by_frontend(ip: IpAddr, s: &Sources<'_>) -> Option<Service> {
    s.kube
        .and_then(|k| k.service_by_frontend(ip))
        .or_else(|| s.statics.and_then(|st| st.service(ip)))
}

/// DNS names for `ip`: observed answers first; a reverse lookup only for an address nothing else
/// names (`named`).
fn names(ip: IpAddr, named: bool, s: &Sources<'_>) -> Vec<String> {
    if let Some(n) = s.dns.and_then(|d| d.names(ip, s.now)) {
        return n.to_vec();
    }
    if named || ip.is_loopback() || ip.is_unspecified() {
        return Vec::new();
    }
    s.reverse.and_then(|r| r.name(ip, s.now)).into_iter().collect()
}

/// The endpoint at one end: `ip` its address, `process` its owner when on this node.
fn endpoint(
    ip: IpAddr,
    process: Option<&Process>,
    at_ms: i64,
    s: &Sources<'_>,
) -> Option<Endpoint> {
    let cgroup = process.zip(s.cgroups).and_then(|(p, c)| c.get(p.cgroup_id));
    let mut ep = None;
    let mut container_name = None;
    if let (Some(cg), Some(kube)) = (cgroup.as_deref(), s.kube)
        && let Some(pod) = cg.pod_uid.as_deref().and_then(|uid| kube.pod_by_uid(uid))
    {
        container_name = cg
            .container_id
            .as_deref()
            .and_then(|id| pod.containers.iter().find(|(cid, _)| cid == id))
            .map(|(_, name)| name.clone());
        ep = Some(kube.endpoint(pod));
    }
    if ep.is_none() {
        ep = by_address(ip, at_ms, s);
    }
    if let Some(cg) = cgroup.as_deref() {
        let ep = ep.get_or_insert_with(Endpoint::default);
        container_labels(ep, cg, container_name, s);
    }
    ep.filter(|e| *e != Endpoint::default())
}

fn by_address(ip: IpAddr, at_ms: i64, s: &Sources<'_>) -> Option<Endpoint> {
    if ip.is_loopback() || ip.is_unspecified() {
        return None;
    }
    if let Some(kube) = s.kube
        && let Some(pod) = kube.pod_by_ip(ip, at_ms)
    {
        return Some(kube.endpoint(pod));
    }
    if let Some(ep) = s.statics.and_then(|st| st.endpoint(ip)) {
        return Some(ep);
    }
    let (namespace, pod) = s.kube?.backend_pod(ip)?;
    Some(Endpoint { namespace: namespace.clone(), pod_name: pod.clone(), ..Endpoint::default() })
}

/// Adds the container or systemd unit labels, and for a Docker container outside Kubernetes its
/// name (as the pod name) and compose service (as the workload).
fn container_labels(ep: &mut Endpoint, cg: &CgroupInfo, name: Option<String>, s: &Sources<'_>) {
    if let Some(id) = &cg.container_id {
        ep.labels.push(format!("container.id={id}"));
        if let Some(rt) = cg.runtime {
            ep.labels.push(format!("container.runtime={rt}"));
        }
        #[cfg(feature = "docker")]
        let docker = s.docker.filter(|_| name.is_none()).and_then(|d| d.get(id));
        #[cfg(not(feature = "docker"))]
        let docker: Option<super::DockerContainer> = {
            let _ = s;
            None
        };
        let name =
            name.or_else(|| docker.as_ref().map(|d| d.name.clone())).filter(|n| !n.is_empty());
        if let Some(name) = &name {
            ep.labels.push(format!("container.name={name}"));
        }
        if let Some(d) = docker.filter(|_| ep.pod_name.is_empty()) {
            ep.pod_name = d.name;
            if let Some(project) = d.compose_project {
                ep.namespace = project;
            }
            if let Some(service) = d.compose_service {
                ep.workloads = vec![Workload { name: service, kind: "ComposeService".into() }];
            }
        }
    } else if let Some(unit) = &cg.unit {
        ep.labels.push(format!("systemd.unit={unit}"));
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use hopwatch_proto::flow::{Ip, Layer4, Tcp};

    use super::*;
    use crate::identity::kube::store::{PodMeta, ServiceMeta, SliceEndpoint, SliceMeta};

    fn flow(src: &str, sport: u32, dst: &str, dport: u32) -> Flow {
        Flow {
            ip: Some(Ip { source: src.into(), destination: dst.into(), ..Ip::default() }),
            l4: Some(Layer4 {
                protocol: Some(Protocol::Tcp(Tcp {
                    source_port: sport,
                    destination_port: dport,
                    flags: None,
                })),
            }),
            time: Some(prost_types::Timestamp { seconds: 1_800_000_000, nanos: 0 }),
            ..Flow::default()
        }
    }

    fn state() -> KubeState {
        let mut s = KubeState::default();
        for (uid, name, ip, owner) in [
            ("u1", "api-7d9f-x", "10.0.0.5", ("ReplicaSet", "api-7d9f")),
            ("u2", "pg-0", "10.0.1.7", ("StatefulSet", "pg")),
        ] {
            s.apply_pod(PodMeta {
                uid: uid.into(),
                namespace: "shop".into(),
                name: name.into(),
                labels: vec![format!("k8s:app={}", &name[..2])],
                owner: Some((owner.0.into(), owner.1.into())),
                template_hash: Some("7d9f".into()),
                ips: vec![ip.parse().unwrap()],
                host_network: false,
                node: "n1".into(),
                created_ms: 0,
                containers: Vec::new(),
            });
        }
        s.apply_service(ServiceMeta {
            namespace: "shop".into(),
            name: "pg".into(),
            frontends: vec!["10.96.0.10".parse().unwrap()],
        });
        s.apply_slice(SliceMeta {
            namespace: "shop".into(),
            name: "pg-1".into(),
            service: "pg".into(),
            ports: vec![5432],
            endpoints: vec![SliceEndpoint {
                ip: "10.0.1.7".parse().unwrap(),
                pod: Some(("shop".into(), "pg-0".into())),
            }],
        });
        s
    }

    fn sources<'a>(kube: &'a KubeState, statics: &'a StaticEndpoints) -> Sources<'a> {
        Sources {
            kube: Some(kube),
            statics: Some(statics),
            cgroups: None,
            #[cfg(feature = "docker")]
            docker: None,
            dns: None,
            reverse: None,
            now: Instant::now(),
        }
    }

    #[test]
    fn a_translated_connection_names_the_service_and_the_backend() {
        let kube = state();
        let statics = StaticEndpoints::default();
        let mut f = flow("10.0.0.5", 40000, "10.96.0.10", 5432);
        enrich(&mut f, Some("10.0.1.7:5432".parse().unwrap()), &sources(&kube, &statics));
        let src = f.source.as_ref().unwrap();
        assert_eq!((src.namespace.as_str(), src.pod_name.as_str()), ("shop", "api-7d9f-x"));
        assert_eq!(src.workloads, vec![Workload { name: "api".into(), kind: "Deployment".into() }]);
        assert_eq!(f.destination.as_ref().unwrap().pod_name, "pg-0");
        assert_eq!(
            f.destination_service,
            Some(Service { name: "pg".into(), namespace: "shop".into() })
        );
        assert_eq!(
            f.translated_destination,
            Some(SocketAddress { ip: "10.0.1.7".into(), port: 5432 })
        );
        assert_eq!(f.ip.as_ref().unwrap().destination, "10.96.0.10", "what the app dialled stays");
    }

    #[test]
    fn a_direct_connection_to_a_backend_names_its_service_from_the_endpointslices() {
        // Cilium's socket load balancing, a headless service, or the server's own flow.
        let kube = state();
        let statics = StaticEndpoints::default();
        let mut f = flow("10.0.0.5", 40000, "10.0.1.7", 5432);
        enrich(&mut f, None, &sources(&kube, &statics));
        assert_eq!(f.destination_service.as_ref().unwrap().name, "pg");
        assert_eq!(f.translated_destination, None);
        let mut other_port = flow("10.0.0.5", 40000, "10.0.1.7", 22);
        enrich(&mut other_port, None, &sources(&kube, &statics));
        assert_eq!(other_port.destination_service, None, "only the service's ports");
    }

    #[test]
    fn static_entries_name_what_kubernetes_does_not() {
        let kube = state();
        let statics = StaticEndpoints::parse(
            Path::new("e.yaml"),
            "endpoints:\n  - name: billing-db\n    namespace: legacy\n    ips: [192.168.5.0/24]\n",
        )
        .unwrap();
        let mut f = flow("10.0.0.5", 40000, "192.168.5.20", 5432);
        enrich(&mut f, None, &sources(&kube, &statics));
        assert_eq!(f.destination.as_ref().unwrap().pod_name, "billing-db");
        let mut unknown = flow("10.9.9.9", 1, "8.8.8.8", 53);
        enrich(&mut unknown, None, &sources(&kube, &statics));
        assert_eq!(unknown.source, Some(Endpoint::default()));
        assert!(unknown.destination_names.is_empty());
    }
}
