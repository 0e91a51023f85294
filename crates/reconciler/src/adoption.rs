//! Adoption records: what a later Steward needs to take over a live worker
//! and the allocations on it, kept in `<data dir>/adoption/`, one file per
//! worker. The driver keeps its own record of the process (pid, start
//! time, boot, uid, cgroup); this one keeps the agent's side: the worker's
//! description and GPUs, and for each allocation on it the allocation, its
//! open uploads (the request-error blob and every output blob the worker
//! was given), the reading it started at (for metering), and, once it has
//! one, its result until the server has taken it.
//!
//! A record is a journal: the whole record (a protobuf message) first,
//! then one length-prefixed entry per change, each one `write` to a file
//! kept open for appending (no fsync: what it guards against is a crash of
//! the agent, not of the host, whose reboot ends every worker anyway).
//! Past a bound the journal is rewritten as one snapshot, by rename. A
//! torn last entry is ignored; a file that is too large, does not start
//! with a whole record, or is of another version is never acted on: it is
//! set aside with the reason.
//!
//! Invariants: an allocation is in its worker's record before the worker
//! hears of it (`create_allocation`), an output upload before the worker
//! gets its URLs, a result before the worker is told to forget the
//! allocation; an entry goes only when the server has taken its result.
//!
//! Must not know about: processes, cgroups (the driver's record), the
//! server's connection.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::pb;

/// The format of a record file; a file of another version is set aside.
pub(crate) const VERSION: u32 = 2;
/// The largest record read back (a worker's allocations with their
/// arguments' descriptions; far above any real one).
const MAX_RECORD_BYTES: u64 = 64 << 20;

/// One worker's record.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct WorkerRecord {
    #[prost(uint32, tag = "1")]
    pub version: u32,
    #[prost(message, optional, tag = "2")]
    pub description: Option<pb::FunctionExecutorDescription>,
    /// UUIDs of the GPUs it was given.
    #[prost(string, repeated, tag = "3")]
    pub gpus: Vec<String>,
    #[prost(message, repeated, tag = "4")]
    pub allocations: Vec<AllocRecord>,
    /// Its reading when it started (for metering).
    #[prost(message, optional, tag = "5")]
    pub started: Option<StartReading>,
    /// The worker is gone: only results wait here for the server.
    #[prost(bool, tag = "6")]
    pub gone: bool,
}

/// One allocation on the worker.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct AllocRecord {
    #[prost(message, optional, tag = "1")]
    pub allocation: Option<pb::Allocation>,
    #[prost(message, optional, tag = "2")]
    pub request_error: Option<UploadRecord>,
    #[prost(message, repeated, tag = "3")]
    pub outputs: Vec<UploadRecord>,
    #[prost(message, optional, tag = "4")]
    pub result: Option<pb::AllocationResult>,
    #[prost(message, optional, tag = "5")]
    pub started: Option<StartReading>,
    /// Nested calls the server created (a restart does not send them again).
    #[prost(string, repeated, tag = "6")]
    pub calls_created: Vec<String>,
}

impl AllocRecord {
    pub fn id(&self) -> &str {
        self.allocation
            .as_ref()
            .and_then(|a| a.allocation_id.as_deref())
            .unwrap_or("")
    }
}

/// An open multipart upload: the worker's blob id for it, where it goes
/// and the store's upload id.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct UploadRecord {
    #[prost(string, tag = "1")]
    pub blob_id: String,
    #[prost(string, tag = "2")]
    pub uri: String,
    #[prost(string, tag = "3")]
    pub upload_id: String,
    /// Completed already: a restart must not complete it again.
    #[prost(bool, tag = "4")]
    pub completed: bool,
}

/// A worker's CPU time and memory at a moment (unix ms).
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub(crate) struct StartReading {
    #[prost(uint64, tag = "1")]
    pub at_ms: u64,
    #[prost(uint64, tag = "2")]
    pub cpu_usec: u64,
    #[prost(uint64, tag = "3")]
    pub memory_bytes: u64,
}

impl StartReading {
    /// `monitor`'s reading now; `None` once the worker cannot be read.
    pub fn now(monitor: &dyn steward_worker_driver::WorkerMonitor) -> Option<StartReading> {
        let r = monitor.reading()?;
        Some(StartReading {
            at_ms: crate::events::unix_ms(std::time::SystemTime::now()),
            cpu_usec: r.cpu_usec,
            memory_bytes: r.memory_bytes,
        })
    }
}

/// One change to a worker's record, appended to its journal.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Entry {
    #[prost(oneof = "Change", tags = "1, 2, 3, 4, 5, 6, 7, 8")]
    pub change: Option<Change>,
}

/// What an [`Entry`] changes. (One lives at a time, briefly: the snapshot
/// variant's size costs nothing worth a box.)
#[derive(Clone, PartialEq, prost::Oneof)]
#[allow(clippy::large_enum_variant)]
pub(crate) enum Change {
    /// The whole record: a journal's first entry.
    #[prost(message, tag = "1")]
    Snapshot(WorkerRecord),
    /// An allocation about to be handed to the worker.
    #[prost(message, tag = "2")]
    Started(AllocRecord),
    /// An output upload about to be given to the worker.
    #[prost(message, tag = "3")]
    Output(OfAllocation),
    /// An upload (named by its blob id) was completed.
    #[prost(message, tag = "4")]
    Completed(OfAllocation),
    /// The server created a nested call (named by its id).
    #[prost(message, tag = "5")]
    Call(OfAllocation),
    #[prost(message, tag = "6")]
    Result(pb::AllocationResult),
    /// The server took the allocation's result.
    #[prost(string, tag = "7")]
    Taken(String),
    /// The worker is gone (not let go of): only results stay.
    #[prost(bool, tag = "8")]
    Gone(bool),
}

/// A change about one allocation: its id, and an upload or a name.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct OfAllocation {
    #[prost(string, tag = "1")]
    pub alloc_id: String,
    #[prost(message, optional, tag = "2")]
    pub upload: Option<UploadRecord>,
    #[prost(string, tag = "3")]
    pub name: String,
}

impl WorkerRecord {
    fn allocation(&mut self, id: &str) -> Option<&mut AllocRecord> {
        self.allocations.iter_mut().find(|a| a.id() == id)
    }

    /// The record after `change`.
    pub(crate) fn apply(&mut self, change: Change) {
        match change {
            Change::Snapshot(r) => *self = r,
            Change::Started(a) => {
                let id = a.id().to_string();
                self.allocations.retain(|x| x.id() != id);
                self.allocations.push(a);
            }
            Change::Output(o) => {
                if let (Some(a), Some(u)) = (self.allocation(&o.alloc_id), o.upload) {
                    a.outputs.push(u);
                }
            }
            Change::Completed(o) => {
                if let Some(a) = self.allocation(&o.alloc_id) {
                    for u in a.outputs.iter_mut().chain(a.request_error.iter_mut()) {
                        u.completed |= u.blob_id == o.name;
                    }
                }
            }
            Change::Call(o) => {
                if let Some(a) = self.allocation(&o.alloc_id) {
                    a.calls_created.push(o.name);
                }
            }
            Change::Result(r) => {
                let id = r.allocation_id.clone().unwrap_or_default();
                if let Some(a) = self.allocation(&id) {
                    a.result = Some(r);
                    // Its uploads are completed or aborted by now.
                    a.outputs.clear();
                    a.request_error = None;
                    a.calls_created.clear();
                }
            }
            Change::Taken(id) => self.allocations.retain(|a| a.id() != id),
            Change::Gone(_) => {
                self.gone = true;
                self.allocations.retain(|a| a.result.is_some());
            }
        }
    }
}

/// Why a record file was set aside.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BadRecord {
    #[error("unreadable: {0}")]
    Unreadable(std::io::Error),
    #[error("{0} bytes, more than a record's {MAX_RECORD_BYTES}")]
    TooLarge(u64),
    #[error("not a record: {0}")]
    Decode(prost::DecodeError),
    #[error("not a record: it does not start with the whole record")]
    NoSnapshot,
    #[error("version {0}, not {VERSION}")]
    Version(u32),
    #[error("no worker id")]
    NoId,
}

/// One worker's record in memory and its journal on disk: each change is
/// one append (a length-prefixed [`Entry`], one `write`); past a bound the
/// journal is rewritten as a single snapshot, by rename.
struct Journal {
    record: WorkerRecord,
    /// Open for appending; `None` until the first snapshot is written
    /// (or after a failed write: the next change rewrites it whole).
    file: Option<std::fs::File>,
    /// Entries appended since the snapshot.
    appended: usize,
}

impl Journal {
    /// Rewriting is due: appends outnumber what the record holds (so the
    /// journal stays within a few times the record's size).
    fn due(&self) -> bool {
        self.file.is_none() || self.appended > 64 + 4 * self.record.allocations.len()
    }
}

/// The records of this agent's workers, in memory and on disk.
pub(crate) struct Store {
    dir: PathBuf,
    /// Worker id to its journal.
    workers: Mutex<HashMap<String, Arc<Mutex<Journal>>>>,
    /// Allocation id to the worker whose record holds it.
    index: Mutex<HashMap<String, String>>,
}

impl Store {
    pub fn new(dir: PathBuf) -> Store {
        Store {
            dir,
            workers: Mutex::new(HashMap::new()),
            index: Mutex::new(HashMap::new()),
        }
    }

    fn path(&self, fe_id: &str) -> PathBuf {
        let h = fe_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        self.dir.join(format!("fe-{h:016x}"))
    }

    /// Reads every record left by an earlier run; a file that is not one
    /// is renamed `*.bad` (never read again) and named with the reason.
    pub fn load(&self) -> (Vec<WorkerRecord>, Vec<(String, BadRecord)>) {
        let (mut good, mut bad) = (Vec::new(), Vec::new());
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return (good, bad);
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with("fe-") || name.contains('.') {
                continue;
            }
            match read(&e.path()) {
                Ok(r) => good.push(r),
                Err(why) => {
                    let _ = std::fs::rename(e.path(), self.dir.join(format!("{name}.bad")));
                    bad.push((name, why));
                }
            }
        }
        (good, bad)
    }

    /// Takes a record loaded at start as this run's (its allocations
    /// indexed); its journal is rewritten at its first change.
    pub fn adopt(&self, record: WorkerRecord) {
        let fe_id = fe_id_of(&record).to_string();
        {
            let mut index = self.index.lock();
            for a in &record.allocations {
                index.insert(a.id().to_string(), fe_id.clone());
            }
        }
        let journal = Journal {
            record,
            file: None,
            appended: 0,
        };
        self.workers
            .lock()
            .insert(fe_id, Arc::new(Mutex::new(journal)));
    }

    /// A worker is running: its record starts (any record of a worker of
    /// the same id that ended, holding results, keeps them).
    pub fn worker_running(
        &self,
        desc: &pb::FunctionExecutorDescription,
        gpus: &[String],
        started: Option<StartReading>,
    ) {
        let fe_id = desc.id.clone().unwrap_or_default();
        let journal = self
            .workers
            .lock()
            .entry(fe_id.clone())
            .or_insert_with(|| {
                Arc::new(Mutex::new(Journal {
                    record: WorkerRecord::default(),
                    file: None,
                    appended: 0,
                }))
            })
            .clone();
        let mut j = journal.lock();
        j.record.version = VERSION;
        j.record.description = Some(desc.clone());
        j.record.gpus = gpus.to_vec();
        j.record.started = started;
        j.record.gone = false;
        self.snapshot(&fe_id, &mut j);
    }

    /// Applies `change` to worker `fe_id`'s record and appends it to its
    /// journal (or rewrites the journal, when due).
    fn change(&self, fe_id: &str, change: Change) {
        let Some(journal) = self.workers.lock().get(fe_id).cloned() else {
            return;
        };
        let mut j = journal.lock();
        j.record.apply(change.clone());
        if j.due() {
            self.snapshot(fe_id, &mut j);
            return;
        }
        let written = match j.file.as_mut() {
            Some(f) => std::io::Write::write_all(
                f,
                &frame(&Entry {
                    change: Some(change),
                }),
            ),
            None => Ok(()),
        };
        match written {
            Ok(()) => j.appended += 1,
            Err(error) => {
                tracing::warn!(worker = %fe_id, %error, "cannot append to a worker's adoption record; rewriting it at the next change");
                j.file = None;
            }
        }
    }

    /// Rewrites worker `fe_id`'s journal as one snapshot, by rename, and
    /// keeps it open for appending (a failure is said; the next change
    /// tries again).
    fn snapshot(&self, fe_id: &str, j: &mut Journal) {
        let path = self.path(fe_id);
        let tmp = path.with_extension("tmp");
        let bytes = frame(&Entry {
            change: Some(Change::Snapshot(j.record.clone())),
        });
        let opened = std::fs::create_dir_all(&self.dir)
            .and_then(|()| std::fs::write(&tmp, &bytes))
            .and_then(|()| std::fs::rename(&tmp, &path))
            .and_then(|()| std::fs::OpenOptions::new().append(true).open(&path));
        match opened {
            Ok(f) => {
                j.file = Some(f);
                j.appended = 0;
            }
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "cannot write a worker's adoption record: a restart would not adopt it");
                j.file = None;
            }
        }
    }

    fn worker_of(&self, alloc_id: &str) -> Option<String> {
        self.index.lock().get(alloc_id).cloned()
    }

    /// Allocation `alloc` is about to be handed to its worker.
    pub fn allocation_started(
        &self,
        alloc: &pb::Allocation,
        request_error: UploadRecord,
        started: Option<StartReading>,
    ) {
        let fe_id = alloc.function_executor_id.clone().unwrap_or_default();
        let id = alloc.allocation_id.clone().unwrap_or_default();
        self.index.lock().insert(id, fe_id.clone());
        let record = AllocRecord {
            allocation: Some(alloc.clone()),
            request_error: Some(request_error),
            outputs: Vec::new(),
            result: None,
            started,
            calls_created: Vec::new(),
        };
        self.change(&fe_id, Change::Started(record));
    }

    /// A change about allocation `alloc_id`, to its worker's record.
    fn of_allocation(&self, alloc_id: &str, f: impl FnOnce(OfAllocation) -> Change) {
        let Some(fe_id) = self.worker_of(alloc_id) else {
            return;
        };
        let of = OfAllocation {
            alloc_id: alloc_id.to_string(),
            ..OfAllocation::default()
        };
        self.change(&fe_id, f(of));
    }

    /// The worker is about to get the URLs of an output upload.
    pub fn output_created(&self, alloc_id: &str, upload: UploadRecord) {
        self.of_allocation(alloc_id, |o| {
            Change::Output(OfAllocation {
                upload: Some(upload),
                ..o
            })
        });
    }

    /// Upload `blob_id` (an output, or the request error) of allocation
    /// `alloc_id` was completed.
    pub fn upload_completed(&self, alloc_id: &str, blob_id: &str) {
        self.of_allocation(alloc_id, |o| {
            Change::Completed(OfAllocation {
                name: blob_id.to_string(),
                ..o
            })
        });
    }

    /// The server created nested call `call_id` of allocation `alloc_id`.
    pub fn call_created(&self, alloc_id: &str, call_id: &str) {
        self.of_allocation(alloc_id, |o| {
            Change::Call(OfAllocation {
                name: call_id.to_string(),
                ..o
            })
        });
    }

    /// Allocation `result` is final: kept until the server takes it.
    pub fn result(&self, result: &pb::AllocationResult) {
        let id = result.allocation_id.as_deref().unwrap_or("");
        let Some(fe_id) = self.worker_of(id) else {
            return;
        };
        self.change(&fe_id, Change::Result(result.clone()));
    }

    /// The server took these results (or no longer wants them): their
    /// entries go, and the records of gone workers left empty with them.
    pub fn taken(&self, alloc_ids: &[String]) {
        let mut by_worker: HashMap<String, Vec<String>> = HashMap::new();
        {
            let mut index = self.index.lock();
            for id in alloc_ids {
                if let Some(fe) = index.remove(id) {
                    by_worker.entry(fe).or_default().push(id.clone());
                }
            }
        }
        for (fe_id, ids) in by_worker {
            // In memory only, until the journal's next snapshot: a restart
            // before it holds these results again, and sends none that the
            // first desired state no longer holds (`reconcile::adopted`), so
            // one write per allocation is saved.
            if let Some(j) = self.workers.lock().get(&fe_id).cloned() {
                let mut j = j.lock();
                for id in ids {
                    j.record.apply(Change::Taken(id));
                    j.appended += 1;
                }
            }
            self.forget_if_done(&fe_id);
        }
    }

    /// The worker ended (not let go of): allocations without a result go
    /// (they get theirs from the controller); results stay for the server.
    pub fn worker_gone(&self, fe_id: &str) {
        let dropped: Vec<String> = match self.workers.lock().get(fe_id) {
            Some(j) => j
                .lock()
                .record
                .allocations
                .iter()
                .filter(|a| a.result.is_none())
                .map(|a| a.id().to_string())
                .collect(),
            None => return,
        };
        self.change(fe_id, Change::Gone(true));
        {
            let mut index = self.index.lock();
            for id in &dropped {
                index.remove(id);
            }
        }
        self.forget_if_done(fe_id);
    }

    /// Removes the record of a gone worker with nothing left in it.
    fn forget_if_done(&self, fe_id: &str) {
        let mut workers = self.workers.lock();
        let done = workers.get(fe_id).is_some_and(|j| {
            let j = j.lock();
            j.record.gone && j.record.allocations.is_empty()
        });
        if done {
            workers.remove(fe_id);
            let _ = std::fs::remove_file(self.path(fe_id));
        }
    }
}

/// `entry`, length-prefixed (4 bytes, little-endian).
fn frame(entry: &Entry) -> Vec<u8> {
    let body = prost::Message::encode_to_vec(entry);
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// The entries of a journal's bytes; a torn or undecodable last part (a
/// write cut short) ends them.
fn entries(mut bytes: &[u8]) -> Vec<Result<Entry, prost::DecodeError>> {
    let mut out = Vec::new();
    while bytes.len() >= 4 {
        let mut len = [0u8; 4];
        len.copy_from_slice(&bytes[..4]);
        let len = u32::from_le_bytes(len) as usize;
        let Some(body) = bytes.get(4..4 + len) else {
            break; // Torn: the rest was never written.
        };
        let decoded = prost::Message::decode(body);
        let failed = decoded.is_err();
        out.push(decoded);
        if failed {
            break;
        }
        bytes = &bytes[4 + len..];
    }
    out
}

/// The worker id a record is about.
pub(crate) fn fe_id_of(r: &WorkerRecord) -> &str {
    r.description
        .as_ref()
        .and_then(|d| d.id.as_deref())
        .unwrap_or("")
}

/// Reads one record (its journal) file, bounded: its snapshot, then each
/// change in order.
fn read(path: &Path) -> Result<WorkerRecord, BadRecord> {
    use std::io::Read;
    let meta = std::fs::symlink_metadata(path).map_err(BadRecord::Unreadable)?;
    if !meta.is_file() {
        return Err(BadRecord::Unreadable(std::io::Error::other(
            "not a regular file",
        )));
    }
    if meta.len() > MAX_RECORD_BYTES {
        return Err(BadRecord::TooLarge(meta.len()));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_RECORD_BYTES + 1).read_to_end(&mut bytes))
        .map_err(BadRecord::Unreadable)?;
    if bytes.len() as u64 > MAX_RECORD_BYTES {
        return Err(BadRecord::TooLarge(bytes.len() as u64));
    }
    let mut entries = entries(&bytes).into_iter();
    let first = entries.next().ok_or(BadRecord::NoSnapshot)?;
    let Some(Change::Snapshot(mut r)) = first.map_err(BadRecord::Decode)?.change else {
        return Err(BadRecord::NoSnapshot);
    };
    if r.version != VERSION {
        return Err(BadRecord::Version(r.version));
    }
    if fe_id_of(&r).is_empty() {
        return Err(BadRecord::NoId);
    }
    for e in entries {
        match e.map(|e| e.change) {
            Ok(Some(Change::Snapshot(_))) | Ok(None) => {}
            Ok(Some(change)) => r.apply(change),
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "an adoption record ends in a damaged entry; what came before is kept");
                break;
            }
        }
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(id: &str) -> pb::FunctionExecutorDescription {
        pb::FunctionExecutorDescription {
            id: Some(id.into()),
            ..Default::default()
        }
    }

    fn alloc(id: &str, fe: &str) -> pb::Allocation {
        pb::Allocation {
            allocation_id: Some(id.into()),
            function_executor_id: Some(fe.into()),
            ..Default::default()
        }
    }

    fn upload(blob: &str) -> UploadRecord {
        UploadRecord {
            blob_id: blob.into(),
            uri: format!("file:///b/{blob}"),
            upload_id: format!("u-{blob}"),
            completed: false,
        }
    }

    #[test]
    fn a_record_follows_its_worker_and_keeps_results_until_taken() {
        let tmp = tempfile::tempdir().expect("tmp");
        let store = Store::new(tmp.path().join("adoption"));
        store.worker_running(&desc("fe1"), &["GPU-1".into()], None);
        store.allocation_started(&alloc("a1", "fe1"), upload("req"), None);
        store.allocation_started(&alloc("a2", "fe1"), upload("req2"), None);
        store.output_created("a1", upload("out"));
        let again = Store::new(tmp.path().join("adoption"));
        let (loaded, bad) = again.load();
        assert!(bad.is_empty());
        assert_eq!(loaded.len(), 1);
        let r = &loaded[0];
        assert_eq!(fe_id_of(r), "fe1");
        assert_eq!(r.gpus, ["GPU-1"]);
        assert_eq!(r.allocations.len(), 2);
        assert_eq!(r.allocations[0].outputs, [upload("out")]);
        store.upload_completed("a1", "out");
        let (loaded, _) = Store::new(tmp.path().join("adoption")).load();
        assert!(
            loaded[0].allocations[0].outputs[0].completed,
            "never completed twice"
        );
        // A result is kept through the worker's end, until taken.
        store.result(&pb::AllocationResult {
            allocation_id: Some("a1".into()),
            ..Default::default()
        });
        store.worker_gone("fe1");
        let (loaded, _) = Store::new(tmp.path().join("adoption")).load();
        assert!(loaded[0].gone);
        assert_eq!(loaded[0].allocations.len(), 1, "only the one with a result");
        assert!(loaded[0].allocations[0].result.is_some());
        store.taken(&["a1".into()]);
        let (loaded, _) = Store::new(tmp.path().join("adoption")).load();
        assert!(loaded.is_empty(), "the file went with its last result");
    }

    #[test]
    fn files_that_are_not_records_are_set_aside_with_the_reason() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("adoption");
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("fe-garbage"), b"\xff\xff\xff").expect("write");
        let other = WorkerRecord {
            version: VERSION + 1,
            description: Some(desc("x")),
            ..Default::default()
        };
        let snapshot = |r: WorkerRecord| {
            frame(&Entry {
                change: Some(Change::Snapshot(r)),
            })
        };
        std::fs::write(dir.join("fe-later"), snapshot(other)).expect("w");
        let nameless = WorkerRecord {
            version: VERSION,
            ..Default::default()
        };
        std::fs::write(dir.join("fe-nameless"), snapshot(nameless)).expect("w");
        let (good, bad) = Store::new(dir.clone()).load();
        assert!(good.is_empty());
        let mut why: Vec<String> = bad.iter().map(|(n, e)| format!("{n}: {e}")).collect();
        why.sort();
        assert!(why[0].contains("not a record"), "{why:?}");
        assert!(
            why[1].contains(&format!("version {}", VERSION + 1)),
            "{why:?}"
        );
        assert!(why[2].contains("no worker id"), "{why:?}");
        assert!(dir.join("fe-garbage.bad").exists());
        assert!(Store::new(dir).load().1.is_empty(), "never read again");
    }

    /// Changes are appended, a torn last entry (a write cut short) is
    /// ignored, and rewriting the journal as a snapshot keeps the record.
    #[test]
    fn the_journal_survives_a_torn_tail_and_its_rewrites() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("adoption");
        let store = Store::new(dir.clone());
        store.worker_running(&desc("fe1"), &[], None);
        for i in 0..200 {
            let id = format!("a{i}");
            store.allocation_started(&alloc(&id, "fe1"), upload("req"), None);
            store.output_created(&id, upload("out"));
            store.result(&pb::AllocationResult {
                allocation_id: Some(id.clone()),
                ..Default::default()
            });
            if i < 199 {
                store.taken(&[id]);
            }
        }
        store.allocation_started(&alloc("last", "fe1"), upload("req"), None);
        let path = store.path("fe1");
        let size = std::fs::metadata(&path).expect("journal").len();
        assert!(size < 16 << 10, "rewritten as it grew: {size} bytes");
        // A write cut short: half an entry at the end.
        let mut bytes = std::fs::read(&path).expect("read");
        let torn = frame(&Entry {
            change: Some(Change::Taken("last".into())),
        });
        bytes.extend_from_slice(&torn[..torn.len() - 2]);
        std::fs::write(&path, bytes).expect("write");
        let (loaded, bad) = Store::new(dir).load();
        assert!(bad.is_empty(), "{bad:?}");
        let allocations = &loaded[0].allocations;
        let ids: Vec<&str> = allocations.iter().map(AllocRecord::id).collect();
        assert_eq!(ids.last(), Some(&"last"), "the torn change is not applied");
        assert!(ids.contains(&"a199"), "a result not yet taken stays");
        // Taken ones leave at the next snapshot (until then a restart holds
        // them, and the desired state filters them): never many.
        assert!(ids.len() < 64, "{ids:?}");
        let (last, done) = allocations.split_last().expect("some");
        assert!(last.result.is_none() && done.iter().all(|a| a.result.is_some()));
    }
}
