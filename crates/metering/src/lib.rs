//! Metering: what each allocation and each idle worker used and what it
//! cost, kept in a crash-safe, append-only usage ledger in the data
//! directory.
//!
//! The recorder (`recorder.rs`) meters each worker and allocation event on
//! the caller's thread (the worker's readings, the meter, the priced
//! record) and hands out a commit ticket; its one thread samples workers
//! each second and writes queued records with one fsync per batch, then
//! raises the durable ticket that results wait for (also when a write
//! fails or it gives up, so no result is held forever). The meter
//! (`meter.rs`) shares a worker's usage
//! equally among the allocations running on it, the rest being its idle
//! time. The ledger (`ledger.rs`) frames and checksums records, recovers
//! from torn writes, refuses a second record for a recent id, rotates and
//! bounds itself. The activity file (`activity.rs`) keeps a year of daily
//! totals; the summary (`summary.rs`) groups the ledger for `/state/usage`.
//! The price card (`price.rs`) turns a record into integer minor units.
//!
//! Must not know about: gRPC, protobuf, workers, cgroups (usage arrives
//! as numbers through a `Probe`), HTTP.

mod activity;
mod ledger;
mod meter;
mod price;
mod record;
mod recorder;
mod summary;
#[cfg(test)]
mod tmpfs_for_tests;

pub use activity::{DAYS as ACTIVITY_DAYS, Day, date_of};
pub use ledger::{
    BatchError, ID_WINDOW, Ledger, LedgerConfig, LedgerError, Position, Recovery, for_each_record,
    read_records,
};
pub use meter::{Accrued, Meter, Sample};
pub use price::{PriceCard, PriceCardError};
pub use record::{
    MAX_GPU_ENTRIES, MAX_ID_BYTES, MAX_NAME_BYTES, MAX_PAYLOAD, OTHER_GPUS, RecordKind,
    UsageRecord, decode_frame, encode_frame, fit,
};
pub use recorder::{
    BACKLOG_RECORDS, EventSink, FinishedAllocation, Probe, RETRY_BACKOFF_MAX, RETRY_BACKOFF_MIN,
    Reading, Recorder, RecorderConfig, RecorderStatus, WorkerInfo,
};
pub use summary::{
    Coverage, DEFAULT_SCAN_BYTES, GroupBy, Summary, SummaryCache, Totals, in_range, summarize,
    summarize_bounded,
};
