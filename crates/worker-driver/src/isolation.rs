//! What keeps workers apart from Steward and from each other, as a driver
//! is configured with it: identities ([`IdentitySetup`]), the channel kind,
//! the variables workers inherit, and the directories. Under the worker
//! run directory (`--worker-run-dir`) live the uid lease locks (`uids/`,
//! shared by every Steward that uses the directory) and one directory per
//! Steward (its executor id, hashed), `0711`, holding one directory per
//! live worker: `w<uid>/`, `0700` and the worker's, with the channel's
//! socket `fe.sock` and the scratch directory `home/` (`HOME`, `TMPDIR`).
//! A worker's directory goes when the worker ends; what a SIGKILLed
//! Steward left is swept at its next start.
//!
//! Must not know about: gRPC, the server, allocations.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::channel::{ChannelKind, socket_path_fits};
use crate::identity::{EnvAllow, IdentitySetup};

/// Name of a worker's socket in its directory.
pub(crate) const SOCKET: &str = "fe.sock";

/// Why the worker run directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    #[error("creating {path}: {error}")]
    Create {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("{path} belongs to uid {uid}, not to Steward's uid {euid}")]
    NotStewards { path: PathBuf, uid: u32, euid: u32 },
    #[error("chmod 0711 {path}: {error}")]
    Chmod {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "{path} is mode {mode:04o}: workers, running under their own uids, could not reach their directories below it (choose another --worker-run-dir)"
    )]
    Unreachable { path: PathBuf, mode: u32 },
    #[error(
        "{0} is too long for a Unix socket path ({max} bytes at most): choose a shorter --worker-run-dir",
        max = crate::channel::MAX_SOCKET_PATH
    )]
    TooLong(PathBuf),
}

/// How workers are kept apart (see the module docs).
#[derive(Debug, Clone)]
pub struct Isolation {
    pub identities: IdentitySetup,
    pub channel: ChannelKind,
    pub env_allow: EnvAllow,
    /// The worker run directory (`--worker-run-dir`).
    pub base: PathBuf,
    /// This Steward's directory below `base`.
    pub run_dir: PathBuf,
}

impl Isolation {
    /// Isolation under `base` for the Steward of `executor_id`.
    pub fn new(
        base: &Path,
        executor_id: &str,
        identities: IdentitySetup,
        channel: ChannelKind,
        env_allow: EnvAllow,
    ) -> Isolation {
        Isolation {
            identities,
            channel,
            env_allow,
            base: base.to_path_buf(),
            run_dir: base.join(instance_name(executor_id)),
        }
    }

    /// Workers as Steward's own user on a Unix socket under `base`, for
    /// embedders and tests that configure nothing: why they are not separated.
    pub fn unseparated(base: &Path, why: &str) -> Isolation {
        Isolation::new(
            base,
            "agent",
            IdentitySetup::NotSeparated(why.to_string()),
            ChannelKind::Unix,
            EnvAllow::default(),
        )
    }

    /// The worker run directory unless one is given: `/var/lib/steward-workers`
    /// as root, else `<temp dir>/steward-workers-<uid>`.
    pub fn default_base() -> PathBuf {
        match crate::identity::steward_uid() {
            0 => PathBuf::from("/var/lib/steward-workers"),
            uid => std::env::temp_dir().join(format!("steward-workers-{uid}")),
        }
    }

    /// The run directory of executor `executor_id`'s workers under the
    /// default base (what a killed Steward leaves for its next start to
    /// sweep; tests and the bench remove it after theirs).
    pub fn default_run_dir(executor_id: &str) -> PathBuf {
        Isolation::default_base().join(instance_name(executor_id))
    }

    /// This Steward's instance name (`e-<hash of its executor id>`), as its
    /// directory and its workers' cgroups are marked.
    pub(crate) fn instance(&self) -> String {
        self.run_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Where uid leases are locked, host-wide; `None` without identities.
    pub(crate) fn lock_dir(&self) -> Option<PathBuf> {
        self.identities.range().map(|_| self.base.join("uids"))
    }

    /// Creates the directories (the base and this Steward's `0711`, the
    /// locks `0700`) and checks them: the base must be Steward's and
    /// writable by nobody else (or another user could swap a worker's
    /// directory), every directory above it searchable by workers, and a
    /// socket path must fit `sun_path`. Idempotent.
    pub fn prepare(&self) -> Result<(), RunDirError> {
        let euid = crate::identity::steward_uid();
        let separated = self.identities.range().is_some();
        for dir in std::iter::once(&self.base).chain(std::iter::once(&self.run_dir)) {
            let path = || dir.to_path_buf();
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o711)
                .create(dir)
                .map_err(|error| RunDirError::Create {
                    path: path(),
                    error,
                })?;
            let meta = std::fs::symlink_metadata(dir).map_err(|error| RunDirError::Io {
                path: path(),
                error,
            })?;
            if !meta.is_dir() {
                return Err(RunDirError::NotADirectory(path()));
            }
            if meta.uid() != euid {
                return Err(RunDirError::NotStewards {
                    path: path(),
                    uid: meta.uid(),
                    euid,
                });
            }
            if meta.mode() & 0o7777 != 0o711 {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).map_err(
                    |error| RunDirError::Chmod {
                        path: path(),
                        error,
                    },
                )?;
            }
        }
        if let Some(locks) = self.lock_dir() {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&locks)
                .or_else(|e| match e.kind() {
                    std::io::ErrorKind::AlreadyExists => Ok(()),
                    _ => Err(e),
                })
                .map_err(|error| RunDirError::Create {
                    path: locks.clone(),
                    error,
                })?;
        }
        if separated {
            let mut above = self.base.parent();
            while let Some(p) = above {
                if let Ok(m) = std::fs::metadata(p)
                    && m.mode() & 0o001 == 0
                {
                    return Err(RunDirError::Unreachable {
                        path: p.to_path_buf(),
                        mode: m.mode() & 0o7777,
                    });
                }
                above = p.parent();
            }
        }
        let longest = self.run_dir.join(format!("w{}", u32::MAX)).join(SOCKET);
        if !socket_path_fits(&longest) {
            return Err(RunDirError::TooLong(longest));
        }
        Ok(())
    }

    /// Removes what workers of an earlier run of this Steward left in its
    /// directory (after their processes were killed).
    pub(crate) fn sweep(&self) -> usize {
        self.sweep_except(&[])
    }

    /// [`Isolation::sweep`], sparing the worker directories named in
    /// `spare` (`w<lease>` of adopted workers).
    pub(crate) fn sweep_except(&self, spare: &[String]) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.run_dir) else {
            return 0;
        };
        let mut removed = 0;
        for e in entries.filter_map(Result::ok) {
            if spare
                .iter()
                .any(|s| std::ffi::OsStr::new(s) == e.file_name())
            {
                continue;
            }
            let path = e.path();
            let gone = match e.file_type() {
                Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
                _ => std::fs::remove_file(&path),
            };
            match gone {
                Ok(()) => removed += 1,
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "cannot remove a leftover worker directory")
                }
            }
        }
        removed
    }

    /// Removes this Steward's directory once every worker is gone (also
    /// by the agent when its start fails after [`Isolation::prepare`]).
    pub fn remove(&self) {
        self.sweep();
        let _ = std::fs::remove_dir(&self.run_dir);
    }
}

/// This Steward's directory name: its executor id, hashed (FNV-1a), so any
/// id makes a short, safe name.
fn instance_name(executor_id: &str) -> String {
    format!("e-{:016x}", crate::fnv1a(executor_id))
}

/// One live worker's directory: `0700`, owned by the worker's uid where it
/// has one. Removed (with all the worker wrote there) when dropped.
#[derive(Debug)]
pub(crate) struct WorkerDir {
    path: PathBuf,
}

impl WorkerDir {
    /// Creates `<run dir>/w<id>/` and its `home/` (a stale one of the same
    /// name, left by a crash, goes first).
    pub(crate) fn create(
        run_dir: &Path,
        id: u32,
        owner: Option<u32>,
    ) -> std::io::Result<WorkerDir> {
        let path = run_dir.join(Self::name(id));
        let at = |what: &str, p: &Path, e: std::io::Error| {
            std::io::Error::new(e.kind(), format!("{what} {}: {e}", p.display()))
        };
        match std::fs::remove_dir_all(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(at("removing stale", &path, e)),
        }
        let dir = WorkerDir { path };
        let home = dir.home();
        for p in [&dir.path, &home] {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(p)
                .map_err(|e| at("creating", p, e))?;
            // The mode is set again: the umask may have taken bits off.
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| at("chmod 0700", p, e))?;
        }
        // `home` is given away before its parent: until the parent is the
        // worker's, no process of that uid can swap `home` for a symlink that
        // the by-path chown would follow.
        if let Some(uid) = owner {
            for p in [&home, &dir.path] {
                std::os::unix::fs::chown(p, Some(uid), Some(uid)).map_err(|e| at("chown", p, e))?;
            }
        }
        Ok(dir)
    }

    /// The directory of an adopted worker (`w<lease>` under `run_dir`),
    /// as it is: it must exist, be a directory and not a link.
    pub(crate) fn existing(run_dir: &Path, lease: u32) -> std::io::Result<WorkerDir> {
        let path = run_dir.join(Self::name(lease));
        let meta = std::fs::symlink_metadata(&path)?;
        if !meta.is_dir() {
            return Err(std::io::Error::other(format!(
                "{} is not a directory",
                path.display()
            )));
        }
        Ok(WorkerDir { path })
    }

    /// The name of the directory of the worker holding `lease`.
    pub(crate) fn name(lease: u32) -> String {
        format!("w{lease}")
    }

    /// Leaves the directory where it is (its worker lives on, detached).
    pub(crate) fn keep(self) {
        std::mem::forget(self);
    }

    /// The scratch directory: `HOME` and `TMPDIR`.
    pub(crate) fn home(&self) -> PathBuf {
        self.path.join("home")
    }

    /// Where the worker listens.
    pub(crate) fn socket(&self) -> PathBuf {
        self.path.join(SOCKET)
    }
}

impl Drop for WorkerDir {
    fn drop(&mut self) {
        match std::fs::remove_dir_all(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                tracing::warn!(path = %self.path.display(), %error, "cannot remove a worker's directory")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_are_made_with_their_modes_and_removed_with_the_worker() {
        let tmp = tempfile::tempdir().expect("tmp");
        let iso = Isolation::unseparated(&tmp.path().join("run"), "test");
        iso.prepare().expect("prepare");
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").mode() & 0o7777;
        assert_eq!(mode(&iso.base), 0o711);
        assert_eq!(mode(&iso.run_dir), 0o711);
        let dir = WorkerDir::create(&iso.run_dir, 7, None).expect("worker dir");
        assert_eq!(mode(&dir.path), 0o700);
        assert_eq!(mode(&dir.home()), 0o700);
        assert!(dir.socket().starts_with(&dir.path));
        std::fs::write(dir.home().join("scratch"), b"x").expect("write");
        let path = dir.path.clone();
        drop(dir);
        assert!(!path.exists(), "removed with the worker");
        // A leftover of a crash is swept.
        std::mem::forget(WorkerDir::create(&iso.run_dir, 8, None).expect("dir"));
        assert_eq!(iso.sweep(), 1);
        iso.remove();
        assert!(!iso.run_dir.exists());
    }

    #[test]
    fn a_run_directory_too_long_for_a_socket_is_refused() {
        let tmp = tempfile::tempdir().expect("tmp");
        let iso = Isolation::unseparated(&tmp.path().join("x".repeat(90)), "test");
        let e = iso.prepare().expect_err("too long");
        assert!(matches!(e, RunDirError::TooLong(_)), "{e}");
        assert!(e.to_string().contains("too long"), "{e}");
    }

    #[test]
    fn instance_names_are_short_and_distinct() {
        assert_ne!(instance_name("a"), instance_name("b"));
        assert_eq!(instance_name(&"x".repeat(1000)).len(), 18);
    }
}
