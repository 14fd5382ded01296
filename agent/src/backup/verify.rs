//! Verification after a push backup: record the SHA-256 of each backup file
//! this backup wrote, so a restore can check its inputs.
//!
//! [`super::RunningBackup::wait`] returns as soon as QEMU's jobs concluded
//! and the target files are closed, with a manifest whose disks carry no
//! `fileSha256` yet (`verified: false`). [`verify_backup`] hashes only this
//! backup's own files (an incremental's is small; earlier chain members are
//! covered by their own manifests) and rewrites the manifest atomically.

use std::path::Path;

use futures::future::try_join_all;
use tracing::info;

use super::{BackupError, Manifest};
use crate::image;

/// Computes the missing file checksums of the backup whose manifest is at
/// `manifest_path` and rewrites the manifest (temporary file + rename) with
/// `verified: true`. Idempotent: a verified manifest is returned unchanged
/// without reading any backup file. A file whose size differs from what the
/// backup wrote is refused with [`BackupError::FileChanged`].
pub async fn verify_backup(manifest_path: &Path) -> Result<Manifest, BackupError> {
    let mut manifest = Manifest::load(manifest_path)?;
    if manifest.verified && manifest.disks.iter().all(|d| d.file_sha256.is_some()) {
        return Ok(manifest);
    }
    let dir = manifest_path.parent().unwrap_or(Path::new("."));
    let started = std::time::Instant::now();
    let hashes = try_join_all(
        manifest
            .disks
            .iter()
            .filter(|d| d.file_sha256.is_none())
            .map(|d| {
                let path = dir.join(&d.file);
                let (disk, want_size) = (d.disk.clone(), d.file_size);
                async move {
                    let (sha, size) = image::file_sha256_and_size(&path).await.map_err(
                        |source| BackupError::Image {
                            step: format!("checksum {}", path.display()),
                            source,
                        },
                    )?;
                    if size != want_size {
                        return Err(BackupError::FileChanged {
                            path,
                            reason: format!(
                                "it is {size} bytes but the backup wrote {want_size}; it changed after the backup"
                            ),
                        });
                    }
                    Ok((disk, sha))
                }
            }),
    )
    .await?;
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
