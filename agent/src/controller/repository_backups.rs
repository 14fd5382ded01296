//! The Kubernetes side of backups into a BackupRepository (`target.repository`):
//! open the repository, run [`run_repository_backup`] in a task that reports
//! progress, and write the snapshot's id and costs into status.
//!
//! Phases: Pending → Running (status written before QEMU is touched) →
//! Succeeded | Failed. An upload cannot be resumed by another process: a
//! backup found Running with no task of this agent (the agent restarted)
//! has its export torn down and fails `AgentRestarted`; nothing partial is
//! visible in the repository (the manifest is written last) and GC removes
//! the orphaned chunks later.

use std::sync::Arc;
use std::time::Duration;

use cairn_api::{
    BackupDiskStatus, BackupPhase, BackupProgress, CHECKPOINT_CREATED_CONDITION,
    RepositorySnapshotStatus, VirtualMachineBackup, VirtualMachineBackupStatus,
    VirtualMachineCheckpoint,
};
use cairn_repo::CheckpointRef;
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use tracing::{info, warn};

use super::status::{agent_conditions, apply_status, backup_reason, cond, error_chain, now};
use super::{Context, ControllerError};
use crate::backup::repository::{RepositoryBackupRequest, progress_cell, run_repository_backup};
use crate::backup::stop_pull_export;
use crate::identity::OperationId;
use crate::inventory::VmRef;
use crate::qmp::QmpClient;

/// What [`start`] needs besides the object.
pub struct Start<'a> {
    /// The backup.
    pub backup: &'a VirtualMachineBackup,
    /// Its status so far.
    pub status: VirtualMachineBackupStatus,
    /// The VM's session.
    pub vm: VmRef,
    /// Its QMP client.
    pub client: QmpClient,
    /// The backup's UID.
    pub uid: &'a str,
    /// Base checkpoint's bitmap name, when incremental.
    pub incremental: Option<String>,
    /// Repository name.
    pub repository: String,
}

/// Starts (or, after an agent restart, fails and cleans up) a repository backup.
pub async fn start(
    ctx: &Arc<Context>,
    api: &Api<VirtualMachineBackup>,
    s: Start<'_>,
) -> Result<Action, ControllerError> {
    let b = s.backup;
    let name = b.name_any();
    let ns = b.namespace().unwrap_or_default();
    let generation = b.metadata.generation;
    let mut status = s.status;
    let operation = OperationId::new(s.uid);
    if status.phase == Some(BackupPhase::Running) {
        // Started by an earlier agent process whose upload died with it.
        let _ = stop_pull_export(&s.client, &operation, &ctx.pull, &s.vm, None, &name).await;
        remove_new_checkpoint(&s.client, &s.vm, status.checkpoint.as_deref()).await;
        return super::backups::fail(
            api,
            &name,
            status,
            generation,
            "AgentRestarted",
            "the agent restarted while the backup was uploading; no snapshot was written (the repository collects the orphaned chunks); apply the backup again".into(),
        )
        .await;
    }
    let repo = match ctx.repositories.open(&ctx.client, &s.repository).await {
        Ok(r) => r,
        Err(e) => {
            return super::backups::fail(
                api,
                &name,
                status,
                generation,
                e.reason(),
                error_chain(&e),
            )
            .await;
        }
    };
    let cps: Api<VirtualMachineCheckpoint> = Api::namespaced(ctx.client.clone(), &ns);
    let uid_of = |cp: Option<String>| {
        let cps = cps.clone();
        async move {
            match cp {
                Some(n) => Ok::<_, kube::Error>(
                    cps.get_opt(&n)
                        .await?
                        .and_then(|c| c.metadata.uid)
                        .map(|uid| CheckpointRef { name: n, uid }),
                ),
                None => Ok(None),
            }
        }
    };
    let incremental = match (&b.spec.incremental, &s.incremental) {
        // The checkpoint object's UID, with its bitmap's name.
        (Some(cp), Some(bitmap)) => uid_of(Some(cp.clone())).await?.map(|r| CheckpointRef {
            name: bitmap.clone(),
            uid: r.uid,
        }),
        _ => None,
    };
    let new_checkpoint = uid_of(b.spec.checkpoint.as_ref().map(|c| c.name.clone())).await?;
    let request = RepositoryBackupRequest {
        operation,
        name: name.clone(),
        backup_uid: s.uid.to_string(),
        disks: super::backups::selected_disks(b),
        incremental,
        new_checkpoint,
        fallback_to_full: b.spec.fallback_to_full,
        quiesce: b
            .spec
            .quiesce
            .then(|| super::quiesce::guest_agent(ctx, &s.vm)),
    };
    status.phase = Some(BackupPhase::Running);
    status.node_name = Some(ctx.config.node_name.clone());
    status.checkpoint = b.spec.checkpoint.as_ref().map(|c| c.name.clone());
    status.start_time.get_or_insert_with(now);
    status.observed_generation = generation;
    status.repository = Some(RepositorySnapshotStatus {
        name: s.repository.clone(),
        ..Default::default()
    });
    let mut updates = vec![cond(
        "Ready",
        false,
        "Running",
        format!("uploading into BackupRepository {}", s.repository),
    )];
    if b.spec.quiesce {
        updates.push(super::quiesce::freezing());
    }
    status.conditions = agent_conditions(&status.conditions, &updates, generation);
    apply_status(api, &name, &status).await?;

    let (progress, cell) = progress_cell();
    let api = api.clone();
    let ctx2 = ctx.clone();
    let (vm, client, repository) = (s.vm, s.client, s.repository);
    let incremental_cp = b.spec.incremental.clone();
    let quiesce = b.spec.quiesce;
    let uid = s.uid.to_string();
    let task = tokio::spawn(async move {
        let run = run_repository_backup(&client, &vm, &ctx2.pull, &repo, &request, Some(progress));
        let report = report_progress(&api, &name, status.clone(), &cell);
        let result = tokio::select! {
            r = run => r,
            () = report => unreachable!("progress reporting never ends"),
        };
        // A stopped VM's images close before the result is reported.
        ctx2.release_offline(&vm.namespace, &vm.name, &uid).await;
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(e) => {
                let reason = backup_reason(&e);
                status.conditions = agent_conditions(
                    &status.conditions,
                    &super::quiesce::after_failure(
                        quiesce,
                        super::quiesce::backup_quiesce_error(&e),
                    ),
                    generation,
                );
                if let Err(e) =
                    super::backups::fail(&api, &name, status, generation, reason, error_chain(&e))
                        .await
                {
                    warn!(backup = %name, error = %error_chain(&e), "cannot report the failure");
                }
                return;
            }
        };
        let m = &outcome.manifest;
        info!(backup = %name, snapshot = %m.id, "repository backup succeeded");
        status.phase = Some(BackupPhase::Succeeded);
        status.completion_time = Some(now());
        status.progress = Some(BackupProgress {
            bytes_done: outcome.progress.bytes_read as i64,
            bytes_total: outcome.progress.bytes_read as i64,
        });
        status.disks = m
            .disks
            .iter()
            .map(|d| {
                let fell_back = outcome.fell_back.contains(&d.name);
                BackupDiskStatus {
                    name: d.name.clone(),
                    incremental_from: incremental_cp
                        .clone()
                        .filter(|_| outcome.base.is_some() && !fell_back),
                    fell_back_to_full: fell_back,
                    ..Default::default()
                }
            })
            .collect();
        status.repository = Some(RepositorySnapshotStatus {
            name: repository.clone(),
            snapshot: Some(m.id.clone()),
            base_snapshot: outcome.base.clone(),
            bytes_read: Some(outcome.progress.bytes_read as i64),
            bytes_uploaded: Some(outcome.progress.bytes_uploaded as i64),
            chunks_new: Some(outcome.progress.chunks_new as i64),
            chunks_reused: Some(
                (outcome.progress.chunks_reused + outcome.progress.chunks_zero) as i64,
            ),
        });
        let mut updates = vec![cond(
            "Ready",
            true,
            "Completed",
            format!(
                "snapshot {} written to BackupRepository {repository}: {} bytes read, {} uploaded",
                m.id, outcome.progress.bytes_read, outcome.progress.bytes_uploaded
            ),
        )];
        if let Some(cp) = &status.checkpoint {
            updates.push(cond(
                CHECKPOINT_CREATED_CONDITION,
                true,
                "InBackupTransaction",
                format!(
                    "the transaction that started this backup created checkpoint {cp}'s bitmaps"
                ),
            ));
        }
        let (quiesced, report) = super::quiesce::outcome(quiesce, outcome.quiesce.as_ref());
        updates.extend(quiesced);
        status.quiesce = report;
        status.conditions = agent_conditions(&status.conditions, &updates, generation);
        if let Err(e) = apply_status(&api, &name, &status).await {
            warn!(backup = %name, error = %error_chain(&e), "cannot report the result");
        }
    });
    ctx.jobs
        .lock()
        .expect("jobs lock")
        .insert(s.uid.to_string(), task);
    Ok(Action::requeue(Duration::from_secs(10)))
}

/// Writes bytes read so far into status every second while they change.
async fn report_progress(
    api: &Api<VirtualMachineBackup>,
    name: &str,
    mut status: VirtualMachineBackupStatus,
    cell: &std::sync::Mutex<cairn_repo::IngestProgress>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let p = cell.lock().map(|p| *p).unwrap_or_default();
        let progress = Some(BackupProgress {
            bytes_done: p.bytes_read as i64,
            bytes_total: 0,
        });
        if progress != status.progress && p.bytes_read > 0 {
            status.progress = progress;
            let _ = apply_status(api, name, &status).await;
        }
    }
}

/// Cancels a running repository backup on deletion: stops the upload (no
/// snapshot becomes visible), tears the export down and removes the
/// checkpoint its transaction created.
pub async fn cancel(
    ctx: &Context,
    b: &VirtualMachineBackup,
    session: Option<&(VmRef, QmpClient)>,
    uid: &str,
) {
    if let Some(task) = ctx.jobs.lock().expect("jobs lock").remove(uid) {
        task.abort();
    }
    if let Some((vm, client)) = session {
        let _ = stop_pull_export(
            client,
            &OperationId::new(uid),
            &ctx.pull,
            vm,
            None,
            &b.name_any(),
        )
        .await;
        let created = b.status.as_ref().is_some_and(|s| {
            cairn_api::conditions::is_true(&s.conditions, CHECKPOINT_CREATED_CONDITION)
        });
        if !created {
            remove_new_checkpoint(
                client,
                vm,
                b.status.as_ref().and_then(|s| s.checkpoint.as_deref()),
            )
            .await;
        }
    }
}

/// Removes the bitmaps of the checkpoint a failed repository backup's
/// transaction created.
async fn remove_new_checkpoint(client: &QmpClient, vm: &VmRef, checkpoint: Option<&str>) {
    let Some(cp) = checkpoint else { return };
    if let Ok(inv) = crate::inventory::read_inventory(client, vm).await {
        for d in &inv.disks {
            if d.bitmap(cp).is_some() {
                let _ = client.remove_bitmap(&d.node_name, cp).await;
            }
        }
    }
}
