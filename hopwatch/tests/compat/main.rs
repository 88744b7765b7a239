//! Wire compatibility: a client generated from `proto/` by another toolchain (Python
//! grpcio-tools, installed by `cargo xtask test` into `target/compat-venv`) calls the collector's
//! Hubble API and decodes the flows.
#![allow(
    unused_crate_dependencies,
    reason = "a test or bench target links every dependency of the package; the lint is for the library"
)]

#[path = "../collector/support.rs"]
#[allow(dead_code, reason = "shared with the collector tests; this one uses a part")]
mod support;

use std::{path::PathBuf, process::Command, sync::Arc, time::Duration};

use hopwatch::harness::{Batching, Queue, dial, run_remote};
use hopwatch_proto::{
    backoff::Backoff,
    flow::Verdict,
    hopwatch::v1::Hello,
    observer::get_flows_response::ResponseTypes,
    tls::{ClientTls, Target},
};
use tokio_util::sync::CancellationToken;

use self::support::*;

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

/// The virtualenv's Python (set `HOPWATCH_COMPAT_PYTHON` to use another one).
fn python() -> PathBuf {
    let p = std::env::var_os("HOPWATCH_COMPAT_PYTHON")
        .map_or_else(|| workspace().join("target/compat-venv/bin/python"), PathBuf::from);
    assert!(
        p.exists(),
        "{} is missing: run `cargo xtask test` (it creates the virtualenv from hopwatch/tests/compat/requirements.txt)",
        p.display()
    );
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpcio_tools_client_reads_the_collector() {
    let py = python();
    let out = tempfile::tempdir().unwrap();
    let proto = workspace().join("proto");
    let protoc = Command::new(&py)
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(&proto)
        .arg("--python_out")
        .arg(out.path())
        .arg("--grpc_python_out")
        .arg(out.path())
        .args([
            "flow/flow.proto",
            "relay/relay.proto",
            "observer/observer.proto",
            "hopwatch/v1/ingest.proto",
        ])
        .output()
        .expect("run grpc_tools.protoc");
    assert!(protoc.status.success(), "protoc failed:\n{}", String::from_utf8_lossy(&protoc.stderr));

    let dir = tempfile::tempdir().unwrap();
    let collector = Collector::start(free_port(), dir.path(), &[]);
    let url = collector.url();
    let queue = Arc::new(Queue::new(10_000, "py-node"));
    let stop = CancellationToken::new();
    let endpoint =
        Target::parse(&url, false).unwrap().endpoint(&ClientTls::default(), false).unwrap();
    let task = tokio::spawn(run_remote(
        queue.clone(),
        dial(endpoint),
        url.clone(),
        Hello {
            agent_id: "py-agent".into(),
            node_name: "py-node".into(),
            version: "test".into(),
            started: None,
        },
        Batching { max_events: 100, interval: Duration::from_millis(10) },
        Backoff { initial: Duration::from_millis(20), max: Duration::from_millis(200) },
        stop.clone(),
    ));
    let t0 = now_ns() - 1_000_000_000_000;
    // 100 flows: every tenth goes to 5432, and of those every other one is dropped.
    for k in 0..100 {
        let mut f = flow("py-node", k, t0 + k * 1_000_000, if k % 10 == 0 { 5432 } else { 80 });
        if let Some(ResponseTypes::Flow(flow)) = &mut f.response_types {
            if k % 20 == 0 {
                flow.verdict = Verdict::Dropped.into();
            }
            flow.tcp_stats = Some(hopwatch_proto::flow::TcpStats {
                connect_latency_ns: 1000 + u64::try_from(k).unwrap(),
                ..Default::default()
            });
        }
        queue.offer(f);
    }
    for _ in 0..500 {
        if queue.is_drained() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(queue.is_drained(), "flows stored");

    let script = workspace().join("hopwatch/tests/compat/client.py");
    let run = Command::new(&py)
        .arg(&script)
        .arg(out.path())
        .arg(format!("127.0.0.1:{}", collector.port))
        .output()
        .expect("run the Python client");
    assert!(
        run.status.success(),
        "Python client failed:\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&run.stdout).expect("JSON from the client");
    assert_eq!(v["status"]["num_flows"], "100", "uint64 fields are strings in proto3 JSON: {v}");
    assert_eq!(v["status"]["seen_flows"], "100");
    assert_eq!(v["status"]["num_unavailable_nodes"], serde_json::json!(0));
    assert!(v["status"]["version"].as_str().unwrap().starts_with("hopwatch "));
    assert_eq!(v["nodes"], serde_json::json!(["py-node"]));
    let flows = v["flows"].as_array().unwrap();
    // Port 5432 and not FORWARDED: k = 0, 20, 40, 60, 80; the last 5 are all of them.
    let uuids: Vec<&str> = flows.iter().map(|f| f["uuid"].as_str().unwrap()).collect();
    assert_eq!(uuids, ["py-node-0", "py-node-20", "py-node-40", "py-node-60", "py-node-80"]);
    for f in flows {
        assert_eq!(f["verdict"], "DROPPED");
        assert_eq!(f["source"], "10.0.0.1");
        assert_eq!(f["destination_port"], 5432);
        assert_eq!(f["node_name"], "py-node");
        assert_eq!(f["response_node_name"], "py-node");
    }
    assert_eq!(flows[1]["connect_latency_ns"], 1020);
    assert_eq!(
        v["notices"],
        serde_json::json!(["node_status"]),
        "the stream starts with node status"
    );
    assert_eq!(v["invalid_filter"], "INVALID_ARGUMENT");
    stop.cancel();
    task.await.unwrap();
}
