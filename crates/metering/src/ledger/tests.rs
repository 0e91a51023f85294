use proptest::prelude::*;

use super::*;
use crate::record::{MAX_ID_BYTES, MAX_NAME_BYTES, MAX_PAYLOAD, RecordKind, encode_frame};
use crate::tmpfs_for_tests::Tmpfs;

/// A record for tests: every third a worker segment, the rest allocations.
pub(crate) fn record(i: u64) -> UsageRecord {
    UsageRecord {
        kind: if i.is_multiple_of(3) {
            RecordKind::WorkerSegment
        } else {
            RecordKind::Allocation
        },
        id: format!("alloc-{i}"),
        function_executor_id: format!("fe-{}", i % 4),
        namespace: "default".into(),
        application: "app".into(),
        function: format!("f{}", i % 5),
        started_unix_ms: 1_000 * i,
        ended_unix_ms: 1_000 * i + 250,
        cpu_core_us: 7 * i,
        memory_mb_ms: 11 * i,
        peak_memory_bytes: 1 << 20,
        gpu_ms: vec![("H100".into(), i)],
        cost_minor: Some(i as i64),
        outcome: "success".into(),
        ran: true,
        idle_ms: None,
        gpu_busy_ms: Vec::new(),
    }
}

fn config(dir: &Path) -> LedgerConfig {
    LedgerConfig::new(dir.to_path_buf())
}

#[test]
fn records_survive_a_reopen_and_are_never_counted_twice() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mut l, r) = Ledger::open(config(tmp.path())).expect("open");
    assert_eq!(
        r,
        Recovery {
            segments: 1,
            ..Recovery::default()
        }
    );
    for i in 0..10 {
        assert!(l.append(&record(i)).expect("append"));
    }
    drop(l);
    let (mut l, r) = Ledger::open(config(tmp.path())).expect("reopen");
    assert_eq!(r.records, 10);
    // The same allocation again after a restart: not a second record.
    assert!(!l.append(&record(3)).expect("append"));
    assert_eq!(l.records().expect("read").len(), 10);
}

#[test]
fn a_torn_last_write_is_cut_and_the_next_record_follows_intact_ones() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mut l, _) = Ledger::open(config(tmp.path())).expect("open");
    for i in 0..3 {
        l.append(&record(i)).expect("append");
    }
    let used = l.position().offset;
    drop(l);
    let path = segment_path(tmp.path(), 0);
    // Half a frame where the next one goes, before the preallocated zeros.
    let frame = encode_frame(&record(3));
    let f = OpenOptions::new().write(true).open(&path).expect("open");
    std::os::unix::fs::FileExt::write_all_at(&f, &frame[..frame.len() / 2], used)
        .expect("torn write");
    drop(f);
    let (mut l, r) = Ledger::open(config(tmp.path())).expect("reopen");
    assert_eq!(
        (r.records, r.truncated_bytes),
        (3, (frame.len() / 2) as u64)
    );
    assert!(l.append(&record(3)).expect("append"));
    let ids: Vec<String> = l
        .records()
        .expect("read")
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(ids, ["alloc-0", "alloc-1", "alloc-2", "alloc-3"]);
}

#[test]
fn segments_rotate_and_the_oldest_go_past_the_bound() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let frame = encode_frame(&record(1)).len() as u64;
    let cfg = LedgerConfig {
        dir: tmp.path().to_path_buf(),
        segment_bytes: frame * 3,
        max_total_bytes: frame * 7,
        id_window: ID_WINDOW,
    };
    let (mut l, _) = Ledger::open(cfg.clone()).expect("open");
    for i in 0..20 {
        l.append(&record(i)).expect("append");
    }
    let files = std::fs::read_dir(tmp.path()).expect("dir").count();
    assert!(files <= 3, "{files} segments");
    let kept = l.records().expect("read");
    assert!(kept.len() <= 7 && kept.last().map(|r| r.id.as_str()) == Some("alloc-19"));
    drop(l);
    let (_, r) = Ledger::open(cfg).expect("reopen");
    assert_eq!(r.records, kept.len());
}

#[test]
fn a_start_reads_only_the_newest_segments_that_fill_the_id_window() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let frame = encode_frame(&record(1)).len() as u64;
    let cfg = LedgerConfig {
        segment_bytes: frame * 2,
        id_window: 3,
        ..config(tmp.path())
    };
    let (mut l, _) = Ledger::open(cfg.clone()).expect("open");
    for i in 0..10 {
        l.append(&record(i)).expect("append");
    }
    drop(l);
    let (mut l, r) = Ledger::open(cfg).expect("reopen");
    let files = std::fs::read_dir(tmp.path()).expect("dir").count();
    // Ten records were written; a start reads only enough for three ids.
    assert!((3..10).contains(&r.records), "read past the window: {r:?}");
    assert_eq!(r.segments, files, "{r:?}");
    // The newest ids are still refused a second record.
    assert!(!l.append(&record(9)).expect("append"));
    assert!(l.append(&record(10)).expect("append"));
}

#[test]
fn a_record_past_the_frame_limit_is_written_cut_and_reads_back() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mut l, _) = Ledger::open(config(tmp.path())).expect("open");
    let mut big = record(1);
    big.function = "f".repeat(2 * MAX_PAYLOAD);
    big.id = format!("{}-1", "x".repeat(1000));
    let mut twin = big.clone();
    twin.id = format!("{}-2", "x".repeat(1000));
    assert_eq!(
        l.append_batch(&[big.clone(), twin]).expect("append"),
        [true, true]
    );
    assert_eq!(l.records_cut(), 2);
    let got = l.records().expect("read");
    assert_eq!(got.len(), 2, "both read back, their cut ids distinct");
    assert_eq!(got[0].function.len(), MAX_NAME_BYTES);
    assert!(got[0].id.len() <= MAX_ID_BYTES && got[0].id != got[1].id);
    assert_eq!(got[0].cpu_core_us, big.cpu_core_us);
    drop(l);
    // After a restart the same long id is still refused a second record.
    let (mut l, r) = Ledger::open(config(tmp.path())).expect("reopen");
    assert_eq!(r.records, 2);
    assert!(!l.append(&big).expect("append"));
}

#[test]
fn a_write_to_a_full_disk_leaves_nothing_and_its_retry_writes_each_record_once() {
    let disk = Tmpfs::mount(2 << 20);
    let dir = disk.path().join("usage");
    let (mut l, _) = Ledger::open(config(&dir)).expect("open");
    assert!(l.append(&record(0)).expect("append"));
    let before = l.position();
    disk.fill();
    // More than the preallocated megabyte holds: the ledger must grow.
    let batch: Vec<UsageRecord> = (1..4000).map(record).collect();
    let e = l.append_batch(&batch).expect_err("the disk is full");
    assert!(e.error.to_string().contains("No space left"), "{}", e.error);
    assert!(e.written.iter().all(|w| !w), "nothing of it recorded");
    assert_eq!(l.position(), before);
    assert_eq!(
        read_records(&dir).expect("read").len(),
        1,
        "no frame left behind"
    );
    disk.free();
    assert!(
        l.append_batch(&batch)
            .expect("space again")
            .iter()
            .all(|w| *w)
    );
    let ids: Vec<String> = read_records(&dir)
        .expect("read")
        .into_iter()
        .map(|r| r.id)
        .collect();
    let want: Vec<String> = (0..4000).map(|i| format!("alloc-{i}")).collect();
    assert_eq!(ids, want, "every record once, in order");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any truncation and any flipped bytes: opening never panics and never
    /// invents a record (every one recovered was written); a pure
    /// truncation recovers a prefix.
    #[test]
    fn damage_never_panics_or_invents(
        n in 1u64..12,
        cut in proptest::option::of(0usize..6000),
        flips in proptest::collection::vec((0usize..6000, 1u8..=255), 0..4),
    ) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (mut l, _) = Ledger::open(config(tmp.path())).expect("open");
        let written: Vec<UsageRecord> = (0..n).map(record).collect();
        for r in &written {
            l.append(r).expect("append");
        }
        drop(l);
        let path = segment_path(tmp.path(), 0);
        let mut bytes = std::fs::read(&path).expect("read");
        if let Some(c) = cut {
            bytes.truncate(c.min(bytes.len()));
        }
        let len = bytes.len();
        for (at, x) in &flips {
            if len > 0 {
                bytes[at % len] ^= x;
            }
        }
        std::fs::write(&path, &bytes).expect("write");
        let (l, _) = Ledger::open(config(tmp.path())).expect("reopen");
        let got = l.records().expect("records");
        for r in &got {
            prop_assert!(written.contains(r), "invented {r:?}");
        }
        if flips.is_empty() {
            prop_assert_eq!(&got[..], &written[..got.len()]);
        }
    }

    #[test]
    fn frames_round_trip(i in 0u64..1_000_000, junk in proptest::collection::vec(any::<u8>(), 0..64)) {
        let r = record(i);
        let mut bytes = encode_frame(&r);
        let len = bytes.len();
        bytes.extend_from_slice(&junk);
        prop_assert_eq!(decode_frame(&bytes), Some((r, len)));
        prop_assert!(decode_frame(&junk).is_none() || junk.starts_with(&MAGIC));
    }
}
