//! Reconciles the VirtualMachineBackups routed to this node.
//!
//! Pipeline: resolve (VM session, incremental base bitmap, target) → start or
//! re-attach (push job, pull export) → watch (progress, completion, export
//! timeout) → report status. Deleting a running backup cancels its jobs or
//! tears down its export, then reports `CleanedUp=True` for the operator.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cairn_api::{
    BACKUP_FINALIZER, BackupDiskStatus, BackupExport, BackupMode, BackupPhase, BackupProgress,
    CREATED_BY_BACKUP_LABEL, VirtualMachineBackup, VirtualMachineBackupStatus,
    VirtualMachineCheckpoint,
};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use tracing::{info, warn};

use super::status::{
    agent_conditions, apply_status, backup_reason, cache_is_current, cond, error_chain, now,
};
use super::{Context, ControllerError, quiesce};
use crate::backup::{
    BackupError, FileScope, Manifest, PskCredentials, PullRequest, PushRequest, TcpExportRequest,
    check_pull_export, check_tcp_pull_export, cleanup_leftovers, remove_local_files,
    start_pull_export, start_push_backup, stop_pull_export, verify_backup,
};
use crate::identity::OperationId;
use crate::inventory::VmRef;
use crate::qmp::QmpClient;
use crate::tenant_dir::TenantDir;

/// Condition type of the post-job verification of a push backup.
const VERIFIED: &str = cairn_api::condition_types::VERIFIED;

/// Runs the controller until the process stops.
pub async fn run(ctx: Arc<Context>) {
    super::run_routed::<VirtualMachineBackup, _, _>(ctx, "backup", reconcile).await;
}

fn uid(b: &VirtualMachineBackup) -> Result<String, ControllerError> {
    b.metadata
        .uid
        .clone()
        .ok_or(ControllerError::MissingField("metadata.uid"))
}

/// The opened target directory of a push backup, when it is allowed.
fn push_dir(b: &VirtualMachineBackup, ctx: &Context) -> Option<TenantDir> {
    if b.spec.mode != BackupMode::Push {
        return None;
    }
    let dir = b.spec.target.as_ref()?.directory.as_ref()?;
    let ns = b.namespace()?;
    ctx.targets.resolve_dir(&ns, Path::new(&dir.path)).ok()
}

/// The unix socket path the tenant asked for, if any.
fn requested_socket(b: &VirtualMachineBackup) -> Option<PathBuf> {
    b.spec
        .target
        .as_ref()
        .and_then(|t| t.nbd.as_ref())
        .and_then(|n| n.unix_socket.as_ref())
        .and_then(|u| u.path.clone())
        .map(PathBuf::from)
}

/// `Some(port)` when the backup asks for an export over TCP with TLS.
fn tcp_target(b: &VirtualMachineBackup) -> Option<Option<i32>> {
    if b.spec.mode != BackupMode::Pull {
        return None;
    }
    b.spec
        .target
        .as_ref()
        .and_then(|t| t.nbd.as_ref())
        .and_then(|n| n.tcp.as_ref())
        .map(|t| t.port)
}

/// The port of a served TCP export, from the URL this agent wrote into status.
fn served_port(status: &VirtualMachineBackupStatus) -> Option<u16> {
    let url = &status.export.as_ref()?.url;
    url.strip_prefix("nbds://")?
        .rsplit(':')
        .next()?
        .parse()
        .ok()
}

/// The TLS-PSK credentials the operator issued for backup `uid`, from its
/// copy in Cairn's own namespace (the agent never reads a tenant's Secrets).
/// `None` when that Secret does not exist or lacks a field.
async fn read_psk(ctx: &Context, uid: &str) -> Result<Option<PskCredentials>, ControllerError> {
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(ctx.client.clone(), &ctx.config.cairn_namespace);
    let Some(secret) = secrets
        .get_opt(&cairn_api::nbd_psk_agent_secret_name(uid))
        .await?
    else {
        return Ok(None);
    };
    let field = |k: &str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(k))
            .and_then(|v| String::from_utf8(v.0.clone()).ok())
    };
    Ok(
        match (
            field(cairn_api::NBD_TLS_USERNAME_KEY),
            field(cairn_api::NBD_TLS_KEY_KEY),
        ) {
            (Some(username), Some(key_hex)) => Some(PskCredentials { username, key_hex }),
            _ => None,
        },
    )
}

/// The VM as a data-path reference, for file cleanup when its QEMU is gone.
fn vm_ref(b: &VirtualMachineBackup) -> VmRef {
    VmRef {
        namespace: b.namespace().unwrap_or_default(),
        name: b.spec.virtual_machine.clone(),
        socket: PathBuf::new(),
    }
}

/// UID of the checkpoint `name` of this namespace when `backup` created it
/// (the operator creates it before routing the backup here).
async fn new_checkpoint_uid(b: &VirtualMachineBackup, ctx: &Context, ns: &str) -> Option<String> {
    let name = &b.spec.checkpoint.as_ref()?.name;
    let cps: Api<VirtualMachineCheckpoint> = Api::namespaced(ctx.client.clone(), ns);
    let cp = cps.get_opt(name).await.ok().flatten()?;
    (cp.spec.virtual_machine == b.spec.virtual_machine
        && cp.labels().get(CREATED_BY_BACKUP_LABEL) == Some(&b.name_any()))
    .then(|| cp.metadata.uid.clone())
    .flatten()
}

pub(super) fn selected_disks(b: &VirtualMachineBackup) -> Option<Vec<String>> {
    b.spec.disks.as_ref().map(|ds| {
        ds.iter()
            .filter(|d| d.selected())
            .map(|d| d.name.clone())
            .collect()
    })
}

/// Records that the transaction which starts the backup also created its new
/// checkpoint's bitmaps (the checkpoint adopts them only on this word, see
/// `checkpoints::backup_vouch`). Returns whether the status changed.
fn mark_checkpoint_created(
    status: &mut VirtualMachineBackupStatus,
    generation: Option<i64>,
) -> bool {
    let Some(cp) = status.checkpoint.clone() else {
        return false;
    };
    if cairn_api::conditions::is_true(&status.conditions, cairn_api::CHECKPOINT_CREATED_CONDITION) {
        return false;
    }
    status.conditions = agent_conditions(
        &status.conditions,
        &[cond(
            cairn_api::CHECKPOINT_CREATED_CONDITION,
            true,
            "InBackupTransaction",
            format!("the transaction that started this backup created checkpoint {cp}'s bitmaps"),
        )],
        generation,
    );
    true
}

async fn reconcile(
    b: Arc<VirtualMachineBackup>,
    ctx: Arc<Context>,
) -> Result<Action, ControllerError> {
    let ns = b
        .namespace()
        .ok_or(ControllerError::MissingField("metadata.namespace"))?;
    let uid = uid(&b)?;
    let api: Api<VirtualMachineBackup> = Api::namespaced(ctx.client.clone(), &ns);
    let status = b.status.clone().unwrap_or_default();
    if !super::routed_here(
        &ctx.config.node_name,
        status.node_name.as_deref(),
        &status.conditions,
    ) {
        // Labelled for this node, but not by the operator (yet): not ours to act on.
        return Ok(Action::await_change());
    }
    let phase = status.phase.unwrap_or_default();
    let session = ctx.session(&ns, &b.spec.virtual_machine).await;
    if !task_alive(&ctx, &uid)
        && let Some(action) = quiesce::thaw_first(
            &ctx,
            &api,
            &*b,
            &status.conditions,
            session.as_ref().map(|s| &s.0),
            async |conditions| {
                let mut status = status.clone();
                status.conditions = conditions;
                apply_status(&api, &b.name_any(), &status).await
            },
        )
        .await?
    {
        return Ok(action);
    }

    if b.metadata.deletion_timestamp.is_some() {
        if !b.finalizers().iter().any(|f| f == BACKUP_FINALIZER)
            || cairn_api::conditions::is_true(&status.conditions, "CleanedUp")
        {
            return Ok(Action::await_change());
        }
        return delete(&b, &ctx, &api, status, session, &uid).await;
    }

    if phase.is_finished() {
        // A pull export of a stopped VM ended, or a start failed: close its images.
        ctx.release_offline(&ns, &b.spec.virtual_machine, &uid)
            .await;
    }
    match phase {
        BackupPhase::Pending => start(&b, &ctx, &api, status, session, &uid).await,
        BackupPhase::Running => {
            if task_alive(&ctx, &uid) {
                return Ok(Action::requeue(Duration::from_secs(10)));
            }
            // Agent restarted while a job ran: re-attach (or collect the result).
            start(&b, &ctx, &api, status, session, &uid).await
        }
        BackupPhase::Exporting => watch_export(&b, &ctx, &api, status, session, &uid).await,
        BackupPhase::Succeeded
            if b.spec.mode == BackupMode::Push
                && cairn_api::conditions::find(&status.conditions, VERIFIED).is_none()
                && !task_alive(&ctx, &uid) =>
        {
            // Succeeded but not verified: the agent restarted in between.
            resume_verification(&b, &ctx, &api, status, &uid);
            Ok(Action::await_change())
        }
        BackupPhase::Succeeded | BackupPhase::Failed | BackupPhase::Cancelled => {
            Ok(Action::await_change())
        }
    }
}

/// Whether this process runs a task (backup or restore) for object `uid`.
pub(super) fn task_alive(ctx: &Context, uid: &str) -> bool {
    ctx.jobs
        .lock()
        .expect("jobs lock")
        .get(uid)
        .is_some_and(|h| !h.is_finished())
}

/// Resolves the incremental base to its bitmap name, checking it belongs to
/// the same VM, and whether a backup created it. A checkpoint made on its own
/// (created, created offline or redefined) has no point-in-time image written
/// by Cairn, so a push incremental from it stands alone, as in libvirt.
async fn base_bitmap(
    b: &VirtualMachineBackup,
    ctx: &Context,
    ns: &str,
) -> Result<Option<(String, bool, Option<String>)>, (String, String)> {
    let Some(base) = b.spec.incremental.as_deref() else {
        return Ok(None);
    };
    let cps: Api<VirtualMachineCheckpoint> = Api::namespaced(ctx.client.clone(), ns);
    match cps.get_opt(base).await {
        Ok(Some(cp)) if cp.spec.virtual_machine != b.spec.virtual_machine => Err((
            "IncrementalBaseOfOtherVM".into(),
            format!(
                "checkpoint {base} belongs to VM {}, not {}",
                cp.spec.virtual_machine, b.spec.virtual_machine
            ),
        )),
        Ok(Some(cp)) => super::checkpoints::plan_request(&cp)
            .map(|r| {
                Some((
                    r.name,
                    !cp.labels().contains_key(CREATED_BY_BACKUP_LABEL),
                    cp.metadata.uid.clone(),
                ))
            })
            .map_err(|m| ("InvalidIncrementalBase".into(), m)),
        Ok(None) => Err((
            "UnknownIncrementalBase".into(),
            format!(
                "incremental base checkpoint {base} does not exist in namespace {ns}; create it or take a full backup"
            ),
        )),
        Err(e) => Err(("ApiError".into(), error_chain(&e))),
    }
}

async fn start(
    b: &VirtualMachineBackup,
    ctx: &Arc<Context>,
    api: &Api<VirtualMachineBackup>,
    mut status: VirtualMachineBackupStatus,
    session: Option<(VmRef, QmpClient)>,
    uid: &str,
) -> Result<Action, ControllerError> {
    let name = b.name_any();
    let ns = b.namespace().unwrap_or_default();
    let generation = b.metadata.generation;
    if !cache_is_current(api, b).await? {
        // A stale `Pending` or `Running` must not start or re-judge a job whose
        // outcome this agent already wrote: wait for the cache to catch up.
        return Ok(Action::requeue(Duration::from_millis(500)));
    }
    let vm = &b.spec.virtual_machine;
    let (vmref, client) = match session {
        Some(s) => s,
        None => match super::checkpoints::stopped_domain(ctx, &ns, vm).await? {
            // A stopped VM whose disks this node knows: back up its images.
            Some(_) if b.spec.quiesce => {
                let (reason, msg) = quiesce::stopped(vm);
                return fail(api, &name, status, generation, reason, msg).await;
            }
            Some(domain) => match ctx.open_offline(&ns, vm, &domain, uid).await {
                Ok(s) => {
                    info!(backup = %name, vm = %vm, "VM is stopped: backing up its images offline");
                    s
                }
                // The VM is starting: back it up live once discovery has it.
                Err(e) if e.is_locked() => {
                    info!(backup = %name, error = %error_chain(&e), "images locked; retrying");
                    return Ok(Action::requeue(Duration::from_secs(2)));
                }
                Err(e) => {
                    return fail(
                        api,
                        &name,
                        status,
                        generation,
                        "OfflineOpenFailed",
                        error_chain(&e),
                    )
                    .await;
                }
            },
            None => {
                return fail(
                    api,
                    &name,
                    status,
                    generation,
                    "VirtualMachineNotRunning",
                    format!(
                        "VM {vm} has no QMP socket on node {} and no recorded disks to back up offline",
                        ctx.config.node_name
                    ),
                )
                .await;
            }
        },
    };
    let (incremental, base_standalone, incremental_uid) = match base_bitmap(b, ctx, &ns).await {
        Ok(x) => (
            x.as_ref().map(|(n, _, _)| n.clone()),
            x.as_ref().is_some_and(|(_, r, _)| *r),
            x.and_then(|(_, _, u)| u),
        ),
        Err((reason, msg)) => return fail(api, &name, status, generation, &reason, msg).await,
    };
    let operation = OperationId::new(uid);
    let qga = b.spec.quiesce.then(|| quiesce::guest_agent(ctx, &vmref));
    let new_checkpoint = b.spec.checkpoint.as_ref().map(|c| c.name.clone());
    status.node_name = Some(ctx.config.node_name.clone());
    status.checkpoint = new_checkpoint.clone();
    status.observed_generation = generation;
    status.start_time.get_or_insert_with(now);

    if let Some(repository) = b
        .spec
        .target
        .as_ref()
        .and_then(|t| t.repository.as_ref())
        .map(|r| r.name.clone())
    {
        return super::repository_backups::start(
            ctx,
            api,
            super::repository_backups::Start {
                backup: b,
                status,
                vm: vmref,
                client,
                uid,
                incremental,
                repository,
            },
        )
        .await;
    }
    match b.spec.mode {
        BackupMode::Push => {
            let Some(dir) = b
                .spec
                .target
                .as_ref()
                .and_then(|t| t.directory.as_ref())
                .map(|d| PathBuf::from(&d.path))
            else {
                return fail(
                    api,
                    &name,
                    status,
                    generation,
                    "NoTarget",
                    "mode Push needs target.directory".into(),
                )
                .await;
            };
            let new_checkpoint_uid = new_checkpoint_uid(b, ctx, &ns).await;
            let request = PushRequest {
                operation,
                name: name.clone(),
                disks: selected_disks(b),
                incremental,
                incremental_uid,
                new_checkpoint,
                new_checkpoint_uid,
                target_dir: dir,
                fallback_to_full: b.spec.fallback_to_full,
                standalone_incremental: base_standalone,
                speed_limit: None,
                quiesce: qga.clone(),
            };
            if status.phase != Some(BackupPhase::Running) || qga.is_some() {
                status.phase = Some(BackupPhase::Running);
                let mut updates = vec![cond(
                    "Ready",
                    false,
                    "Running",
                    "the backup job is starting",
                )];
                match &qga {
                    Some(_) => updates.push(quiesce::freezing()),
                    // Known now: saves a status write after the start.
                    None => updates.extend(quiesce::outcome(false, None).0),
                }
                status.conditions = agent_conditions(&status.conditions, &updates, generation);
                apply_status(api, &name, &status).await?;
            }
            match start_push_backup(&client, &vmref, &ctx.targets, &request).await {
                Ok(running) => {
                    let mut changed = mark_checkpoint_created(&mut status, generation);
                    if b.spec.quiesce {
                        let (updates, quiesced) = quiesce::outcome(true, running.quiesce_report());
                        status.conditions =
                            agent_conditions(&status.conditions, &updates, generation);
                        status.quiesce = quiesced;
                        changed = true;
                    }
                    if changed {
                        apply_status(api, &name, &status).await?;
                    }
                    let job_ids: Vec<String> =
                        running.plan().iter().map(|p| p.job_id.clone()).collect();
                    let dir = running.target_path().to_path_buf();
                    let handle = match running.target_dir().try_clone() {
                        Ok(h) => h,
                        Err(e) => {
                            let e = BackupError::from(e);
                            return fail(
                                api,
                                &name,
                                status,
                                generation,
                                backup_reason(&e),
                                error_chain(&e),
                            )
                            .await;
                        }
                    };
                    info!(backup = %name, vm = %vmref, jobs = ?job_ids, "push backup running");
                    let api = api.clone();
                    let base_checkpoint = b.spec.incremental.clone();
                    let health = ctx.health.clone();
                    let (ctx2, ns2, vm2, uid2) =
                        (ctx.clone(), ns.clone(), vm.clone(), uid.to_string());
                    let task = tokio::spawn(async move {
                        let progress =
                            report_progress(&api, &name, status.clone(), &client, &job_ids);
                        let result = tokio::select! {
                            r = running.wait() => r,
                            () = progress => unreachable!("progress reporting never ends"),
                        };
                        // A stopped VM's images close before the result is
                        // reported, so the new checkpoint's bitmap is in them.
                        ctx2.release_offline(&ns2, &vm2, &uid2).await;
                        let (reason, manifest_file, finish) = match result {
                            Ok(mut outcome) => {
                                let file = outcome.manifest.own_file_name();
                                name_base_checkpoint(
                                    &mut outcome.manifest,
                                    base_checkpoint.as_deref(),
                                );
                                ("Completed", Some(file), Ok(outcome.manifest))
                            }
                            Err(e) => (backup_reason(&e), None, Err(e)),
                        };
                        let outcome = if finish.is_ok() { "ok" } else { "error" };
                        health
                            .backups_finished
                            .get_or_create(&super::health::OutcomeLabel {
                                controller: "backup",
                                outcome,
                            })
                            .inc();
                        let status = match finish_push(
                            &api, &name, status, generation, &dir, reason, finish,
                        )
                        .await
                        {
                            Ok(status) => status,
                            Err(e) => {
                                warn!(backup = %name, error = %error_chain(&e), "cannot report the backup result");
                                return;
                            }
                        };
                        // Off the critical path: the result is already reported.
                        if let Some(file) = manifest_file {
                            report_verification(&api, &name, status, generation, &handle, &file)
                                .await;
                        }
                    });
                    ctx.jobs
                        .lock()
                        .expect("jobs lock")
                        .insert(uid.to_string(), task);
                    Ok(Action::requeue(Duration::from_secs(10)))
                }
                Err(e) => {
                    ctx.release_offline(&ns, vm, uid).await;
                    let reason = backup_reason(&e);
                    status.conditions = agent_conditions(
                        &status.conditions,
                        &quiesce::after_failure(b.spec.quiesce, quiesce::backup_quiesce_error(&e)),
                        generation,
                    );
                    fail(
                        api,
                        &b.name_any(),
                        status,
                        generation,
                        reason,
                        error_chain(&e),
                    )
                    .await
                }
            }
        }
        BackupMode::Pull => {
            let tcp = match tcp_target(b) {
                None => None,
                Some(port) => match read_psk(ctx, uid).await? {
                    Some(psk) => Some(TcpExportRequest { port, psk }),
                    None => {
                        return fail(
                            api,
                            &name,
                            status,
                            generation,
                            "CredentialsMissing",
                            format!(
                                "the TLS credentials the operator issues for this backup are missing (Secret {} in Cairn's namespace); delete the backup and create it again",
                                cairn_api::nbd_psk_agent_secret_name(uid)
                            ),
                        )
                        .await;
                    }
                },
            };
            let request = PullRequest {
                operation,
                name: name.clone(),
                disks: selected_disks(b),
                incremental,
                new_checkpoint,
                socket: requested_socket(b),
                fallback_to_full: b.spec.fallback_to_full,
                quiesce: qga.clone(),
                tcp,
            };
            status.phase = Some(BackupPhase::Running);
            if qga.is_some() {
                status.conditions =
                    agent_conditions(&status.conditions, &[quiesce::freezing()], generation);
            }
            apply_status(api, &name, &status).await?;
            match start_pull_export(&client, &vmref, &ctx.pull, &request).await {
                Ok(export) => {
                    let expires = b.spec.export_timeout_seconds.map(|s| {
                        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                            Timestamp::now() + SignedDuration::from_secs(s),
                        )
                    });
                    status.phase = Some(BackupPhase::Exporting);
                    let (updates, quiesced) =
                        quiesce::outcome(b.spec.quiesce, export.quiesce.as_ref());
                    status.conditions = agent_conditions(&status.conditions, &updates, generation);
                    status.quiesce = quiesced;
                    mark_checkpoint_created(&mut status, generation);
                    status.export = Some(BackupExport {
                        url: export.url(),
                        tls_secret_name: export
                            .tcp
                            .is_some()
                            .then(|| cairn_api::nbd_tls_secret_name(&name)),
                        expires_at: expires,
                    });
                    status.disks = export
                        .disks
                        .iter()
                        .map(|d| BackupDiskStatus {
                            name: d.disk.clone(),
                            export_name: Some(d.export_name.clone()),
                            target: Some(d.url.clone()),
                            bitmap_context: d.bitmap_context.clone(),
                            // The data path speaks bitmaps; status names the checkpoint.
                            incremental_from: d
                                .incremental_from
                                .as_ref()
                                .and(b.spec.incremental.clone()),
                            fell_back_to_full: d.fell_back_to_full,
                            ..Default::default()
                        })
                        .collect();
                    status.conditions = agent_conditions(
                        &status.conditions,
                        &[cond(
                            "Ready",
                            true,
                            "Exporting",
                            format!(
                                "point-in-time export of {} disk(s) is served at {}",
                                export.disks.len(),
                                export.location()
                            ),
                        )],
                        generation,
                    );
                    info!(backup = %name, vm = %vmref, at = %export.location(), "pull export ready");
                    apply_status(api, &name, &status).await?;
                    Ok(requeue_until_expiry(&status))
                }
                Err(e) => {
                    ctx.release_offline(&ns, vm, uid).await;
                    let reason = backup_reason(&e);
                    status.conditions = agent_conditions(
                        &status.conditions,
                        &quiesce::after_failure(b.spec.quiesce, quiesce::backup_quiesce_error(&e)),
                        generation,
                    );
                    fail(api, &name, status, generation, reason, error_chain(&e)).await
                }
            }
        }
    }
}

/// The data path records the base *bitmap* of each incremental disk; status
/// reports the base *checkpoint*, whose bitmap may be named differently (a
/// redefined checkpoint adopting `spec.disks[].bitmap`).
fn name_base_checkpoint(manifest: &mut Manifest, checkpoint: Option<&str>) {
    for d in &mut manifest.disks {
        if let Some(bitmap) = &d.incremental_from {
            if d.missing_base.as_ref() == Some(bitmap) {
                d.missing_base = checkpoint.map(str::to_string);
            }
            d.incremental_from = checkpoint.map(str::to_string);
        }
    }
}

/// Sums `query-jobs` progress of our jobs into status every second; never returns.
async fn report_progress(
    api: &Api<VirtualMachineBackup>,
    name: &str,
    mut status: VirtualMachineBackupStatus,
    client: &QmpClient,
    job_ids: &[String],
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let Ok(jobs) = client.query_jobs().await else {
            continue;
        };
        let (done, total) = jobs
            .iter()
            .filter(|j| job_ids.contains(&j.id))
            .fold((0u64, 0u64), |(d, t), j| {
                (d + j.current_progress, t + j.total_progress)
            });
        let progress = Some(BackupProgress {
            bytes_done: done as i64,
            bytes_total: total as i64,
        });
        if progress != status.progress {
            status.progress = progress;
            let _ = apply_status(api, name, &status).await;
        }
    }
}

/// Runs [`verify_backup`] on a Succeeded push backup whose status has no
/// `Verified` condition (the agent restarted after the job), in a task.
fn resume_verification(
    b: &VirtualMachineBackup,
    ctx: &Arc<Context>,
    api: &Api<VirtualMachineBackup>,
    status: VirtualMachineBackupStatus,
    uid: &str,
) {
    let name = b.name_any();
    let generation = b.metadata.generation;
    let api = api.clone();
    let dir = push_dir(b, ctx);
    let manifest_file = Manifest::file_name(&Manifest::stem(&name, uid));
    info!(backup = %name, "backup succeeded but is not verified yet; verifying");
    let task = tokio::spawn(async move {
        match dir {
            Some(dir) => {
                report_verification(&api, &name, status, generation, &dir, &manifest_file).await
            }
            None => {
                let mut status = status;
                status.conditions = agent_conditions(
                    &status.conditions,
                    &[cond(
                        VERIFIED,
                        false,
                        "ManifestMissing",
                        "the backup's target directory is not usable; its files cannot be verified",
                    )],
                    generation,
                );
                if let Err(e) = apply_status(&api, &name, &status).await {
                    warn!(backup = %name, error = %error_chain(&e), "cannot report the verification");
                }
            }
        }
    });
    ctx.jobs
        .lock()
        .expect("jobs lock")
        .insert(uid.to_string(), task);
}

/// Computes the backup files' checksums ([`verify_backup`]) and reports them:
/// `status.disks[].sha256` and `Verified=True`, or `Verified=False` with the
/// reason. The phase stays Succeeded either way.
async fn report_verification(
    api: &Api<VirtualMachineBackup>,
    name: &str,
    mut status: VirtualMachineBackupStatus,
    generation: Option<i64>,
    dir: &TenantDir,
    manifest_file: &str,
) {
    let update = match verify_backup(dir, manifest_file).await {
        Ok(m) => {
            for d in &mut status.disks {
                d.sha256 = m.disk(&d.name).and_then(|md| md.file_sha256.clone());
            }
            let msg = format!(
                "SHA-256 of {} backup file(s) recorded in status.disks[].sha256 and the manifest",
                m.disks.len()
            );
            info!(backup = %name, "{msg}");
            cond(VERIFIED, true, "ChecksumsRecorded", msg)
        }
        Err(e) => {
            let msg = error_chain(&e);
            warn!(backup = %name, "verification failed: {msg}");
            cond(VERIFIED, false, "ChecksumFailed", msg)
        }
    };
    status.conditions = agent_conditions(&status.conditions, &[update], generation);
    if let Err(e) = apply_status(api, name, &status).await {
        warn!(backup = %name, error = %error_chain(&e), "cannot report the verification");
    }
}

/// Reports the job's result; returns the status written.
async fn finish_push(
    api: &Api<VirtualMachineBackup>,
    name: &str,
    mut status: VirtualMachineBackupStatus,
    generation: Option<i64>,
    dir: &Path,
    reason: &str,
    result: Result<Manifest, BackupError>,
) -> Result<VirtualMachineBackupStatus, kube::Error> {
    status.completion_time = Some(now());
    match result {
        Ok(m) => {
            let total: u64 = m.disks.iter().map(|d| d.bytes_copied).sum();
            status.phase = Some(BackupPhase::Succeeded);
            status.progress = Some(BackupProgress {
                bytes_done: total as i64,
                bytes_total: total as i64,
            });
            status.disks = m
                .disks
                .iter()
                .map(|d| BackupDiskStatus {
                    name: d.disk.clone(),
                    bytes_copied: Some(d.bytes_copied as i64),
                    target: Some(dir.join(&d.file).display().to_string()),
                    backing_file: d
                        .backing_chain
                        .get(1)
                        .map(|f| dir.join(f).display().to_string()),
                    incremental_from: d.incremental_from.clone(),
                    fell_back_to_full: d.fell_back_to_full,
                    sha256: d.file_sha256.clone(),
                    ..Default::default()
                })
                .collect();
            let fell: Vec<&str> = m
                .disks
                .iter()
                .filter(|d| d.fell_back_to_full)
                .map(|d| d.disk.as_str())
                .collect();
            let mut msg = if fell.is_empty() {
                format!("backed up {} disk(s), {total} bytes copied", m.disks.len())
            } else {
                format!(
                    "backed up {} disk(s); incremental base unusable on {fell:?}, so those were backed up full",
                    m.disks.len()
                )
            };
            for d in &m.disks {
                if let Some(base) = &d.missing_base {
                    let oldest = d.backing_chain.last().unwrap_or(&d.file);
                    msg.push_str(&format!(
                        "; disk {} holds only the changes since checkpoint {base}, which no Cairn backup created: rebase {} onto a full image of that point (`qemu-img rebase -u -b <image> -F <format> {}`) before restoring",
                        d.disk,
                        dir.join(oldest).display(),
                        dir.join(oldest).display()
                    ));
                }
            }
            info!(backup = %name, "{msg}");
            status.conditions = agent_conditions(
                &status.conditions,
                &[cond("Ready", true, reason, msg)],
                generation,
            );
        }
        Err(e) => {
            let cancelled = matches!(e, BackupError::Cancelled { .. });
            status.phase = Some(if cancelled {
                BackupPhase::Cancelled
            } else {
                BackupPhase::Failed
            });
            let msg = error_chain(&e);
            warn!(backup = %name, reason, "{msg}");
            status.failure_reason = Some(msg.clone());
            status.conditions = agent_conditions(
                &status.conditions,
                &[cond("Ready", false, reason, msg)],
                generation,
            );
        }
    }
    apply_status(api, name, &status).await?;
    Ok(status)
}

/// Next look at a served export: at its expiry, and every 10 s meanwhile to
/// notice an export its QEMU lost.
fn requeue_until_expiry(status: &VirtualMachineBackupStatus) -> Action {
    const CHECK: u64 = 10;
    match status.export.as_ref().and_then(|e| e.expires_at.as_ref()) {
        Some(t) => {
            let left = t.0.duration_since(Timestamp::now()).as_secs().max(1) as u64;
            Action::requeue(Duration::from_secs(left.min(CHECK)))
        }
        None => Action::requeue(Duration::from_secs(CHECK)),
    }
}

async fn watch_export(
    b: &VirtualMachineBackup,
    ctx: &Context,
    api: &Api<VirtualMachineBackup>,
    mut status: VirtualMachineBackupStatus,
    session: Option<(VmRef, QmpClient)>,
    uid: &str,
) -> Result<Action, ControllerError> {
    let name = b.name_any();
    let generation = b.metadata.generation;
    let socket = requested_socket(b);
    let Some((vmref, client)) = session else {
        // QEMU is gone and its export with it; only the scratch files remain.
        remove_local_files(
            &OperationId::new(uid),
            &ctx.pull,
            &vm_ref(b),
            socket.as_deref(),
            &name,
        );
        return fail(
            api,
            &name,
            status,
            generation,
            "VirtualMachineGone",
            format!(
                "VM {} stopped while its export was served; the export is gone",
                b.spec.virtual_machine
            ),
        )
        .await;
    };
    let expired = status
        .export
        .as_ref()
        .and_then(|e| e.expires_at.as_ref())
        .is_some_and(|t| t.0 <= Timestamp::now());
    if !expired {
        let prefix = OperationId::new(uid).prefix();
        let ours =
            |exports: &[crate::qmp::ExportView]| exports.iter().any(|e| e.id.starts_with(&prefix));
        let Ok(exports) = client.query_block_exports().await else {
            // QEMU does not answer (killed, or restarting): judge again once
            // discovery has caught up (VirtualMachineGone or ExportLost).
            return Ok(Action::requeue(Duration::from_secs(2)));
        };
        if !ours(&exports) {
            // A restarted QEMU (the socket came back before we looked) or a
            // hand-removed export: the URL in status leads nowhere.
            let _ = stop_pull_export(
                &client,
                &OperationId::new(uid),
                &ctx.pull,
                &vmref,
                socket.as_deref(),
                &name,
            )
            .await;
            return fail(
                api,
                &name,
                status,
                generation,
                "ExportLost",
                format!(
                    "the NBD export of VM {vmref} is gone (QEMU restarted, or the export was removed by hand); delete this backup and create a new one"
                ),
            )
            .await;
        }
        // The point-in-time view still holds (the scratch did not fill up)?
        let disks: Vec<String> = status.disks.iter().map(|d| d.name.clone()).collect();
        let checked = match (tcp_target(b), served_port(&status)) {
            (Some(_), Some(port)) => {
                check_tcp_pull_export(&ctx.pull, &vmref, &OperationId::new(uid), port, &disks).await
            }
            (Some(_), None) => Ok(()),
            (None, _) => {
                check_pull_export(&ctx.pull, &vmref, socket.as_deref(), &name, &disks).await
            }
        };
        if let Err(e) = checked {
            // A QEMU that died meanwhile took the export with it: that is not a
            // broken view, and the next pass says what happened.
            let still_served = client
                .query_block_exports()
                .await
                .is_ok_and(|exports| ours(&exports));
            if !still_served {
                return Ok(Action::requeue(Duration::from_secs(2)));
            }
            let _ = stop_pull_export(
                &client,
                &OperationId::new(uid),
                &ctx.pull,
                &vmref,
                socket.as_deref(),
                &name,
            )
            .await;
            return fail(
                api,
                &name,
                status,
                generation,
                backup_reason(&e),
                error_chain(&e),
            )
            .await;
        }
        return Ok(requeue_until_expiry(&status));
    }
    if let Err(e) = stop_pull_export(
        &client,
        &OperationId::new(uid),
        &ctx.pull,
        &vmref,
        socket.as_deref(),
        &name,
    )
    .await
    {
        warn!(backup = %name, vm = %vmref, error = %error_chain(&e), "cannot stop the export yet");
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    status.phase = Some(BackupPhase::Succeeded);
    status.completion_time = Some(now());
    status.conditions = agent_conditions(
        &status.conditions,
        &[cond(
            "Ready",
            true,
            "ExportClosed",
            "exportTimeoutSeconds passed; the export was torn down",
        )],
        generation,
    );
    apply_status(api, &name, &status).await?;
    Ok(Action::await_change())
}

async fn delete(
    b: &VirtualMachineBackup,
    ctx: &Context,
    api: &Api<VirtualMachineBackup>,
    mut status: VirtualMachineBackupStatus,
    session: Option<(VmRef, QmpClient)>,
    uid: &str,
) -> Result<Action, ControllerError> {
    let name = b.name_any();
    let generation = b.metadata.generation;
    let phase = status.phase.unwrap_or_default();
    let into_repository = b
        .spec
        .target
        .as_ref()
        .is_some_and(|t| t.repository.is_some());
    if into_repository && !phase.is_finished() {
        super::repository_backups::cancel(ctx, b, session.as_ref(), uid).await;
    } else if task_alive(ctx, uid) {
        // Cancel the jobs; the task sees the cancellation, cleans up and reports.
        if let Some((_, client)) = &session
            && let Ok(jobs) = client.query_jobs().await
        {
            let prefix = OperationId::new(uid).prefix();
            for j in jobs.iter().filter(|j| j.id.starts_with(&prefix)) {
                let _ = client.job_cancel(&j.id).await;
            }
        }
        return Ok(Action::requeue(Duration::from_millis(500)));
    }
    let msg = match (&session, phase) {
        (Some((vmref, client)), BackupPhase::Exporting | BackupPhase::Running) => {
            let op = OperationId::new(uid);
            // No task of ours watches the job (the agent restarted since it
            // started): cancel it here and remove the partial push files, as
            // the task would have.
            let stem = Manifest::stem(&name, uid);
            if let Some(dir) = push_dir(b, ctx)
                && let Err(e) = cleanup_leftovers(
                    client,
                    &op,
                    Some(FileScope {
                        dir: &dir,
                        stem: &stem,
                    }),
                )
                .await
            {
                warn!(backup = %name, error = %error_chain(&e), "cleanup failed; retrying");
                return Ok(Action::requeue(Duration::from_secs(5)));
            }
            let socket = requested_socket(b);
            if b.spec.mode == BackupMode::Pull
                && let Err(e) =
                    stop_pull_export(client, &op, &ctx.pull, vmref, socket.as_deref(), &name).await
            {
                warn!(backup = %name, error = %error_chain(&e), "teardown failed; retrying");
                return Ok(Action::requeue(Duration::from_secs(5)));
            }
            "jobs cancelled, exports torn down and partial files removed; completed backup files are kept"
        }
        _ => "nothing running; backup files are kept",
    };
    let deleted = match delete_files(b, ctx, api, phase, uid).await {
        Ok(d) => d,
        Err(e) => {
            warn!(backup = %name, error = %error_chain(&e), "deleting the backup files failed; retrying");
            return Ok(Action::requeue(Duration::from_secs(5)));
        }
    };
    let msg = deleted.unwrap_or_else(|| msg.to_string());
    if !phase.is_finished() {
        status.phase = Some(BackupPhase::Cancelled);
        status.completion_time.get_or_insert_with(now);
    }
    let fresh = api.get(&name).await?.status.unwrap_or_default();
    if fresh.phase.is_some_and(BackupPhase::is_finished)
        && !status.phase.is_some_and(BackupPhase::is_finished)
    {
        status = fresh;
    }
    let mut updates = vec![cond("CleanedUp", true, "Cleaned", &msg)];
    if status.phase == Some(BackupPhase::Cancelled) {
        updates.push(cond(
            "Ready",
            false,
            "Cancelled",
            "the backup was cancelled by deleting it before it finished",
        ));
    }
    status.conditions = agent_conditions(&status.conditions, &updates, generation);
    ctx.release_offline(
        &b.namespace().unwrap_or_default(),
        &b.spec.virtual_machine,
        uid,
    )
    .await;
    apply_status(api, &name, &status).await?;
    ctx.jobs.lock().expect("jobs lock").remove(uid);
    Ok(Action::await_change())
}

/// `deletionPolicy: Delete` on a finished push backup: removes its files
/// ([`Manifest::delete_files`]) unless a backup that stays is backed by them.
/// Backups of the namespace that are being deleted with `Delete` too count
/// as going, so a whole chain deleted at once goes in any order. Returns what
/// happened, for the `CleanedUp` message (`None`: nothing to delete here).
async fn delete_files(
    b: &VirtualMachineBackup,
    ctx: &Context,
    api: &Api<VirtualMachineBackup>,
    phase: BackupPhase,
    uid: &str,
) -> Result<Option<String>, BackupError> {
    if b.spec.deletion_policy != Some(cairn_api::DeletionPolicy::Delete)
        || phase != BackupPhase::Succeeded
    {
        return Ok(None);
    }
    let Some(dir) = push_dir(b, ctx) else {
        return Ok(None);
    };
    let going: std::collections::HashSet<String> = match api.list(&Default::default()).await {
        Ok(list) => list
            .items
            .into_iter()
            .filter(|o| {
                o.metadata.deletion_timestamp.is_some()
                    && o.spec.deletion_policy == Some(cairn_api::DeletionPolicy::Delete)
            })
            .filter_map(|o| o.metadata.uid)
            .collect(),
        // Without the list, nothing else counts as going: the safe side.
        Err(e) => {
            warn!(error = %e, "listing backups failed; keeping every file another backup needs");
            Default::default()
        }
    };
    let stem = Manifest::stem(&b.name_any(), uid);
    let d = Manifest::delete_files(&dir, &stem, |u| going.contains(u))?;
    info!(backup = %b.name_any(), removed = ?d.removed, kept = ?d.kept, "deletionPolicy Delete: backup files deleted");
    Ok(Some(if d.kept.is_empty() {
        format!("deletionPolicy Delete: removed {}", d.removed.join(", "))
    } else {
        format!(
            "deletionPolicy Delete: removed {}; kept {} (later backups are backed by them)",
            if d.removed.is_empty() {
                "nothing".to_string()
            } else {
                d.removed.join(", ")
            },
            d.kept.join(", ")
        )
    }))
}

pub(super) async fn fail(
    api: &Api<VirtualMachineBackup>,
    name: &str,
    mut status: VirtualMachineBackupStatus,
    generation: Option<i64>,
    reason: &str,
    message: String,
) -> Result<Action, ControllerError> {
    warn!(backup = %name, reason, "{message}");
    status.phase = Some(BackupPhase::Failed);
    status.observed_generation = generation;
    status.completion_time.get_or_insert_with(now);
    status.failure_reason = Some(message.clone());
    status.conditions = agent_conditions(
        &status.conditions,
        &[cond("Ready", false, reason, message)],
        generation,
    );
    apply_status(api, name, &status).await?;
    Ok(Action::await_change())
}
