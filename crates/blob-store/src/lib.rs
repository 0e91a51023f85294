//! Blob access for the agent and its workers: reading whole blobs (application
//! code), handing workers presigned chunk URIs to read inputs and write
//! outputs, and the multipart-upload lifecycle behind those writes.
//!
//! `file://` locations are confined to configured roots. Chunking follows the
//! reference executor: reads in 100 MiB chunks; writes in 100 parts of
//! 100 MiB, then 1 GiB parts, the last part trimmed. A read of more than
//! [`MAX_READ_CHUNKS`] chunks or a write of more than [`MAX_PARTS`] parts
//! is refused before any URL is made.
//!
//! Entry points: [`BlobStore`], [`CodeCache`].
//! Must not know about: gRPC, protobuf, workers, allocations, HTTP serving,
//! metrics libraries (operations are reported through [`BlobObserver`]).

mod cache;
mod local;
mod s3;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

pub use cache::{CodeCache, CodeSource};
pub use local::LocalRoots;
pub use s3::S3Config;

/// Read chunk size (one presigned URL per 100 MiB range).
pub const READ_CHUNK_BYTES: u64 = 100 << 20;
/// Most read chunks one presigned read may have (1.6 TiB at the default
/// chunk size): each is a URL held by the agent and sent to a worker, so
/// a size named by someone else must not make more.
pub const MAX_READ_CHUNKS: u64 = 16_384;
/// Size of each of the first [`SMALL_PARTS`] write parts.
pub const SMALL_PART_BYTES: u64 = 100 << 20;
pub const SMALL_PARTS: u64 = 100;
/// Most parts one upload may have (S3's own limit is 10,000).
pub const MAX_PARTS: u64 = 10_000;
/// Size of every later write part.
pub const LARGE_PART_BYTES: u64 = 1 << 30;
/// Presigned URL lifetime unless configured otherwise (the reference's 7 days).
pub const DEFAULT_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// A URI a worker may read or write, and how many bytes it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub uri: String,
    pub size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("invalid blob URI {uri:?}: {reason}")]
    InvalidUri { uri: String, reason: String },
    #[error("blob URI {uri:?} is outside the allowed local roots ({roots})")]
    OutsideRoots { uri: String, roots: String },
    #[error("unsupported blob URI scheme {scheme:?} in {uri:?}")]
    UnsupportedScheme { uri: String, scheme: String },
    #[error("blob {uri:?}: {source}")]
    Io {
        uri: String,
        #[source]
        source: std::io::Error,
    },
    #[error("blob {uri:?}: {message}")]
    Remote { uri: String, message: String },
    #[error("blob {uri:?}: {size} bytes need {parts} parts; at most {max} are allowed")]
    TooManyParts {
        uri: String,
        size: u64,
        parts: u64,
        max: u64,
    },
    #[error("blob {uri:?}: reading {size} bytes needs {chunks} chunks; at most {max} are allowed")]
    TooManyChunks {
        uri: String,
        size: u64,
        chunks: u64,
        max: u64,
    },
    #[error("blob {uri:?} is {size} bytes or more, over the limit of {max} bytes")]
    TooLarge { uri: String, size: u64, max: u64 },
    #[error("blob {uri:?} has sha256 {actual}, expected {expected}")]
    Integrity {
        uri: String,
        expected: String,
        actual: String,
    },
}

/// How many write parts a blob of `size` bytes takes (at least one),
/// computed without listing them.
pub fn write_part_count(size: u64, small_part: u64) -> u64 {
    let small_part = small_part.max(1);
    let large = LARGE_PART_BYTES.max(small_part);
    let small_total = small_part.saturating_mul(SMALL_PARTS);
    if size <= small_total {
        return size.div_ceil(small_part).max(1);
    }
    SMALL_PARTS.saturating_add((size - small_total).div_ceil(large))
}

/// Sizes of the write parts for a blob of `size` bytes (at least one part).
pub fn write_part_sizes(size: u64) -> Vec<u64> {
    write_part_sizes_with(size, SMALL_PART_BYTES)
}

/// [`write_part_sizes`] with another size for the first [`SMALL_PARTS`] parts.
pub fn write_part_sizes_with(size: u64, small_part: u64) -> Vec<u64> {
    let small_part = small_part.max(1);
    let mut parts = Vec::new();
    let mut left = size;
    while left > 0 || parts.is_empty() {
        let cap = if (parts.len() as u64) < SMALL_PARTS {
            small_part
        } else {
            LARGE_PART_BYTES.max(small_part)
        };
        let part = left.min(cap);
        parts.push(part);
        left -= part;
        if left == 0 {
            break;
        }
    }
    parts
}

/// How many read chunks of `chunk` bytes cover `size` bytes (at least one),
/// computed without listing them.
pub fn read_chunk_count(size: u64, chunk: u64) -> u64 {
    size.div_ceil(chunk.max(1)).max(1)
}

/// Sizes of the read chunks covering `size` bytes (at least one chunk).
pub fn read_chunk_sizes(size: u64) -> Vec<u64> {
    read_chunk_sizes_with(size, READ_CHUNK_BYTES)
}

/// [`read_chunk_sizes`] with another chunk size.
pub fn read_chunk_sizes_with(size: u64, chunk: u64) -> Vec<u64> {
    let chunk = chunk.max(1);
    if size == 0 {
        return vec![0];
    }
    let mut chunks = Vec::new();
    let mut left = size;
    while left > 0 {
        let c = left.min(chunk);
        chunks.push(c);
        left -= c;
    }
    chunks
}

/// Configuration of a [`BlobStore`].
#[derive(Debug, Clone)]
pub struct BlobStoreConfig {
    /// Directories `file://` URIs must resolve inside. Empty allows any
    /// absolute path, as the reference executor does (logged at start).
    pub local_roots: Vec<PathBuf>,
    /// Lifetime of presigned URLs; an allocation's URLs also live at least
    /// as long as its timeout.
    pub presign_ttl: Duration,
    pub s3: S3Config,
    /// Read chunk and (first 100) write part size; the reference's 100 MiB
    /// unless overridden (tests use small chunks to cross chunk boundaries).
    pub chunk_bytes: u64,
}

impl Default for BlobStoreConfig {
    fn default() -> Self {
        BlobStoreConfig {
            local_roots: Vec::new(),
            presign_ttl: DEFAULT_TTL,
            s3: S3Config::default(),
            chunk_bytes: READ_CHUNK_BYTES,
        }
    }
}

/// Observes every blob operation (the binary turns this into metrics).
pub trait BlobObserver: Send + Sync + 'static {
    /// `op` is one of a fixed set of names; `bytes` is what moved, if any.
    fn observe(&self, op: &'static str, ok: bool, seconds: f64, bytes: u64);
}

struct NoObserver;
impl BlobObserver for NoObserver {
    fn observe(&self, _: &'static str, _: bool, _: f64, _: u64) {}
}

/// Blob access by URI scheme: `file://` (confined) and `s3://`.
#[derive(Clone)]
pub struct BlobStore {
    local: LocalRoots,
    s3: Arc<s3::S3Stores>,
    ttl: Duration,
    chunk_bytes: u64,
    observer: Arc<dyn BlobObserver>,
}

impl std::fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobStore")
            .field("local", &self.local)
            .field("ttl", &self.ttl)
            .finish()
    }
}

enum Scheme {
    File,
    S3,
}

impl BlobStore {
    pub fn new(config: BlobStoreConfig) -> Self {
        BlobStore {
            local: LocalRoots::new(config.local_roots),
            s3: Arc::new(s3::S3Stores::new(config.s3)),
            ttl: config.presign_ttl,
            chunk_bytes: config.chunk_bytes,
            observer: Arc::new(NoObserver),
        }
    }

    /// Reports every operation to `observer`.
    pub fn with_observer(mut self, observer: Arc<dyn BlobObserver>) -> Self {
        self.observer = observer;
        self
    }

    fn scheme(uri: &str) -> Result<Scheme, BlobError> {
        match uri.split_once("://").map(|(s, _)| s) {
            Some("file") => Ok(Scheme::File),
            Some("s3") => Ok(Scheme::S3),
            Some(other) => Err(BlobError::UnsupportedScheme {
                uri: uri.to_string(),
                scheme: other.to_string(),
            }),
            None => Err(BlobError::InvalidUri {
                uri: uri.to_string(),
                reason: "no scheme".into(),
            }),
        }
    }

    /// Runs `fut` (boxed by every caller: the operations' state machines
    /// are then a few words wherever they are awaited, instead of the
    /// largest backend's future inline) and reports it to the observer.
    async fn timed<T>(
        &self,
        op: &'static str,
        bytes: impl Fn(&T) -> u64,
        fut: std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, BlobError>> + Send + '_>>,
    ) -> Result<T, BlobError> {
        let started = std::time::Instant::now();
        let r = fut.await;
        let moved = r.as_ref().map(&bytes).unwrap_or(0);
        self.observer
            .observe(op, r.is_ok(), started.elapsed().as_secs_f64(), moved);
        r
    }

    /// Presigned URL lifetime for work that may run `at_least` long.
    fn ttl_for(&self, at_least: Duration) -> Duration {
        self.ttl.max(at_least)
    }

    /// Checks that `uri` names a blob this store may hand out: a supported
    /// scheme and, for `file://`, a location inside the allowed roots.
    pub fn check_uri(&self, uri: &str) -> Result<(), BlobError> {
        match Self::scheme(uri)? {
            Scheme::File => self.local.resolve(uri).map(|_| ()),
            Scheme::S3 => s3::split(uri).map(|_| ()),
        }
    }

    /// Size of the blob at `uri`, or `None` when it does not exist.
    pub async fn head(&self, uri: &str) -> Result<Option<u64>, BlobError> {
        self.timed(
            "head",
            |_| 0,
            Box::pin(async {
                match Self::scheme(uri)? {
                    Scheme::File => self.local.head(uri).await,
                    Scheme::S3 => self.s3.head(uri).await,
                }
            }),
        )
        .await
    }

    /// Reads a whole blob.
    pub async fn get(&self, uri: &str) -> Result<Bytes, BlobError> {
        self.timed(
            "get",
            |b: &Bytes| b.len() as u64,
            Box::pin(async {
                match Self::scheme(uri)? {
                    Scheme::File => self.local.get(uri).await,
                    Scheme::S3 => self.s3.get(uri).await,
                }
            }),
        )
        .await
    }

    /// Reads a whole blob of at most `max` bytes: a larger one is refused
    /// as [`BlobError::TooLarge`] from its size before it is read, and
    /// reading stops at `max + 1` bytes whatever its size claimed.
    pub async fn get_limited(&self, uri: &str, max: u64) -> Result<Bytes, BlobError> {
        self.timed(
            "get",
            |b: &Bytes| b.len() as u64,
            Box::pin(async {
                match Self::scheme(uri)? {
                    Scheme::File => self.local.get_limited(uri, max).await,
                    Scheme::S3 => self.s3.get_limited(uri, max).await,
                }
            }),
        )
        .await
    }

    /// Writes a whole blob, replacing any previous content.
    pub async fn put(&self, uri: &str, data: Bytes) -> Result<(), BlobError> {
        let len = data.len() as u64;
        self.timed(
            "put",
            |_| len,
            Box::pin(async {
                match Self::scheme(uri)? {
                    Scheme::File => self.local.put(uri, data).await,
                    Scheme::S3 => self.s3.put(uri, data).await,
                }
            }),
        )
        .await
    }

    /// How many read chunks [`BlobStore::presign_read`] makes for `size` bytes.
    pub fn read_chunks_for(&self, size: u64) -> u64 {
        read_chunk_count(size, self.chunk_bytes)
    }

    /// Chunks a worker can read to get the first `size` bytes of `uri`:
    /// one URL (presigned for S3) repeated over 100 MiB ranges; more than
    /// [`MAX_READ_CHUNKS`] are refused before any is made.
    pub async fn presign_read(
        &self,
        uri: &str,
        size: u64,
        valid_for: Duration,
    ) -> Result<Vec<Chunk>, BlobError> {
        self.timed(
            "presign_read",
            |_| 0,
            Box::pin(async {
                let chunks = self.read_chunks_for(size);
                if chunks > MAX_READ_CHUNKS {
                    return Err(BlobError::TooManyChunks {
                        uri: uri.to_string(),
                        size,
                        chunks,
                        max: MAX_READ_CHUNKS,
                    });
                }
                let url = match Self::scheme(uri)? {
                    Scheme::File => {
                        self.local.resolve(uri)?;
                        uri.to_string()
                    }
                    Scheme::S3 => self.s3.presign_get(uri, self.ttl_for(valid_for)).await?,
                };
                Ok(read_chunk_sizes_with(size, self.chunk_bytes)
                    .into_iter()
                    .map(|size| Chunk {
                        uri: url.clone(),
                        size,
                    })
                    .collect())
            }),
        )
        .await
    }

    /// Starts a multipart upload to `uri` and returns its upload id.
    pub async fn create_multipart(&self, uri: &str) -> Result<String, BlobError> {
        self.timed(
            "create_multipart",
            |_| 0,
            Box::pin(async {
                match Self::scheme(uri)? {
                    Scheme::File => self.local.create_upload(uri).await,
                    Scheme::S3 => self.s3.create_multipart(uri).await,
                }
            }),
        )
        .await
    }

    /// One writable chunk per part of a `size`-byte upload. For `file://`
    /// every chunk names the upload's staging file (the worker writes at
    /// offsets); completing the upload moves it into place.
    pub async fn presign_write_parts(
        &self,
        uri: &str,
        upload_id: &str,
        size: u64,
        valid_for: Duration,
    ) -> Result<Vec<Chunk>, BlobError> {
        self.timed(
            "presign_write",
            |_| 0,
            Box::pin(async {
                let parts = write_part_count(size, self.chunk_bytes);
                if parts > MAX_PARTS {
                    return Err(BlobError::TooManyParts {
                        uri: uri.to_string(),
                        size,
                        parts,
                        max: MAX_PARTS,
                    });
                }
                let sizes = write_part_sizes_with(size, self.chunk_bytes);
                match Self::scheme(uri)? {
                    Scheme::File => {
                        let staged = self.local.staging_uri(uri, upload_id)?;
                        Ok(sizes
                            .into_iter()
                            .map(|size| Chunk {
                                uri: staged.clone(),
                                size,
                            })
                            .collect())
                    }
                    Scheme::S3 => {
                        let ttl = self.ttl_for(valid_for);
                        let mut chunks = Vec::with_capacity(sizes.len());
                        for (i, size) in sizes.into_iter().enumerate() {
                            let url = self.s3.presign_part(uri, upload_id, i + 1, ttl).await?;
                            chunks.push(Chunk { uri: url, size });
                        }
                        Ok(chunks)
                    }
                }
            }),
        )
        .await
    }

    /// Completes an upload with the parts' ETags in order.
    pub async fn complete_multipart(
        &self,
        uri: &str,
        upload_id: &str,
        etags: &[String],
    ) -> Result<(), BlobError> {
        self.timed(
            "complete_multipart",
            |_| 0,
            Box::pin(async {
                match Self::scheme(uri)? {
                    Scheme::File => self.local.complete_upload(uri, upload_id).await,
                    Scheme::S3 => self.s3.complete_multipart(uri, upload_id, etags).await,
                }
            }),
        )
        .await
    }

    /// Abandons an upload; for `file://` the staging file is removed.
    pub async fn abort_multipart(&self, uri: &str, upload_id: &str) -> Result<(), BlobError> {
        self.timed(
            "abort_multipart",
            |_| 0,
            Box::pin(async {
                match Self::scheme(uri)? {
                    Scheme::File => self.local.abort_upload(uri, upload_id).await,
                    Scheme::S3 => self.s3.abort_multipart(uri, upload_id).await,
                }
            }),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_ladder_matches_reference() {
        assert_eq!(write_part_sizes(0), vec![0]);
        assert_eq!(write_part_sizes(10), vec![10]);
        assert_eq!(
            write_part_sizes(SMALL_PART_BYTES + 1),
            vec![SMALL_PART_BYTES, 1]
        );
        let big = write_part_sizes(SMALL_PARTS * SMALL_PART_BYTES + LARGE_PART_BYTES + 5);
        assert_eq!(big.len(), 102);
        assert_eq!(big[99], SMALL_PART_BYTES);
        assert_eq!(big[100], LARGE_PART_BYTES);
        assert_eq!(big[101], 5);
    }

    #[test]
    fn part_count_matches_the_ladder_and_bounds_huge_sizes() {
        for size in [
            0,
            1,
            99,
            100,
            101,
            100 * 100,
            100 * 100 + 1,
            100 * 100 + 5000,
        ] {
            assert_eq!(
                write_part_count(size, 100),
                write_part_sizes_with(size, 100).len() as u64,
                "{size}"
            );
        }
        let five_tib = 5u64 << 40;
        assert!(write_part_count(five_tib, SMALL_PART_BYTES) <= MAX_PARTS);
        assert!(write_part_count(u64::MAX, SMALL_PART_BYTES) > MAX_PARTS);
    }

    /// A store confined to a new temporary directory.
    fn local_store() -> (tempfile::TempDir, BlobStore) {
        let root = tempfile::tempdir().expect("tempdir");
        let store = BlobStore::new(BlobStoreConfig {
            local_roots: vec![root.path().to_path_buf()],
            ..Default::default()
        });
        (root, store)
    }

    #[tokio::test]
    async fn a_huge_upload_is_refused_without_listing_its_parts() {
        let (root, store) = local_store();
        let uri = format!("file://{}/big", root.path().display());
        let id = store.create_multipart(&uri).await.expect("create");
        let err = store
            .presign_write_parts(&uri, &id, u64::MAX, Duration::ZERO)
            .await
            .expect_err("refused");
        assert!(matches!(err, BlobError::TooManyParts { .. }), "{err}");
    }

    #[test]
    fn read_chunks_cover_size() {
        assert_eq!(read_chunk_sizes(0), vec![0]);
        assert_eq!(
            read_chunk_sizes(READ_CHUNK_BYTES * 2 + 3),
            vec![READ_CHUNK_BYTES, READ_CHUNK_BYTES, 3]
        );
        for size in [0, 1, 99, 100, 101, 12_345] {
            assert_eq!(
                read_chunk_count(size, 100),
                read_chunk_sizes_with(size, 100).len() as u64,
                "{size}"
            );
        }
        assert!(read_chunk_count(1 << 40, READ_CHUNK_BYTES) <= MAX_READ_CHUNKS);
    }

    /// A size near 2^63 once made about 10^11 chunks (the agent ran out of
    /// memory); it is refused before any is made.
    #[tokio::test]
    async fn a_huge_read_is_refused_without_listing_its_chunks() {
        let (root, store) = local_store();
        let uri = format!("file://{}/big", root.path().display());
        let err = store
            .presign_read(&uri, 1 << 63, Duration::ZERO)
            .await
            .expect_err("refused");
        assert!(matches!(err, BlobError::TooManyChunks { .. }), "{err}");
        let fits = store
            .presign_read(&uri, MAX_READ_CHUNKS * READ_CHUNK_BYTES, Duration::ZERO)
            .await
            .expect("the largest read allowed");
        assert_eq!(fits.len() as u64, MAX_READ_CHUNKS);
    }
}
