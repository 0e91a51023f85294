//! The S3 path against a real S3 server in-process (s3s + s3s-fs, which
//! check SigV4 signatures and presigned-URL expiry): presigned reads,
//! tampered and expired URLs refused, multipart uploads through presigned
//! part URLs, and aborts that leave nothing behind.

use std::time::Duration;

use bytes::Bytes;
use steward_blob_store::{BlobStore, BlobStoreConfig, S3Config};
use steward_test_s3server as s3;

fn store(endpoint: &str, ttl: Duration, chunk: u64) -> BlobStore {
    BlobStore::new(BlobStoreConfig {
        presign_ttl: ttl,
        chunk_bytes: chunk,
        s3: S3Config {
            endpoint: Some(endpoint.to_string()),
            region: Some(s3::REGION.into()),
            access_key_id: Some(s3::ACCESS_KEY.into()),
            secret_access_key: Some(s3::SECRET_KEY.into()),
            allow_http: true,
            ..Default::default()
        },
        ..Default::default()
    })
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

#[tokio::test]
async fn presigned_get_reads_and_tampered_or_expired_urls_are_refused() {
    let root = tempfile::tempdir().expect("tempdir");
    let server = s3::start(root.path(), &["blobs"]).await.expect("s3 server");
    // Long enough that a loaded two-core CI machine reads the URL before it
    // expires (1 s was not: a debug build under load took longer).
    let blobs = store(&server.endpoint(), Duration::from_secs(5), 100 << 20);
    let uri = "s3://blobs/inputs/a.bin";
    let data = pattern(300_000);
    blobs
        .put(uri, Bytes::from(data.clone()))
        .await
        .expect("put");
    assert_eq!(blobs.get(uri).await.expect("get"), data);

    let chunks = blobs
        .presign_read(uri, data.len() as u64, Duration::ZERO)
        .await
        .expect("presign");
    assert_eq!(chunks.len(), 1);
    assert!(
        chunks[0].uri.contains("X-Amz-Signature="),
        "{}",
        chunks[0].uri
    );
    let http = reqwest::Client::new();
    let resp = http.get(&chunks[0].uri).send().await.expect("GET");
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.bytes().await.expect("body").to_vec(), data);

    // Flip the last signature character.
    let url = &chunks[0].uri;
    let last = url.chars().last().expect("char");
    let tampered = format!(
        "{}{}",
        &url[..url.len() - 1],
        if last == '0' { '1' } else { '0' }
    );
    assert_eq!(
        http.get(&tampered)
            .send()
            .await
            .expect("GET")
            .status()
            .as_u16(),
        403
    );

    // The same URL is refused once it has expired (polled: refused within
    // its lifetime plus a margin, never before it was read above).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let status = http.get(url).send().await.expect("GET").status().as_u16();
        if status == 403 {
            break;
        }
        assert_eq!(status, 200, "a live URL reads, an expired one is refused");
        assert!(
            std::time::Instant::now() < deadline,
            "expired URL must be refused"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn multipart_upload_through_presigned_parts_is_byte_exact() {
    let root = tempfile::tempdir().expect("tempdir");
    let server = s3::start(root.path(), &["blobs"]).await.expect("s3 server");
    let part = 5 << 20; // S3's minimum part size
    let blobs = store(&server.endpoint(), Duration::from_secs(600), part);
    let uri = "s3://blobs/outputs/big.bin";
    let data = pattern(2 * part as usize + 12_345);
    let upload = blobs.create_multipart(uri).await.expect("create");
    let chunks = blobs
        .presign_write_parts(uri, &upload, data.len() as u64, Duration::ZERO)
        .await
        .expect("parts");
    assert_eq!(
        chunks.iter().map(|c| c.size).collect::<Vec<_>>(),
        vec![part, part, 12_345]
    );
    let http = reqwest::Client::new();
    let mut etags = Vec::new();
    let mut offset = 0usize;
    for c in &chunks {
        let body = data[offset..offset + c.size as usize].to_vec();
        offset += c.size as usize;
        let resp = http.put(&c.uri).body(body).send().await.expect("PUT part");
        assert_eq!(resp.status().as_u16(), 200, "{:?}", resp.text().await);
        let etag = resp
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .expect("etag")
            .to_string();
        etags.push(etag);
    }
    blobs
        .complete_multipart(uri, &upload, &etags)
        .await
        .expect("complete");
    assert_eq!(blobs.get(uri).await.expect("get").to_vec(), data);
}

#[tokio::test]
async fn aborted_upload_leaves_no_upload_behind() {
    let root = tempfile::tempdir().expect("tempdir");
    let server = s3::start(root.path(), &["blobs"]).await.expect("s3 server");
    let blobs = store(&server.endpoint(), Duration::from_secs(600), 5 << 20);
    let uri = "s3://blobs/outputs/aborted.bin";
    let upload = blobs.create_multipart(uri).await.expect("create");
    let chunks = blobs
        .presign_write_parts(uri, &upload, 10, Duration::ZERO)
        .await
        .expect("parts");
    let http = reqwest::Client::new();
    assert_eq!(
        http.put(&chunks[0].uri)
            .body(vec![1u8; 10])
            .send()
            .await
            .expect("PUT")
            .status()
            .as_u16(),
        200
    );
    blobs.abort_multipart(uri, &upload).await.expect("abort");
    // The upload is gone: its part URL no longer works, no object appeared,
    // and nothing but the bucket directory is left in the server's storage.
    let again = http
        .put(&chunks[0].uri)
        .body(vec![2u8; 10])
        .send()
        .await
        .expect("PUT");
    assert!(
        again.status().is_client_error(),
        "part upload after abort: {}",
        again.status()
    );
    assert!(
        blobs
            .complete_multipart(uri, &upload, &["x".into()])
            .await
            .is_err()
    );
    assert!(blobs.get(uri).await.is_err());
    let mut left = Vec::new();
    for e in walk(root.path()) {
        left.push(
            e.strip_prefix(root.path())
                .expect("prefix")
                .display()
                .to_string(),
        );
    }
    assert!(left.is_empty(), "storage not empty after abort: {left:?}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test]
async fn a_limited_get_refuses_an_object_over_its_limit() {
    let root = tempfile::tempdir().expect("tempdir");
    let server = s3::start(root.path(), &["blobs"]).await.expect("s3 server");
    let blobs = store(&server.endpoint(), Duration::from_secs(60), 100 << 20);
    let uri = "s3://blobs/code/app.zip";
    let data = pattern(300_000);
    blobs
        .put(uri, Bytes::from(data.clone()))
        .await
        .expect("put");
    let err = blobs
        .get_limited(uri, 299_999)
        .await
        .expect_err("over the limit");
    assert!(
        matches!(
            err,
            steward_blob_store::BlobError::TooLarge {
                size: 300_000,
                max: 299_999,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        blobs.get_limited(uri, 300_000).await.expect("at the limit"),
        data
    );
}
