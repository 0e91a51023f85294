//! Metering: what each allocation and each worker used, as records in a
//! crash-safe, append-only usage ledger in the data directory.
//!
//! The ledger (`ledger.rs`) writes each record as one checksummed frame
//! and fsyncs it before `append` returns, so a record the caller was told
//! is written survives a crash. Opening a ledger recovers it: a torn or
//! corrupt tail is cut off at the last whole frame, and the ids already
//! recorded are known, so appending the same allocation again after a
//! restart is a no-op, never a second count. Segments rotate by size and
//! the oldest go when the total passes its bound.
//!
//! The meter (`meter.rs`) shares a worker's sampled usage among the
//! allocations running on it (equally) and its idle time. The price card (`price.rs`) turns a record into a cost in integer
//! minor units.
//!
//! Must not know about: gRPC, protobuf, workers, cgroups (usage arrives
//! as numbers), HTTP.

mod activity;
mod ledger;
mod meter;
mod price;
mod record;
mod recorder;
mod summary;

pub use activity::{DAYS as ACTIVITY_DAYS, Day};
pub use ledger::{
    ID_WINDOW, Ledger, LedgerConfig, LedgerError, Position, Recovery, for_each_record, read_records,
};
pub use meter::{Accrued, Meter, Sample};
pub use price::{PriceCard, PriceCardError};
pub use record::{RecordKind, UsageRecord, decode_frame, encode_frame};
pub use recorder::{
    FinishedAllocation, Probe, Reading, Recorder, RecorderConfig, RecorderStatus, Release,
    WorkerInfo,
};
pub use summary::{GroupBy, Summary, Totals, in_range, summarize};
