//! Adoption records: what a later Steward needs to take over a live worker
//! and the allocations on it, kept in `<data dir>/adoption/`, one file per
//! worker. The driver keeps its own record of the process (pid, start
//! time, boot, uid, cgroup); this one keeps the agent's side: the worker's
//! description and GPUs, and for each allocation on it the allocation, its
//! open uploads (the request-error blob and every output blob the worker
//! was given), the reading it started at (for metering), and, once it has
//! one, its result until the server has taken it.
//!
//! A record is a protobuf message, written whole to a temporary file and
//! renamed over the old one at each change, so a reader sees the old or
//! the new record, never half of one. A file that is too large, does not
//! decode, or is of another version is never acted on: it is set aside
//! with the reason.
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
pub(crate) const VERSION: u32 = 1;
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

/// Why a record file was set aside.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BadRecord {
    #[error("unreadable: {0}")]
    Unreadable(std::io::Error),
    #[error("{0} bytes, more than a record's {MAX_RECORD_BYTES}")]
    TooLarge(u64),
    #[error("not a record: {0}")]
    Decode(prost::DecodeError),
    #[error("version {0}, not {VERSION}")]
    Version(u32),
    #[error("no worker id")]
    NoId,
}

/// The records of this agent's workers, in memory and on disk.
pub(crate) struct Store {
    dir: PathBuf,
    /// Worker id to its record.
    workers: Mutex<HashMap<String, Arc<Mutex<WorkerRecord>>>>,
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

    /// Takes a record loaded at start as this run's (its allocations indexed).
    pub fn adopt(&self, record: WorkerRecord) {
        let fe_id = fe_id_of(&record).to_string();
        {
            let mut index = self.index.lock();
            for a in &record.allocations {
                index.insert(a.id().to_string(), fe_id.clone());
            }
        }
        self.workers
            .lock()
            .insert(fe_id, Arc::new(Mutex::new(record)));
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
        let record = self
            .workers
            .lock()
            .entry(fe_id.clone())
            .or_insert_with(|| Arc::new(Mutex::new(WorkerRecord::default())))
            .clone();
        let mut r = record.lock();
        r.version = VERSION;
        r.description = Some(desc.clone());
        r.gpus = gpus.to_vec();
        r.started = started;
        r.gone = false;
        self.write(&fe_id, &r);
    }

    /// Changes the record of the worker holding allocation `alloc_id` (or
    /// of worker `fe_id` for a new one) and writes it.
    fn change(&self, fe_id: &str, f: impl FnOnce(&mut WorkerRecord)) {
        let Some(record) = self.workers.lock().get(fe_id).cloned() else {
            return;
        };
        let mut r = record.lock();
        f(&mut r);
        self.write(fe_id, &r);
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
        self.index.lock().insert(id.clone(), fe_id.clone());
        self.change(&fe_id, |r| {
            r.allocations.retain(|a| a.id() != id);
            r.allocations.push(AllocRecord {
                allocation: Some(alloc.clone()),
                request_error: Some(request_error),
                outputs: Vec::new(),
                result: None,
                started,
            });
        });
    }

    /// The worker is about to get the URLs of an output upload.
    pub fn output_created(&self, alloc_id: &str, upload: UploadRecord) {
        let Some(fe_id) = self.worker_of(alloc_id) else {
            return;
        };
        self.change(&fe_id, |r| {
            if let Some(a) = r.allocations.iter_mut().find(|a| a.id() == alloc_id) {
                a.outputs.push(upload);
            }
        });
    }

    /// Upload `blob_id` (an output, or the request error) of allocation
    /// `alloc_id` was completed.
    pub fn upload_completed(&self, alloc_id: &str, blob_id: &str) {
        let Some(fe_id) = self.worker_of(alloc_id) else {
            return;
        };
        self.change(&fe_id, |r| {
            let Some(a) = r.allocations.iter_mut().find(|a| a.id() == alloc_id) else {
                return;
            };
            let upload = a
                .outputs
                .iter_mut()
                .chain(a.request_error.iter_mut())
                .find(|u| u.blob_id == blob_id);
            if let Some(u) = upload {
                u.completed = true;
            }
        });
    }

    /// Allocation `result` is final: kept until the server takes it.
    pub fn result(&self, result: &pb::AllocationResult) {
        let id = result.allocation_id.as_deref().unwrap_or("");
        let Some(fe_id) = self.worker_of(id) else {
            return;
        };
        self.change(&fe_id, |r| {
            if let Some(a) = r.allocations.iter_mut().find(|a| a.id() == id) {
                a.result = Some(result.clone());
                // Its uploads are completed or aborted by now.
                a.outputs.clear();
                a.request_error = None;
            }
        });
    }

    /// The server took these results (or no longer wants them): their
    /// entries go, and the records of gone workers left empty with them.
    pub fn taken(&self, alloc_ids: &[String]) {
        let mut by_worker: HashMap<String, Vec<&str>> = HashMap::new();
        {
            let mut index = self.index.lock();
            for id in alloc_ids {
                if let Some(fe) = index.remove(id) {
                    by_worker.entry(fe).or_default().push(id);
                }
            }
        }
        for (fe_id, ids) in by_worker {
            self.change(&fe_id, |r| r.allocations.retain(|a| !ids.contains(&a.id())));
            self.forget_if_done(&fe_id);
        }
    }

    /// The worker ended (not let go of): allocations without a result go
    /// (they get theirs from the controller); results stay for the server.
    pub fn worker_gone(&self, fe_id: &str) {
        let mut dropped = Vec::new();
        self.change(fe_id, |r| {
            r.gone = true;
            r.allocations.retain(|a| {
                let keep = a.result.is_some();
                if !keep {
                    dropped.push(a.id().to_string());
                }
                keep
            });
        });
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
        let done = workers.get(fe_id).is_some_and(|r| {
            let r = r.lock();
            r.gone && r.allocations.is_empty()
        });
        if done {
            workers.remove(fe_id);
            let _ = std::fs::remove_file(self.path(fe_id));
        }
    }

    /// Writes `r` whole, by rename (a failure is said and the old record stays).
    fn write(&self, fe_id: &str, r: &WorkerRecord) {
        let path = self.path(fe_id);
        let tmp = path.with_extension("tmp");
        let bytes = prost::Message::encode_to_vec(r);
        let written = std::fs::create_dir_all(&self.dir)
            .and_then(|()| std::fs::write(&tmp, &bytes))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(error) = written {
            tracing::warn!(path = %path.display(), %error, "cannot write a worker's adoption record: a restart would not adopt it");
        }
    }
}

/// The worker id a record is about.
pub(crate) fn fe_id_of(r: &WorkerRecord) -> &str {
    r.description
        .as_ref()
        .and_then(|d| d.id.as_deref())
        .unwrap_or("")
}

/// Reads one record file, bounded.
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
    let r: WorkerRecord = prost::Message::decode(bytes.as_slice()).map_err(BadRecord::Decode)?;
    if r.version != VERSION {
        return Err(BadRecord::Version(r.version));
    }
    if fe_id_of(&r).is_empty() {
        return Err(BadRecord::NoId);
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
        std::fs::write(dir.join("fe-later"), prost::Message::encode_to_vec(&other)).expect("w");
        let nameless = WorkerRecord {
            version: VERSION,
            ..Default::default()
        };
        std::fs::write(
            dir.join("fe-nameless"),
            prost::Message::encode_to_vec(&nameless),
        )
        .expect("w");
        let (good, bad) = Store::new(dir.clone()).load();
        assert!(good.is_empty());
        let mut why: Vec<String> = bad.iter().map(|(n, e)| format!("{n}: {e}")).collect();
        why.sort();
        assert!(why[0].contains("not a record"), "{why:?}");
        assert!(why[1].contains("version 2"), "{why:?}");
        assert!(why[2].contains("no worker id"), "{why:?}");
        assert!(dir.join("fe-garbage.bad").exists());
        assert!(Store::new(dir).load().1.is_empty(), "never read again");
    }
}
