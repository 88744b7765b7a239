//! The web UI: the service map, hop details and flows in a browser, served next to a collector
//! (`hopwatch collector`, and the agent's in-process one) on `--ui-listen` (default
//! 127.0.0.1:12000, Hubble UI's port).
//!
//! It shows nothing the CLI does not: hops are `hopwatch hops`' aggregation ([`super::hops`])
//! over the window's flows from the collector's store, flows are `GetFlows` queries built from
//! `hubble observe`'s filter flags ([`super::observe`]), followed as server-sent events. The
//! page, its script and the graph library (cytoscape, vendored under `hopwatch/ui/vendor/` with
//! its licence) are compiled into the binary: nothing is fetched at run time.

mod api;

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Router,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use hopwatch_collector::hub::Hub;
use tokio_util::sync::{CancellationToken, DropGuard};

/// Hubble UI's port.
pub(crate) const DEFAULT_PORT: u16 = 12_000;

/// Where the UI listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UiListen {
    Off,
    At(SocketAddr),
}

fn parse_ui_listen(s: &str) -> Result<UiListen, String> {
    if s == "off" {
        return Ok(UiListen::Off);
    }
    s.parse().map(UiListen::At).map_err(|e| format!("{s:?} is neither ADDR:PORT nor `off`: {e}"))
}

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct UiArgs {
    /// Address of the web UI (service map, hops, flows), or `off` [default: 127.0.0.1:12000; if
    /// that port is taken, the UI is left out and a warning says so]. Off loopback only with
    /// --allow-plaintext: the UI has neither TLS nor authentication.
    #[arg(long, value_name = "ADDR|off", value_parser = parse_ui_listen)]
    pub ui_listen: Option<UiListen>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum UiError {
    #[error(
        "--ui-listen {addr}: the web UI has neither TLS nor authentication and shows every flow; \
         serve it on loopback (reach it with `ssh -L` or `kubectl port-forward`), or pass \
         --allow-plaintext on a trusted network"
    )]
    Plaintext { addr: SocketAddr },
    #[error("cannot listen on --ui-listen {addr}: {source} (pick a free address, or `off`)")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A running UI server; it stops (after the requests in flight) when this is dropped.
pub(crate) struct UiServer {
    pub addr: SocketAddr,
    _stop: DropGuard,
}

/// What became of the UI; the caller says so in its start-up line (the collector's is one line,
/// which scripts read).
pub(crate) enum Started {
    Serving(UiServer),
    Off,
    /// The default port is taken (another agent or collector on this host): no UI, and a
    /// warning rather than an error.
    PortTaken {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

impl Started {
    pub(crate) fn addr(&self) -> Option<SocketAddr> {
        match self {
            Started::Serving(s) => Some(s.addr),
            Started::Off | Started::PortTaken { .. } => None,
        }
    }
}

impl std::fmt::Display for Started {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Started::Serving(s) => write!(f, "web UI on http://{}/", s.addr),
            Started::Off => f.write_str("web UI off"),
            Started::PortTaken { addr, source } => write!(
                f,
                "warning: no web UI: cannot listen on {addr}: {source} (use --ui-listen ADDR)"
            ),
        }
    }
}

/// Starts the UI over `hub` as `args` ask. Off loopback only with `allow_plaintext` (the gRPC
/// APIs' `--allow-plaintext`).
pub(crate) async fn start(
    args: &UiArgs,
    hub: Arc<Hub>,
    allow_plaintext: bool,
) -> Result<Started, UiError> {
    let (addr, explicit) = match args.ui_listen {
        Some(UiListen::Off) => return Ok(Started::Off),
        Some(UiListen::At(a)) => (a, true),
        None => (SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)), false),
    };
    if !addr.ip().is_loopback() && !allow_plaintext {
        return Err(UiError::Plaintext { addr });
    }
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(source) if !explicit => return Ok(Started::PortTaken { addr, source }),
        Err(source) => return Err(UiError::Listen { addr, source }),
    };
    let local = listener.local_addr().map_err(|source| UiError::Listen { addr, source })?;
    let app = router(hub);
    let stop = CancellationToken::new();
    let guard = stop.clone().drop_guard();
    tokio::spawn(async move {
        // Follow streams one small event at a time: without TCP_NODELAY each could wait for
        // the browser's delayed ACK.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let served = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned());
        if let Err(e) = served.await {
            tracing::error!(error = %e, "web UI server stopped");
        }
    });
    Ok(Started::Serving(UiServer { addr: local, _stop: guard }))
}

/// The page, its assets and the JSON/SSE API.
pub(crate) fn router(hub: Arc<Hub>) -> Router {
    Router::new()
        .route("/", get(|| async { asset(INDEX_HTML, "text/html; charset=utf-8") }))
        .route("/app.js", get(|| async { asset(APP_JS, "text/javascript; charset=utf-8") }))
        .route("/app.css", get(|| async { asset(APP_CSS, "text/css; charset=utf-8") }))
        .route("/favicon.svg", get(|| async { asset(FAVICON, "image/svg+xml") }))
        .route(
            "/vendor/cytoscape.min.js",
            get(|| async { asset(CYTOSCAPE_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/vendor/cytoscape.LICENSE",
            get(|| async { asset(CYTOSCAPE_LICENSE, "text/plain; charset=utf-8") }),
        )
        .merge(api::routes())
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
        .with_state(hub)
}

const INDEX_HTML: &str = include_str!("../../../ui/index.html");
const APP_JS: &str = include_str!("../../../ui/app.js");
const APP_CSS: &str = include_str!("../../../ui/app.css");
const FAVICON: &str = include_str!("../../../ui/favicon.svg");
const CYTOSCAPE_JS: &str = include_str!("../../../ui/vendor/cytoscape/cytoscape.min.js");
const CYTOSCAPE_LICENSE: &str = include_str!("../../../ui/vendor/cytoscape/LICENSE");

fn asset(body: &'static str, content_type: &'static str) -> impl IntoResponse {
    // The assets change only with the binary; a reload after an upgrade revalidates.
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body)
}

#[cfg(test)]
mod tests;
