//! Who a worker is: its own unprivileged uid and gid, leased from a range
//! so that no two live workers (of this Steward or of another one sharing
//! the host's lease directory) ever share one, and the credentials, umask
//! and environment it execs with. Shared by every driver: the process
//! driver switches to the identity between fork and exec ([`Creds::apply`]),
//! a sandbox driver hands the same uid to its runtime.
//!
//! Also here: the checks that keep Steward's own files from workers (the
//! data directory is `0700` and Steward's), and the group through which
//! workers share `file://` blob roots ([`share_with_workers`]).
//!
//! Must not know about: gRPC, the server, allocations.

use std::collections::{BTreeSet, HashSet};
use std::ffi::OsString;
use std::fs::File;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// First id of the default worker range. The range sits above what
/// distributions hand out (system accounts below 1000, people 1000-60000,
/// `nobody` 65534, systemd's dynamic users 61184-65519, `useradd`'s
/// subordinate ids for user namespaces from 100000 up to 600100000 by
/// default, systemd-nspawn's container ranges 524288-1879048191) and below
/// 2^31 (tools that read uids as signed numbers) and systemd's "foreign"
/// range at 0x7FFE0000, so no account or container on a usual host owns it.
pub const DEFAULT_UID_RANGE_START: u32 = 2_000_000_000;

/// Ids in the default range: the first is the blob group, the other 65,535
/// are workers' uids (gid = uid).
pub const DEFAULT_UID_RANGE_COUNT: u32 = 65_536;

/// The ids workers get: `first` is the group every worker has as a
/// supplementary group, through which they share `file://` blob roots;
/// `first + 1 ..= last()` are handed out as uid and gid (the same number)
/// of one live worker each. Written `START:COUNT`, as `/etc/subuid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidRange {
    pub first: u32,
    pub count: u32,
}

impl Default for UidRange {
    fn default() -> Self {
        UidRange {
            first: DEFAULT_UID_RANGE_START,
            count: DEFAULT_UID_RANGE_COUNT,
        }
    }
}

impl UidRange {
    /// The last id of the range.
    pub fn last(&self) -> u32 {
        self.first + (self.count - 1)
    }

    /// The shared group of `file://` blob roots.
    pub fn blob_gid(&self) -> u32 {
        self.first
    }

    pub fn contains(&self, id: u32) -> bool {
        id >= self.first && id <= self.last()
    }

    /// `"2000000001-2000065535"`: the ids handed to workers.
    pub fn workers_text(&self) -> String {
        format!("{}-{}", self.first + 1, self.last())
    }
}

impl std::fmt::Display for UidRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.first, self.count)
    }
}

impl std::str::FromStr for UidRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (start, count) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?}: expected START:COUNT, as in /etc/subuid"))?;
        let first: u32 = start
            .trim()
            .parse()
            .map_err(|e| format!("{s:?}: start {start:?}: {e}"))?;
        let count: u32 = count
            .trim()
            .parse()
            .map_err(|e| format!("{s:?}: count {count:?}: {e}"))?;
        if count < 2 {
            return Err(format!(
                "{s:?}: at least 2 ids (the blob group and one worker)"
            ));
        }
        let Some(last) = first.checked_add(count - 1) else {
            return Err(format!("{s:?}: passes the largest uid"));
        };
        // 0 is root; 65535 and 2^32-1 read as "no change" (-1) to 16- and
        // 32-bit set*id calls.
        for bad in [0, 65_535, u32::MAX] {
            if (first..=last).contains(&bad) {
                return Err(format!("{s:?}: contains {bad}, which no worker may have"));
            }
        }
        Ok(UidRange { first, count })
    }
}

/// Steward's effective uid.
pub fn steward_uid() -> u32 {
    #[allow(unsafe_code)]
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe {
        libc::geteuid()
    }
}

/// Whether workers run under their own identities, and if not, why.
#[derive(Debug, Clone)]
pub enum IdentitySetup {
    /// Each worker gets a uid/gid of the range.
    Separated(UidRange),
    /// Workers run as Steward's own user: why (no root, opted out).
    NotSeparated(String),
}

impl IdentitySetup {
    /// Separated where Steward runs as root (it needs `CAP_SETUID` and
    /// `CAP_SETGID` to switch), unless `opt_out` says why not.
    pub fn detect(range: UidRange, opt_out: Option<&str>) -> IdentitySetup {
        if let Some(why) = opt_out {
            return IdentitySetup::NotSeparated(why.to_string());
        }
        let euid = steward_uid();
        if euid != 0 {
            return IdentitySetup::NotSeparated(format!(
                "Steward runs as uid {euid}, not root, so it cannot start processes under other uids: workers run as Steward's own user and can reach what it can (its data directory, its environment, each other)"
            ));
        }
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        if let Some(missing) = missing_setid_caps(&status) {
            return IdentitySetup::NotSeparated(format!(
                "Steward runs as root without {missing} (a container that drops them?), so it cannot switch workers to other uids"
            ));
        }
        for (map, what) in [("/proc/self/uid_map", "uid"), ("/proc/self/gid_map", "gid")] {
            let text = std::fs::read_to_string(map).unwrap_or_default();
            if !maps_range(&text, range) {
                return IdentitySetup::NotSeparated(format!(
                    "the worker range {range} is not all mapped in Steward's user namespace ({map}: {}), so no worker could take a {what} of it; choose a --worker-uid-range inside the mapping",
                    text.split_whitespace().collect::<Vec<_>>().join(" ")
                ));
            }
        }
        IdentitySetup::Separated(range)
    }

    pub fn range(&self) -> Option<UidRange> {
        match self {
            IdentitySetup::Separated(r) => Some(*r),
            IdentitySetup::NotSeparated(_) => None,
        }
    }
}

/// `CAP_SETUID` and `CAP_SETGID` (bits 7 and 6 of `CapEff` in
/// `/proc/self/status`): the names of those missing, if any.
fn missing_setid_caps(status: &str) -> Option<String> {
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let missing: Vec<&str> = [(7, "CAP_SETUID"), (6, "CAP_SETGID")]
        .into_iter()
        .filter(|(bit, _)| eff & (1 << bit) == 0)
        .map(|(_, name)| name)
        .collect();
    (!missing.is_empty()).then(|| missing.join(" and "))
}

/// Whether a `uid_map`/`gid_map` (lines `inside outside count`) maps every
/// id of `range` inside the namespace.
fn maps_range(map: &str, range: UidRange) -> bool {
    let (first, last) = (u64::from(range.first), u64::from(range.last()));
    map.lines().any(|line| {
        let f: Vec<u64> = line
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        matches!(f[..], [inside, _, count] if inside <= first && last < inside + count)
    })
}

/// Ids leased to live workers of this process.
static LEASED: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

/// One id of the range, held by one live worker until dropped. Also held
/// host-wide while `lock` is open (an exclusive `flock` on
/// `<lease dir>/<id>`, which the kernel releases if Steward dies).
#[derive(Debug)]
pub struct UidLease {
    id: u32,
    _lock: Option<File>,
}

impl UidLease {
    /// The worker's uid and gid (or, where identities are not separated,
    /// the number naming its directory).
    pub fn id(&self) -> u32 {
        self.id
    }
}

impl Drop for UidLease {
    fn drop(&mut self) {
        if let Ok(mut leased) = LEASED.lock() {
            leased.remove(&self.id);
        }
    }
}

/// Leases the lowest id of `range` (its blob group excepted) that no live
/// worker holds: not in this process's table, not locked by another
/// Steward in `lock_dir`, and not the uid of any running process
/// (`in_use`: a leftover of a SIGKILLed Steward that escaped its worker's
/// group keeps its uid from every new worker).
pub fn lease(
    range: UidRange,
    lock_dir: Option<&Path>,
    in_use: &dyn Fn() -> HashSet<u32>,
) -> std::io::Result<UidLease> {
    let mut leased = LEASED
        .lock()
        .map_err(|_| std::io::Error::other("uid lease table poisoned"))?;
    let mut running: Option<HashSet<u32>> = None;
    let mut locked_elsewhere = 0u32;
    for id in range.first + 1..=range.last() {
        if leased.contains(&id) {
            continue;
        }
        let lock = match lock_dir {
            Some(dir) => match try_lock(&dir.join(id.to_string()))? {
                Some(f) => Some(f),
                None => {
                    locked_elsewhere += 1;
                    continue;
                }
            },
            None => None,
        };
        if running.get_or_insert_with(in_use).contains(&id) {
            continue;
        }
        leased.insert(id);
        return Ok(UidLease { id, _lock: lock });
    }
    Err(std::io::Error::other(format!(
        "every worker uid of {range} is taken ({} by live workers here, {locked_elsewhere} by another Steward, the rest by running processes)",
        leased.len()
    )))
}

/// Leases id `id` again for a worker being adopted (started by an earlier
/// run of Steward, whose locks died with it): refused if a live worker of
/// this process holds it or another Steward has it locked.
pub fn lease_exact(id: u32, lock_dir: Option<&Path>) -> std::io::Result<UidLease> {
    let mut leased = LEASED
        .lock()
        .map_err(|_| std::io::Error::other("uid lease table poisoned"))?;
    if leased.contains(&id) {
        return Err(std::io::Error::other(format!(
            "id {id} is leased to another worker of this Steward"
        )));
    }
    let lock = match lock_dir {
        Some(dir) => Some(try_lock(&dir.join(id.to_string()))?.ok_or_else(|| {
            std::io::Error::other(format!("id {id} is locked by another Steward"))
        })?),
        None => None,
    };
    leased.insert(id);
    Ok(UidLease { id, _lock: lock })
}

/// An exclusive, non-blocking `flock` on `path` (created if missing);
/// `None` when someone else holds it.
fn try_lock(path: &Path) -> std::io::Result<Option<File>> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    use std::os::fd::AsRawFd;
    #[allow(unsafe_code)]
    // SAFETY: flock on a file descriptor this function owns; the lock
    // lasts until the file is closed.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(Some(f));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Ok(None);
    }
    Err(std::io::Error::new(
        e.kind(),
        format!("locking {}: {e}", path.display()),
    ))
}

/// The uids of running processes (the owners of `/proc/<pid>`).
pub fn running_uids() -> HashSet<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return HashSet::new();
    };
    dir.filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.uid())
        .collect()
}

/// The credentials a worker execs with. Built before the fork (it
/// allocates nothing afterwards); [`Creds::apply`] runs in the child.
#[derive(Debug, Clone, Copy)]
pub struct Creds {
    /// uid and gid to switch to; `None` where identities are not separated
    /// (the worker keeps Steward's, and still gets the rest).
    id: Option<u32>,
    /// The blob group, the worker's only supplementary group.
    blob_gid: u32,
    /// Highest capability number the kernel knows.
    cap_last: u32,
}

impl Creds {
    pub fn new(id: Option<u32>, range: Option<UidRange>) -> Creds {
        let cap_last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(63);
        Creds {
            id,
            blob_gid: range.map_or(0, |r| r.blob_gid()),
            cap_last,
        }
    }

    /// Between fork and exec (async-signal-safe system calls only): drops
    /// every capability from the bounding set (where Steward holds
    /// `CAP_SETPCAP`), sets the groups to the blob
    /// group alone, the gid and then the uid (real, effective and saved)
    /// to the worker's, clears the ambient and inheritable sets (the
    /// permitted and effective ones went with uid 0), forbids gaining
    /// privileges through exec (`PR_SET_NO_NEW_PRIVS`), and sets umask 077.
    /// Without an id only the last two apply.
    ///
    /// # Safety
    /// Call only in a forked child before exec.
    #[allow(unsafe_code)]
    pub unsafe fn apply(&self) -> std::io::Result<()> {
        let fail = || Err(std::io::Error::last_os_error());
        // SAFETY: plain system calls on values owned by this frame.
        unsafe {
            if let Some(id) = self.id {
                for cap in 0..=self.cap_last.min(63) {
                    // Past the kernel's last (EINVAL), or without
                    // CAP_SETPCAP (EPERM): under PR_SET_NO_NEW_PRIVS no exec
                    // can raise a capability from it anyway.
                    let _ = libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0);
                }
                let groups: [libc::gid_t; 1] = [self.blob_gid];
                if libc::syscall(libc::SYS_setgroups, 1 as libc::c_long, groups.as_ptr()) != 0 {
                    return fail();
                }
                if libc::syscall(libc::SYS_setresgid, id, id, id) != 0 {
                    return fail();
                }
                if libc::syscall(libc::SYS_setresuid, id, id, id) != 0 {
                    return fail();
                }
                // Dropping uid 0 cleared the permitted, effective and
                // ambient sets; the inheritable one stays unless cleared.
                let _ = libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_CLEAR_ALL,
                    0,
                    0,
                    0,
                );
                let mut header = CapHeader {
                    version: LINUX_CAPABILITY_VERSION_3,
                    pid: 0,
                };
                let data = [CapData::default(); 2];
                if libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) != 0 {
                    return fail();
                }
                if libc::syscall(libc::SYS_getuid) as u32 != id
                    || libc::syscall(libc::SYS_geteuid) as u32 != id
                {
                    return Err(std::io::Error::other("the uid did not change"));
                }
            }
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return fail();
            }
            libc::umask(0o077);
        }
        Ok(())
    }
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Variables of Steward's environment a worker inherits by default (a
/// trailing `*` matches a prefix): where programs are, the locale and
/// time zone, CA bundles and proxies to reach blob storage, and the
/// library path (CUDA installations need it). Everything else (cloud
/// credentials, tokens, Steward's own settings) stays with Steward.
pub const DEFAULT_ENV_ALLOW: &[&str] = &[
    "PATH",
    "LANG",
    "LANGUAGE",
    "LC_*",
    "TZ",
    "TZDIR",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "LD_LIBRARY_PATH",
];

/// Which of Steward's variables workers inherit: names, or prefixes
/// written `PREFIX*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvAllow(Vec<String>);

impl Default for EnvAllow {
    fn default() -> Self {
        EnvAllow(DEFAULT_ENV_ALLOW.iter().map(|s| s.to_string()).collect())
    }
}

impl EnvAllow {
    /// The defaults plus `extra` (names or `PREFIX*`).
    pub fn with(extra: &[String]) -> EnvAllow {
        let mut a = EnvAllow::default();
        a.0.extend(extra.iter().filter(|s| !s.is_empty()).cloned());
        a
    }

    pub fn allows(&self, name: &str) -> bool {
        self.0.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => name == p,
        })
    }

    pub fn entries(&self) -> &[String] {
        &self.0
    }
}

/// A worker's whole environment: the allowed part of `inherited`, then
/// `HOME`, `TMPDIR` (and `TMP`, `TEMP`) set to its scratch directory,
/// `USER` and `LOGNAME` naming its uid where it has its own, then `own`
/// (the worker description's variables, which win).
pub fn worker_env(
    allow: &EnvAllow,
    inherited: impl IntoIterator<Item = (OsString, OsString)>,
    scratch: &Path,
    uid: Option<u32>,
    own: &[(String, String)],
) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = inherited
        .into_iter()
        .filter(|(k, _)| k.to_str().is_some_and(|k| allow.allows(k)))
        .collect();
    let mut set = |k: &str, v: OsString| {
        env.retain(|(e, _)| e != k);
        env.push((k.into(), v));
    };
    for k in ["HOME", "TMPDIR", "TMP", "TEMP"] {
        set(k, scratch.as_os_str().to_owned());
    }
    if let Some(uid) = uid {
        // getpass.getuser() and friends look here first; the uid has no
        // passwd entry.
        for k in ["USER", "LOGNAME"] {
            set(k, format!("steward-worker-{uid}").into());
        }
    }
    for (k, v) in own {
        set(k, v.into());
    }
    env
}

/// Why Steward's data directory cannot be made private, or a blob root
/// shared with workers.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "{path} belongs to uid {uid}, not to Steward's uid {euid}: another user could read or change what Steward keeps there"
    )]
    NotStewards { path: PathBuf, uid: u32, euid: u32 },
    #[error("{path} is mode {mode:04o} and cannot be made 0700: {error}")]
    Private {
        path: PathBuf,
        mode: u32,
        error: std::io::Error,
    },
    /// A step of [`share_with_workers`] ("chown", "default ACL", ...) failed.
    #[error("{path}: {step}: {error}")]
    Share {
        path: PathBuf,
        step: &'static str,
        error: std::io::Error,
    },
}

/// Makes `dir` (Steward's data directory) `0700` and checks it is Steward's:
/// workers must not enter it (the ledger, records, code cache, logs).
pub fn private_dir(dir: &Path) -> Result<(), DirError> {
    let meta = std::fs::metadata(dir).map_err(|error| DirError::Io {
        path: dir.to_path_buf(),
        error,
    })?;
    let euid = steward_uid();
    if meta.uid() != euid {
        return Err(DirError::NotStewards {
            path: dir.to_path_buf(),
            uid: meta.uid(),
            euid,
        });
    }
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|error| {
            DirError::Private {
                path: dir.to_path_buf(),
                mode: meta.mode() & 0o7777,
                error,
            }
        })?;
        tracing::info!(dir = %dir.display(), was = format!("{:04o}", meta.mode() & 0o7777), "data directory made 0700: no worker may enter it");
    }
    Ok(())
}

/// Entries below a blob root that [`share_with_workers`] gives to the blob
/// group at most (the rest keep their modes, and it says so).
pub const MAX_SHARED_ENTRIES: usize = 100_000;

/// Lets workers (whose supplementary group is `gid`) read and write the
/// `file://` blob root `dir`: group `gid`, mode `2770` (new entries inherit
/// the group) and a default ACL giving that group `rwx`, which new files
/// and directories inherit in place of the workers' umask 077. What is
/// already below it joins the group too (group `rw`, directories `rwx`
/// with the same default ACL), up to [`MAX_SHARED_ENTRIES`]. Every worker
/// then reaches every blob under the root, as with any `file://` store.
/// Returns what still keeps workers from the root where something does (a
/// directory above it they cannot search, entries past the bound, files
/// left alone).
///
/// Workers write below the root, and Steward walks it as root, so the walk
/// never resolves a path a worker could change: each entry is opened
/// relative to its parent's descriptor without following a symlink
/// (`O_NOFOLLOW`, and `O_PATH` until it is known to be a plain file or a
/// directory), and changed through that descriptor (`fchown`, `fchmod`,
/// `fsetxattr`). A worker that swaps an entry for a symlink to `/etc`
/// mid-walk changes nothing outside the root. A plain file with more than
/// one link (a hard link to a file elsewhere) is left alone.
pub fn share_with_workers(dir: &Path, gid: u32) -> Result<Option<String>, DirError> {
    let at = |p: &Path, step, error| DirError::Share {
        path: p.to_path_buf(),
        step,
        error,
    };
    let top = open_at(None, dir.as_os_str(), Open::Change).map_err(|e| at(dir, "open", e))?;
    std::os::unix::fs::fchown(&top, None, Some(gid)).map_err(|e| at(dir, "chown", e))?;
    top.set_permissions(std::fs::Permissions::from_mode(0o2770))
        .map_err(|e| at(dir, "chmod 2770", e))?;
    set_default_acl(&top).map_err(|e| at(dir, "default ACL", e))?;
    let mut budget = MAX_SHARED_ENTRIES;
    let mut linked = 0usize;
    let mut stack = vec![(dir.to_path_buf(), top)];
    while let Some((d, dfd)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(fd_path(&dfd)) else {
            continue;
        };
        for e in entries.filter_map(Result::ok) {
            if budget == 0 {
                return Ok(Some(format!(
                    "{} holds more than {MAX_SHARED_ENTRIES} entries: those past them keep their modes, and workers may not reach them",
                    dir.display()
                )));
            }
            budget -= 1;
            let name = e.file_name();
            let p = d.join(&name);
            let Ok(Some((f, meta))) = open_entry(&dfd, &name) else {
                continue;
            };
            let (extra, is_dir) = if meta.is_dir() {
                (0o2070, true)
            } else if meta.nlink() > 1 {
                linked += 1;
                continue;
            } else {
                (0o060, false)
            };
            std::os::unix::fs::fchown(&f, None, Some(gid)).map_err(|e| at(&p, "chown", e))?;
            f.set_permissions(std::fs::Permissions::from_mode(
                (meta.mode() & 0o7777) | extra,
            ))
            .map_err(|e| at(&p, "chmod", e))?;
            if is_dir {
                set_default_acl(&f).map_err(|e| at(&p, "default ACL", e))?;
                stack.push((p, f));
            }
        }
    }
    if linked > 0 {
        return Ok(Some(format!(
            "{linked} file(s) below {} have more than one link (a hard link to a file elsewhere?): they keep their group and modes, and workers may not reach them",
            dir.display()
        )));
    }
    let mut above = dir.parent();
    while let Some(p) = above {
        if let Ok(m) = std::fs::metadata(p)
            && m.mode() & 0o001 == 0
        {
            return Ok(Some(format!(
                "{} is mode {:04o}: workers cannot reach {} below it",
                p.display(),
                m.mode() & 0o7777,
                dir.display()
            )));
        }
        above = p.parent();
    }
    Ok(None)
}

/// `/proc/self/fd/<fd>`: the open file itself, whatever its path now leads to.
fn fd_path(f: &File) -> std::path::PathBuf {
    use std::os::fd::AsRawFd;
    std::path::PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()))
}

/// How [`open_at`] opens.
#[derive(Clone, Copy)]
enum Open {
    /// A handle (`O_PATH`) on the entry itself, never a symlink's target.
    Handle,
    /// For reading and changing (`fchmod`, `fchown`), following the path
    /// (the blob root as configured, or `/proc/self/fd/<handle>`).
    Change,
}

/// Opens `name`, relative to `parent` where given.
fn open_at(parent: Option<&File>, name: &std::ffi::OsStr, how: Open) -> std::io::Result<File> {
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(name.as_bytes())
        .map_err(|_| std::io::Error::other("NUL in path"))?;
    let flags = libc::O_CLOEXEC
        | libc::O_NOCTTY
        | match how {
            Open::Handle => libc::O_PATH | libc::O_NOFOLLOW,
            Open::Change => libc::O_RDONLY | libc::O_NONBLOCK,
        };
    let dirfd = parent.map_or(libc::AT_FDCWD, |p| p.as_raw_fd());
    #[allow(unsafe_code)]
    // SAFETY: a NUL-terminated name and a descriptor `parent` keeps open.
    let fd = unsafe { libc::openat(dirfd, c.as_ptr(), flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    #[allow(unsafe_code)]
    // SAFETY: `fd` was just opened and is owned by nothing else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Entry `name` of the directory `parent`, opened for changing its owner
/// and mode, when it is a plain file or a directory (`None` for anything
/// else: symlinks, devices, sockets, FIFOs). Opened `O_PATH` first, so a
/// device is never opened for reading, then reopened through that
/// descriptor, so the file checked is the file changed.
fn open_entry(
    parent: &File,
    name: &std::ffi::OsStr,
) -> std::io::Result<Option<(File, std::fs::Metadata)>> {
    let handle = open_at(Some(parent), name, Open::Handle)?;
    let meta = handle.metadata()?;
    if !meta.is_dir() && !meta.is_file() {
        return Ok(None);
    }
    let f = open_at(None, fd_path(&handle).as_os_str(), Open::Change)?;
    let again = f.metadata()?;
    if (again.dev(), again.ino()) != (meta.dev(), meta.ino()) {
        return Ok(None);
    }
    Ok(Some((f, again)))
}

/// Why a worker under its own uid could not run `program` (resolved on
/// `PATH` where it has no `/`), or its script's interpreter: the first file
/// or directory on the way that others may not read or search. `None`
/// when nothing is in the way (or the program is not found: the start
/// says so).
pub fn unreachable_by_workers(program: &Path) -> Option<String> {
    let found = if program.components().count() > 1 {
        Some(program.to_path_buf())
    } else {
        std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(program))
                .find(|p| p.is_file())
        })
    }?;
    let mut files = vec![found.clone()];
    if let Ok(text) = std::fs::read(&found)
        && let Some(line) = text.strip_prefix(b"#!")
    {
        let line =
            String::from_utf8_lossy(line.split(|b| *b == b'\n').next().unwrap_or(&[])).into_owned();
        if let Some(interpreter) = line.split_whitespace().next() {
            files.push(interpreter.into());
        }
    }
    for file in files {
        // The path as written (its symlinks live there) and where it leads.
        let real = std::fs::canonicalize(&file).unwrap_or_else(|_| file.clone());
        for p in [&file, &real] {
            if let Some(why) = blocked_for_others(p) {
                return Some(format!(
                    "{} (for {}): {why}",
                    program.display(),
                    file.display()
                ));
            }
        }
    }
    None
}

/// The first directory above `path` that others cannot search, or `path`
/// itself when they cannot read and execute it.
fn blocked_for_others(path: &Path) -> Option<String> {
    let mut dirs: Vec<&Path> = path.ancestors().skip(1).collect();
    dirs.reverse();
    for d in dirs {
        if let Ok(m) = std::fs::metadata(d)
            && m.mode() & 0o001 == 0
        {
            return Some(format!("{} is mode {:04o}", d.display(), m.mode() & 0o7777));
        }
    }
    let m = std::fs::metadata(path).ok()?;
    (m.mode() & 0o005 != 0o005)
        .then(|| format!("{} is mode {:04o}", path.display(), m.mode() & 0o7777))
}

/// The `system.posix_acl_default` value `user::rwx group::rwx other::---`.
fn default_acl() -> Vec<u8> {
    const VERSION: u32 = 2;
    const UNDEFINED_ID: u32 = u32::MAX;
    let mut v = VERSION.to_le_bytes().to_vec();
    // (tag, perm): ACL_USER_OBJ, ACL_GROUP_OBJ, ACL_OTHER, sorted by tag.
    for (tag, perm) in [(0x01u16, 7u16), (0x04, 7), (0x20, 0)] {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&UNDEFINED_ID.to_le_bytes());
    }
    v
}

fn set_default_acl(dir: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let value = default_acl();
    #[allow(unsafe_code)]
    // SAFETY: an open descriptor, a NUL-terminated name and a buffer of
    // `value.len()` bytes.
    let rc = unsafe {
        libc::fsetxattr(
            dir.as_raw_fd(),
            c"system.posix_acl_default".as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_and_refuse_ids_no_worker_may_have() {
        let r: UidRange = "2000000000:65536".parse().expect("default");
        assert_eq!(r, UidRange::default());
        assert_eq!((r.blob_gid(), r.last()), (2_000_000_000, 2_000_065_535));
        assert_eq!(r.workers_text(), "2000000001-2000065535");
        for bad in [
            "1000",
            "0:10",
            "65530:10",
            "4294967290:10",
            "4294967295:1",
            "100:1",
            "x:10",
            "100:y",
            "4294967200:200",
        ] {
            assert!(bad.parse::<UidRange>().is_err(), "{bad}");
        }
    }

    #[test]
    fn root_without_setid_capabilities_or_an_unmapped_range_is_not_separated() {
        let full = "Name:\tsteward\nCapEff:\t000001ffffffffff\n";
        assert_eq!(missing_setid_caps(full), None);
        let no_setuid = "CapEff:\t000001ffffffff7f\n";
        assert_eq!(missing_setid_caps(no_setuid).as_deref(), Some("CAP_SETUID"));
        assert_eq!(
            missing_setid_caps("CapEff:\t0000000000000000\n").as_deref(),
            Some("CAP_SETUID and CAP_SETGID")
        );
        let range = UidRange::default();
        // The initial namespace; a container without a user namespace.
        assert!(maps_range("         0          0 4294967295\n", range));
        // Rootless: root and 65536 subordinate ids.
        let rootless = "0 1000 1\n1 100000 65536\n";
        assert!(!maps_range(rootless, range));
        assert!(maps_range(
            rootless,
            UidRange {
                first: 1000,
                count: 100
            }
        ));
        assert!(!maps_range("", range));
    }

    #[test]
    fn no_two_live_workers_get_the_same_uid_and_other_stewards_locks_count() {
        let range = UidRange {
            first: 3_000_000_000,
            count: 4,
        };
        let locks = tempfile::tempdir().expect("tmp");
        let none = || HashSet::new();
        let a = lease(range, Some(locks.path()), &none).expect("a");
        // Another Steward holds the next one (a lock taken through another
        // open file, as another process would).
        let other = try_lock(&locks.path().join("3000000002"))
            .expect("lock")
            .expect("free");
        let b = lease(range, Some(locks.path()), &none).expect("b");
        assert_eq!((a.id(), b.id()), (3_000_000_001, 3_000_000_003));
        assert!(
            lease(range, Some(locks.path()), &none).is_err(),
            "all taken: the blob group is never a worker's"
        );
        drop(other);
        let c = lease(range, Some(locks.path()), &none).expect("freed by the other Steward");
        assert_eq!(c.id(), 3_000_000_002);
        drop(a);
        // A uid some process still runs under is skipped.
        let busy = || HashSet::from([3_000_000_001]);
        assert!(lease(range, Some(locks.path()), &busy).is_err());
        let d = lease(range, Some(locks.path()), &none).expect("free once nothing runs under it");
        assert_eq!(d.id(), 3_000_000_001);
        // Without lock files (identities not separated) this process's
        // table alone keeps ids apart.
        let unlocked = UidRange {
            first: 3_100_000_000,
            count: 3,
        };
        let e = lease(unlocked, None, &none).expect("e");
        let f = lease(unlocked, None, &none).expect("f");
        assert_ne!(e.id(), f.id());
        assert!(lease(unlocked, None, &none).is_err());
    }

    #[test]
    fn workers_inherit_only_allowed_variables() {
        let inherited = [
            ("PATH", "/usr/bin"),
            ("LC_ALL", "C.UTF-8"),
            ("AWS_SECRET_ACCESS_KEY", "secret"),
            ("AWS_ACCESS_KEY_ID", "id"),
            ("STEWARD_LABELS", "a=b"),
            ("HOME", "/root"),
            ("CUDA_VISIBLE_DEVICES", "0,1,2,3"),
            ("USER", "root"),
        ]
        .map(|(k, v)| (OsString::from(k), OsString::from(v)));
        let own = [("CUDA_VISIBLE_DEVICES".to_string(), "2".to_string())];
        let env = worker_env(
            &EnvAllow::with(&["MY_*".into()]),
            inherited,
            Path::new("/run/w/home"),
            Some(7),
            &own,
        );
        let get = |k: &str| {
            env.iter()
                .find(|(e, _)| e == k)
                .map(|(_, v)| v.to_string_lossy().into_owned())
        };
        assert_eq!(get("PATH").as_deref(), Some("/usr/bin"));
        assert_eq!(get("LC_ALL").as_deref(), Some("C.UTF-8"));
        assert_eq!(get("HOME").as_deref(), Some("/run/w/home"));
        assert_eq!(get("TMPDIR").as_deref(), Some("/run/w/home"));
        assert_eq!(get("USER").as_deref(), Some("steward-worker-7"));
        assert_eq!(get("CUDA_VISIBLE_DEVICES").as_deref(), Some("2"));
        for k in [
            "AWS_SECRET_ACCESS_KEY",
            "AWS_ACCESS_KEY_ID",
            "STEWARD_LABELS",
        ] {
            assert_eq!(get(k), None, "{k}");
        }
        let names: Vec<_> = env.iter().map(|(k, _)| k.clone()).collect();
        let unique: HashSet<_> = names.iter().collect();
        assert_eq!(names.len(), unique.len(), "each variable once: {names:?}");
        assert!(EnvAllow::with(&["MY_*".into()]).allows("MY_TOKEN"));
        assert!(!EnvAllow::default().allows("MY_TOKEN"));
    }

    #[test]
    fn the_data_directory_is_made_private() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        private_dir(dir.path()).expect("made private");
        let mode = std::fs::metadata(dir.path()).expect("meta").mode() & 0o7777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn a_program_or_interpreter_others_cannot_reach_is_named() {
        let tmp = tempfile::tempdir().expect("tmp");
        let open = tmp.path().join("open");
        let closed = tmp.path().join("closed");
        for d in [&open, &closed] {
            std::fs::create_dir(d).expect("mkdir");
        }
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let interpreter = closed.join("python3");
        std::fs::write(&interpreter, b"").expect("write");
        std::fs::set_permissions(&interpreter, std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let script = open.join("function-executor");
        std::fs::write(&script, format!("#!{}\nprint(1)\n", interpreter.display())).expect("write");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let why = unreachable_by_workers(&script).expect("the interpreter is out of reach");
        assert!(
            why.contains(&format!("{} is mode 0700", closed.display())),
            "{why}"
        );
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        assert_eq!(unreachable_by_workers(&script), None);
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        assert!(
            unreachable_by_workers(&script).is_some(),
            "a script others cannot read"
        );
    }

    #[test]
    fn sharing_a_blob_root_changes_nothing_outside_it() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path().join("blobs");
        let outside = tmp.path().join("outside");
        for d in [&root, &outside, &root.join("sub")] {
            std::fs::create_dir(d).expect("mkdir");
        }
        let secret = outside.join("secret");
        let other = outside.join("other");
        for f in [&secret, &other] {
            std::fs::write(f, b"s").expect("write");
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        }
        let blob = root.join("sub/blob");
        std::fs::write(&blob, b"b").expect("write");
        std::fs::set_permissions(&blob, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        // What a worker may plant: a hard link to a file elsewhere, and
        // symlinks to a file and a directory elsewhere.
        std::fs::hard_link(&secret, root.join("sub/linked")).expect("link");
        std::os::unix::fs::symlink(&other, root.join("to-file")).expect("symlink");
        std::os::unix::fs::symlink(&outside, root.join("to-dir")).expect("symlink");
        let gid = std::fs::metadata(tmp.path()).expect("meta").gid();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let outside_mode = std::fs::metadata(&outside).expect("meta").mode() & 0o7777;
        let said = match share_with_workers(&root, gid) {
            Ok(said) => said,
            // No ACL support on this file system: nothing to check here.
            Err(DirError::Share {
                step: "default ACL",
                ..
            }) => return,
            Err(e) => panic!("{e}"),
        };
        let mode = |p: &Path| std::fs::symlink_metadata(p).expect("meta").mode() & 0o7777;
        assert_eq!(mode(&root), 0o2770);
        assert_eq!(mode(&root.join("sub")) & 0o2070, 0o2070);
        assert_eq!(mode(&blob), 0o660, "a blob joins the group");
        for f in [&secret, &other] {
            assert_eq!(mode(f), 0o600, "{} is outside the root", f.display());
        }
        assert_eq!(
            mode(&outside),
            outside_mode,
            "a symlinked directory is not entered"
        );
        let said = said.expect("the hard link is named");
        assert!(said.contains("more than one link"), "{said}");
    }

    #[test]
    fn the_default_acl_is_the_kernels_format() {
        let v = default_acl();
        assert_eq!(v.len(), 4 + 3 * 8);
        assert_eq!(&v[..4], &2u32.to_le_bytes());
        // user::rwx first, other::--- last.
        assert_eq!(&v[4..8], &[1, 0, 7, 0]);
        assert_eq!(&v[20..24], &[0x20, 0, 0, 0]);
    }
}
