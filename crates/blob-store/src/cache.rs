//! Content-addressed cache of application code: one file per sha256,
//! verified on every read, written atomically (temp file + rename), kept
//! across restarts, and bounded in size by least-recently-used eviction
//! (use refreshes a file's modification time).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::{BlobError, BlobStore};

/// Where a piece of code came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeSource {
    Cache,
    Store,
}

#[derive(Debug)]
pub struct CodeCache {
    dir: PathBuf,
    max_bytes: u64,
    /// Serializes writes and eviction.
    lock: tokio::sync::Mutex<()>,
}

fn valid_sha(s: &str) -> bool {
    s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit())
}

fn sha_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

impl CodeCache {
    /// Opens (creating) the cache in `dir`, removing temp files a crash left.
    pub fn open(dir: &Path, max_bytes: u64) -> std::io::Result<CodeCache> {
        std::fs::create_dir_all(dir)?;
        for e in std::fs::read_dir(dir)?.flatten() {
            if e.file_name().to_string_lossy().contains(".tmp-") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(CodeCache {
            dir: dir.to_path_buf(),
            max_bytes,
            lock: tokio::sync::Mutex::new(()),
        })
    }

    fn path_of(&self, sha: &str) -> PathBuf {
        self.dir.join(format!("{}.zip", sha.to_ascii_lowercase()))
    }

    /// The code at `uri`, from the cache when `sha256` names a verified
    /// entry; otherwise downloaded, verified against `sha256` and cached.
    /// Code over `max_bytes` is refused ([`BlobError::TooLarge`]) from its
    /// size, before it is read, whether cached or not.
    pub async fn get_or_fetch(
        &self,
        store: &BlobStore,
        uri: &str,
        sha256: Option<&str>,
        max_bytes: u64,
    ) -> Result<(Bytes, CodeSource), BlobError> {
        let sha = sha256.filter(|s| valid_sha(s));
        if let Some(sha) = sha {
            let path = self.path_of(sha);
            let cached = crate::local::read_limited(&path, uri, max_bytes).await;
            if let Err(e @ BlobError::TooLarge { .. }) = cached {
                return Err(e);
            }
            if let Ok(bytes) = cached {
                if sha_hex(&bytes).eq_ignore_ascii_case(sha) {
                    touch(&path);
                    return Ok((bytes, CodeSource::Cache));
                }
                tracing::warn!(path = %path.display(), "cached code failed verification; downloading again");
                let _ = tokio::fs::remove_file(&path).await;
            }
        }
        let bytes = store.get_limited(uri, max_bytes).await?;
        let Some(sha) = sha else {
            return Ok((bytes, CodeSource::Store));
        };
        let actual = sha_hex(&bytes);
        if !actual.eq_ignore_ascii_case(sha) {
            return Err(BlobError::Integrity {
                uri: uri.to_string(),
                expected: sha.to_string(),
                actual,
            });
        }
        let _guard = self.lock.lock().await;
        let path = self.path_of(sha);
        let tmp = self.dir.join(format!(
            "{}.tmp-{}",
            sha.to_ascii_lowercase(),
            std::process::id()
        ));
        let io = |source| BlobError::Io {
            uri: format!("file://{}", path.display()),
            source,
        };
        tokio::fs::write(&tmp, &bytes).await.map_err(io)?;
        tokio::fs::rename(&tmp, &path).await.map_err(io)?;
        self.evict(&path);
        Ok((bytes, CodeSource::Store))
    }

    /// Removes least recently used entries until the cache fits, never `keep`.
    fn evict(&self, keep: &Path) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut files: Vec<(SystemTime, u64, PathBuf)> = entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".zip"))
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                Some((m.modified().ok()?, m.len(), e.path()))
            })
            .collect();
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        files.sort();
        for (_, len, path) in files {
            if total <= self.max_bytes {
                break;
            }
            if path == keep {
                continue;
            }
            if std::fs::remove_file(&path).is_ok() {
                tracing::info!(path = %path.display(), "evicted application code from the cache");
                total -= len;
            }
        }
    }
}

fn touch(path: &Path) {
    if let Ok(f) = std::fs::File::options().append(true).open(path) {
        let _ = f.set_modified(SystemTime::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BlobStoreConfig;

    #[tokio::test]
    async fn caches_verifies_and_evicts_least_recently_used() {
        let blobs = tempfile::tempdir().expect("tempdir");
        let store = BlobStore::new(BlobStoreConfig {
            local_roots: vec![blobs.path().to_path_buf()],
            ..Default::default()
        });
        let cache_dir = tempfile::tempdir().expect("tempdir");
        let cache = CodeCache::open(cache_dir.path(), 25).expect("open");
        let mut shas = Vec::new();
        for (i, body) in [b"aaaaaaaaaa", b"bbbbbbbbbb", b"cccccccccc"]
            .iter()
            .enumerate()
        {
            let uri = format!("file://{}/code{i}.zip", blobs.path().display());
            store
                .put(&uri, Bytes::from_static(*body))
                .await
                .expect("put");
            shas.push((uri, sha_hex(*body)));
        }
        let (uri0, sha0) = &shas[0];
        assert_eq!(
            cache
                .get_or_fetch(&store, uri0, Some(sha0), u64::MAX)
                .await
                .expect("miss")
                .1,
            CodeSource::Store
        );
        // The origin disappears: the cache still serves it.
        std::fs::remove_file(blobs.path().join("code0.zip")).expect("rm");
        assert_eq!(
            cache
                .get_or_fetch(&store, uri0, Some(sha0), u64::MAX)
                .await
                .expect("hit")
                .1,
            CodeSource::Cache
        );
        // A reopened cache (agent restart) still has it.
        let cache = CodeCache::open(cache_dir.path(), 25).expect("reopen");
        assert_eq!(
            cache
                .get_or_fetch(&store, uri0, Some(sha0), u64::MAX)
                .await
                .expect("hit")
                .1,
            CodeSource::Cache
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
        for (uri, sha) in &shas[1..] {
            cache
                .get_or_fetch(&store, uri, Some(sha), u64::MAX)
                .await
                .expect("fetch");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // 30 bytes > 25: the least recently used (code0) was evicted.
        assert!(!cache.path_of(sha0).exists());
        assert!(cache.path_of(&shas[2].1).exists());

        let wrong = "0".repeat(64);
        let err = cache
            .get_or_fetch(&store, &shas[1].0, Some(&wrong), u64::MAX)
            .await
            .expect_err("mismatch");
        assert!(err.to_string().contains("sha256"), "{err}");
    }

    #[tokio::test]
    async fn code_over_the_limit_is_refused_cached_or_not() {
        let blobs = tempfile::tempdir().expect("tempdir");
        let store = BlobStore::new(BlobStoreConfig {
            local_roots: vec![blobs.path().to_path_buf()],
            ..Default::default()
        });
        let cache_dir = tempfile::tempdir().expect("tempdir");
        let cache = CodeCache::open(cache_dir.path(), 1 << 20).expect("open");
        let body = vec![7u8; 100];
        let uri = format!("file://{}/code.zip", blobs.path().display());
        store
            .put(&uri, Bytes::from(body.clone()))
            .await
            .expect("put");
        let sha = sha_hex(&body);
        for sha in [None, Some(sha.as_str())] {
            let err = cache
                .get_or_fetch(&store, &uri, sha, 99)
                .await
                .expect_err("over the limit");
            assert!(
                matches!(
                    err,
                    BlobError::TooLarge {
                        size: 100,
                        max: 99,
                        ..
                    }
                ),
                "{err}"
            );
        }
        // At the limit it is fetched and cached; a lower limit later
        // refuses the cached copy too.
        let (code, _) = cache
            .get_or_fetch(&store, &uri, Some(&sha), 100)
            .await
            .expect("at the limit");
        assert_eq!(code.len(), 100);
        let err = cache
            .get_or_fetch(&store, &uri, Some(&sha), 50)
            .await
            .expect_err("cached, over the limit");
        assert!(matches!(err, BlobError::TooLarge { max: 50, .. }), "{err}");
    }
}
