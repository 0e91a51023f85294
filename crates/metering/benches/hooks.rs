//! What metering costs the agent's own threads per allocation: the start
//! and finish hooks (a reading of the worker, the meter, the priced record
//! queued), on a worker whose probe `pread`s two small files as a cgroup
//! probe does. The thread's commits run meanwhile, as in the agent.
//! Run: `cargo bench -p steward-metering`.

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use prometheus_client::registry::Registry;
use steward_metering::{FinishedAllocation, Probe, Reading, Recorder, RecorderConfig, WorkerInfo};

/// Two kept-open files read with `pread`, like a worker's cgroup counters.
struct FileProbe {
    cpu: std::fs::File,
    memory: std::fs::File,
}

impl Probe for FileProbe {
    fn read(&self) -> Option<Reading> {
        let mut buf = [0u8; 32];
        let n = self.cpu.read_at(&mut buf, 0).ok()?;
        let cpu_usec = std::str::from_utf8(&buf[..n]).ok()?.trim().parse().ok()?;
        let n = self.memory.read_at(&mut buf, 0).ok()?;
        let memory_bytes = std::str::from_utf8(&buf[..n]).ok()?.trim().parse().ok()?;
        Some(Reading {
            cpu_usec,
            memory_bytes,
        })
    }
}

fn hooks(c: &mut Criterion) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = |name: &str, text: &str| {
        let path = tmp.path().join(name);
        std::fs::write(&path, text).expect("write");
        std::fs::File::open(path).expect("open")
    };
    let probe = Arc::new(FileProbe {
        cpu: file("cpu", "123456789\n"),
        memory: file("memory", "52428800\n"),
    });
    let mut config = RecorderConfig::new(tmp.path());
    config.group_commit = Duration::from_millis(20);
    let rec = Recorder::start(config, &mut Registry::default())
        .expect("start")
        .0;
    rec.worker_started(
        WorkerInfo {
            fe_id: "worker".into(),
            namespace: "namespace".into(),
            application: "application".into(),
            function: "function".into(),
            ..WorkerInfo::default()
        },
        probe,
    );
    // Another allocation keeps running, as under load.
    rec.allocation_started("worker", "long");
    let mut n = 0u64;
    c.bench_function("allocation_started_and_finished", |b| {
        b.iter(|| {
            n += 1;
            let id = format!("allocation-{n}");
            rec.allocation_started("worker", &id);
            rec.allocation_finished(FinishedAllocation {
                alloc_id: id,
                fe_id: "worker".into(),
                namespace: "namespace".into(),
                application: "application".into(),
                function: "function".into(),
                outcome: "success".into(),
                ran: true,
            })
        })
    });
    rec.stop(Duration::from_secs(5));
}

criterion_group!(benches, hooks);
criterion_main!(benches);
