//! Workers under their own identity and on a private channel, on this
//! machine: the process driver starts a small Python listener and the test
//! reads what the kernel says of it (`/proc/<pid>/status`, `environ`,
//! `cwd`) and of its directory. Identities need root: without it each test
//! checks that the driver says why they are not separated, and what holds
//! without them (the environment, the directory, the peer check).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use steward_worker_driver::{
    Cgroups, ChannelKind, ConnectError, EnvAllow, IdentitySetup, Isolation, Limits, ProcessDriver,
    ProcessDriverConfig, UidRange, Worker, WorkerDriver, WorkerSpec,
};

/// Ids of these tests, apart from the default range that Stewards running
/// beside them lease from.
/// Uid leases are per process: tests leasing at once would take each
/// other's "lowest free" uid.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const RANGE: UidRange = UidRange {
    first: 2_100_000_000,
    count: 1_000,
};

/// Listens where the driver says (`--address` is appended to argv) and
/// keeps every connection open.
const LISTENER: &str = r#"
import socket, sys
addr = sys.argv[sys.argv.index("--address") + 1]
if addr.startswith("unix:"):
    s = socket.socket(socket.AF_UNIX)
    s.bind(addr[5:])
else:
    host, port = addr.rsplit(":", 1)
    s = socket.socket()
    s.bind((host, int(port)))
s.listen()
held = []
while True:
    held.append(s.accept())
"#;

/// A Python a worker under another uid can run: the system's where there
/// is one (an interpreter under a private home directory is not).
fn python() -> PathBuf {
    let system = PathBuf::from("/usr/bin/python3");
    if system.exists() {
        return system;
    }
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("python3"))
                .find(|p| p.exists())
        })
        .expect("python3 on PATH")
}

fn spec(dir: &Path, id: &str, script: &str) -> WorkerSpec {
    WorkerSpec {
        id: id.into(),
        program: python(),
        args: vec!["-c".into(), script.into()],
        env: vec![("OWN_VARIABLE".into(), "own".into())],
        log_path: dir.join(format!("{id}.log")),
        limits: Limits {
            cpu_ms_per_sec: 1000,
            memory_bytes: 256 << 20,
            pids_max: 64,
        },
    }
}

/// A driver whose run directory is under `dir` (made searchable, as a
/// worker under its own uid must reach its directory), with cgroups where
/// the machine has them (the worker joins its cgroup before it drops root).
/// A driver that removes its parent cgroup when dropped, so a test that
/// fails half-way (its workers killed on drop first) leaves no cgroup.
struct Driver(ProcessDriver);

impl std::ops::Deref for Driver {
    type Target = ProcessDriver;
    fn deref(&self) -> &ProcessDriver {
        &self.0
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.0.shutdown();
    }
}

fn driver(dir: &Path, channel: ChannelKind, test: &str) -> Driver {
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o711))
        .expect("chmod");
    Driver(ProcessDriver::new(ProcessDriverConfig {
        records_dir: dir.join("workers"),
        cgroups: Cgroups::detect(&format!(
            "steward-identity-test-{}-{test}",
            std::process::id()
        )),
        isolation: Isolation::new(
            &dir.join("run"),
            "identity-test",
            IdentitySetup::detect(RANGE, None),
            channel,
            EnvAllow::default(),
        ),
        adoptable: false,
    }))
}

fn root() -> bool {
    // SAFETY-free: the owner of our own /proc entry is our uid.
    std::fs::metadata("/proc/self").map(|m| m.uid()).ok() == Some(0)
}

/// Connects, polling while the worker starts.
async fn connect(w: &dyn Worker) -> Result<(), ConnectError> {
    for _ in 0..1000 {
        match w.connect().await {
            Ok(_) => return Ok(()),
            Err(ConnectError::NotYet(_)) => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(e) => return Err(e),
        }
    }
    panic!(
        "the worker never listened (log: {})",
        w.log_path().display()
    );
}

fn status_field(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| panic!("no {name} in {status}"))
}

fn environ(pid: u32) -> Vec<(String, String)> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
    raw.split(|b| *b == 0)
        .filter(|v| !v.is_empty())
        .filter_map(|v| {
            let text = String::from_utf8_lossy(v);
            let (k, v) = text.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect()
}

fn mode_and_owner(p: &Path) -> (u32, u32) {
    let m = std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (m.mode() & 0o7777, m.uid())
}

#[tokio::test]
async fn a_worker_runs_as_its_own_uid_without_privileges_in_a_private_directory() {
    let _serial = SERIAL.lock().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let driver = driver(tmp.path(), ChannelKind::Unix, "identity");
    let mut a = driver
        .start(spec(tmp.path(), "a", LISTENER))
        .await
        .expect("start a");
    let mut b = driver
        .start(spec(tmp.path(), "b", LISTENER))
        .await
        .expect("start b");
    connect(a.as_ref()).await.expect("a's channel");
    connect(b.as_ref()).await.expect("b's channel");
    let enforcement = driver.enforcement();
    assert_eq!(enforcement.channel, "unix");
    let socket = PathBuf::from(a.address().strip_prefix("unix:").expect("a unix address"));
    let dir = socket.parent().expect("socket dir").to_path_buf();
    let home = dir.join("home");
    let pid = a.pid();

    // Its environment: the allowlist, its scratch directory, its own
    // variables; nothing else of this process's (CARGO_*, RUST_*, ...).
    let env = environ(pid);
    let get = |k: &str| env.iter().find(|(e, _)| e == k).map(|(_, v)| v.clone());
    let home_text = home.display().to_string();
    assert_eq!(get("HOME").as_deref(), Some(home_text.as_str()));
    assert_eq!(get("TMPDIR").as_deref(), Some(home_text.as_str()));
    assert_eq!(get("OWN_VARIABLE").as_deref(), Some("own"));
    let allow = EnvAllow::default();
    for (k, _) in &env {
        let extra = [
            "HOME",
            "TMPDIR",
            "TMP",
            "TEMP",
            "USER",
            "LOGNAME",
            "OWN_VARIABLE",
        ];
        assert!(
            allow.allows(k) || extra.contains(&k.as_str()),
            "{k} is not on the allowlist: {env:?}"
        );
    }
    if !std::env::vars().any(|(k, _)| !allow.allows(&k)) {
        eprintln!("this process has no variable the allowlist keeps out: nothing was filtered");
    }
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/cwd")).expect("cwd"),
        home
    );
    if enforcement.cgroup_version.is_some() {
        // It joined its cgroup as root, before it took its own uid.
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
        assert!(cgroup.contains("steward-identity-test"), "{cgroup}");
    }
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    assert_eq!(status_field(pid, "Umask"), "0077");

    if !root() {
        let why = enforcement
            .identities_not_separated_because
            .expect("the driver says why identities are not separated");
        eprintln!("not root: identities are not separated ({why}); checked the rest");
        a.stop(Duration::ZERO).await;
        b.stop(Duration::ZERO).await;
        driver.shutdown();
        return;
    }
    assert_eq!(
        enforcement.worker_uids.as_deref(),
        Some("2100000001-2100000999")
    );
    let uid = a.uid();
    assert!(RANGE.contains(uid) && uid != RANGE.first, "{uid}");
    assert_ne!(uid, b.uid(), "no two live workers share a uid");
    assert_eq!(status_field(pid, "Uid"), format!("{uid} {uid} {uid} {uid}"));
    assert_eq!(status_field(pid, "Gid"), format!("{uid} {uid} {uid} {uid}"));
    assert_eq!(status_field(pid, "Groups"), RANGE.first.to_string());
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(pid, caps), "0000000000000000", "{caps}");
    }
    assert_eq!(get("USER"), Some(format!("steward-worker-{uid}")));
    // Only the worker (and root) may enter its directory and scratch.
    assert_eq!(mode_and_owner(&dir), (0o700, uid));
    assert_eq!(mode_and_owner(&home), (0o700, uid));
    // Steward's own files are not the worker's: its records' directory is.
    let other_dir = PathBuf::from(b.address().strip_prefix("unix:").expect("unix"))
        .parent()
        .expect("dir")
        .to_path_buf();
    assert_eq!(mode_and_owner(&other_dir), (0o700, b.uid()));

    a.stop(Duration::ZERO).await;
    assert!(!dir.exists(), "the directory goes with the worker");
    // Its uid is free again, for the next worker.
    let mut c = driver
        .start(spec(tmp.path(), "c", LISTENER))
        .await
        .expect("start c");
    assert_eq!(c.uid(), uid, "the lowest free uid");
    c.stop(Duration::ZERO).await;
    b.stop(Duration::ZERO).await;
    driver.shutdown();
}

/// The worker's socket is a link to a socket someone else listens on (as
/// a worker pointing Steward at another worker's socket would): the
/// listener is not the worker, so Steward sends nothing.
#[tokio::test]
async fn a_socket_that_another_process_listens_on_is_refused() {
    let _serial = SERIAL.lock().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let driver = driver(tmp.path(), ChannelKind::Unix, "decoy");
    let decoy_dir = tmp.path().join("decoy");
    std::fs::create_dir(&decoy_dir).expect("mkdir");
    let decoy = decoy_dir.join("decoy.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&decoy).expect("bind the decoy");
    let script = format!(
        r#"
import os, sys, time
addr = sys.argv[sys.argv.index("--address") + 1]
os.symlink({decoy:?}, addr[5:])
time.sleep(60)
"#,
        decoy = decoy.display().to_string()
    );
    let mut w = driver
        .start(spec(tmp.path(), "linker", &script))
        .await
        .expect("start");
    let refused = connect(w.as_ref()).await.expect_err("refused");
    let text = refused.to_string();
    assert!(matches!(refused, ConnectError::Refused { .. }), "{text}");
    if root() {
        assert!(
            text.contains("uid 0") && text.contains(&format!("uid {}", w.uid())),
            "{text}"
        );
    } else {
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
    }
    w.stop(Duration::ZERO).await;
    driver.shutdown();
}

#[tokio::test]
async fn over_tcp_only_a_port_the_worker_listens_on_is_accepted() {
    let _serial = SERIAL.lock().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let driver = driver(tmp.path(), ChannelKind::Tcp, "tcp");
    assert_eq!(driver.enforcement().channel, "tcp");
    let mut good = driver
        .start(spec(tmp.path(), "good", LISTENER))
        .await
        .expect("start");
    assert!(
        good.address().starts_with("127.0.0.1:"),
        "{}",
        good.address()
    );
    connect(good.as_ref()).await.expect("the worker's own port");
    good.stop(Duration::ZERO).await;

    // A worker that never listens; the test takes its port first.
    let mut squatted = driver
        .start(spec(tmp.path(), "squatted", "import time; time.sleep(60)"))
        .await
        .expect("start");
    let _squatter = std::net::TcpListener::bind(squatted.address()).expect("bind its port");
    let refused = connect(squatted.as_ref()).await.expect_err("refused");
    assert!(matches!(refused, ConnectError::Refused { .. }), "{refused}");
    assert!(
        refused
            .to_string()
            .contains("not open in any of the worker's processes")
            || refused.to_string().contains("belongs to uid 0"),
        "{refused}"
    );
    squatted.stop(Duration::ZERO).await;
    driver.shutdown();
}
