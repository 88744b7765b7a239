use std::time::Duration;

use hopwatch_proto::{
    clock::now_ns,
    flow::{Flow, Layer4, Tcp, Verdict, layer4},
};

use super::*;

const SEC: i64 = 1_000_000_000;

pub(crate) fn flow_resp(time_ns: i64, port: u32, node: &str) -> GetFlowsResponse {
    let time = prost_types::Timestamp {
        seconds: time_ns / SEC,
        nanos: i32::try_from(time_ns % SEC).expect("below a second"),
    };
    GetFlowsResponse {
        time: Some(time),
        node_name: node.to_owned(),
        response_types: Some(ResponseTypes::Flow(Flow {
            time: Some(time),
            uuid: format!("{node}-{time_ns}-{port}"),
            verdict: if port == 9 { Verdict::Dropped } else { Verdict::Forwarded }.into(),
            node_name: node.to_owned(),
            l4: Some(Layer4 {
                protocol: Some(layer4::Protocol::Tcp(Tcp {
                    source_port: 40000,
                    destination_port: port,
                    flags: None,
                })),
            }),
            ..Default::default()
        })),
    }
}

/// Appends `(time, response)` pairs (the time is the response's own).
fn put(
    w: &mut StoreWriter,
    entries: Vec<(i64, GetFlowsResponse)>,
    cp: &Checkpoint,
) -> Result<(), StoreError> {
    let mut v: Vec<Incoming> = entries
        .into_iter()
        .enumerate()
        .map(|(i, (t, r))| {
            // Every path: indexed where it arrives or by the writer, kept decoded or not.
            let inc = Incoming::new(r, Preparation { index: i % 2 == 0, decoded: i % 3 == 0 });
            assert_eq!(inc.time_ns, t);
            inc
        })
        .collect();
    w.append(&mut v, cp)
}

fn disk_cfg(dir: &Path, max_bytes: u64, max_age: Duration) -> StoreConfig {
    StoreConfig {
        memory_flows: MIN_MEMORY_FLOWS,
        disk: Some(DiskConfig {
            dir: dir.to_owned(),
            max_bytes,
            max_age,
            fsync_interval: Duration::from_secs(1),
        }),
    }
}

fn checkpoint(seq: u64) -> Checkpoint {
    Checkpoint {
        agents: vec![record::AgentMark {
            agent_id: "a1".into(),
            node_name: "n1".into(),
            seq,
            updated_unix_s: 0,
        }],
    }
}

/// Every entry in `[from, to)`, reading forward chunk by chunk; missing ranges as `None`.
fn read_all(store: &FlowStore, from: u64, to: u64) -> Vec<Option<u32>> {
    let mut out = Vec::new();
    let mut pos = from;
    while pos < to {
        match store.chunk_from(pos, to, Select::ALL) {
            Chunk::Entries { start, entries, .. } => {
                assert!(!entries.is_empty(), "empty chunk at {pos}");
                let lo = pos;
                for e in entries.iter().filter(|e| e.index >= lo && e.index < to) {
                    assert_eq!(e.index, pos, "indices are consecutive");
                    let Some(ResponseTypes::Flow(f)) = &e.resp.response_types else { panic!() };
                    let Some(layer4::Protocol::Tcp(t)) = f.l4.as_ref().unwrap().protocol else {
                        panic!()
                    };
                    out.push(Some(t.destination_port));
                    pos += 1;
                }
                assert!(start <= pos);
            }
            Chunk::Missing { start, end } | Chunk::Skipped { start, end } => {
                assert!(start <= pos && end > pos, "chunk [{start},{end}) must cover {pos}");
                for _ in pos..end.min(to) {
                    out.push(None);
                }
                pos = end.min(to);
            }
        }
    }
    out
}

#[test]
fn memory_only_store_keeps_the_newest() {
    let (store, mut w, rec) =
        FlowStore::open(&StoreConfig { memory_flows: MIN_MEMORY_FLOWS, disk: None }).unwrap();
    assert_eq!(rec.next_index, 0);
    let t0 = now_ns();
    let entries: Vec<_> =
        (0..10_000u32).map(|i| (t0 + i64::from(i), flow_resp(t0 + i64::from(i), i, "n"))).collect();
    put(&mut w, entries, &Checkpoint::default()).unwrap();
    assert_eq!(store.end(), 10_000);
    assert_eq!(store.first(), 10_000 - MIN_MEMORY_FLOWS as u64);
    let got = read_all(&store, 0, 10_000);
    assert!(got[..10_000 - MIN_MEMORY_FLOWS].iter().all(Option::is_none));
    assert_eq!(got[9_999], Some(9_999));
    assert_eq!(store.stats().held, MIN_MEMORY_FLOWS as u64);
    // A batch that evicts part of the ring: the oldest leave before the newest come in, so the
    // ring never holds room for more than its capacity.
    let entries: Vec<_> = (10_000..11_000u32)
        .map(|i| (t0 + i64::from(i), flow_resp(t0 + i64::from(i), i, "n")))
        .collect();
    put(&mut w, entries, &Checkpoint::default()).unwrap();
    let first = 11_000 - MIN_MEMORY_FLOWS as u64;
    assert_eq!(store.first(), first);
    let got = read_all(&store, first, 11_000);
    assert!(got.iter().zip(first..).all(|(g, i)| *g == u32::try_from(i).ok()));
    let room = store.ring.read().unwrap().entries.capacity();
    assert!(room < 2 * MIN_MEMORY_FLOWS, "{room} slots for {MIN_MEMORY_FLOWS}");
}

#[test]
fn history_survives_a_restart_and_torn_tails_are_cut() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = disk_cfg(dir.path(), 1 << 30, Duration::from_hours(24));
    let t0 = now_ns();
    {
        let (store, mut w, rec) = FlowStore::open(&cfg).unwrap();
        assert_eq!(rec.next_index, 0);
        for round in 0..10u32 {
            let entries = (0..1000u32)
                .map(|i| {
                    let n = round * 1000 + i;
                    (t0 + i64::from(n), flow_resp(t0 + i64::from(n), n, "n1"))
                })
                .collect();
            put(&mut w, entries, &checkpoint(u64::from(round + 1) * 1000)).unwrap();
        }
        assert_eq!(store.end(), 10_000);
        // Everything, including what left memory, reads back in order.
        let got = read_all(&store, 0, 10_000);
        assert_eq!(got, (0..10_000).map(Some).collect::<Vec<_>>());
    }
    // Simulate a crash after entries were written but before their checkpoint: append framed
    // entries and a half-written record to the newest segment.
    let newest = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .max()
        .unwrap();
    let mut tail = Vec::new();
    for i in 0..3 {
        record::frame(
            &mut tail,
            record::KIND_ENTRY,
            &prost::Message::encode_to_vec(&flow_resp(t0, 77 + i, "n1")),
        );
    }
    tail.extend_from_slice(&[0x40, 0, 0, 0, 1, 2]);
    let mut bytes = std::fs::read(&newest).unwrap();
    bytes.extend_from_slice(&tail);
    std::fs::write(&newest, &bytes).unwrap();

    let (store, mut w, rec) = FlowStore::open(&cfg).unwrap();
    assert_eq!(rec.next_index, 10_000, "entries after the last checkpoint are not kept");
    assert_eq!(rec.discarded, 3);
    assert_eq!(rec.checkpoint, checkpoint(10_000));
    assert_eq!(read_all(&store, 0, 10_000), (0..10_000).map(Some).collect::<Vec<_>>());
    // Writing resumes at the next index.
    put(&mut w, vec![(t0, flow_resp(t0, 5, "n1"))], &checkpoint(10_001)).unwrap();
    assert_eq!(read_all(&store, 10_000, 10_001), [Some(5)]);
    drop((store, w));
    let (_, _, rec) = FlowStore::open(&cfg).unwrap();
    assert_eq!(rec.next_index, 10_001);
    assert_eq!(rec.discarded, 0);
}

#[test]
fn a_second_collector_cannot_open_the_same_directory() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = disk_cfg(dir.path(), 1 << 30, Duration::from_mins(1));
    let _first = FlowStore::open(&cfg).unwrap();
    let Err(err) = FlowStore::open(&cfg) else { panic!("second open succeeded") };
    assert!(err.to_string().contains("in use"), "{err}");
}

#[test]
fn retention_by_size_removes_the_oldest_segments() {
    let dir = tempfile::tempdir().unwrap();
    // 3 MiB of history in 1 MiB segments.
    let cfg = disk_cfg(dir.path(), 3 << 20, Duration::from_hours(24));
    let (store, mut w, _) = FlowStore::open(&cfg).unwrap();
    let t0 = now_ns();
    let mut n = 0u32;
    for _ in 0..100 {
        let entries = (0..500)
            .map(|_| {
                n += 1;
                (t0 + i64::from(n), flow_resp(t0 + i64::from(n), n, "node-with-a-long-name"))
            })
            .collect();
        put(&mut w, entries, &checkpoint(u64::from(n))).unwrap();
    }
    let stats = store.stats();
    let total: u64 = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(total <= (3 << 20) + (1 << 20) + 65_536, "history is {total} bytes");
    assert!(stats.first_index > 0, "old entries were removed");
    assert!(stats.held < u64::from(n));
    // What is left is readable and contiguous up to the end.
    let got = read_all(&store, stats.first_index, u64::from(n));
    assert!(got.iter().all(Option::is_some));
    // Removed entries are reported missing, not silently skipped.
    assert!(matches!(
        store.chunk_from(0, u64::from(n), Select::ALL),
        Chunk::Missing { start: 0, .. }
    ));
}

#[test]
fn retention_by_age_removes_old_segments() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = disk_cfg(dir.path(), 8 << 20, Duration::from_hours(1));
    let (store, mut w, _) = FlowStore::open(&cfg).unwrap();
    let old = now_ns() - 2 * 3600 * SEC;
    let mut n = 0u32;
    let write = |w: &mut StoreWriter, base: i64, n: &mut u32| {
        let entries = (0..500)
            .map(|_| {
                *n += 1;
                (base + i64::from(*n), flow_resp(base + i64::from(*n), *n, "n"))
            })
            .collect();
        put(w, entries, &checkpoint(u64::from(*n))).unwrap();
    };
    // Two-hour-old flows until the first segment is sealed, which makes it due for removal.
    for _ in 0..200 {
        write(&mut w, old, &mut n);
        if store.stats().first_index > 0 {
            break;
        }
    }
    assert!(store.stats().first_index > 0, "the segment of old flows was removed when sealed");
    let old_count = n;
    // Fresh flows fill the next segment; it is sealed but kept (its newest flow is recent).
    let now = now_ns();
    for _ in 0..200 {
        write(&mut w, now, &mut n);
        if store.index_segments() > 2 {
            break;
        }
    }
    assert!(store.index_segments() > 2, "a segment with fresh flows was sealed");
    // Every old flow is gone (their segment was sealed and was older than an hour); every
    // fresh one is still there.
    assert_eq!(
        store.stats().first_index,
        u64::from(old_count),
        "first kept flow is the first fresh one"
    );
}

#[test]
fn index_blocks_let_readers_skip() {
    let dir = tempfile::tempdir().unwrap();
    // 2 MiB segments.
    let cfg = disk_cfg(dir.path(), 16 << 20, Duration::from_hours(24));
    let (store, mut w, _) = FlowStore::open(&cfg).unwrap();
    let t0 = now_ns();
    // Blocks of port 80 flows, one with a single port 9 (dropped) flow, written in batches of
    // 10 000 (about 1 MB each: the first segment is sealed after the third).
    let mut entries: Vec<_> = (0..40_000).map(|i| (t0 + i, flow_resp(t0 + i, 80, "n"))).collect();
    entries[5_000] = (t0 + 5_000, flow_resp(t0 + 5_000, 9, "n"));
    for (i, batch) in entries.chunks(10_000).enumerate() {
        put(&mut w, batch.to_vec(), &checkpoint(i as u64 + 1)).unwrap();
    }
    let drops = crate::filter::FilterSet::new(
        &[hopwatch_proto::flow::FlowFilter {
            verdict: vec![Verdict::Dropped.into()],
            ..Default::default()
        }],
        &[],
    )
    .unwrap();
    let sieve = drops.sieve();
    let block = |b: &BlockMeta| sieve.group(|t| b.bloom.contains(t));
    let entry = |e| sieve.entry(e);
    let b = u64::from(record::BLOCK_ENTRIES);
    let (block_start, block_end) = (5_000 / b * b, 5_000 / b * b + b);
    // Returns the entries decoded, whether the drop was among them, and the blocks skipped.
    let scan = |store: &FlowStore, select: Select<'_>| {
        let (mut read, mut found, mut skipped, mut pos) = (0, false, 0, 0);
        while pos < block_end {
            match store.chunk_from(pos, block_end, select) {
                Chunk::Entries { end, entries, .. } => {
                    read += entries.len();
                    found |= entries.iter().any(|e| e.index == 5_000);
                    pos = end;
                }
                Chunk::Skipped { end, .. } => {
                    skipped += 1;
                    pos = end;
                }
                Chunk::Missing { .. } => panic!("nothing is missing"),
            }
        }
        (read as u64, found, skipped)
    };
    let (read, found, skipped) = scan(&store, Select { block: &block, entry: &|_| true });
    assert_eq!((read, found), (b, true), "only the block with the drop is read");
    assert_eq!(skipped, block_start / b, "the other blocks are skipped");
    // Inside that block, the entries' sieves leave few besides the drop to decode.
    let (read, found, _) = scan(&store, Select { block: &block, entry: &entry });
    assert!(found, "the drop is decoded");
    assert!(read < b / 4, "{read} of the block's {b} entries were decoded");
    // The same from the index file after a restart (sieves are kept in `.idx`).
    drop((store, w));
    assert!(dir.path().join(format!("{:020}.idx", 0)).exists(), "the first segment is sealed");
    let (store, _w, _) = FlowStore::open(&cfg).unwrap();
    let (read, found, _) = scan(&store, Select { block: &block, entry: &entry });
    assert!(found && read < b / 4, "after a restart: {read} of {b} decoded, drop found {found}");
}
