//! The usage ledger: segment files `usage-<seq>.log` of frames (see
//! `record.rs`) in one directory.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::record::{MAGIC, UsageRecord, decode_frame, encode_frame};

#[derive(Debug, Clone)]
pub struct LedgerConfig {
    pub dir: PathBuf,
    /// A segment is closed once it passes this size.
    pub segment_bytes: u64,
    /// The oldest segments go once all of them pass this size.
    pub max_total_bytes: u64,
}

impl LedgerConfig {
    pub fn new(dir: PathBuf) -> LedgerConfig {
        LedgerConfig {
            dir,
            segment_bytes: 64 << 20,
            max_total_bytes: 1 << 30,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("usage ledger {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LedgerError + '_ {
    move |error| LedgerError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// What opening the ledger found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    pub records: usize,
    pub segments: usize,
    /// Bytes cut from the end of the newest segment (a torn last write).
    pub truncated_bytes: u64,
    /// Bytes skipped inside segments because they held no intact frame.
    pub skipped_bytes: u64,
}

pub struct Ledger {
    config: LedgerConfig,
    /// (sequence, length) of every segment, oldest first; the last is open.
    segments: Vec<(u64, u64)>,
    current: File,
    ids: HashSet<String>,
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("usage-{seq:020}.log"))
}

fn segment_seq(name: &str) -> Option<u64> {
    name.strip_prefix("usage-")?
        .strip_suffix(".log")?
        .parse()
        .ok()
}

/// The intact frames of `bytes`, resynchronizing on the next frame start
/// after damage: (records, where the last intact frame ends, bytes skipped).
fn scan(bytes: &[u8]) -> (Vec<UsageRecord>, usize, u64) {
    let mut records = Vec::new();
    let mut at = 0;
    let mut end = 0;
    let mut skipped = 0u64;
    while at < bytes.len() {
        if let Some((record, len)) = decode_frame(&bytes[at..]) {
            records.push(record);
            at += len;
            end = at;
            continue;
        }
        // Damage: look for the next frame start.
        let next = bytes[at + 1..]
            .windows(MAGIC.len())
            .position(|w| w == MAGIC)
            .map(|p| at + 1 + p);
        match next {
            Some(n) => {
                skipped += (n - at) as u64;
                at = n;
            }
            None => break,
        }
    }
    // Damage between intact frames was skipped; what follows the last one
    // is the torn tail.
    let skipped = skipped.saturating_sub((bytes.len().saturating_sub(end)) as u64);
    (records, end, skipped)
}

/// Every intact record in the ledger at `dir`, oldest first (each id once),
/// read without changing anything: safe while an agent appends (a frame
/// being written is simply not intact yet).
pub fn read_records(dir: &Path) -> Result<Vec<UsageRecord>, LedgerError> {
    let mut seqs: Vec<u64> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .flatten()
            .filter_map(|e| segment_seq(&e.file_name().to_string_lossy()))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(dir)(e)),
    };
    seqs.sort_unstable();
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for seq in seqs {
        let path = segment_path(dir, seq);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            // Rotated away meanwhile.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io(&path)(e)),
        };
        for r in scan(&bytes).0 {
            if seen.insert(r.id.clone()) {
                out.push(r);
            }
        }
    }
    Ok(out)
}

impl Ledger {
    /// Opens (or creates) the ledger and recovers it.
    pub fn open(config: LedgerConfig) -> Result<(Ledger, Recovery), LedgerError> {
        let dir = config.dir.clone();
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let mut seqs: Vec<u64> = std::fs::read_dir(&dir)
            .map_err(io(&dir))?
            .flatten()
            .filter_map(|e| segment_seq(&e.file_name().to_string_lossy()))
            .collect();
        seqs.sort_unstable();
        let mut recovery = Recovery::default();
        let mut ids = HashSet::new();
        let mut segments = Vec::new();
        let newest = seqs.last().copied();
        for seq in seqs {
            let path = segment_path(&dir, seq);
            let bytes = std::fs::read(&path).map_err(io(&path))?;
            let (records, end, skipped) = scan(&bytes);
            recovery.skipped_bytes += skipped;
            for r in records {
                if ids.insert(r.id.clone()) {
                    recovery.records += 1;
                }
            }
            let mut len = bytes.len() as u64;
            if Some(seq) == newest && end < bytes.len() {
                // A torn last write: cut it so the next frame follows an intact one.
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io(&path))?;
                f.set_len(end as u64).map_err(io(&path))?;
                f.sync_all().map_err(io(&path))?;
                recovery.truncated_bytes = (bytes.len() - end) as u64;
                len = end as u64;
            }
            segments.push((seq, len));
        }
        if segments.is_empty() {
            segments.push((0, 0));
        }
        recovery.segments = segments.len();
        let (seq, _) = segments[segments.len() - 1];
        let path = segment_path(&dir, seq);
        let current = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        Ok((
            Ledger {
                config,
                segments,
                current,
                ids,
            },
            recovery,
        ))
    }

    /// Whether a record with this id is in the ledger.
    pub fn contains(&self, id: &str) -> bool {
        self.ids.contains(id)
    }

    /// Appends `record` and fsyncs it; `false` (and nothing written) when
    /// its id is already recorded.
    pub fn append(&mut self, record: &UsageRecord) -> Result<bool, LedgerError> {
        if self.ids.contains(&record.id) {
            return Ok(false);
        }
        let frame = encode_frame(record);
        let (seq, len) = self.segments[self.segments.len() - 1];
        if len > 0 && len + frame.len() as u64 > self.config.segment_bytes {
            self.rotate(seq + 1)?;
        }
        let (seq, _) = self.segments[self.segments.len() - 1];
        let path = segment_path(&self.config.dir, seq);
        self.current.write_all(&frame).map_err(io(&path))?;
        self.current.sync_data().map_err(io(&path))?;
        if let Some(last) = self.segments.last_mut() {
            last.1 += frame.len() as u64;
        }
        self.ids.insert(record.id.clone());
        self.enforce_bound();
        Ok(true)
    }

    fn rotate(&mut self, seq: u64) -> Result<(), LedgerError> {
        let path = segment_path(&self.config.dir, seq);
        self.current = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        // The new file's name must survive a crash too.
        if let Ok(d) = File::open(&self.config.dir) {
            let _ = d.sync_all();
        }
        self.segments.push((seq, 0));
        Ok(())
    }

    /// Drops the oldest closed segments while the ledger is over its bound.
    fn enforce_bound(&mut self) {
        while self.segments.len() > 1
            && self.segments.iter().map(|(_, l)| l).sum::<u64>() > self.config.max_total_bytes
        {
            let (seq, _) = self.segments.remove(0);
            let path = segment_path(&self.config.dir, seq);
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "removing an old usage segment");
            }
        }
    }

    /// Every record, oldest first (each id once).
    pub fn records(&self) -> Result<Vec<UsageRecord>, LedgerError> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for (seq, _) in &self.segments {
            let path = segment_path(&self.config.dir, *seq);
            let bytes = std::fs::read(&path).map_err(io(&path))?;
            for r in scan(&bytes).0 {
                if seen.insert(r.id.clone()) {
                    out.push(r);
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
