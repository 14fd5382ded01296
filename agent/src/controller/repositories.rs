//! Opening the BackupRepository a backup names: its spec (cluster-scoped,
//! written by the admin), its credentials and key from Secrets in Cairn's own
//! namespace (the only Secrets the agent may read), and the allowed roots of
//! directory repositories. Nothing read here ever reaches status or logs.

use std::path::{Path, PathBuf};

use cairn_api::{BackupRepository, Compression as ApiCompression};
use cairn_repo::{
    Compression, DEFAULT_CHUNK_SIZE, InitOptions, RepoError, Repository, RepositoryKey, S3Config,
    StorageConfig,
};
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};

/// Why a repository cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum RepositoryAccessError {
    /// No BackupRepository of that name.
    #[error("BackupRepository {0:?} does not exist")]
    NotFound(String),
    /// A Secret or one of its keys is missing.
    #[error(
        "BackupRepository {repository:?} needs key {key:?} of Secret {secret:?} in namespace {namespace:?}, which is missing; the cluster admin must create it"
    )]
    SecretMissing {
        /// Repository name.
        repository: String,
        /// Secret name.
        secret: String,
        /// Data key.
        key: String,
        /// Cairn's namespace.
        namespace: String,
    },
    /// A directory repository outside the agent's repository roots.
    #[error(
        "BackupRepository {repository:?} is at {path}, which is not under the agent's repository roots ({roots})"
    )]
    OutsideRoots {
        /// Repository name.
        repository: String,
        /// Its path.
        path: PathBuf,
        /// Allowed roots.
        roots: String,
    },
    /// The repository refused or failed.
    #[error("BackupRepository {repository:?} cannot be opened")]
    Repo {
        /// Repository name.
        repository: String,
        /// Why.
        #[source]
        source: RepoError,
    },
    /// The API server failed.
    #[error("reading BackupRepository {0:?} failed")]
    Kube(String, #[source] kube::Error),
}

impl RepositoryAccessError {
    /// Stable reason for a condition.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotFound(_) => "RepositoryNotFound",
            Self::SecretMissing { .. } => "RepositorySecretMissing",
            Self::OutsideRoots { .. } => "RepositoryNotAllowed",
            Self::Repo { source, .. } => super::status::repository_reason(source),
            Self::Kube(..) => "RepositoryUnavailable",
        }
    }
}

/// Where to find a repository's secrets and which directories may hold one.
#[derive(Debug, Clone)]
pub struct RepositoryAccess {
    /// Cairn's own namespace, where repository Secrets live.
    pub namespace: String,
    /// Roots directory repositories must lie under (empty: none allowed).
    pub roots: Vec<PathBuf>,
}

impl RepositoryAccess {
    /// Opens (initialising on first use) the BackupRepository `name`.
    pub async fn open(
        &self,
        client: &Client,
        name: &str,
    ) -> Result<Repository, RepositoryAccessError> {
        let repos: Api<BackupRepository> = Api::all(client.clone());
        let repo = repos
            .get_opt(name)
            .await
            .map_err(|e| RepositoryAccessError::Kube(name.to_string(), e))?
            .ok_or_else(|| RepositoryAccessError::NotFound(name.to_string()))?;
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &self.namespace);
        let secret_value = |secret: &str, key: &str| {
            let secrets = secrets.clone();
            let (secret, key) = (secret.to_string(), key.to_string());
            let missing = RepositoryAccessError::SecretMissing {
                repository: name.to_string(),
                secret: secret.clone(),
                key: key.clone(),
                namespace: self.namespace.clone(),
            };
            async move {
                let s = secrets
                    .get_opt(&secret)
                    .await
                    .map_err(|e| RepositoryAccessError::Kube(name.to_string(), e))?;
                s.and_then(|s| s.data)
                    .and_then(|mut d| d.remove(&key))
                    .map(|v| v.0)
                    .ok_or(missing)
            }
        };
        let spec = &repo.spec;
        let storage = match (&spec.storage.s3, &spec.storage.directory) {
            (Some(s3), _) => {
                let text = |v: Vec<u8>| String::from_utf8_lossy(&v).trim().to_string();
                StorageConfig::S3(S3Config {
                    endpoint: s3.endpoint.clone(),
                    bucket: s3.bucket.clone(),
                    prefix: s3.prefix.clone(),
                    region: s3.region.clone(),
                    access_key_id: text(
                        secret_value(&s3.credentials_secret, "AWS_ACCESS_KEY_ID").await?,
                    ),
                    secret_access_key: text(
                        secret_value(&s3.credentials_secret, "AWS_SECRET_ACCESS_KEY").await?,
                    ),
                })
            }
            (None, Some(dir)) => {
                let path = PathBuf::from(&dir.path);
                if !under_roots(&path, &self.roots) {
                    return Err(RepositoryAccessError::OutsideRoots {
                        repository: name.to_string(),
                        path,
                        roots: self
                            .roots
                            .iter()
                            .map(|r| r.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", "),
                    });
                }
                StorageConfig::Directory { path }
            }
            (None, None) => {
                return Err(RepositoryAccessError::Repo {
                    repository: name.to_string(),
                    source: RepoError::InvalidSettings("no storage is configured".into()),
                });
            }
        };
        let key = match &spec.encryption {
            Some(e) => RepositoryKey::Key(secret_value(&e.key_secret, "key").await?),
            None => RepositoryKey::None,
        };
        let options = InitOptions {
            chunk_size: spec
                .chunk_size
                .and_then(|c| u32::try_from(c).ok())
                .unwrap_or(DEFAULT_CHUNK_SIZE),
            compression: match spec.compression.unwrap_or_default() {
                ApiCompression::Zstd => Compression::Zstd,
                ApiCompression::None => Compression::None,
            },
            ..InitOptions::default()
        };
        Repository::open_or_init(&storage, &key, &options)
            .await
            .map_err(|source| RepositoryAccessError::Repo {
                repository: name.to_string(),
                source,
            })
    }
}

/// Whether `path` lies lexically under one of `roots` (no `..` allowed).
fn under_roots(path: &Path, roots: &[PathBuf]) -> bool {
    path.is_absolute()
        && !path
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
        && roots.iter().any(|r| path.starts_with(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_repositories_stay_under_their_roots() {
        let roots = vec![PathBuf::from("/var/lib/cairn/repository")];
        assert!(under_roots(
            Path::new("/var/lib/cairn/repository/a"),
            &roots
        ));
        assert!(!under_roots(
            Path::new("/var/lib/cairn/repository/../x"),
            &roots
        ));
        assert!(!under_roots(Path::new("/etc"), &roots));
        assert!(!under_roots(
            Path::new("/var/lib/cairn/repository-evil"),
            &roots
        ));
        assert!(!under_roots(Path::new("/anything"), &[]));
    }
}
