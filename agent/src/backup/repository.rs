//! Backups into a BackupRepository: QEMU serves a point-in-time export of the
//! disks (the fleecing path pull backups use, on a socket only the agent
//! knows), the agent reads it with its own NBD client and writes one
//! repository snapshot.
//!
//! Pipeline: find the base snapshot (same namespace, VM and base checkpoint
//! name **and** UID) → [`start_pull_export`] (one transaction: fleecing jobs,
//! the base bitmap merged into a disabled temporary one, the new checkpoint's
//! bitmaps) → per disk: connect, ask the `qemu:dirty-bitmap:` context for
//! the changed extents (incrementals), [`cairn_repo::SnapshotWriter::add_disk`]
//! reads only the chunks they touch and takes every other chunk id from the
//! base snapshot → commit (the manifest is written last: a snapshot is
//! visible only when complete) → [`stop_pull_export`]. Whatever fails, the
//! export is torn down and the new checkpoint's bitmaps are removed.

use std::sync::Arc;

use cairn_nbd::{Client, ConnectOptions};
use cairn_repo::{
    CheckpointRef, DiskSource, Extent, IngestOptions, IngestProgress, Manifest, ProgressFn,
    Repository, SnapshotId, SnapshotSpec,
};
use tracing::info;

use super::BackupError;
use super::pull::{PullExport, PullPolicy, PullRequest, start_pull_export, stop_pull_export};
use crate::identity::OperationId;
use crate::inventory::VmRef;
use crate::qmp::QmpClient;

/// A backup into a repository.
#[derive(Debug, Clone)]
pub struct RepositoryBackupRequest {
    /// Names every QEMU-side object (the backup's UID).
    pub operation: OperationId,
    /// Backup name (names the export socket, `<export dir>/<namespace>/<name>.sock`).
    pub name: String,
    /// UID of the VirtualMachineBackup (recorded in the snapshot).
    pub backup_uid: String,
    /// Disk names; `None` = the default selection.
    pub disks: Option<Vec<String>>,
    /// Base checkpoint (bitmap name and checkpoint UID) of an incremental.
    pub incremental: Option<CheckpointRef>,
    /// Checkpoint created at the backup point (name = bitmap name, and UID).
    pub new_checkpoint: Option<CheckpointRef>,
    /// Read a disk whole when its base bitmap is unusable.
    pub fallback_to_full: bool,
    /// Freeze the guest's filesystems through its agent around the backup point.
    pub quiesce: Option<crate::qga::GuestAgent>,
}

/// A written snapshot.
#[derive(Debug, Clone)]
pub struct RepositoryBackupOutcome {
    /// The snapshot's manifest.
    pub manifest: Manifest,
    /// The snapshot unchanged chunks came from (an incremental with a base).
    pub base: Option<SnapshotId>,
    /// Bytes read, uploaded, chunks new and reused.
    pub progress: IngestProgress,
    /// Disks read whole because their base bitmap was unusable.
    pub fell_back: Vec<String>,
    /// How the guest was frozen for the backup point (`quiesce`).
    pub quiesce: Option<crate::qga::QuiesceReport>,
}

/// The newest snapshot of `vm` in `namespace` taken at checkpoint `base`
/// (name and UID: a checkpoint re-created under the same name is another one).
pub fn find_base<'a>(
    snapshots: &'a [Manifest],
    namespace: &str,
    vm: &str,
    base: &CheckpointRef,
) -> Option<&'a Manifest> {
    snapshots
        .iter()
        .filter(|m| m.namespace == namespace && m.vm == vm && m.checkpoint.as_ref() == Some(base))
        .max_by(|a, b| a.time.cmp(&b.time))
}

/// An exported disk as a [`DiskSource`].
struct NbdDisk(Client);

impl DiskSource for NbdDisk {
    async fn read_at(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        self.0
            .read(offset, len)
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
    }
}

/// Runs a backup of `vm` into `repo` and returns the committed snapshot.
pub async fn run_repository_backup(
    client: &QmpClient,
    vm: &VmRef,
    policy: &PullPolicy,
    repo: &Repository,
    request: &RepositoryBackupRequest,
    progress: Option<ProgressFn>,
) -> Result<RepositoryBackupOutcome, BackupError> {
    let repo_err = |source| BackupError::Repository {
        vm: vm.to_string(),
        source,
    };
    let base = match &request.incremental {
        Some(cp) => {
            let snapshots = repo.list_snapshots().await.map_err(repo_err)?;
            find_base(&snapshots, &vm.namespace, &vm.name, cp).map(|m| m.id.clone())
        }
        None => None,
    };
    // Without a snapshot at the base checkpoint there is nothing to take
    // unchanged chunks from: read every disk whole (a snapshot is always a
    // full index; dedup still skips uploading what the repository has).
    let pull = PullRequest {
        operation: request.operation.clone(),
        name: request.name.clone(),
        disks: request.disks.clone(),
        incremental: base
            .as_ref()
            .and(request.incremental.as_ref())
            .map(|c| c.name.clone()),
        new_checkpoint: request.new_checkpoint.as_ref().map(|c| c.name.clone()),
        socket: None,
        fallback_to_full: request.fallback_to_full,
        quiesce: request.quiesce.clone(),
        tcp: None,
    };
    let export = start_pull_export(client, vm, policy, &pull).await?;
    let result = ingest(vm, repo, request, base, &export, progress).await;
    // The export goes in every case; the new checkpoint only with a failure.
    let teardown =
        stop_pull_export(client, &request.operation, policy, vm, None, &request.name).await;
    match result {
        Ok(outcome) => {
            teardown?;
            info!(vm = %vm, snapshot = %outcome.manifest.id, base = ?outcome.base, bytes_read = outcome.progress.bytes_read, "repository backup committed");
            Ok(outcome)
        }
        Err(e) => {
            if let Some(cp) = &request.new_checkpoint {
                for d in &export.disks {
                    if let Ok(inv) = crate::inventory::read_inventory(client, vm).await
                        && let Some(disk) = inv.disk(&d.disk)
                    {
                        let _ = client.remove_bitmap(&disk.node_name, &cp.name).await;
                    }
                }
            }
            Err(e)
        }
    }
}

async fn ingest(
    vm: &VmRef,
    repo: &Repository,
    request: &RepositoryBackupRequest,
    base: Option<SnapshotId>,
    export: &PullExport,
    progress: Option<ProgressFn>,
) -> Result<RepositoryBackupOutcome, BackupError> {
    let repo_err = |source| BackupError::Repository {
        vm: vm.to_string(),
        source,
    };
    let spec = SnapshotSpec {
        namespace: vm.namespace.clone(),
        vm: vm.name.clone(),
        vm_uid: None,
        backup_uid: request.backup_uid.clone(),
        checkpoint: request.new_checkpoint.clone(),
        base: base.clone(),
        time: None,
    };
    // Keep the last counters the writer reports: its uploads finish inside
    // `commit`, after which the writer is gone.
    let (last, last_cell) = progress_cell();
    let report: ProgressFn = Arc::new(move |p: &IngestProgress| {
        last(p);
        if let Some(f) = &progress {
            f(p);
        }
    });
    let options = IngestOptions {
        progress: Some(report),
        ..IngestOptions::default()
    };
    let mut writer = repo.begin_snapshot(spec, options).await.map_err(repo_err)?;
    let mut fell_back = Vec::new();
    for d in &export.disks {
        let mut options = ConnectOptions::new(d.export_name.clone());
        if let Some(ctx) = &d.bitmap_context {
            options = options.meta_context(ctx.clone());
        }
        let nbd_err = |source: cairn_nbd::ClientError| BackupError::Export {
            vm: vm.to_string(),
            disk: d.disk.clone(),
            message: source.to_string(),
        };
        let nbd = Client::connect_unix(&export.socket, &options)
            .await
            .map_err(nbd_err)?;
        let dirty: Option<Vec<Extent>> = match &d.bitmap_context {
            Some(ctx) => Some(
                nbd.dirty_extents(ctx)
                    .await
                    .map_err(nbd_err)?
                    .into_iter()
                    .map(|e| Extent {
                        offset: e.offset,
                        length: e.length,
                    })
                    .collect(),
            ),
            None => None,
        };
        if d.fell_back_to_full {
            fell_back.push(d.disk.clone());
        }
        let size = nbd.size();
        let source = NbdDisk(nbd.clone());
        writer
            .add_disk(&d.disk, size, &source, dirty.as_deref())
            .await
            .map_err(repo_err)?;
        let _ = nbd.disconnect().await;
    }
    let before_commit = writer.progress();
    let manifest = writer.commit().await.map_err(repo_err)?;
    let mut progress = last_cell.lock().map(|p| *p).unwrap_or(before_commit);
    progress.bytes_read = progress.bytes_read.max(before_commit.bytes_read);
    Ok(RepositoryBackupOutcome {
        manifest,
        base,
        progress,
        fell_back,
        quiesce: export.quiesce.clone(),
    })
}

/// Progress callbacks share one counter cell the status reporter reads.
pub fn progress_cell() -> (ProgressFn, Arc<std::sync::Mutex<IngestProgress>>) {
    let cell = Arc::new(std::sync::Mutex::new(IngestProgress::default()));
    let writer = cell.clone();
    let f: ProgressFn = Arc::new(move |p: &IngestProgress| {
        if let Ok(mut c) = writer.lock() {
            *c = *p;
        }
    });
    (f, cell)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(id: &str, ns: &str, vm: &str, cp: Option<(&str, &str)>, secs: i64) -> Manifest {
        Manifest {
            version: 1,
            id: id.into(),
            namespace: ns.into(),
            vm: vm.into(),
            vm_uid: None,
            backup_uid: format!("b-{id}"),
            checkpoint: cp.map(|(n, u)| CheckpointRef {
                name: n.into(),
                uid: u.into(),
            }),
            base: None,
            time: chrono::DateTime::from_timestamp(secs, 0).unwrap(),
            chunk_size: 1 << 20,
            disks: vec![],
        }
    }

    #[test]
    fn the_base_matches_namespace_vm_checkpoint_name_and_uid() {
        let cp = CheckpointRef {
            name: "cp1".into(),
            uid: "u1".into(),
        };
        let all = vec![
            manifest("a", "ns", "vm1", Some(("cp1", "u1")), 10),
            manifest("b", "ns", "vm1", Some(("cp1", "u1")), 20),
            // The same checkpoint name re-created later: another UID.
            manifest("c", "ns", "vm1", Some(("cp1", "u2")), 30),
            // Another VM, another namespace.
            manifest("d", "ns", "vm2", Some(("cp1", "u1")), 40),
            manifest("e", "other", "vm1", Some(("cp1", "u1")), 50),
        ];
        assert_eq!(
            find_base(&all, "ns", "vm1", &cp).map(|m| m.id.as_str()),
            Some("b")
        );
        let reused = CheckpointRef {
            name: "cp1".into(),
            uid: "u3".into(),
        };
        assert!(find_base(&all, "ns", "vm1", &reused).is_none());
    }
}
