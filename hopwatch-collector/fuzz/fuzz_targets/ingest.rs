//! The collector's ingest path (`hopwatch.v1.Ingest/Push`) on hostile input: protobuf decoding
//! of each stream message (what tonic's codec does), the Hello check, `Hub::accept_encoded`
//! with its per-event decoding and sequence numbers, the merge stage and the store; then what a
//! reader gets back.
//!
//! Contract checked: nothing panics (also not in the merge thread: the hub would report itself
//! closed), everything accepted is stored (new events plus one notice per sequence gap), every
//! stored entry is a flow or a lost-event notice with a node name and a time, and each survives
//! the history's encoding (what `--data-dir` writes and reads back) unchanged.
//!
//! Input layout: stream messages, each a little-endian `u16` length and that many bytes (the
//! last one cut short if the input ends). As in the service, the stream ends at the first
//! message that does not decode or is out of place.
#![no_main]

use std::{sync::OnceLock, time::Duration};

use hopwatch_collector::{
    hub::{Hub, HubConfig},
    ingest::check_hello,
    merge::MergeConfig,
    store::{Chunk, Select, StoreConfig, record},
};
use hopwatch_proto::{
    hopwatch::v1::{Batch, PushRequest, push_request::Message},
    observer::{GetFlowsResponse, get_flows_response::ResponseTypes},
};
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
    })
}

fuzz_target!(|data: &[u8]| runtime().block_on(ingest(data)));

async fn ingest(data: &[u8]) {
    let mut messages = Vec::new();
    let mut rest = data;
    while let [lo, hi, tail @ ..] = rest {
        let len = usize::from(u16::from_le_bytes([*lo, *hi])).min(tail.len());
        let (msg, next) = tail.split_at(len);
        rest = next;
        match PushRequest::decode(msg) {
            Ok(m) => messages.push(m),
            Err(_) => break,
        }
    }
    let mut messages = messages.into_iter();
    let Some(PushRequest { message: Some(Message::Hello(hello)) }) = messages.next() else {
        return;
    };
    if check_hello(&hello).is_err() {
        return;
    }
    let hub = Hub::start(&HubConfig {
        store: StoreConfig { memory_flows: 65_536, disk: None },
        merge: MergeConfig { window: Duration::from_millis(100), max_pending: 1 << 16 },
    })
    .expect("a memory-only store opens");
    let agent = hub.agent(&hello.agent_id, &hello.node_name);
    let mut expected = 0u64;
    for m in messages {
        let Some(Message::Batch(Batch { first_seq, events, status })) = m.message else { break };
        let accepted = hub
            .accept_encoded(&agent, first_seq, events, status.as_ref())
            .await
            .expect("the hub takes batches until it is shut down");
        expected += accepted.new + u64::from(accepted.gap > 0);
    }
    hub.flush().await.expect("the merge stage runs");
    let (first, end) = (hub.store.first(), hub.store.end());
    assert_eq!(end - first, expected, "everything accepted is stored");
    let mut at = first;
    while at < end {
        let Chunk::Entries { end: chunk_end, entries, .. } =
            hub.store.chunk_from(at, end, Select::ALL)
        else {
            panic!("entries {at}..{end} are in memory");
        };
        assert!(chunk_end > at, "progress at {at}");
        assert_eq!(entries.len() as u64, chunk_end - at, "every entry without a sieve");
        at = chunk_end;
        for e in entries {
            check(&e.resp, &hello.node_name);
        }
    }
    hub.shutdown().await;
}

fn check(resp: &GetFlowsResponse, node: &str) {
    assert!(!resp.node_name.is_empty() && resp.time.is_some(), "{resp:?}");
    match &resp.response_types {
        Some(ResponseTypes::Flow(f)) => assert!(!f.node_name.is_empty(), "{f:?}"),
        Some(ResponseTypes::LostEvents(_)) => {}
        other => panic!("stored a {other:?} from node {node}"),
    }
    let prepared = record::Prepared::of(resp, None, true);
    let mut framed = Vec::new();
    record::frame(&mut framed, record::KIND_ENTRY, &prepared.encoded);
    let mut back = Vec::new();
    let valid = record::parse_records(&framed, |r, _| back.push(r));
    assert_eq!(valid, framed.len(), "the history reads its own record");
    match back.as_slice() {
        [record::Record::Entry(e)] => assert_eq!(**e, *resp, "history round trip"),
        _ => panic!("one entry in, {} records out", back.len()),
    }
}
