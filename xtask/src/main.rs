//! This binary defines the project's tasks that plain `cargo` cannot express:
//!
//! - `cargo xtask demo [--once]`: the agent against the embedded dev control
//!   plane, running the real Tensorlake functions of `examples/hello` and
//!   the composed application `examples/compose`.
//! - `cargo xtask test`: every test, after making sure the Python venv with
//!   the pinned reference packages exists.
//! - `cargo xtask bench`: release builds, then the side-by-side harness
//!   (`crates/bench`) against the reference executor; the table also goes to
//!   `target/bench/results.md`. Not part of `test`. `cargo xtask bench
//!   --help` lists the harness's flags.
//! - `cargo xtask package [--profile P]`: the .deb (`package.rs`), from
//!   the release profile by default. `test` also builds one (from the dev
//!   profile) and, as root, installs, upgrades and purges it (`package
//!   --check` alone).
//! - `cargo xtask fuzz [--seeds N]`: the hostile-worker fuzz test
//!   (`tests/worker_fuzz.rs`) with many seeds; `test` runs 40. Then report
//!   building with hostile results (`report_fuzz` in the reconciler), as
//!   many cases as seeds; `test` runs 24. Then usage-ledger frames at and
//!   near the frame limit (`record::tests` in steward-metering), seeds × 10
//!   cases of each property; `test` runs 64.
//!
//! Demo, test and bench create `.venv` (indexify==0.4.56, tensorlake==0.3.9) when missing.
//!
//! SIGINT or SIGTERM stops what xtask started, newest first, and nothing is
//! left running: the demo's agent before its dev control plane, the bench
//! harness (which stops its agents and their workers) before xtask exits.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

mod package;

/// The reference packages every test and benchmark runs against.
const PINS: &[&str] = &["indexify==0.4.56", "tensorlake==0.3.9"];

#[derive(Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "Steward's project tasks"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Steward on the dev control plane, running examples/hello and
    /// examples/compose on the real worker; runs until Ctrl-C
    Demo {
        /// Stop after printing the table
        #[arg(long)]
        once: bool,
        /// Steward's `--worker-driver`: `process`, or `oci` (workers in
        /// runc containers; installs runc where it is missing, as root)
        #[arg(long, default_value = "process")]
        worker_driver: String,
    },
    /// Every test, with the venv and the binaries the tests spawn
    #[command(disable_help_flag = true)]
    Test {
        /// Passed to `cargo test`
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The side-by-side benchmark in release mode (`--help` lists its flags)
    #[command(disable_help_flag = true)]
    Bench {
        /// Passed to `steward-bench`
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The hostile-worker fuzz test with many seeds (CI runs 40), report
    /// building with hostile results as many cases (CI runs 24), and
    /// usage-ledger frames near their limit, ten times as many (CI runs 64)
    Fuzz {
        /// How many seeds of the fake worker's `fuzz` function to run, and
        /// how many report-building cases
        #[arg(long, default_value_t = 2000)]
        seeds: u64,
    },
    /// Creates `.venv` with the pinned packages and prints its path
    Venv,
    /// The .deb (binary without the dev control plane, systemd unit,
    /// /etc/steward conffiles) with cargo-deb, installed once if missing;
    /// prints its path
    Package {
        /// The cargo profile to build with
        #[arg(long, default_value = "release")]
        profile: String,
        /// Instead, the check `test` runs: a package from the dev profile
        /// installed, upgraded, removed and purged on this host (as root)
        #[arg(long, conflicts_with = "profile")]
        check: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = stop_children_on_signals() {
        eprintln!("xtask: cannot watch SIGINT and SIGTERM: {e}");
        return ExitCode::FAILURE;
    }
    let result = match cli.task {
        Task::Demo {
            once,
            worker_driver,
        } => demo(once, &worker_driver),
        Task::Test { args } => test(&args),
        Task::Bench { args } => bench(&args),
        Task::Fuzz { seeds } => fuzz(seeds),
        Task::Venv => ensure_venv().map(|p| println!("{}", p.display())),
        Task::Package { check: true, .. } => package::check(),
        Task::Package { profile, .. } => {
            package::build(&profile).map(|p| println!("{}", p.display()))
        }
    };
    if STOPPING.load(Ordering::SeqCst) {
        // A signal came: the signal thread stops the children and exits.
        loop {
            std::thread::park();
        }
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Set (under the [`CHILDREN`] lock) once SIGINT or SIGTERM arrived; from
/// then on only the signal thread stops children.
static STOPPING: AtomicBool = AtomicBool::new(false);

/// A running child that must be stopped before xtask exits.
struct Tracked {
    pid: u32,
    name: &'static str,
    /// How long it gets between SIGTERM and SIGKILL.
    grace: Duration,
}

/// The running children, in start order. The signal thread holds the lock
/// from the signal to the exit, so nothing else kills or reaps them meanwhile.
static CHILDREN: Mutex<Vec<Tracked>> = Mutex::new(Vec::new());

fn children() -> MutexGuard<'static, Vec<Tracked>> {
    CHILDREN.lock().unwrap_or_else(|p| p.into_inner())
}

/// Spawns `cmd` and tracks the child until [`untrack`].
fn spawn_tracked(cmd: &mut Command, name: &'static str, grace: Duration) -> Result<Child> {
    let mut running = children();
    stop_with_parent(cmd);
    let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
    running.push(Tracked {
        pid: child.id(),
        name,
        grace,
    });
    Ok(child)
}

/// Makes the child get SIGTERM when xtask dies, however it dies (a
/// SIGKILL runs no handler of ours): a tracked child is in a process group
/// of its own, so a signal to xtask's group does not reach it, and without
/// this an agent or dev control plane would outlive a killed demo or bench.
/// SIGTERM, not SIGKILL: the agent then stops its workers and removes their
/// cgroups itself. (The signal follows the forking thread: children are
/// spawned from xtask's main thread, which lives until xtask exits.)
fn stop_with_parent(cmd: &mut Command) {
    let parent = nix::unistd::getpid();
    // SAFETY: between fork and exec only async-signal-safe calls: prctl,
    // getppid and kill are system calls.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            // xtask's own SIGTERM handler, inherited by the fork, would
            // catch the parent-death signal before exec: default first.
            nix::sys::signal::signal(Signal::SIGTERM, nix::sys::signal::SigHandler::SigDfl)?;
            nix::sys::prctl::set_pdeathsig(Signal::SIGTERM)?;
            // xtask died before the prctl: the signal would never come.
            if nix::unistd::getppid() != parent {
                return Err(std::io::Error::other("xtask is gone"));
            }
            Ok(())
        });
    }
}

fn untrack(running: &mut Vec<Tracked>, pid: u32) {
    running.retain(|t| t.pid != pid);
}

/// Handles SIGINT and SIGTERM on a thread of their own: on either, the
/// children stop newest first (the demo's agent before the dev control
/// plane, so the agent's final report reaches a live server), each with
/// SIGTERM, up to its grace period, then SIGKILL to its process group; then
/// xtask exits with 128 + the signal number. (A handler, not a blocked
/// mask: children inherit a mask, while a handler resets on exec.)
fn stop_children_on_signals() -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let Some(signal) = signals.forever().next() else {
                return;
            };
            let mut running = children();
            STOPPING.store(true, Ordering::SeqCst);
            let name = Signal::try_from(signal).map_or("a signal", Signal::as_str);
            eprintln!("\nxtask: {name}; stopping");
            while let Some(child) = running.pop() {
                stop(&child);
            }
            std::process::exit(128 + signal);
        })?;
    Ok(())
}

fn stop(child: &Tracked) {
    let pid = Pid::from_raw(child.pid as i32);
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + child.grace;
    while !exited(child.pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if exited(child.pid) {
        eprintln!("xtask: {} stopped", child.name);
    } else {
        eprintln!(
            "xtask: {} still running {} s after SIGTERM; killing it",
            child.name,
            child.grace.as_secs()
        );
        let _ = kill(pid, Signal::SIGKILL);
    }
    // Whatever is left in its process group goes too (the long-lived
    // children lead groups of their own).
    let _ = killpg(pid, Signal::SIGKILL);
}

/// Whether `pid` has exited (a zombie nobody reaped yet counts).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Runs `cmd` to completion (stopped with the rest on a signal).
fn run(cmd: &mut Command) -> Result<()> {
    let mut child = spawn_tracked(cmd, "a build or test step", Duration::from_secs(10))?;
    let status = child.wait();
    untrack(&mut children(), child.id());
    let status = status.with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// Creates `.venv` with the pinned packages unless it already has them.
/// As root, Steward runs workers under uids of their own, which must be
/// able to run the venv's Python: a venv made from an interpreter others
/// cannot reach (pyenv's under `/root`) is made again from one they can.
fn ensure_venv() -> Result<PathBuf> {
    let venv = match outside_checkout() {
        Some(home) => home.join("venv"),
        None => root().join(".venv"),
    };
    let stamp = venv.join(".steward-pins");
    let want = PINS.join(" ");
    // The owner of our own /proc entry is our effective uid.
    let as_root = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self")?) == 0;
    let ready = venv.join("bin/function-executor").exists()
        && venv.join("bin/indexify-cli").exists()
        && std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == want)
        && (!as_root || reachable_by_others(&venv.join("bin/python3")));
    if ready {
        return Ok(venv);
    }
    let python = match std::env::var("STEWARD_PYTHON") {
        Ok(p) => p,
        Err(_) => ["python3", "/usr/bin/python3", "/usr/local/bin/python3"]
            .into_iter()
            .find(|p| !as_root || which(p).is_some_and(|p| reachable_by_others(&p)))
            .unwrap_or("python3")
            .to_string(),
    };
    eprintln!(
        "xtask: creating {} with {want} from {python} (once; takes a minute)",
        venv.display()
    );
    run(Command::new(&python)
        .args(["-m", "venv", "--clear"])
        .arg(&venv))
    .with_context(|| format!("{python} -m venv: is Python 3.10+ with venv installed?"))?;
    run(Command::new(venv.join("bin/pip"))
        .args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-input",
        ])
        .args(PINS))?;
    std::fs::write(&stamp, &want)?;
    Ok(venv)
}

/// `program` as found on `PATH` (or as given, with a `/`).
fn which(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Some(PathBuf::from(program)).filter(|p| p.is_file());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Whether a user other than the owner may run `path`: every directory on
/// the way to it and to where its symlinks lead is searchable by others.
fn reachable_by_others(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let Ok(real) = std::fs::canonicalize(path) else {
        return false;
    };
    [path, real.as_path()].into_iter().all(|p| {
        p.ancestors()
            .skip(1)
            .all(|d| std::fs::metadata(d).is_ok_and(|m| m.permissions().mode() & 0o001 != 0))
    }) && std::fs::metadata(&real).is_ok_and(|m| m.permissions().mode() & 0o005 == 0o005)
}

/// Cargo for the tasks' builds. They are one-shot builds (CI's is from a
/// clean checkout), so incremental caches are not kept unless the caller
/// asks (`CARGO_INCREMENTAL`): they were a third of the test build's disk
/// (2.3 of 6.8 GB), and a CI machine's disk that fills mid-link kills the
/// linker with SIGBUS.
fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    if let Some(home) = outside_checkout() {
        cmd.env("CARGO_TARGET_DIR", home.join("target"));
    }
    if std::env::var_os("CARGO_INCREMENTAL").is_none() {
        cmd.env("CARGO_INCREMENTAL", "0");
    }
    cmd
}

/// Where builds and the venv go when workers could not reach them in the
/// checkout: as root, workers run under their own uids (issue 25), which
/// must be able to run `target/debug/steward-fake-worker` and the venv's
/// Python; a checkout under a private directory (`/root`, mode 0700) is out
/// of their reach. Then both live in `/var/tmp/steward-builds/<hash of the
/// checkout's path>/` (a build cache, like `target/`, kept between runs).
/// `None` (the usual case): they stay in the checkout.
fn outside_checkout() -> Option<PathBuf> {
    static HOME: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    HOME.get_or_init(|| {
        let as_root = std::fs::metadata("/proc/self")
            .is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0);
        let checkout = root();
        if !as_root || reachable_by_others(&checkout) {
            return None;
        }
        let mut h: u64 = 0xcbf2_9ce4_8422_2325; // FNV-1a of the checkout's path
        for b in checkout.as_os_str().as_encoded_bytes() {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
        let home = PathBuf::from(format!("/var/tmp/steward-builds/{h:016x}"));
        eprintln!(
            "xtask: workers cannot reach {} (a private directory on the way); builds and the venv go to {}",
            checkout.display(),
            home.display()
        );
        Some(home)
    })
    .clone()
}

/// The cargo target directory the tasks build into.
fn target_dir() -> PathBuf {
    outside_checkout()
        .map(|h| h.join("target"))
        .unwrap_or_else(|| root().join("target"))
}

/// Installs Debian's `runc` where it is missing, as root (the OCI
/// driver's tests and `demo --worker-driver oci` run workers with it);
/// elsewhere says what is missing and goes on (those tests then fail,
/// naming it).
fn ensure_runc() -> Result<()> {
    if which("runc").is_some() {
        return Ok(());
    }
    ensure_debian(&[("/usr/sbin/runc", "runc")], "the OCI driver")
}

/// Installs Debian's `chromium` and `chromium-driver` where they are
/// missing, as root: the host page's test drives a real headless browser.
fn ensure_browser() -> Result<()> {
    ensure_debian(
        &[
            ("/usr/bin/chromium", "chromium"),
            ("/usr/bin/chromedriver", "chromium-driver"),
            ("/usr/bin/firefox-esr", "firefox-esr"),
        ],
        "the host page's browser tests",
    )?;
    ensure_geckodriver()
}

/// Firefox's WebDriver server: Debian has no package of it, so it is built
/// from crates.io (Mozilla publishes it there), pinned, into /usr/local as
/// root; elsewhere says what is missing (the Firefox test then fails,
/// naming it).
const GECKODRIVER: &str = "/usr/local/bin/geckodriver";
const GECKODRIVER_VERSION: &str = "0.37.1";

fn ensure_geckodriver() -> Result<()> {
    if Path::new(GECKODRIVER).is_file() {
        return Ok(());
    }
    let as_root = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self")?) == 0;
    if !as_root {
        eprintln!(
            "xtask: {GECKODRIVER} missing and this is not root: the Firefox page test will fail \
             (cargo install geckodriver --version {GECKODRIVER_VERSION} --locked --root /usr/local)"
        );
        return Ok(());
    }
    eprintln!("xtask: building geckodriver {GECKODRIVER_VERSION} from crates.io into /usr/local");
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["install", "geckodriver", "--locked", "--root", "/usr/local"])
            .args(["--version", GECKODRIVER_VERSION])
            .env_remove("CARGO_TARGET_DIR"),
    )
}

/// Installs the Debian packages of `needed` (a file each provides, the
/// package) whose file is missing, as root; elsewhere says what is missing
/// and goes on (the tests that need them then fail, naming it).
fn ensure_debian(needed: &[(&str, &str)], for_what: &str) -> Result<()> {
    let missing: Vec<&str> = needed
        .iter()
        .filter(|(file, _)| !Path::new(file).is_file())
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(" ");
    let as_root = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self")?) == 0;
    if !as_root {
        eprintln!(
            "xtask: {list} not installed and this is not root: {for_what}'s tests will fail (apt-get install {list})"
        );
        return Ok(());
    }
    eprintln!("xtask: installing {list} (apt-get install -y) for {for_what}");
    run(Command::new("apt-get").arg("update"))?;
    run(Command::new("apt-get")
        .args(["install", "-y"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// What a clean test build takes on disk, with room to spare (measured:
/// 5.1 GB at the end of a clean `.ci/run`, a few hundred MB of venv and
/// browser besides).
const TEST_BUILD_BYTES: u64 = 8_000_000_000;

/// Says how much room the build has where it goes, and warns below
/// [`TEST_BUILD_BYTES`]: a disk that fills mid-link ends in a linker
/// SIGBUS that names nothing.
fn say_disk_room() {
    let target = target_dir();
    let probe = target
        .ancestors()
        .find(|d| d.exists())
        .unwrap_or(Path::new("/"));
    let Ok(out) = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(probe)
        .output()
    else {
        return;
    };
    let free: Option<u64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok());
    let Some(free) = free else { return };
    let gb = |b: u64| b as f64 / 1e9;
    eprintln!(
        "xtask: {:.1} GB free where the build goes ({})",
        gb(free),
        target.display()
    );
    if free < TEST_BUILD_BYTES {
        eprintln!(
            "xtask: WARNING: a clean test build needs about {:.0} GB; the build may fail for want of disk",
            gb(TEST_BUILD_BYTES)
        );
    }
}

fn test(extra: &[String]) -> Result<()> {
    say_disk_room();
    let venv = ensure_venv()?;
    ensure_runc()?;
    ensure_browser()?;
    // The binaries the tests spawn (steward, steward-fake-worker), with the
    // same features as the test build so nothing compiles twice.
    run(cargo()
        .current_dir(root())
        .args(["build", "--workspace", "--bins", "--all-features"]))?;
    run(cargo()
        .current_dir(root())
        .args(["test", "--workspace", "--all-targets", "--all-features"])
        .args(extra)
        .env("STEWARD_VENV", &venv))?;
    // The package check builds the binary without the dev control plane
    // into target/debug (sharing the test build's dependencies); the
    // build after it puts the tests' steward back there.
    package::check()?;
    run(cargo()
        .current_dir(root())
        .args(["build", "--workspace", "--bins", "--all-features"]))
}

fn fuzz(seeds: u64) -> Result<()> {
    run(cargo()
        .current_dir(root())
        .args(["build", "--workspace", "--bins", "--all-features"]))?;
    run(cargo()
        .current_dir(root())
        .args([
            "test",
            "--all-features",
            "--test",
            "worker_fuzz",
            "--",
            "--nocapture",
        ])
        .env("STEWARD_FUZZ_SEEDS", seeds.to_string()))?;
    lib_tests(
        "steward-reconciler",
        "report_fuzz",
        ("STEWARD_REPORT_FUZZ_CASES", seeds),
    )?;
    // Usage-ledger frames at and near the frame limit: seeds × 10 cases
    // of each property (`test` runs 64).
    lib_tests(
        "steward-metering",
        "record::tests",
        ("STEWARD_FUZZ_SEEDS", seeds),
    )
}

/// The unit tests of `package` matching `filter`, with `env` set to a count.
fn lib_tests(package: &str, filter: &str, env: (&str, u64)) -> Result<()> {
    run(cargo()
        .current_dir(root())
        .args(["test", "--all-features", "-p", package, "--lib", filter])
        .env(env.0, env.1.to_string()))
}

fn bench(extra: &[String]) -> Result<()> {
    let root = root();
    let bench_bin = target_dir().join("release/steward-bench");
    if extra.iter().any(|a| a == "--help" || a == "-h") {
        // Usage only: no venv, no agent build.
        run(cargo().current_dir(&root).args([
            "build",
            "--quiet",
            "--release",
            "-p",
            "steward-bench",
        ]))?;
        return run(Command::new(&bench_bin).args(extra));
    }
    let venv = ensure_venv()?;
    run(cargo().current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "steward",
        "-p",
        "steward-fake-worker",
        "-p",
        "steward-bench",
    ]))?;
    std::fs::create_dir_all(target_dir().join("bench"))?;
    let mut cmd = Command::new(&bench_bin);
    cmd.current_dir(&root).args(extra);
    if !extra
        .iter()
        .any(|a| a == "--out" || a.starts_with("--out="))
    {
        cmd.arg("--out").arg(target_dir().join("bench/results.md"));
    }
    // Its own process group: a Ctrl-C reaches xtask only, which stops the
    // harness with SIGTERM; the harness then stops its agents and workers.
    let mut child = spawn_tracked(
        cmd.env("STEWARD_BIN", target_dir().join("release/steward"))
            .env("STEWARD_VENV", &venv)
            .process_group(0),
        "steward-bench",
        Duration::from_secs(60),
    )?;
    let status = child.wait();
    untrack(&mut children(), child.id());
    let status = status.context("waiting for steward-bench")?;
    if !status.success() {
        bail!("steward-bench failed with {status}");
    }
    Ok(())
}

/// A long-lived child in a process group of its own (so a terminal's Ctrl-C
/// reaches xtask only, which stops the children in order); SIGKILLed when
/// dropped, unless a signal is being handled.
struct Guard(Child);

impl Guard {
    fn spawn(cmd: &mut Command, name: &'static str, grace: Duration) -> Result<Guard> {
        Ok(Guard(spawn_tracked(cmd.process_group(0), name, grace)?))
    }

    fn first_line_json(&mut self) -> Result<serde_json::Value> {
        let out = self.0.stdout.take().context("child stdout")?;
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line)?;
        serde_json::from_str(&line).with_context(|| format!("expected a JSON line, got {line:?}"))
    }

    /// SIGTERM, then wait up to `limit` for a successful exit.
    fn terminate(&mut self, limit: Duration) -> Result<()> {
        kill(Pid::from_raw(self.0.id() as i32), Signal::SIGTERM)?;
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.0.try_wait()? {
                if !status.success() {
                    bail!("exited with {status}");
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("did not exit within {}s of SIGTERM", limit.as_secs())
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut running = children();
        if STOPPING.load(Ordering::SeqCst) {
            return;
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
        untrack(&mut running, self.0.id());
    }
}

/// What the demo's allocations were metered at, from the usage ledger
/// (`steward usage export`); a failure to read it is said, not fatal.
fn demo_usage(bin: &Path, data_dir: &Path) {
    let out = Command::new(bin)
        .args([
            "usage",
            "export",
            "--format",
            "jsonl",
            "--executor-cache-path",
        ])
        .arg(data_dir)
        .output();
    let Ok(out) = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()) else {
        println!("\nUsage: the ledger could not be read");
        return;
    };
    let (mut tasks, mut cpu_us, mut mb_ms) = (0u64, 0u64, 0u64);
    for r in out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
    {
        if r["kind"] == "allocation" {
            tasks += 1;
            cpu_us += r["cpu_core_us"].as_u64().unwrap_or(0);
            mb_ms += r["memory_mb_ms"].as_u64().unwrap_or(0);
        }
    }
    println!(
        "\nMetered: {tasks} allocations, {:.2} CPU core-s, {:.1} MB-s of memory (usage ledger; `steward usage export`)",
        cpu_us as f64 / 1e6,
        mb_ms as f64 / 1e3
    );
}

fn steward_json(bin: &Path, args: &[&str]) -> Result<serde_json::Value> {
    let out = run_stdout(Command::new(bin).args(args), "a steward devserver command")
        .with_context(|| format!("steward {} failed", args.join(" ")))?;
    Ok(serde_json::from_str(&out)?)
}

/// Runs `cmd` to completion (stopped with the rest on a signal) and
/// returns its standard output; its standard error is xtask's.
fn run_stdout(cmd: &mut Command, name: &'static str) -> Result<String> {
    let child = spawn_tracked(
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()),
        name,
        Duration::from_secs(5),
    )?;
    let pid = child.id();
    let out = child.wait_with_output();
    untrack(&mut children(), pid);
    let out = out.with_context(|| format!("running {name}"))?;
    if !out.status.success() {
        bail!("{name} failed with {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn demo(once: bool, worker_driver: &str) -> Result<()> {
    let venv = ensure_venv()?;
    if worker_driver == "oci" {
        ensure_runc()?;
    }
    let root = root();
    run(cargo()
        .current_dir(&root)
        .args(["build", "--quiet", "--bin", "steward"]))?;
    let bin = target_dir().join("debug/steward");
    let work = target_dir().join("demo");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let path = format!(
        "{}:{}",
        venv.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );

    let mut plane = Guard::spawn(
        Command::new(&bin)
            .args([
                "devserver",
                "--grpc-addr",
                "127.0.0.1:0",
                "--http-addr",
                "127.0.0.1:0",
                "--blob-dir",
            ])
            .arg(work.join("blobs"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped()),
        "the dev control plane",
        Duration::from_secs(10),
    )?;
    let p = plane.first_line_json()?;
    let grpc = p["grpc_addr"].as_str().context("grpc_addr")?.to_string();
    let http = p["http_url"].as_str().context("http_url")?.to_string();

    let mut agent = Guard::spawn(
        Command::new(&bin)
            .args([
                "--grpc-server-addr",
                &grpc,
                "--monitoring-server-host",
                "127.0.0.1",
                "--monitoring-server-port",
                "0",
            ])
            .arg("--executor-cache-path")
            .arg(work.join("agent"))
            // Workers die with the demo's agent: an interrupted demo
            // leaves none behind.
            .env("STEWARD_ADOPT_WORKERS", "false")
            .arg("--blob-root")
            .arg(work.join("blobs"))
            // The dev control plane places every function's worker here
            // without looking at resources (the real server spreads them
            // over hosts): declare room for the demo's one-CPU workers.
            .args(["--total-cpus", "64", "--total-memory-bytes"])
            .arg((64u64 << 30).to_string())
            .arg("--total-disk-bytes")
            .arg((1u64 << 40).to_string())
            .args(["--cgroup-parent", "steward-demo"])
            .args(["--worker-driver", worker_driver])
            .env("PATH", &path)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped()),
        "steward",
        Duration::from_secs(30),
    )?;
    let a = agent.first_line_json()?;
    let monitoring = a["monitoring_url"]
        .as_str()
        .context("monitoring_url")?
        .to_string();

    let deadline = Instant::now() + Duration::from_secs(30);
    while steward_json(&bin, &["devserver", "executors", "--server", &http])?
        .as_array()
        .is_none_or(|a| a.is_empty())
    {
        if Instant::now() > deadline {
            bail!("steward did not register with the dev control plane within 30s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for app in ["hello", "compose"] {
        let dir = root.join("examples").join(app);
        let dir = dir.to_str().context("path")?;
        steward_json(&bin, &["devserver", "deploy", dir, "--server", &http])?;
    }

    println!(
        "\nSteward ran examples/hello and examples/compose on the real tensorlake function-executor (--worker-driver {worker_driver}):\n"
    );
    println!(
        "{:<8} {:<16} {:<16} {:<9} result",
        "app", "function", "input", "status"
    );
    for (app, function, input) in [
        ("hello", "greet", "\"Steward\""),
        ("hello", "sum_of_squares", "[1, 2, 3, 4, 5]"),
        ("hello", "explode", "\"demo\""),
        ("compose", "nested", "3"),
        ("compose", "tail", "4"),
        ("compose", "map_squares", "5"),
        ("compose", "reduce_sum", "10"),
        ("compose", "futures", "3"),
        ("compose", "state_roundtrip", "\"Steward\""),
        ("compose", "failing_child", "1"),
    ] {
        let started = Instant::now();
        let out = steward_json(
            &bin,
            &[
                "devserver",
                "invoke",
                app,
                function,
                "--input",
                input,
                "--server",
                &http,
            ],
        )?;
        let status = out["status"].as_str().unwrap_or("?");
        let result = if status == "success" {
            out["output"].to_string()
        } else {
            format!(
                "failure reason {}",
                out["failure_reason"].as_str().unwrap_or("?")
            )
        };
        println!(
            "{app:<8} {function:<16} {input:<16} {status:<9} {result}   ({} ms)",
            started.elapsed().as_millis()
        );
    }
    demo_usage(&bin, &work.join("agent"));
    println!("\nMonitoring: {monitoring}/monitoring/health  {monitoring}/monitoring/metrics");
    println!(
        "State:      {monitoring}/state/function-executors  {monitoring}/state/allocations  {monitoring}/state/events"
    );
    println!("Usage:      {monitoring}/state/usage?group_by=function  {monitoring}/state/activity");
    println!("Control plane: {http}/v1/executors");
    if once {
        agent
            .terminate(Duration::from_secs(30))
            .context("stopping steward")?;
        plane
            .terminate(Duration::from_secs(10))
            .context("stopping the dev control plane")?;
        println!("\nStopped cleanly.");
        return Ok(());
    }
    println!("\nRunning; press Ctrl-C to stop.");
    let status = agent.0.wait()?;
    bail!("steward exited on its own with {status}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Set in the copy of this test binary that plays xtask.
    const PLAY_XTASK: &str = "XTASK_TEST_PLAY_PARENT";

    /// Plays xtask (run only as the child of the test below): spawns a
    /// tracked child, says its pid, and waits to be killed.
    #[test]
    #[ignore = "run by a_tracked_child_gets_sigterm_when_xtask_is_sigkilled"]
    // Never waited for: this process is SIGKILLed, and the child must go
    // with it.
    #[allow(clippy::zombie_processes)]
    fn play_xtask_with_a_tracked_child() {
        if std::env::var_os(PLAY_XTASK).is_none() {
            return;
        }
        let child = spawn_tracked(
            Command::new("sleep").arg("600"),
            "a sleeping child",
            Duration::from_secs(1),
        )
        .expect("spawn");
        println!("child {}", child.id());
        std::thread::sleep(Duration::from_secs(600));
    }

    /// A SIGKILLed xtask runs no handler; its tracked children, each in a
    /// process group of its own, still get SIGTERM from the kernel.
    #[test]
    fn a_tracked_child_gets_sigterm_when_xtask_is_sigkilled() -> Result<()> {
        let mut parent = Command::new(std::env::current_exe()?)
            .args([
                "--exact",
                "tests::play_xtask_with_a_tracked_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(PLAY_XTASK, "1")
            .stdout(Stdio::piped())
            .spawn()?;
        let out = parent.stdout.take().context("stdout")?;
        let mut child = None;
        for line in BufReader::new(out).lines() {
            // (The harness prints the test's name on the same line.)
            if let Some((_, pid)) = line?.rsplit_once("child ") {
                child = Some(Pid::from_raw(pid.trim().parse()?));
                break;
            }
        }
        let child = child.context("the playing parent never said its child")?;
        parent.kill()?;
        parent.wait()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        // The child is not ours to reap: it is gone once signal 0 fails
        // (or it is a zombie, when no init reaps it here).
        while kill(child, None).is_ok() && !zombie(child) {
            if Instant::now() > deadline {
                let _ = kill(child, Signal::SIGKILL);
                bail!("the tracked child outlived its SIGKILLed parent");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn zombie(pid: Pid) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            })
            .unwrap_or(false)
    }
}
