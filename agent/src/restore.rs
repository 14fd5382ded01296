//! Restore: verify a backup chain's files against the checksums their
//! manifests recorded, then turn the chain into a standalone image.
//!
//! The inputs are verified, not the output: each file of the chain (the
//! requested backup's file and its backing files) is hashed with buffered
//! reads and compared with the `fileSha256` the manifest of the backup that
//! wrote it records. `qemu-img convert` runs at the same time, reading the
//! same files through the page cache (`-T writeback`) and writing the output
//! bypassing it (`-t none`) under a hidden name beside the output; the output
//! is renamed into place only when every file checked out, and the partial
//! file is removed (and the convert killed) when one did not.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use futures::stream::{self, StreamExt};
use tracing::info;

use crate::backup::manifest::RecordedFile;
use crate::backup::{BackupError, Manifest};
use crate::image::{self, ImageError, OutputFormat, SourceCache};
use crate::tenant_dir::TenantDir;

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
    /// Check every chain file against its recorded checksum first (and refuse
    /// files whose checksum is missing or differs).
    pub verify: bool,
}

/// One restored disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoredDisk {
    /// Disk name.
    pub disk: String,
    /// Written image.
    pub output: PathBuf,
    /// Whether every file of its chain matched its recorded checksum.
    pub verified: bool,
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
    /// The chain starts with an incremental whose base image Cairn never wrote.
    #[error(
        "the chain of disk {disk} starts with {oldest}, which holds only the changes since bitmap {bitmap} began (its checkpoint was not created by a Cairn backup, so Cairn never wrote the image of that point); rebase it onto a full image of that point with `qemu-img rebase -u -b <image> -F <format> {oldest}` and convert the newest file with `qemu-img convert`"
    )]
    MissingBase {
        /// Disk name.
        disk: String,
        /// The base bitmap.
        bitmap: String,
        /// The chain's oldest file.
        oldest: PathBuf,
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
    /// A chain file is not what its backup wrote.
    #[error(
        "backup file {path} of disk {disk} is damaged: {detail}; restore refused (use --no-verify to restore anyway)"
    )]
    Damaged {
        /// Disk name.
        disk: String,
        /// The file.
        path: PathBuf,
        /// What differs.
        detail: String,
    },
    /// A chain file was written by a backup of another VM: the chain was
    /// stitched together from different VMs' backups.
    #[error(
        "backup file {path} of disk {disk} was written by a backup of VM {other_vm}, not of {vm}; the chain mixes VMs and is refused"
    )]
    ForeignChainFile {
        /// Disk name.
        disk: String,
        /// The file.
        path: PathBuf,
        /// The VM of the backup being restored.
        vm: String,
        /// The VM whose backup wrote the file.
        other_vm: String,
    },
    /// A chain file has no recorded checksum.
    #[error(
        "backup file {path} of disk {disk} has no recorded checksum: its backup is not verified yet (wait for its Verified condition) or no manifest in the directory names it; use --no-verify to restore anyway"
    )]
    Unverified {
        /// Disk name.
        disk: String,
        /// The file.
        path: PathBuf,
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
/// Returns the directory (opened as given: the restore CLI is run by an
/// administrator), the manifest's file name and the manifest.
pub fn locate_manifest(path: &Path) -> Result<(TenantDir, String, Manifest), RestoreError> {
    let missing = || RestoreError::NoManifest {
        path: path.to_path_buf(),
    };
    let bad = |e: BackupError| RestoreError::Manifest(Box::new(e));
    if path.is_dir() {
        let dir = TenantDir::open_trusted(path).map_err(|e| bad(e.into()))?;
        let (name, m) = Manifest::list(&dir).pop().ok_or_else(missing)?;
        return Ok((dir, name, m));
    }
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(missing());
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let dir = TenantDir::open_trusted(parent).map_err(|_| missing())?;
    let name = name.to_string_lossy().to_string();
    if !dir.exists(&name) {
        return Err(missing());
    }
    let m = Manifest::load(&dir, &name).map_err(bad)?;
    Ok((dir, name, m))
}

/// Checks each chain file of `disk` against the checksum and size recorded in
/// the manifests of `dir`, and that each was written by a backup of `vm`,
/// hashing several files at a time. Files are opened through the directory
/// handle without following symlinks.
async fn verify_chain(
    dir: &TenantDir,
    vm: &str,
    disk: &str,
    chain: &[String],
    recorded: &HashMap<String, RecordedFile>,
) -> Result<(), RestoreError> {
    let mut checks = Vec::new();
    for f in chain {
        let path = dir.display_path(f);
        let Some(RecordedFile {
            sha256: Some(want),
            size: want_size,
            vm: file_vm,
            ..
        }) = recorded.get(f).cloned()
        else {
            return Err(RestoreError::Unverified {
                disk: disk.into(),
                path,
            });
        };
        if file_vm != vm {
            return Err(RestoreError::ForeignChainFile {
                disk: disk.into(),
                path,
                vm: vm.into(),
                other_vm: file_vm,
            });
        }
        let handle = dir.open_read(f).map_err(|e| RestoreError::Output {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        let size = handle
            .metadata()
            .map_err(|source| RestoreError::Output {
                path: path.clone(),
                source,
            })?
            .len();
        if size != want_size {
            return Err(RestoreError::Damaged {
                disk: disk.into(),
                path,
                detail: format!("it is {size} bytes but the backup wrote {want_size}"),
            });
        }
        checks.push((path, handle, want));
    }
    let parallel = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
    let mut results = stream::iter(checks.into_iter().map(|(path, handle, want)| async move {
        let got = image::open_file_sha256_and_size(handle)
            .await
            .map(|(h, _)| h);
        (path, want, got)
    }))
    .buffer_unordered(parallel);
    while let Some((path, want, got)) = results.next().await {
        let got = got.map_err(|source| RestoreError::Image {
            disk: disk.into(),
            source,
        })?;
        if got != want {
            return Err(RestoreError::Damaged {
                disk: disk.into(),
                path,
                detail: format!("its sha256 is {got} but its manifest recorded {want}"),
            });
        }
    }
    Ok(())
}

/// Where a regular-file `output` is written before it is known good: a hidden
/// name beside it, so the rename is atomic. `None` for an existing non-file
/// output (a block device), which is written in place.
fn staging_path(output: &Path) -> Option<PathBuf> {
    if std::fs::metadata(output).is_ok_and(|m| !m.is_file()) {
        return None;
    }
    let name = output.file_name()?.to_string_lossy();
    Some(output.with_file_name(format!(".{name}.cairn-restore")))
}

/// Verifies each selected disk's chain files (unless `request.verify` is
/// false) and converts its newest backup file, with its backing chain, into
/// a standalone image.
pub async fn restore(request: &RestoreRequest) -> Result<Vec<RestoredDisk>, RestoreError> {
    let (handle, _, manifest) = locate_manifest(&request.manifest)?;
    let dir = handle.path().to_path_buf();
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
    for d in &disks {
        if let Some(bitmap) = &d.missing_base {
            return Err(RestoreError::MissingBase {
                disk: d.disk.clone(),
                bitmap: bitmap.clone(),
                oldest: dir.join(d.backing_chain.last().unwrap_or(&d.file)),
            });
        }
    }
    let single = disks.len() == 1;
    if !single {
        std::fs::create_dir_all(&request.output).map_err(|source| RestoreError::Output {
            path: request.output.clone(),
            source,
        })?;
    }
    let recorded = if request.verify {
        Manifest::file_checksums(&handle)
    } else {
        HashMap::new()
    };
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
        let source = dir.join(&d.file);
        let convert = |to: PathBuf, cache: SourceCache| {
            let (source, disk) = (source.clone(), d.disk.clone());
            async move {
                image::convert(&source, &to, request.format, cache)
                    .await
                    .map_err(|source| RestoreError::Image { disk, source })
            }
        };
        if !request.verify {
            convert(output.clone(), SourceCache::Bypass).await?;
        } else if let Some(staging) = staging_path(&output) {
            // Hash and convert at once, both reading the chain through the page
            // cache; the output takes its name only when every file checked out.
            let verified =
                verify_chain(&handle, &manifest.vm, &d.disk, &d.backing_chain, &recorded);
            let converted = convert(staging.clone(), SourceCache::PageCache);
            if let Err(e) = tokio::try_join!(verified, converted) {
                let _ = tokio::fs::remove_file(&staging).await;
                return Err(e);
            }
            tokio::fs::rename(&staging, &output)
                .await
                .map_err(|source| RestoreError::Output {
                    path: output.clone(),
                    source,
                })?;
        } else {
            // A device (or other non-file) output is only written once verified.
            verify_chain(&handle, &manifest.vm, &d.disk, &d.backing_chain, &recorded).await?;
            convert(output.clone(), SourceCache::PageCache).await?;
        }
        info!(disk = %d.disk, output = %output.display(), verified = request.verify, "disk restored");
        out.push(RestoredDisk {
            disk: d.disk.clone(),
            output,
            verified: request.verify,
        });
    }
    Ok(out)
}
