//! Spawning and killing one `function-executor` process.
//!
//! Each worker runs in its own process group so that killing the group also
//! kills anything user code forked. `PR_SET_PDEATHSIG(SIGKILL)` makes the
//! kernel kill the worker if Steward dies, even by SIGKILL, so a worker never
//! outlives the agent that started it.

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::AgentConfig;

pub(crate) struct FeProcess {
    /// Kernel OOM kills counted when the worker started.
    pub oom_kills_at_start: Option<u64>,
    pub child: Child,
    pub pid: u32,
    pub address: String,
    pub log_path: PathBuf,
    /// The worker's port, kept from every other worker while this one lives.
    _port: PortLease,
}

/// Ports handed to live workers. The worker binds its port with
/// SO_REUSEPORT (grpc-python does), so two workers given the same port
/// would both bind it and the agent could talk to the wrong one: a port is
/// never handed out twice while its worker lives.
static LEASED_PORTS: std::sync::Mutex<std::collections::BTreeSet<u16>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// A port leased to one worker until dropped.
#[derive(Debug)]
pub(crate) struct PortLease(u16);

impl Drop for PortLease {
    fn drop(&mut self) {
        if let Ok(mut leased) = LEASED_PORTS.lock() {
            leased.remove(&self.0);
        }
    }
}

/// Leases a port from `pick` that no live worker holds (a few tries).
fn lease_port(mut pick: impl FnMut() -> std::io::Result<u16>) -> std::io::Result<PortLease> {
    for _ in 0..32 {
        let port = pick()?;
        let mut leased = LEASED_PORTS
            .lock()
            .map_err(|_| std::io::Error::other("port lease table poisoned"))?;
        if leased.insert(port) {
            return Ok(PortLease(port));
        }
    }
    Err(std::io::Error::other(
        "no free port that no live worker holds after 32 tries",
    ))
}

/// A port free right now (binding port 0; the worker binds it a moment later).
fn free_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

pub(crate) fn spawn(
    config: &AgentConfig,
    fe_id: &str,
    gpus: &[String],
) -> Result<FeProcess, String> {
    let port = lease_port(free_port).map_err(|e| format!("picking a port for the worker: {e}"))?;
    let address = format!("127.0.0.1:{}", port.0);
    let log_path = config.data_dir.join("logs").join(format!("fe-{fe_id}.log"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("opening worker log {}: {e}", log_path.display()))?;
    let log_err = log
        .try_clone()
        .map_err(|e| format!("opening worker log {}: {e}", log_path.display()))?;
    let mut cmd = Command::new(&config.function_executor_bin);
    cmd.arg(format!("--executor-id={}", config.executor_id))
        .arg(format!("--function-executor-id={fe_id}"))
        .arg("--address")
        .arg(&address)
        .args(&config.function_executor_args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err))
        .process_group(0)
        .kill_on_drop(true);
    // Workers get presigned URLs, never the agent's cloud credentials.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("AWS_") {
            cmd.env_remove(&key);
        }
    }
    if !gpus.is_empty() {
        let visible = gpus.join(",");
        cmd.env("CUDA_VISIBLE_DEVICES", &visible)
            .env("NVIDIA_VISIBLE_DEVICES", &visible);
    }
    set_parent_death_signal(&mut cmd);
    let child = spawn_from_lasting_thread(cmd)
        .map_err(|e| format!("starting {}: {e}", config.function_executor_bin.display()))?;
    let pid = child
        .id()
        .ok_or_else(|| "worker exited before its pid was read".to_string())?;
    Ok(FeProcess {
        oom_kills_at_start: oom_kill_count(),
        child,
        pid,
        address,
        log_path,
        _port: port,
    })
}

type SpawnJob = (
    Command,
    tokio::runtime::Handle,
    std::sync::mpsc::SyncSender<std::io::Result<Child>>,
);

/// Forks `cmd` from a thread that lives as long as the agent. The kernel
/// sends the parent-death signal when the *thread* that forked a child
/// exits, not the process: a worker forked from a pooled thread that later
/// retires would be killed with it.
fn spawn_from_lasting_thread(cmd: Command) -> std::io::Result<Child> {
    static SPAWNER: std::sync::OnceLock<std::sync::Mutex<std::sync::mpsc::Sender<SpawnJob>>> =
        std::sync::OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<SpawnJob>();
        let started = std::thread::Builder::new()
            .name("steward-spawner".into())
            .spawn(move || {
                for (mut cmd, runtime, reply) in rx {
                    // Registers the child with the caller's runtime.
                    let _entered = runtime.enter();
                    let _ = reply.send(cmd.spawn());
                }
            });
        if let Err(e) = started {
            tracing::error!(error = %e, "cannot start the worker spawner thread");
        }
        std::sync::Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = std::sync::mpsc::sync_channel(1);
    let gone = || std::io::Error::other("the worker spawner thread is gone");
    spawner
        .lock()
        .map_err(|_| gone())?
        .send((cmd, tokio::runtime::Handle::current(), reply_tx))
        .map_err(|_| gone())?;
    // A fork and exec: milliseconds, so waiting here is fine.
    reply_rx.recv().map_err(|_| gone())?
}

#[allow(unsafe_code)]
fn set_parent_death_signal(cmd: &mut Command) {
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child before exec and only calls
    // async-signal-safe functions (prctl, getppid, _exit).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl.
            if libc::getppid() as u32 != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// Sends `signal` to the worker's whole process group.
pub(crate) fn signal_group(pid: u32, signal: Signal) {
    let _ = killpg(Pid::from_raw(pid as i32), signal);
}

impl FeProcess {
    /// SIGTERM to the group, then SIGKILL after `grace`; waits for the exit.
    pub async fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            signal_group(self.pid, Signal::SIGKILL);
            return Some(status);
        }
        if !grace.is_zero() {
            signal_group(self.pid, Signal::SIGTERM);
            if let Ok(Ok(status)) = tokio::time::timeout(grace, self.child.wait()).await {
                signal_group(self.pid, Signal::SIGKILL);
                return Some(status);
            }
        }
        signal_group(self.pid, Signal::SIGKILL);
        tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .ok()
            .and_then(Result::ok)
    }
}

/// Describes how a worker exited, for logs and reasons.
pub(crate) fn describe_exit(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(sig)) => format!(
            "killed by signal {sig} ({})",
            Signal::try_from(sig)
                .map(|s| s.as_str())
                .unwrap_or("unknown")
        ),
        _ => "exited".to_string(),
    }
}

/// The kernel's count of OOM kills (`oom_kill` in `/proc/vmstat`).
pub(crate) fn oom_kill_count() -> Option<u64> {
    parse_oom_kills(&std::fs::read_to_string("/proc/vmstat").ok()?)
}

fn parse_oom_kills(vmstat: &str) -> Option<u64> {
    vmstat
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
}

impl FeProcess {
    /// Whether the kernel OOM-killed something since this worker started:
    /// with a SIGKILL exit we did not send, the worker is taken to be it.
    pub fn oom_killed_since_start(&self) -> bool {
        matches!((self.oom_kills_at_start, oom_kill_count()), (Some(a), Some(b)) if b > a)
    }
}

/// Whether the exit was a SIGKILL.
pub(crate) fn killed_by_sigkill(status: &ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt;
    status.signal() == Some(libc::SIGKILL)
}

/// Fields of `/proc/<pid>/stat` we need: (pgid, start time in clock ticks).
fn stat_of(pid: u32) -> Option<(u32, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: split after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): pgid is field 5, starttime field 22.
    let pgid = fields.get(2)?.parse().ok()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((pgid, start))
}

/// Records a running worker's process group in `dir`, so that a later run
/// can clean up after a Steward that was SIGKILLed.
pub(crate) fn record(dir: &std::path::Path, fe_id: &str, pid: u32) {
    let Some((_, start)) = stat_of(pid) else {
        return;
    };
    if std::fs::create_dir_all(dir).is_ok() {
        let _ = std::fs::write(dir.join(fe_id), format!("{pid} {start}\n"));
    }
}

pub(crate) fn forget(dir: &std::path::Path, fe_id: &str) {
    let _ = std::fs::remove_file(dir.join(fe_id));
}

/// Kills what workers of a previous run left behind (processes forked by
/// user code survive their worker, keeping its process group) and clears
/// the records. Returns (worker id, processes killed) for each record.
pub(crate) fn reap_leftovers(dir: &std::path::Path) -> Vec<(String, usize)> {
    let mut reaped = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return reaped;
    };
    for e in entries.flatten() {
        let fe_id = e.file_name().to_string_lossy().to_string();
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        let mut parts = text.split_whitespace();
        let (Some(pgid), Some(start)) = (
            parts.next().and_then(|p| p.parse::<u32>().ok()),
            parts.next().and_then(|s| s.parse::<u64>().ok()),
        ) else {
            let _ = std::fs::remove_file(e.path());
            continue;
        };
        // A live leader with another start time means the id was reused: not ours.
        let reused = stat_of(pgid).is_some_and(|(_, s)| s != start);
        let mut killed = 0;
        if !reused {
            let members: Vec<u32> = std::fs::read_dir("/proc")
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|p| p.file_name().to_string_lossy().parse::<u32>().ok())
                .filter(|pid| stat_of(*pid).is_some_and(|(g, _)| g == pgid))
                .collect();
            if !members.is_empty() {
                signal_group(pgid, Signal::SIGKILL);
                killed = members.len();
            }
        }
        let _ = std::fs::remove_file(e.path());
        reaped.push((fe_id, killed));
    }
    reaped
}

/// The (major, minor) version of the Python that runs `bin`, when `bin` is
/// a Python script (its `#!` line names the interpreter). Bounded: the
/// first line is read up to 4 KiB, the interpreter gets 10 s.
pub(crate) async fn probe_python_version(bin: &std::path::Path) -> Option<(String, String)> {
    let path = if bin.components().count() > 1 {
        bin.to_path_buf()
    } else {
        std::env::split_paths(&std::env::var_os("PATH")?)
            .map(|d| d.join(bin))
            .find(|p| p.is_file())?
    };
    let head = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut buf = vec![0u8; 4096];
        let n = std::fs::File::open(&path).ok()?.read(&mut buf).ok()?;
        buf.truncate(n);
        Some(buf)
    })
    .await
    .ok()??;
    let first = String::from_utf8_lossy(&head);
    let interpreter = first
        .lines()
        .next()?
        .strip_prefix("#!")?
        .split_whitespace()
        .next()?
        .to_string();
    if !interpreter.contains("python") {
        return None;
    }
    let out = Command::new(&interpreter)
        .args([
            "-c",
            "import sys; print(sys.version_info[0], sys.version_info[1])",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(10), out)
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut parts = text.split_whitespace();
    let (major, minor) = (parts.next()?, parts.next()?);
    let digits = |s: &str| !s.is_empty() && s.len() <= 4 && s.bytes().all(|b| b.is_ascii_digit());
    (digits(major) && digits(minor)).then(|| (major.to_string(), minor.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_is_never_leased_to_two_live_workers() {
        let first = lease_port(|| Ok(40_001)).expect("lease");
        // The picker offers the leased port again, then another one.
        let mut offers = [40_001u16, 40_002].into_iter();
        let second = lease_port(|| Ok(offers.next().unwrap_or(40_003))).expect("lease");
        assert_eq!((first.0, second.0), (40_001, 40_002));
        assert!(
            lease_port(|| Ok(40_001)).is_err(),
            "only the taken port on offer"
        );
        drop(first);
        let again = lease_port(|| Ok(40_001)).expect("free once its worker is gone");
        assert_eq!(again.0, 40_001);
    }

    #[test]
    fn reads_the_oom_kill_counter() {
        let vmstat = "nr_free_pages 12\noom_kill 3\npgfault 99\n";
        assert_eq!(parse_oom_kills(vmstat), Some(3));
        assert_eq!(parse_oom_kills("nr_free_pages 1\n"), None);
        assert!(
            oom_kill_count().is_some(),
            "this kernel exposes oom_kill in /proc/vmstat"
        );
    }
}
