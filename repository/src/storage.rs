//! Storage backends: S3 (path-style, any S3-compatible server) and a local
//! directory, both through `object_store`. The rest of the crate sees only
//! [`Storage`]: create-only puts, gets, ranged gets, lists and deletes of
//! objects named relative to the repository root.

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use std::path::PathBuf;
use std::sync::Arc;

/// Where a repository lives.
#[derive(Clone, PartialEq, Eq)]
pub enum StorageConfig {
    /// An S3-compatible bucket, addressed path-style.
    S3(S3Config),
    /// A local (or mounted) directory.
    Directory {
        /// Root directory of the repository; created when missing.
        path: PathBuf,
    },
}

impl std::fmt::Debug for StorageConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StorageConfig::S3(s) => f
                .debug_struct("S3")
                .field("endpoint", &s.endpoint)
                .field("bucket", &s.bucket)
                .field("prefix", &s.prefix)
                .finish_non_exhaustive(),
            StorageConfig::Directory { path } => {
                f.debug_struct("Directory").field("path", path).finish()
            }
        }
    }
}

/// Settings of an S3 repository. Credentials never appear in `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Config {
    /// Endpoint URL, e.g. `http://127.0.0.1:7070` or `https://s3.example.com`.
    pub endpoint: String,
    /// Bucket name.
    pub bucket: String,
    /// Optional key prefix inside the bucket (no leading or trailing `/`).
    pub prefix: Option<String>,
    /// Region (default `us-east-1`).
    pub region: Option<String>,
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: String,
}

/// Errors from the storage backend, phrased for the person who configured it.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The backend could not be configured (bad endpoint URL, unusable path).
    #[error("the storage settings are invalid: {0}")]
    Config(String),
    /// The server refused the credentials.
    #[error("the storage refused the credentials (check the access key and secret)")]
    Credentials(#[source] object_store::Error),
    /// The bucket does not exist.
    #[error("the bucket {bucket:?} does not exist")]
    MissingBucket {
        /// Bucket name.
        bucket: String,
    },
    /// The object does not exist.
    #[error("the object {key} does not exist")]
    NotFound {
        /// Object name relative to the repository root.
        key: String,
    },
    /// A create-only write found the object already there.
    #[error("the object {key} already exists")]
    AlreadyExists {
        /// Object name relative to the repository root.
        key: String,
    },
    /// Any other failure: network, server error, I/O.
    #[error("the storage request for {key} failed")]
    Request {
        /// Object name relative to the repository root.
        key: String,
        /// What the backend said.
        #[source]
        source: object_store::Error,
    },
}

/// Metadata of one listed object.
#[derive(Debug, Clone)]
pub struct ObjectInfo {
    /// Object name relative to the repository root.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// Last modification time as the server reports it.
    pub last_modified: chrono::DateTime<chrono::Utc>,
}

/// A repository's object storage.
#[derive(Debug, Clone)]
pub struct Storage {
    store: Arc<dyn ObjectStore>,
    bucket: Option<String>,
}

impl Storage {
    /// Connects to the configured backend (no request is made yet).
    pub fn new(config: &StorageConfig) -> Result<Storage, StorageError> {
        match config {
            StorageConfig::S3(s3) => {
                // reqwest is built without a default TLS provider: use ring,
                // as the rest of Cairn does. Installing twice is harmless.
                let _ = rustls::crypto::ring::default_provider().install_default();
                let store = AmazonS3Builder::new()
                    .with_endpoint(&s3.endpoint)
                    .with_bucket_name(&s3.bucket)
                    .with_region(s3.region.as_deref().unwrap_or("us-east-1"))
                    .with_access_key_id(&s3.access_key_id)
                    .with_secret_access_key(&s3.secret_access_key)
                    .with_virtual_hosted_style_request(false)
                    .with_allow_http(s3.endpoint.starts_with("http://"))
                    .with_conditional_put(S3ConditionalPut::ETagMatch)
                    // Every object authenticates itself (AEAD or BLAKE3), so
                    // hashing each body again for SigV4 buys nothing.
                    .with_unsigned_payload(true)
                    .build()
                    .map_err(|e| StorageError::Config(e.to_string()))?;
                let store: Arc<dyn ObjectStore> =
                    match s3.prefix.as_deref().map(|p| p.trim_matches('/')) {
                        Some(p) if !p.is_empty() => Arc::new(PrefixStore::new(store, p)),
                        _ => Arc::new(store),
                    };
                Ok(Storage {
                    store,
                    bucket: Some(s3.bucket.clone()),
                })
            }
            StorageConfig::Directory { path } => {
                if !path.is_dir() {
                    return Err(StorageError::Config(format!(
                        "the directory {} does not exist",
                        path.display()
                    )));
                }
                let store = LocalFileSystem::new_with_prefix(path)
                    .map_err(|e| StorageError::Config(e.to_string()))?;
                Ok(Storage {
                    store: Arc::new(store),
                    bucket: None,
                })
            }
        }
    }

    fn map_err(&self, key: &str, e: object_store::Error) -> StorageError {
        match e {
            object_store::Error::NotFound { ref source, .. } => {
                let text = source.to_string();
                if let (Some(bucket), true) = (&self.bucket, text.contains("NoSuchBucket")) {
                    StorageError::MissingBucket {
                        bucket: bucket.clone(),
                    }
                } else {
                    StorageError::NotFound { key: key.into() }
                }
            }
            object_store::Error::AlreadyExists { .. }
            | object_store::Error::Precondition { .. } => {
                StorageError::AlreadyExists { key: key.into() }
            }
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. } => StorageError::Credentials(e),
            other => {
                let text = format!("{other:?}");
                if text.contains("NoSuchBucket") {
                    StorageError::MissingBucket {
                        bucket: self.bucket.clone().unwrap_or_default(),
                    }
                } else if text.contains("InvalidAccessKeyId")
                    || text.contains("SignatureDoesNotMatch")
                    || text.contains("AccessDenied")
                {
                    StorageError::Credentials(other)
                } else {
                    StorageError::Request {
                        key: key.into(),
                        source: other,
                    }
                }
            }
        }
    }

    /// Checks that the storage answers: the bucket exists and the credentials work.
    pub async fn probe(&self) -> Result<(), StorageError> {
        self.store
            .list_with_delimiter(None)
            .await
            .map(|_| ())
            .map_err(|e| self.map_err("(repository root)", e))
    }

    /// Writes an object only if no object of that name exists.
    pub async fn put_new(&self, key: &str, data: impl Into<Bytes>) -> Result<(), StorageError> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        self.store
            .put_opts(&ObjectPath::from(key), PutPayload::from(data.into()), opts)
            .await
            .map(|_| ())
            .map_err(|e| self.map_err(key, e))
    }

    /// Writes (or replaces) an object; used only for locks and GC records.
    pub async fn put(&self, key: &str, data: impl Into<Bytes>) -> Result<(), StorageError> {
        self.store
            .put(&ObjectPath::from(key), PutPayload::from(data.into()))
            .await
            .map(|_| ())
            .map_err(|e| self.map_err(key, e))
    }

    /// Reads a whole object.
    pub async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        let r = self
            .store
            .get(&ObjectPath::from(key))
            .await
            .map_err(|e| self.map_err(key, e))?;
        r.bytes().await.map_err(|e| self.map_err(key, e))
    }

    /// Reads `len` bytes of an object from `offset`.
    pub async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes, StorageError> {
        let b = self
            .store
            .get_range(&ObjectPath::from(key), offset..offset + len)
            .await
            .map_err(|e| self.map_err(key, e))?;
        if b.len() as u64 != len {
            return Err(StorageError::Request {
                key: key.into(),
                source: object_store::Error::Generic {
                    store: "cairn",
                    source: format!("short read: {} of {len} bytes", b.len()).into(),
                },
            });
        }
        Ok(b)
    }

    /// Lists every object under `prefix` (recursively).
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        let p = ObjectPath::from(prefix);
        self.store
            .list(Some(&p))
            .map_ok(|m| ObjectInfo {
                key: m.location.to_string(),
                size: m.size,
                last_modified: m.last_modified,
            })
            .try_collect()
            .await
            .map_err(|e| self.map_err(prefix, e))
    }

    /// Deletes an object; a missing object is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), StorageError> {
        match self.store.delete(&ObjectPath::from(key)).await {
            Ok(()) => Ok(()),
            Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.map_err(key, e)),
        }
    }
}
