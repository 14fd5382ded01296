//! The JSON manifest written next to a push backup's qcow2 files.

use std::collections::HashMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::BackupError;
use crate::checkpoint::Domain;
use crate::tenant_dir::{TenantDir, check_name};

/// Manifest format version.
pub const MANIFEST_VERSION: u32 = 2;

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
///
/// Identity is the backup's UID, not its name: the files of backup `name`
/// with UID `uid` are `<name>.<uid>.<disk>.qcow2` and
/// `<name>.<uid>.manifest.json` ([`Manifest::stem`]), so a backup
/// re-created under the same name never finds (or overwrites) an older one's
/// files, and the manifest records the full UID, the VM and the UIDs of the
/// checkpoints it used and created, so a base lookup never crosses VMs or
/// re-used checkpoint names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// [`MANIFEST_VERSION`].
    pub version: u32,
    /// Backup name.
    pub name: String,
    /// UID of the backup (the VirtualMachineBackup's `metadata.uid`); empty in
    /// manifests written before version 2, which are never used as a base.
    #[serde(default)]
    pub uid: String,
    /// `<namespace>/<vm>`.
    pub vm: String,
    /// Completion time, RFC 3339.
    pub completed_at: String,
    /// Requested base checkpoint, if incremental.
    pub incremental_from: Option<String>,
    /// UID of the base checkpoint, if incremental.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incremental_from_uid: Option<String>,
    /// Checkpoint created at the backup point, if any; later incrementals
    /// from it chain onto this backup.
    pub checkpoint: Option<String>,
    /// UID of that checkpoint (the VirtualMachineCheckpoint's `metadata.uid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_uid: Option<String>,
    /// Per-disk results.
    pub disks: Vec<ManifestDisk>,
    /// The VM's disk layout at backup time.
    pub domain: Domain,
    /// True once every disk's `fileSha256` is recorded ([`super::verify_backup`]).
    #[serde(default)]
    pub verified: bool,
}

/// What the manifests of a directory record about one backup file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedFile {
    /// SHA-256 once verified.
    pub sha256: Option<String>,
    /// Size the backup wrote.
    pub size: u64,
    /// `<namespace>/<vm>` of the backup that wrote it.
    pub vm: String,
    /// UID of the backup that wrote it.
    pub uid: String,
}

/// What [`Manifest::delete_files`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeletedFiles {
    /// Files removed (the manifest last).
    pub removed: Vec<String>,
    /// Files kept because a later backup is backed by them.
    pub kept: Vec<String>,
}

/// The UID part of a backup's file names: the UID itself (letters, digits
/// and `-` only, at most 64 characters; a Kubernetes UID has 36).
pub fn uid_tag(uid: &str) -> String {
    let tag: String = uid
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(64)
        .collect();
    if tag.is_empty() { "0".into() } else { tag }
}

impl Manifest {
    /// File name stem of backup `name` with UID `uid`: `<name>.<uid>`.
    pub fn stem(name: &str, uid: &str) -> String {
        format!("{name}.{}", uid_tag(uid))
    }

    /// File name of the manifest of the backup with file stem `stem`.
    pub fn file_name(stem: &str) -> String {
        format!("{stem}.manifest.json")
    }

    /// This manifest's own file name.
    pub fn own_file_name(&self) -> String {
        Self::file_name(&Self::stem(&self.name, &self.uid))
    }

    /// Reads the manifest `file` in `dir` (no symlinks followed) and checks
    /// that every file name in it is a single path component.
    pub fn load(dir: &TenantDir, file: &str) -> Result<Self, BackupError> {
        let path = dir.display_path(file);
        let bytes = dir.read(file)?;
        let m: Manifest =
            serde_json::from_slice(&bytes).map_err(|source| BackupError::BadManifest {
                path: path.clone(),
                source,
            })?;
        for d in &m.disks {
            for f in std::iter::once(&d.file).chain(&d.backing_chain) {
                if check_name(f).is_err() {
                    return Err(BackupError::ManifestFileName {
                        path,
                        name: f.clone(),
                    });
                }
            }
        }
        Ok(m)
    }

    /// Writes atomically (temporary file + rename) into `dir`; returns its path.
    pub fn store(&self, dir: &TenantDir) -> Result<PathBuf, BackupError> {
        let name = self.own_file_name();
        let json = serde_json::to_vec_pretty(self).expect("manifest serialises");
        dir.write_atomic(&name, &json)?;
        Ok(dir.display_path(&name))
    }

    /// Every valid manifest in `dir` with its file name, oldest first
    /// (unreadable or invalid ones are skipped).
    pub fn list(dir: &TenantDir) -> Vec<(String, Manifest)> {
        let mut out: Vec<(String, Manifest)> = dir
            .names()
            .into_iter()
            .filter(|n| n.ends_with(".manifest.json"))
            .filter_map(|n| Some((n.clone(), Manifest::load(dir, &n).ok()?)))
            .collect();
        out.sort_by(|a, b| a.1.completed_at.cmp(&b.1.completed_at));
        out
    }

    /// The backup in `dir` of VM `vm` (`<namespace>/<vm>`) that created
    /// checkpoint `checkpoint` with UID `checkpoint_uid`: the base of an
    /// incremental from it. Name, VM and UID must all match, so a checkpoint
    /// name re-used on another VM (or re-created on the same one) is never
    /// taken as the base.
    pub fn find_by_checkpoint(
        dir: &TenantDir,
        vm: &str,
        checkpoint: &str,
        checkpoint_uid: Option<&str>,
    ) -> Option<Manifest> {
        Self::list(dir)
            .into_iter()
            .rev()
            .find(|(_, m)| {
                m.version >= 2
                    && !m.uid.is_empty()
                    && m.vm == vm
                    && m.checkpoint.as_deref() == Some(checkpoint)
                    && m.checkpoint_uid.as_deref() == checkpoint_uid
            })
            .map(|(_, m)| m)
    }

    /// Every backup file named by a manifest in `dir` (as its own `file`):
    /// what the backup that wrote it recorded.
    pub fn file_checksums(dir: &TenantDir) -> HashMap<String, RecordedFile> {
        let mut out = HashMap::new();
        for (_, m) in Self::list(dir) {
            for d in m.disks {
                out.insert(
                    d.file,
                    RecordedFile {
                        sha256: d.file_sha256,
                        size: d.file_size,
                        vm: m.vm.clone(),
                        uid: m.uid.clone(),
                    },
                );
            }
        }
        out
    }

    /// Deletes the files of the backup with file stem `stem` from `dir`
    /// (`deletionPolicy: Delete`), keeping any file that the manifest of
    /// another backup lists in its backing chain unless `going(uid)` says
    /// that backup's files are being deleted too. The manifest goes last, and
    /// only once none of its files is kept, so a kept chain stays readable.
    pub fn delete_files(
        dir: &TenantDir,
        stem: &str,
        going: impl Fn(&str) -> bool,
    ) -> Result<DeletedFiles, BackupError> {
        let own = Self::file_name(stem);
        let Ok(me) = Self::load(dir, &own) else {
            return Ok(DeletedFiles::default());
        };
        let needed: std::collections::HashSet<String> = Self::list(dir)
            .into_iter()
            .filter(|(n, m)| *n != own && !going(&m.uid))
            .flat_map(|(_, m)| m.disks.into_iter().flat_map(|d| d.backing_chain))
            .collect();
        let mut out = DeletedFiles::default();
        for d in &me.disks {
            if needed.contains(&d.file) {
                out.kept.push(d.file.clone());
            } else if dir.exists(&d.file) {
                dir.remove(&d.file)?;
                out.removed.push(d.file.clone());
            }
        }
        if out.kept.is_empty() {
            dir.remove(&own)?;
            out.removed.push(own);
        }
        Ok(out)
    }

    /// The disk entry called `disk`.
    pub fn disk(&self, disk: &str) -> Option<&ManifestDisk> {
        self.disks.iter().find(|d| d.disk == disk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backup `name` of one disk whose file is backed by `backing` (newest first).
    fn backup(dir: &TenantDir, name: &str, backing: &[&str]) -> String {
        let uid = format!("uid-{name}");
        let file = format!("{}.vda.qcow2", Manifest::stem(name, &uid));
        std::fs::write(dir.path().join(&file), b"qcow2").unwrap();
        let mut chain = vec![file.clone()];
        chain.extend(backing.iter().map(|s| s.to_string()));
        Manifest {
            version: MANIFEST_VERSION,
            name: name.into(),
            uid: uid.clone(),
            vm: "ns/vm1".into(),
            completed_at: format!("2026-01-01T00:00:0{}Z", backing.len()),
            incremental_from: None,
            incremental_from_uid: None,
            checkpoint: None,
            checkpoint_uid: None,
            disks: vec![ManifestDisk {
                disk: "vda".into(),
                file: file.clone(),
                backing_chain: chain,
                kind: if backing.is_empty() {
                    BackupKind::Full
                } else {
                    BackupKind::Incremental
                },
                incremental_from: None,
                fell_back_to_full: false,
                virtual_size: 5,
                bytes_copied: 5,
                file_size: 5,
                file_sha256: None,
                missing_base: None,
            }],
            domain: Default::default(),
            verified: false,
        }
        .store(dir)
        .unwrap();
        file
    }

    #[test]
    fn deleting_keeps_files_a_remaining_backup_is_backed_by() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = TenantDir::open_trusted(tmp.path()).unwrap();
        let f1 = backup(&dir, "b1", &[]);
        let f2 = backup(&dir, "b2", &[&f1]);
        let f3 = backup(&dir, "b3", &[&f2, &f1]);
        let stem = |n: &str| Manifest::stem(n, &format!("uid-{n}"));

        // b1 while b2 and b3 stay: kept, manifest included.
        let d = Manifest::delete_files(&dir, &stem("b1"), |_| false).unwrap();
        assert_eq!(d.kept, std::slice::from_ref(&f1));
        assert!(d.removed.is_empty());
        assert!(dir.exists(&f1) && dir.exists(&Manifest::file_name(&stem("b1"))));

        // b3 is the newest: nothing is backed by it.
        let d = Manifest::delete_files(&dir, &stem("b3"), |_| false).unwrap();
        assert_eq!(d.removed, [f3.clone(), Manifest::file_name(&stem("b3"))]);
        assert!(!dir.exists(&f3));

        // b1 and b2 deleted together (a pruned chain): b1 goes first all the same.
        let going = |u: &str| u == "uid-b2";
        let d = Manifest::delete_files(&dir, &stem("b1"), going).unwrap();
        assert!(d.kept.is_empty(), "{d:?}");
        let d = Manifest::delete_files(&dir, &stem("b2"), |_| false).unwrap();
        assert!(d.kept.is_empty(), "{d:?}");
        assert!(!dir.exists(&f1) && !dir.exists(&f2));
        assert!(Manifest::list(&dir).is_empty());

        // Deleting again (a retried cleanup) is a no-op.
        assert_eq!(
            Manifest::delete_files(&dir, &stem("b2"), |_| false).unwrap(),
            DeletedFiles::default()
        );
    }
}
