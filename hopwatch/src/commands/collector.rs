//! `hopwatch collector`: receive flows from agents, keep their history, and serve Hubble's
//! Observer API.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use hopwatch_collector::{
    CollectorError, StoreArgs,
    clickhouse::{ClickHouse, ClickHouseArgs, ClickHouseError},
    hub::Hub,
    serve,
};
use hopwatch_proto::{signal::shutdown_signal, tls::ServerTlsArgs};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub(crate) enum CollectorCommandError {
    #[error(transparent)]
    Collector(#[from] CollectorError),
    #[error("cannot install SIGINT/SIGTERM handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error(transparent)]
    Ui(#[from] super::ui::UiError),
    #[error(transparent)]
    Otlp(#[from] crate::otlp::OtlpError),
    #[error(transparent)]
    ClickHouse(#[from] ClickHouseError),
    #[error("cannot listen on --metrics-listen {addr}: {source} (pick a free address)")]
    MetricsListen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, clap::Args)]
pub(super) struct CollectorArgs {
    /// Address of the gRPC APIs (agents' ingest and Hubble's Observer for queries).
    #[arg(long, default_value = "127.0.0.1:4245")]
    pub listen: SocketAddr,
    /// Directory of the on-disk flow history (created if missing; one collector per directory).
    #[arg(long, default_value = "/var/lib/hopwatch", conflicts_with = "memory_only")]
    pub data_dir: PathBuf,
    /// Keep flows in memory only (no history, nothing written to disk).
    #[arg(long)]
    pub memory_only: bool,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub clickhouse: ClickHouseArgs,
    /// Serve the collector's Prometheus metrics (the ClickHouse write path's counters) on
    /// ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    pub tls: ServerTlsArgs,
    #[command(flatten)]
    pub ui: super::ui::UiArgs,
    #[command(flatten)]
    pub otlp: crate::otlp::OtlpArgs,
}

/// `hopwatch collector`.
pub(super) async fn run(args: CollectorArgs) -> Result<(), CollectorCommandError> {
    let shutdown = shutdown_signal().map_err(CollectorCommandError::Signals)?;
    let tls = args.tls.server_config(args.listen).map_err(CollectorError::from)?;
    let data_dir = (!args.memory_only).then(|| args.data_dir.clone());
    let clickhouse = match &args.clickhouse.clickhouse {
        Some(url) => Some(ClickHouse::connect(&args.clickhouse, url).await?),
        None => None,
    };
    let hub = Hub::start_with(&args.store.hub_config(data_dir.clone()), clickhouse.clone())
        .map_err(CollectorError::from)?;
    let metrics = match args.metrics_listen {
        Some(addr) => Some(serve_metrics(addr, clickhouse.clone()).await?),
        None => None,
    };
    let stop = CancellationToken::new();
    let serving = serve(hub.clone(), args.listen, tls.clone(), stop.clone()).await?;
    let ui = super::ui::start(&args.ui, hub.clone(), args.tls.allow_plaintext).await?;
    let otlp = crate::otlp::start(&args.otlp, hub.clone(), stop.clone())?
        .map_or_else(String::new, |to| format!(", traces to OTLP endpoint {to}"));
    // One line: scripts and tests read it (and may stop reading after it).
    eprintln!(
        "hopwatch collector: listening on {} ({}), history {}{}{}, {ui}{otlp}",
        serving.addr,
        if tls.is_none() {
            "plaintext"
        } else if args.tls.tls_client_ca.is_some() {
            "mutual TLS"
        } else {
            "TLS"
        },
        data_dir.map_or_else(|| "in memory only".to_owned(), |d| d.display().to_string()),
        clickhouse.as_ref().map_or_else(String::new, |c| format!(
            " and on ClickHouse {} ({}, {:?} schema)",
            c.layout.table(),
            c.version,
            c.variant
        )),
        metrics
            .as_ref()
            .map_or_else(String::new, |(a, _)| format!(", metrics on http://{a}/metrics")),
    );
    let mut task = serving.task;
    tokio::select! {
        () = shutdown => eprintln!("hopwatch collector: shutting down"),
        r = &mut task => {
            if let Ok(Err(e)) = r {
                tracing::error!(error = %e, "gRPC server failed");
            }
        }
    }
    stop.cancel();
    drop(ui);
    drop(metrics);
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    hub.shutdown().await;
    Ok(())
}

/// Serves `/metrics` on `addr` until the returned guard is dropped.
async fn serve_metrics(
    addr: SocketAddr,
    clickhouse: Option<std::sync::Arc<ClickHouse>>,
) -> Result<(SocketAddr, tokio_util::sync::DropGuard), CollectorCommandError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| CollectorCommandError::MetricsListen { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| CollectorCommandError::MetricsListen { addr, source })?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let body = clickhouse.as_ref().map_or_else(String::new, |c| c.metrics());
            async move { ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], body) }
        }),
    );
    let stop = CancellationToken::new();
    let guard = stop.clone().drop_guard();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await;
    });
    Ok((local, guard))
}
