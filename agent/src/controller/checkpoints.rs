//! Reconciles the VirtualMachineCheckpoints routed to this node.
//!
//! Pipeline: resolve (the VM's QMP session, the bitmap name) → act on the
//! phase (create or adopt, verify, or clean up on deletion) → report status.
//! A checkpoint created by a backup gets its bitmaps from the backup's
//! transaction; here it is only adopted.

use std::sync::Arc;
use std::time::Duration;

use cairn_api::{
    BackupPhase, CHECKPOINT_CREATED_CONDITION, CHECKPOINT_FINALIZER, CREATED_BY_BACKUP_LABEL,
    CREATED_BY_BACKUP_UID_ANNOTATION, CheckpointDiskStatus, CheckpointPhase, DomainDisk,
    DomainSnapshot, QemuInstance, VirtualMachineBackup, VirtualMachineCheckpoint,
    VirtualMachineCheckpointStatus,
};
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use tracing::{info, warn};

use super::status::{
    agent_conditions, apply_status, cache_is_current, checkpoint_reason, cond, error_chain, now,
};
use super::{Context, ControllerError, quiesce};
use crate::checkpoint::{
    self, CheckpointError, CheckpointInfo, CheckpointRequest, Domain, create_checkpoint,
    delete_checkpoint, inspect_checkpoint, plan_create, redefine_checkpoint,
};

/// Runs the controller until the process stops.
pub async fn run(ctx: Arc<Context>) {
    super::run_routed::<VirtualMachineCheckpoint, _, _>(ctx, "checkpoint", reconcile).await;
}

/// What the user asked for, in the data path's terms. The data path names a
/// checkpoint's bitmap the same on every disk, so per-disk names must agree.
pub fn plan_request(cp: &VirtualMachineCheckpoint) -> Result<CheckpointRequest, String> {
    let name = cp.name_any();
    let Some(listed) = cp.spec.disks.as_ref() else {
        return Ok(CheckpointRequest { name, disks: None });
    };
    let tracked: Vec<_> = listed.iter().filter(|d| d.tracked()).collect();
    let bitmaps: std::collections::BTreeSet<&str> = tracked
        .iter()
        .map(|d| d.bitmap.as_deref().unwrap_or(&name))
        .collect();
    if bitmaps.len() > 1 {
        return Err(format!(
            "all disks of checkpoint {name} must use one bitmap name, got {bitmaps:?}; give every disk the same `bitmap`, or none to use {name:?}"
        ));
    }
    let Some(bitmap) = bitmaps.first() else {
        return Err(format!(
            "checkpoint {name} selects no disk: every listed disk has `checkpoint: None`"
        ));
    };
    Ok(CheckpointRequest {
        name: bitmap.to_string(),
        disks: Some(tracked.iter().map(|d| d.name.clone()).collect()),
    })
}

/// What a checkpoint labelled `cairn.dev/created-by-backup` may believe
/// about its bitmaps ([`backup_vouch`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupVouch {
    /// The backup's transaction created the bitmaps: adopt them.
    Made,
    /// The backup has not passed its transaction yet.
    NotYet,
    /// The backup failed, was cancelled or is gone before creating them.
    Failed(String),
    /// The label does not hold: the named backup did not ask for this
    /// checkpoint (another UID, checkpoint or VM). Nothing is adopted.
    Refused(String),
}

/// Decides whether the backup a checkpoint's label names vouches for its
/// bitmaps: same UID as the operator recorded, asking for this checkpoint on
/// this VM, and its agent reported the transaction that made them. Pure.
pub fn backup_vouch(
    cp: &VirtualMachineCheckpoint,
    backup_name: &str,
    backup: Option<&VirtualMachineBackup>,
) -> BackupVouch {
    let Some(b) = backup else {
        return BackupVouch::Failed(format!(
            "backup {backup_name} that was to create this checkpoint is gone; no bitmap was created"
        ));
    };
    let recorded_uid = cp.annotations().get(CREATED_BY_BACKUP_UID_ANNOTATION);
    let asks_for_this = b.spec.checkpoint.as_ref().map(|c| c.name.as_str())
        == Some(cp.name_any().as_str())
        && b.spec.virtual_machine == cp.spec.virtual_machine;
    if recorded_uid.is_none() || recorded_uid != b.metadata.uid.as_ref() || !asks_for_this {
        return BackupVouch::Refused(format!(
            "label {CREATED_BY_BACKUP_LABEL}={backup_name} does not hold: that backup (UID {}) did not ask for checkpoint {} of VM {}; no bitmap was adopted. Only Cairn sets this label",
            b.metadata.uid.as_deref().unwrap_or("unknown"),
            cp.name_any(),
            cp.spec.virtual_machine
        ));
    }
    let status = b.status.as_ref();
    if matches!(
        status.and_then(|s| s.phase),
        Some(BackupPhase::Failed | BackupPhase::Cancelled)
    ) {
        return BackupVouch::Failed(format!(
            "backup {backup_name} that was to create this checkpoint failed or was cancelled; no bitmap was created"
        ));
    }
    if status.is_some_and(|s| {
        cairn_api::conditions::is_true(&s.conditions, CHECKPOINT_CREATED_CONDITION)
    }) {
        BackupVouch::Made
    } else {
        BackupVouch::NotYet
    }
}

/// The data path's domain from the API's snapshot.
pub fn domain_from_api(d: &DomainSnapshot) -> Domain {
    Domain {
        disks: d
            .disks
            .iter()
            .map(|x| checkpoint::DomainDisk {
                name: x.name.clone(),
                node_name: x.node_name.clone().unwrap_or_default(),
                file: x.file.clone().into(),
                format: x.format.clone(),
                virtual_size: x.virtual_size.unwrap_or(0) as u64,
            })
            .collect(),
    }
}

/// The API's snapshot from the data path's domain.
pub fn domain_to_api(d: &Domain) -> DomainSnapshot {
    DomainSnapshot {
        disks: d
            .disks
            .iter()
            .map(|x| DomainDisk {
                name: x.name.clone(),
                node_name: Some(x.node_name.clone()),
                file: x.file.display().to_string(),
                format: x.format.clone(),
                virtual_size: Some(x.virtual_size as i64),
            })
            .collect(),
        extras: Default::default(),
    }
}

fn disks_status(info: &CheckpointInfo) -> Vec<CheckpointDiskStatus> {
    info.disks
        .iter()
        .map(|d| CheckpointDiskStatus {
            name: d.disk.clone(),
            bitmap: d.bitmap.clone(),
            granularity: Some(i64::from(d.granularity)),
            dirty_bytes: Some(d.dirty_bytes as i64),
            present: !d.inconsistent,
            inconsistent: d.inconsistent,
        })
        .collect()
}

async fn reconcile(
    cp: Arc<VirtualMachineCheckpoint>,
    ctx: Arc<Context>,
) -> Result<Action, ControllerError> {
    let ns = cp
        .namespace()
        .ok_or(ControllerError::MissingField("metadata.namespace"))?;
    let name = cp.name_any();
    let api: Api<VirtualMachineCheckpoint> = Api::namespaced(ctx.client.clone(), &ns);
    let status = cp.status.clone().unwrap_or_default();
    if !super::routed_here(
        &ctx.config.node_name,
        status.node_name.as_deref(),
        &status.conditions,
    ) {
        // Labelled for this node, but not by the operator (yet): not ours to act on.
        return Ok(Action::await_change());
    }
    let generation = cp.metadata.generation;
    let vm = cp.spec.virtual_machine.clone();
    let session = ctx.session(&ns, &vm).await;
    if let Some(action) = quiesce::thaw_first(
        &ctx,
        &api,
        &*cp,
        &status.conditions,
        session.as_ref().map(|s| &s.0),
        async |conditions| {
            let mut status = status.clone();
            status.conditions = conditions;
            apply_status(&api, &name, &status).await
        },
    )
    .await?
    {
        return Ok(action);
    }

    // A bitmap name we can't serve is a spec error, whatever the phase.
    let request = match plan_request(&cp) {
        Ok(r) => r,
        Err(msg) => {
            if cp.metadata.deletion_timestamp.is_some() {
                return cleaned_up(&api, &name, status, generation, "nothing was created").await;
            }
            return fail(&api, &name, status, generation, "InvalidDiskSelection", msg).await;
        }
    };

    if cp.metadata.deletion_timestamp.is_some() {
        if !cp.finalizers().iter().any(|f| f == CHECKPOINT_FINALIZER)
            || cairn_api::conditions::is_true(&status.conditions, "CleanedUp")
        {
            return Ok(Action::await_change());
        }
        // Bitmaps exist once the checkpoint was Ready (creationTime), also when
        // it turned Failed later because they went bad; or while Creating.
        let mut created = status.creation_time.is_some()
            || status.phase.is_some_and(|p| {
                matches!(
                    p,
                    CheckpointPhase::Ready | CheckpointPhase::Creating | CheckpointPhase::Deleting
                )
            });
        // Made by a backup's transaction but deleted before this agent
        // adopted it (a schedule drops a chain's last checkpoint right after
        // its run): the backup's word says the bitmaps exist.
        if !created && let Some(backup) = cp.labels().get(CREATED_BY_BACKUP_LABEL) {
            let backups: Api<VirtualMachineBackup> = Api::namespaced(ctx.client.clone(), &ns);
            let found = backups.get_opt(backup).await?;
            created = matches!(backup_vouch(&cp, backup, found.as_ref()), BackupVouch::Made);
        }
        let msg = match (&session, created) {
            (_, false) => "no bitmap was created".to_string(),
            (Some((vmref, client)), true) => {
                match delete_checkpoint(client, vmref, &request.name, request.disks.as_deref())
                    .await
                {
                    Ok(disks) => format!("removed bitmap {} from disks {disks:?}", request.name),
                    Err(CheckpointError::NotFound { .. }) => "bitmaps were already gone".into(),
                    Err(e) => {
                        warn!(checkpoint = %name, error = %error_chain(&e), "cannot remove bitmaps yet");
                        return Ok(Action::requeue(Duration::from_secs(5)));
                    }
                }
            }
            (None, true) => match status.domain.as_ref() {
                Some(d) => {
                    match checkpoint::delete_checkpoint_offline(&domain_from_api(d), &request.name)
                        .await
                    {
                        Ok(disks) => format!(
                            "VM not running: removed bitmap {} offline from {disks:?}",
                            request.name
                        ),
                        Err(e) => {
                            warn!(checkpoint = %name, error = %error_chain(&e), "offline removal failed");
                            return Ok(Action::requeue(Duration::from_secs(10)));
                        }
                    }
                }
                None => format!(
                    "VM {vm} is not running and no domain was recorded: bitmap {} stays in the images (remove it with `qemu-img bitmap --remove`)",
                    request.name
                ),
            },
        };
        info!(checkpoint = %name, namespace = %ns, "{msg}");
        return cleaned_up(&api, &name, status, generation, &msg).await;
    }

    match status.phase.unwrap_or_default() {
        CheckpointPhase::Pending | CheckpointPhase::Creating => {
            create(&cp, &ctx, &api, status, request, session).await
        }
        CheckpointPhase::Ready => {
            let created_by = cp.labels().get(CREATED_BY_BACKUP_LABEL).cloned();
            verify(
                &ctx, &api, &name, status, generation, &request, session, created_by,
            )
            .await
        }
        // Failed after it was Ready (its bitmap went missing, inconsistent or
        // disabled): keep watching, it may come back (a re-enabled bitmap).
        CheckpointPhase::Failed if was_verified_failure(&status) => {
            let created_by = cp.labels().get(CREATED_BY_BACKUP_LABEL).cloned();
            verify(
                &ctx, &api, &name, status, generation, &request, session, created_by,
            )
            .await
        }
        CheckpointPhase::Failed | CheckpointPhase::Deleting => Ok(Action::await_change()),
    }
}

async fn create(
    cp: &VirtualMachineCheckpoint,
    ctx: &Context,
    api: &Api<VirtualMachineCheckpoint>,
    mut status: VirtualMachineCheckpointStatus,
    request: CheckpointRequest,
    session: Option<(crate::inventory::VmRef, crate::qmp::QmpClient)>,
) -> Result<Action, ControllerError> {
    let name = cp.name_any();
    let generation = cp.metadata.generation;
    let ns = cp.namespace().unwrap_or_default();
    if !cache_is_current(api, cp).await? {
        // Our last status write has not reached the cache yet: act on it once it has.
        return Ok(Action::requeue(Duration::from_millis(500)));
    }

    // Made by a backup's transaction: adopt once that backup says its
    // transaction made the bitmaps — never on the label alone.
    if let Some(backup) = cp.labels().get(CREATED_BY_BACKUP_LABEL) {
        let backups: Api<VirtualMachineBackup> = Api::namespaced(ctx.client.clone(), &ns);
        let found = backups.get_opt(backup).await?;
        match backup_vouch(cp, backup, found.as_ref()) {
            BackupVouch::Made => {
                if let Some((vmref, client)) = &session {
                    match inspect_checkpoint(client, vmref, &request.name).await {
                        Ok(info) => {
                            let inv = ctx
                                .discovery
                                .inventory(&vmref.namespace, &vmref.name)
                                .await
                                .ok();
                            let domain = inv.map(|i| Domain::observe(&i));
                            return ready(
                                api,
                                &name,
                                status,
                                generation,
                                &info,
                                domain.as_ref(),
                                "CreatedByBackup",
                                format!("bitmaps created by backup {backup}"),
                            )
                            .await;
                        }
                        Err(CheckpointError::NotFound { .. }) => {
                            return fail(
                                api,
                                &name,
                                status,
                                generation,
                                "BitmapMissing",
                                format!(
                                    "backup {backup} created bitmap {} but it is no longer on VM {}",
                                    request.name, cp.spec.virtual_machine
                                ),
                            )
                            .await;
                        }
                        Err(e) => {
                            warn!(checkpoint = %name, error = %error_chain(&e), "cannot inspect bitmaps yet");
                            return Ok(Action::requeue(Duration::from_secs(2)));
                        }
                    }
                }
                // A stopped VM backed up offline: the bitmap is in its images.
                if let Some(domain) = stopped_domain(ctx, &ns, &cp.spec.virtual_machine).await? {
                    let vm = format!("{ns}/{}", cp.spec.virtual_machine);
                    match checkpoint::inspect_checkpoint_offline(&vm, &domain, &request.name).await
                    {
                        Ok(info) => {
                            return ready(
                                api,
                                &name,
                                status,
                                generation,
                                &info,
                                Some(&domain),
                                "CreatedByBackup",
                                format!("bitmaps created by offline backup {backup}"),
                            )
                            .await;
                        }
                        Err(e) => {
                            warn!(checkpoint = %name, error = %error_chain(&e), "cannot inspect the stopped VM's bitmaps yet");
                            return Ok(Action::requeue(Duration::from_secs(2)));
                        }
                    }
                }
                // The VM is not running: wait for it below.
            }
            // Not started yet, or before its transaction: the bitmaps come with it.
            BackupVouch::NotYet if session.is_some() => {
                return Ok(Action::requeue(Duration::from_secs(1)));
            }
            BackupVouch::NotYet => {}
            // The backup's fate decides, whether the VM runs or not, so a
            // checkpoint whose backup failed never waits for a VM that may not return.
            BackupVouch::Failed(msg) => {
                return fail(api, &name, status, generation, "BackupFailed", msg).await;
            }
            BackupVouch::Refused(msg) => {
                return fail(api, &name, status, generation, "NotCreatedByBackup", msg).await;
            }
        }
    }

    let Some((vmref, client)) = session else {
        // A stopped VM whose disks this node knows: add the bitmaps to its
        // images with `qemu-img bitmap`, as libvirt does for inactive domains.
        // (A backup's checkpoint is made by the backup's transaction, a
        // redefine needs the running VM to verify against.)
        if !cp.spec.redefine
            && !cp.labels().contains_key(CREATED_BY_BACKUP_LABEL)
            && let Some(domain) = stopped_domain(ctx, &ns, &cp.spec.virtual_machine).await?
        {
            if cp.spec.quiesce {
                let (reason, msg) = quiesce::stopped(&cp.spec.virtual_machine);
                return fail(api, &name, status, generation, reason, msg).await;
            }
            return create_offline(cp, api, status, request, domain).await;
        }
        status.phase = Some(CheckpointPhase::Pending);
        status.conditions = agent_conditions(
            &status.conditions,
            &[cond(
                "Ready",
                false,
                "VirtualMachineNotRunning",
                format!(
                    "VM {} has no QMP socket on node {}; the checkpoint is made when it runs",
                    cp.spec.virtual_machine, ctx.config.node_name
                ),
            )],
            generation,
        );
        apply_status(api, &name, &status).await?;
        return Ok(Action::requeue(Duration::from_secs(5)));
    };
    let qga = (cp.spec.quiesce && !cp.spec.redefine).then(|| quiesce::guest_agent(ctx, &vmref));
    let was_creating = status.phase == Some(CheckpointPhase::Creating);
    if !was_creating && !cp.spec.redefine {
        // Refuse before recording `Creating`, so that a bitmap found while
        // `Creating` can only be the one this agent's transaction made.
        if let Err(e) = plan_create(&client, &vmref, &request).await {
            return fail(
                api,
                &name,
                status,
                generation,
                checkpoint_reason(&e),
                error_chain(&e),
            )
            .await;
        }
    }
    if !was_creating || qga.is_some() {
        status.phase = Some(CheckpointPhase::Creating);
        if qga.is_some() {
            status.conditions =
                agent_conditions(&status.conditions, &[quiesce::freezing()], generation);
        }
        apply_status(api, &name, &status).await?;
    }
    let result = if cp.spec.redefine {
        let claimed = cp.spec.domain.as_ref().map(domain_from_api);
        redefine_checkpoint(&client, &vmref, &request, claimed.as_ref())
            .await
            .map(|i| {
                let d = i.domain.clone();
                (i, d)
            })
    } else {
        let create = async {
            match create_checkpoint(&client, &vmref, &request).await {
                Ok(i) => {
                    let d = i.domain.clone();
                    Ok((i, d))
                }
                // A retry after our own transaction succeeded but the status write did not.
                Err(CheckpointError::AlreadyExists { .. }) if was_creating => {
                    let i = inspect_checkpoint(&client, &vmref, &request.name).await;
                    let inv = ctx
                        .discovery
                        .inventory(&vmref.namespace, &vmref.name)
                        .await
                        .ok();
                    i.map(|i| (i, inv.map(|inv| Domain::observe(&inv))))
                }
                Err(e) => Err(e),
            }
        };
        match &qga {
            None => create.await,
            Some(agent) => match agent.quiesced(create).await {
                Ok((result, report)) => {
                    let (updates, quiesced) = match &result {
                        Ok(_) => quiesce::outcome(true, Some(&report)),
                        Err(_) => (quiesce::after_failure(true, None), None),
                    };
                    status.conditions = agent_conditions(&status.conditions, &updates, generation);
                    status.quiesce = quiesced;
                    result
                }
                Err(e) => {
                    // Nothing ran: no bitmap was made; the guest was thawed.
                    status.conditions = agent_conditions(
                        &status.conditions,
                        &quiesce::after_failure(true, Some(&e)),
                        generation,
                    );
                    return fail(api, &name, status, generation, e.reason(), e.to_string()).await;
                }
            },
        }
    };
    match result {
        Ok((info, observed)) => {
            if qga.is_none() && !cp.spec.redefine {
                status.conditions = agent_conditions(
                    &status.conditions,
                    &quiesce::outcome(false, None).0,
                    generation,
                );
            }
            let (reason, msg) = if cp.spec.redefine {
                (
                    "Redefined",
                    format!(
                        "adopted existing bitmap {} on {} disk(s)",
                        request.name,
                        info.disks.len()
                    ),
                )
            } else {
                (
                    "Created",
                    format!(
                        "bitmap {} records writes on {} disk(s)",
                        request.name,
                        info.disks.len()
                    ),
                )
            };
            info!(checkpoint = %name, vm = %vmref, "{msg}");
            ready(
                api,
                &name,
                status,
                generation,
                &info,
                observed.as_ref(),
                reason,
                msg,
            )
            .await
        }
        Err(e) => {
            let reason = checkpoint_reason(&e);
            fail(api, &name, status, generation, reason, error_chain(&e)).await
        }
    }
}

/// The last-known disk layout of `vm` when its QemuInstance says it is
/// stopped on this node.
pub(super) async fn stopped_domain(
    ctx: &Context,
    ns: &str,
    vm: &str,
) -> Result<Option<Domain>, ControllerError> {
    let qis: Api<QemuInstance> = Api::namespaced(ctx.client.clone(), ns);
    let Some(status) = qis.get_opt(vm).await?.and_then(|qi| qi.status) else {
        return Ok(None);
    };
    if status.run_state.as_deref() != Some("stopped")
        || status.node_name.as_deref() != Some(ctx.config.node_name.as_str())
        || status.disks.is_empty()
    {
        return Ok(None);
    }
    let disks: Option<Vec<checkpoint::DomainDisk>> = status
        .disks
        .iter()
        .map(|d| {
            Some(checkpoint::DomainDisk {
                name: d.name.clone(),
                node_name: d.node_name.clone()?,
                file: d.file.clone()?.into(),
                format: d.format.clone()?,
                virtual_size: u64::try_from(d.virtual_size?).ok()?,
            })
        })
        .collect();
    Ok(disks.map(|disks| Domain { disks }))
}

/// Creates a checkpoint of a stopped VM in its images. `Creating` is recorded
/// only after the name was found free, so a retry adopts what it finds.
async fn create_offline(
    cp: &VirtualMachineCheckpoint,
    api: &Api<VirtualMachineCheckpoint>,
    mut status: VirtualMachineCheckpointStatus,
    request: CheckpointRequest,
    domain: Domain,
) -> Result<Action, ControllerError> {
    let name = cp.name_any();
    let generation = cp.metadata.generation;
    let vm = format!(
        "{}/{}",
        cp.namespace().unwrap_or_default(),
        cp.spec.virtual_machine
    );
    let was_creating = status.phase == Some(CheckpointPhase::Creating);
    if !was_creating {
        if let Err(e) = checkpoint::plan_create_offline(&vm, &domain, &request).await {
            return offline_error(api, &name, status, generation, e).await;
        }
        status.phase = Some(CheckpointPhase::Creating);
        apply_status(api, &name, &status).await?;
    }
    let result = match checkpoint::create_checkpoint_offline(&vm, &domain, &request).await {
        Err(CheckpointError::AlreadyExists { .. }) if was_creating => {
            checkpoint::inspect_checkpoint_offline(&vm, &domain, &request.name).await
        }
        r => r,
    };
    match result {
        Ok(info) => {
            let msg = format!(
                "VM not running: bitmap {} added to the images of {} disk(s) with qemu-img",
                request.name,
                info.disks.len()
            );
            info!(checkpoint = %name, vm = %vm, "{msg}");
            ready(
                api,
                &name,
                status,
                generation,
                &info,
                Some(&domain),
                "CreatedOffline",
                msg,
            )
            .await
        }
        Err(e) => offline_error(api, &name, status, generation, e).await,
    }
}

/// An image tool failure (e.g. the VM is starting and holds the image lock)
/// is retried; anything else fails the checkpoint.
async fn offline_error(
    api: &Api<VirtualMachineCheckpoint>,
    name: &str,
    mut status: VirtualMachineCheckpointStatus,
    generation: Option<i64>,
    e: CheckpointError,
) -> Result<Action, ControllerError> {
    if !matches!(e, CheckpointError::Image { .. }) {
        return fail(
            api,
            name,
            status,
            generation,
            checkpoint_reason(&e),
            error_chain(&e),
        )
        .await;
    }
    warn!(checkpoint = %name, error = %error_chain(&e), "offline checkpoint failed; retrying");
    status.conditions = agent_conditions(
        &status.conditions,
        &[cond("Ready", false, "OfflineRetry", error_chain(&e))],
        generation,
    );
    apply_status(api, name, &status).await?;
    Ok(Action::requeue(Duration::from_secs(10)))
}

#[allow(clippy::too_many_arguments)]
async fn ready(
    api: &Api<VirtualMachineCheckpoint>,
    name: &str,
    mut status: VirtualMachineCheckpointStatus,
    generation: Option<i64>,
    info: &CheckpointInfo,
    observed: Option<&Domain>,
    reason: &str,
    message: String,
) -> Result<Action, ControllerError> {
    let cp = api.get(name).await?;
    status.phase = Some(CheckpointPhase::Ready);
    status.disks = disks_status(info);
    status.size = Some(info.disks.iter().map(|d| d.dirty_bytes as i64).sum());
    status.creation_time.get_or_insert_with(now);
    status.observed_generation = generation;
    let domain_cond = if let (Some(claimed), Some(d)) = (cp.spec.domain.as_ref(), observed) {
        // Only what the agent verified against the VM is recorded; the
        // claim's free-form extras are kept as given (they drive nothing).
        let mut verified = domain_to_api(d);
        verified.extras = claimed.extras.clone();
        status.domain = Some(verified);
        cond(
            "DomainRecorded",
            true,
            "Verified",
            format!(
                "the domain given with the redefine matches the VM's {} disk(s) and is recorded as QEMU reports them",
                d.disks.len()
            ),
        )
    } else if let Some(d) = observed {
        status.domain = Some(domain_to_api(d));
        cond(
            "DomainRecorded",
            true,
            "Observed",
            "the VM's disk layout was recorded at creation",
        )
    } else {
        status.domain = None;
        cond(
            "DomainRecorded",
            false,
            "NotProvided",
            "redefined without a domain: usable for incremental backups, but offline operations and restores into a definition are unavailable",
        )
    };
    status.conditions = agent_conditions(
        &status.conditions,
        &[cond("Ready", true, reason, message), domain_cond],
        generation,
    );
    apply_status(api, name, &status).await?;
    Ok(Action::requeue(Duration::from_secs(30)))
}

#[allow(clippy::too_many_arguments)]
async fn verify(
    ctx: &Context,
    api: &Api<VirtualMachineCheckpoint>,
    name: &str,
    mut status: VirtualMachineCheckpointStatus,
    generation: Option<i64>,
    request: &CheckpointRequest,
    session: Option<(crate::inventory::VmRef, crate::qmp::QmpClient)>,
    created_by: Option<String>,
) -> Result<Action, ControllerError> {
    let Some((vmref, client)) = session else {
        // Stopped VM: bitmaps live on in the images; nothing to refresh.
        return Ok(Action::requeue(Duration::from_secs(30)));
    };
    let before = status.clone();
    let ready = match inspect_checkpoint(&client, &vmref, &request.name).await {
        Ok(info) => {
            status.disks = disks_status(&info);
            status.size = Some(info.disks.iter().map(|d| d.dirty_bytes as i64).sum());
            let inconsistent = info.disks.iter().find(|d| d.inconsistent);
            let disabled = info.disks.iter().find(|d| !d.recording);
            match (inconsistent, disabled) {
                (Some(d), _) => cond(
                    "Ready",
                    false,
                    "BitmapInconsistent",
                    format!(
                        "bitmap {} on disk {} of VM {vmref} is inconsistent (QEMU did not close the image cleanly); delete this checkpoint, and take a full backup next",
                        d.bitmap, d.disk
                    ),
                ),
                (None, Some(d)) => cond(
                    "Ready",
                    false,
                    "BitmapDisabled",
                    format!(
                        "bitmap {} on disk {} of VM {vmref} is disabled (not recording writes), so an incremental from it would miss changes; enable it again or delete this checkpoint",
                        d.bitmap, d.disk
                    ),
                ),
                (None, None) => match expected_missing(request, &info) {
                    Some(disk) => cond(
                        "Ready",
                        false,
                        "BitmapMissing",
                        format!(
                            "bitmap {} is missing on disk {disk} of VM {vmref}",
                            request.name
                        ),
                    ),
                    // Already Ready: keep the reason it was made with, so an
                    // unchanged checkpoint is never rewritten.
                    None => match cairn_api::conditions::find(&before.conditions, "Ready")
                        .filter(|c| c.status == "True")
                    {
                        Some(c) => cond("Ready", true, &c.reason, c.message.clone()),
                        None => cond(
                            "Ready",
                            true,
                            "Verified",
                            format!(
                                "bitmap {} present on {} disk(s)",
                                request.name,
                                info.disks.len()
                            ),
                        ),
                    },
                },
            }
        }
        Err(CheckpointError::NotFound { .. }) => {
            // A backup that fails or is cancelled after its transaction removes the
            // checkpoint it created: that checkpoint can never be a gapless base.
            if let Some(backup) = created_by {
                let backups: Api<VirtualMachineBackup> =
                    Api::namespaced(ctx.client.clone(), &vmref.namespace);
                let phase = backups
                    .get_opt(&backup)
                    .await?
                    .and_then(|b| b.status)
                    .and_then(|s| s.phase);
                if matches!(phase, Some(BackupPhase::Failed | BackupPhase::Cancelled)) {
                    return fail(api, name, status, generation, "BackupFailed", format!(
                        "backup {backup} that created this checkpoint did not complete, and its bitmaps were removed with it; this checkpoint cannot be an incremental base"
                    )).await;
                }
            }
            status.disks.iter_mut().for_each(|d| d.present = false);
            cond(
                "Ready",
                false,
                "BitmapMissing",
                format!(
                    "bitmap {} is missing on every disk of VM {vmref} (QEMU was killed before writing it, or it was removed); delete this checkpoint",
                    request.name
                ),
            )
        }
        Err(e) => {
            warn!(checkpoint = %name, error = %error_chain(&e), "cannot inspect bitmaps");
            return Ok(Action::requeue(Duration::from_secs(10)));
        }
    };
    // The phase never reads healthy for an unusable checkpoint: it follows
    // the Ready condition both ways (a disabled bitmap can be re-enabled).
    status.phase = Some(if ready.status {
        CheckpointPhase::Ready
    } else {
        CheckpointPhase::Failed
    });
    status.conditions = agent_conditions(&status.conditions, &[ready], generation);
    // Also brings an object written before the kstatus conditions existed up to date.
    cairn_api::conditions::sync_lifecycle(&mut status, k8s_openapi::jiff::Timestamp::now());
    if status != before {
        apply_status(api, name, &status).await?;
    }
    Ok(Action::requeue(Duration::from_secs(15)))
}

/// A checkpoint that failed the periodic bitmap check after being Ready
/// (as opposed to one that never got its bitmaps).
fn was_verified_failure(status: &VirtualMachineCheckpointStatus) -> bool {
    status.creation_time.is_some()
        && cairn_api::conditions::find(&status.conditions, "Ready").is_some_and(|c| {
            matches!(
                c.reason.as_str(),
                "BitmapMissing" | "BitmapDisabled" | "BitmapInconsistent"
            )
        })
}

fn expected_missing(request: &CheckpointRequest, info: &CheckpointInfo) -> Option<String> {
    request
        .disks
        .iter()
        .flatten()
        .find(|d| !info.disks.iter().any(|x| &x.disk == *d))
        .cloned()
}

async fn fail(
    api: &Api<VirtualMachineCheckpoint>,
    name: &str,
    mut status: VirtualMachineCheckpointStatus,
    generation: Option<i64>,
    reason: &str,
    message: String,
) -> Result<Action, ControllerError> {
    warn!(checkpoint = %name, reason, "{message}");
    status.phase = Some(CheckpointPhase::Failed);
    status.observed_generation = generation;
    status.conditions = agent_conditions(
        &status.conditions,
        &[cond("Ready", false, reason, message)],
        generation,
    );
    apply_status(api, name, &status).await?;
    Ok(Action::await_change())
}

async fn cleaned_up(
    api: &Api<VirtualMachineCheckpoint>,
    name: &str,
    mut status: VirtualMachineCheckpointStatus,
    generation: Option<i64>,
    message: &str,
) -> Result<Action, ControllerError> {
    status.phase = Some(CheckpointPhase::Deleting);
    status.conditions = agent_conditions(
        &status.conditions,
        &[
            cond(
                "Ready",
                false,
                "Deleting",
                "the checkpoint is being deleted",
            ),
            cond("CleanedUp", true, "BitmapsRemoved", message),
        ],
        generation,
    );
    apply_status(api, name, &status).await?;
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_api::{
        BackupCheckpoint, Condition, VirtualMachineBackupSpec, VirtualMachineBackupStatus,
        VirtualMachineCheckpointSpec,
    };

    fn checkpoint(uid_annotation: Option<&str>) -> VirtualMachineCheckpoint {
        let mut cp = VirtualMachineCheckpoint::new(
            "cp1",
            VirtualMachineCheckpointSpec {
                virtual_machine: "vm1".into(),
                ..Default::default()
            },
        );
        cp.metadata.labels = Some([(CREATED_BY_BACKUP_LABEL.to_string(), "b1".to_string())].into());
        cp.metadata.annotations = uid_annotation
            .map(|u| [(CREATED_BY_BACKUP_UID_ANNOTATION.to_string(), u.to_string())].into());
        cp
    }

    fn backup(
        checkpoint: &str,
        vm: &str,
        phase: Option<BackupPhase>,
        made: bool,
    ) -> VirtualMachineBackup {
        let mut b = VirtualMachineBackup::new(
            "b1",
            VirtualMachineBackupSpec {
                virtual_machine: vm.into(),
                checkpoint: Some(BackupCheckpoint {
                    name: checkpoint.into(),
                }),
                ..Default::default()
            },
        );
        b.metadata.uid = Some("uid-1".into());
        let conditions = made
            .then(|| Condition {
                type_: CHECKPOINT_CREATED_CONDITION.into(),
                status: "True".into(),
                reason: "InBackupTransaction".into(),
                message: String::new(),
                last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::now(),
                ),
                observed_generation: None,
            })
            .into_iter()
            .collect();
        b.status = Some(VirtualMachineBackupStatus {
            phase,
            conditions,
            ..Default::default()
        });
        b
    }

    #[test]
    fn bitmaps_are_adopted_only_on_the_word_of_the_backup_that_made_them() {
        let cp = checkpoint(Some("uid-1"));
        let running = Some(BackupPhase::Running);
        assert_eq!(
            backup_vouch(&cp, "b1", Some(&backup("cp1", "vm1", running, true))),
            BackupVouch::Made
        );
        // Before its transaction: wait, never adopt what happens to be there.
        assert_eq!(
            backup_vouch(&cp, "b1", Some(&backup("cp1", "vm1", running, false))),
            BackupVouch::NotYet
        );
        assert!(matches!(
            backup_vouch(
                &cp,
                "b1",
                Some(&backup("cp1", "vm1", Some(BackupPhase::Failed), false))
            ),
            BackupVouch::Failed(_)
        ));
        assert!(matches!(
            backup_vouch(&cp, "b1", None),
            BackupVouch::Failed(_)
        ));
    }

    #[test]
    fn a_forged_created_by_label_adopts_nothing() {
        let made = |cp: &str, vm: &str| backup(cp, vm, Some(BackupPhase::Succeeded), true);
        // Set by hand: no UID annotation, or another backup's UID.
        for cp in [checkpoint(None), checkpoint(Some("uid-other"))] {
            assert!(matches!(
                backup_vouch(&cp, "b1", Some(&made("cp1", "vm1"))),
                BackupVouch::Refused(_)
            ));
        }
        // The named backup made another checkpoint, or worked on another VM.
        let cp = checkpoint(Some("uid-1"));
        for b in [made("cp2", "vm1"), made("cp1", "vm2")] {
            let v = backup_vouch(&cp, "b1", Some(&b));
            assert!(
                matches!(&v, BackupVouch::Refused(m) if m.contains("did not ask")),
                "{v:?}"
            );
        }
    }
}
