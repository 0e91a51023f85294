//! One usage record and its frame on disk:
//! `magic (4) | payload length (4, LE) | CRC-32 of the payload (4, LE) | payload`,
//! the payload being the record as JSON (a few hundred bytes; readable with
//! standard tools after `tail -c +13`).
//!
//! Writer and reader share one limit, [`MAX_PAYLOAD`]: the reader takes a
//! longer length for corruption, so the writer never makes one. Names are
//! bounded ([`MAX_ID_BYTES`], [`MAX_NAME_BYTES`], [`MAX_GPU_ENTRIES`]) and,
//! should the record still not fit (names that JSON escaping inflates), cut
//! shorter until it does ([`fit`]): a record is shortened in its names,
//! never dropped, and every frame written can be read back.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

/// Marks the start of a frame ("STU1").
pub const MAGIC: [u8; 4] = *b"STU1";
const HEADER: usize = 12;
/// Largest payload a frame may carry: [`encode_frame`] never makes a
/// larger one, and [`decode_frame`] takes a larger length for corruption.
pub const MAX_PAYLOAD: usize = 64 << 10;
/// Longest record id kept: a longer one keeps its start and ends in `~`
/// and a hash of the whole id, so that cut ids stay distinct.
pub const MAX_ID_BYTES: usize = 256;
/// Longest name kept (worker id, namespace, application, function,
/// outcome, GPU model); a longer one is cut at a character boundary.
pub const MAX_NAME_BYTES: usize = 1024;
/// GPU models kept per list (`gpu_ms`, `gpu_busy_ms`); the time of the
/// rest is summed under [`OTHER_GPUS`] in the last entry.
pub const MAX_GPU_ENTRIES: usize = 16;
/// The model name the time of GPU models past [`MAX_GPU_ENTRIES`] goes to.
pub const OTHER_GPUS: &str = "other";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    /// One finished allocation.
    Allocation,
    /// A stretch of a worker's life (its idle time is metered apart from
    /// its allocations').
    WorkerSegment,
}

/// What one allocation or worker segment used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageRecord {
    pub kind: RecordKind,
    /// Allocation id, or `<worker id>@<segment start, unix ms>`: unique per record.
    pub id: String,
    pub function_executor_id: String,
    pub namespace: String,
    pub application: String,
    pub function: String,
    pub started_unix_ms: u64,
    pub ended_unix_ms: u64,
    /// CPU time in core-µs.
    pub cpu_core_us: u64,
    /// Integral of memory in use, in MB·ms.
    pub memory_mb_ms: u64,
    pub peak_memory_bytes: u64,
    /// Allocated GPU time in ms, by GPU model.
    pub gpu_ms: Vec<(String, u64)>,
    /// Of which the GPUs were busy (× their utilisation from NVML or
    /// `nvidia-smi`), by model; empty where utilisation is unknown.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpu_busy_ms: Vec<(String, u64)>,
    /// Cost in the price card's minor units (`None` without a price card).
    pub cost_minor: Option<i64>,
    /// How an allocation ended: "success", or "failure:<reason>" (empty
    /// for a worker segment).
    #[serde(default)]
    pub outcome: String,
    /// Whether the allocation ran on a worker (one failed before it
    /// started used nothing and is not charged the task price).
    #[serde(default)]
    pub ran: bool,
    /// For a worker segment: the time in it with no allocation running
    /// (the segment spans busy time too, which the allocations' records
    /// already carry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_ms: Option<u64>,
}

impl UsageRecord {
    /// An allocation's wall time; a worker segment's idle time.
    pub fn wall_ms(&self) -> u64 {
        let span = self.ended_unix_ms.saturating_sub(self.started_unix_ms);
        match (self.kind, self.idle_ms) {
            (RecordKind::WorkerSegment, Some(idle)) => idle.min(span),
            _ => span,
        }
    }
}

/// The frame of `record`, whose payload is at most [`MAX_PAYLOAD`]: a
/// record over the bounds is written as [`fit`] cuts it.
pub fn encode_frame(record: &UsageRecord) -> Vec<u8> {
    encode(record).0
}

/// The frame of `record` (cut as [`fit`] cuts it), and whether it was cut.
pub(crate) fn encode(record: &UsageRecord) -> (Vec<u8>, bool) {
    let (payload, cut) = match payload_within_bounds(record) {
        Some(p) => (p, false),
        None => {
            let mut r = record.clone();
            fit(&mut r);
            (payload_of(&r), true)
        }
    };
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    (out, cut)
}

/// The record as JSON. Serializing a plain struct of strings and numbers
/// into memory cannot fail.
fn payload_of(record: &UsageRecord) -> Vec<u8> {
    serde_json::to_vec(record).unwrap_or_default()
}

/// The payload of `record` if [`fit`] would leave it as it is.
fn payload_within_bounds(record: &UsageRecord) -> Option<Vec<u8>> {
    if !names_within_bounds(record) {
        return None;
    }
    let payload = payload_of(record);
    (payload.len() <= MAX_PAYLOAD).then_some(payload)
}

fn names_within_bounds(r: &UsageRecord) -> bool {
    r.id.len() <= MAX_ID_BYTES
        && names(r).iter().all(|n| n.len() <= MAX_NAME_BYTES)
        && r.gpu_ms.len() <= MAX_GPU_ENTRIES
        && r.gpu_busy_ms.len() <= MAX_GPU_ENTRIES
        && gpu_models(r).all(|m| m.len() <= MAX_NAME_BYTES)
}

fn names(r: &UsageRecord) -> [&String; 5] {
    [
        &r.function_executor_id,
        &r.namespace,
        &r.application,
        &r.function,
        &r.outcome,
    ]
}

fn gpu_models(r: &UsageRecord) -> impl Iterator<Item = &String> {
    r.gpu_ms.iter().chain(&r.gpu_busy_ms).map(|(m, _)| m)
}

/// Bounds `record` so that its frame fits [`MAX_PAYLOAD`], changing only
/// names: the id is cut to [`MAX_ID_BYTES`] (with a hash of the whole id),
/// other names to [`MAX_NAME_BYTES`], GPU lists to [`MAX_GPU_ENTRIES`]
/// (the rest summed under [`OTHER_GPUS`]); then, while the JSON is still
/// too long (escaping inflates a control character sixfold), the names
/// other than the id are cut shorter, down to empty. Numbers, kind and
/// outcome flags are kept. Whether anything was cut; a record within the
/// bounds is left as it is, so fitting twice changes nothing.
pub fn fit(record: &mut UsageRecord) -> bool {
    if payload_within_bounds(record).is_some() {
        return false;
    }
    bound_names(record);
    let mut budget = MAX_NAME_BYTES;
    loop {
        cut_names(record, budget);
        if budget == 0 || payload_of(record).len() <= MAX_PAYLOAD {
            return true;
        }
        budget /= 4;
    }
}

/// The first step of [`fit`], without serializing: the id cut to
/// [`MAX_ID_BYTES`] (with a hash of the whole id), other names to
/// [`MAX_NAME_BYTES`], GPU lists to [`MAX_GPU_ENTRIES`]. Whether anything
/// was cut. The recorder bounds each record so when it makes it, so that
/// the records waiting in memory for the ledger are bounded too.
pub(crate) fn bound_names(record: &mut UsageRecord) -> bool {
    if names_within_bounds(record) {
        return false;
    }
    if let Cow::Owned(id) = recorded_id(&record.id) {
        record.id = id;
    }
    merge_gpus(&mut record.gpu_ms);
    merge_gpus(&mut record.gpu_busy_ms);
    cut_names(record, MAX_NAME_BYTES);
    true
}

/// Cuts every name but the id to at most `budget` bytes.
fn cut_names(r: &mut UsageRecord, budget: usize) {
    for name in [
        &mut r.function_executor_id,
        &mut r.namespace,
        &mut r.application,
        &mut r.function,
        &mut r.outcome,
    ] {
        cut(name, budget);
    }
    for (model, _) in r.gpu_ms.iter_mut().chain(r.gpu_busy_ms.iter_mut()) {
        cut(model, budget);
    }
}

/// Cuts `s` to at most `max` bytes, at a character boundary.
fn cut(s: &mut String, max: usize) {
    if s.len() > max {
        let at = s.floor_char_boundary(max);
        s.truncate(at);
    }
}

/// The id as a frame holds it: as it is up to [`MAX_ID_BYTES`], else cut
/// to its start, `~`, and a 64-bit FNV-1a hash of the whole id in hex
/// (stable across builds, so an id cut before a restart is cut the same
/// after it, and the ledger still refuses it a second record).
pub(crate) fn recorded_id(id: &str) -> Cow<'_, str> {
    if id.len() <= MAX_ID_BYTES {
        return Cow::Borrowed(id);
    }
    let hash = id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let suffix = format!("~{hash:016x}");
    let mut head = id.to_string();
    cut(&mut head, MAX_ID_BYTES - suffix.len());
    Cow::Owned(head + &suffix)
}

/// Keeps at most [`MAX_GPU_ENTRIES`] entries: the time of the rest is
/// summed into the last, named [`OTHER_GPUS`].
fn merge_gpus(list: &mut Vec<(String, u64)>) {
    if list.len() <= MAX_GPU_ENTRIES {
        return;
    }
    let rest: u64 = list
        .drain(MAX_GPU_ENTRIES - 1..)
        .fold(0u64, |sum, (_, ms)| sum.saturating_add(ms));
    list.push((OTHER_GPUS.to_string(), rest));
}

/// Decodes the frame at the start of `bytes`: the record and the frame's
/// length, or `None` if the bytes do not start with a whole, intact frame
/// (torn, corrupt, or not a frame at all).
pub fn decode_frame(bytes: &[u8]) -> Option<(UsageRecord, usize)> {
    let header = bytes.get(..HEADER)?;
    if header[..4] != MAGIC {
        return None;
    }
    let len = u32::from_le_bytes(header[4..8].try_into().ok()?) as usize;
    if len > MAX_PAYLOAD {
        return None;
    }
    let crc = u32::from_le_bytes(header[8..12].try_into().ok()?);
    let payload = bytes.get(HEADER..HEADER + len)?;
    if crc32fast::hash(payload) != crc {
        return None;
    }
    let record = serde_json::from_slice(payload).ok()?;
    Some((record, HEADER + len))
}

#[cfg(test)]
mod tests;
