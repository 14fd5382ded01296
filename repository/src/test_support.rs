//! Bucket requests for test rigs and the local development cluster (feature
//! `test-support`): creating and probing a bucket on an S3-compatible server
//! such as versitygw, which [`object_store`] does not do. Signed with AWS
//! Signature Version 4 over a plain HTTP/1.1 connection (loopback servers only:
//! no TLS). Not used by Cairn itself.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// Region the requests are signed for (what versitygw expects by default).
pub const REGION: &str = "us-east-1";

/// Where a bucket lives and who asks.
#[derive(Clone)]
pub struct BucketAccess<'a> {
    /// `http://host:port` (no TLS).
    pub endpoint: &'a str,
    /// Access key id.
    pub access_key_id: &'a str,
    /// Secret access key.
    pub secret_access_key: &'a str,
}

/// Errors of a bucket request.
#[derive(Debug, thiserror::Error)]
pub enum BucketError {
    /// The endpoint is not `http://host:port`.
    #[error("the endpoint {0:?} is not an http://host:port URL")]
    Endpoint(String),
    /// The connection failed.
    #[error("the S3 server did not answer")]
    Io(#[source] std::io::Error),
    /// The server answered with an unexpected status.
    #[error("{request} answered: {status_line}")]
    Refused {
        /// What was asked (`CreateBucket cairn`).
        request: String,
        /// The HTTP status line.
        status_line: String,
    },
}

impl BucketAccess<'_> {
    /// Creates `bucket` (`PUT /<bucket>`); an existing bucket of ours is fine.
    pub fn create_bucket(&self, bucket: &str) -> Result<(), BucketError> {
        let status = self.signed_request("PUT", bucket)?;
        if status.starts_with("HTTP/1.1 200") || status.starts_with("HTTP/1.1 409") {
            // 409: BucketAlreadyOwnedByYou (a restarted local cluster).
            return Ok(());
        }
        Err(BucketError::Refused {
            request: format!("CreateBucket {bucket}"),
            status_line: status,
        })
    }

    /// Whether `bucket` exists and these credentials may use it (`HEAD /<bucket>`).
    pub fn bucket_exists(&self, bucket: &str) -> Result<bool, BucketError> {
        let status = self.signed_request("HEAD", bucket)?;
        if status.starts_with("HTTP/1.1 200") {
            Ok(true)
        } else if status.starts_with("HTTP/1.1 404") {
            Ok(false)
        } else {
            Err(BucketError::Refused {
                request: format!("HeadBucket {bucket}"),
                status_line: status,
            })
        }
    }

    /// Sends `<method> /<bucket>` with an empty body, signed, and returns the status line.
    fn signed_request(&self, method: &str, bucket: &str) -> Result<String, BucketError> {
        let host = self
            .endpoint
            .strip_prefix("http://")
            .map(|h| h.trim_end_matches('/'))
            .filter(|h| !h.is_empty() && !h.contains('/'))
            .ok_or_else(|| BucketError::Endpoint(self.endpoint.to_string()))?;
        let now = chrono::Utc::now();
        let amz_date = now.format("%Y%m%dT%H%M%SZ").to_string();
        let date = now.format("%Y%m%d").to_string();
        let payload_hash = hex::encode(Sha256::digest(b""));
        let canonical = format!(
            "{method}\n/{bucket}\n\nhost:{host}\nx-amz-content-sha256:{payload_hash}\nx-amz-date:{amz_date}\n\nhost;x-amz-content-sha256;x-amz-date\n{payload_hash}"
        );
        let scope = format!("{date}/{REGION}/s3/aws4_request");
        let to_sign = format!(
            "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
            hex::encode(Sha256::digest(canonical.as_bytes()))
        );
        let key = [date.as_str(), REGION, "s3", "aws4_request"].iter().fold(
            format!("AWS4{}", self.secret_access_key).into_bytes(),
            |key, part| hmac(&key, part),
        );
        let signature = hex::encode(hmac(&key, &to_sign));
        let request = format!(
            "{method} /{bucket} HTTP/1.1\r\nHost: {host}\r\nx-amz-date: {amz_date}\r\nx-amz-content-sha256: {payload_hash}\r\nAuthorization: AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature={signature}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.access_key_id
        );
        let mut stream = TcpStream::connect(host).map_err(BucketError::Io)?;
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(BucketError::Io)?;
        stream
            .write_all(request.as_bytes())
            .map_err(BucketError::Io)?;
        let mut response = Vec::new();
        // A HEAD answer has headers only; the server closes the connection.
        stream.read_to_end(&mut response).map_err(BucketError::Io)?;
        let response = String::from_utf8_lossy(&response);
        Ok(response.lines().next().unwrap_or_default().to_string())
    }
}

fn hmac(key: &[u8], data: &str) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(data.as_bytes());
    mac.finalize().into_bytes().to_vec()
}
