//! The HTTP side: `/metrics`, `/healthz`, `/readyz`.

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};

use super::Telemetry;

pub(super) async fn serve(listener: tokio::net::TcpListener, telemetry: Telemetry) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/", get(index))
        .with_state(telemetry);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "metrics server stopped");
    }
}

async fn metrics(State(t): State<Telemetry>) -> impl IntoResponse {
    // Rendering thousands of series takes milliseconds: keep it off the async workers.
    match tokio::task::spawn_blocking(move || t.scrape()).await {
        Ok(body) => (StatusCode::OK, [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], body),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("rendering metrics failed: {e}\n"),
        ),
    }
}

fn probe(result: Result<(), String>) -> (StatusCode, String) {
    match result {
        Ok(()) => (StatusCode::OK, "ok\n".to_owned()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

async fn healthz(State(t): State<Telemetry>) -> impl IntoResponse {
    probe(t.healthy())
}

async fn readyz(State(t): State<Telemetry>) -> impl IntoResponse {
    probe(t.ready())
}

async fn index() -> &'static str {
    "hopwatch agent: /metrics (Prometheus), /healthz (liveness), /readyz (readiness)\n"
}
