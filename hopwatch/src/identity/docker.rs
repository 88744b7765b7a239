//! Container names from the Docker Engine API, when its socket exists (docker-compose hosts).
//!
//! `GET /containers/json` over the Unix socket lists running containers with their names and
//! labels; the compose service (`com.docker.compose.service`) becomes the endpoint's workload, so
//! the replicas of one service are one hop. Polled in the background, and early when a flow names
//! a container id not in the list yet.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use http_body_util::{BodyExt as _, Empty};
use tokio::sync::mpsc;

use super::DockerContainer;

/// Full refresh interval.
const REFRESH_EVERY: Duration = Duration::from_secs(10);
/// Shortest time between two refreshes asked for by unknown container ids.
const MISS_GAP: Duration = Duration::from_secs(1);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Containers kept.
const MAX_CONTAINERS: usize = 65_536;
/// Largest response read (a host with thousands of containers stays well below).
const MAX_RESPONSE: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub(crate) enum DockerError {
    #[error("cannot connect to the Docker API at {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Docker API request failed: {0}")]
    Http(#[source] hyper::Error),
    #[error("Docker API answered {0}")]
    Status(hyper::StatusCode),
    #[error("Docker API timed out")]
    Timeout,
    #[error("Docker API response is too large")]
    TooLarge,
    #[error("cannot parse the Docker API's container list: {0}")]
    Parse(#[source] serde_json::Error),
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ApiContainer {
    id: String,
    #[serde(default)]
    names: Vec<String>,
    #[serde(default)]
    labels: Option<HashMap<String, String>>,
}

/// Lists running containers: id → what Docker says about it.
pub(crate) async fn list(
    socket: &std::path::Path,
) -> Result<HashMap<String, DockerContainer>, DockerError> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|source| DockerError::Connect { path: socket.to_owned(), source })?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(DockerError::Http)?;
    let conn = tokio::spawn(conn);
    let req = hyper::Request::get("/containers/json")
        .header(hyper::header::HOST, "docker")
        .body(Empty::<bytes::Bytes>::new())
        .expect("a static request is valid");
    let result = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let resp = sender.send_request(req).await.map_err(DockerError::Http)?;
        if !resp.status().is_success() {
            return Err(DockerError::Status(resp.status()));
        }
        let body = http_body_util::Limited::new(resp.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|_| DockerError::TooLarge)?
            .to_bytes();
        let list: Vec<ApiContainer> = serde_json::from_slice(&body).map_err(DockerError::Parse)?;
        Ok(list
            .into_iter()
            .take(MAX_CONTAINERS)
            .map(|c| {
                let labels = c.labels.unwrap_or_default();
                let name = c
                    .names
                    .first()
                    .map(|n| n.trim_start_matches('/').to_owned())
                    .unwrap_or_default();
                (
                    c.id,
                    DockerContainer {
                        name,
                        compose_project: labels.get("com.docker.compose.project").cloned(),
                        compose_service: labels.get("com.docker.compose.service").cloned(),
                    },
                )
            })
            .collect())
    })
    .await
    .unwrap_or(Err(DockerError::Timeout));
    conn.abort();
    result
}

/// Container names, refreshed in the background.
#[derive(Clone)]
pub(crate) struct DockerNames {
    map: Arc<RwLock<HashMap<String, DockerContainer>>>,
    misses: mpsc::Sender<()>,
}

impl DockerNames {
    pub(crate) fn start(socket: PathBuf, cancel: tokio_util::sync::CancellationToken) -> Self {
        let map = Arc::new(RwLock::new(HashMap::new()));
        let (misses, rx) = mpsc::channel(1);
        tokio::spawn(refresh_loop(socket, map.clone(), rx, cancel));
        Self { map, misses }
    }

    /// The container with id `id`, if Docker listed it; an unknown id asks for a refresh.
    pub(crate) fn get(&self, id: &str) -> Option<DockerContainer> {
        let found =
            self.map.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(id).cloned();
        if found.is_none() {
            let _ = self.misses.try_send(());
        }
        found
    }
}

async fn refresh_loop(
    socket: PathBuf,
    map: Arc<RwLock<HashMap<String, DockerContainer>>>,
    mut misses: mpsc::Receiver<()>,
    cancel: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(REFRESH_EVERY);
    let mut failures = 0u64;
    let mut last = tokio::time::Instant::now();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
            m = misses.recv() => {
                if m.is_none() { return }
                tokio::time::sleep_until(last + MISS_GAP).await;
            }
        }
        last = tokio::time::Instant::now();
        match list(&socket).await {
            Ok(containers) => {
                *map.write().unwrap_or_else(std::sync::PoisonError::into_inner) = containers;
                failures = 0;
            }
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_power_of_two() {
                    tracing::warn!(error = %e, failures, "cannot list Docker containers; names are missing");
                }
            }
        }
    }
}
