//! The on-disk flow history: an append-only log of segment files with a block index.
//!
//! Why a segment log and not an embedded database (redb, sled, fjall, RocksDB): flows are
//! written once, in time order, never updated, read as time ranges, and expire oldest first.
//! That is exactly what a log of segment files does natively: appends are sequential writes,
//! retention by size and age deletes whole files (no compaction, no write amplification, no
//! tombstones), a time range is a scan of contiguous blocks, and recovery after a crash is
//! "truncate the torn tail". A B-tree or LSM engine would add per-write transaction cost and
//! background compaction to provide updates and point lookups the collector never needs. What a
//! database would give for free — a consistency point and an index — is small here: a CRC per
//! record, a checkpoint record after every flush (ingest progress per agent: recovery truncates
//! after the last one, so stored data and acknowledgements always agree), and per-block
//! metadata (time range + Bloom filter of flow terms) kept in memory and in a sidecar `.idx`
//! file per sealed segment.
//!
//! Durability: records reach the kernel (write(2)) before agents are acknowledged, so a killed
//! collector loses nothing acknowledged; `fsync` runs every `fsync_interval` and at every
//! segment roll, bounding what a power loss can take.

use std::{
    collections::VecDeque,
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use hopwatch_proto::clock;
use prost::Message as _;

use super::{
    StoreError,
    record::{self, BLOCK_ENTRIES, BlockMeta, Checkpoint, KIND_CHECKPOINT, KIND_ENTRY, Record},
};

#[derive(Debug, Clone)]
pub struct DiskConfig {
    pub dir: PathBuf,
    /// Total size of the history; the oldest segments are deleted beyond it.
    pub max_bytes: u64,
    /// Segments whose newest flow is older than this are deleted.
    pub max_age: Duration,
    pub fsync_interval: Duration,
}

impl DiskConfig {
    fn segment_bytes(&self) -> u64 {
        (self.max_bytes / 8).clamp(1 << 20, 64 << 20)
    }
}

/// A segment as readers see it: only blocks whose bytes are written.
#[derive(Debug, Clone)]
pub struct SegmentView {
    pub first_index: u64,
    pub path: Arc<PathBuf>,
    pub blocks: Vec<Arc<BlockMeta>>,
    pub bytes: u64,
}

impl SegmentView {
    fn max_time_ns(&self) -> Option<i64> {
        self.blocks.iter().map(|b| b.max_time_ns).max()
    }

    pub fn entries(&self) -> u64 {
        self.blocks.iter().map(|b| u64::from(b.count)).sum()
    }
}

/// The shared, read-mostly index of the history.
#[derive(Debug, Default)]
pub struct DiskIndex {
    pub segments: VecDeque<SegmentView>,
}

impl DiskIndex {
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    pub fn entries(&self) -> u64 {
        self.segments.iter().map(SegmentView::entries).sum()
    }

    /// Oldest index still on disk.
    pub fn first_index(&self) -> Option<u64> {
        self.segments.iter().filter_map(|s| s.blocks.first()).map(|b| b.first_index).next()
    }
}

/// What recovery found.
#[derive(Debug, Default)]
pub struct Recovery {
    pub checkpoint: Checkpoint,
    pub next_index: u64,
    /// Entries written after the last checkpoint (never acknowledged; agents resend them).
    pub discarded: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct IndexFile {
    #[prost(uint64, tag = "1")]
    file_len: u64,
    #[prost(message, repeated, tag = "2")]
    blocks: Vec<BlockProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct BlockProto {
    #[prost(uint64, tag = "1")]
    first_index: u64,
    #[prost(uint32, tag = "2")]
    count: u32,
    #[prost(uint64, tag = "3")]
    offset: u64,
    #[prost(uint64, tag = "4")]
    len: u64,
    #[prost(int64, tag = "5")]
    min_time_ns: i64,
    #[prost(int64, tag = "6")]
    max_time_ns: i64,
    #[prost(bytes = "vec", tag = "7")]
    bloom: Vec<u8>,
    /// One per entry (absent in indexes written before sieves existed).
    #[prost(fixed64, repeated, tag = "8")]
    sieves: Vec<u64>,
}

struct Active {
    file: File,
    path: Arc<PathBuf>,
    /// Bytes known to be in the file.
    written: u64,
    open_block: Option<BlockMeta>,
}

pub struct DiskLog {
    cfg: DiskConfig,
    index: Arc<RwLock<DiskIndex>>,
    active: Active,
    /// Framed records not yet written.
    buf: Vec<u8>,
    /// Blocks sealed in `buf`, published once it is written.
    sealed: Vec<BlockMeta>,
    last_fsync: Instant,
    /// When retention last ran (`None`: not yet).
    last_retention: Option<Instant>,
    syncer: std::sync::mpsc::SyncSender<(File, Arc<PathBuf>)>,
    _lock: File,
}

fn segment_path(dir: &Path, first_index: u64) -> PathBuf {
    dir.join(format!("{first_index:020}.log"))
}

fn index_path(log: &Path) -> PathBuf {
    log.with_extension("idx")
}

/// Takes an exclusive lock on the directory so two collectors never write one history.
fn lock_dir(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join("LOCK");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| StoreError::io("open", &path, e))?;
    // An flock(2) on Linux: released when the collector exits, however it exits.
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Locked { dir: dir.to_owned() }),
        Err(std::fs::TryLockError::Error(e)) => Err(StoreError::io("lock", &path, e)),
    }
}

impl DiskLog {
    pub fn open(cfg: DiskConfig) -> Result<(Self, Recovery), StoreError> {
        fs::create_dir_all(&cfg.dir).map_err(|e| StoreError::io("create", &cfg.dir, e))?;
        let lock = lock_dir(&cfg.dir)?;
        let mut logs: Vec<(u64, PathBuf)> = Vec::new();
        for entry in fs::read_dir(&cfg.dir).map_err(|e| StoreError::io("list", &cfg.dir, e))? {
            let path = entry.map_err(|e| StoreError::io("list", &cfg.dir, e))?.path();
            if path.extension().is_some_and(|e| e == "log") {
                match record::read_header(&path) {
                    Ok(first) => logs.push((first, path)),
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "ignoring a file that is not a readable segment");
                    }
                }
            }
        }
        logs.sort();

        let mut recovery = Recovery::default();
        let mut views = VecDeque::new();
        // The newest segment with a checkpoint is where writing resumes; newer ones without
        // one were cut short while being created.
        while let Some((first, path)) = logs.pop() {
            let body = record::read_body(&path).map_err(|e| StoreError::io("read", &path, e))?;
            let (last, total) = find_cut(&body);
            let Some((checkpoint, cut)) = last else {
                tracing::warn!(path = %path.display(), "segment without a checkpoint (interrupted creation); removing it");
                recovery.discarded += total;
                remove_segment(&path);
                continue;
            };
            let (blocks, entries) = scan(first, &body[..cut]);
            recovery.discarded += total - entries;
            recovery.checkpoint = checkpoint;
            let keep = record::HEADER_LEN + cut as u64;
            let file = OpenOptions::new()
                .append(true)
                .open(&path)
                .map_err(|e| StoreError::io("open", &path, e))?;
            file.set_len(keep).map_err(|e| StoreError::io("truncate", &path, e))?;
            recovery.next_index = first + entries;
            let path = Arc::new(path);
            let active = Active { file, path: path.clone(), written: keep, open_block: None };
            views.push_front(SegmentView {
                first_index: first,
                path,
                blocks: blocks.into_iter().map(Arc::new).collect(),
                bytes: keep,
            });
            for (first, path) in logs.drain(..).rev() {
                views.push_front(load_sealed(first, &path)?);
            }
            let log = Self::assemble(cfg, lock, views, active);
            return Ok((log, recovery));
        }
        // Empty directory (or nothing usable): start a new history.
        let active = create_segment(&cfg.dir, 0, &Checkpoint::default())?;
        views.push_back(SegmentView {
            first_index: 0,
            path: active.path.clone(),
            blocks: Vec::new(),
            bytes: active.written,
        });
        Ok((Self::assemble(cfg, lock, views, active), recovery))
    }

    fn assemble(cfg: DiskConfig, lock: File, views: VecDeque<SegmentView>, active: Active) -> Self {
        Self {
            cfg,
            index: Arc::new(RwLock::new(DiskIndex { segments: views })),
            active,
            buf: Vec::with_capacity(1 << 20),
            sealed: Vec::new(),
            last_fsync: Instant::now(),
            last_retention: None,
            syncer: spawn_syncer(),
            _lock: lock,
        }
    }

    pub fn index(&self) -> Arc<RwLock<DiskIndex>> {
        self.index.clone()
    }

    /// Frames one entry into the write buffer (written by the next [`commit`](Self::commit)).
    pub fn append(&mut self, index: u64, time_ns: i64, encoded: &[u8], indexed: &record::Indexed) {
        let start = self.active.written + self.buf.len() as u64;
        record::frame(&mut self.buf, KIND_ENTRY, encoded);
        let end = self.active.written + self.buf.len() as u64;
        let block = self.active.open_block.get_or_insert_with(|| BlockMeta::new(index, start));
        block.add(time_ns, indexed, end);
        if block.count >= BLOCK_ENTRIES {
            self.sealed.push(self.active.open_block.take().expect("just filled"));
        }
    }

    /// Writes what was appended plus `checkpoint`, then publishes the written blocks. Agents may
    /// be acknowledged once this returns `Ok`.
    pub fn commit(&mut self, checkpoint: &Checkpoint) -> Result<(), StoreError> {
        record::frame(&mut self.buf, KIND_CHECKPOINT, &checkpoint.encode_to_vec());
        if let Err(e) = self.active.file.write_all(&self.buf) {
            // Cut a partial write back so the file stays a valid log; the caller retries.
            let _ = self.active.file.set_len(self.active.written);
            return Err(StoreError::io("write", &self.active.path, e));
        }
        self.active.written += self.buf.len() as u64;
        self.buf.clear();
        self.publish();
        if self.last_fsync.elapsed() >= self.cfg.fsync_interval {
            // In the background: a slow disk must not stall ingest (acknowledgements need only
            // write(2)); a sync still running when the next is due is simply not doubled.
            if let Ok(f) = self.active.file.try_clone() {
                let _ = self.syncer.try_send((f, self.active.path.clone()));
            }
            self.last_fsync = Instant::now();
        }
        if self.active.written >= self.cfg.segment_bytes() {
            self.roll(checkpoint)?;
        }
        if self.last_retention.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
            self.enforce_retention();
        }
        Ok(())
    }

    fn publish(&mut self) {
        let mut index = self.index.write().expect("disk index lock");
        let view = index.segments.back_mut().expect("the active segment is indexed");
        view.bytes = self.active.written;
        view.blocks.extend(self.sealed.drain(..).map(Arc::new));
    }

    /// Seals the active segment (its open block, its `.idx`) and starts a new one.
    fn roll(&mut self, checkpoint: &Checkpoint) -> Result<(), StoreError> {
        if let Some(b) = self.active.open_block.take() {
            self.sealed.push(b);
            self.publish();
        }
        let path = self.active.path.clone();
        let sealed =
            self.active.file.try_clone().map_err(|e| StoreError::io("reopen", &path, e))?;
        // Waits only if several syncs are already queued.
        let _ = self.syncer.send((sealed, path.clone()));
        let (next_index, blocks) = {
            let index = self.index.read().expect("disk index lock");
            let view = index.segments.back().expect("active segment");
            let next = view.blocks.last().map_or(view.first_index, |b| b.end_index());
            (next, view.blocks.clone())
        };
        write_index_file(&path, self.active.written, &blocks);
        self.active = create_segment(&self.cfg.dir, next_index, checkpoint)?;
        self.index.write().expect("disk index lock").segments.push_back(SegmentView {
            first_index: next_index,
            path: self.active.path.clone(),
            blocks: Vec::new(),
            bytes: self.active.written,
        });
        self.last_fsync = Instant::now();
        self.enforce_retention();
        Ok(())
    }

    /// Deletes the oldest sealed segments beyond the size limit or older than the age limit.
    pub fn enforce_retention(&mut self) {
        self.last_retention = Some(Instant::now());
        let oldest_allowed = clock::now_ns()
            .saturating_sub(i64::try_from(self.cfg.max_age.as_nanos()).unwrap_or(i64::MAX));
        loop {
            let victim = {
                let index = self.index.read().expect("disk index lock");
                let Some(oldest) = index.segments.front() else { break };
                let sealed = index.segments.len() > 1;
                let too_big = index.bytes() > self.cfg.max_bytes;
                let too_old = oldest.max_time_ns().is_some_and(|t| t < oldest_allowed);
                if !(sealed && (too_big || too_old)) {
                    break;
                }
                oldest.path.clone()
            };
            self.index.write().expect("disk index lock").segments.pop_front();
            tracing::debug!(path = %victim.display(), "retention: removing segment");
            remove_segment(&victim);
        }
    }

    /// Writes everything and syncs it (shutdown).
    pub fn close(&mut self, checkpoint: &Checkpoint) -> Result<(), StoreError> {
        self.commit(checkpoint)?;
        self.active.file.sync_all().map_err(|e| StoreError::io("fsync", &self.active.path, e))
    }
}

/// A thread that fsyncs the files it is handed, one at a time.
fn spawn_syncer() -> std::sync::mpsc::SyncSender<(File, Arc<PathBuf>)> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<(File, Arc<PathBuf>)>(4);
    std::thread::Builder::new()
        .name("hopwatch-fsync".into())
        .spawn(move || {
            for (file, path) in rx {
                if let Err(e) = file.sync_data() {
                    tracing::error!(path = %path.display(), error = %e, "cannot fsync the flow history");
                }
            }
        })
        .expect("spawning the fsync thread");
    tx
}

fn remove_segment(path: &Path) {
    for p in [path.to_owned(), index_path(path)] {
        if let Err(e) = fs::remove_file(&p)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %p.display(), error = %e, "cannot remove segment file");
        }
    }
}

fn create_segment(
    dir: &Path,
    first_index: u64,
    checkpoint: &Checkpoint,
) -> Result<Active, StoreError> {
    let path = segment_path(dir, first_index);
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .map_err(|e| StoreError::io("create", &path, e))?;
    // Header and a checkpoint first, so the newest segment always says where agents resume.
    let mut bytes = record::header(first_index).to_vec();
    record::frame(&mut bytes, KIND_CHECKPOINT, &checkpoint.encode_to_vec());
    file.write_all(&bytes).map_err(|e| StoreError::io("write", &path, e))?;
    file.sync_all().map_err(|e| StoreError::io("fsync", &path, e))?;
    if let Some(dir) = path.parent()
        && let Ok(d) = File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(Active { file, path: Arc::new(path), written: bytes.len() as u64, open_block: None })
}

/// Where the valid part of a segment body ends: the last checkpoint, the offset just past it,
/// and how many entries the whole body holds (before and after it).
fn find_cut(body: &[u8]) -> (Option<(Checkpoint, usize)>, u64) {
    let mut last = None;
    let mut entries = 0u64;
    record::parse_records(body, |rec, end| match rec {
        Record::Entry(_) => entries += 1,
        Record::Checkpoint(c) => last = Some((c, end)),
    });
    (last, entries)
}

/// Rebuilds the block index of a segment body (blocks of [`BLOCK_ENTRIES`] entries, as the
/// writer makes them) and counts its entries.
fn scan(first_index: u64, body: &[u8]) -> (Vec<BlockMeta>, u64) {
    let mut blocks = Vec::new();
    let mut open: Option<BlockMeta> = None;
    let mut entries = 0u64;
    let mut start = 0usize;
    record::parse_records(body, |rec, end| {
        if let Record::Entry(resp) = rec {
            let file_start = record::HEADER_LEN + start as u64;
            let block =
                open.get_or_insert_with(|| BlockMeta::new(first_index + entries, file_start));
            let indexed = record::Indexed::of(&resp);
            block.add(super::entry_time_ns(&resp), &indexed, record::HEADER_LEN + end as u64);
            entries += 1;
            if block.count >= BLOCK_ENTRIES {
                blocks.push(open.take().expect("just filled"));
            }
        }
        start = end;
    });
    blocks.extend(open);
    (blocks, entries)
}

fn write_index_file(log: &Path, file_len: u64, blocks: &[Arc<BlockMeta>]) {
    let msg = IndexFile {
        file_len,
        blocks: blocks
            .iter()
            .map(|b| BlockProto {
                first_index: b.first_index,
                count: b.count,
                offset: b.offset,
                len: b.len,
                min_time_ns: b.min_time_ns,
                max_time_ns: b.max_time_ns,
                bloom: b.bloom.to_bytes(),
                sieves: b.sieves.clone(),
            })
            .collect(),
    };
    let payload = msg.encode_to_vec();
    let mut bytes = crc32fast::hash(&payload).to_le_bytes().to_vec();
    bytes.extend_from_slice(&payload);
    let path = index_path(log);
    let tmp = path.with_extension("idx.tmp");
    let result = fs::write(&tmp, &bytes).and_then(|()| fs::rename(&tmp, &path));
    if let Err(e) = result {
        // Only costs a rescan of the segment at the next start.
        tracing::warn!(path = %path.display(), error = %e, "cannot write segment index");
    }
}

/// A sealed segment: its `.idx` if it matches the file, else a rescan.
fn load_sealed(first: u64, path: &Path) -> Result<SegmentView, StoreError> {
    let len = fs::metadata(path).map_err(|e| StoreError::io("stat", path, e))?.len();
    if let Some(blocks) = read_index_file(path, len) {
        return Ok(SegmentView {
            first_index: first,
            path: Arc::new(path.to_owned()),
            blocks: blocks.into_iter().map(Arc::new).collect(),
            bytes: len,
        });
    }
    let body = record::read_body(path).map_err(|e| StoreError::io("read", path, e))?;
    let cut = find_cut(&body).0.map_or(0, |(_, c)| c);
    let (blocks, _) = scan(first, &body[..cut]);
    let valid = record::HEADER_LEN + cut as u64;
    if valid < len {
        // A sealed segment always ends with a checkpoint; anything after one is a torn tail.
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| StoreError::io("open", path, e))?;
        f.set_len(valid).map_err(|e| StoreError::io("truncate", path, e))?;
    }
    let arcs: Vec<Arc<BlockMeta>> = blocks.into_iter().map(Arc::new).collect();
    write_index_file(path, valid, &arcs);
    Ok(SegmentView {
        first_index: first,
        path: Arc::new(path.to_owned()),
        blocks: arcs,
        bytes: valid,
    })
}

fn read_index_file(log: &Path, file_len: u64) -> Option<Vec<BlockMeta>> {
    let bytes = fs::read(index_path(log)).ok()?;
    let (crc, payload) = bytes.split_at_checked(4)?;
    if crc32fast::hash(payload).to_le_bytes() != crc {
        return None;
    }
    let msg = IndexFile::decode(payload).ok()?;
    if msg.file_len != file_len {
        return None;
    }
    msg.blocks
        .into_iter()
        .map(|b| {
            Some(BlockMeta {
                first_index: b.first_index,
                count: b.count,
                offset: b.offset,
                len: b.len,
                min_time_ns: b.min_time_ns,
                max_time_ns: b.max_time_ns,
                bloom: record::Bloom::from_bytes(&b.bloom)?,
                sieves: if b.sieves.len() == b.count as usize { b.sieves } else { Vec::new() },
            })
        })
        .collect()
}

/// Reads the entries of one block that `keep` takes by their sieve (for readers holding a
/// [`SegmentView`]).
pub fn read_block(
    path: &Path,
    block: &BlockMeta,
    keep: &dyn Fn(u64) -> bool,
) -> io::Result<Vec<Arc<super::Stored>>> {
    record::read_block(path, block, keep)
}
