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
}

/// Picks a free localhost port by binding port 0 (the worker binds it a
/// moment later; a lost race shows up as a connect failure and a retry by
/// the server).
fn free_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

pub(crate) fn spawn(
    config: &AgentConfig,
    fe_id: &str,
    gpus: &[String],
) -> Result<FeProcess, String> {
    let port = free_port().map_err(|e| format!("picking a port for the worker: {e}"))?;
    let address = format!("127.0.0.1:{port}");
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
    let child = cmd
        .spawn()
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
    })
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
