//! Entry points for command-line tools (`cairn-agent restore --repository …`)
//! that need only storage settings and a key, no cluster.
//!
//! A repository is named by a location string:
//! - `s3://<bucket>[/<prefix>]?endpoint=<url>[&region=<r>]` — credentials
//!   from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`;
//! - `dir:///<path>` or a plain absolute path — a directory repository.
//!
//! The key comes from a file holding the raw key bytes (as the Secret
//! does), or none for an unencrypted repository.

use crate::reader::{OutputFormat, RestoreReport, restore_disk};
use crate::repo::{Manifest, RepoError, Repository, RepositoryKey};
use crate::storage::{S3Config, StorageConfig};
use std::path::{Path, PathBuf};

/// Errors of the command-line helpers.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The location string is not understood.
    #[error(
        "the repository location {0:?} is not s3://bucket[/prefix]?endpoint=URL, dir:///path or an absolute path"
    )]
    BadLocation(String),
    /// S3 credentials are missing from the environment.
    #[error("S3 credentials are missing: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")]
    MissingCredentials,
    /// The key file cannot be read.
    #[error("the key file {path} cannot be read")]
    KeyFile {
        /// Key file path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No snapshot matches the selection.
    #[error("no snapshot matches {0}")]
    NoSnapshot(String),
    /// A repository operation failed.
    #[error(transparent)]
    Repository(#[from] RepoError),
}

/// Parses a repository location; `env` looks up environment variables.
pub fn parse_location(
    location: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<StorageConfig, CliError> {
    let bad = || CliError::BadLocation(location.into());
    if let Some(rest) = location.strip_prefix("s3://") {
        let (path, query) = rest.split_once('?').ok_or_else(bad)?;
        let (bucket, prefix) = match path.split_once('/') {
            Some((b, p)) => (
                b,
                Some(p.trim_matches('/').to_owned()).filter(|p| !p.is_empty()),
            ),
            None => (path, None),
        };
        let mut endpoint = None;
        let mut region = None;
        for pair in query.split('&') {
            match pair.split_once('=') {
                Some(("endpoint", v)) => endpoint = Some(v.to_owned()),
                Some(("region", v)) => region = Some(v.to_owned()),
                _ => return Err(bad()),
            }
        }
        if bucket.len() < 3 {
            return Err(bad());
        }
        let (Some(access_key_id), Some(secret_access_key)) =
            (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY"))
        else {
            return Err(CliError::MissingCredentials);
        };
        return Ok(StorageConfig::S3(S3Config {
            endpoint: endpoint.ok_or_else(bad)?,
            bucket: bucket.into(),
            prefix,
            region,
            access_key_id,
            secret_access_key,
        }));
    }
    let path = location.strip_prefix("dir://").unwrap_or(location);
    if !path.starts_with('/') {
        return Err(bad());
    }
    Ok(StorageConfig::Directory { path: path.into() })
}

/// Reads the repository key from a file; `None` means unencrypted.
pub fn load_key(path: Option<&Path>) -> Result<RepositoryKey, CliError> {
    match path {
        None => Ok(RepositoryKey::None),
        Some(p) => std::fs::read(p)
            .map(RepositoryKey::Key)
            .map_err(|source| CliError::KeyFile {
                path: p.to_owned(),
                source,
            }),
    }
}

/// Snapshots, optionally only those of one namespace and VM, oldest first.
pub async fn list(
    repo: &Repository,
    namespace: Option<&str>,
    vm: Option<&str>,
) -> Result<Vec<Manifest>, CliError> {
    Ok(repo
        .list_snapshots()
        .await?
        .into_iter()
        .filter(|m| namespace.is_none_or(|n| m.namespace == n))
        .filter(|m| vm.is_none_or(|v| m.vm == v))
        .collect())
}

/// What to restore.
#[derive(Debug, Clone)]
pub struct RestoreRequest {
    /// Snapshot id, or `latest` (then `namespace` and `vm` pick the VM).
    pub snapshot: String,
    /// Namespace filter for `latest`.
    pub namespace: Option<String>,
    /// VM filter for `latest`.
    pub vm: Option<String>,
    /// Disks to restore (all when empty).
    pub disks: Vec<String>,
    /// Output directory; each disk becomes `<disk>.raw` or `<disk>.qcow2`.
    pub output_dir: PathBuf,
    /// Output format.
    pub format: OutputFormat,
    /// Replace existing files.
    pub overwrite: bool,
}

/// Restores the selected disks of a snapshot, each verified and published
/// only when complete.
pub async fn restore(
    repo: &Repository,
    req: &RestoreRequest,
) -> Result<Vec<RestoreReport>, CliError> {
    let manifest = if req.snapshot == "latest" {
        list(repo, req.namespace.as_deref(), req.vm.as_deref())
            .await?
            .pop()
            .ok_or_else(|| {
                CliError::NoSnapshot(format!("latest of {:?}/{:?}", req.namespace, req.vm))
            })?
    } else {
        repo.manifest(&req.snapshot).await?
    };
    let disks: Vec<String> = if req.disks.is_empty() {
        manifest.disks.iter().map(|d| d.name.clone()).collect()
    } else {
        req.disks.clone()
    };
    let ext = match req.format {
        OutputFormat::Raw => "raw",
        OutputFormat::Qcow2 => "qcow2",
    };
    let mut out = Vec::new();
    for disk in disks {
        let path = req.output_dir.join(format!("{disk}.{ext}"));
        out.push(restore_disk(repo, &manifest.id, &disk, &path, req.format, req.overwrite).await?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse() {
        let env = |k: &str| Some(format!("v-{k}"));
        match parse_location("s3://bkt/a/b?endpoint=http://127.0.0.1:7070&region=eu", env).unwrap()
        {
            StorageConfig::S3(s) => {
                assert_eq!(s.bucket, "bkt");
                assert_eq!(s.prefix.as_deref(), Some("a/b"));
                assert_eq!(s.endpoint, "http://127.0.0.1:7070");
                assert_eq!(s.region.as_deref(), Some("eu"));
                assert_eq!(s.access_key_id, "v-AWS_ACCESS_KEY_ID");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_location("s3://bkt?endpoint=http://x", |_| None),
            Err(CliError::MissingCredentials)
        ));
        assert_eq!(
            parse_location("dir:///var/repo", |_| None).unwrap(),
            StorageConfig::Directory {
                path: "/var/repo".into()
            }
        );
        assert!(parse_location("relative/path", |_| None).is_err());
        assert!(parse_location("s3://bkt", env).is_err());
    }
}
