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

#[path = "../collector/flag_cases.rs"]
#[allow(dead_code, reason = "shared with the collector tests; this one uses a part")]
mod flag_cases;

use std::{
    io::Write as _,
    path::PathBuf,
    process::{Command, Stdio},
    sync::Arc,
    time::Duration,
};

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

/// An agent's link to the collector at `url`, fed through the returned queue (of `cap` flows)
/// until `stop`.
fn stream_to(
    url: &str,
    node: &str,
    cap: usize,
) -> (Arc<Queue>, CancellationToken, tokio::task::JoinHandle<()>) {
    let queue = Arc::new(Queue::new(cap, node));
    let stop = CancellationToken::new();
    let endpoint =
        Target::parse(url, false).unwrap().endpoint(&ClientTls::default(), false).unwrap();
    let task = tokio::spawn(run_remote(
        queue.clone(),
        dial(endpoint),
        url.to_owned(),
        Hello {
            agent_id: format!("{node}-agent"),
            node_name: node.to_owned(),
            version: "test".into(),
            started: None,
        },
        Batching { max_events: 100, interval: Duration::from_millis(10) },
        Backoff { initial: Duration::from_millis(20), max: Duration::from_millis(200) },
        stop.clone(),
    ));
    (queue, stop, task)
}

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
    let (queue, stop, task) = stream_to(&url, "py-node", 10_000);
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

/// `allowlist:`/`denylist:` YAML from `observe --print-raw-filters` → the JSON filters.
fn raw_filters(yaml: &str) -> (Vec<String>, Vec<String>) {
    let (mut allow, mut deny) = (Vec::new(), Vec::new());
    let mut into_deny = false;
    for line in yaml.lines() {
        match line {
            "allowlist:" => into_deny = false,
            "denylist:" => into_deny = true,
            "{}" => {}
            _ => {
                let json = line
                    .strip_prefix("    - '")
                    .and_then(|l| l.strip_suffix('\''))
                    .unwrap_or_else(|| panic!("unexpected line {line:?}"))
                    .replace("''", "'");
                if into_deny { deny.push(json) } else { allow.push(json) }
            }
        }
    }
    (allow, deny)
}

/// The filters `hopwatch observe` builds for every Hubble flag case, sent by a client generated
/// from Cilium's published API (`cilium_client.py`, from the facts in
/// `hopwatch-proto/src/cilium_api.tsv`): they select the same flows as the CLI does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_generated_from_cilium_s_api_gets_the_same_flows_as_observe() {
    let py = python();
    let dir = tempfile::tempdir().unwrap();
    let collector = Collector::start(free_port(), dir.path(), &[]);
    let url = collector.url();
    let (queue, stop, task) = stream_to(&url, "n1", 1000);
    for f in flag_cases::hubble_flag_flows(now_ns() - 60_000_000_000) {
        queue.offer(f);
    }
    for _ in 0..500 {
        if queue.is_drained() && status(&url).await.is_some_and(|s| s.num_flows == 3) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let server = ["--server".to_owned(), format!("127.0.0.1:{}", collector.port)];

    // One request per flag case, as the CLI builds it; then Cilium-only fields and a field mask.
    let cases = flag_cases::cases();
    let mut requests = String::new();
    let mut hopwatch_only = Vec::new();
    for (args, _, _) in &cases {
        let (code, yaml, err) = flag_cases::run(
            &[&server[..], &args[..], &["--print-raw-filters".to_owned()]].concat(),
            None,
        );
        assert_eq!(code, Some(0), "{args:?}: {err}");
        let (allow, deny) = raw_filters(&yaml);
        hopwatch_only.push(allow.iter().chain(&deny).any(|f| f.contains("kernel_drop_reason")));
        let line = serde_json::json!({"allowlist": allow, "denylist": deny});
        requests.push_str(&line.to_string());
        requests.push('\n');
    }
    let extra = [
        serde_json::json!({"allowlist": [r#"{"encrypted":[true]}"#]}),
        serde_json::json!({"allowlist": [r#"{"source_cluster_name":["other"]}"#]}),
        serde_json::json!({
            "allowlist": [r#"{"destination_port":["5432"]}"#],
            "field_mask": ["uuid", "verdict", "source.pod_name"],
        }),
    ];
    for e in &extra {
        requests.push_str(&e.to_string());
        requests.push('\n');
    }

    let work = tempfile::tempdir().unwrap();
    let mut child = Command::new(&py)
        .arg(workspace().join("hopwatch/tests/compat/cilium_client.py"))
        .arg(workspace().join("hopwatch-proto/src/cilium_api.tsv"))
        .arg(work.path())
        .arg(format!("127.0.0.1:{}", collector.port))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the Cilium-API client");
    child.stdin.take().unwrap().write_all(requests.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "client failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let answers: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(answers.len(), cases.len() + extra.len());
    let mut compared = 0;
    for (((args, want, _), only), answer) in cases.iter().zip(&hopwatch_only).zip(&answers) {
        if *only {
            // --drop-reason-desc sets hopwatch's kernel_drop_reason (1002): Cilium's FlowFilter
            // has no such field, so its client cannot send it.
            let err = answer["error"].as_str().unwrap_or_default();
            assert!(err.contains("kernel_drop_reason"), "{args:?}: {answer}");
            continue;
        }
        assert_eq!(answer["uuids"], serde_json::json!(want), "{args:?}");
        compared += 1;
    }
    assert!(compared >= 35, "only {compared} cases compared");
    // Cilium-only filter fields are unknown to hopwatch's proto/: they do not narrow.
    let all = serde_json::json!(["tcp-web", "http-api", "drop"]);
    assert_eq!(answers[cases.len()]["uuids"], all);
    assert_eq!(answers[cases.len() + 1]["uuids"], all);
    // field_mask (10): only the masked fields arrive.
    assert_eq!(
        answers[cases.len() + 2]["flows"],
        serde_json::json!([{"uuid": "tcp-web", "verdict": "FORWARDED", "source": {"pod_name": "web-7d9f"}}])
    );
    stop.cancel();
    task.await.unwrap();
}
