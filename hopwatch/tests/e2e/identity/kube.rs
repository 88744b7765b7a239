//! Kubernetes metadata against the API contract: a test API server (`kubeapi.rs`) serves pods,
//! services, EndpointSlices, ReplicaSets and Jobs to the real kube-rs watchers, then changes them
//! — pods replaced on the same address, scale-up, a watch that breaks with `410 Gone` while
//! objects change unseen — and the metadata layer must follow. The last test runs the agent
//! against that server: flows between test pods, through a ClusterIP translated like kube-proxy
//! does, are named with pods, workloads and the service.

use std::{
    net::IpAddr,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use hopwatch::harness::{Kind, KubeSource, KubeState, PodScope, Source};
use serde_json::{Value, json};

use super::{
    TempFile, accept_logger, connect_many,
    dnat::{Balancing, kube_proxy_rules},
    kubeapi::{KubeApi, Res, owned, pod, service, slice},
    labels, wait_identity,
};
use crate::support::{
    Testbed,
    agent::{Agent, ip_src, socket_event, tcp_port},
    serial,
};

const NODE: &str = "e2e-node";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

/// Polls `state` until `ok` holds (the watchers apply events asynchronously).
fn eventually(state: &Arc<RwLock<KubeState>>, what: &str, ok: impl Fn(&KubeState) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !ok(&state.read().unwrap()) {
        assert!(Instant::now() < deadline, "metadata layer never saw: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn pod_name(state: &KubeState, addr: &str, at_ms: i64) -> Option<String> {
    state.pod_by_ip(ip(addr), at_ms).map(|p| p.name.clone())
}

fn workload(state: &KubeState, addr: &str) -> Option<(String, String)> {
    let p = state.pod_by_ip(ip(addr), hopwatch_proto::clock::now_ms())?;
    state.workloads(p).first().map(|w| (w.kind.clone(), w.name.clone()))
}

fn with_created(mut p: Value, at: &str) -> Value {
    p["metadata"]["creationTimestamp"] = json!(at);
    p
}

#[test]
#[expect(clippy::too_many_lines, reason = "one scenario: list, churn, 410 relist, resumed watch")]
fn metadata_layer_follows_pods_services_owners_and_watch_restarts() {
    let api = KubeApi::start();
    api.put(Res::ReplicaSets, owned("shop", "api-7d9f", Some(("Deployment", "api"))));
    api.put(Res::Jobs, owned("ops", "backup-28", Some(("CronJob", "backup"))));
    let app = json!({"app": "api", "pod-template-hash": "7d9f"});
    api.put(
        Res::Pods,
        pod(
            "shop",
            "api-7d9f-x",
            "uid-x",
            NODE,
            "10.77.0.5",
            Some(("ReplicaSet", "api-7d9f")),
            &app,
        ),
    );
    api.put(
        Res::Pods,
        pod(
            "ops",
            "backup-28-abc",
            "uid-j",
            NODE,
            "10.77.0.6",
            Some(("Job", "backup-28")),
            &json!({}),
        ),
    );
    api.put(
        Res::Pods,
        pod("shop", "far-away", "uid-far", "other-node", "10.77.0.7", None, &json!({})),
    );
    api.put(
        Res::Pods,
        pod("shop", "pg-0", "uid-pg", NODE, "10.77.0.8", Some(("StatefulSet", "pg")), &json!({})),
    );
    api.put(Res::Services, service("shop", "api", "10.96.0.10", 80));
    api.put(
        Res::EndpointSlices,
        slice(
            "shop",
            "api",
            8080,
            &[("10.77.0.5", "api-7d9f-x"), ("10.77.1.9", "api-7d9f-remote")],
        ),
    );
    let kubeconfig = TempFile::new("kubeconfig", &api.kubeconfig());

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let cancel = tokio_util::sync::CancellationToken::new();
    let source = runtime
        .block_on(KubeSource::start(
            &Source::Kubeconfig(kubeconfig.0.clone()),
            &PodScope::Node(NODE.into()),
            Duration::from_mins(1),
            &cancel,
        ))
        .expect("kube source starts");
    let state = source.state.clone();
    eventually(&state, "the initial lists", |s| {
        [Kind::Pod, Kind::Service, Kind::EndpointSlice, Kind::ReplicaSet, Kind::Job]
            .iter()
            .all(|k| s.synced.contains(k))
    });
    let now = hopwatch_proto::clock::now_ms();
    {
        let s = state.read().unwrap();
        assert_eq!(pod_name(&s, "10.77.0.5", now).as_deref(), Some("api-7d9f-x"));
        assert_eq!(workload(&s, "10.77.0.5"), Some(("Deployment".into(), "api".into())));
        assert_eq!(workload(&s, "10.77.0.6"), Some(("CronJob".into(), "backup".into())));
        assert_eq!(workload(&s, "10.77.0.8"), Some(("StatefulSet".into(), "pg".into())));
        assert!(
            s.pod_by_ip(ip("10.77.0.5"), now).unwrap().labels.contains(&"k8s:app=api".to_owned())
        );
        // The field selector keeps other nodes' pods out; services name their remote backends.
        assert_eq!(pod_name(&s, "10.77.0.7", now), None);
        assert_eq!(s.service_by_frontend(ip("10.96.0.10")).unwrap().name, "api");
        assert_eq!(s.service_by_backend(ip("10.77.0.5"), 8080).unwrap().name, "api");
        assert_eq!(s.backend_pod(ip("10.77.1.9")).unwrap().1, "api-7d9f-remote");
    }
    let pod_lists = api.lists(Res::Pods);
    assert!(
        api.log().iter().any(|l| l.starts_with("GET /api/v1/pods?")
            && l.contains("spec.nodeName")
            && l.contains(NODE)),
        "pods are listed for this node only: {:?}",
        api.log()
    );

    // Churn: a rollout replaces api-7d9f-x by api-7d9f-y on the same address; an HPA adds z.
    let before_replace = hopwatch_proto::clock::now_ms();
    std::thread::sleep(Duration::from_millis(20));
    api.remove(Res::Pods, "shop", "api-7d9f-x");
    let y = with_created(
        pod(
            "shop",
            "api-7d9f-y",
            "uid-y",
            NODE,
            "10.77.0.5",
            Some(("ReplicaSet", "api-7d9f")),
            &app,
        ),
        &humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
    );
    api.put(Res::Pods, y);
    api.put(
        Res::Pods,
        pod(
            "shop",
            "api-7d9f-z",
            "uid-z",
            NODE,
            "10.77.0.9",
            Some(("ReplicaSet", "api-7d9f")),
            &app,
        ),
    );
    eventually(&state, "the replacement and the scale-up", |s| {
        s.pod_by_uid("uid-y").is_some() && s.pod_by_uid("uid-z").is_some()
    });
    {
        let s = state.read().unwrap();
        let later = hopwatch_proto::clock::now_ms() + 1000;
        assert_eq!(
            pod_name(&s, "10.77.0.5", later).as_deref(),
            Some("api-7d9f-y"),
            "new flows name the new pod"
        );
        assert_eq!(
            pod_name(&s, "10.77.0.5", before_replace).as_deref(),
            Some("api-7d9f-x"),
            "a flow from before the replacement names the pod that had the address then"
        );
        assert_eq!(
            s.pod_by_uid("uid-x").unwrap().name,
            "api-7d9f-x",
            "deleted pods stay for the grace period"
        );
        assert_eq!(pod_name(&s, "10.77.0.9", later).as_deref(), Some("api-7d9f-z"));
    }

    // The watch breaks with 410 Gone while z is scaled down and w starts, unseen: the relist
    // must bring both changes.
    api.expire(|silent| {
        silent.remove(Res::Pods, "shop", "api-7d9f-z");
        silent.put(
            Res::Pods,
            pod(
                "shop",
                "api-7d9f-w",
                "uid-w",
                NODE,
                "10.77.0.10",
                Some(("ReplicaSet", "api-7d9f")),
                &app,
            ),
        );
        silent.remove(Res::Services, "shop", "api");
    });
    eventually(&state, "the relist after 410 Gone", |s| {
        s.pod_by_uid("uid-w").is_some() && s.service_by_frontend(ip("10.96.0.10")).is_none()
    });
    assert!(api.lists(Res::Pods) > pod_lists, "pods were listed again after 410 Gone");
    {
        let s = state.read().unwrap();
        let later = hopwatch_proto::clock::now_ms() + 1000;
        assert_eq!(pod_name(&s, "10.77.0.10", later).as_deref(), Some("api-7d9f-w"));
        // z is gone from the live set (its uid stays resolvable for the grace period).
        assert!(s.pod_count() == 4, "live pods: backup, pg, y, w; got {}", s.pod_count());
    }
    // Watches resume after the relist: a change is seen again through events.
    api.put(Res::Services, service("shop", "api", "10.96.0.10", 80));
    eventually(&state, "the service back through the resumed watch", |s| {
        s.service_by_frontend(ip("10.96.0.10")).is_some()
    });
    cancel.cancel();
    drop(source);
}

#[test]
fn flows_are_named_from_the_kubernetes_api() {
    let _serial = serial();
    let mut tb = Testbed::new();
    let client = tb.pod("api");
    let (a, b) = (tb.pod("pg-0"), tb.pod("pg-1"));
    let [o0, o1, o2, _] = client.ip.octets();
    let vip = std::net::Ipv4Addr::new(o0, o1, o2, 250);
    let api = KubeApi::start();
    api.put(Res::ReplicaSets, owned("shop", "api-7d9f", Some(("Deployment", "api"))));
    let app = json!({"app": "api", "pod-template-hash": "7d9f"});
    api.put(
        Res::Pods,
        pod(
            "shop",
            "api-7d9f-x",
            "uid-x",
            NODE,
            &client.ip.to_string(),
            Some(("ReplicaSet", "api-7d9f")),
            &app,
        ),
    );
    for (p, name) in [(&a, "pg-0"), (&b, "pg-1")] {
        api.put(
            Res::Pods,
            pod(
                "shop",
                name,
                &format!("uid-{name}"),
                NODE,
                &p.ip.to_string(),
                Some(("StatefulSet", "pg")),
                &json!({"app": "pg"}),
            ),
        );
    }
    api.put(Res::Services, service("shop", "pg", &vip.to_string(), 80));
    api.put(
        Res::EndpointSlices,
        slice("shop", "pg", 8080, &[(&a.ip.to_string(), "pg-0"), (&b.ip.to_string(), "pg-1")]),
    );
    let kubeconfig = TempFile::new("agent-kubeconfig", &api.kubeconfig());
    let agent = Agent::start(&["--kubeconfig", kubeconfig.path()]);
    let line = wait_identity(&agent);
    assert!(line.contains("kubernetes (pods on e2e-node)"), "{line}");
    accept_logger(&mut tb, &a, 8080);
    accept_logger(&mut tb, &b, 8080);
    kube_proxy_rules(&client, vip, &[&a, &b], Balancing::Random);
    // Let the watchers list everything (they start with the agent).
    let deadline = Instant::now() + Duration::from_secs(10);
    while api.lists(Res::EndpointSlices) == 0 || api.lists(Res::Pods) == 0 {
        assert!(Instant::now() < deadline, "the agent never listed: {:?}", api.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));

    let connect = |expected_pod: &str| {
        let (_, ports) = connect_many(&client, vip.into(), 80, 1);
        let f = agent.wait_for("CONNECT to the service", Duration::from_secs(15), |f| {
            socket_event(f) == "CONNECT"
                && ip_src(f) == client.ip.to_string()
                && tcp_port(f, "source_port") == u64::from(ports[0])
        });
        assert_eq!(f["source"]["namespace"], "shop", "{f}");
        assert_eq!(f["source"]["pod_name"], expected_pod, "{f}");
        assert_eq!(
            f["source"]["workloads"][0],
            json!({"name": "api", "kind": "Deployment"}),
            "{f}"
        );
        assert!(labels(&f["source"]).contains(&"k8s:app=api".to_owned()), "{f}");
        assert_eq!(f["destination_service"], json!({"name": "pg", "namespace": "shop"}), "{f}");
        let backend = f["translated_destination"]["ip"].as_str().expect("translated").to_owned();
        let pg = if backend == a.ip.to_string() { "pg-0" } else { "pg-1" };
        assert_eq!(f["destination"]["pod_name"], pg, "{f}");
        assert_eq!(
            f["destination"]["workloads"][0],
            json!({"name": "pg", "kind": "StatefulSet"}),
            "{f}"
        );
        f
    };
    connect("api-7d9f-x");
    // A rollout: the pod is replaced by one with the same address; new flows name the new pod.
    api.remove(Res::Pods, "shop", "api-7d9f-x");
    let mut y = pod(
        "shop",
        "api-7d9f-y",
        "uid-y",
        NODE,
        &client.ip.to_string(),
        Some(("ReplicaSet", "api-7d9f")),
        &app,
    );
    y["metadata"]["creationTimestamp"] =
        json!(humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string());
    api.put(Res::Pods, y);
    std::thread::sleep(Duration::from_millis(1500));
    connect("api-7d9f-y");
}
