//! On-disk format of the flow history: segment files of CRC-framed records, grouped into blocks
//! that the index describes (entry range, byte range, time range, Bloom filter of terms).
//!
//! ```text
//! segment file  = header record*
//! header        = "HOPWSEG1" first_index:u64le                       (16 bytes)
//! record        = len:u32le crc32(kind ‖ payload):u32le kind:u8 payload[len]
//! kind 1        = entry: a protobuf observer.GetFlowsResponse; its index is implicit (the
//!                 segment's first_index plus the number of entries before it)
//! kind 2        = checkpoint: protobuf Checkpoint (per-agent sequence numbers stored so far)
//! ```
//!
//! A record whose length or CRC does not check out ends the readable part of a file (a torn
//! write after a crash); recovery truncates there.

use std::{
    fs::File,
    io::{self, BufReader, Read},
    os::unix::fs::FileExt as _,
    path::Path,
};

use hopwatch_proto::observer::GetFlowsResponse;
use prost::Message as _;

use crate::filter::terms::{entry_sieve, flow_terms};

pub const MAGIC: &[u8; 8] = b"HOPWSEG1";
pub const HEADER_LEN: u64 = 16;
const RECORD_HEADER: usize = 9;
/// Larger records are corruption: a flow is a few hundred bytes.
const MAX_RECORD: u32 = 16 << 20;

pub const KIND_ENTRY: u8 = 1;
pub const KIND_CHECKPOINT: u8 = 2;

/// Entries per block (the unit the index describes and a query reads or skips). Small blocks
/// let a selective query decode only the blocks that hold a match: with 128 entries, a filter
/// matching 0.1% of flows reads about an eighth of the history.
pub const BLOCK_ENTRIES: u32 = 128;

/// Per-agent ingest progress, written after every flush so a restarted collector knows where
/// each agent resumes.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Checkpoint {
    #[prost(message, repeated, tag = "1")]
    pub agents: Vec<AgentMark>,
}

#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct AgentMark {
    #[prost(string, tag = "1")]
    pub agent_id: String,
    #[prost(string, tag = "2")]
    pub node_name: String,
    /// Highest sequence number stored.
    #[prost(uint64, tag = "3")]
    pub seq: u64,
    /// When the agent last sent something (Unix seconds); old marks are pruned.
    #[prost(int64, tag = "4")]
    pub updated_unix_s: i64,
}

/// Appends one framed record to `out`.
pub fn frame(out: &mut Vec<u8>, kind: u8, payload: &[u8]) {
    let len = u32::try_from(payload.len()).expect("records are far below 4 GiB");
    let mut crc = crc32fast::Hasher::new();
    crc.update(&[kind]);
    crc.update(payload);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.push(kind);
    out.extend_from_slice(payload);
}

pub fn header(first_index: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..8].copy_from_slice(MAGIC);
    h[8..].copy_from_slice(&first_index.to_le_bytes());
    h
}

const BLOOM_WORDS: usize = 64;

/// A Bloom filter of 4 Ki bits with 4 probes: about 0.3 % false positives for the ~300
/// distinct terms a block of 128 flows has (512 bytes of index per 128 flows).
#[derive(Clone)]
pub struct Bloom(Box<[u64; BLOOM_WORDS]>);

impl Default for Bloom {
    fn default() -> Self {
        Self(Box::new([0; BLOOM_WORDS]))
    }
}

impl std::fmt::Debug for Bloom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ones: u32 = self.0.iter().map(|w| w.count_ones()).sum();
        write!(f, "Bloom({ones} bits set)")
    }
}

impl Bloom {
    const BITS: u64 = BLOOM_WORDS as u64 * 64;

    fn probes(term: u64) -> impl Iterator<Item = usize> {
        let h2 = term.rotate_left(32) | 1;
        (0..4u64).map(move |i| {
            usize::try_from(term.wrapping_add(i.wrapping_mul(h2)) % Self::BITS)
                .expect("below the bit count")
        })
    }

    pub fn insert(&mut self, term: u64) {
        for bit in Self::probes(term) {
            self.0[bit / 64] |= 1 << (bit % 64);
        }
    }

    pub fn contains(&self, term: u64) -> bool {
        Self::probes(term).all(|bit| self.0[bit / 64] & (1 << (bit % 64)) != 0)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() != BLOOM_WORDS * 8 {
            return None;
        }
        let mut words = Box::new([0u64; BLOOM_WORDS]);
        for (w, chunk) in words.iter_mut().zip(b.chunks_exact(8)) {
            *w = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        }
        Some(Self(words))
    }
}

/// What the index knows about one block of entries.
#[derive(Debug, Clone)]
pub struct BlockMeta {
    pub first_index: u64,
    pub count: u32,
    /// Byte range of the block's records in its segment file (checkpoints may be interleaved).
    pub offset: u64,
    pub len: u64,
    pub min_time_ns: i64,
    pub max_time_ns: i64,
    pub bloom: Bloom,
    /// Each entry's term sieve (`filter::terms::entry_sieve`); empty when unknown (an index
    /// written before sieves existed), which lets every entry through.
    pub sieves: Vec<u64>,
}

impl BlockMeta {
    pub fn new(first_index: u64, offset: u64) -> Self {
        Self {
            first_index,
            count: 0,
            offset,
            len: 0,
            min_time_ns: i64::MAX,
            max_time_ns: i64::MIN,
            bloom: Bloom::default(),
            sieves: Vec::with_capacity(BLOCK_ENTRIES as usize),
        }
    }

    pub fn end_index(&self) -> u64 {
        self.first_index + u64::from(self.count)
    }

    /// Accounts for one entry (`index`ed) written at byte `end` (exclusive) of the file.
    pub fn add(&mut self, time_ns: i64, index: &Indexed, end: u64) {
        self.count += 1;
        self.len = end - self.offset;
        self.min_time_ns = self.min_time_ns.min(time_ns);
        self.max_time_ns = self.max_time_ns.max(time_ns);
        for &t in &index.terms {
            self.bloom.insert(t);
        }
        self.sieves.push(index.sieve);
    }

    /// The sieve of the block's `i`th entry.
    pub fn sieve(&self, i: usize) -> u64 {
        self.sieves.get(i).copied().unwrap_or(u64::MAX)
    }

    pub fn has_notices(&self) -> bool {
        self.bloom.contains(NOTICE_TERM)
    }
}

/// Term of a block that holds a lost-event notice (which every query must see).
const NOTICE_TERM: u64 = 0x6e6f_7469_6365_2121;

/// What the history's index takes of an entry: its terms (for its block's Bloom filter) and
/// their sieve.
#[derive(Debug)]
pub struct Indexed {
    pub terms: Vec<u64>,
    pub sieve: u64,
}

impl Indexed {
    pub fn of(resp: &GetFlowsResponse) -> Self {
        let mut terms = Vec::with_capacity(12);
        if let Some(hopwatch_proto::observer::get_flows_response::ResponseTypes::Flow(f)) =
            &resp.response_types
        {
            flow_terms(f, |t| terms.push(t));
            let sieve = entry_sieve(&terms);
            Self { terms, sieve }
        } else {
            // Notices are never filtered out: make sure every query looks at their block and
            // decodes them.
            terms.push(NOTICE_TERM);
            Self { terms, sieve: u64::MAX }
        }
    }
}

/// An entry made ready for the store where it arrives (encoded, and its index terms computed
/// when there is a history), so the single writer thread only copies bytes.
#[derive(Debug, Default)]
pub struct Prepared {
    pub encoded: bytes::Bytes,
    pub index: Option<Indexed>,
}

impl Prepared {
    /// `encoded`: `resp` as it came, when it came encoded and is stored unchanged.
    pub fn of(resp: &GetFlowsResponse, encoded: Option<bytes::Bytes>, with_index: bool) -> Self {
        Self {
            encoded: encoded.unwrap_or_else(|| resp.encode_to_vec().into()),
            index: with_index.then(|| Indexed::of(resp)),
        }
    }
}

/// One decoded record.
pub enum Record {
    Entry(Box<GetFlowsResponse>),
    Checkpoint(Checkpoint),
}

/// Reads the records in `bytes` (a whole block or file tail), calling `each` with each record
/// and the offset just past it. Stops at the first record that does not check out and returns
/// the offset where the valid part ends.
pub fn parse_records(bytes: &[u8], mut each: impl FnMut(Record, usize)) -> usize {
    let mut pos = 0;
    while let Some((record, next)) = parse_one(bytes, pos) {
        each(record, next);
        pos = next;
    }
    pos
}

/// The framed record at `pos`, checked: (kind, payload, offset after it).
fn frame_at(bytes: &[u8], pos: usize) -> Option<(u8, &[u8], usize)> {
    let head = bytes.get(pos..pos + RECORD_HEADER)?;
    let len = u32::from_le_bytes(head[0..4].try_into().ok()?);
    if len > MAX_RECORD {
        return None;
    }
    let crc = u32::from_le_bytes(head[4..8].try_into().ok()?);
    let kind = head[8];
    let start = pos + RECORD_HEADER;
    let payload = bytes.get(start..start + usize::try_from(len).ok()?)?;
    let mut h = crc32fast::Hasher::new();
    h.update(&[kind]);
    h.update(payload);
    (h.finalize() == crc).then_some((kind, payload, start + payload.len()))
}

fn parse_one(bytes: &[u8], pos: usize) -> Option<(Record, usize)> {
    let (kind, payload, next) = frame_at(bytes, pos)?;
    let record = match kind {
        KIND_ENTRY => Record::Entry(Box::new(GetFlowsResponse::decode(payload).ok()?)),
        KIND_CHECKPOINT => Record::Checkpoint(Checkpoint::decode(payload).ok()?),
        _ => return None,
    };
    Some((record, next))
}

/// Reads a segment file's first index from its header.
pub fn read_header(path: &Path) -> io::Result<u64> {
    let mut h = [0u8; 16];
    File::open(path)?.read_exact(&mut h)?;
    if &h[..8] != MAGIC {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not a hopwatch segment file"));
    }
    Ok(u64::from_le_bytes(h[8..].try_into().expect("8 bytes")))
}

/// Reads a whole segment file after its header.
pub fn read_body(path: &Path) -> io::Result<Vec<u8>> {
    let mut f = BufReader::new(File::open(path)?);
    let mut skip = [0u8; 16];
    f.read_exact(&mut skip)?;
    let mut body = Vec::new();
    f.read_to_end(&mut body)?;
    Ok(body)
}

/// Reads the entries of one block that `keep` takes by their sieve, decoding each straight
/// into its shared entry (a decoded flow is large; moving it around costs more than decoding
/// it).
pub fn read_block(
    path: &Path,
    block: &BlockMeta,
    keep: &dyn Fn(u64) -> bool,
) -> io::Result<Vec<std::sync::Arc<super::Stored>>> {
    let file = File::open(path)?;
    let mut bytes = vec![0u8; usize::try_from(block.len).expect("blocks fit in memory")];
    file.read_exact_at(&mut bytes, block.offset)?;
    let mut out = Vec::new();
    let (mut pos, mut seen) = (0, 0usize);
    while let Some((kind, payload, next)) = frame_at(&bytes, pos) {
        pos = next;
        if kind != KIND_ENTRY {
            continue;
        }
        let i = seen;
        seen += 1;
        if !keep(block.sieve(i)) {
            continue;
        }
        let mut entry = std::sync::Arc::new(super::Stored {
            index: block.first_index + i as u64,
            time_ns: 0,
            resp: GetFlowsResponse::default(),
        });
        let e = std::sync::Arc::get_mut(&mut entry).expect("just made");
        if e.resp.merge(payload).is_err() {
            seen -= 1;
            break;
        }
        e.time_ns = super::entry_time_ns(&e.resp);
        out.push(entry);
    }
    if seen != block.count as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("block at {} holds {seen} of {} entries", block.offset, block.count),
        ));
    }
    Ok(out)
}
