//! The UI's API in-process: a memory hub holding synthetic flows, the router called through
//! tower (no ports).

use std::{sync::Arc, time::Duration};

use axum::{body::Body, http::Request};
use hopwatch_collector::{hub::Hub, testing::memory_hub};
use hopwatch_hops::testing::{APP, APP_SVC, DB, FRONT, MS, dropped, l7};
use hopwatch_proto::{
    clock::wall_now_ns,
    flow::Flow,
    observer::{GetFlowsResponse, get_flows_response::ResponseTypes},
};
use serde_json::Value;
use tower::ServiceExt as _;

use super::{api, router};

async fn hub_with(flows: Vec<Flow>) -> Arc<Hub> {
    let hub = memory_hub(Duration::from_millis(10));
    let agent = hub.agent("a1", "n1");
    let events = flows
        .into_iter()
        .map(|f| GetFlowsResponse {
            time: f.time,
            node_name: f.node_name.clone(),
            response_types: Some(ResponseTypes::Flow(f)),
        })
        .collect();
    hub.accept(&agent, 1, events, None).await.expect("hub takes the flows");
    hub.flush().await.expect("hub flushes");
    hub
}

/// Client- and server-side exchanges front → app (fast) and app → db (slow, one error), and a
/// drop on app → db, all within the last seconds.
fn traffic() -> Vec<Flow> {
    let t = wall_now_ns() - 3_000 * MS;
    let mut flows = Vec::new();
    for i in 0..10 {
        flows.push(l7(FRONT, APP_SVC, t + i * MS, 2 * MS, false, ""));
        flows.push(l7(
            APP,
            DB,
            t + i * MS,
            80 * MS,
            false,
            if i == 0 { "SQLSTATE 42P01" } else { "" },
        ));
        flows.push(l7(APP, DB, t + i * MS, 70 * MS, true, ""));
    }
    flows.push(dropped(APP, DB, t + 20 * MS, "NETFILTER_DROP"));
    flows
}

async fn get(hub: &Arc<Hub>, uri: &str) -> (u16, String) {
    let resp = router(hub.clone())
        .oneshot(Request::get(uri).body(Body::empty()).expect("request"))
        .await
        .expect("router answers");
    let status = resp.status().as_u16();
    let body = axum::body::to_bytes(resp.into_body(), 1 << 24).await.expect("body");
    (status, String::from_utf8(body.to_vec()).expect("UTF-8"))
}

async fn get_json(hub: &Arc<Hub>, uri: &str) -> Value {
    let (status, body) = get(hub, uri).await;
    assert_eq!(status, 200, "{uri}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{uri}: {e}: {body}"))
}

#[tokio::test]
async fn hops_are_the_cli_rows_with_ids_and_nodes() {
    let hub = hub_with(traffic()).await;
    let v = get_json(&hub, "/api/hops?since=1m").await;
    let hops = v["hops"].as_array().expect("hops");
    let slow = hops
        .iter()
        .find(|h| h["destination"]["name"] == "postgres")
        .unwrap_or_else(|| panic!("no hop to postgres: {v}"));
    assert_eq!(slow["id"], "app -> postgres:5432/tcp");
    assert_eq!(slow["requests"], 10);
    assert_eq!(slow["errors"], 1);
    assert_eq!(slow["drops"]["NETFILTER_DROP"], 1);
    let p99 = slow["client_latency"]["p99_ns"].as_u64().expect("client p99");
    assert!((70 * MS..=90 * MS).contains(&p99), "client p99 {p99}");
    assert!(slow["server_latency"]["p99_ns"].as_u64().is_some(), "server side: {slow}");
    assert_eq!(v["nodes"]["app"], "n1", "{v}");
}

#[tokio::test]
async fn a_hop_has_histograms_and_its_own_recent_flows() {
    let hub = hub_with(traffic()).await;
    let id = "app -> postgres:5432/tcp";
    let v = get_json(&hub, &format!("/api/hop?id={}", id.replace(' ', "%20").replace('>', "%3E")))
        .await;
    let client: u64 = v["histograms"]["client"]
        .as_array()
        .expect("client")
        .iter()
        .map(|b| b[1].as_u64().unwrap())
        .sum();
    assert_eq!(client, 10, "client-side exchanges (the failed one answered too)");
    let flows = v["flows"].as_array().expect("flows");
    assert_eq!(flows.len(), 21, "the hop's 20 exchanges and its drop");
    assert!(flows.iter().all(|f| f["flow"]["IP"]["destination"] == DB.1), "only the hop's flows");
    let (status, body) = get(&hub, "/api/hop?id=nothing").await;
    assert_eq!(status, 404, "{body}");
}

#[tokio::test]
async fn flows_take_hubble_filters() {
    let hub = hub_with(traffic()).await;
    let all = get_json(&hub, "/api/flows?number=1000").await;
    assert_eq!(all["flows"].as_array().expect("flows").len(), 31);
    let dropped = get_json(&hub, "/api/flows?f=verdict:DROPPED").await;
    assert_eq!(dropped["flows"].as_array().expect("flows").len(), 1, "{dropped}");
    let to_db = get_json(&hub, &format!("/api/flows?number=1000&f=to-ip:{}", DB.1)).await;
    assert_eq!(to_db["flows"].as_array().expect("flows").len(), 21);
    let not_db = get_json(&hub, &format!("/api/flows?number=1000&f=!to-ip:{}", DB.1)).await;
    assert_eq!(not_db["flows"].as_array().expect("flows").len(), 10);
    let newest = get_json(&hub, "/api/flows?number=5").await;
    assert_eq!(newest["flows"].as_array().expect("flows").len(), 5);
    for bad in
        ["/api/flows?f=verdict:MAYBE", "/api/flows?f=colour:red", "/api/flows?f=to-ip:10.0.0.0/40"]
    {
        let (status, body) = get(&hub, bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(!body.trim().is_empty(), "{bad}: a reason");
    }
}

#[tokio::test]
async fn the_page_and_its_assets_are_embedded() {
    let hub = hub_with(Vec::new()).await;
    for (path, kind) in [
        ("/", "text/html"),
        ("/app.js", "text/javascript"),
        ("/app.css", "text/css"),
        ("/vendor/cytoscape.min.js", "text/javascript"),
    ] {
        let resp = router(hub.clone())
            .oneshot(Request::get(path).body(Body::empty()).expect("request"))
            .await
            .expect("router answers");
        assert_eq!(resp.status(), 200, "{path}");
        let ct = resp.headers()["content-type"].to_str().expect("ASCII");
        assert!(ct.starts_with(kind), "{path}: {ct}");
    }
    let (html_status, html) = get(&hub, "/").await;
    assert_eq!(html_status, 200);
    assert!(html.contains("vendor/cytoscape.min.js"), "the page loads the embedded library");
    assert!(!html.contains("http://") && !html.contains("https://"), "nothing from elsewhere");
}

#[test]
fn filter_params_parse_as_observe_flags() {
    let p = api::params(Some("since=30s&number=7&f=from-pod%3Ashop%2Fweb&f=!verdict:DROPPED"))
        .expect("params");
    assert_eq!(p.since, Some(Duration::from_secs(30)));
    assert_eq!(p.number, Some(7));
    let (white, black) = api::filters(&p.filters).expect("filters");
    assert_eq!(white.len(), 1);
    assert_eq!(white[0].source_pod, ["shop/web"]);
    assert_eq!(black.len(), 1);
    assert_eq!(black[0].verdict, [hopwatch_proto::flow::Verdict::Dropped as i32]);
    assert!(api::params(Some("since=soon")).is_err());
}

#[tokio::test]
async fn off_loopback_only_with_allow_plaintext() {
    let hub = hub_with(Vec::new()).await;
    let at = |a: &str| super::UiArgs { ui_listen: Some(super::UiListen::At(a.parse().unwrap())) };
    let refused = super::start(&at("0.0.0.0:0"), hub.clone(), false).await;
    assert!(
        matches!(refused, Err(super::UiError::Plaintext { .. })),
        "a UI on every address without --allow-plaintext"
    );
    let served = super::start(&at("127.0.0.1:0"), hub.clone(), false).await.expect("loopback");
    assert!(served.addr().is_some_and(|a| a.ip().is_loopback()));
    assert!(served.to_string().starts_with("web UI on http://127.0.0.1:"), "{served}");
    let off = super::UiArgs { ui_listen: Some(super::UiListen::Off) };
    let off = super::start(&off, hub, false).await.expect("off");
    assert!(matches!(off, super::Started::Off));
}

/// What one refresh of the map costs on a full memory ring (the collector's default 65 536
/// flows: 128 hops, client- and server-side exchanges). Prints the times; run with
/// `cargo test -p hopwatch --lib ui::tests::cost -- --ignored --nocapture` (`--release` for
/// the figure a release binary gives).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement, not a check"]
async fn cost_of_a_map_refresh_on_a_full_ring() {
    let t = wall_now_ns() - 60_000 * MS;
    let mut flows = Vec::with_capacity(65_536);
    for i in 0..65_536u64 {
        let n = i % 128;
        let src = (format!("client-{}", n / 8), format!("10.0.1.{}", n / 8), 40_000 + n as u32);
        let dst = (format!("server-{}", n % 8), format!("10.0.2.{}", n % 8), 8000 + (n % 8) as u32);
        let (src, dst) =
            ((src.0.as_str(), src.1.as_str(), src.2), (dst.0.as_str(), dst.1.as_str(), dst.2));
        flows.push(l7(src, dst, t + i * 900_000, (1 + i % 50) * MS, i % 2 == 1, ""));
    }
    let hub = hub_with(flows).await;
    for round in 0..3 {
        let start = std::time::Instant::now();
        let v = get_json(&hub, "/api/hops?since=5m").await;
        let map_ms = start.elapsed().as_secs_f64() * 1e3;
        let start = std::time::Instant::now();
        let _ = get_json(&hub, "/api/hop?id=client-0%20-%3E%20server-0:8000/tcp").await;
        let one_ms = start.elapsed().as_secs_f64() * 1e3;
        let start = std::time::Instant::now();
        let _ = get_json(&hub, "/api/flows?number=200").await;
        let flows_ms = start.elapsed().as_secs_f64() * 1e3;
        eprintln!(
            "round {round}: /api/hops {map_ms:.0} ms ({} hops, {} flows), /api/hop {one_ms:.0} ms, /api/flows?number=200 {flows_ms:.0} ms",
            v["hops"].as_array().map_or(0, Vec::len),
            v["flows"]
        );
    }
}
