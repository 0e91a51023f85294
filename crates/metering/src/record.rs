//! One usage record and its frame on disk:
//! `magic (4) | payload length (4, LE) | CRC-32 of the payload (4, LE) | payload`,
//! the payload being the record as JSON (a few hundred bytes; readable with
//! standard tools after `tail -c +13`).

use serde::{Deserialize, Serialize};

/// Marks the start of a frame ("STU1").
pub const MAGIC: [u8; 4] = *b"STU1";
const HEADER: usize = 12;
/// Largest payload a frame may carry; a larger length is corruption.
pub const MAX_PAYLOAD: usize = 64 << 10;

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

/// The frame of `record`.
pub fn encode_frame(record: &UsageRecord) -> Vec<u8> {
    // Serializing a plain struct of strings and numbers cannot fail.
    let payload = serde_json::to_vec(record).unwrap_or_default();
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
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
