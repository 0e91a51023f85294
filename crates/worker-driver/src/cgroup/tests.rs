//! Detection and worker cgroups over simulated hierarchies: directories in
//! a temp dir laid out as the kernel lays them out, with the mountinfo and
//! `/proc/self/cgroup` texts of hosts of each kind. (The machine's real
//! cgroups are exercised by the agent's integration tests.)

use super::*;

fn limits() -> Limits {
    Limits {
        cpu_ms_per_sec: 500,
        memory_bytes: 128 << 20,
        pids_max: 64,
    }
}

fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn enabled(setup: CgroupSetup) -> std::sync::Arc<Cgroups> {
    match setup {
        CgroupSetup::Enabled(c) => c,
        CgroupSetup::Unavailable(why) => panic!("unavailable: {why}"),
    }
}

/// A systemd host with only the unified hierarchy; Steward runs in its service's cgroup.
#[test]
fn v2_parent_under_own_cgroup_gets_the_controllers() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mnt = tmp.path().join("cg");
    let own = mnt.join("system.slice/steward.service");
    fs::create_dir_all(&own).expect("mkdir");
    fs::write(
        own.join("cgroup.controllers"),
        "cpuset cpu io memory hugetlb pids rdma misc\n",
    )
    .expect("write");
    let sources = Sources {
        mountinfo: format!(
            "35 24 0:30 / {} rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate\n",
            mnt.display()
        ),
        self_cgroup: "0::/system.slice/steward.service\n".into(),
    };
    let cg = enabled(Cgroups::detect_from(&sources, "steward"));
    assert_eq!(cg.version(), CgroupVersion::V2);
    let parent = own.join("steward");
    assert_eq!(cg.parents(), vec![parent.clone()]);
    // Handed down from Steward's own cgroup to the parent, and from the parent to workers.
    assert_eq!(
        read(&own.join("cgroup.subtree_control")),
        "+cpu +memory +pids"
    );
    assert_eq!(
        read(&parent.join("cgroup.subtree_control")),
        "+cpu +memory +pids"
    );
    assert!(cg.enforces("cpu") && cg.enforces("memory") && cg.enforces("pids"));

    // The parent's files appear in each child on a real host; here the
    // optional ones are laid out by hand.
    let w = cg.create("fe-one", &limits()).expect("create");
    let dir = parent.join("fe-one");
    assert_eq!(read(&dir.join("cpu.max")), "50000 100000");
    assert_eq!(read(&dir.join("memory.max")), (128u64 << 20).to_string());
    assert_eq!(read(&dir.join("pids.max")), "64");
    assert_eq!(w.procs_files(), vec![dir.join("cgroup.procs")]);

    // Counters as the kernel writes them after one OOM kill.
    fs::write(
        dir.join("memory.events"),
        "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 1\n",
    )
    .expect("write");
    fs::write(
        dir.join("cpu.stat"),
        "usage_usec 750000\nuser_usec 500000\nsystem_usec 250000\n",
    )
    .expect("write");
    fs::write(dir.join("memory.current"), "1048576\n").expect("write");
    fs::write(dir.join("memory.peak"), "134217728\n").expect("write");
    fs::write(dir.join("pids.current"), "7\n").expect("write");
    assert_eq!(w.oom_kills(), Some(1));
    assert_eq!(
        w.usage(),
        Some(WorkerUsage {
            cpu_usec: 750_000,
            memory_current_bytes: 1 << 20,
            memory_peak_bytes: Some(128 << 20),
            pids_current: Some(7),
            oom_kills: 1,
        })
    );
}

#[test]
fn v2_optional_files_are_written_where_the_kernel_has_them() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mnt = tmp.path().join("cg");
    fs::create_dir_all(&mnt).expect("mkdir");
    fs::write(mnt.join("cgroup.controllers"), "cpu memory pids\n").expect("write");
    let sources = Sources {
        mountinfo: format!("35 24 0:30 / {} rw - cgroup2 cgroup2 rw\n", mnt.display()),
        self_cgroup: "0::/\n".into(),
    };
    // An absolute parent goes under the hierarchy root.
    let cg = enabled(Cgroups::detect_from(&sources, "/steward-test"));
    let parent = mnt.join("steward-test");
    assert_eq!(cg.parents(), vec![parent.clone()]);
    assert_eq!(
        read(&mnt.join("cgroup.subtree_control")),
        "+cpu +memory +pids"
    );
    // A leftover of the same name (empty) is reused, its optional files kept.
    let dir = parent.join("fe-two");
    fs::create_dir_all(&dir).expect("mkdir");
    fs::write(dir.join("memory.swap.max"), "max\n").expect("write");
    fs::write(dir.join("memory.oom.group"), "0\n").expect("write");
    cg.create("fe-two", &limits()).expect("create");
    assert_eq!(read(&dir.join("memory.swap.max")), "0");
    assert_eq!(read(&dir.join("memory.oom.group")), "1");
}

/// A hybrid host: v1 controllers, some co-mounted, an empty unified mount.
#[test]
fn v1_one_directory_per_hierarchy() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let m = tmp.path();
    let mountinfo = format!(
        "32 31 0:29 / {0}/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
         35 31 0:32 /docker/abc {0}/memory rw - cgroup cgroup rw,memory\n\
         39 31 0:36 / {0}/pids rw - cgroup cgroup rw,pids\n\
         41 31 0:38 / {0}/unified rw - cgroup2 cgroup2 rw\n",
        m.display()
    );
    fs::create_dir_all(m.join("unified")).expect("mkdir");
    fs::write(m.join("unified/cgroup.controllers"), "hugetlb\n").expect("write");
    let sources = Sources {
        mountinfo,
        self_cgroup: "4:memory:/docker/abc\n3:pids:/docker/abc\n2:cpu,cpuacct:/docker/abc\n0::/\n"
            .into(),
    };
    let cg = enabled(Cgroups::detect_from(&sources, "steward"));
    assert_eq!(cg.version(), CgroupVersion::V1);
    assert_eq!(
        cg.parents(),
        vec![
            m.join("cpu,cpuacct/docker/abc/steward"),
            // The memory mount shows /docker/abc as its root.
            m.join("memory/steward"),
            m.join("pids/docker/abc/steward"),
        ]
    );
    assert!(cg.missing().is_empty());
    let w = cg.create("fe-x", &limits()).expect("create");
    let cpu = m.join("cpu,cpuacct/docker/abc/steward/fe-x");
    let mem = m.join("memory/steward/fe-x");
    assert_eq!(read(&cpu.join("cpu.cfs_period_us")), "100000");
    assert_eq!(read(&cpu.join("cpu.cfs_quota_us")), "50000");
    assert_eq!(
        read(&mem.join("memory.limit_in_bytes")),
        (128u64 << 20).to_string()
    );
    assert_eq!(read(&m.join("pids/docker/abc/steward/fe-x/pids.max")), "64");
    assert_eq!(w.procs_files().len(), 3);
    fs::write(
        mem.join("memory.oom_control"),
        "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
    )
    .expect("write");
    fs::write(cpu.join("cpuacct.usage"), "2500000000\n").expect("write");
    fs::write(mem.join("memory.usage_in_bytes"), "4096\n").expect("write");
    let u = w.usage().expect("usage");
    assert_eq!(
        (u.cpu_usec, u.memory_current_bytes, u.oom_kills),
        (2_500_000, 4096, 3)
    );
    assert_eq!(u.pids_current, None, "pids.current was never written");
}

#[test]
fn v1_without_a_pids_hierarchy_says_what_is_missing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let m = tmp.path();
    let sources = Sources {
        mountinfo: format!(
            "32 31 0:29 / {0}/cpu rw - cgroup cgroup rw,cpu\n35 31 0:32 / {0}/memory rw - cgroup cgroup rw,memory\n",
            m.display()
        ),
        self_cgroup: "2:cpu:/\n4:memory:/\n".into(),
    };
    let cg = enabled(Cgroups::detect_from(&sources, "steward"));
    assert_eq!(cg.missing(), &["cpuacct", "pids"]);
    assert!(!cg.enforces("pids"));
}

#[test]
fn no_usable_hierarchy_or_a_bad_parent_is_a_reason_not_a_panic() {
    let none = Sources {
        mountinfo: "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n".into(),
        self_cgroup: "0::/\n".into(),
    };
    match Cgroups::detect_from(&none, "steward") {
        CgroupSetup::Unavailable(why) => assert!(why.contains("memory controller"), "{why}"),
        CgroupSetup::Enabled(_) => panic!("nothing is mounted"),
    }
    for bad in ["", "../escape", "a/../b", "with space", "/", "a//b"] {
        assert!(check_parent(bad).is_err(), "{bad:?}");
    }
    assert!(check_parent("steward").is_ok() && check_parent("/kubepods/steward.1").is_ok());
    // A parent that cannot be created (its hierarchy is a file here).
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("not-a-dir");
    fs::write(&file, "").expect("write");
    let sources = Sources {
        mountinfo: format!(
            "35 31 0:32 / {} rw - cgroup cgroup rw,memory\n",
            file.display()
        ),
        self_cgroup: "4:memory:/\n".into(),
    };
    match Cgroups::detect_from(&sources, "steward") {
        CgroupSetup::Unavailable(why) => assert!(why.contains("cannot prepare"), "{why}"),
        CgroupSetup::Enabled(_) => panic!("the parent cannot exist"),
    }
}

#[test]
fn a_steward_started_from_the_agent_leaf_uses_the_cgroup_above_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mnt = tmp.path().join("cg");
    let own = mnt.join("system.slice/steward.service");
    fs::create_dir_all(own.join(AGENT_LEAF)).expect("mkdir");
    fs::write(own.join("cgroup.controllers"), "cpu memory pids\n").expect("write");
    let sources = Sources {
        mountinfo: format!("35 24 0:30 / {} rw - cgroup2 cgroup2 rw\n", mnt.display()),
        self_cgroup: format!("0::/system.slice/steward.service/{AGENT_LEAF}\n"),
    };
    let cg = enabled(Cgroups::detect_from(&sources, "steward"));
    assert_eq!(cg.parents(), vec![own.join("steward")]);
}

/// Files of a cgroup directory, written as the kernel would show them.
fn lay_out(dir: &Path, files: &[(&str, &str)]) {
    fs::create_dir_all(dir).expect("mkdir");
    for (name, text) in files {
        fs::write(dir.join(name), text).expect("write");
    }
}

#[test]
fn own_memory_headroom_under_a_limit() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mnt = tmp.path().join("cg");
    let own = mnt.join("kubepods/pod1");
    lay_out(
        &own,
        &[
            ("memory.max", "1073741824\n"),
            ("memory.current", "268435456\n"),
        ],
    );
    let mut sources = Sources {
        mountinfo: format!("35 24 0:30 / {} rw - cgroup2 cgroup2 rw\n", mnt.display()),
        self_cgroup: "0::/kubepods/pod1\n".into(),
    };
    assert_eq!(own_memory_headroom(&sources), Some(805_306_368));
    fs::write(own.join("memory.max"), "max\n").expect("write");
    assert_eq!(own_memory_headroom(&sources), None, "no limit");
    // v1 spells no limit as a huge number.
    sources.mountinfo = format!(
        "35 24 0:30 / {} rw - cgroup cgroup rw,memory\n",
        mnt.display()
    );
    sources.self_cgroup = "4:memory:/kubepods/pod1\n".into();
    fs::write(own.join("memory.limit_in_bytes"), "9223372036854771712\n").expect("write");
    fs::write(own.join("memory.usage_in_bytes"), "4096\n").expect("write");
    assert_eq!(own_memory_headroom(&sources), None);
    fs::write(own.join("memory.limit_in_bytes"), "8192\n").expect("write");
    assert_eq!(own_memory_headroom(&sources), Some(4096));
}

#[test]
fn parents_named_after_steward_are_its_own() {
    for ours in [
        "/sys/fs/cgroup/steward",
        "/x/steward.slice",
        "/x/steward-bench-7000",
        "/x/steward_workers",
    ] {
        assert!(steward_parent(Path::new(ours)), "{ours}");
    }
    for theirs in [
        "/sys/fs/cgroup/system.slice",
        "/x/stewardess",
        "/x/steward-",
        "/x/my-steward",
        "/",
    ] {
        assert!(!steward_parent(Path::new(theirs)), "{theirs}");
    }
}

#[test]
fn worker_cgroup_names_are_recognised() {
    for name in [
        "fe-w1.4000-0",
        "fe-a.b-c.12-345",
        "fe-abc-0123456789abcdef.1-2",
    ] {
        assert!(worker_cgroup_name(name), "{name}");
    }
    for name in [
        "fe-.1-0",
        "fe-w1",
        "fe-w1.x-0",
        "fe-w1.1-",
        "fe-w1.1-0/..",
        "postgres.service",
        "steward-agent",
        "fe-w 1.1-0",
    ] {
        assert!(!worker_cgroup_name(name), "{name}");
    }
}

/// A v2 host laid out in a temp dir, Steward in the root cgroup, with
/// `parent` prepared: (mount point, cgroups).
fn v2_host(tmp: &Path, parent: &str) -> (PathBuf, std::sync::Arc<Cgroups>) {
    let mnt = tmp.join("cg");
    lay_out(&mnt, &[("cgroup.controllers", "cpu memory pids\n")]);
    let sources = Sources {
        mountinfo: format!("35 24 0:30 / {} rw - cgroup2 cgroup2 rw\n", mnt.display()),
        self_cgroup: "0::/\n".into(),
    };
    let cg = enabled(Cgroups::detect_from(&sources, parent));
    (mnt, cg)
}

#[test]
fn nothing_under_a_parent_that_is_not_stewards_is_swept_or_removed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // The host's, there before Steward.
    fs::create_dir_all(tmp.path().join("cg/system.slice")).expect("mkdir");
    let (mnt, cg) = v2_host(tmp.path(), "/system.slice");
    let slice = mnt.join("system.slice");
    // A service, and a cgroup that merely looks like a worker's.
    lay_out(&slice.join("postgres.service"), &[("cgroup.procs", "")]);
    fs::create_dir_all(slice.join("fe-svc.1-0")).expect("mkdir");
    assert_eq!(cg.unowned_parents(), vec![slice.clone()]);
    assert_eq!(cg.reap_leftovers(), Vec::<(String, usize)>::new());
    cg.remove_parents();
    assert!(slice.join("postgres.service").is_dir());
    assert!(slice.join("fe-svc.1-0").is_dir());
    // A worker cgroup Steward's own records name is removed there.
    assert_eq!(cg.reap_named("fe-svc.1-0"), Some(0));
    assert!(!slice.join("fe-svc.1-0").exists());
    assert_eq!(cg.reap_named("postgres.service"), None);
    assert!(slice.join("postgres.service").is_dir());
    // Empty or not, the parent is not Steward's to remove.
    fs::remove_dir_all(slice.join("postgres.service")).expect("rm");
    for f in ["cgroup.subtree_control", "cgroup.controllers"] {
        let _ = fs::remove_file(slice.join(f));
    }
    cg.remove_parents();
    assert!(slice.is_dir());
}

#[test]
fn under_stewards_own_parent_only_worker_cgroups_are_swept() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mnt, cg) = v2_host(tmp.path(), "/steward");
    let parent = mnt.join("steward");
    fs::create_dir_all(parent.join("fe-w1.1-0")).expect("mkdir");
    lay_out(&parent.join("postgres.service"), &[("cgroup.procs", "")]);
    fs::create_dir_all(parent.join("fe-not-a-worker")).expect("mkdir");
    assert!(cg.unowned_parents().is_empty());
    assert_eq!(cg.reap_leftovers(), vec![("fe-w1.1-0".to_string(), 0)]);
    assert!(!parent.join("fe-w1.1-0").exists());
    assert!(parent.join("postgres.service").is_dir());
    assert!(parent.join("fe-not-a-worker").is_dir());
    // Under its own parent, reap_named leaves the sweep's work alone.
    fs::create_dir_all(parent.join("fe-w2.1-0")).expect("mkdir");
    assert_eq!(cg.reap_named("fe-w2.1-0"), None);
}

#[test]
fn a_parent_named_after_steward_that_steward_did_not_create_is_not_swept() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let foreign = tmp.path().join("cg/steward-foreign");
    fs::create_dir_all(foreign.join("fe-x.1-0")).expect("mkdir");
    let (_, cg) = v2_host(tmp.path(), "/steward-foreign");
    assert!(!owned_parent(&foreign));
    assert_eq!(cg.unowned_parents(), vec![foreign.clone()]);
    assert_eq!(cg.reap_leftovers(), Vec::<(String, usize)>::new());
    cg.remove_parents();
    assert!(foreign.join("fe-x.1-0").is_dir());
}

#[test]
fn a_parent_steward_created_stays_its_own_at_the_next_start() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mnt, first) = v2_host(tmp.path(), "/steward-mine");
    let parent = mnt.join("steward-mine");
    assert!(owned_parent(&parent));
    fs::create_dir_all(parent.join("fe-w.1-0")).expect("mkdir");
    drop(first);
    // A restart after a SIGKILL finds the parent it made, marked.
    let (_, again) = v2_host(tmp.path(), "/steward-mine");
    assert!(again.unowned_parents().is_empty());
    assert_eq!(again.reap_leftovers(), vec![("fe-w.1-0".to_string(), 0)]);
}
