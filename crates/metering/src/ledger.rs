//! The usage ledger: segment files `usage-<seq>.log` of frames (see
//! `record.rs`) in one directory.

use std::borrow::Cow;
use std::collections::{HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use crate::record::{MAGIC, UsageRecord, decode_frame, encode, recorded_id};

#[derive(Debug, Clone)]
pub struct LedgerConfig {
    pub dir: PathBuf,
    /// A segment is closed once it passes this size.
    pub segment_bytes: u64,
    /// The oldest segments go once all of them pass this size.
    pub max_total_bytes: u64,
    /// How many of the newest ids are remembered ([`ID_WINDOW`]).
    pub id_window: usize,
}

impl LedgerConfig {
    pub fn new(dir: PathBuf) -> LedgerConfig {
        LedgerConfig {
            dir,
            segment_bytes: 16 << 20,
            max_total_bytes: 1 << 30,
            id_window: ID_WINDOW,
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

/// A batch that failed part way: the records written before the error
/// (in the batch's order, `true`) are durable and recorded; the rest are
/// not, and may be appended again.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct BatchError {
    pub written: Vec<bool>,
    #[source]
    pub error: LedgerError,
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
    /// Records in the segments read: the newest ones, until the last
    /// `id_window` ids are known (every record of a smaller ledger).
    pub records: usize,
    pub segments: usize,
    /// Bytes cut from the end of the newest segment (a torn last write).
    pub truncated_bytes: u64,
    /// Bytes skipped inside segments because they held no intact frame.
    pub skipped_bytes: u64,
}

/// How many of the newest record ids the ledger remembers to refuse a
/// second record for the same id (an allocation recorded just before a
/// crash and finished again after it). Bounded, so a year of records does
/// not live in memory.
pub const ID_WINDOW: usize = 1 << 16;

/// The newest ids, oldest first, with a set for lookups.
struct IdWindow {
    order: VecDeque<String>,
    set: HashSet<String>,
    capacity: usize,
}

impl IdWindow {
    fn new(capacity: usize) -> IdWindow {
        IdWindow {
            order: VecDeque::new(),
            set: HashSet::new(),
            capacity: capacity.max(1),
        }
    }

    fn contains(&self, id: &str) -> bool {
        self.set.contains(id)
    }
    /// `false` when already present.
    fn insert(&mut self, id: &str) -> bool {
        if self.set.contains(id) {
            return false;
        }
        if self.order.len() >= self.capacity
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        self.order.push_back(id.to_string());
        self.set.insert(id.to_string());
        true
    }
}

/// Frames not yet written, their ids, and where in the batch their
/// records are.
#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    ids: Vec<String>,
    at: Vec<usize>,
    /// Of which cut in their names.
    cut: u64,
}

/// A place in the ledger: a segment and a byte offset in it.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct Position {
    pub segment: u64,
    pub offset: u64,
}

/// The open segment grows in steps of this many zero bytes, written and
/// synced once: a commit then overwrites blocks the file already has, and
/// `fdatasync` flushes the data without writing the inode (the size does
/// not change), one blocking I/O less per commit. Readers stop at the
/// zeros; rotation and recovery trim them.
pub const PREALLOCATION: u64 = 1 << 20;

pub struct Ledger {
    config: LedgerConfig,
    /// (sequence, bytes of frames) of every segment, oldest first; the last
    /// is open.
    segments: Vec<(u64, u64)>,
    current: File,
    /// The open segment's file size (its frames, then zeros).
    allocated: u64,
    ids: IdWindow,
    /// Records written cut in their names (see [`crate::record::fit`]).
    cut: u64,
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("usage-{seq:020}.log"))
}

/// Cuts the newest segment at `end`, the end of its last intact frame:
/// preallocated zeros and perhaps a torn last write go, so the next frame
/// follows an intact one. Returns the torn bytes (the non-zero ones cut).
fn cut_tail(path: &Path, bytes: &[u8], end: usize) -> Result<u64, LedgerError> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io(path))?;
    f.set_len(end as u64).map_err(io(path))?;
    f.sync_all().map_err(io(path))?;
    Ok(bytes[end..]
        .iter()
        .rposition(|b| *b != 0)
        .map_or(0, |last| last as u64 + 1))
}

/// Opens (or creates) segment `seq` for reading and writing in place.
fn open_segment(dir: &Path, seq: u64) -> Result<File, LedgerError> {
    let path = segment_path(dir, seq);
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io(&path))
}

fn segment_seq(name: &str) -> Option<u64> {
    name.strip_prefix("usage-")?
        .strip_suffix(".log")?
        .parse()
        .ok()
}

/// The intact frames of `bytes`, resynchronizing on the next frame start
/// after damage: (records, where the last intact frame ends, bytes skipped
/// between intact frames).
fn scan(bytes: &[u8]) -> (Vec<UsageRecord>, usize, u64) {
    let mut records = Vec::new();
    let (mut end, mut skipped) = (0usize, 0u64);
    for (r, start, stop) in scan_with_ends(bytes) {
        skipped += (start - end) as u64;
        end = stop;
        records.push(r);
    }
    (records, end, skipped)
}

/// The intact frames of `bytes` with where each starts and ends; damage
/// is skipped up to the next frame start.
fn scan_with_ends(bytes: &[u8]) -> Vec<(UsageRecord, usize, usize)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        if let Some((record, len)) = decode_frame(&bytes[at..]) {
            out.push((record, at, at + len));
            at += len;
            continue;
        }
        match bytes[at + 1..]
            .windows(MAGIC.len())
            .position(|w| w == MAGIC)
        {
            Some(p) => at += 1 + p,
            None => break,
        }
    }
    out
}

/// Calls `f` with every intact record in the ledger at `dir` from `from`
/// on (the whole ledger with `None`), oldest first, with the position
/// after it; one segment is in memory at a time. It only reads: safe while
/// an agent appends (a frame being written is simply not intact yet). The
/// writer never writes an id twice, so nothing is counted twice here.
pub fn for_each_record(
    dir: &Path,
    from: Option<Position>,
    mut f: impl FnMut(UsageRecord, Position),
) -> Result<(), LedgerError> {
    let mut seqs: Vec<u64> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .flatten()
            .filter_map(|e| segment_seq(&e.file_name().to_string_lossy()))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(dir)(e)),
    };
    seqs.sort_unstable();
    let from = from.unwrap_or_default();
    for seq in seqs.into_iter().filter(|s| *s >= from.segment) {
        let path = segment_path(dir, seq);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            // Rotated away meanwhile.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io(&path)(e)),
        };
        let skip = if seq == from.segment {
            usize::try_from(from.offset)
                .unwrap_or(usize::MAX)
                .min(bytes.len())
        } else {
            0
        };
        for (r, _, end) in scan_with_ends(&bytes[skip..]) {
            let offset = (skip + end) as u64;
            f(
                r,
                Position {
                    segment: seq,
                    offset,
                },
            );
        }
    }
    Ok(())
}

/// The segment files of the ledger at `dir`: (sequence, path, size),
/// oldest first (none when the directory does not exist).
pub(crate) fn segment_files(dir: &Path) -> Result<Vec<(u64, PathBuf, u64)>, LedgerError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(dir)(e)),
    };
    let mut out: Vec<(u64, PathBuf, u64)> = entries
        .flatten()
        .filter_map(|e| {
            let seq = segment_seq(&e.file_name().to_string_lossy())?;
            let len = e.metadata().ok()?.len();
            Some((seq, e.path(), len))
        })
        .collect();
    out.sort_unstable_by_key(|(seq, _, _)| *seq);
    Ok(out)
}

/// The intact records of one segment's bytes, in order.
pub(crate) fn records_of(bytes: &[u8]) -> impl Iterator<Item = UsageRecord> {
    scan_with_ends(bytes).into_iter().map(|(r, _, _)| r)
}

/// Every intact record in the ledger at `dir`, oldest first.
pub fn read_records(dir: &Path) -> Result<Vec<UsageRecord>, LedgerError> {
    let mut out = Vec::new();
    for_each_record(dir, None, |r, _| out.push(r))?;
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
        let newest = seqs.last().copied();
        // Newest first, read only until the id window is full: older
        // segments are measured, not parsed (a full ledger is a gigabyte,
        // and every start would read it).
        let mut read: Vec<Vec<UsageRecord>> = Vec::new();
        let mut segments = Vec::with_capacity(seqs.len());
        let mut ids_read = 0;
        for &seq in seqs.iter().rev() {
            let path = segment_path(&dir, seq);
            if ids_read >= config.id_window {
                let len = std::fs::metadata(&path).map_err(io(&path))?.len();
                segments.push((seq, len));
                continue;
            }
            let bytes = std::fs::read(&path).map_err(io(&path))?;
            let (records, end, skipped) = scan(&bytes);
            recovery.skipped_bytes += skipped;
            let mut len = bytes.len() as u64;
            if Some(seq) == newest && end < bytes.len() {
                recovery.truncated_bytes = cut_tail(&path, &bytes, end)?;
                len = end as u64;
            }
            ids_read += records.len();
            read.push(records);
            segments.push((seq, len));
        }
        segments.reverse();
        // The window fills oldest first, so the newest ids stay in it.
        let mut ids = IdWindow::new(config.id_window);
        for r in read.iter().rev().flatten() {
            if ids.insert(&r.id) {
                recovery.records += 1;
            }
        }
        if segments.is_empty() {
            segments.push((0, 0));
        }
        recovery.segments = segments.len();
        let (seq, used) = segments[segments.len() - 1];
        let current = open_segment(&dir, seq)?;
        Ok((
            Ledger {
                config,
                segments,
                current,
                allocated: used,
                ids,
                cut: 0,
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
        match self.append_batch(std::slice::from_ref(record)) {
            Ok(written) => Ok(written[0]),
            Err(e) => Err(e.error),
        }
    }

    /// Appends the records whose ids are not yet recorded, then fsyncs
    /// once (a group commit): every one is durable when this returns `Ok`.
    /// Says of each record whether it was written (`false`: its id was
    /// already recorded). A record over the frame's bounds is written as
    /// [`fit`] cuts it (its names shortened, its id too if long; the cut id
    /// is the one recorded), so every frame written reads back. On an
    /// error, only what the [`BatchError`] says was written counts as
    /// recorded: the other ids stay free, whatever the failed write left
    /// in the file is cut off, and the next write goes where it would have.
    pub fn append_batch(&mut self, records: &[UsageRecord]) -> Result<Vec<bool>, BatchError> {
        // The frames go in one write per segment (one system call for the
        // batch, unless it crosses into a new segment).
        let mut pending = Pending::default();
        let mut batch_ids = HashSet::new();
        let mut written = vec![false; records.len()];
        for (i, record) in records.iter().enumerate() {
            // The id as the frame will hold it.
            let id: Cow<'_, str> = recorded_id(&record.id);
            if self.ids.contains(&id) || batch_ids.contains(id.as_ref()) {
                continue;
            }
            batch_ids.insert(id.to_string());
            let (frame, cut) = encode(record);
            let (seq, used) = self.segments[self.segments.len() - 1];
            let at = used + pending.bytes.len() as u64;
            if at > 0 && at + frame.len() as u64 > self.config.segment_bytes {
                let step = self
                    .write_pending(&mut pending, &mut written)
                    .and_then(|()| self.rotate(seq + 1));
                if let Err(error) = step {
                    return Err(BatchError { written, error });
                }
            }
            pending.bytes.extend_from_slice(&frame);
            pending.ids.push(id.into_owned());
            pending.at.push(i);
            pending.cut += u64::from(cut);
        }
        if !pending.ids.is_empty() {
            if let Err(error) = self.write_pending(&mut pending, &mut written) {
                return Err(BatchError { written, error });
            }
            self.enforce_bound();
        }
        Ok(written)
    }

    /// How many records were written cut in their names since the ledger
    /// was opened.
    pub fn records_cut(&self) -> u64 {
        self.cut
    }

    /// Writes `pending` after the open segment's frames (growing the file
    /// first if needed) and syncs it; only then are its ids and length
    /// taken as recorded, and its records marked in `written`. On an error
    /// the segment is cut back to its recorded length (a partly written
    /// frame, or a whole one whose sync failed, must not be read later).
    fn write_pending(
        &mut self,
        pending: &mut Pending,
        written: &mut [bool],
    ) -> Result<(), LedgerError> {
        use std::os::unix::fs::FileExt;
        if pending.bytes.is_empty() {
            return Ok(());
        }
        let path = self.current_path();
        let used = self.segments[self.segments.len() - 1].1;
        let end = used + pending.bytes.len() as u64;
        let wrote = (|| {
            if end > self.allocated {
                self.grow(end)?;
            }
            self.current
                .write_all_at(&pending.bytes, used)
                .map_err(io(&path))?;
            self.sync()
        })();
        if let Err(e) = wrote {
            // Cutting frees what the failed write took, too (a full disk).
            match self.current.set_len(used) {
                Ok(()) => self.allocated = used,
                Err(cut) => {
                    tracing::warn!(path = %path.display(), error = %cut, "cutting a failed usage write")
                }
            }
            return Err(e);
        }
        if let Some(last) = self.segments.last_mut() {
            last.1 = end;
        }
        for id in pending.ids.drain(..) {
            self.ids.insert(&id);
        }
        for i in pending.at.drain(..) {
            written[i] = true;
        }
        self.cut += std::mem::take(&mut pending.cut);
        pending.bytes.clear();
        Ok(())
    }

    /// Writes zeros from the open segment's end up past `needed`, in
    /// [`PREALLOCATION`] steps.
    fn grow(&mut self, needed: u64) -> Result<(), LedgerError> {
        use std::os::unix::fs::FileExt;
        let path = self.current_path();
        let target = needed.div_ceil(PREALLOCATION).saturating_mul(PREALLOCATION);
        let zeros = vec![0u8; 64 << 10];
        let mut at = self.allocated;
        while at < target {
            let n = (target - at).min(zeros.len() as u64) as usize;
            self.current
                .write_all_at(&zeros[..n], at)
                .map_err(io(&path))?;
            at += n as u64;
        }
        self.allocated = target;
        Ok(())
    }

    fn current_path(&self) -> PathBuf {
        segment_path(&self.config.dir, self.segments[self.segments.len() - 1].0)
    }

    fn sync(&self) -> Result<(), LedgerError> {
        self.current.sync_data().map_err(io(&self.current_path()))
    }

    /// Where the next record will be written.
    pub fn position(&self) -> Position {
        let (segment, offset) = self.segments[self.segments.len() - 1];
        Position { segment, offset }
    }

    pub fn dir(&self) -> &Path {
        &self.config.dir
    }

    /// Closes the open segment (its preallocated zeros trimmed) and opens
    /// segment `seq`.
    fn rotate(&mut self, seq: u64) -> Result<(), LedgerError> {
        let old = self.current_path();
        let used = self.segments[self.segments.len() - 1].1;
        self.current.set_len(used).map_err(io(&old))?;
        self.current.sync_all().map_err(io(&old))?;
        self.current = open_segment(&self.config.dir, seq)?;
        self.allocated = 0;
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

    /// Every record, oldest first.
    pub fn records(&self) -> Result<Vec<UsageRecord>, LedgerError> {
        read_records(&self.config.dir)
    }
}

#[cfg(test)]
pub(crate) mod tests;
