//! Blob access for the agent and its workers: reading whole blobs (application
//! code), handing workers presigned chunk URIs to read inputs and write
//! outputs, and the multipart-upload lifecycle behind those writes.
//!
//! `file://` locations are confined to configured roots. Chunking follows the
//! reference executor: reads in 100 MiB chunks; writes in 100 parts of
//! 100 MiB, then 1 GiB parts, the last part trimmed.
//!
//! Entry point: [`BlobStore`].
//! Must not know about: gRPC, protobuf, workers, allocations, HTTP serving.

mod local;

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;

pub use local::LocalRoots;

/// Read chunk size (one presigned URL per 100 MiB range).
pub const READ_CHUNK_BYTES: u64 = 100 << 20;
/// Size of each of the first [`SMALL_PARTS`] write parts.
pub const SMALL_PART_BYTES: u64 = 100 << 20;
pub const SMALL_PARTS: u64 = 100;
/// Size of every later write part.
pub const LARGE_PART_BYTES: u64 = 1 << 30;
/// Upload id used for `file://` multipart uploads, which need no server state.
pub const LOCAL_UPLOAD_ID: &str = "local-multipart-upload-id";
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
    #[error("blob {uri:?} is {actual} bytes, expected at least {expected}")]
    TooShort {
        uri: String,
        expected: u64,
        actual: u64,
    },
}

/// Sizes of the write parts for a blob of `size` bytes (at least one part).
pub fn write_part_sizes(size: u64) -> Vec<u64> {
    let mut parts = Vec::new();
    let mut left = size;
    while left > 0 || parts.is_empty() {
        let cap = if (parts.len() as u64) < SMALL_PARTS {
            SMALL_PART_BYTES
        } else {
            LARGE_PART_BYTES
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

/// Sizes of the read chunks covering `size` bytes (at least one chunk).
pub fn read_chunk_sizes(size: u64) -> Vec<u64> {
    if size == 0 {
        return vec![0];
    }
    let mut chunks = Vec::new();
    let mut left = size;
    while left > 0 {
        let c = left.min(READ_CHUNK_BYTES);
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
    pub presign_ttl: Duration,
}

impl Default for BlobStoreConfig {
    fn default() -> Self {
        BlobStoreConfig {
            local_roots: Vec::new(),
            presign_ttl: DEFAULT_TTL,
        }
    }
}

/// Blob access by URI scheme.
#[derive(Debug, Clone)]
pub struct BlobStore {
    local: LocalRoots,
}

impl BlobStore {
    pub fn new(config: BlobStoreConfig) -> Self {
        BlobStore {
            local: LocalRoots::new(config.local_roots),
        }
    }

    fn scheme(uri: &str) -> Result<&str, BlobError> {
        uri.split_once("://")
            .map(|(s, _)| s)
            .ok_or_else(|| BlobError::InvalidUri {
                uri: uri.to_string(),
                reason: "no scheme".into(),
            })
    }

    fn unsupported(uri: &str, scheme: &str) -> BlobError {
        BlobError::UnsupportedScheme {
            uri: uri.to_string(),
            scheme: scheme.to_string(),
        }
    }

    /// Reads a whole blob.
    pub async fn get(&self, uri: &str) -> Result<Bytes, BlobError> {
        match Self::scheme(uri)? {
            "file" => self.local.get(uri).await,
            s => Err(Self::unsupported(uri, s)),
        }
    }

    /// Writes a whole blob, replacing any previous content.
    pub async fn put(&self, uri: &str, data: Bytes) -> Result<(), BlobError> {
        match Self::scheme(uri)? {
            "file" => self.local.put(uri, data).await,
            s => Err(Self::unsupported(uri, s)),
        }
    }

    /// Chunks a worker can read to get the first `size` bytes of `uri`.
    pub async fn presign_read(&self, uri: &str, size: u64) -> Result<Vec<Chunk>, BlobError> {
        match Self::scheme(uri)? {
            "file" => {
                self.local.resolve(uri)?;
                Ok(read_chunk_sizes(size)
                    .into_iter()
                    .map(|size| Chunk {
                        uri: uri.to_string(),
                        size,
                    })
                    .collect())
            }
            s => Err(Self::unsupported(uri, s)),
        }
    }

    /// Starts a multipart upload to `uri` and returns its upload id.
    pub async fn create_multipart(&self, uri: &str) -> Result<String, BlobError> {
        match Self::scheme(uri)? {
            "file" => {
                self.local.prepare_write(uri).await?;
                Ok(LOCAL_UPLOAD_ID.to_string())
            }
            s => Err(Self::unsupported(uri, s)),
        }
    }

    /// One writable chunk per part of a `size`-byte upload.
    pub async fn presign_write_parts(
        &self,
        uri: &str,
        _upload_id: &str,
        size: u64,
    ) -> Result<Vec<Chunk>, BlobError> {
        match Self::scheme(uri)? {
            "file" => {
                self.local.resolve(uri)?;
                Ok(write_part_sizes(size)
                    .into_iter()
                    .map(|size| Chunk {
                        uri: uri.to_string(),
                        size,
                    })
                    .collect())
            }
            s => Err(Self::unsupported(uri, s)),
        }
    }

    /// Completes an upload with the parts' ETags in order.
    pub async fn complete_multipart(
        &self,
        uri: &str,
        _upload_id: &str,
        _etags: &[String],
    ) -> Result<(), BlobError> {
        match Self::scheme(uri)? {
            // The worker wrote the bytes in place; nothing to assemble.
            "file" => self.local.resolve(uri).map(|_| ()),
            s => Err(Self::unsupported(uri, s)),
        }
    }

    /// Abandons an upload; for `file://` the partial file is removed.
    pub async fn abort_multipart(&self, uri: &str, _upload_id: &str) -> Result<(), BlobError> {
        match Self::scheme(uri)? {
            "file" => self.local.remove(uri).await,
            s => Err(Self::unsupported(uri, s)),
        }
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
    fn read_chunks_cover_size() {
        assert_eq!(read_chunk_sizes(0), vec![0]);
        assert_eq!(
            read_chunk_sizes(READ_CHUNK_BYTES * 2 + 3),
            vec![READ_CHUNK_BYTES, READ_CHUNK_BYTES, 3]
        );
    }
}
