//! Restore: turn a backup chain into a standalone image and verify it
//! against the manifest's checksum.

use std::path::{Path, PathBuf};

use tracing::info;

use crate::backup::{BackupError, Manifest};
use crate::image::{self, ImageError, OutputFormat};

/// What to restore.
#[derive(Debug, Clone)]
pub struct RestoreRequest {
    /// A manifest file, or a directory (its newest manifest is used).
    pub manifest: PathBuf,
    /// Output file (one disk) or directory (several disks: `<disk>.<format>` inside).
    pub output: PathBuf,
    /// Output format.
    pub format: OutputFormat,
    /// Only this disk.
    pub disk: Option<String>,
}

/// One restored and verified disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoredDisk {
    /// Disk name.
    pub disk: String,
    /// Written image.
    pub output: PathBuf,
    /// SHA-256 of its content, equal to the manifest's.
    pub sha256: String,
}

/// Restore failures.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// No manifest found.
    #[error("no backup manifest (*.manifest.json) found at {path}")]
    NoManifest {
        /// Where we looked.
        path: PathBuf,
    },
    /// The manifest is unreadable.
    #[error(transparent)]
    Manifest(Box<BackupError>),
    /// The requested disk is not in the backup.
    #[error("backup {backup} has no disk {disk} (disks: {known})")]
    UnknownDisk {
        /// Backup name.
        backup: String,
        /// Requested disk.
        disk: String,
        /// Disks in the backup.
        known: String,
    },
    /// A file of the chain is missing.
    #[error("backup file {path} of disk {disk} is missing; the chain is broken")]
    MissingFile {
        /// Disk name.
        disk: String,
        /// Missing file.
        path: PathBuf,
    },
    /// Conversion or hashing failed.
    #[error("restoring disk {disk} failed")]
    Image {
        /// Disk name.
        disk: String,
        /// The tool failure.
        #[source]
        source: ImageError,
    },
    /// The restored content does not match the manifest.
    #[error(
        "restored disk {disk} has sha256 {actual} but the manifest says {expected}; the backup files are damaged"
    )]
    ChecksumMismatch {
        /// Disk name.
        disk: String,
        /// From the manifest.
        expected: String,
        /// Computed.
        actual: String,
    },
    /// The output location is unusable.
    #[error("cannot write to {path}")]
    Output {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Finds the manifest: the file itself, or the newest in a directory.
pub fn locate_manifest(path: &Path) -> Result<(PathBuf, Manifest), RestoreError> {
    if path.is_dir() {
        return Manifest::list(path)
            .pop()
            .ok_or_else(|| RestoreError::NoManifest {
                path: path.to_path_buf(),
            });
    }
    if !path.exists() {
        return Err(RestoreError::NoManifest {
            path: path.to_path_buf(),
        });
    }
    Ok((
        path.to_path_buf(),
        Manifest::load(path).map_err(|e| RestoreError::Manifest(Box::new(e)))?,
    ))
}

/// Converts each selected disk's newest backup file (with its backing chain)
/// into a standalone image and checks its SHA-256 against the manifest.
pub async fn restore(request: &RestoreRequest) -> Result<Vec<RestoredDisk>, RestoreError> {
    let (manifest_path, manifest) = locate_manifest(&request.manifest)?;
    let dir = manifest_path
        .parent()
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let disks: Vec<_> = match &request.disk {
        Some(name) => vec![manifest.disk(name).ok_or_else(|| {
            RestoreError::UnknownDisk {
                backup: manifest.name.clone(),
                disk: name.clone(),
                known: manifest
                    .disks
                    .iter()
                    .map(|d| d.disk.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            }
        })?],
        None => manifest.disks.iter().collect(),
    };
    let single = disks.len() == 1;
    if !single {
        std::fs::create_dir_all(&request.output).map_err(|source| RestoreError::Output {
            path: request.output.clone(),
            source,
        })?;
    }
    let mut out = Vec::new();
    for d in disks {
        for f in &d.backing_chain {
            let p = dir.join(f);
            if !p.exists() {
                return Err(RestoreError::MissingFile {
                    disk: d.disk.clone(),
                    path: p,
                });
            }
        }
        let output = if single {
            request.output.clone()
        } else {
            request
                .output
                .join(format!("{}.{}", d.disk, request.format.as_str()))
        };
        let wrap = |source| RestoreError::Image {
            disk: d.disk.clone(),
            source,
        };
        image::convert(&dir.join(&d.file), &output, request.format)
            .await
            .map_err(wrap)?;
        let sha256 = image::content_sha256(&output, request.format.as_str())
            .await
            .map_err(wrap)?;
        if sha256 != d.sha256 {
            return Err(RestoreError::ChecksumMismatch {
                disk: d.disk.clone(),
                expected: d.sha256.clone(),
                actual: sha256,
            });
        }
        info!(disk = %d.disk, output = %output.display(), "disk restored and verified");
        out.push(RestoredDisk {
            disk: d.disk.clone(),
            output,
            sha256,
        });
    }
    Ok(out)
}
