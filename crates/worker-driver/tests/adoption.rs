//! Adoption against real processes: a worker started for adoption outlives
//! the driver that let go of it and is taken over, same pid, by a new
//! driver on the same directories; a record whose pid now belongs to
//! another process (a reused pid) is neither adopted nor signalled; a
//! worker that died meanwhile is reported gone; without adoption a worker
//! still dies with its driver's handle.

use std::path::Path;
use std::time::Duration;

use steward_worker_driver::{
    AdoptError, CgroupSetup, Isolation, Limits, ProcessDriver, ProcessDriverConfig, WorkerDriver,
    WorkerSpec,
};

fn driver(dir: &Path, adoptable: bool) -> ProcessDriver {
    ProcessDriver::new(ProcessDriverConfig {
        records_dir: dir.join("workers"),
        cgroups: CgroupSetup::Unavailable("not what these tests are about".into()),
        isolation: Isolation::unseparated(&dir.join("run"), "not what these tests are about"),
        adoptable,
    })
}

/// A worker that sleeps: `sh -c 'exec sleep 600' sh --address <addr>`.
fn spec(dir: &Path, id: &str) -> WorkerSpec {
    WorkerSpec {
        id: id.into(),
        program: "/bin/sh".into(),
        args: vec!["-c".into(), "exec sleep 600".into(), "sh".into()],
        env: Vec::new(),
        log_path: dir.join(format!("{id}.log")),
        limits: Limits {
            cpu_ms_per_sec: 1000,
            memory_bytes: 1 << 30,
            pids_max: 64,
        },
    }
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, r)| r.trim_start().chars().next())
        })
        .is_some_and(|state| state != 'Z')
}

/// Waits (bounded) until `pid` is gone; whether it is.
async fn gone(pid: u32) -> bool {
    for _ in 0..500 {
        if !alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    !alive(pid)
}

fn kill(pid: u32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
}

#[tokio::test]
async fn a_detached_worker_is_adopted_by_the_next_driver_with_its_pid() {
    let tmp = tempfile::tempdir().expect("tmp");
    let first = driver(tmp.path(), true);
    let worker = first.start(spec(tmp.path(), "w1")).await.expect("start");
    let pid = worker.pid();
    let address = worker.address().to_string();
    assert!(worker.detach(), "an adoptable worker is let go of alive");
    first.shutdown();
    drop(first);
    assert!(alive(pid), "the worker outlives its driver");

    let second = driver(tmp.path(), true);
    let mut adopted = second.adopt("w1").expect("adopted");
    assert_eq!(adopted.pid(), pid);
    assert_eq!(adopted.address(), address);
    assert!(adopted.try_exit().is_none());
    // The sweep at start spares it: its record and directory stay.
    let found = second.reap_leftovers();
    assert!(found.iter().all(|l| l.processes_killed == 0), "{found:?}");
    assert!(alive(pid), "the sweep spared the adopted worker");
    // Its end is seen through the pidfd (it is not the driver's child).
    kill(pid);
    let exit = tokio::time::timeout(Duration::from_secs(10), adopted.exited())
        .await
        .expect("the exit of an adopted worker is seen");
    assert!(exit.description.contains("adopted"), "{}", exit.description);
    drop(adopted);
    second.shutdown();
    assert!(
        !tmp.path().join("workers/w1").exists(),
        "its record went with it"
    );
}

#[tokio::test]
async fn a_record_whose_pid_was_reused_is_neither_adopted_nor_signalled() {
    let tmp = tempfile::tempdir().expect("tmp");
    let first = driver(tmp.path(), true);
    let worker = first.start(spec(tmp.path(), "w2")).await.expect("start");
    let pid = worker.pid();
    assert!(worker.detach());
    drop(first);
    // The recorded start time no longer matches the process with that pid:
    // as if the worker had died and its pid been given to another process.
    let path = tmp.path().join("workers/w2");
    let text = std::fs::read_to_string(&path).expect("record");
    let forged: String = text
        .lines()
        .map(|l| match l.strip_prefix("start ") {
            Some(t) => format!("start {}\n", t.parse::<u64>().expect("ticks") + 1),
            None => format!("{l}\n"),
        })
        .collect();
    std::fs::write(&path, forged).expect("write");
    let second = driver(tmp.path(), true);
    let e = second.adopt("w2").err().expect("not adopted");
    assert!(matches!(e, AdoptError::NotTheWorker(_)), "{e}");
    assert!(e.to_string().contains("reused"), "{e}");
    let found = second.reap_leftovers();
    assert!(
        found
            .iter()
            .any(|l| l.skipped.as_deref().is_some_and(|s| s.contains("reused"))),
        "{found:?}"
    );
    assert!(
        alive(pid),
        "the process with the reused pid was not signalled"
    );
    kill(pid);
    assert!(gone(pid).await);
}

#[tokio::test]
async fn a_worker_that_died_meanwhile_is_reported_gone() {
    let tmp = tempfile::tempdir().expect("tmp");
    let first = driver(tmp.path(), true);
    let worker = first.start(spec(tmp.path(), "w3")).await.expect("start");
    let pid = worker.pid();
    assert!(worker.detach());
    drop(first);
    kill(pid);
    assert!(gone(pid).await);
    let second = driver(tmp.path(), true);
    let e = second.adopt("w3").err().expect("not adopted");
    assert!(matches!(e, AdoptError::Gone(p) if p == pid), "{e}");
    second.reap_leftovers();
    assert!(
        !tmp.path().join("workers/w3").exists(),
        "the sweep took its record"
    );
}

#[tokio::test]
async fn without_adoption_a_worker_cannot_be_let_go_of() {
    let tmp = tempfile::tempdir().expect("tmp");
    let d = driver(tmp.path(), false);
    let worker = d.start(spec(tmp.path(), "w4")).await.expect("start");
    let pid = worker.pid();
    assert!(!worker.detach(), "stopped instead");
    assert!(gone(pid).await, "the worker died with its handle");
    let e = driver(tmp.path(), false)
        .adopt("w4")
        .err()
        .expect("nothing to adopt");
    assert!(matches!(e, AdoptError::Record(_)), "{e}");
    d.shutdown();
}
