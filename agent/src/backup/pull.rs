//! Pull backups: a point-in-time NBD export of each disk over a unix socket.
//!
//! Per disk, a fleecing scratch qcow2 (backed by the live format node) sits
//! in front of the disk; a `blockdev-backup sync: none` job copies old data
//! into it before the guest overwrites it, so reading the scratch node shows
//! the disk as it was when the export started. For an incremental, the base
//! checkpoint's bitmap is merged into a disabled temporary bitmap in the same
//! transaction, and exported as the `qemu:dirty-bitmap:<temp>` meta context.
//! [`stop_pull_export`] removes everything again.

use std::path::PathBuf;

use tracing::info;

use super::target::{TargetPolicy, available_bytes};
use super::{BackupError, cleanup_leftovers, qmp_err};
use crate::checkpoint::plan_checkpoint;
use crate::identity::{NodeRole, OperationId};
use crate::image;
use crate::inventory::{Disk, VmRef, read_inventory, select_disks, select_incremental_disks};
use crate::qmp::{
    BackingChoice, BackupSpec, BackupSync, BitmapSpec, QmpClient, QmpError, TransactionStep,
};

/// A pull export to start.
#[derive(Debug, Clone)]
pub struct PullRequest {
    /// Names every QEMU-side object (use the resource UID).
    pub operation: OperationId,
    /// Disk names; `None` = every writable qcow2 disk.
    pub disks: Option<Vec<String>>,
    /// Base checkpoint whose changes are exposed as a dirty-bitmap context.
    pub incremental: Option<String>,
    /// Checkpoint to create at the export point, in the same transaction.
    pub new_checkpoint: Option<String>,
    /// Unix socket QEMU's NBD server listens on.
    pub socket: PathBuf,
    /// Directory for fleecing scratch images (under an allowed root).
    pub scratch_dir: PathBuf,
    /// Export a disk without a dirty-bitmap context when its base is unusable.
    pub fallback_to_full: bool,
}

/// One exported disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedDisk {
    /// Disk name.
    pub disk: String,
    /// NBD export name.
    pub export_name: String,
    /// `nbd+unix:///<export>?socket=<path>`.
    pub url: String,
    /// Meta context with the blocks changed since the base, e.g. `qemu:dirty-bitmap:<name>`.
    pub bitmap_context: Option<String>,
    /// The base checkpoint, if incremental.
    pub incremental_from: Option<String>,
    /// An incremental was asked for but the base was unusable.
    pub fell_back_to_full: bool,
}

/// A running pull export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullExport {
    /// NBD socket.
    pub socket: PathBuf,
    /// Exported disks.
    pub disks: Vec<ExportedDisk>,
}

struct PullDisk<'a> {
    disk: &'a Disk,
    temp_bitmap: Option<String>,
    fell_back: bool,
    scratch_file: PathBuf,
    scratch_node: String,
}

/// Starts a point-in-time NBD export of the selected disks.
pub async fn start_pull_export(
    client: &QmpClient,
    vm: &VmRef,
    policy: &TargetPolicy,
    request: &PullRequest,
) -> Result<PullExport, BackupError> {
    let vm_name = vm.to_string();
    let op = &request.operation;
    let scratch_dir = policy.resolve_dir(&request.scratch_dir)?;
    let inv = read_inventory(client, vm).await?;
    let selected = match &request.incremental {
        Some(base) => {
            select_incremental_disks(&vm_name, &inv.disks, request.disks.as_deref(), base)?
        }
        None => select_disks(&vm_name, &inv.disks, request.disks.as_deref())?,
    };
    let mut disks = Vec::new();
    for d in selected {
        let mut temp_bitmap = None;
        let mut fell_back = false;
        if let Some(cp) = &request.incremental {
            let reason = crate::checkpoint::bitmap_problem(d.bitmap(cp)).map(|p| p.describe());
            match reason {
                None => temp_bitmap = Some(op.temp_bitmap(&d.name)),
                Some(_) if request.fallback_to_full => fell_back = true,
                Some(reason) => {
                    return Err(BackupError::BaseUnusable {
                        vm: vm_name,
                        disk: d.name.clone(),
                        checkpoint: cp.clone(),
                        reason: reason.to_string(),
                    });
                }
            }
        }
        disks.push(PullDisk {
            disk: d,
            temp_bitmap,
            fell_back,
            scratch_file: scratch_dir.join(format!("{}fleece-{}.qcow2", op.prefix(), d.name)),
            scratch_node: op.node_name(&d.name, NodeRole::Scratch),
        });
    }
    let mut steps = Vec::new();
    if let Some(cp) = &request.new_checkpoint {
        let sel: Vec<&Disk> = disks.iter().map(|p| p.disk).collect();
        steps.extend(plan_checkpoint(&vm_name, &sel, cp)?);
    }
    // Scratch space: in the worst case the guest rewrites the whole disk during the export.
    let needed: u64 = disks
        .iter()
        .map(|p| p.disk.virtual_size / 16 + (1 << 20))
        .sum();
    let available = available_bytes(&scratch_dir)?;
    if needed > available {
        return Err(BackupError::InsufficientSpace {
            vm: vm_name,
            path: scratch_dir,
            needed,
            available,
        });
    }

    cleanup_leftovers(client, op, None)
        .await
        .map_err(qmp_err(&vm_name, "cleanup"))?;
    let result = setup(client, &vm_name, request, &disks, steps).await;
    match result {
        Ok(export) => {
            info!(vm = %vm, socket = %request.socket.display(), disks = export.disks.len(), "pull export started");
            Ok(export)
        }
        Err((e, checkpoint_created)) => {
            let _ = cleanup_leftovers(client, op, None).await;
            if let (true, Some(cp)) = (checkpoint_created, &request.new_checkpoint) {
                for p in &disks {
                    let _ = client.remove_bitmap(&p.disk.node_name, cp).await;
                }
            }
            for p in &disks {
                let _ = std::fs::remove_file(&p.scratch_file);
            }
            Err(e)
        }
    }
}

async fn setup(
    client: &QmpClient,
    vm: &str,
    request: &PullRequest,
    disks: &[PullDisk<'_>],
    mut steps: Vec<TransactionStep>,
) -> Result<PullExport, (BackupError, bool)> {
    let op = &request.operation;
    let fail = |step: &str| {
        let f = qmp_err(vm, step);
        move |e: QmpError| (f(e), false)
    };
    for p in disks {
        image::create_qcow2(&p.scratch_file, p.disk.virtual_size, None)
            .await
            .map_err(|source| {
                (
                    BackupError::Image {
                        step: "create scratch image".into(),
                        source,
                    },
                    false,
                )
            })?;
        client
            .add_qcow2_node(
                &p.scratch_node,
                &p.scratch_file.to_string_lossy(),
                false,
                false,
                &BackingChoice::Node(p.disk.node_name.clone()),
            )
            .await
            .map_err(fail("blockdev-add scratch"))?;
        if let (Some(tmp), Some(base)) = (&p.temp_bitmap, &request.incremental) {
            steps.push(TransactionStep::AddBitmap(BitmapSpec {
                node: p.disk.node_name.clone(),
                name: tmp.clone(),
                persistent: false,
                disabled: true,
            }));
            steps.push(TransactionStep::MergeBitmaps {
                node: p.disk.node_name.clone(),
                target: tmp.clone(),
                sources: vec![base.clone()],
            });
        }
        steps.push(TransactionStep::Backup(BackupSpec {
            job_id: op.job_id(&p.disk.name),
            device: p.disk.node_name.clone(),
            target: p.scratch_node.clone(),
            sync: BackupSync::None,
            speed: None,
        }));
    }
    client
        .transaction(&steps)
        .await
        .map_err(fail("transaction"))?;
    let created = request.new_checkpoint.is_some();

    let socket = request.socket.to_string_lossy().to_string();
    if let Err(e) = client.nbd_server_start_unix(&socket).await {
        let ours_only = client
            .query_block_exports()
            .await
            .map(|ex| ex.iter().all(|x| x.id.starts_with("cairn-")))
            .unwrap_or(false);
        match e {
            QmpError::Command { ref desc, .. } if desc.contains("already running") && ours_only => {
                // Another Cairn export on this VM already started the server on its socket.
                return Err((BackupError::NbdServerBusy { vm: vm.to_string() }, created));
            }
            QmpError::Command { ref desc, .. } if desc.contains("already running") => {
                return Err((BackupError::NbdServerBusy { vm: vm.to_string() }, created));
            }
            e => return Err((qmp_err(vm, "nbd-server-start")(e), created)),
        }
    }
    let mut exported = Vec::new();
    for p in disks {
        let bitmaps: Vec<(String, String)> = p
            .temp_bitmap
            .iter()
            .map(|b| (p.disk.node_name.clone(), b.clone()))
            .collect();
        client
            .nbd_export_add(
                &op.export_id(&p.disk.name),
                &p.scratch_node,
                &p.disk.name,
                &bitmaps,
            )
            .await
            .map_err(|e| (qmp_err(vm, "block-export-add")(e), created))?;
        exported.push(ExportedDisk {
            disk: p.disk.name.clone(),
            export_name: p.disk.name.clone(),
            url: format!("nbd+unix:///{}?socket={}", p.disk.name, socket),
            bitmap_context: p
                .temp_bitmap
                .as_ref()
                .map(|b| format!("qemu:dirty-bitmap:{b}")),
            incremental_from: p.temp_bitmap.as_ref().and(request.incremental.clone()),
            fell_back_to_full: p.fell_back,
        });
    }
    Ok(PullExport {
        socket: request.socket.clone(),
        disks: exported,
    })
}

/// Tears a pull export down: exports, NBD server, fleecing jobs, scratch
/// nodes, temporary bitmaps and scratch files. Idempotent.
pub async fn stop_pull_export(
    client: &QmpClient,
    operation: &OperationId,
    scratch_dir: &std::path::Path,
) -> Result<(), BackupError> {
    cleanup_leftovers(client, operation, None)
        .await
        .map_err(qmp_err(&client.socket().display().to_string(), "teardown"))?;
    if let Ok(rd) = std::fs::read_dir(scratch_dir) {
        for e in rd.flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with(&operation.prefix())
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
        // The per-backup directory goes too, once nothing else is in it.
        let _ = std::fs::remove_dir(scratch_dir);
    }
    Ok(())
}
