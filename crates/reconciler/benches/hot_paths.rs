//! The agent's hot paths on synthetic state (no processes, no server):
//! state hash and report assembly with 500 workers, the desired-state diff
//! at 1,000 workers / 10,000 allocations, `/state` snapshots with 500
//! workers / 10,000 allocations, and metrics encoding.
//! Run: `cargo bench -p steward-reconciler --features testing`.

use criterion::{Criterion, criterion_group, criterion_main};
use steward_reconciler::state_hash;
use steward_reconciler::testing::{DesiredDecoder, Synthetic};

fn hot_paths(c: &mut Criterion) {
    let s = Synthetic::new(500, 10_000, 100);
    let state = s.executor_state();
    c.bench_function("state_hash/500_workers", |b| {
        b.iter(|| state_hash(std::hint::black_box(&state)))
    });
    c.bench_function("report_assembly/500_workers_100_results", |b| {
        b.iter(|| s.build_report())
    });
    c.bench_function("state_snapshot_json/500_workers_10k_allocations", |b| {
        b.iter(|| serde_json::to_vec(&s.handle.snapshot()).map(|v| v.len()))
    });
    c.bench_function("events_json/1000_events", |b| {
        b.iter(|| serde_json::to_vec(&s.handle.events()).map(|v| v.len()))
    });
    c.bench_function("metrics_encode", |b| {
        b.iter(|| s.handle.metrics().encode().len())
    });

    let big = Synthetic::new(1_000, 10_000, 0);
    let desired = big.received();
    c.bench_function("desired_state_diff/1000_workers_10k_allocations", |b| {
        b.iter(|| big.apply(&desired))
    });

    // What the stream does with each message: prost decodes all of it; the
    // incremental decoder only what changed (here, nothing but the clock).
    let raw: bytes::Bytes = prost::Message::encode_to_vec(&*big.desired).into();
    c.bench_function(
        "desired_state_decode/prost_whole/1000_workers_10k_allocations",
        |b| {
            b.iter(|| {
                <steward_reconciler::pb::DesiredExecutorState as prost::Message>::decode(
                    raw.clone(),
                )
                .map(|d| d.allocations.len())
            })
        },
    );
    let mut decoder = DesiredDecoder::default();
    decoder.decode(raw.clone());
    c.bench_function(
        "desired_state_decode/incremental_repeat/1000_workers_10k_allocations",
        |b| b.iter(|| decoder.decode(raw.clone())),
    );
}

criterion_group!(benches, hot_paths);
criterion_main!(benches);
