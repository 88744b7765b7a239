//! The flow store: every event the collector accepted, in release order, each with an index
//! (0, 1, 2, ...). The newest `memory_flows` are in a memory ring, encoded (a few hundred bytes
//! each, where a decoded flow takes over a kilobyte) and decoded when read; with a data
//! directory, all of them are also in the on-disk history ([`disk`]) until retention removes
//! them.
//!
//! One writer ([`StoreWriter`], owned by the merge stage) appends; any number of readers take
//! chunks by index range. Readers learn about new entries through a `watch` of the end index.

pub mod disk;
pub mod record;

use std::{
    collections::VecDeque,
    path::{Path, PathBuf},
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use hopwatch_proto::observer::{GetFlowsResponse, get_flows_response::ResponseTypes};
use prost::Message as _;
use tokio::sync::watch;

use self::{
    disk::{DiskConfig, DiskIndex, DiskLog, Recovery},
    record::{BlockMeta, Checkpoint},
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "data directory {} is in use by another hopwatch collector (or agent with an embedded \
         collector); give each its own --data-dir",
        dir.display()
    )]
    Locked { dir: PathBuf },
}

impl StoreError {
    pub(crate) fn io(op: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self::Io { op, path: path.to_owned(), source }
    }
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Entries kept in memory (at least 4096: more than a block, so an entry leaves memory only
    /// once its block is on disk).
    pub memory_flows: usize,
    pub disk: Option<DiskConfig>,
}

pub const MIN_MEMORY_FLOWS: usize = 4096;

/// One stored event (boxed once, when it arrives, and then only pointed to).
#[derive(Debug)]
pub struct Stored {
    pub index: u64,
    pub time_ns: i64,
    pub resp: GetFlowsResponse,
}

/// When an event was observed (its own time, else its flow's), in Unix nanoseconds.
pub fn entry_time_ns(resp: &GetFlowsResponse) -> i64 {
    let ts = resp.time.as_ref().or(match &resp.response_types {
        Some(ResponseTypes::Flow(f)) => f.time.as_ref(),
        _ => None,
    });
    ts.map_or(0, |t| t.seconds.saturating_mul(1_000_000_000).saturating_add(i64::from(t.nanos)))
}

struct Ring {
    /// Index of `entries[0]`.
    first: u64,
    entries: VecDeque<Encoded>,
}

/// An entry in the memory ring: its time, its term sieve and its protobuf encoding (shared, so
/// a reader takes it without copying and decodes it outside the ring's lock).
#[derive(Clone)]
struct Encoded {
    time_ns: i64,
    /// `filter::terms::entry_sieve` of its terms; all ones when not worked out (a store
    /// without history does not compute terms).
    sieve: u64,
    bytes: bytes::Bytes,
}

/// What a reader can rule out without decoding: history blocks by their index, entries by
/// their term sieve ([`Select::ALL`]: nothing).
#[derive(Clone, Copy)]
pub struct Select<'a> {
    pub block: &'a dyn Fn(&BlockMeta) -> bool,
    pub entry: &'a dyn Fn(u64) -> bool,
}

impl Select<'static> {
    pub const ALL: Self = Self { block: &|_| true, entry: &|_| true };
}

/// The ring's entries `[lo, hi)` (positions) that `select` takes, with their indexes.
fn selected(ring: &Ring, lo: usize, hi: usize, select: Select<'_>) -> Vec<(u64, Encoded)> {
    (ring.first + lo as u64..)
        .zip(ring.entries.range(lo..hi))
        .filter(|(_, e)| (select.entry)(e.sieve))
        .map(|(i, e)| (i, e.clone()))
        .collect()
}

/// Entries read from the ring, decoded (outside its lock).
fn decoded(encoded: Vec<(u64, Encoded)>) -> Vec<Arc<Stored>> {
    encoded
        .into_iter()
        .map(|(index, e)| {
            let resp = GetFlowsResponse::decode(e.bytes)
                .expect("the ring holds what the store itself encoded");
            Arc::new(Stored { index, time_ns: e.time_ns, resp })
        })
        .collect()
}

/// A run of consecutive entries handed to a reader.
pub enum Chunk {
    /// Of the entries `[start, end)`, those the reader's [`Select`] did not rule out (in index
    /// order; possibly none).
    Entries { start: u64, end: u64, entries: Vec<Arc<Stored>> },
    /// Entries `[start, end)` were looked at only through the index: no match possible.
    Skipped { start: u64, end: u64 },
    /// Entries `[start, end)` are gone (retention, or memory without history).
    Missing { start: u64, end: u64 },
}

/// Counters and limits a status call reports.
#[derive(Debug, Clone, Copy)]
pub struct StoreStats {
    pub held: u64,
    pub capacity: u64,
    pub seen: u64,
    pub first_index: u64,
    pub end_index: u64,
    pub disk_bytes: u64,
}

pub struct FlowStore {
    ring: RwLock<Ring>,
    memory_cap: usize,
    disk: Option<(Arc<RwLock<DiskIndex>>, u64)>,
    end: watch::Sender<u64>,
    seen: AtomicU64,
}

pub struct StoreWriter {
    store: Arc<FlowStore>,
    disk: Option<DiskLog>,
    next_index: u64,
    /// Where stored entries also go (the ClickHouse history's write queue).
    sink: Option<Arc<crate::clickhouse::writer::Sink>>,
}

impl FlowStore {
    /// Opens the store (recovering the history, if any); returns the writer and what the
    /// history's last checkpoint says about agents.
    pub fn open(cfg: &StoreConfig) -> Result<(Arc<Self>, StoreWriter, Recovery), StoreError> {
        let (disk, recovery) = match &cfg.disk {
            Some(d) => {
                let (log, rec) = DiskLog::open(d.clone())?;
                (Some(log), rec)
            }
            None => (None, Recovery::default()),
        };
        let memory_cap = cfg.memory_flows.max(MIN_MEMORY_FLOWS);
        let store = Arc::new(Self {
            ring: RwLock::new(Ring {
                first: recovery.next_index,
                entries: VecDeque::with_capacity(memory_cap.min(1 << 16)),
            }),
            memory_cap,
            disk: disk.as_ref().zip(cfg.disk.as_ref()).map(|(l, c)| (l.index(), c.max_bytes)),
            end: watch::channel(recovery.next_index).0,
            seen: AtomicU64::new(0),
        });
        let writer =
            StoreWriter { store: store.clone(), disk, next_index: recovery.next_index, sink: None };
        Ok((store, writer, recovery))
    }

    /// Index one past the newest entry.
    pub fn end(&self) -> u64 {
        *self.end.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.end.subscribe()
    }

    /// Queries running now (each follower among them).
    pub fn readers(&self) -> usize {
        self.end.receiver_count()
    }

    /// Oldest index still readable.
    pub fn first(&self) -> u64 {
        let ring_first = self.ring.read().expect("ring lock").first;
        self.disk
            .as_ref()
            .and_then(|(d, _)| d.read().expect("disk index lock").first_index())
            .map_or(ring_first, |d| d.min(ring_first))
    }

    #[cfg(test)]
    fn index_segments(&self) -> usize {
        self.disk.as_ref().map_or(0, |(d, _)| d.read().expect("disk index lock").segments.len())
    }

    pub fn stats(&self) -> StoreStats {
        let (ring_first, ring_len) = {
            let r = self.ring.read().expect("ring lock");
            (r.first, r.entries.len() as u64)
        };
        let end = self.end();
        let (held, capacity, first, bytes) = match &self.disk {
            Some((d, max_bytes)) => {
                let d = d.read().expect("disk index lock");
                let (bytes, entries) = (d.bytes(), d.entries());
                // Entries not yet in a sealed block are in memory (and in the file).
                let on_disk_end = d
                    .segments
                    .iter()
                    .filter_map(|s| s.blocks.last())
                    .map(|b| b.end_index())
                    .max()
                    .unwrap_or(0);
                let held = entries + end.saturating_sub(on_disk_end.max(ring_first));
                let per_entry = if entries > 0 { bytes / entries.max(1) } else { 400 };
                let cap = (max_bytes / per_entry.max(1)).max(held);
                (held, cap, d.first_index().unwrap_or(ring_first).min(ring_first), bytes)
            }
            None => (ring_len, self.memory_cap as u64, ring_first, 0),
        };
        StoreStats {
            held,
            capacity,
            seen: self.seen.load(Ordering::Relaxed),
            first_index: first,
            end_index: end,
            disk_bytes: bytes,
        }
    }

    /// The sealed history block holding entry `at`, if any.
    fn sealed_block_of(&self, at: u64) -> Option<Arc<BlockMeta>> {
        let (index, _) = self.disk.as_ref()?;
        let index = index.read().expect("disk index lock");
        find_block(&index, at, false).map(|(_, b)| b).filter(|b| b.first_index <= at)
    }

    /// The chunk of entries that starts at `from` (going forward, up to `end`). Disk blocks that
    /// `select` rejects come back as [`Chunk::Skipped`]; so do entries still in memory whose
    /// block is already sealed in the history (its index covers them).
    pub fn chunk_from(&self, from: u64, end: u64, select: Select<'_>) -> Chunk {
        let block = self.sealed_block_of(from);
        {
            let ring = self.ring.read().expect("ring lock");
            if from >= ring.first {
                let mut stop = end.min(from.saturating_add(1024));
                if let Some(b) = &block {
                    if !(select.block)(b) && !b.has_notices() {
                        return Chunk::Skipped {
                            start: from,
                            end: b.end_index().min(end).max(from + 1),
                        };
                    }
                    stop = stop.min(b.end_index());
                }
                let lo = usize::try_from(from - ring.first).unwrap_or(usize::MAX);
                let hi = usize::try_from(stop.saturating_sub(ring.first))
                    .unwrap_or(usize::MAX)
                    .min(ring.entries.len());
                let lo = lo.min(hi);
                let (start, end) = (ring.first + lo as u64, ring.first + hi as u64);
                let encoded = selected(&ring, lo, hi, select);
                drop(ring);
                return Chunk::Entries { start, end, entries: decoded(encoded) };
            }
        }
        let ring_first = self.ring.read().expect("ring lock").first;
        self.disk_chunk(from, end.min(ring_first), true, select)
    }

    /// The chunk of entries that ends at `before` (exclusive), going backward down to `start`.
    pub fn chunk_before(&self, before: u64, start: u64, select: Select<'_>) -> Chunk {
        let block = before.checked_sub(1).and_then(|at| self.sealed_block_of(at));
        {
            let ring = self.ring.read().expect("ring lock");
            if before > ring.first {
                let mut from = before.saturating_sub(1024).max(start).max(ring.first);
                if let Some(b) = &block {
                    if !(select.block)(b) && !b.has_notices() {
                        let skip_to = b.first_index.max(start).min(before - 1);
                        return Chunk::Skipped { start: skip_to, end: before };
                    }
                    from = from.max(b.first_index);
                }
                let hi = usize::try_from(before - ring.first)
                    .unwrap_or(usize::MAX)
                    .min(ring.entries.len());
                let lo = usize::try_from(from - ring.first).unwrap_or(usize::MAX).min(hi);
                let (start, end) = (ring.first + lo as u64, ring.first + hi as u64);
                let encoded = selected(&ring, lo, hi, select);
                drop(ring);
                return Chunk::Entries { start, end, entries: decoded(encoded) };
            }
        }
        self.disk_chunk(before.saturating_sub(1), before, false, select)
    }

    /// The disk block holding `at` (forward: the first block at or after it; backward: the
    /// block ending at `limit`).
    fn disk_chunk(&self, at: u64, limit: u64, forward: bool, select: Select<'_>) -> Chunk {
        let Some((index, _)) = &self.disk else {
            return if forward {
                Chunk::Missing { start: at, end: limit }
            } else {
                Chunk::Missing { start: 0, end: limit }
            };
        };
        let found = {
            let index = index.read().expect("disk index lock");
            find_block(&index, at, forward)
        };
        let Some((path, block)) = found else {
            return if forward {
                let first = index.read().expect("disk index lock").first_index();
                match first {
                    Some(f) if f > at => Chunk::Missing { start: at, end: f.min(limit) },
                    _ => Chunk::Missing { start: at, end: limit },
                }
            } else {
                Chunk::Missing { start: 0, end: limit }
            };
        };
        if forward && block.first_index > at {
            return Chunk::Missing { start: at, end: block.first_index.min(limit) };
        }
        if !forward && block.end_index() < limit {
            return Chunk::Missing { start: block.end_index(), end: limit };
        }
        if !(select.block)(&block) && !block.has_notices() {
            return Chunk::Skipped { start: block.first_index, end: block.end_index() };
        }
        match disk::read_block(&path, &block, select.entry) {
            Ok(entries) => {
                Chunk::Entries { start: block.first_index, end: block.end_index(), entries }
            }
            Err(e) => {
                // Retention removed the file between the index lookup and the read.
                tracing::debug!(path = %path.display(), error = %e, "history block unreadable");
                Chunk::Missing { start: block.first_index, end: block.end_index() }
            }
        }
    }
}

fn find_block(index: &DiskIndex, at: u64, forward: bool) -> Option<(Arc<PathBuf>, Arc<BlockMeta>)> {
    let seg_pos = index.segments.partition_point(|s| s.first_index <= at);
    let seg_pos = seg_pos.saturating_sub(1);
    for seg in index.segments.range(seg_pos..) {
        let pos = seg.blocks.partition_point(|b| b.end_index() <= at);
        if let Some(b) = seg.blocks.get(pos) {
            if !forward && b.first_index > at {
                return None;
            }
            return Some((seg.path.clone(), b.clone()));
        }
        if !forward {
            return None;
        }
    }
    None
}

impl Stored {
    /// A new entry; its index is assigned when it is stored.
    pub fn new(resp: GetFlowsResponse) -> Arc<Self> {
        Arc::new(Self { index: u64::MAX, time_ns: entry_time_ns(&resp), resp })
    }
}

/// An entry on its way into the store, made ready where it arrived (the ingest tasks run in
/// parallel; the writer is one thread).
#[derive(Debug)]
pub struct Incoming {
    pub time_ns: i64,
    pub prepared: record::Prepared,
    /// Decoded, only for a sink ([`Preparation::decoded`]); its index is set when it is stored.
    pub decoded: Option<Arc<Stored>>,
}

/// How entries are made ready where they arrive.
#[derive(Debug, Clone, Copy)]
pub struct Preparation {
    /// Work out its index terms and their sieve (for the on-disk history).
    pub index: bool,
    /// Keep it decoded (for a sink: the ClickHouse history). Otherwise nothing the ingest task
    /// allocated for it but its bytes reaches the writer thread: freed there, mimalloc's pages
    /// went back to their thread late and a busy collector kept faulting in fresh memory.
    pub decoded: bool,
}

impl Incoming {
    pub fn new(resp: GetFlowsResponse, how: Preparation) -> Self {
        Self::received(resp, None, how)
    }

    /// [`new`](Self::new) for an event that came `encoded` (then kept as it came).
    pub fn received(
        resp: GetFlowsResponse,
        encoded: Option<bytes::Bytes>,
        how: Preparation,
    ) -> Self {
        let prepared = record::Prepared::of(&resp, encoded, how.index);
        let time_ns = entry_time_ns(&resp);
        let decoded = how.decoded.then(|| Stored::new(resp));
        Self { time_ns, prepared, decoded }
    }
}

impl StoreWriter {
    pub fn store(&self) -> &Arc<FlowStore> {
        &self.store
    }

    /// Also hands every stored entry to `sink` (never waiting on it).
    pub fn set_sink(&mut self, sink: Arc<crate::clickhouse::writer::Sink>) {
        self.sink = Some(sink);
    }

    /// Appends `entries` (in order; drained from the vector, which keeps its capacity), writes
    /// them to the history with `checkpoint`, and makes them visible to readers. On `Ok`,
    /// everything up to `checkpoint` is stored. The entries' indexes are assigned here.
    pub fn append(
        &mut self,
        entries: &mut Vec<Incoming>,
        checkpoint: &Checkpoint,
    ) -> Result<(), StoreError> {
        let n = entries.len() as u64;
        let first = self.next_index;
        let mut encoded = Vec::with_capacity(entries.len());
        for e in entries.iter_mut() {
            if let Some(d) = &mut e.decoded {
                Arc::get_mut(d).expect("entries are not shared before they are stored").index =
                    self.next_index;
            }
            let record::Prepared { encoded: bytes, index } = std::mem::take(&mut e.prepared);
            let sieve = if let Some(d) = &mut self.disk {
                // Entries are indexed where they arrive when there is a history; this is only
                // for an entry prepared without it.
                let index = index.unwrap_or_else(|| {
                    record::Indexed::of(
                        &GetFlowsResponse::decode(&bytes[..])
                            .expect("an entry decodes from its own encoding"),
                    )
                });
                d.append(self.next_index, e.time_ns, &bytes, &index);
                index.sieve
            } else {
                u64::MAX
            };
            encoded.push(Encoded { time_ns: e.time_ns, sieve, bytes });
            self.next_index += 1;
        }
        // Visible in memory before the disk write: readers may see an entry an instant before
        // it is durable, but an agent is acknowledged only after.
        if let Some(sink) = &self.sink {
            sink.offer(entries.iter().zip(&encoded).filter_map(|(e, enc)| {
                let entry = e.decoded.clone()?;
                Some(crate::clickhouse::writer::Queued { entry, encoded: enc.bytes.clone() })
            }));
        }
        entries.clear();
        {
            // Oldest out first, so the ring never grows past its capacity (65 536 slots are
            // 2.5 MiB).
            let mut ring = self.store.ring.write().expect("ring lock");
            let excess = (ring.entries.len() + encoded.len()).saturating_sub(self.store.memory_cap);
            let from_ring = excess.min(ring.entries.len());
            ring.entries.drain(..from_ring);
            ring.entries.extend(encoded.into_iter().skip(excess - from_ring));
            ring.first += excess as u64;
            debug_assert_eq!(ring.first + ring.entries.len() as u64, first + n);
        }
        self.store.seen.fetch_add(n, Ordering::Relaxed);
        let result = match &mut self.disk {
            Some(d) => d.commit(checkpoint),
            None => Ok(()),
        };
        self.store.end.send_replace(self.next_index);
        result
    }

    /// Flushes and syncs the history (shutdown).
    pub fn close(&mut self, checkpoint: &Checkpoint) -> Result<(), StoreError> {
        match &mut self.disk {
            Some(d) => d.close(checkpoint),
            None => Ok(()),
        }
    }

    pub fn has_history(&self) -> bool {
        self.disk.is_some()
    }
}

#[cfg(test)]
mod tests;
