//! The process driver on this machine's real cgroups (v1 or v2, whichever
//! it has). Without cgroup access (not root, no delegation) each test says
//! so and checks that the driver still starts workers, unconfined.

use std::path::Path;
use std::time::Duration;

use steward_worker_driver::{
    CgroupSetup, Cgroups, ChannelKind, EnvAllow, IdentitySetup, Isolation, Limits, ProcessDriver,
    ProcessDriverConfig, WorkerDriver, WorkerSpec,
};

fn spec(dir: &Path, id: &str, script: &str, limits: Limits) -> WorkerSpec {
    WorkerSpec {
        id: id.into(),
        program: "/bin/sh".into(),
        // The driver appends `--address <addr>`: it becomes $0 and $1.
        args: vec!["-c".into(), script.into()],
        env: Vec::new(),
        log_path: dir.join(format!("{id}.log")),
        limits,
    }
}

/// A driver with a parent cgroup of its own (tests run side by side).
fn driver(dir: &Path, test: &str) -> (ProcessDriver, Option<String>) {
    let parent = format!("steward-driver-test-{}-{test}", std::process::id());
    let setup = Cgroups::detect(&parent);
    let why = match &setup {
        CgroupSetup::Unavailable(why) => Some(why.clone()),
        CgroupSetup::Enabled(_) => None,
    };
    let d = ProcessDriver::new(ProcessDriverConfig {
        records_dir: dir.join("workers"),
        cgroups: setup,
        isolation: Isolation::unseparated(&dir.join("run"), "not what these tests are about"),
        adoptable: false,
    });
    (d, why)
}

/// Uid (directory) leases are per process: a test adopting a worker takes
/// its lease again, which a test starting workers beside it could take.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const LIMITS: Limits = Limits {
    cpu_ms_per_sec: 500,
    memory_bytes: 64 << 20,
    pids_max: 32,
};

#[tokio::test]
async fn a_worker_is_confined_from_its_first_instruction_and_its_cgroup_goes_with_it() {
    let _serial = SERIAL.lock().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let (driver, unavailable) = driver(tmp.path(), "confined");
    // The script reads its own cgroup membership as its first act.
    let mut w = driver
        .start(spec(
            tmp.path(),
            "confined",
            "cat /proc/self/cgroup; exec sleep 30",
            LIMITS,
        ))
        .await
        .expect("start");
    if let Some(why) = unavailable {
        eprintln!("cgroups unavailable here ({why}); checked unconfined start only");
        w.stop(Duration::ZERO).await;
        return;
    }
    let enforcement = driver.enforcement();
    assert!(enforcement.memory, "{enforcement:?}");
    let log = tmp.path().join("confined.log");
    let mut text = String::new();
    for _ in 0..500 {
        text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("fe-confined.") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(text.contains("/fe-confined."), "first output: {text}");
    let limits = w.monitor().limits().expect("limits enforced");
    assert_eq!(limits, LIMITS);
    let usage = w.monitor().usage().expect("usage");
    assert!(usage.memory_current_bytes > 0, "{usage:?}");
    let parents = enforcement.cgroup_parents.clone();
    let dirs = |p: &std::path::PathBuf| {
        std::fs::read_dir(p)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("fe-confined."))
            .count()
    };
    assert!(parents.iter().all(|p| dirs(p) == 1));
    let exit = w.stop(Duration::from_secs(1)).await.expect("stopped");
    assert_eq!(exit.oom, None);
    assert!(
        parents.iter().all(|p| dirs(p) == 0),
        "worker cgroup removed after stop"
    );
    driver.shutdown();
    assert!(
        parents.iter().all(|p| !p.exists()),
        "parent removed at shutdown"
    );
}

#[tokio::test]
async fn a_worker_past_its_memory_limit_is_reported_oom_by_its_cgroup() {
    let _serial = SERIAL.lock().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let (driver, unavailable) = driver(tmp.path(), "oom");
    if let Some(why) = unavailable {
        eprintln!("cgroups unavailable here ({why}); nothing to check");
        return;
    }
    // `tail` buffers the one endless line of /dev/zero in memory.
    let mut w = driver
        .start(spec(tmp.path(), "hog", "exec tail /dev/zero", LIMITS))
        .await
        .expect("start");
    let exit = tokio::time::timeout(Duration::from_secs(60), w.exited())
        .await
        .expect("the kernel stops it");
    let oom = exit.oom.expect("reported as OOM");
    assert!(oom.contains(&(64u64 << 20).to_string()), "{oom}");
    driver.shutdown();
}

#[tokio::test]
async fn leftovers_of_a_vanished_agent_are_killed_and_removed() {
    let _serial = SERIAL.lock().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let (driver, unavailable) = driver(tmp.path(), "leftovers");
    if let Some(why) = unavailable {
        eprintln!("cgroups unavailable here ({why}); nothing to check");
        return;
    }
    let w = driver
        .start(spec(tmp.path(), "orphan", "exec sleep 30", LIMITS))
        .await
        .expect("start");
    let pid = w.pid();
    // The agent vanishes without cleaning up: forget the worker.
    std::mem::forget(w);
    let found = driver.reap_leftovers();
    assert!(
        found.iter().any(|l| l.kind == "cgroup"
            && l.worker.starts_with("fe-orphan.")
            && l.processes_killed == 1),
        "{found:?}"
    );
    assert!(
        found
            .iter()
            .any(|l| l.kind == "process group" && l.worker == "orphan")
    );
    // Killed (a zombie until reaped, as the forgotten handle never waits).
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(state.is_empty() || state.contains(") Z"), "{state}");
    driver.shutdown();
    assert!(
        driver
            .enforcement()
            .cgroup_parents
            .iter()
            .all(|p| !p.exists())
    );
}

#[tokio::test]
async fn an_abandoned_start_leaves_no_process_and_no_cgroup() {
    let _serial = SERIAL.lock().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let (driver, _) = driver(tmp.path(), "abandoned");
    let parents = driver.enforcement().cgroup_parents;
    for i in 0..5 {
        // A start dropped while its spawn is queued or running (a worker
        // removed while starting, an agent stopping).
        let mut start = driver.start(spec(
            tmp.path(),
            &format!("abandoned{i}"),
            "exec sleep 31.7",
            LIMITS,
        ));
        let _ = futures::poll!(&mut start);
        drop(start);
    }
    // Shutdown waits for spawns in flight, then cleans up under the parent.
    driver.shutdown();
    assert!(parents.iter().all(|p| !p.exists()), "{parents:?}");
    let sleepers: Vec<u32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            cmd.windows(4).any(|w| w == b"31.7") && !stat.contains(") Z")
        })
        .collect();
    assert!(
        sleepers.is_empty(),
        "workers of abandoned starts live: {sleepers:?}"
    );
}

/// Two Stewards (two executor ids) share a parent cgroup: a worker the
/// first let go of alive (for its next run to adopt) carries the name of a
/// dead Steward's pid, yet the second neither sweeps it at its start nor
/// at its stop; the first's next run adopts it.
#[tokio::test]
async fn another_stewards_worker_under_a_shared_parent_is_spared_for_its_adoption() {
    let _serial = SERIAL.lock().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let parent = format!("steward-driver-test-{}-shared", std::process::id());
    // Whatever the test's end, nothing of it stays.
    let _cleanup = RemoveParent(parent.clone());
    let make = |executor: &str| {
        ProcessDriver::new(ProcessDriverConfig {
            records_dir: tmp.path().join(executor).join("workers"),
            cgroups: Cgroups::detect(&parent),
            isolation: Isolation::new(
                &tmp.path().join("run"),
                executor,
                IdentitySetup::NotSeparated("not what this test is about".into()),
                ChannelKind::Unix,
                EnvAllow::default(),
            ),
            adoptable: true,
        })
    };
    let a = make("executor-a");
    if a.enforcement().cgroup_version.is_none() {
        eprintln!("cgroups unavailable here; nothing to check");
        return;
    }
    let w = a
        .start(spec(tmp.path(), "kept", "exec sleep 30", LIMITS))
        .await
        .expect("start");
    let pid = w.pid();
    assert!(w.detach(), "let go of alive");
    a.shutdown();
    let alive =
        || std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z"));
    let b = make("executor-b");
    let found = b.reap_leftovers();
    assert!(found.iter().all(|l| l.processes_killed == 0), "{found:?}");
    b.shutdown();
    assert!(alive(), "another Steward's worker survived its sweeps");
    let a_again = make("executor-a");
    let mut adopted = a_again.adopt("kept").expect("adopted by its own Steward");
    assert_eq!(adopted.pid(), pid);
    adopted.stop(Duration::ZERO).await;
    a_again.shutdown();
    assert!(!alive());
}

/// Kills and removes everything under a test's parent cgroup when dropped.
struct RemoveParent(String);

impl Drop for RemoveParent {
    fn drop(&mut self) {
        if let CgroupSetup::Enabled(c) = Cgroups::detect(&self.0) {
            c.reap_leftovers();
            c.remove_parents();
        }
    }
}
