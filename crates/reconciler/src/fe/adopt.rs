//! Reattaching to a worker an earlier run of the agent left alive: the
//! driver proved it is the same process; here it is shown in its view and
//! metered from its recorded start, reconnected through the same checked
//! channel, asked `get_info` and `list_allocations` (which allocations it
//! still has). Nothing is sent to it that would change it.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use steward_worker_driver::Worker;
use tokio::sync::watch;

use super::Live;
use super::startup::{self, Failed};
use crate::adoption::WorkerRecord;
use crate::fe_pb;
use crate::lifecycle::{FePhase, FeState, Reason, Spawned};
use crate::pb;
use crate::state::{Shared, TimelineEntry};

/// The adopted worker, live, and the ids of the allocations it still has;
/// or why it is lost (it is then stopped where it runs at all).
pub(super) async fn reattach(
    shared: Arc<Shared>,
    desc: &pb::FunctionExecutorDescription,
    worker: Result<Box<dyn Worker>, String>,
    record: &WorkerRecord,
    view: &watch::Sender<FeState>,
) -> Result<(Live, HashSet<String>), Failed> {
    let lost = |why: String| (Reason::Unhealthy, why);
    let mut process =
        worker.map_err(|e| lost(format!("the worker of an earlier run is lost: {e}")))?;
    publish(&shared, desc, record, process.as_ref(), view);
    let channel = startup::connect(&shared, process.as_mut())
        .await
        .map_err(|(_, m)| lost(format!("the adopted worker cannot be reached: {m}")))?;
    let limit = shared.config.max_worker_message_bytes;
    let mut client = channel
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
    let on_worker = match checked(&shared, &mut client).await {
        Ok(ids) => ids,
        Err(m) => {
            process.stop(Duration::ZERO).await;
            return Err(lost(format!(
                "the adopted worker does not answer as one: {m}"
            )));
        }
    };
    Ok((
        Live {
            worker: process,
            client,
        },
        on_worker,
    ))
}

/// `get_info`, then the ids of the allocations the worker has.
async fn checked(
    shared: &Shared,
    client: &mut super::conn::WorkerClient,
) -> Result<HashSet<String>, String> {
    startup::get_info(shared, client)
        .await
        .map_err(|(_, m)| m)?;
    let listed = tokio::time::timeout(
        Duration::from_secs(10),
        client.list_allocations(fe_pb::ListAllocationsRequest {}),
    )
    .await
    .map_err(|_| "list_allocations got no answer within 10s".to_string())?
    .map_err(|s| format!("list_allocations failed: {}: {}", s.code(), s.message()))?;
    Ok(listed
        .into_inner()
        .allocations
        .into_iter()
        .filter_map(|a| a.allocation_id)
        .collect())
}

/// Shows the adopted process in the worker's view, and has metering go on
/// from the worker's recorded start (the earlier run never said it stopped).
fn publish(
    shared: &Shared,
    desc: &pb::FunctionExecutorDescription,
    record: &WorkerRecord,
    process: &dyn Worker,
    view: &watch::Sender<FeState>,
) {
    if let Some(metering) = &shared.config.metering {
        // From the start of its oldest running allocation: what it used
        // before, while idle, the earlier run recorded in its idle pieces.
        let since = record
            .allocations
            .iter()
            .filter(|a| a.result.is_none())
            .filter_map(|a| a.started)
            .min_by_key(|s| s.at_ms)
            .map(|s| (s.at_ms, s.cpu_usec, s.memory_bytes));
        metering.worker_adopted(
            crate::metering::worker_of(desc, &record.gpus, process.monitor()),
            since,
        );
    }
    let spawned = Spawned {
        pid: process.pid(),
        gpus: record.gpus.clone(),
        monitor: process.monitor(),
    };
    let what = format!(
        "adopted pid {} on {} from an earlier run",
        process.pid(),
        process.address()
    );
    view.send_modify(|s| {
        if matches!(s.phase, FePhase::Pending) {
            s.phase = FePhase::Starting(spawned);
        }
        s.timeline.push(TimelineEntry::now(what));
    });
}
