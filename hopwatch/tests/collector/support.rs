//! A real `hopwatch collector` process for tests, and an in-test agent link to it.

use std::{
    net::TcpListener,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hopwatch_proto::{
    flow::{Flow, Layer4, Tcp, Verdict, layer4},
    observer::{
        GetFlowsRequest, GetFlowsResponse, ServerStatusRequest, ServerStatusResponse,
        get_flows_response::ResponseTypes, observer_client::ObserverClient,
    },
};

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_hopwatch");

/// A loopback port nothing listens on right now.
pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port").local_addr().unwrap().port()
}

pub(crate) struct Collector {
    child: Option<Child>,
    pub port: u16,
    stderr: Arc<Mutex<String>>,
}

impl Collector {
    /// Starts `hopwatch collector` on `port` with its history in `dir` and waits until it listens.
    pub(crate) fn start(port: u16, dir: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(BIN)
            .args(["collector", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(dir)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start hopwatch collector");
        let stderr = capture_stderr(&mut child);
        let mut c = Self { child: Some(child), port, stderr };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !c.stderr().contains("listening on") {
            if let Some(status) = c.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("collector exited ({status}) before listening:\n{}", c.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "collector not listening after 30s:\n{}",
                c.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        c
    }

    pub(crate) fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub(crate) fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: no chance to flush or say goodbye.
    pub(crate) fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("kill the collector");
            c.wait().expect("reap the collector");
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub(crate) fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = i32::try_from(c.id()).unwrap();
            // SAFETY: signalling a child we started and have not reaped.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let status = c.wait().expect("wait for the collector");
            assert!(status.success(), "collector exited with {status}:\n{}", self.stderr());
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.kill();
    }
}

pub(crate) fn now_ns() -> i64 {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    i64::try_from(d.as_nanos()).unwrap()
}

/// A TCP flow with a unique id.
pub(crate) fn flow(node: &str, seq: i64, time_ns: i64, port: u32) -> GetFlowsResponse {
    let ts = prost_types::Timestamp {
        seconds: time_ns / 1_000_000_000,
        nanos: i32::try_from(time_ns % 1_000_000_000).unwrap(),
    };
    GetFlowsResponse {
        time: Some(ts),
        node_name: node.to_owned(),
        response_types: Some(ResponseTypes::Flow(Flow {
            time: Some(ts),
            uuid: format!("{node}-{seq}"),
            verdict: Verdict::Forwarded.into(),
            node_name: node.to_owned(),
            ip: Some(hopwatch_proto::flow::Ip {
                source: "10.0.0.1".into(),
                destination: "10.0.0.2".into(),
                ip_version: 1,
                encrypted: false,
            }),
            l4: Some(Layer4 {
                protocol: Some(layer4::Protocol::Tcp(Tcp {
                    source_port: 40_000,
                    destination_port: port,
                    flags: None,
                })),
            }),
            ..Default::default()
        })),
    }
}

pub(crate) async fn client(url: &str) -> Option<ObserverClient<tonic::transport::Channel>> {
    ObserverClient::connect(url.to_owned()).await.ok()
}

pub(crate) async fn status(url: &str) -> Option<ServerStatusResponse> {
    client(url)
        .await?
        .server_status(ServerStatusRequest {})
        .await
        .ok()
        .map(tonic::Response::into_inner)
}

pub(crate) async fn all_responses(url: &str) -> Vec<GetFlowsResponse> {
    let mut c = client(url).await.expect("connect to the collector");
    let mut s = c.get_flows(GetFlowsRequest::default()).await.expect("GetFlows").into_inner();
    let mut out = Vec::new();
    while let Some(r) = s.message().await.expect("flow stream") {
        out.push(r);
    }
    out
}

#[path = "../shared/capture.rs"]
pub(crate) mod capture;
pub(crate) use self::capture::capture_stderr;
