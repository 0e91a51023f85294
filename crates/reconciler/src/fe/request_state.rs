//! Request state (`ctx.state.get/set` in user code): values kept in the
//! blob store under the request's prefix, one object per key, as the
//! reference executor keeps them. The server is not involved.
//!
//! `prepare_read` presigns a read of the whole object (NOT_FOUND when there
//! is none, and the worker returns the caller's default); `prepare_write`
//! opens an upload remembered under the operation id; `commit_write` finds
//! it by `blob.id` and completes it. Uploads never committed are aborted
//! with the allocation's other open uploads.

use std::collections::HashMap;
use std::time::Duration;

use steward_blob_store::BlobStore;

use super::allocation::{Upload, etags, status, to_chunks};
use crate::fe_pb;

const CODE_NOT_FOUND: i32 = 5;
const CODE_INTERNAL: i32 = 13;
/// Longest object key a state key may become (S3's limit).
const MAX_KEY_BYTES: usize = 1024;

type OpResult = fe_pb::allocation_request_state_operation_result::Result;

/// `urllib.parse.quote(key, safe='')`: everything but `A-Za-z0-9_.-~` is
/// percent-encoded, byte by byte.
pub(crate) fn quote(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || b"_.-~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Why a request state key names no object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum KeyError {
    #[error("request state key is empty")]
    Empty,
    #[error("request state key is {0} bytes once encoded; at most {MAX_KEY_BYTES} are allowed")]
    TooLong(usize),
}

#[cfg(test)]
impl KeyError {
    /// Whether the message says `part` (what the tests look for).
    fn contains(&self, part: &str) -> bool {
        self.to_string().contains(part)
    }
}

/// The object holding `key`'s value for the request whose data lives under `prefix`.
pub(crate) fn state_uri(prefix: &str, key: &str) -> Result<String, KeyError> {
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    let quoted = quote(key);
    if quoted.len() > MAX_KEY_BYTES {
        return Err(KeyError::TooLong(quoted.len()));
    }
    Ok(format!("{prefix}/state/{quoted}"))
}

/// Serves one operation; `writes` holds the prepared writes of this
/// allocation. A value is written up to `max_bytes` and read up to
/// `max_read_bytes` (`--max-input-blob-bytes`).
pub(crate) async fn serve(
    blobs: &BlobStore,
    prefix: &str,
    op: &fe_pb::AllocationRequestStateOperation,
    writes: &mut HashMap<String, Upload>,
    valid_for: Duration,
    max_bytes: u64,
    max_read_bytes: u64,
) -> fe_pb::AllocationRequestStateOperationResult {
    use fe_pb::allocation_request_state_operation::Operation as Op;
    let id = op.operation_id.clone().unwrap_or_default();
    let key = op.state_key.as_deref().unwrap_or("");
    let (code, message, result) = match &op.operation {
        Some(Op::PrepareRead(_)) => {
            prepare_read(blobs, prefix, key, valid_for, max_read_bytes).await
        }
        Some(Op::PrepareWrite(w)) => match w.size.unwrap_or(0) {
            size if size > max_bytes => (
                CODE_INTERNAL,
                format!("a {size}-byte value is over the {max_bytes}-byte limit"),
                write_result(None),
            ),
            size => prepare_write(blobs, prefix, key, &id, size, writes, valid_for).await,
        },
        Some(Op::CommitWrite(c)) => commit_write(blobs, c, writes).await,
        None => (
            CODE_INTERNAL,
            "request state operation has no operation".to_string(),
            None,
        ),
    };
    fe_pb::AllocationRequestStateOperationResult {
        operation_id: Some(id),
        status: Some(status(code, message)),
        result,
    }
}

type Served = (i32, String, Option<OpResult>);

fn read_result(blob: Option<fe_pb::Blob>) -> Option<OpResult> {
    Some(OpResult::PrepareRead(
        fe_pb::AllocationRequestStatePrepareReadOperationResult { blob },
    ))
}

async fn prepare_read(
    blobs: &BlobStore,
    prefix: &str,
    key: &str,
    valid_for: Duration,
    max_bytes: u64,
) -> Served {
    let uri = match state_uri(prefix, key) {
        Ok(u) => u,
        Err(e) => return (CODE_INTERNAL, e.to_string(), read_result(None)),
    };
    let size = match blobs.head(&uri).await {
        Ok(Some(size)) => size,
        Ok(None) => {
            return (
                CODE_NOT_FOUND,
                format!("no value for key {key:?}"),
                read_result(None),
            );
        }
        Err(e) => return (CODE_INTERNAL, e.to_string(), read_result(None)),
    };
    if size > max_bytes {
        let m = format!(
            "the value of key {key:?} is {size} bytes, over the {max_bytes}-byte limit (--max-input-blob-bytes)"
        );
        return (CODE_INTERNAL, m, read_result(None));
    }
    match blobs.presign_read(&uri, size, valid_for).await {
        Ok(chunks) => (
            0,
            String::new(),
            read_result(Some(fe_pb::Blob {
                id: None,
                chunks: to_chunks(chunks),
            })),
        ),
        Err(e) => (CODE_INTERNAL, e.to_string(), read_result(None)),
    }
}

fn write_result(blob: Option<fe_pb::Blob>) -> Option<OpResult> {
    Some(OpResult::PrepareWrite(
        fe_pb::AllocationRequestStatePrepareWriteOperationResult { blob },
    ))
}

async fn prepare_write(
    blobs: &BlobStore,
    prefix: &str,
    key: &str,
    op_id: &str,
    size: u64,
    writes: &mut HashMap<String, Upload>,
    valid_for: Duration,
) -> Served {
    if op_id.is_empty() || writes.contains_key(op_id) {
        let m = format!("write operation id {op_id:?} is empty or already used");
        return (CODE_INTERNAL, m, write_result(None));
    }
    let uri = match state_uri(prefix, key) {
        Ok(u) => u,
        Err(e) => return (CODE_INTERNAL, e.to_string(), write_result(None)),
    };
    let upload_id = match blobs.create_multipart(&uri).await {
        Ok(u) => u,
        Err(e) => return (CODE_INTERNAL, e.to_string(), write_result(None)),
    };
    let upload = Upload::open(uri, upload_id);
    match blobs
        .presign_write_parts(&upload.uri, &upload.upload_id, size, valid_for)
        .await
    {
        Ok(chunks) => {
            writes.insert(op_id.to_string(), upload);
            let blob = fe_pb::Blob {
                id: Some(op_id.to_string()),
                chunks: to_chunks(chunks),
            };
            (0, String::new(), write_result(Some(blob)))
        }
        Err(e) => {
            let _ = blobs.abort_multipart(&upload.uri, &upload.upload_id).await;
            (CODE_INTERNAL, e.to_string(), write_result(None))
        }
    }
}

async fn commit_write(
    blobs: &BlobStore,
    c: &fe_pb::AllocationRequestStateCommitWriteOperation,
    writes: &mut HashMap<String, Upload>,
) -> Served {
    let done = Some(OpResult::CommitWrite(
        fe_pb::AllocationRequestStateCommitWriteOperationResult {},
    ));
    let Some(blob) = &c.blob else {
        return (CODE_INTERNAL, "commit_write has no blob".into(), done);
    };
    let id = blob.id.clone().unwrap_or_default();
    let Some(upload) = writes.remove(&id) else {
        let m = format!("no prepared write {id:?} to commit");
        return (CODE_NOT_FOUND, m, done);
    };
    match blobs
        .complete_multipart(&upload.uri, &upload.upload_id, &etags(blob))
        .await
    {
        Ok(()) => (0, String::new(), done),
        Err(e) => {
            let _ = blobs.abort_multipart(&upload.uri, &upload.upload_id).await;
            (CODE_INTERNAL, e.to_string(), done)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_quoted_like_python() {
        assert_eq!(quote("counter"), "counter");
        assert_eq!(quote("a b/c?d"), "a%20b%2Fc%3Fd");
        assert_eq!(quote("ünï"), "%C3%BCn%C3%AF");
        assert_eq!(quote("x_y.z-w~"), "x_y.z-w~");
        assert_eq!(
            state_uri("file:///r/data", "k/1").as_deref(),
            Ok("file:///r/data/state/k%2F1")
        );
        assert!(state_uri("p", "").is_err());
        assert!(state_uri("p", &"/".repeat(400)).is_err_and(|e| e.contains("1024")));
    }

    #[tokio::test]
    async fn write_commit_read_and_missing_keys() {
        let root = tempfile::tempdir().expect("tempdir");
        let blobs = BlobStore::new(steward_blob_store::BlobStoreConfig {
            local_roots: vec![root.path().to_path_buf()],
            ..Default::default()
        });
        let prefix = format!("file://{}/req", root.path().display());
        let valid = Duration::from_secs(60);
        let mut writes = HashMap::new();
        let op = |id: &str, o| fe_pb::AllocationRequestStateOperation {
            operation_id: Some(id.into()),
            state_key: Some("k".into()),
            operation: Some(o),
        };
        use fe_pb::allocation_request_state_operation::Operation as Op;
        let read = fe_pb::AllocationRequestStatePrepareReadOperation {};
        let missing = serve(
            &blobs,
            &prefix,
            &op("r0", Op::PrepareRead(read)),
            &mut writes,
            valid,
            1 << 20,
            1 << 20,
        )
        .await;
        assert_eq!(missing.status.map(|s| s.code), Some(CODE_NOT_FOUND));
        assert!(matches!(missing.result, Some(OpResult::PrepareRead(_))));

        let w = fe_pb::AllocationRequestStatePrepareWriteOperation { size: Some(5) };
        let prepared = serve(
            &blobs,
            &prefix,
            &op("w1", Op::PrepareWrite(w)),
            &mut writes,
            valid,
            1 << 20,
            1 << 20,
        )
        .await;
        assert_eq!(prepared.status.as_ref().map(|s| s.code), Some(0));
        let Some(OpResult::PrepareWrite(p)) = prepared.result else {
            panic!("prepare_write result");
        };
        let blob = p.blob.expect("blob");
        assert_eq!(blob.id.as_deref(), Some("w1"));
        // The worker writes the chunk, making its directories as
        // tensorlake's file store does.
        let path = blob.chunks[0]
            .uri
            .as_deref()
            .and_then(|u| u.strip_prefix("file://"))
            .expect("file uri");
        if let Some(dir) = std::path::Path::new(path).parent() {
            std::fs::create_dir_all(dir).expect("worker's directories");
        }
        std::fs::write(path, b"hello").expect("write chunk");
        // Not visible before the commit.
        let read = fe_pb::AllocationRequestStatePrepareReadOperation {};
        let before = serve(
            &blobs,
            &prefix,
            &op("r1", Op::PrepareRead(read)),
            &mut writes,
            valid,
            1 << 20,
            1 << 20,
        )
        .await;
        assert_eq!(before.status.map(|s| s.code), Some(CODE_NOT_FOUND));

        let commit = fe_pb::AllocationRequestStateCommitWriteOperation {
            blob: Some(blob.clone()),
        };
        let done = serve(
            &blobs,
            &prefix,
            &op("c1", Op::CommitWrite(commit.clone())),
            &mut writes,
            valid,
            1 << 20,
            1 << 20,
        )
        .await;
        assert_eq!(done.status.map(|s| s.code), Some(0));
        let again = serve(
            &blobs,
            &prefix,
            &op("c2", Op::CommitWrite(commit)),
            &mut writes,
            valid,
            1 << 20,
            1 << 20,
        )
        .await;
        assert_eq!(
            again.status.map(|s| s.code),
            Some(CODE_NOT_FOUND),
            "a write commits once"
        );

        let read = fe_pb::AllocationRequestStatePrepareReadOperation {};
        let found = serve(
            &blobs,
            &prefix,
            &op("r2", Op::PrepareRead(read)),
            &mut writes,
            valid,
            1 << 20,
            1 << 20,
        )
        .await;
        assert_eq!(found.status.map(|s| s.code), Some(0));
        let Some(OpResult::PrepareRead(r)) = found.result else {
            panic!("prepare_read result");
        };
        let chunks = r.blob.expect("blob").chunks;
        assert_eq!(chunks.iter().map(|c| c.size.unwrap_or(0)).sum::<u64>(), 5);
        assert_eq!(
            blobs.get(&format!("{prefix}/state/k")).await.expect("get"),
            &b"hello"[..]
        );

        // A value over the read limit is refused, naming it; no URL is made.
        let read = fe_pb::AllocationRequestStatePrepareReadOperation {};
        let over = serve(
            &blobs,
            &prefix,
            &op("r3", Op::PrepareRead(read)),
            &mut writes,
            valid,
            1 << 20,
            4,
        )
        .await;
        let status = over.status.expect("status");
        assert_eq!(status.code, CODE_INTERNAL);
        assert!(
            status
                .message
                .contains("over the 4-byte limit (--max-input-blob-bytes)"),
            "{}",
            status.message
        );
        assert!(matches!(
            over.result,
            Some(OpResult::PrepareRead(
                fe_pb::AllocationRequestStatePrepareReadOperationResult { blob: None }
            ))
        ));
    }
}
