//! The bundle's `config.json`, field by field, as the runtime reads it.

use super::*;

fn bundle() -> Bundle {
    Bundle {
        executor_id: "steward-0123".into(),
        worker_id: "fe-1".into(),
        args: vec![
            "/usr/bin/steward".into(),
            "__oci-worker-init".into(),
            "--".into(),
            "/srv/venv/bin/function-executor".into(),
            "--address".into(),
            "unix:/run/steward/e-1/w7/fe.sock".into(),
        ],
        env: vec![
            ("PATH".into(), "/usr/bin:/bin".into()),
            ("HOME".into(), "/run/steward/e-1/w7/home".into()),
        ],
        cwd: "/run/steward/e-1/w7/home".into(),
        uid: 2_000_000_007,
        gid: 2_000_000_007,
        groups: vec![2_000_000_000],
        read_only: ["/usr", "/etc", "/srv/venv", "/opt/python3.11"]
            .map(PathBuf::from)
            .to_vec(),
        writable: vec![PathBuf::from("/run/steward/e-1/w7")],
        links: vec![(PathBuf::from("/bin"), PathBuf::from("usr/bin"))],
        limits: Limits {
            cpu_ms_per_sec: 1500,
            memory_bytes: 256 << 20,
            pids_max: 4096,
        },
        swap_limited: true,
        cgroups_path: Some(PathBuf::from("steward/fe-fe-1.42-0")),
        network: Network::Host,
        gpus: Vec::new(),
        hostname: Some("host-a".into()),
    }
}

fn json(b: &Bundle) -> serde_json::Value {
    serde_json::to_value(spec(b).expect("spec")).expect("json")
}

#[track_caller]
fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|s| s.as_str().expect("string").to_string())
        .collect()
}

fn mount<'a>(j: &'a serde_json::Value, at: &str) -> Option<&'a serde_json::Value> {
    j["mounts"]
        .as_array()?
        .iter()
        .find(|m| m["destination"] == at)
}

#[test]
fn the_root_is_read_only_and_the_worker_has_no_privileges() {
    let j = json(&bundle());
    assert_eq!(j["ociVersion"], "1.0.2");
    assert_eq!(j["root"]["path"], "rootfs");
    assert_eq!(j["root"]["readonly"], true);
    let p = &j["process"];
    assert_eq!(p["terminal"], false);
    assert_eq!(p["user"]["uid"], 2_000_000_007u32);
    assert_eq!(p["user"]["gid"], 2_000_000_007u32);
    assert_eq!(
        p["user"]["additionalGids"],
        serde_json::json!([2_000_000_000u32])
    );
    assert_eq!(p["user"]["umask"], 0o077);
    assert_eq!(p["noNewPrivileges"], true);
    for set in [
        "bounding",
        "effective",
        "inheritable",
        "permitted",
        "ambient",
    ] {
        assert_eq!(
            p["capabilities"][set],
            serde_json::json!([]),
            "no capability in {set}"
        );
    }
    assert_eq!(
        p["rlimits"],
        serde_json::json!([{"type": "RLIMIT_CORE", "hard": 0, "soft": 0}]),
        "Steward's own limits are inherited, but for core files"
    );
    assert_eq!(strings(&p["args"])[1], "__oci-worker-init");
    assert_eq!(p["cwd"], "/run/steward/e-1/w7/home");
    assert!(strings(&p["env"]).contains(&"HOME=/run/steward/e-1/w7/home".to_string()));
    assert_eq!(j["hostname"], "host-a");
    assert_eq!(j["annotations"][EXECUTOR_ANNOTATION], "steward-0123");
    assert_eq!(j["annotations"][WORKER_ANNOTATION], "fe-1");
}

#[test]
fn namespaces_are_new_and_the_network_is_the_hosts_unless_none() {
    let types = |j: &serde_json::Value| -> Vec<String> {
        j["linux"]["namespaces"]
            .as_array()
            .expect("namespaces")
            .iter()
            .map(|n| {
                assert!(n.get("path").is_none(), "a new namespace, not joined: {n}");
                n["type"].as_str().expect("type").to_string()
            })
            .collect()
    };
    assert_eq!(types(&json(&bundle())), ["pid", "mount", "ipc", "uts"]);
    let mut b = bundle();
    b.network = Network::None;
    assert_eq!(types(&json(&b)), ["pid", "mount", "ipc", "uts", "network"]);
}

#[test]
fn host_directories_are_bound_read_only_and_only_the_workers_own_writable() {
    let j = json(&bundle());
    for d in ["/usr", "/etc", "/srv/venv", "/opt/python3.11"] {
        let m = mount(&j, d).unwrap_or_else(|| panic!("{d} is mounted"));
        assert_eq!(m["type"], "bind");
        assert_eq!(m["source"], d);
        let o = strings(&m["options"]);
        assert!(o.contains(&"rro".to_string()), "{d}: {o:?}");
        assert!(!o.contains(&"rw".to_string()), "{d}: {o:?}");
    }
    let w = mount(&j, "/run/steward/e-1/w7").expect("worker directory");
    let o = strings(&w["options"]);
    assert!(
        o.contains(&"rw".to_string()) && o.contains(&"noexec".to_string()),
        "{o:?}"
    );
    let tmp = mount(&j, "/tmp").expect("/tmp");
    assert_eq!(tmp["type"], "tmpfs");
    for d in ["/proc", "/dev", "/sys"] {
        assert!(mount(&j, d).is_some(), "{d}");
    }
    // Nothing else of the host is writable.
    let writable: Vec<&str> = j["mounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .filter(|m| {
            m["type"] == "bind"
                && !strings(&m["options"])
                    .iter()
                    .any(|o| o == "rro" || o == "ro")
        })
        .map(|m| m["destination"].as_str().expect("dest"))
        .collect();
    assert_eq!(writable, ["/run/steward/e-1/w7"]);
}

#[test]
fn limits_are_the_cgroup_drivers() {
    let j = json(&bundle());
    let r = &j["linux"]["resources"];
    assert_eq!(r["cpu"]["quota"], 150_000);
    assert_eq!(r["cpu"]["period"], 100_000);
    assert_eq!(r["memory"]["limit"], 256 << 20);
    assert_eq!(
        r["memory"]["swap"],
        256 << 20,
        "memory+swap = memory: no swap"
    );
    assert_eq!(r["pids"]["limit"], 4096);
    assert_eq!(j["linux"]["cgroupsPath"], "steward/fe-fe-1.42-0");
    // The smallest quota the kernel takes, as the cgroup driver writes it.
    let mut b = bundle();
    b.limits.cpu_ms_per_sec = 0;
    b.swap_limited = false;
    let j = json(&b);
    assert_eq!(j["linux"]["resources"]["cpu"]["quota"], 1000);
    assert!(j["linux"]["resources"]["memory"].get("swap").is_none());
}

#[test]
fn only_the_workers_gpus_are_bound_and_allowed() {
    let mut b = bundle();
    b.gpus = vec![
        DeviceNode {
            path: "/dev/nvidia3".into(),
            major: 195,
            minor: 3,
        },
        DeviceNode {
            path: "/dev/nvidiactl".into(),
            major: 195,
            minor: 255,
        },
    ];
    let j = json(&b);
    let devices = j["linux"]["resources"]["devices"]
        .as_array()
        .expect("rules");
    assert_eq!(
        devices[0],
        serde_json::json!({"allow": false, "type": "a", "access": "rwm"}),
        "every device denied first"
    );
    assert_eq!(
        devices[1..],
        [
            serde_json::json!({"allow": true, "type": "c", "major": 195, "minor": 3, "access": "rwm"}),
            serde_json::json!({"allow": true, "type": "c", "major": 195, "minor": 255, "access": "rwm"}),
        ]
    );
    for d in ["/dev/nvidia3", "/dev/nvidiactl"] {
        let m = mount(&j, d).expect("bound");
        assert_eq!(m["source"], d);
    }
    assert!(mount(&j, "/dev/nvidia0").is_none(), "another worker's GPU");
    // Without GPUs: only the deny-all rule (the runtime adds null, zero, …).
    assert_eq!(
        json(&bundle())["linux"]["resources"]["devices"]
            .as_array()
            .expect("rules")
            .len(),
        1
    );
}

#[test]
fn the_seccomp_profile_refuses_namespaces_and_kernel_attack_surface() {
    let j = json(&bundle());
    let s = &j["linux"]["seccomp"];
    assert_eq!(s["defaultAction"], "SCMP_ACT_ALLOW");
    let rules = s["syscalls"].as_array().expect("rules");
    let denied = strings(&rules[0]["names"]);
    for name in [
        "unshare",
        "setns",
        "mount",
        "bpf",
        "keyctl",
        "ptrace",
        "userfaultfd",
    ] {
        assert!(denied.contains(&name.to_string()), "{name}");
    }
    assert_eq!(rules[0]["action"], "SCMP_ACT_ERRNO");
    assert_eq!(rules[0]["errnoRet"], libc::EPERM);
    assert_eq!(strings(&rules[1]["names"]), ["clone3"]);
    assert_eq!(rules[1]["errnoRet"], libc::ENOSYS);
    let clone_user = rules
        .iter()
        .find(|r| {
            r["names"] == serde_json::json!(["clone"]) && r["args"][0]["value"] == 0x1000_0000
        })
        .expect("clone(CLONE_NEWUSER) refused");
    assert_eq!(clone_user["args"][0]["op"], "SCMP_CMP_MASKED_EQ");
    assert_eq!(clone_user["args"][0]["valueTwo"], 0x1000_0000);
}

#[test]
fn bundles_are_written_and_removed_but_never_through_a_mount() {
    let t = tempfile::tempdir().expect("tmp");
    let dir = t.path().join("b1");
    write(&dir, &bundle()).expect("write");
    let config: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("config.json")).expect("read")).expect("json");
    assert_eq!(config["root"]["path"], "rootfs");
    assert_eq!(
        fs::read_link(dir.join("rootfs/bin")).expect("link"),
        PathBuf::from("usr/bin")
    );
    remove(&dir).expect("remove");
    assert!(!dir.exists());
    remove(&dir).expect("a missing bundle is fine");
    let mountinfo = "\
22 1 8:1 / / rw - ext4 /dev/sda1 rw
99 22 8:1 /usr /data/oci/bundles/b1/rootfs/usr ro - ext4 /dev/sda1 rw
";
    assert!(mounted_under(mountinfo, Path::new("/data/oci/bundles/b1")));
    assert!(!mounted_under(mountinfo, Path::new("/data/oci/bundles/b2")));
}

#[test]
fn no_worker_runs_as_root_and_proc_and_the_kernels_side_channels_are_closed() {
    // Root without capabilities still owns root's files and passes peer
    // checks that trust uid 0: refused, whatever the identity setup.
    for (uid, gid) in [(0, 0), (0, 2_000_000_007), (2_000_000_007, 0)] {
        let mut b = bundle();
        b.uid = uid;
        b.gid = gid;
        let e = spec(&b).expect_err("a root worker is refused");
        assert!(
            matches!(e, BundleError::Root { .. }),
            "uid {uid} gid {gid}: {e}"
        );
    }
    let j = json(&bundle());
    let proc = mount(&j, "/proc").expect("/proc");
    let o = strings(&proc["options"]);
    for opt in ["nosuid", "noexec", "nodev"] {
        assert!(o.contains(&opt.to_string()), "/proc {opt}: {o:?}");
    }
    let masked = strings(&j["linux"]["maskedPaths"]);
    for p in [
        "/proc/kcore",
        "/proc/keys",
        "/proc/timer_list",
        "/proc/sched_debug",
        "/sys/firmware",
        "/sys/devices/virtual/powercap",
    ] {
        assert!(masked.contains(&p.to_string()), "{p} masked: {masked:?}");
    }
    let read_only = strings(&j["linux"]["readonlyPaths"]);
    for p in [
        "/proc/sys",
        "/proc/sysrq-trigger",
        "/proc/bus",
        "/proc/fs",
        "/proc/irq",
    ] {
        assert!(read_only.contains(&p.to_string()), "{p} read-only");
    }
    let denied = strings(&j["linux"]["seccomp"]["syscalls"][0]["names"]);
    for name in [
        "syslog",
        "uselib",
        "open_by_handle_at",
        "kexec_load",
        "init_module",
    ] {
        assert!(denied.contains(&name.to_string()), "{name}");
    }
}
