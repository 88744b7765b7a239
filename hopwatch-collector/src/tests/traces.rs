//! Traces across nodes joined in the collector.

use std::time::Duration;

use hopwatch_proto::{
    flow::{Flow, FlowFilter, Layer7, Span, TraceContext, TraceParent, TrafficDirection},
    observer::GetFlowsRequest,
};

use super::{grpc::push, *};

const T_A: &str = "0000000000000000000000000000000a";
const T_B: &str = "0000000000000000000000000000000b";

/// An L7 flow of span `span` (its parent `parent`) in trace `trace`, seen at `node` from the
/// `direction` end.
fn exchange(
    node: &str,
    at: i64,
    direction: TrafficDirection,
    span: &str,
    parent: &str,
    trace: &str,
) -> GetFlowsResponse {
    let mut resp = flow(node, at, 8080, Verdict::Forwarded);
    let Some(ResponseTypes::Flow(f)) = &mut resp.response_types else { unreachable!() };
    f.traffic_direction = direction.into();
    f.l7 = Some(Layer7 {
        span: Some(Span { span_id: span.into(), parent_span_id: parent.into(), ..Span::default() }),
        ..Layer7::default()
    });
    f.trace_context = Some(TraceContext { parent: Some(TraceParent { trace_id: trace.into() }) });
    resp
}

fn trace_ids(flows: &[&Flow]) -> Vec<String> {
    flows
        .iter()
        .map(|f| f.trace_context.as_ref().unwrap().parent.as_ref().unwrap().trace_id.clone())
        .collect()
}

#[tokio::test]
async fn a_request_through_two_nodes_is_one_trace() {
    let hub = memory_hub(Duration::ZERO);
    let pipe = Pipe::serve(hub.clone());
    let t0 = now_ns() - 10 * SEC;
    let (ingress, upstream, query) = ("00000000000000a1", "00000000000000b2", "00000000000000c3");
    // Node b (the app) reports first: the upstream request's server end starts a trace there
    // (its client is on node a), and the app's query is in it.
    let b = vec![
        exchange("node-b", t0 + 2, TrafficDirection::Ingress, upstream, "", T_B),
        exchange("node-b", t0 + 1, TrafficDirection::Egress, query, upstream, T_B),
    ];
    push(pipe.connect().await.unwrap(), "agent-b", "node-b", vec![(1, b)]).await;
    // Node a (nginx): the ingress request, and the upstream request nginx made for it.
    let a = vec![
        exchange("node-a", t0 + 3, TrafficDirection::Ingress, ingress, "", T_A),
        exchange("node-a", t0 + 2, TrafficDirection::Egress, upstream, ingress, T_A),
    ];
    push(pipe.connect().await.unwrap(), "agent-a", "node-a", vec![(1, a)]).await;
    assert_eq!(hub.traces.joined(), 1);

    let by_trace = |id: &str| GetFlowsRequest {
        whitelist: vec![FlowFilter { trace_id: vec![id.into()], ..FlowFilter::default() }],
        ..GetFlowsRequest::default()
    };
    for asked in [T_A, T_B] {
        let got = get_flows(pipe.connect().await.unwrap(), by_trace(asked)).await.unwrap();
        let got = flows(&got);
        assert_eq!(got.len(), 4, "--trace-id {asked}: both nodes' flows");
        assert!(trace_ids(&got).iter().all(|t| t == T_A), "one trace id: {:?}", trace_ids(&got));
    }
    let all = get_flows(pipe.connect().await.unwrap(), GetFlowsRequest::default()).await.unwrap();
    assert!(trace_ids(&flows(&all)).iter().all(|t| t == T_A));
    // An unrelated trace stays its own.
    let other = "0000000000000000000000000000000c";
    let c =
        vec![exchange("node-b", t0 + 5, TrafficDirection::Ingress, "00000000000000d4", "", other)];
    push(pipe.connect().await.unwrap(), "agent-b", "node-b", vec![(3, c)]).await;
    let got = get_flows(pipe.connect().await.unwrap(), by_trace(other)).await.unwrap();
    assert_eq!(trace_ids(&flows(&got)), [other]);
}

#[test]
fn joins_never_loop_and_one_node_s_traces_are_left_alone() {
    use crate::traces::TraceJoin;
    let j = TraceJoin::default();
    let f = |d, span: &str, parent: &str, trace: &str| {
        let r = exchange("n", 0, d, span, parent, trace);
        let Some(ResponseTypes::Flow(f)) = r.response_types else { unreachable!() };
        f
    };
    // Both ends on one node: one trace already.
    let same = [
        f(TrafficDirection::Egress, "0000000000000001", "", T_A),
        f(TrafficDirection::Ingress, "0000000000000001", "", T_A),
    ];
    j.observe(&same);
    assert_eq!(j.joined(), 0);
    // b continues a; then a claim that a continues b is refused (a loop).
    j.observe(&[
        f(TrafficDirection::Egress, "0000000000000002", "0000000000000001", T_A),
        f(TrafficDirection::Ingress, "0000000000000002", "", T_B),
    ]);
    j.observe(&[
        f(TrafficDirection::Egress, "0000000000000003", "0000000000000009", T_B),
        f(TrafficDirection::Ingress, "0000000000000003", "", T_A),
    ]);
    assert_eq!(j.joined(), 1);
    assert_eq!(j.canonical(T_B).as_deref(), Some(T_A));
    assert_eq!(j.canonical(T_A), None);
    assert_eq!(j.expand(&[T_A.to_owned()]), [T_A, T_B]);
}
