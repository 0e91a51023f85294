//! `s3://bucket/key` blobs through `object_store`'s S3 client: whole reads
//! and writes for the agent, presigned GET URLs for reads by workers, and
//! multipart uploads whose parts workers PUT to presigned `UploadPart` URLs.
//! Workers never see credentials, only URLs that expire.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as ObjectPath;
use object_store::signer::{Method, SignedUrlOptions, Signer};
use object_store::{ObjectStoreExt, PutPayload};
use parking_lot::Mutex;

use crate::BlobError;

/// How to reach S3 (or an S3-compatible endpoint). Unset fields fall back
/// to the standard `AWS_*` environment variables.
#[derive(Debug, Clone, Default)]
pub struct S3Config {
    /// e.g. `http://127.0.0.1:9000` for MinIO or a test server.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
    /// Allow plain-HTTP endpoints.
    pub allow_http: bool,
    /// `bucket.host/key` instead of `host/bucket/key`.
    pub virtual_hosted_style: bool,
}

#[derive(Debug)]
pub(crate) struct S3Stores {
    config: S3Config,
    by_bucket: Mutex<HashMap<String, Arc<AmazonS3>>>,
}

fn err(uri: &str, e: impl std::fmt::Display) -> BlobError {
    BlobError::Remote {
        uri: uri.to_string(),
        message: e.to_string(),
    }
}

/// Splits `s3://bucket/key` into its parts.
pub(crate) fn split(uri: &str) -> Result<(String, ObjectPath), BlobError> {
    let rest = uri
        .strip_prefix("s3://")
        .ok_or_else(|| BlobError::InvalidUri {
            uri: uri.to_string(),
            reason: "not an s3:// URI".into(),
        })?;
    let (bucket, key) = rest.split_once('/').ok_or_else(|| BlobError::InvalidUri {
        uri: uri.to_string(),
        reason: "no key after the bucket".into(),
    })?;
    if bucket.is_empty() || key.is_empty() {
        return Err(BlobError::InvalidUri {
            uri: uri.to_string(),
            reason: "empty bucket or key".into(),
        });
    }
    let path = ObjectPath::parse(key).map_err(|e| BlobError::InvalidUri {
        uri: uri.to_string(),
        reason: e.to_string(),
    })?;
    Ok((bucket.to_string(), path))
}

impl S3Stores {
    pub fn new(config: S3Config) -> Self {
        S3Stores {
            config,
            by_bucket: Mutex::new(HashMap::new()),
        }
    }

    fn store(&self, uri: &str, bucket: &str) -> Result<Arc<AmazonS3>, BlobError> {
        if let Some(s) = self.by_bucket.lock().get(bucket) {
            return Ok(s.clone());
        }
        let c = &self.config;
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_allow_http(c.allow_http)
            .with_virtual_hosted_style_request(c.virtual_hosted_style);
        if let Some(v) = &c.endpoint {
            b = b.with_endpoint(v);
        }
        if let Some(v) = &c.region {
            b = b.with_region(v);
        }
        if let Some(v) = &c.access_key_id {
            b = b.with_access_key_id(v);
        }
        if let Some(v) = &c.secret_access_key {
            b = b.with_secret_access_key(v);
        }
        if let Some(v) = &c.session_token {
            b = b.with_token(v);
        }
        let store = Arc::new(b.build().map_err(|e| err(uri, e))?);
        self.by_bucket
            .lock()
            .insert(bucket.to_string(), store.clone());
        Ok(store)
    }

    pub async fn get(&self, uri: &str) -> Result<Bytes, BlobError> {
        let (bucket, path) = split(uri)?;
        let store = self.store(uri, &bucket)?;
        let r = store.get(&path).await.map_err(|e| err(uri, e))?;
        r.bytes().await.map_err(|e| err(uri, e))
    }

    /// [`Self::get`] of at most `max` bytes: refused from the object's size
    /// before its body is read, and the body read no further than `max + 1`
    /// bytes (a body longer than its size claimed is refused too).
    pub async fn get_limited(&self, uri: &str, max: u64) -> Result<Bytes, BlobError> {
        use futures::StreamExt;
        let (bucket, path) = split(uri)?;
        let store = self.store(uri, &bucket)?;
        let r = store.get(&path).await.map_err(|e| err(uri, e))?;
        let too_large = |size| BlobError::TooLarge {
            uri: uri.to_string(),
            size,
            max,
        };
        if r.meta.size > max {
            return Err(too_large(r.meta.size));
        }
        let mut data = Vec::with_capacity(usize::try_from(r.meta.size).unwrap_or(0));
        let mut body = r.into_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| err(uri, e))?;
            let len = data.len() as u64 + chunk.len() as u64;
            if len > max {
                return Err(too_large(len));
            }
            data.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(data))
    }

    pub async fn head(&self, uri: &str) -> Result<Option<u64>, BlobError> {
        let (bucket, path) = split(uri)?;
        let store = self.store(uri, &bucket)?;
        match store.head(&path).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(err(uri, e)),
        }
    }

    pub async fn put(&self, uri: &str, data: Bytes) -> Result<(), BlobError> {
        let (bucket, path) = split(uri)?;
        let store = self.store(uri, &bucket)?;
        store
            .put(&path, PutPayload::from_bytes(data))
            .await
            .map_err(|e| err(uri, e))?;
        Ok(())
    }

    pub async fn presign_get(&self, uri: &str, ttl: Duration) -> Result<String, BlobError> {
        let (bucket, path) = split(uri)?;
        let store = self.store(uri, &bucket)?;
        let url = store
            .signed_url(Method::GET, &path, ttl)
            .await
            .map_err(|e| err(uri, e))?;
        Ok(url.to_string())
    }

    pub async fn create_multipart(&self, uri: &str) -> Result<String, BlobError> {
        let (bucket, path) = split(uri)?;
        let store = self.store(uri, &bucket)?;
        store.create_multipart(&path).await.map_err(|e| err(uri, e))
    }

    /// A presigned `UploadPart` URL (parts are numbered from 1).
    pub async fn presign_part(
        &self,
        uri: &str,
        upload_id: &str,
        part_number: usize,
        ttl: Duration,
    ) -> Result<String, BlobError> {
        let (bucket, path) = split(uri)?;
        let store = self.store(uri, &bucket)?;
        let opts = SignedUrlOptions::new().with_query([
            ("partNumber", part_number.to_string()),
            ("uploadId", upload_id.to_string()),
        ]);
        let url = store
            .signed_url_opts(Method::PUT, &path, ttl, &opts)
            .await
            .map_err(|e| err(uri, e))?;
        Ok(url.to_string())
    }

    pub async fn complete_multipart(
        &self,
        uri: &str,
        upload_id: &str,
        etags: &[String],
    ) -> Result<(), BlobError> {
        let (bucket, path) = split(uri)?;
        let store = self.store(uri, &bucket)?;
        let parts = etags
            .iter()
            .map(|e| PartId {
                content_id: e.clone(),
            })
            .collect();
        store
            .complete_multipart(&path, &upload_id.to_string(), parts)
            .await
            .map_err(|e| err(uri, e))?;
        Ok(())
    }

    pub async fn abort_multipart(&self, uri: &str, upload_id: &str) -> Result<(), BlobError> {
        let (bucket, path) = split(uri)?;
        let store = self.store(uri, &bucket)?;
        store
            .abort_multipart(&path, &upload_id.to_string())
            .await
            .map_err(|e| err(uri, e))
    }
}
