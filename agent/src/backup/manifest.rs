//! The JSON manifest written next to a push backup's qcow2 files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::BackupError;
use crate::checkpoint::Domain;

/// Manifest format version.
pub const MANIFEST_VERSION: u32 = 1;

/// Full or incremental.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BackupKind {
    /// Every block of the disk.
    Full,
    /// Blocks changed since a checkpoint, on top of an earlier backup file.
    Incremental,
}

/// One disk of a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManifestDisk {
    /// Disk name.
    pub disk: String,
    /// The qcow2 file, relative to the manifest's directory.
    pub file: String,
    /// This file and its backing files, newest first, relative names.
    pub backing_chain: Vec<String>,
    /// Full or incremental for this disk.
    pub kind: BackupKind,
    /// Base checkpoint of an incremental disk.
    pub incremental_from: Option<String>,
    /// An incremental was asked for but the base was unusable, so this disk is full.
    pub fell_back_to_full: bool,
    /// Guest visible size in bytes.
    pub virtual_size: u64,
    /// Bytes QEMU copied.
    pub bytes_copied: u64,
    /// Size in bytes of this backup's own qcow2 file ([`Self::file`]).
    pub file_size: u64,
    /// SHA-256 (hex) of the bytes of this backup's own qcow2 file (not of its
    /// backing files: each is covered by the manifest of the backup that
    /// wrote it). `None` until [`super::verify_backup`] recorded it.
    pub file_sha256: Option<String>,
    /// Set when the oldest file of [`Self::backing_chain`] is an incremental
    /// with no backing file: the image of this checkpoint, which it would back
    /// onto, was never written by Cairn (a checkpoint no backup created). The
    /// chain holds only changes since then and restores only after its oldest
    /// file is rebased onto a full image of that point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing_base: Option<String>,
}

/// A finished push backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// [`MANIFEST_VERSION`].
    pub version: u32,
    /// Backup name (file name stem).
    pub name: String,
    /// `<namespace>/<vm>`.
    pub vm: String,
    /// Completion time, RFC 3339.
    pub completed_at: String,
    /// Requested base checkpoint, if incremental.
    pub incremental_from: Option<String>,
    /// Checkpoint created at the backup point, if any; later incrementals
    /// from it chain onto this backup.
    pub checkpoint: Option<String>,
    /// Per-disk results.
    pub disks: Vec<ManifestDisk>,
    /// The VM's disk layout at backup time.
    pub domain: Domain,
    /// True once every disk's `fileSha256` is recorded ([`super::verify_backup`]).
    #[serde(default)]
    pub verified: bool,
}

impl Manifest {
    /// File name of a backup's manifest.
    pub fn file_name(backup: &str) -> String {
        format!("{backup}.manifest.json")
    }

    /// Reads a manifest file.
    pub fn load(path: &Path) -> Result<Self, BackupError> {
        let bytes = std::fs::read(path).map_err(|source| BackupError::TargetIo {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|source| BackupError::BadManifest {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Writes atomically (temporary file + rename) into `dir`.
    pub fn store(&self, dir: &Path) -> Result<PathBuf, BackupError> {
        let path = dir.join(Self::file_name(&self.name));
        let tmp = dir.join(format!("{}.tmp", Self::file_name(&self.name)));
        let io = |source| BackupError::TargetIo {
            path: path.clone(),
            source,
        };
        let json = serde_json::to_vec_pretty(self).expect("manifest serialises");
        std::fs::write(&tmp, json).map_err(io)?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        Ok(path)
    }

    /// Every manifest in `dir` (unreadable ones are skipped).
    pub fn list(dir: &Path) -> Vec<(PathBuf, Manifest)> {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut out: Vec<(PathBuf, Manifest)> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().ends_with(".manifest.json"))
            .filter_map(|p| Some((p.clone(), Manifest::load(&p).ok()?)))
            .collect();
        out.sort_by(|a, b| a.1.completed_at.cmp(&b.1.completed_at));
        out
    }

    /// The backup in `dir` that created `checkpoint` (the base of an incremental from it).
    pub fn find_by_checkpoint(dir: &Path, checkpoint: &str) -> Option<Manifest> {
        Self::list(dir)
            .into_iter()
            .rev()
            .find(|(_, m)| m.checkpoint.as_deref() == Some(checkpoint))
            .map(|(_, m)| m)
    }

    /// Every backup file named by a manifest in `dir` (as its own `file`),
    /// with its recorded checksum (if verified) and size.
    pub fn file_checksums(dir: &Path) -> HashMap<String, (Option<String>, u64)> {
        let mut out = HashMap::new();
        for (_, m) in Self::list(dir) {
            for d in m.disks {
                out.insert(d.file, (d.file_sha256, d.file_size));
            }
        }
        out
    }

    /// The disk entry called `disk`.
    pub fn disk(&self, disk: &str) -> Option<&ManifestDisk> {
        self.disks.iter().find(|d| d.disk == disk)
    }
}
