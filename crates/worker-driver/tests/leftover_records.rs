//! The start-up reap of worker records (`<data dir>/workers/`) against
//! real processes of this test's own: a record is acted on only when it is
//! this boot's, names the group's leader by its start time and, where it
//! names a cgroup, the members sit in it. Everything else is skipped with
//! the reason and its processes live on.

use std::os::unix::process::CommandExt;
use std::path::Path;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use steward_worker_driver::{
    CgroupSetup, Isolation, Leftover, ProcessDriver, ProcessDriverConfig, WorkerDriver,
};

/// A process group of this test's own (`sh -c <script>` as its leader),
/// killed on drop.
struct Group(std::process::Child);

impl Group {
    fn start(script: &str) -> Group {
        let child = std::process::Command::new("sh")
            .args(["-c", script])
            .process_group(0)
            .spawn()
            .expect("spawn");
        Group(child)
    }

    fn pgid(&self) -> u32 {
        self.0.id()
    }

    /// The leader's start time (field 22 of /proc/<pid>/stat).
    fn start_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pgid())).expect("stat");
        let rest = stat.rsplit_once(')').expect("stat").1;
        rest.split_whitespace()
            .nth(19)
            .and_then(|s| s.parse().ok())
            .expect("start time")
    }

    /// Live (not zombie) members of the group.
    fn members(&self) -> Vec<u32> {
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let Some((_, rest)) = stat.rsplit_once(')') else {
                    return false;
                };
                let f: Vec<&str> = rest.split_whitespace().collect();
                f.first() != Some(&"Z") && f.get(2) == Some(&self.pgid().to_string().as_str())
            })
            .collect()
    }

    /// Waits (bounded) until the group has `n` live members.
    fn wait_members(&self, n: usize) -> Vec<u32> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let m = self.members();
            if m.len() == n || std::time::Instant::now() >= deadline {
                return m;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if let Ok(pgid) = i32::try_from(self.pgid()) {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .expect("boot id")
        .trim()
        .to_string()
}

fn record(pgid: u32, start: u64, boot: &str, cgroup: Option<&str>) -> String {
    let mut text = format!("steward-worker-record 2\npgid {pgid}\nstart {start}\nboot {boot}\n");
    if let Some(c) = cgroup {
        text.push_str(&format!("cgroup {c}\n"));
    }
    text
}

/// Reaps with a driver whose records are `records` (name, text), without cgroups.
fn reap(dir: &Path, records: &[(&str, String)]) -> Vec<Leftover> {
    let workers = dir.join("workers");
    std::fs::create_dir_all(&workers).expect("mkdir");
    for (name, text) in records {
        std::fs::write(workers.join(name), text).expect("write");
    }
    let driver = ProcessDriver::new(ProcessDriverConfig {
        records_dir: workers,
        cgroups: CgroupSetup::Unavailable("not needed here".into()),
        isolation: Isolation::unseparated(&dir.join("run"), "not needed here"),
        adoptable: false,
    });
    driver.reap_leftovers()
}

fn skipped_because(found: &[Leftover], worker: &str) -> String {
    found
        .iter()
        .find(|l| l.worker == worker)
        .and_then(|l| l.skipped.clone())
        .unwrap_or_else(|| panic!("{worker} not skipped: {found:?}"))
}

#[test]
fn a_record_that_does_not_prove_the_group_is_the_workers_is_never_signalled() {
    let mut other_boot = boot_id();
    let digit = if other_boot.starts_with('0') {
        "1"
    } else {
        "0"
    };
    other_boot.replace_range(0..1, digit);
    // (name, the record written for the group and this boot, the reason it is skipped)
    type Case = (&'static str, fn(&Group, &str) -> String, &'static str);
    let cases: [Case; 3] = [
        // The format of an older Steward: "<pgid> <start>", right in both.
        (
            "old",
            |g, _| format!("{} {}\n", g.pgid(), g.start_ticks()),
            "older Steward",
        ),
        (
            "other-boot",
            |g, boot| record(g.pgid(), g.start_ticks(), boot, None),
            "another boot",
        ),
        (
            "reused",
            |g, _| record(g.pgid(), g.start_ticks() + 1, &boot_id(), None),
            "reused",
        ),
    ];
    for (name, text, why) in cases {
        let tmp = tempfile::tempdir().expect("tempdir");
        let g = Group::start("exec sleep 300");
        let found = reap(tmp.path(), &[(name, text(&g, &other_boot))]);
        let skipped = skipped_because(&found, name);
        assert!(skipped.contains(why), "{name}: {skipped}");
        assert_eq!(g.members(), [g.pgid()], "{name}: the group was signalled");
    }
}

#[test]
fn members_outside_the_recorded_cgroup_are_spared() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let g = Group::start("exec sleep 300");
    let text = record(g.pgid(), g.start_ticks(), &boot_id(), Some("fe-w1.1-0"));
    let found = reap(tmp.path(), &[("w1", text)]);
    let l = found.iter().find(|l| l.worker == "w1").expect("w1");
    assert_eq!(l.processes_killed, 0, "{found:?}");
    assert_eq!(g.members(), [g.pgid()], "the group was signalled");
}

#[test]
fn a_verified_record_kills_its_whole_group() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // A leader and a process it forked, which stays in its group.
    let g = Group::start("sleep 300 & exec sleep 301");
    assert_eq!(g.wait_members(2).len(), 2);
    let text = record(g.pgid(), g.start_ticks(), &boot_id(), None);
    let found = reap(tmp.path(), &[("w1", text)]);
    let l = found.iter().find(|l| l.worker == "w1").expect("w1");
    assert_eq!(
        (l.kind, l.processes_killed, &l.skipped),
        ("process group", 2, &None)
    );
    assert_eq!(g.wait_members(0), Vec::<u32>::new());
}
