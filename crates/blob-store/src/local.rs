//! `file://` blobs, confined to a set of root directories.
//!
//! A URI is accepted only if it is an absolute path without `..`
//! components whose real location (symlinks resolved, for the part of the
//! path that exists) lies inside one of the roots. Without roots (no
//! `--blob-root`) any such path is accepted except the kernel's
//! [`SYSTEM_DIRS`] and what is not a regular file or directory (a device,
//! a FIFO, a socket): a server could otherwise have workers read
//! `/proc/self/environ` or `/dev/mem`, or write `/dev/sda`.
//!
//! Metadata operations (stat, mkdir, rename, unlink) run inline on the
//! caller's thread: on a local disk they take microseconds, while a
//! round trip through tokio's blocking pool costs two thread wake-ups,
//! and an allocation makes several of them. Reads and writes of blob
//! bytes, which can be large, still go through the blocking pool.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::BlobError;

/// How many resolved directories [`LocalRoots`] remembers.
const RESOLVED_DIRS: usize = 4096;
/// Never blobs, even without roots: the kernel's virtual file systems.
pub const SYSTEM_DIRS: [&str; 2] = ["/proc", "/sys"];

/// The directories `file://` blobs may live in.
#[derive(Debug, Clone)]
pub struct LocalRoots {
    roots: Vec<PathBuf>,
    /// Real locations of directories blobs were resolved in: resolving a
    /// path is then one `lstat` of its last component instead of a
    /// `realpath` (an `lstat` per component, more for a path that does
    /// not exist yet). A directory swapped for a symlink after it was
    /// remembered could only be swapped by a process of the agent's own
    /// user, which can write there directly anyway.
    dirs: std::sync::Arc<parking_lot::Mutex<std::collections::HashMap<OsString, PathBuf>>>,
}

impl LocalRoots {
    /// Roots are canonicalized when they exist; an empty list allows any path.
    pub fn new(roots: Vec<PathBuf>) -> Self {
        let roots = roots
            .into_iter()
            .map(|r| std::fs::canonicalize(&r).unwrap_or(r))
            .collect();
        LocalRoots {
            roots,
            dirs: Default::default(),
        }
    }

    /// The real location of `path`: its remembered directory's, with its
    /// last component appended when that is not a symlink; else resolved
    /// in full (and its directory remembered).
    fn real(&self, path: &Path) -> PathBuf {
        // Split at the last separator by bytes (`Path::parent` parses
        // components, which cost more than the rest of a resolve).
        let bytes = path.as_os_str().as_bytes();
        let Some(slash) = bytes.iter().rposition(|b| *b == b'/') else {
            return real_path(path);
        };
        let (dir, name) = (&bytes[..slash.max(1)], &bytes[slash + 1..]);
        if name.is_empty() || name == b"." {
            return real_path(path);
        }
        let (dir, name) = (OsStr::from_bytes(dir), OsStr::from_bytes(name));
        let not_a_link =
            || std::fs::symlink_metadata(path).map_or(true, |m| !m.file_type().is_symlink());
        if let Some(real_dir) = self.dirs.lock().get(dir).cloned()
            && not_a_link()
        {
            return real_dir.join(name);
        }
        let Ok(real_dir) = std::fs::canonicalize(dir) else {
            return real_path(path);
        };
        {
            let mut dirs = self.dirs.lock();
            if dirs.len() >= RESOLVED_DIRS {
                dirs.clear();
            }
            dirs.insert(dir.to_owned(), real_dir.clone());
        }
        if not_a_link() {
            real_dir.join(name)
        } else {
            real_path(path)
        }
    }

    fn roots_text(&self) -> String {
        self.roots
            .iter()
            .map(|r| r.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The confined local path of a `file://` URI.
    pub fn resolve(&self, uri: &str) -> Result<PathBuf, BlobError> {
        let invalid = |reason: &str| BlobError::InvalidUri {
            uri: uri.to_string(),
            reason: reason.into(),
        };
        let raw = uri
            .strip_prefix("file://")
            .ok_or_else(|| invalid("not a file:// URI"))?;
        let path = Path::new(raw);
        if !path.is_absolute() {
            return Err(invalid("path is not absolute"));
        }
        if has_parent_component(raw.as_bytes()) {
            return Err(invalid("path contains '..'"));
        }
        let real = self.real(path);
        if self.roots.is_empty() {
            return unconfined(uri, path, &real);
        }
        if self.roots.iter().any(|root| within(&real, root)) {
            Ok(path.to_path_buf())
        } else {
            Err(BlobError::OutsideRoots {
                uri: uri.to_string(),
                roots: self.roots_text(),
            })
        }
    }

    pub async fn get(&self, uri: &str) -> Result<Bytes, BlobError> {
        let path = self.resolve(uri)?;
        tokio::fs::read(&path)
            .await
            .map(Bytes::from)
            .map_err(|source| BlobError::Io {
                uri: uri.to_string(),
                source,
            })
    }

    /// [`Self::get`] of at most `max` bytes (see `BlobStore::get_limited`).
    pub async fn get_limited(&self, uri: &str, max: u64) -> Result<Bytes, BlobError> {
        let path = self.resolve(uri)?;
        read_limited(&path, uri, max).await
    }
}

/// The file at `path` (named `uri` in errors), of at most `max` bytes: its
/// size is checked before it is read, and reading stops at `max + 1` bytes.
pub(crate) async fn read_limited(path: &Path, uri: &str, max: u64) -> Result<Bytes, BlobError> {
    use tokio::io::AsyncReadExt;
    let io = |source| BlobError::Io {
        uri: uri.to_string(),
        source,
    };
    let too_large = |size| BlobError::TooLarge {
        uri: uri.to_string(),
        size,
        max,
    };
    let file = tokio::fs::File::open(path).await.map_err(io)?;
    let size = file.metadata().await.map_err(io)?.len();
    if size > max {
        return Err(too_large(size));
    }
    let mut data = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    file.take(max.saturating_add(1))
        .read_to_end(&mut data)
        .await
        .map_err(io)?;
    if data.len() as u64 > max {
        return Err(too_large(data.len() as u64));
    }
    Ok(Bytes::from(data))
}

impl LocalRoots {
    pub async fn put(&self, uri: &str, data: Bytes) -> Result<(), BlobError> {
        let path = self.prepare_write(uri).await?;
        let io = |source| BlobError::Io {
            uri: uri.to_string(),
            source,
        };
        // Write then rename, so a reader never sees a half-written blob;
        // the temporary name is this write's own (two writes of the same
        // blob at once each rename a whole file).
        static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_extension(format!("tmp-{}-{n}", std::process::id()));
        tokio::fs::write(&tmp, &data).await.map_err(io)?;
        tokio::fs::rename(&tmp, &path).await.map_err(io)
    }

    /// Creates the parent directory of a blob about to be written.
    pub async fn prepare_write(&self, uri: &str) -> Result<PathBuf, BlobError> {
        let path = self.resolve(uri)?;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|source| BlobError::Io {
                uri: uri.to_string(),
                source,
            })?;
        }
        // Re-check now that the directories exist and symlinks can be resolved.
        self.resolve(uri)
    }

    /// Size of the blob at `uri`, or `None` when there is none.
    pub async fn head(&self, uri: &str) -> Result<Option<u64>, BlobError> {
        let path = self.resolve(uri)?;
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Err(BlobError::InvalidUri {
                uri: uri.to_string(),
                reason: "not a regular file".into(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(BlobError::Io {
                uri: uri.to_string(),
                source,
            }),
        }
    }

    /// Starts an upload: a fresh staging file next to the blob, so that
    /// nobody sees the blob before it is complete and an aborted upload
    /// never touches a blob written before.
    pub async fn create_upload(&self, uri: &str) -> Result<String, BlobError> {
        // Checked, not created: the worker makes the directories it writes
        // into (as tensorlake's file store does), and a directory is a new
        // inode, which on ext4 cost more than the rest of the agent's work
        // per allocation (BENCHMARKS.md, issue 12).
        self.resolve(uri)?;
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        Ok(format!("{:x}-{nanos:x}-{n:x}", std::process::id()))
    }

    /// The `file://` URI a worker writes an upload's bytes to.
    pub fn staging_uri(&self, uri: &str, upload_id: &str) -> Result<String, BlobError> {
        let ok = !upload_id.is_empty()
            && upload_id.len() <= 64
            && upload_id.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
        if !ok {
            return Err(BlobError::InvalidUri {
                uri: uri.to_string(),
                reason: format!("invalid local upload id {upload_id:?}"),
            });
        }
        let staged = format!("{uri}.upload-{upload_id}");
        self.resolve(&staged)?;
        Ok(staged)
    }

    /// Publishes a staged upload as the blob (an upload the worker never
    /// wrote to becomes an empty blob).
    pub async fn complete_upload(&self, uri: &str, upload_id: &str) -> Result<(), BlobError> {
        let staged = self.resolve(&self.staging_uri(uri, upload_id)?)?;
        let path = self.resolve(uri)?;
        let io = |source| BlobError::Io {
            uri: uri.to_string(),
            source,
        };
        // The staging file sits next to the blob: its directory exists
        // when the worker wrote anything.
        match std::fs::rename(&staged, &path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let path = self.prepare_write(uri).await?;
                std::fs::write(&path, b"").map_err(io)
            }
            Err(e) => Err(io(e)),
        }
    }

    /// Drops a staged upload; the blob itself is left as it was.
    pub async fn abort_upload(&self, uri: &str, upload_id: &str) -> Result<(), BlobError> {
        self.remove(&self.staging_uri(uri, upload_id)?).await
    }

    pub async fn remove(&self, uri: &str) -> Result<(), BlobError> {
        let path = self.resolve(uri)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(BlobError::Io {
                uri: uri.to_string(),
                source,
            }),
        }
    }
}

/// Without roots: `path` (real location `real`) unless it lies in a
/// [`SYSTEM_DIRS`] directory or is something other than a regular file or
/// a directory.
fn unconfined(uri: &str, path: &Path, real: &Path) -> Result<PathBuf, BlobError> {
    let invalid = |reason: String| BlobError::InvalidUri {
        uri: uri.to_string(),
        reason,
    };
    if let Some(dir) = SYSTEM_DIRS.iter().find(|d| within(real, Path::new(d))) {
        return Err(invalid(format!(
            "{} is under {dir}, which never holds blobs",
            real.display()
        )));
    }
    match std::fs::metadata(real) {
        Ok(m) if !(m.is_file() || m.is_dir()) => Err(invalid(format!(
            "{} is not a regular file (a device, FIFO or socket)",
            real.display()
        ))),
        _ => Ok(path.to_path_buf()),
    }
}

/// Whether an absolute path has a `..` component (compared as bytes:
/// component iteration was a tenth of the agent's work per allocation).
fn has_parent_component(path: &[u8]) -> bool {
    path.split(|b| *b == b'/').any(|c| c == b"..")
}

/// Whether `path` is `root` or lies under it; both are canonical (no `.`,
/// `..`, repeated or trailing separators), so bytes decide.
fn within(path: &Path, root: &Path) -> bool {
    let (p, r) = (path.as_os_str().as_bytes(), root.as_os_str().as_bytes());
    p.starts_with(r) && (p.len() == r.len() || r.ends_with(b"/") || p[r.len()] == b'/')
}

/// Canonical form of the longest existing prefix of `path`, with the rest
/// appended unchanged.
fn real_path(path: &Path) -> PathBuf {
    let mut existing = path.to_path_buf();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = std::fs::canonicalize(&existing) {
            let mut out = real;
            for part in rest.iter().rev() {
                out.push(part);
            }
            return out;
        }
        match (
            existing.file_name().map(|n| n.to_os_string()),
            existing.parent(),
        ) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent.to_path_buf();
            }
            _ => return path.to_path_buf(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_roots_system_files_and_devices_are_refused() {
        let any = LocalRoots::new(Vec::new());
        let tmp = tempfile::tempdir().expect("tempdir");
        let file = tmp.path().join("blob");
        std::fs::write(&file, b"x").expect("write");
        std::os::unix::fs::symlink("/proc/self/environ", tmp.path().join("env")).expect("symlink");
        std::os::unix::fs::symlink("/dev/null", tmp.path().join("null")).expect("symlink");
        for ok in [
            format!("file://{}", file.display()),
            format!("file://{}/not/yet/written", tmp.path().display()),
        ] {
            assert!(any.resolve(&ok).is_ok(), "{ok}");
        }
        for bad in [
            "file:///proc/self/environ".to_string(),
            "file:///proc/1/mem".to_string(),
            "file:///sys/kernel/notes".to_string(),
            "file:///dev/null".to_string(),
            "file:///dev/zero".to_string(),
            format!("file://{}/env", tmp.path().display()),
            format!("file://{}/null", tmp.path().display()),
        ] {
            let err = any.resolve(&bad).expect_err(&bad);
            assert!(matches!(err, BlobError::InvalidUri { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn confinement_refuses_escapes() {
        let root = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        let roots = LocalRoots::new(vec![root.path().to_path_buf()]);
        let inside = format!("file://{}/a/b.bin", root.path().display());
        assert!(roots.resolve(&inside).is_ok());

        let err = roots
            .resolve("file:///etc/shadow")
            .expect_err("absolute escape");
        assert!(
            err.to_string().contains("outside the allowed local roots"),
            "{err}"
        );

        let dotdot = format!("file://{}/../x", root.path().display());
        let err = roots.resolve(&dotdot).expect_err("dotdot");
        assert!(err.to_string().contains("'..'"), "{err}");

        std::os::unix::fs::symlink(outside.path(), root.path().join("link")).expect("symlink");
        let via_link = format!("file://{}/link/secret", root.path().display());
        let err = roots.resolve(&via_link).expect_err("symlink escape");
        assert!(err.to_string().contains("outside"), "{err}");

        assert!(roots.resolve("file://relative/path").is_err());
        assert!(roots.resolve("s3://bucket/key").is_err());
    }

    #[test]
    fn byte_checks_match_component_semantics() {
        for (p, parent) in [
            ("/a/../b", true),
            ("/a/..", true),
            ("/../a", true),
            ("/a/..b/c", false),
            ("/a/b../c", false),
            ("/a/./b", false),
            ("/a/...", false),
        ] {
            assert_eq!(has_parent_component(p.as_bytes()), parent, "{p}");
        }
        for (p, root, inside) in [
            ("/r/a", "/r", true),
            ("/r", "/r", true),
            ("/ra", "/r", false),
            ("/r/a", "/r/", true),
            ("/", "/", true),
            ("/x", "/", true),
            ("/q/a", "/r", false),
        ] {
            assert_eq!(
                within(Path::new(p), Path::new(root)),
                inside,
                "{p} in {root}"
            );
        }
    }

    #[test]
    fn a_remembered_directory_still_refuses_a_file_symlinked_out() {
        let root = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        std::fs::write(outside.path().join("secret"), b"s").expect("write");
        let roots = LocalRoots::new(vec![root.path().to_path_buf()]);
        let blob = root.path().join("blob");
        let uri = format!("file://{}", blob.display());
        std::fs::write(&blob, b"x").expect("write");
        assert!(roots.resolve(&uri).is_ok(), "first: resolved in full");
        assert!(
            roots.resolve(&uri).is_ok(),
            "second: from the remembered directory"
        );
        std::fs::remove_file(&blob).expect("rm");
        std::os::unix::fs::symlink(outside.path().join("secret"), &blob).expect("symlink");
        let err = roots.resolve(&uri).expect_err("file symlink escape");
        assert!(err.to_string().contains("outside"), "{err}");
    }

    #[tokio::test]
    async fn put_get_remove_round_trip() {
        let root = tempfile::tempdir().expect("tempdir");
        let roots = LocalRoots::new(vec![root.path().to_path_buf()]);
        let uri = format!("file://{}/x/y/z.bin", root.path().display());
        roots
            .put(&uri, Bytes::from_static(b"hello"))
            .await
            .expect("put");
        assert_eq!(
            roots.get(&uri).await.expect("get"),
            Bytes::from_static(b"hello")
        );
        roots.remove(&uri).await.expect("remove");
        roots.remove(&uri).await.expect("remove twice");
        assert!(roots.get(&uri).await.is_err());
    }

    /// Writes of the same blob at once (two requests with one input) each
    /// land whole; the old shared temporary name made all but one fail.
    #[tokio::test]
    async fn the_same_blob_written_at_once_is_written_whole() {
        let root = tempfile::tempdir().expect("tempdir");
        let roots = std::sync::Arc::new(LocalRoots::new(vec![root.path().to_path_buf()]));
        let uri = format!("file://{}/inputs/same", root.path().display());
        let mut writes = tokio::task::JoinSet::new();
        for _ in 0..16 {
            let (roots, uri) = (roots.clone(), uri.clone());
            writes.spawn(async move { roots.put(&uri, Bytes::from_static(b"same")).await });
        }
        while let Some(w) = writes.join_next().await {
            w.expect("joined").expect("every write succeeds");
        }
        assert_eq!(
            roots.get(&uri).await.expect("get"),
            Bytes::from_static(b"same")
        );
    }
}
