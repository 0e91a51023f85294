//! The OCI runtime's command line (`runc`; `runsc` for gVisor and
//! `kata-runtime` for Kata take the same one): `--version`, `create`,
//! `start`, `kill`, `delete`, `list`, each with Steward's own `--root` so
//! that its containers are never mixed with anyone else's. Every call is
//! bounded in time ([`COMMAND_TIMEOUT`]) and blocks: callers run it off
//! the agent's runtime thread.
//!
//! Must not know about: bundles' contents, cgroups, workers.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;

/// Longest one runtime command may take before it is killed and its
/// operation fails (a `create` sets up namespaces, mounts and cgroups:
/// tens of milliseconds, seconds on a loaded host).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest `<runtime> --version` may take at start.
pub const VERSION_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of a failed command's output kept for its error.
const ERROR_OUTPUT_BYTES: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("running {runtime} {command}: {error}")]
    Spawn {
        runtime: PathBuf,
        command: String,
        error: std::io::Error,
    },
    #[error("{runtime} {command} did not finish within {}s and was killed", .limit.as_secs())]
    Timeout {
        runtime: PathBuf,
        command: String,
        limit: Duration,
    },
    #[error("{runtime} {command} failed ({status}): {output}")]
    Failed {
        runtime: PathBuf,
        command: String,
        status: String,
        output: String,
    },
    #[error("{runtime} {command} answered what is not its JSON: {error}")]
    Parse {
        runtime: PathBuf,
        command: String,
        error: serde_json::Error,
    },
}

/// One container as `list` reports it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Container {
    pub id: String,
    #[serde(default)]
    pub pid: i64,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub bundle: PathBuf,
    #[serde(default)]
    pub annotations: Option<HashMap<String, String>>,
}

/// An OCI runtime with Steward's state root.
#[derive(Debug, Clone)]
pub struct Runtime {
    bin: PathBuf,
    root: PathBuf,
}

/// What a finished command left: exit status text and its output.
struct Finished {
    success: bool,
    status: String,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

/// Runs `cmd` to its end or until `limit`, collecting its output.
fn run(cmd: &mut Command, limit: Duration) -> std::io::Result<Option<Finished>> {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    // Readers drain the pipes while the command runs (a full pipe would
    // stall it).
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let Some(status) = wait_bounded(&mut child, limit)? else {
        return Ok(None);
    };
    Ok(Some(Finished {
        success: status.success(),
        status: crate::describe_status(&status),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }))
}

/// Waits for `child` up to `limit` (polling, from 1 ms up to 10 ms apart:
/// runtime commands take milliseconds); kills it past the limit.
fn wait_bounded(
    child: &mut std::process::Child,
    limit: Duration,
) -> std::io::Result<Option<std::process::ExitStatus>> {
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(Some(s));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(10));
    }
}

/// The last [`ERROR_OUTPUT_BYTES`] of a command's output, as text.
fn tail(bytes: &[u8]) -> String {
    let start = bytes.len().saturating_sub(ERROR_OUTPUT_BYTES);
    String::from_utf8_lossy(&bytes[start..]).trim().to_string()
}

/// At most the last [`ERROR_OUTPUT_BYTES`] of the file at `path` (empty when
/// it cannot be read): a log is never read whole, whatever its size.
fn read_tail(path: &Path) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let keep = ERROR_OUTPUT_BYTES as u64;
    if f.seek(SeekFrom::Start(len.saturating_sub(keep))).is_err() {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(ERROR_OUTPUT_BYTES);
    let _ = f.take(keep).read_to_end(&mut out);
    out
}

/// Runs `cmd` (`bin` `command`) within `limit`: what it left, or why it
/// did not finish.
fn finish(
    bin: &Path,
    command: &str,
    cmd: &mut Command,
    limit: Duration,
) -> Result<Finished, RuntimeError> {
    run(cmd, limit)
        .map_err(|error| RuntimeError::Spawn {
            runtime: bin.to_path_buf(),
            command: command.to_string(),
            error,
        })?
        .ok_or_else(|| RuntimeError::Timeout {
            runtime: bin.to_path_buf(),
            command: command.to_string(),
            limit,
        })
}

/// `<runtime> --version`: its first line, or why the runtime cannot be used.
pub fn version(bin: &Path) -> Result<String, RuntimeError> {
    let command = "--version".to_string();
    let done = finish(
        bin,
        &command,
        Command::new(bin).arg("--version"),
        VERSION_TIMEOUT,
    )?;
    let text = String::from_utf8_lossy(&done.stdout);
    let first = text.lines().next().unwrap_or("").trim().to_string();
    if !done.success || first.is_empty() {
        return Err(RuntimeError::Failed {
            runtime: bin.to_path_buf(),
            command,
            status: done.status,
            output: tail(&[done.stdout, done.stderr].concat()),
        });
    }
    Ok(first)
}

/// What systemd hands Steward (its notify socket, watchdog, socket
/// activation) is Steward's, never the runtime's: runc given
/// `NOTIFY_SOCKET` passes a socket into the container and `runc start`
/// waits for the container to say READY=1, which a worker never does.
fn without_service_manager(c: &mut Command) {
    for var in [
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
    ] {
        c.env_remove(var);
    }
}

impl Runtime {
    pub fn new(bin: PathBuf, root: PathBuf) -> Runtime {
        Runtime { bin, root }
    }

    pub fn bin(&self) -> &Path {
        &self.bin
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--root").arg(&self.root).stdin(Stdio::null());
        without_service_manager(&mut c);
        c
    }

    /// Runs `<runtime> --root R <args>`; its stdout on success.
    fn call(&self, mut cmd: Command, what: &str) -> Result<Vec<u8>, RuntimeError> {
        let command = what.to_string();
        let done = finish(&self.bin, what, &mut cmd, COMMAND_TIMEOUT)?;
        if !done.success {
            return Err(RuntimeError::Failed {
                runtime: self.bin.clone(),
                command,
                status: done.status,
                output: tail(&[done.stdout, done.stderr].concat()),
            });
        }
        Ok(done.stdout)
    }

    /// `create`: the container is set up and its init waits for `start`.
    /// The container's process gets `stdio` as its stdout and stderr (no
    /// terminal); the runtime's own messages go to `log`.
    pub fn create(
        &self,
        id: &str,
        bundle: &Path,
        pid_file: &Path,
        stdio: &File,
        log: &Path,
    ) -> Result<(), RuntimeError> {
        let mut c = Command::new(&self.bin);
        without_service_manager(&mut c);
        c.arg("--root")
            .arg(&self.root)
            .arg("--log")
            .arg(log)
            .args(["create", "--bundle"])
            .arg(bundle)
            .arg("--pid-file")
            .arg(pid_file)
            .arg(id)
            .stdin(Stdio::null());
        // The container inherits the command's stdio when detached; the
        // command's own output is read from its log on failure.
        let out = stdio.try_clone().map_err(|error| RuntimeError::Spawn {
            runtime: self.bin.clone(),
            command: "create".into(),
            error,
        })?;
        let err = stdio.try_clone().map_err(|error| RuntimeError::Spawn {
            runtime: self.bin.clone(),
            command: "create".into(),
            error,
        })?;
        c.stdout(out).stderr(err);
        let done = c
            .spawn()
            .and_then(|mut child| wait_bounded(&mut child, COMMAND_TIMEOUT))
            .map_err(|error| RuntimeError::Spawn {
                runtime: self.bin.clone(),
                command: "create".into(),
                error,
            })?;
        match done {
            None => Err(RuntimeError::Timeout {
                runtime: self.bin.clone(),
                command: "create".into(),
                limit: COMMAND_TIMEOUT,
            }),
            Some(s) if s.success() => Ok(()),
            Some(s) => Err(RuntimeError::Failed {
                runtime: self.bin.clone(),
                command: "create".into(),
                status: crate::describe_status(&s),
                output: tail(&read_tail(log)),
            }),
        }
    }

    /// `start`: the container's process runs.
    pub fn start(&self, id: &str) -> Result<(), RuntimeError> {
        let mut c = self.command();
        c.args(["start", id]);
        self.call(c, "start").map(drop)
    }

    /// `kill` with a signal name (`KILL`, `TERM`).
    pub fn kill(&self, id: &str, signal: &str) -> Result<(), RuntimeError> {
        let mut c = self.command();
        c.args(["kill", id, signal]);
        self.call(c, "kill").map(drop)
    }

    /// `delete --force`: kills what still runs and removes the container's
    /// state and cgroups.
    pub fn delete(&self, id: &str) -> Result<(), RuntimeError> {
        let mut c = self.command();
        c.args(["delete", "--force", id]);
        self.call(c, "delete").map(drop)
    }

    /// Every container under Steward's root.
    pub fn list(&self) -> Result<Vec<Container>, RuntimeError> {
        if !self.root.exists() {
            return Ok(Vec::new());
        }
        let mut c = self.command();
        c.args(["list", "--format", "json"]);
        let out = self.call(c, "list")?;
        parse_list(&out).map_err(|error| RuntimeError::Parse {
            runtime: self.bin.clone(),
            command: "list".into(),
            error,
        })
    }
}

/// `list --format json`: an array of containers, or `null` when there are none.
pub fn parse_list(out: &[u8]) -> Result<Vec<Container>, serde_json::Error> {
    let text = String::from_utf8_lossy(out);
    let text = text.trim();
    if text.is_empty() || text == "null" {
        return Ok(Vec::new());
    }
    serde_json::from_str::<Vec<Container>>(text)
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_the_tail_of_a_large_log_is_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("log");
        let mut body = vec![b'a'; 10 * ERROR_OUTPUT_BYTES];
        body.extend_from_slice(b"the error");
        std::fs::write(&log, &body).expect("write");
        let got = read_tail(&log);
        assert_eq!(got.len(), ERROR_OUTPUT_BYTES);
        assert!(got.ends_with(b"the error"));
        assert!(read_tail(&dir.path().join("missing")).is_empty());
    }

    use super::*;

    #[test]
    fn lists_parse_with_and_without_annotations() {
        assert_eq!(parse_list(b"null\n").expect("null"), Vec::new());
        assert_eq!(parse_list(b"").expect("empty"), Vec::new());
        let out = br#"[{"ociVersion":"1.0.2-dev","id":"a","pid":7,"status":"running","bundle":"/b/a","rootfs":"/b/a/rootfs","created":"2026-12-06T15:06:22Z","owner":"root"},
            {"id":"b","pid":0,"status":"stopped","bundle":"/b/b","annotations":{"io.steward.executor-id":"e1"}}]"#;
        let list = parse_list(out).expect("list");
        assert_eq!(list.len(), 2);
        assert_eq!((list[0].id.as_str(), list[0].pid), ("a", 7));
        assert_eq!(list[0].annotations, None);
        assert_eq!(
            list[1]
                .annotations
                .as_ref()
                .and_then(|a| a.get("io.steward.executor-id"))
                .map(String::as_str),
            Some("e1")
        );
        assert!(parse_list(b"{not json").is_err());
    }

    #[test]
    fn a_runtime_that_does_not_answer_version_is_refused_with_the_reason() {
        let missing = version(Path::new("/nonexistent/runsc")).expect_err("missing");
        assert!(
            missing.to_string().contains("/nonexistent/runsc"),
            "{missing}"
        );
        let failing = version(Path::new("/bin/false")).expect_err("false");
        assert!(failing.to_string().contains("failed"), "{failing}");
        if Path::new("/bin/echo").exists() {
            assert!(!version(Path::new("/bin/echo")).expect("echo").is_empty());
        }
    }
}
