//! The collector's gRPC services, in process.

use std::{sync::Arc, time::Duration};

use hopwatch_proto::{
    flow::{FlowFilter, LostEventSource},
    hopwatch::v1::{
        Batch, Hello, PushRequest, Welcome, ingest_client::IngestClient, push_request,
        push_response,
    },
    observer::{
        GetFlowsRequest, GetNodesRequest, ServerStatusRequest, observer_client::ObserverClient,
    },
    relay::NodeState,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::*;

fn hello(agent: &str, node: &str) -> PushRequest {
    PushRequest {
        message: Some(push_request::Message::Hello(Hello {
            agent_id: agent.into(),
            node_name: node.into(),
            version: "test".into(),
            started: None,
        })),
    }
}

fn batch(first_seq: u64, events: &[GetFlowsResponse]) -> PushRequest {
    PushRequest {
        message: Some(push_request::Message::Batch(Batch {
            first_seq,
            events: events.iter().map(|e| prost::Message::encode_to_vec(e).into()).collect(),
            status: None,
        })),
    }
}

/// Pushes `batches` as agent `agent` on `node`; returns the Welcome and the last acknowledgement
/// (the collector sends it once everything is stored, after the agent closes its side).
pub(super) async fn push(
    ch: Channel,
    agent: &str,
    node: &str,
    batches: Vec<(u64, Vec<GetFlowsResponse>)>,
) -> (Welcome, u64) {
    let (tx, rx) = mpsc::channel(16);
    tx.send(hello(agent, node)).await.unwrap();
    let mut client = IngestClient::new(ch);
    let mut resp = client.push(ReceiverStream::new(rx)).await.expect("push").into_inner();
    let Some(push_response::Message::Welcome(welcome)) =
        resp.message().await.unwrap().unwrap().message
    else {
        panic!("first answer is a Welcome")
    };
    for (seq, events) in batches {
        tx.send(batch(seq, &events)).await.unwrap();
    }
    drop(tx);
    let mut acked = 0;
    while let Some(m) = resp.message().await.expect("ack stream") {
        if let Some(push_response::Message::Ack(a)) = m.message {
            assert!(a.stored_through >= acked, "acks never go back");
            acked = a.stored_through;
        }
    }
    (welcome, acked)
}

#[tokio::test]
async fn flows_from_several_nodes_come_out_in_time_order() {
    let hub = memory_hub(Duration::from_millis(200));
    let pipe = Pipe::serve(hub.clone());
    let t0 = now_ns() - 10 * SEC;
    // Three agents whose flows interleave in time; node-c lags behind the others.
    let mut tasks = Vec::new();
    for (i, node) in ["node-a", "node-b", "node-c"].into_iter().enumerate() {
        let ch = pipe.connect().await.unwrap();
        let offset = i64::try_from(i).unwrap();
        tasks.push(tokio::spawn(async move {
            if node == "node-c" {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let events: Vec<_> = (0..300)
                .map(|k| flow(node, t0 + (k * 3 + offset) * 1_000_000, 80, Verdict::Forwarded))
                .collect();
            let (w, acked) = push(
                ch,
                &format!("agent-{node}"),
                node,
                vec![(1, events[..150].to_vec()), (151, events[150..].to_vec())],
            )
            .await;
            assert_eq!(w.resume_after, 0);
            assert_eq!(acked, 300, "{node}: everything acknowledged");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let all = get_flows(pipe.connect().await.unwrap(), GetFlowsRequest::default()).await.unwrap();
    let got = flows(&all);
    assert_eq!(got.len(), 900);
    let times: Vec<i64> = got.iter().map(|f| time_of(f)).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "flows across nodes are in time order");
    // The stream starts by saying which nodes are connected (none now: they all left).
    let Some(ResponseTypes::NodeStatus(ns)) = &all[0].response_types else {
        panic!("first response is a node status: {:?}", all[0])
    };
    assert_eq!(ns.state_change(), NodeState::NodeUnavailable);

    let status = ObserverClient::new(pipe.connect().await.unwrap())
        .server_status(ServerStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.num_flows, 900);
    assert_eq!(status.seen_flows, 900);
    assert_eq!(status.num_connected_nodes, Some(0));
    assert_eq!(status.num_unavailable_nodes, Some(3));
    assert!(status.version.starts_with("hopwatch "));
    let nodes = ObserverClient::new(pipe.connect().await.unwrap())
        .get_nodes(GetNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes;
    assert_eq!(
        nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(),
        ["node-a", "node-b", "node-c"]
    );
    assert!(nodes.iter().all(|n| n.num_flows == 300 && n.state() == NodeState::NodeUnavailable));
}

#[tokio::test]
async fn number_first_since_until_and_filters() {
    let hub = memory_hub(Duration::ZERO);
    let pipe = Pipe::serve(hub.clone());
    let t0 = now_ns() - 100 * SEC;
    // 100 flows one second apart; every tenth is a drop to port 9.
    let events: Vec<_> = (0..100)
        .map(|k| {
            if k % 10 == 0 {
                flow("n1", t0 + k * SEC, 9, Verdict::Dropped)
            } else {
                flow("n1", t0 + k * SEC, 80, Verdict::Forwarded)
            }
        })
        .collect();
    push(pipe.connect().await.unwrap(), "a1", "n1", vec![(1, events)]).await;
    let q = |req: GetFlowsRequest| {
        let pipe = &pipe;
        async move {
            let r = get_flows(pipe.connect().await.unwrap(), req).await.unwrap();
            flows(&r).iter().map(|f| (time_of(f) - t0) / SEC).collect::<Vec<_>>()
        }
    };
    assert_eq!(q(GetFlowsRequest { number: 3, ..Default::default() }).await, [97, 98, 99]);
    assert_eq!(
        q(GetFlowsRequest { number: 3, first: true, ..Default::default() }).await,
        [0, 1, 2]
    );
    let drops = FlowFilter { verdict: vec![Verdict::Dropped.into()], ..Default::default() };
    assert_eq!(
        q(GetFlowsRequest { number: 2, whitelist: vec![drops.clone()], ..Default::default() })
            .await,
        [80, 90]
    );
    assert_eq!(
        q(GetFlowsRequest {
            since: Some(ts(t0 + 45 * SEC)),
            until: Some(ts(t0 + 52 * SEC)),
            ..Default::default()
        })
        .await,
        (45..=52).collect::<Vec<_>>()
    );
    assert_eq!(
        q(GetFlowsRequest {
            since: Some(ts(t0 + 45 * SEC)),
            number: 2,
            first: true,
            blacklist: vec![FlowFilter {
                destination_port: vec!["80".into()],
                ..Default::default()
            }],
            ..Default::default()
        })
        .await,
        [50, 60]
    );
    // Whitelist minus blacklist.
    assert_eq!(
        q(GetFlowsRequest {
            whitelist: vec![drops.clone()],
            blacklist: vec![FlowFilter {
                uuid: vec![format!("n1/{}/9", t0 + 50 * SEC)],
                ..Default::default()
            }],
            ..Default::default()
        })
        .await,
        [0, 10, 20, 30, 40, 60, 70, 80, 90]
    );
}

#[tokio::test]
async fn bad_requests_are_invalid_argument() {
    let hub = memory_hub(Duration::ZERO);
    let pipe = Pipe::serve(hub);
    let err = get_flows(
        pipe.connect().await.unwrap(),
        GetFlowsRequest { first: true, follow: true, number: 1, ..Default::default() },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = get_flows(
        pipe.connect().await.unwrap(),
        GetFlowsRequest {
            whitelist: vec![FlowFilter {
                source_ip: vec!["10.0.0.0/99".into()],
                ..Default::default()
            }],
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("source_ip"), "{}", err.message());
    // An ingest stream must start with a Hello.
    let (tx, rx) = mpsc::channel(1);
    tx.send(batch(1, &[])).await.unwrap();
    let err = IngestClient::new(pipe.connect().await.unwrap())
        .push(ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn resumed_agents_are_deduplicated_and_gaps_reported() {
    let hub = memory_hub(Duration::ZERO);
    let pipe = Pipe::serve(hub.clone());
    let t0 = now_ns() - 10 * SEC;
    let ev = |k: i64| flow("n1", t0 + k * 1_000_000, 80, Verdict::Forwarded);
    let first: Vec<_> = (1..=100).map(ev).collect();
    let (w, acked) = push(pipe.connect().await.unwrap(), "a1", "n1", vec![(1, first)]).await;
    assert_eq!((w.resume_after, acked), (0, 100));
    // Reconnect: the collector says where to resume; a resend of 51..=150 stores only 101..=150.
    let again: Vec<_> = (51..=150).map(ev).collect();
    let (w, acked) = push(pipe.connect().await.unwrap(), "a1", "n1", vec![(51, again)]).await;
    assert_eq!((w.resume_after, acked), (100, 150));
    // A jump from 150 to 161: ten events are reported lost.
    let later: Vec<_> = (161..=170).map(ev).collect();
    let (_, acked) = push(pipe.connect().await.unwrap(), "a1", "n1", vec![(161, later)]).await;
    assert_eq!(acked, 170);
    let all = get_flows(pipe.connect().await.unwrap(), GetFlowsRequest::default()).await.unwrap();
    let got = flows(&all);
    assert_eq!(got.len(), 160);
    let mut ids: Vec<_> = got.iter().map(|f| f.uuid.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 160, "no duplicates");
    let lost: Vec<u64> = all
        .iter()
        .filter_map(|r| match &r.response_types {
            Some(ResponseTypes::LostEvents(l)) => {
                assert_eq!(l.source(), LostEventSource::ObserverEventsQueue);
                Some(l.num_events_lost)
            }
            _ => None,
        })
        .collect();
    assert_eq!(lost, [10]);
}

#[tokio::test]
async fn a_malformed_event_is_counted_in_its_place_and_the_batch_kept() {
    let hub = memory_hub(Duration::ZERO);
    let pipe = Pipe::serve(hub.clone());
    let t0 = now_ns() - 10 * SEC;
    let good = |k: i64| prost::Message::encode_to_vec(&flow("n1", t0 + k, 80, Verdict::Forwarded));
    // A flow without node names gets its agent's (so it is stored re-encoded, not as it came).
    let mut unnamed = flow("n1", t0 + 3, 443, Verdict::Forwarded);
    unnamed.node_name.clear();
    if let Some(ResponseTypes::Flow(f)) = &mut unnamed.response_types {
        f.node_name.clear();
    }
    // Field 1 (the flow) says 200 bytes follow; 2 do.
    let events = vec![good(1), vec![0x0a, 200, 1, 2], prost::Message::encode_to_vec(&unnamed)];
    let (tx, rx) = mpsc::channel(4);
    tx.send(hello("a1", "n1")).await.unwrap();
    tx.send(PushRequest {
        message: Some(push_request::Message::Batch(Batch {
            first_seq: 1,
            events: events.into_iter().map(Into::into).collect(),
            status: None,
        })),
    })
    .await
    .unwrap();
    drop(tx);
    let mut client = IngestClient::new(pipe.connect().await.unwrap());
    let mut resp = client.push(ReceiverStream::new(rx)).await.expect("push").into_inner();
    let mut acked = 0;
    while let Some(m) = resp.message().await.expect("ack stream") {
        if let Some(push_response::Message::Ack(a)) = m.message {
            acked = a.stored_through;
        }
    }
    assert_eq!(acked, 3, "all three sequence numbers are stored");
    let all = get_flows(pipe.connect().await.unwrap(), GetFlowsRequest::default()).await.unwrap();
    let got = flows(&all);
    let ports: Vec<_> = got.iter().map(|f| f.ports().map(|(_, d)| d)).collect();
    assert_eq!(ports, [Some(80), Some(443)]);
    assert!(got.iter().all(|f| f.node_name == "n1"), "{got:?}");
    let lost: Vec<u64> = all
        .iter()
        .filter_map(|r| match &r.response_types {
            Some(ResponseTypes::LostEvents(l)) => Some(l.num_events_lost),
            _ => None,
        })
        .collect();
    assert_eq!(lost, [1], "the malformed event is one lost event in its place");
}

#[tokio::test]
async fn follow_streams_new_flows_and_node_changes() {
    let hub = memory_hub(Duration::from_millis(20));
    let pipe = Pipe::serve(hub.clone());
    let mut client = ObserverClient::new(pipe.connect().await.unwrap());
    let mut stream = client
        .get_flows(GetFlowsRequest {
            follow: true,
            whitelist: vec![FlowFilter {
                destination_port: vec!["443".into()],
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let t0 = now_ns();
    let events = vec![
        flow("n1", t0, 80, Verdict::Forwarded),
        flow("n1", t0 + 1, 443, Verdict::Forwarded),
        flow("n1", t0 + 2, 443, Verdict::Dropped),
    ];
    let ch = pipe.connect().await.unwrap();
    let pusher = tokio::spawn(async move { push(ch, "a1", "n1", vec![(1, events)]).await });
    let mut seen = Vec::new();
    let mut states = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while seen.len() < 2 || states.len() < 2 {
        let msg = tokio::time::timeout_at(deadline, stream.message())
            .await
            .expect("in time")
            .unwrap()
            .unwrap();
        match msg.response_types {
            Some(ResponseTypes::Flow(f)) => seen.push(f.uuid),
            Some(ResponseTypes::NodeStatus(n)) => states.push((n.state_change(), n.node_names)),
            other => panic!("unexpected {other:?}"),
        }
    }
    pusher.await.unwrap();
    assert_eq!(seen, [format!("n1/{}/443", t0 + 1), format!("n1/{}/443", t0 + 2)]);
    assert_eq!(states[0], (NodeState::NodeConnected, vec!["n1".to_owned()]));
    assert_eq!(states[1], (NodeState::NodeUnavailable, vec!["n1".to_owned()]));
}

#[tokio::test]
async fn history_beyond_memory_is_read_from_disk_and_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = now_ns() - 3600 * SEC;
    {
        let hub = disk_hub(dir.path(), 4096, Duration::ZERO);
        let pipe = Pipe::serve(hub.clone());
        // 20 000 flows 10 ms apart (200 s); memory holds the last 4096.
        let events: Vec<_> =
            (0..20_000).map(|k| flow("n1", t0 + k * 10_000_000, 80, Verdict::Forwarded)).collect();
        let batches = events
            .chunks(1000)
            .enumerate()
            .map(|(i, c)| (1 + i as u64 * 1000, c.to_vec()))
            .collect();
        let (_, acked) = push(pipe.connect().await.unwrap(), "a1", "n1", batches).await;
        assert_eq!(acked, 20_000);
        // --since 10 s after the start: far older than anything in memory.
        let r = get_flows(
            pipe.connect().await.unwrap(),
            GetFlowsRequest {
                since: Some(ts(t0 + 10 * SEC)),
                until: Some(ts(t0 + 20 * SEC - 1)),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(flows(&r).len(), 1000);
        pipe.stop();
        hub.shutdown().await;
    }
    // A new collector on the same directory has the history and knows where the agent was.
    let hub = disk_hub(dir.path(), 4096, Duration::ZERO);
    let pipe = Pipe::serve(hub.clone());
    let r = get_flows(
        pipe.connect().await.unwrap(),
        GetFlowsRequest { number: 5, first: true, ..Default::default() },
    )
    .await
    .unwrap();
    assert_eq!(
        flows(&r).iter().map(|f| time_of(f)).collect::<Vec<_>>(),
        (0..5).map(|k| t0 + k * 10_000_000).collect::<Vec<_>>()
    );
    let (w, _) = push(pipe.connect().await.unwrap(), "a1", "n1", vec![]).await;
    assert_eq!(w.resume_after, 20_000);
    let status = ObserverClient::new(pipe.connect().await.unwrap())
        .server_status(ServerStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.num_flows, 20_000);
    let _ = Arc::clone(&hub);
}
