//! Frames at and near [`MAX_PAYLOAD`]: every record encodes to a frame
//! that reads back, exactly when it is within the bounds, cut in its names
//! (and only there) when it is not. `cargo xtask fuzz` runs the properties
//! with many more cases (`STEWARD_FUZZ_SEEDS` × 10).

use proptest::prelude::*;

use super::*;

fn base() -> UsageRecord {
    UsageRecord {
        kind: RecordKind::Allocation,
        id: "alloc-1".into(),
        function_executor_id: "fe-1".into(),
        namespace: "default".into(),
        application: "app".into(),
        function: "f".into(),
        started_unix_ms: 1_000,
        ended_unix_ms: 2_000,
        cpu_core_us: 7,
        memory_mb_ms: 11,
        peak_memory_bytes: 1 << 20,
        gpu_ms: Vec::new(),
        gpu_busy_ms: Vec::new(),
        cost_minor: Some(-3),
        outcome: "success".into(),
        ran: true,
        idle_ms: None,
    }
}

/// Cases per property: 64 under `cargo test`, `STEWARD_FUZZ_SEEDS` × 10
/// under `cargo xtask fuzz`.
fn cases() -> u32 {
    std::env::var("STEWARD_FUZZ_SEEDS")
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .map_or(64, |seeds| seeds.saturating_mul(10).max(64))
}

/// Pieces that JSON writes at different lengths: plain (1), quote and
/// backslash (2), control characters (6), multibyte characters.
const UNITS: [&str; 8] = ["a", "\"", "\\", "\u{1}", "\n", "é", "🦀", "b\u{7f}"];

/// A name of `unit` repeated: short, about the bound, or far past it.
fn name() -> impl Strategy<Value = String> {
    let count = prop_oneof![0usize..40, 1000usize..1100, 0usize..20_000];
    (proptest::sample::select(&UNITS[..]), count, "[a-z]{0,3}")
        .prop_map(|(unit, n, tail)| unit.repeat(n) + &tail)
}

fn gpus() -> impl Strategy<Value = Vec<(String, u64)>> {
    proptest::collection::vec((name(), any::<u64>()), 0..20)
}

fn record() -> impl Strategy<Value = UsageRecord> {
    (
        (name(), name(), name(), name(), name(), name()),
        (gpus(), gpus()),
        (
            any::<u64>(),
            any::<u64>(),
            any::<Option<i64>>(),
            any::<bool>(),
        ),
    )
        .prop_map(
            |((id, fe, ns, app, f, outcome), (gpu, busy), (n, m, cost, ran))| UsageRecord {
                id,
                function_executor_id: fe,
                namespace: ns,
                application: app,
                function: f,
                outcome,
                gpu_ms: gpu,
                gpu_busy_ms: busy,
                cpu_core_us: n,
                memory_mb_ms: m,
                ended_unix_ms: n,
                cost_minor: cost,
                ran,
                ..base()
            },
        )
}

/// A record within the name bounds whose JSON payload is exactly `target`
/// bytes: its GPU model names filled with `unit`, then plain letters to
/// land on the byte; `None` if `target` is out of reach.
fn record_of_size(target: usize, unit: &str) -> Option<UsageRecord> {
    let mut r = base();
    r.gpu_ms = (0..MAX_GPU_ENTRIES)
        .map(|i| (String::new(), i as u64))
        .collect();
    r.gpu_busy_ms = r.gpu_ms.clone();
    let mut left = target.checked_sub(payload_of(&r).len())?;
    let unit_json = serde_json::to_string(unit).ok()?.len() - 2;
    for (model, _) in r.gpu_ms.iter_mut().chain(r.gpu_busy_ms.iter_mut()) {
        while left >= unit_json && model.len() + unit.len() <= MAX_NAME_BYTES {
            model.push_str(unit);
            left -= unit_json;
        }
        while left > 0 && model.len() < MAX_NAME_BYTES {
            model.push('a');
            left -= 1;
        }
    }
    (left == 0).then_some(r)
}

fn gpu_total(list: &[(String, u64)]) -> u64 {
    list.iter().fold(0u64, |s, (_, ms)| s.saturating_add(*ms))
}

/// `got` is `want` cut only in its names.
fn cut_only_in_names(want: &UsageRecord, got: &UsageRecord) -> Result<(), TestCaseError> {
    if want.id.len() <= MAX_ID_BYTES {
        prop_assert_eq!(&got.id, &want.id);
    } else {
        let (head, hash) = got.id.rsplit_once('~').expect("a cut id ends in a hash");
        prop_assert!(want.id.starts_with(head) && hash.len() == 16);
        prop_assert!(got.id.len() <= MAX_ID_BYTES);
    }
    for (w, g) in names(want).iter().zip(names(got)) {
        prop_assert!(w.starts_with(g.as_str()) && g.len() <= MAX_NAME_BYTES);
    }
    prop_assert_eq!(gpu_total(&got.gpu_ms), gpu_total(&want.gpu_ms));
    prop_assert_eq!(gpu_total(&got.gpu_busy_ms), gpu_total(&want.gpu_busy_ms));
    prop_assert!(got.gpu_ms.len() <= MAX_GPU_ENTRIES);
    let numbers = |r: &UsageRecord| {
        (
            r.kind,
            r.started_unix_ms,
            r.ended_unix_ms,
            r.cpu_core_us,
            r.memory_mb_ms,
            r.peak_memory_bytes,
            r.cost_minor,
            r.ran,
            r.idle_ms,
        )
    };
    prop_assert_eq!(numbers(got), numbers(want));
    Ok(())
}

/// Encodes `r` and reads the frame back: what came back, and whether it
/// is `r` exactly.
fn round_trip(r: &UsageRecord) -> Result<(UsageRecord, bool), TestCaseError> {
    let frame = encode_frame(r);
    prop_assert!(frame.len() <= HEADER + MAX_PAYLOAD, "{} bytes", frame.len());
    let Some((got, len)) = decode_frame(&frame) else {
        return Err(TestCaseError::fail(format!(
            "an unreadable frame of {} bytes",
            frame.len()
        )));
    };
    prop_assert_eq!(len, frame.len());
    let mut fitted = r.clone();
    let cut = fit(&mut fitted);
    prop_assert_eq!(&got, &fitted, "the frame holds the record as fit cuts it");
    prop_assert!(!fit(&mut fitted), "fitting twice changes nothing");
    let exact = got == *r;
    prop_assert_eq!(exact, !cut);
    cut_only_in_names(r, &got)?;
    Ok((got, exact))
}

#[test]
fn a_payload_of_exactly_the_limit_round_trips_and_one_byte_more_is_cut() {
    for (delta, exact) in [(-1isize, true), (0, true), (1, false), (2, false)] {
        let target = MAX_PAYLOAD.saturating_add_signed(delta);
        let r = record_of_size(target, "\u{1}").expect("reachable");
        assert_eq!(payload_of(&r).len(), target);
        let (got, same) = round_trip(&r).expect("round trip");
        assert_eq!(same, exact, "payload of {target} bytes");
        if !exact {
            assert!(payload_of(&got).len() <= MAX_PAYLOAD);
        }
    }
}

#[test]
fn the_worst_record_fits_once_its_names_are_empty() {
    // Every name, the id and 40 GPU models at their longest in control
    // characters (sixfold in JSON), with the largest numbers.
    let long = "\u{1}".repeat(100_000);
    let gpus: Vec<(String, u64)> = (0..40).map(|_| (long.clone(), u64::MAX)).collect();
    let r = UsageRecord {
        id: long.clone(),
        function_executor_id: long.clone(),
        namespace: long.clone(),
        application: long.clone(),
        function: long.clone(),
        outcome: long.clone(),
        gpu_ms: gpus.clone(),
        gpu_busy_ms: gpus,
        started_unix_ms: u64::MAX,
        ended_unix_ms: u64::MAX,
        cpu_core_us: u64::MAX,
        memory_mb_ms: u64::MAX,
        peak_memory_bytes: u64::MAX,
        cost_minor: Some(i64::MIN),
        idle_ms: Some(u64::MAX),
        ..base()
    };
    let (got, exact) = round_trip(&r).expect("round trip");
    assert!(!exact);
    assert_eq!(got.gpu_ms.last().map(|g| g.1), Some(u64::MAX));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    /// Any record: its frame reads back, exactly when it is within the
    /// bounds, else cut in its names only.
    #[test]
    fn any_record_reads_back_exactly_or_cut_in_its_names(r in record()) {
        round_trip(&r)?;
    }

    /// Payloads within a few hundred bytes of the limit, in every kind of
    /// escaping: at or under it the record round-trips exactly, over it the
    /// record is cut and round-trips.
    #[test]
    fn payloads_near_the_limit_round_trip_or_are_cut(
        delta in -300isize..300,
        unit in proptest::sample::select(&UNITS[..]),
    ) {
        let target = MAX_PAYLOAD.saturating_add_signed(delta);
        if let Some(r) = record_of_size(target, unit) {
            let (_, exact) = round_trip(&r)?;
            prop_assert_eq!(exact, delta <= 0, "payload of {} bytes", target);
        }
    }
}
