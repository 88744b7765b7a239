//! A Kubernetes API server for tests, speaking the paths and the list/watch contract kube-rs
//! uses: `GET <collection>?limit=..&fieldSelector=..` answers a `<Kind>List` with a
//! `resourceVersion`; `?watch=true&resourceVersion=N` streams newline-delimited watch events from
//! that version on; a version older than the server keeps history for, or [`KubeApi::expire`],
//! answers `410 Gone` (an `ERROR` event with a `Status`), after which a client must list again.
//! Metadata-only requests (`Accept: ...;as=PartialObjectMetadataList`) get metadata-only objects.
//! The objects are the JSON a real API server serves (list items without `kind`/`apiVersion`,
//! watch objects with them).

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::{Request, Response, StatusCode, body::Frame};
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// One kind of object the server holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Res {
    Pods,
    Services,
    EndpointSlices,
    ReplicaSets,
    Jobs,
}

impl Res {
    const ALL: [Self; 5] =
        [Self::Pods, Self::Services, Self::EndpointSlices, Self::ReplicaSets, Self::Jobs];

    fn path(self) -> &'static str {
        match self {
            Self::Pods => "/api/v1/pods",
            Self::Services => "/api/v1/services",
            Self::EndpointSlices => "/apis/discovery.k8s.io/v1/endpointslices",
            Self::ReplicaSets => "/apis/apps/v1/replicasets",
            Self::Jobs => "/apis/batch/v1/jobs",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Self::Pods => "Pod",
            Self::Services => "Service",
            Self::EndpointSlices => "EndpointSlice",
            Self::ReplicaSets => "ReplicaSet",
            Self::Jobs => "Job",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Self::Pods | Self::Services => "v1",
            Self::EndpointSlices => "discovery.k8s.io/v1",
            Self::ReplicaSets => "apps/v1",
            Self::Jobs => "batch/v1",
        }
    }
}

struct Watch {
    res: Res,
    node: Option<String>,
    meta_only: bool,
    tx: mpsc::UnboundedSender<Value>,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// Oldest resource version a watch may resume from (older ones get 410 Gone).
    oldest: u64,
    objects: BTreeMap<(Res, String, String), Value>,
    watches: Vec<Watch>,
    /// `METHOD path?query` of every request, for assertions.
    log: Vec<String>,
}

/// The server and its objects; stops when dropped.
pub(super) struct KubeApi {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    _runtime: tokio::runtime::Runtime,
}

fn node_of(obj: &Value) -> Option<&str> {
    obj["spec"]["nodeName"].as_str()
}

fn view(res: Res, obj: &Value, meta_only: bool, with_type: bool) -> Value {
    let mut v = if meta_only { json!({ "metadata": obj["metadata"] }) } else { obj.clone() };
    if with_type {
        if meta_only {
            v["apiVersion"] = json!("meta.k8s.io/v1");
            v["kind"] = json!("PartialObjectMetadata");
        } else {
            v["apiVersion"] = json!(res.api_version());
            v["kind"] = json!(res.kind());
        }
    }
    v
}

impl State {
    fn notify(&mut self, res: Res, kind: &str, obj: &Value) {
        self.watches.retain(|w| {
            if w.res != res || w.node.as_deref().is_some_and(|n| node_of(obj) != Some(n)) {
                return !w.tx.is_closed();
            }
            w.tx.send(json!({ "type": kind, "object": view(res, obj, w.meta_only, true) })).is_ok()
        });
    }

    fn put(&mut self, res: Res, mut obj: Value, notify: bool) {
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let key = (
            res,
            obj["metadata"]["namespace"].as_str().unwrap_or("").to_owned(),
            obj["metadata"]["name"].as_str().expect("named").to_owned(),
        );
        let kind = if self.objects.contains_key(&key) { "MODIFIED" } else { "ADDED" };
        if notify {
            self.notify(res, kind, &obj);
        }
        self.objects.insert(key, obj);
    }

    fn remove(&mut self, res: Res, namespace: &str, name: &str, notify: bool) {
        if let Some(mut obj) = self.objects.remove(&(res, namespace.to_owned(), name.to_owned())) {
            self.rv += 1;
            obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
            if notify {
                self.notify(res, "DELETED", &obj);
            }
        }
    }
}

/// Changes made to the server while its watches are down (no events for them).
pub(super) struct Silent<'a>(&'a mut State);

impl Silent<'_> {
    pub(super) fn put(&mut self, res: Res, obj: Value) {
        self.0.put(res, obj, false);
    }

    pub(super) fn remove(&mut self, res: Res, namespace: &str, name: &str) {
        self.0.remove(res, namespace, name, false);
    }
}

impl KubeApi {
    pub(super) fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("test runtime");
        let state: Arc<Mutex<State>> = Arc::default();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind the test API server on loopback");
        let addr = listener.local_addr().expect("bound");
        runtime.spawn({
            let state = state.clone();
            async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else { return };
                    let state = state.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req| {
                            let state = state.clone();
                            async move { Ok::<_, Infallible>(handle(&state, &req)) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                    });
                }
            }
        });
        Self { addr, state, _runtime: runtime }
    }

    /// A kubeconfig pointing at this server (plain HTTP on loopback, no credentials).
    pub(super) fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: http://{}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\nusers:\n- name: test\n  user: {{}}\ncurrent-context: test\n",
            self.addr
        )
    }

    /// Adds or replaces an object, telling the watches.
    pub(super) fn put(&self, res: Res, obj: Value) {
        self.state.lock().unwrap().put(res, obj, true);
    }

    pub(super) fn remove(&self, res: Res, namespace: &str, name: &str) {
        self.state.lock().unwrap().remove(res, namespace, name, true);
    }

    /// Compacts history: every open watch ends with `410 Gone` and no resume point older than
    /// now is accepted; `changes` happen in between, seen by clients only through a new list.
    pub(super) fn expire(&self, changes: impl FnOnce(&mut Silent<'_>)) {
        let mut s = self.state.lock().unwrap();
        let gone = json!({
            "type": "ERROR",
            "object": {
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("too old resource version: 1 ({})", s.rv),
                "reason": "Expired", "code": 410
            }
        });
        for w in s.watches.drain(..) {
            let _ = w.tx.send(gone.clone());
        }
        changes(&mut Silent(&mut s));
        s.oldest = s.rv;
    }

    /// Requests so far whose path starts with `res`'s and that are lists (not watches).
    pub(super) fn lists(&self, res: Res) -> usize {
        self.state
            .lock()
            .unwrap()
            .log
            .iter()
            .filter(|l| {
                l.split('?').next() == Some(&format!("GET {}", res.path()))
                    && !l.contains("watch=true")
            })
            .count()
    }

    pub(super) fn log(&self) -> Vec<String> {
        self.state.lock().unwrap().log.clone()
    }
}

fn query(req: &Request<hyper::body::Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.replace("%3D", "=").replace("%3d", "=")))
        .collect()
}

fn json_response(status: StatusCode, body: &Value) -> Response<BoxBody<Bytes, Infallible>> {
    Response::builder()
        .status(status)
        .header("Content-Type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .expect("valid response")
}

fn handle(
    state: &Arc<Mutex<State>>,
    req: &Request<hyper::body::Incoming>,
) -> Response<BoxBody<Bytes, Infallible>> {
    let mut s = state.lock().unwrap();
    s.log.push(format!("{} {}", req.method(), req.uri()));
    let Some(res) = Res::ALL.into_iter().find(|r| req.uri().path() == r.path()) else {
        return json_response(
            StatusCode::NOT_FOUND,
            &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}),
        );
    };
    let q = query(req);
    let meta_only = req
        .headers()
        .get(hyper::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=PartialObjectMetadata"));
    let node =
        q.get("fieldSelector").and_then(|f| f.strip_prefix("spec.nodeName=")).map(str::to_owned);
    let selected = |obj: &&Value| node.as_deref().is_none_or(|n| node_of(obj) == Some(n));
    if q.get("watch").map(String::as_str) == Some("true") {
        let from: u64 = q.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
        if from < s.oldest {
            return json_response(
                StatusCode::GONE,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": "too old resource version", "reason": "Expired", "code": 410}),
            );
        }
        let (tx, rx) = mpsc::unbounded_channel::<Value>();
        // Objects changed after the client's version (this server keeps no deletion history,
        // which tests do not need between a list and its watch).
        for ((r, _, _), obj) in &s.objects {
            let v: u64 = obj["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if *r == res && v > from && selected(&obj) {
                let _ =
                    tx.send(json!({"type": "ADDED", "object": view(res, obj, meta_only, true)}));
            }
        }
        s.watches.push(Watch { res, node, meta_only, tx });
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            let ev = rx.recv().await?;
            let done = ev["type"] == "ERROR";
            let frame = Ok::<_, Infallible>(Frame::data(Bytes::from(format!("{ev}\n"))));
            // After an ERROR event the server ends the stream, as the API server does.
            if done {
                rx.close();
            }
            Some((frame, rx))
        });
        return Response::builder()
            .header("Content-Type", "application/json")
            .body(StreamBody::new(stream).boxed())
            .expect("valid response");
    }
    let items: Vec<Value> = s
        .objects
        .iter()
        .filter(|((r, _, _), _)| *r == res)
        .map(|(_, o)| o)
        .filter(selected)
        .map(|o| view(res, o, meta_only, false))
        .collect();
    let (api_version, kind) = if meta_only {
        ("meta.k8s.io/v1".to_owned(), "PartialObjectMetadataList".to_owned())
    } else {
        (res.api_version().to_owned(), format!("{}List", res.kind()))
    };
    json_response(
        StatusCode::OK,
        &json!({"apiVersion": api_version, "kind": kind, "metadata": {"resourceVersion": s.rv.to_string()}, "items": items}),
    )
}

// ---- objects as the API serves them ----

pub(super) fn pod(
    namespace: &str,
    name: &str,
    uid: &str,
    node: &str,
    ip: &str,
    owner: Option<(&str, &str)>,
    labels: &Value,
) -> Value {
    let mut meta = json!({
        "name": name, "namespace": namespace, "uid": uid,
        "creationTimestamp": "2024-05-01T10:00:00Z", "labels": labels,
    });
    if let Some((kind, owner_name)) = owner {
        meta["ownerReferences"] = json!([{
            "apiVersion": "apps/v1", "kind": kind, "name": owner_name,
            "uid": format!("{uid}-owner"), "controller": true, "blockOwnerDeletion": true
        }]);
    }
    json!({
        "metadata": meta,
        "spec": { "nodeName": node, "containers": [{"name": "app", "image": "app:1"}] },
        "status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
            "containerStatuses": [{
                "name": "app", "ready": true, "restartCount": 0, "image": "app:1", "imageID": "",
                "containerID": format!("containerd://{}", "ab".repeat(32))
            }]
        }
    })
}

pub(super) fn owned(namespace: &str, name: &str, owner: Option<(&str, &str)>) -> Value {
    let mut meta = json!({"name": name, "namespace": namespace, "uid": format!("{name}-uid")});
    if let Some((kind, owner_name)) = owner {
        meta["ownerReferences"] = json!([{
            "apiVersion": "apps/v1", "kind": kind, "name": owner_name, "uid": format!("{owner_name}-uid"), "controller": true
        }]);
    }
    json!({ "metadata": meta, "spec": {} })
}

pub(super) fn service(namespace: &str, name: &str, cluster_ip: &str, port: u16) -> Value {
    json!({
        "metadata": {"name": name, "namespace": namespace, "uid": format!("{name}-svc")},
        "spec": {
            "type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
            "ports": [{"name": "main", "port": port, "protocol": "TCP", "targetPort": port}]
        }
    })
}

pub(super) fn slice(namespace: &str, service: &str, port: u16, backends: &[(&str, &str)]) -> Value {
    json!({
        "metadata": {
            "name": format!("{service}-x7k2p"), "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service}
        },
        "addressType": "IPv4",
        "ports": [{"name": "main", "port": port, "protocol": "TCP"}],
        "endpoints": backends.iter().map(|(ip, pod)| json!({
            "addresses": [ip], "conditions": {"ready": true},
            "targetRef": {"kind": "Pod", "namespace": namespace, "name": pod}
        })).collect::<Vec<_>>()
    })
}
