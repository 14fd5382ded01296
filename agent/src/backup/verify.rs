//! Verification after a push backup: record the SHA-256 of each backup file
//! this backup wrote, so a restore can check its inputs.
//!
//! [`super::RunningBackup::wait`] returns as soon as QEMU's jobs concluded
//! and the target files are closed, with a manifest whose disks carry no
//! `fileSha256` yet (`verified: false`). [`verify_backup`] hashes only this
//! backup's own files (an incremental's is small; earlier chain members are
//! covered by their own manifests) and rewrites the manifest atomically.

use futures::future::try_join_all;
use tracing::info;

use super::{BackupError, Manifest};
use crate::image;
use crate::tenant_dir::TenantDir;

/// Computes the missing file checksums of the backup whose manifest is
/// `manifest_file` in `dir` and rewrites the manifest (temporary file +
/// rename) with `verified: true`. Every file is opened through the directory
/// handle without following symlinks. Idempotent: a verified manifest is
/// returned unchanged without reading any backup file. A file whose size
/// differs from what the backup wrote is refused with [`BackupError::FileChanged`].
pub async fn verify_backup(dir: &TenantDir, manifest_file: &str) -> Result<Manifest, BackupError> {
    let mut manifest = Manifest::load(dir, manifest_file)?;
    if manifest.verified && manifest.disks.iter().all(|d| d.file_sha256.is_some()) {
        return Ok(manifest);
    }
    let started = std::time::Instant::now();
    let mut jobs = Vec::new();
    for d in manifest.disks.iter().filter(|d| d.file_sha256.is_none()) {
        let path = dir.display_path(&d.file);
        let handle = dir.open_read(&d.file)?;
        let (disk, want_size) = (d.disk.clone(), d.file_size);
        jobs.push(async move {
            let (sha, size) = image::open_file_sha256_and_size(handle)
                .await
                .map_err(|source| BackupError::Image {
                    step: format!("checksum {}", path.display()),
                    source,
                })?;
            if size != want_size {
                return Err(BackupError::FileChanged {
                    path,
                    reason: format!(
                        "it is {size} bytes but the backup wrote {want_size}; it changed after the backup"
                    ),
                });
            }
            Ok((disk, sha))
        });
    }
    let hashes = try_join_all(jobs).await?;
    for (disk, sha) in hashes {
        if let Some(d) = manifest.disks.iter_mut().find(|d| d.disk == disk) {
            d.file_sha256 = Some(sha);
        }
    }
    manifest.verified = true;
    manifest.store(dir)?;
    info!(
        backup = %manifest.name,
        seconds = started.elapsed().as_secs_f64(),
        "backup files verified; checksums recorded"
    );
    Ok(manifest)
}

/// [`verify_backup`] for a manifest an administrator names by path (the
/// bench, the CLI, tests): its directory is opened as given.
pub async fn verify_backup_file(manifest_path: &std::path::Path) -> Result<Manifest, BackupError> {
    let parent = manifest_path.parent().unwrap_or(std::path::Path::new("."));
    let dir = TenantDir::open_trusted(parent)?;
    let name = manifest_path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    verify_backup(&dir, &name).await
}
