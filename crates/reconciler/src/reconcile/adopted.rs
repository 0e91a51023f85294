//! At start, before the first report: the workers an earlier run left
//! alive, from their adoption records. Each is handed to a controller that
//! reattaches to it (or reports it lost), registered as the reconciler's
//! own so that the first report carries it and the first desired state
//! keeps or stops it like any other; the allocations on it are known to
//! the reconciler from its first pass, so none is started twice. Results
//! the records kept wait for the first desired state: only those whose
//! allocations it still holds are sent (the others the server already
//! took, or no longer wants).

use std::sync::Arc;

use crate::adoption::{WorkerRecord, fe_id_of};
use crate::fe;
use crate::lifecycle::{Controlled, FeMap, FeSlot};
use crate::pb;
use crate::state::{AllocEntry, AllocPhase, Shared, TimelineEntry, function_label};

/// Adopts what the records name; returns how many workers were taken over.
pub(crate) fn adopt_left_workers(shared: &Arc<Shared>) -> usize {
    let Some(store) = &shared.adoption else {
        // Without adoption no worker outlives the agent: records of an
        // earlier run that adopted describe workers the sweep now kills.
        // The results they kept still go (if still desired), then they go.
        let dir = shared.config.data_dir.join("adoption");
        if dir.exists() {
            let (records, _) = crate::adoption::Store::new(dir.clone()).load();
            for record in &records {
                hold_results(shared, record);
            }
            if let Err(error) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(path = %dir.display(), %error, "cannot remove adoption records");
            }
        }
        return 0;
    };
    let (records, bad) = store.load();
    for (file, why) in bad {
        shared.event(
            "adoption_record_skipped",
            &file,
            format!("not an adoption record, set aside: {why}"),
        );
    }
    let mut registry = FeMap::new();
    let mut adopted = 0;
    for record in records {
        store.adopt(record.clone());
        hold_results(shared, &record);
        if record.gone {
            continue;
        }
        let id = fe_id_of(&record).to_string();
        let worker = shared
            .config
            .driver
            .adopt(&id)
            .map_err(|e| e.to_string())
            .and_then(|w| {
                // Its GPUs are its own again, or it cannot be kept (it is
                // stopped when `w` goes).
                shared
                    .config
                    .gpu_pool
                    .reserve(&id, &record.gpus)
                    .map(|()| w)
                    .map_err(|e| format!("its GPUs cannot be taken back: {e}"))
            });
        if let Err(why) = &worker {
            tracing::warn!(worker = %id, %why, "a worker of an earlier run is not adopted");
        } else {
            adopted += 1;
        }
        hold_allocations(shared, &record);
        let desc = Arc::new(record.description.clone().unwrap_or_default());
        let eff = crate::admission::effective(&desc, &shared.config.worker_defaults);
        let (tx, view) = fe::spawn_adopted(shared.clone(), desc.clone(), worker, record);
        let controlled = Controlled {
            description_bytes: prost::Message::encode_to_vec(&*desc).into(),
            description: desc,
            claim: Some(eff.claim),
            defaulted: eff.defaulted,
            tx,
            view,
        };
        registry.insert(id, FeSlot::Wanted(controlled));
    }
    if !registry.is_empty() {
        shared.workers.send_replace(Arc::new(registry));
    }
    adopted
}

/// The record's allocations without a result run on the worker: the
/// reconciler knows them, and so do the views.
fn hold_allocations(shared: &Shared, record: &WorkerRecord) {
    let fe_id = fe_id_of(record).to_string();
    let running: Vec<&pb::Allocation> = record
        .allocations
        .iter()
        .filter(|a| a.result.is_none())
        .filter_map(|a| a.allocation.as_ref())
        .collect();
    {
        let mut st = shared.state.lock();
        for a in &running {
            st.allocations.insert(
                a.allocation_id.clone().unwrap_or_default(),
                AllocEntry {
                    fe_id: fe_id.clone(),
                    function: function_label(a.function.as_ref()),
                    phase: AllocPhase::Queued,
                    timeline: vec![TimelineEntry::now(
                        "on a worker left by an earlier run: adopted with it",
                    )],
                },
            );
        }
    }
    let mut adopted = shared.adopted.lock();
    for a in running {
        adopted
            .allocations
            .push((a.allocation_id.clone().unwrap_or_default(), fe_id.clone()));
    }
}

/// The record's results wait for the first desired state; their
/// allocations are known (finished), so none is run again meanwhile.
fn hold_results(shared: &Shared, record: &WorkerRecord) {
    let fe_id = fe_id_of(record).to_string();
    let done: Vec<(&pb::Allocation, &pb::AllocationResult)> = record
        .allocations
        .iter()
        .filter_map(|a| Some((a.allocation.as_ref()?, a.result.as_ref()?)))
        .collect();
    if done.is_empty() {
        return;
    }
    {
        let mut st = shared.state.lock();
        for (a, _) in &done {
            st.allocations.insert(
                a.allocation_id.clone().unwrap_or_default(),
                AllocEntry {
                    fe_id: fe_id.clone(),
                    function: function_label(a.function.as_ref()),
                    phase: AllocPhase::Finished,
                    timeline: vec![TimelineEntry::now(
                        "finished in an earlier run; its result waits for the server",
                    )],
                },
            );
        }
    }
    let mut adopted = shared.adopted.lock();
    for (a, r) in done {
        let id = a.allocation_id.clone().unwrap_or_default();
        adopted.allocations.push((id, fe_id.clone()));
        adopted.results.push(r.clone());
    }
}

/// At the first pass: the results held since start whose allocations the
/// desired state still holds are sent (already metered by the run that
/// made them); the rest are dropped from the records.
pub(crate) fn release_results(shared: &Shared, desired: &crate::desired::Desired) {
    let held = std::mem::take(&mut shared.adopted.lock().results);
    if held.is_empty() {
        return;
    }
    let wanted: std::collections::HashSet<&str> = desired
        .allocations
        .iter()
        .filter_map(|a| a.allocation_id.as_deref())
        .collect();
    let mut taken = Vec::new();
    for r in held {
        let id = r.allocation_id.clone().unwrap_or_default();
        if wanted.contains(id.as_str()) {
            shared.event(
                "allocation_result_recovered",
                &id,
                "a result an earlier run had not yet delivered goes to the server",
            );
            shared.queue_result(r, 0);
        } else {
            taken.push(id);
        }
    }
    if let Some(store) = &shared.adoption {
        store.taken(&taken);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adoption::{AllocRecord, VERSION};
    use crate::testing_support::alloc;

    fn result(id: &str) -> pb::AllocationResult {
        pb::AllocationResult {
            allocation_id: Some(id.into()),
            ..Default::default()
        }
    }

    /// Results an earlier run kept (perhaps already taken by the server,
    /// which then no longer holds their allocations) go only where the
    /// first desired state still holds their allocation; the others leave
    /// the records. Meanwhile no pass runs them again: they are known.
    #[tokio::test]
    async fn kept_results_go_only_for_allocations_still_desired() {
        let data = tempfile::tempdir().expect("tmp");
        let shared = crate::testing_support::shared_with(|c| {
            c.adopt_workers = true;
            c.data_dir = data.path().to_path_buf();
        });
        let record = WorkerRecord {
            version: VERSION,
            description: Some(pb::FunctionExecutorDescription {
                id: Some("fe".into()),
                ..Default::default()
            }),
            gone: true,
            allocations: ["taken", "owed"]
                .into_iter()
                .map(|id| AllocRecord {
                    allocation: Some(alloc(id)),
                    result: Some(result(id)),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let store = shared.adoption.as_ref().expect("adoption on");
        store.adopt(record.clone());
        hold_results(&shared, &record);
        let held: Vec<String> = shared
            .adopted
            .lock()
            .allocations
            .iter()
            .map(|(a, _)| a.clone())
            .collect();
        assert_eq!(held, ["taken", "owed"], "known to the reconciler");
        let desired = crate::desired::Desired {
            function_executors: Vec::new(),
            allocations: vec![Arc::new(alloc("owed"))],
            clock: Some(1),
            function_call_results: Vec::new(),
        };
        release_results(&shared, &desired);
        let queued: Vec<String> = shared
            .state
            .lock()
            .results
            .iter()
            .filter_map(|p| p.result.allocation_id.clone())
            .collect();
        assert_eq!(queued, ["owed"]);
        // Taken again by the server, the last one empties the record.
        store.taken(&["owed".into()]);
        let (left, _) = crate::adoption::Store::new(data.path().join("adoption")).load();
        assert!(left.is_empty(), "{left:?}");
    }
}
