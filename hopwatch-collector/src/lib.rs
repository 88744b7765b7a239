//! The collector: agents stream flows in (`hopwatch.v1.Ingest`), it orders them across nodes
//! within a sort window ([`merge`]), keeps them (memory ring + on-disk history, [`store`]) and
//! serves Hubble's `observer.Observer` API over them ([`observer`], [`query`], [`filter`]).
//!
//! It runs standalone (`hopwatch collector`) or inside `hopwatch agent` (the embedded default:
//! same APIs on 127.0.0.1:4245, nothing else to install).

#![forbid(unsafe_code)]

pub mod agents;
pub mod clickhouse;
pub mod filter;
pub mod hub;
pub mod ingest;
pub mod merge;
pub mod nodes;
pub mod observer;
pub mod query;
pub mod store;
pub mod traces;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use hopwatch_proto::{
    hopwatch::v1::ingest_server::IngestServer, observer::observer_server::ObserverServer,
    tls::TlsError,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Server, ServerTlsConfig, server::TcpIncoming};

use self::{
    hub::{Hub, HubConfig},
    ingest::IngestService,
    merge::MergeConfig,
    observer::ObserverService,
    store::{StoreConfig, StoreError, disk::DiskConfig},
};

/// Largest gRPC message accepted (an ingest batch of a few thousand flows is ~1 MB).
const MAX_MESSAGE: usize = 32 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CollectorError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid TLS configuration: {0}")]
    TlsSetup(#[source] tonic::transport::Error),
}

/// How much the collector keeps and how it orders.
#[derive(Debug, Clone, clap::Args)]
pub struct StoreArgs {
    /// Flows kept in memory (the newest; older ones are read from --data-dir).
    #[arg(long, default_value_t = 65_536)]
    pub memory_flows: usize,
    /// Size limit of the on-disk history (e.g. 1GiB, 500MB); the oldest flows go first.
    #[arg(long, default_value = "1GiB", value_parser = parse_bytes)]
    pub retention_size: u64,
    /// Age limit of the on-disk history (e.g. 24h, 7d).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub retention_age: Duration,
    /// How often the history is fsync'ed (written data survives a collector crash at once; this
    /// bounds what a power loss can take).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub fsync_interval: Duration,
    /// Flows from different nodes are put in time order within this window (longer tolerates
    /// more clock and batching skew, shorter gives followers flows sooner).
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    pub sort_window: Duration,
}

impl StoreArgs {
    pub fn hub_config(&self, data_dir: Option<PathBuf>) -> HubConfig {
        HubConfig {
            store: StoreConfig {
                memory_flows: self.memory_flows,
                disk: data_dir.map(|dir| DiskConfig {
                    dir,
                    max_bytes: self.retention_size,
                    max_age: self.retention_age,
                    fsync_interval: self.fsync_interval,
                }),
            },
            merge: MergeConfig { window: self.sort_window, max_pending: 1 << 20 },
        }
    }
}

/// `1GiB`, `512MiB`, `100MB`, `64k`, `1000`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size like 1GiB or 500MB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "tib" => 1 << 40,
        other => {
            return Err(format!("unknown size unit {other:?} (use B, KB, KiB, MB, MiB, GB, GiB)"));
        }
    };
    n.checked_mul(mult).ok_or_else(|| format!("{s:?} is too large"))
}

/// A running gRPC server.
pub struct Serving {
    pub addr: SocketAddr,
    pub task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

/// Binds `listen` and serves both APIs until `stop` is cancelled.
pub async fn serve(
    hub: Arc<Hub>,
    listen: SocketAddr,
    tls: Option<ServerTlsConfig>,
    stop: CancellationToken,
) -> Result<Serving, CollectorError> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| CollectorError::Listen { addr: listen, source })?;
    let addr =
        listener.local_addr().map_err(|source| CollectorError::Listen { addr: listen, source })?;
    let mut builder = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)));
    let secure = tls.is_some();
    if let Some(cfg) = tls {
        builder = builder.tls_config(cfg).map_err(CollectorError::TlsSetup)?;
    }
    let router = builder
        .add_service(
            ObserverServer::new(ObserverService::new(hub.clone()))
                .max_decoding_message_size(MAX_MESSAGE),
        )
        .add_service(
            IngestServer::new(IngestService::new(hub, secure))
                .max_decoding_message_size(MAX_MESSAGE),
        );
    // The builder's `tcp_nodelay` applies only to listeners tonic binds itself: without it here,
    // a short answer (a query's last frames, an ingest acknowledgement) waited for the peer's
    // delayed ACK, 40 ms on Linux.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let task = tokio::spawn(router.serve_with_incoming_shutdown(incoming, stop.cancelled_owned()));
    Ok(Serving { addr, task })
}

#[cfg(any(test, feature = "testing"))]
pub mod testing;
#[cfg(test)]
mod tests;
