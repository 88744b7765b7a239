//! Recordings of the kernel's event stream (`hopwatch agent --record FILE`), which
//! `hopwatch replay FILE` and the pipeline benchmark run through the userspace pipeline with no
//! kernel involved.
//!
//! File format: the 8-byte magic `HWREC01\n`, then per record its length as a little-endian
//! `u32` and the raw ring buffer bytes.

use std::{
    fs::File,
    io::{self, BufReader, BufWriter, Read, Write},
    path::{Path, PathBuf},
};

const MAGIC: &[u8; 8] = b"HWREC01\n";
/// Largest record accepted when reading (the kernel's are far smaller).
const MAX_RECORD: u32 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RecordingError {
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a hopwatch recording (no {magic:?} header)", magic = "HWREC01")]
    NotARecording { path: PathBuf },
    #[error(
        "{path}: record {index} claims {len} bytes, more than {MAX_RECORD}: the file is corrupt"
    )]
    Corrupt { path: PathBuf, index: usize, len: u32 },
}

/// Appends raw ring buffer records to a recording.
pub(crate) struct Recorder {
    out: BufWriter<File>,
    path: PathBuf,
}

impl Recorder {
    pub(crate) fn create(path: &Path) -> Result<Self, RecordingError> {
        let io = |source| RecordingError::Io { what: "create", path: path.to_owned(), source };
        let mut out = BufWriter::new(File::create(path).map_err(io)?);
        out.write_all(MAGIC).map_err(io)?;
        Ok(Self { out, path: path.to_owned() })
    }

    pub(crate) fn record(&mut self, bytes: &[u8]) -> Result<(), RecordingError> {
        let io = |source| RecordingError::Io { what: "write", path: self.path.clone(), source };
        let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        self.out.write_all(&len.to_le_bytes()).map_err(io)?;
        self.out.write_all(bytes).map_err(io)
    }

    pub(crate) fn flush(&mut self) -> Result<(), RecordingError> {
        self.out.flush().map_err(|source| RecordingError::Io {
            what: "write",
            path: self.path.clone(),
            source,
        })
    }
}

/// Reads every record of a recording.
pub fn read_recording(path: &Path) -> Result<Vec<Vec<u8>>, RecordingError> {
    let io = |source| RecordingError::Io { what: "read", path: path.to_owned(), source };
    let mut r = BufReader::new(File::open(path).map_err(io)?);
    let mut magic = [0u8; 8];
    if r.read_exact(&mut magic).is_err() || &magic != MAGIC {
        return Err(RecordingError::NotARecording { path: path.to_owned() });
    }
    let mut records = Vec::new();
    loop {
        let mut len = [0u8; 4];
        match r.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(records),
            Err(e) => return Err(io(e)),
        }
        let len = u32::from_le_bytes(len);
        if len > MAX_RECORD {
            return Err(RecordingError::Corrupt {
                path: path.to_owned(),
                index: records.len(),
                len,
            });
        }
        let mut rec = vec![0u8; len as usize];
        r.read_exact(&mut rec).map_err(io)?;
        records.push(rec);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recordings_round_trip_and_reject_garbage() {
        let dir = std::env::temp_dir().join(format!("hopwatch-rec-{}", std::process::id()));
        let mut rec = Recorder::create(&dir).unwrap();
        rec.record(b"abc").unwrap();
        rec.record(b"").unwrap();
        rec.flush().unwrap();
        assert_eq!(read_recording(&dir).unwrap(), vec![b"abc".to_vec(), Vec::new()]);
        std::fs::write(&dir, b"not a recording").unwrap();
        assert!(matches!(read_recording(&dir), Err(RecordingError::NotARecording { .. })));
        let mut bad = MAGIC.to_vec();
        bad.extend_from_slice(&u32::MAX.to_le_bytes());
        std::fs::write(&dir, bad).unwrap();
        assert!(matches!(read_recording(&dir), Err(RecordingError::Corrupt { .. })));
        let _ = std::fs::remove_file(&dir);
    }
}
