//! The VirtualMachineBackup controller.
//!
//! ```text
//! reconcile(backup)
//!   1. resolve   the VM's QemuInstance, the incremental base and the checkpoint to create (caches)
//!   2. deletion  plan_deletion: remove the finalizer once the agent cancelled the job, or wait;
//!                a TCP export's credentials (nbd_tls::remove) go first, and as soon as it finished;
//!                with deletionPolicy Delete, the repository snapshot is deleted first
//!   3. ttl       ttl_decision: delete a finished backup once ttlSecondsAfterFinished passed
//!   4. validate  validate_backup: VM, incremental base, checkpoint name; a TCP pull export's
//!                TLS credentials are issued (nbd_tls::ensure) before routing
//!   5. plan      plan_backup (+ checkpoint_for_backup): labels, finalizer, status, checkpoint to create
//!   6. apply     create the checkpoint, apply status (server-side apply), then routing metadata
//!   7. report    events (Routed, VirtualMachineNotFound, CheckpointCreated, Deleted, Expired)
//! ```
//!
//! The incremental base need not be `Ready`: whether its bitmaps are usable is
//! known only on the node (a bitmap can turn inconsistent at any time), so a
//! backup whose base exists is routed and the agent decides — it falls back to
//! full when `fallbackToFull` is set and fails with a clear reason otherwise.
//! A backup rejected for its base is validated again every minute, so a base
//! applied later by a GitOps tool still lets it start.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cairn_api::{
    BACKUP_FINALIZER, BackupPhase, CHECKPOINT_FINALIZER, CREATED_BY_BACKUP_LABEL,
    CREATED_BY_BACKUP_UID_ANNOTATION, CheckpointDisk, CheckpointMode, NODE_LABEL, SCHEDULE_LABEL,
    VM_LABEL, VirtualMachineBackup, VirtualMachineBackupStatus, VirtualMachineCheckpoint,
    VirtualMachineCheckpointSpec, condition_types, conditions,
};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ObjectMeta, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};

use crate::context::Context;
use crate::error::{Error, Result};
use crate::nbd_tls;
use crate::routing::{
    self, DeletionPlan, Placement, Rejection, accepted, is_routed, operator_conditions, rejected,
};

/// Name of this controller in metrics and logs.
pub const CONTROLLER: &str = "backup";
/// The incremental base does not exist (or is being deleted).
pub const REASON_UNKNOWN_BASE: &str = "UnknownIncrementalBase";
/// The incremental base belongs to another VM.
pub const REASON_BASE_OF_OTHER_VM: &str = "IncrementalBaseOfOtherVM";
/// The checkpoint to create exists and was not created by this backup.
pub const REASON_CHECKPOINT_EXISTS: &str = "CheckpointExists";
/// How often a backup rejected for its base is validated again.
pub const REVALIDATE_AFTER: Duration = Duration::from_secs(60);

/// Decision of [`validate_backup`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Route to the agent of this node.
    Route {
        /// Node the VM runs on.
        node: String,
    },
    /// The spec cannot work as things are.
    Reject(Rejection),
    /// The VM exists but no agent reported its node yet.
    WaitForNode,
}

/// Step 4: whether the backup can be routed.
///
/// `base` is the checkpoint named by `spec.incremental`, `existing` the one
/// named by `spec.checkpoint.name`, both from the same namespace.
pub fn validate_backup(
    backup: &VirtualMachineBackup,
    placement: Placement,
    base: Option<&VirtualMachineCheckpoint>,
    existing: Option<&VirtualMachineCheckpoint>,
) -> Verdict {
    let vm = &backup.spec.virtual_machine;
    let ns = backup.namespace().unwrap_or_default();
    let node = match placement {
        Placement::Missing => return Verdict::Reject(Rejection::vm_not_found(vm, &ns)),
        Placement::Unplaced => return Verdict::WaitForNode,
        Placement::Node(node) => node,
    };
    if let Some(base_name) = &backup.spec.incremental {
        match base {
            None => {
                return Verdict::Reject(Rejection {
                    reason: REASON_UNKNOWN_BASE,
                    message: format!(
                        "incremental base VirtualMachineCheckpoint {base_name:?} does not exist in namespace {ns:?}: create it, or drop spec.incremental for a full backup"
                    ),
                });
            }
            Some(b) if b.meta().deletion_timestamp.is_some() => {
                return Verdict::Reject(Rejection {
                    reason: REASON_UNKNOWN_BASE,
                    message: format!(
                        "incremental base VirtualMachineCheckpoint {base_name:?} is being deleted: base the backup on another checkpoint of VM {vm:?}"
                    ),
                });
            }
            Some(b) if b.spec.virtual_machine != *vm => {
                return Verdict::Reject(Rejection {
                    reason: REASON_BASE_OF_OTHER_VM,
                    message: format!(
                        "incremental base VirtualMachineCheckpoint {base_name:?} belongs to VM {:?}, not {vm:?}: choose a checkpoint of {vm:?}",
                        b.spec.virtual_machine
                    ),
                });
            }
            Some(_) => {}
        }
    }
    if let (Some(wanted), Some(existing)) = (&backup.spec.checkpoint, existing)
        && !created_by(existing, backup)
    {
        return Verdict::Reject(Rejection {
            reason: REASON_CHECKPOINT_EXISTS,
            message: format!(
                "VirtualMachineCheckpoint {:?} already exists and was not created by this backup: choose another spec.checkpoint.name",
                wanted.name
            ),
        });
    }
    Verdict::Route { node }
}

/// A repository target's check ([`crate::repository::check_target`]) with
/// the repository and the namespace's labels read from the API server (only
/// for backups into a repository, once, before routing).
async fn check_repository(
    ctx: &Context,
    namespace: &str,
    backup: &VirtualMachineBackup,
) -> Result<Option<Rejection>> {
    match backup
        .spec
        .target
        .as_ref()
        .and_then(|t| t.repository.as_ref())
    {
        Some(r) => check_repository_use(ctx, namespace, &r.name).await,
        None => Ok(None),
    }
}

/// [`crate::repository::check_use`] with the repository `name` and the
/// labels of `namespace` read from the API server.
pub async fn check_repository_use(
    ctx: &Context,
    namespace: &str,
    name: &str,
) -> Result<Option<Rejection>> {
    let repos: kube::Api<cairn_api::BackupRepository> = kube::Api::all(ctx.client.clone());
    let repo = repos
        .get_opt(name)
        .await
        .map_err(Error::kube(format!("reading BackupRepository {name}")))?;
    let namespaces: kube::Api<k8s_openapi::api::core::v1::Namespace> =
        kube::Api::all(ctx.client.clone());
    let labels = namespaces
        .get_opt(namespace)
        .await
        .map_err(Error::kube(format!("reading namespace {namespace}")))?
        .map(|n| n.labels().clone())
        .unwrap_or_default();
    Ok(crate::repository::check_use(
        name,
        namespace,
        repo.as_ref(),
        &labels,
    ))
}

/// Whether `checkpoint` was created by `backup`.
pub fn created_by(checkpoint: &VirtualMachineCheckpoint, backup: &VirtualMachineBackup) -> bool {
    checkpoint.labels().get(CREATED_BY_BACKUP_LABEL) == Some(&backup.name_any())
        && checkpoint
            .annotations()
            .get(CREATED_BY_BACKUP_UID_ANNOTATION)
            == backup.uid().as_ref()
        && checkpoint.spec.virtual_machine == backup.spec.virtual_machine
}

/// The checkpoint a backup with `checkpoint: {name}` creates: routed to `node`,
/// with the checkpoint finalizer and no ownerReference (it outlives the backup).
/// Its disks follow the backup's disk selection when one is given.
pub fn checkpoint_for_backup(
    backup: &VirtualMachineBackup,
    node: &str,
) -> Option<VirtualMachineCheckpoint> {
    let wanted = backup.spec.checkpoint.as_ref()?;
    let disks = backup.spec.disks.as_ref().map(|disks| {
        disks
            .iter()
            .map(|d| CheckpointDisk {
                name: d.name.clone(),
                checkpoint: Some(if d.selected() {
                    CheckpointMode::Bitmap
                } else {
                    CheckpointMode::None
                }),
                bitmap: None,
            })
            .collect()
    });
    let mut labels: BTreeMap<String, String> = [
        (NODE_LABEL, node),
        (VM_LABEL, backup.spec.virtual_machine.as_str()),
        (CREATED_BY_BACKUP_LABEL, backup.name_any().as_str()),
        ("app.kubernetes.io/part-of", "cairn"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    // A schedule's run: the schedule finds (and deletes) the checkpoints it no longer needs.
    if let Some(schedule) = backup.labels().get(SCHEDULE_LABEL) {
        labels.insert(SCHEDULE_LABEL.to_string(), schedule.clone());
    }
    Some(VirtualMachineCheckpoint {
        metadata: ObjectMeta {
            name: Some(wanted.name.clone()),
            namespace: backup.namespace(),
            labels: Some(labels),
            annotations: backup
                .uid()
                .map(|uid| BTreeMap::from([(CREATED_BY_BACKUP_UID_ANNOTATION.to_string(), uid)])),
            finalizers: Some(vec![CHECKPOINT_FINALIZER.to_string()]),
            ..Default::default()
        },
        spec: VirtualMachineCheckpointSpec {
            virtual_machine: backup.spec.virtual_machine.clone(),
            disks,
            description: Some(format!(
                "created by VirtualMachineBackup {} at the moment it started",
                backup.name_any()
            )),
            ..Default::default()
        },
        status: None,
    })
}

/// What the TTL of a backup asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TtlDecision {
    /// No TTL, or the backup is not finished.
    NotApplicable,
    /// Delete it now.
    Expired,
    /// Look again after this long.
    WaitFor(Duration),
}

/// Step 3: when a finished backup with `ttlSecondsAfterFinished` is due for
/// deletion. It finished at `completionTime`, else when its `Ready` or
/// `Failed` condition last transitioned, else at its creation.
pub fn ttl_decision(backup: &VirtualMachineBackup, now: Timestamp) -> TtlDecision {
    let (Some(ttl), Some(status)) = (backup.spec.ttl_seconds_after_finished, &backup.status) else {
        return TtlDecision::NotApplicable;
    };
    if !status.phase.is_some_and(BackupPhase::is_finished) {
        return TtlDecision::NotApplicable;
    }
    let finished = status
        .completion_time
        .as_ref()
        .map(|t| t.0)
        .or_else(|| {
            [condition_types::READY, condition_types::FAILED]
                .iter()
                .filter_map(|t| conditions::find(&status.conditions, t))
                .map(|c| c.last_transition_time.0)
                .max()
        })
        .or_else(|| backup.meta().creation_timestamp.as_ref().map(|t| t.0));
    let Some(finished) = finished else {
        return TtlDecision::Expired;
    };
    let remaining_ms = finished.as_millisecond() + ttl * 1000 - now.as_millisecond();
    if remaining_ms <= 0 {
        TtlDecision::Expired
    } else {
        TtlDecision::WaitFor(Duration::from_millis(remaining_ms as u64))
    }
}

/// The writes a reconcile should make.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    /// Metadata merge patch (labels, finalizer).
    pub metadata: Option<serde_json::Value>,
    /// The operator's status fields, when they differ from what is there.
    pub status: Option<VirtualMachineBackupStatus>,
    /// Checkpoint to create before routing.
    pub checkpoint: Option<VirtualMachineCheckpoint>,
    /// Event to publish: type, reason, note.
    pub event: Option<(EventType, &'static str, String)>,
    /// When to look again.
    pub requeue: Option<Duration>,
}

/// Whether the operator may (still) write the phase.
fn operator_may_set_phase(status: Option<&VirtualMachineBackupStatus>) -> bool {
    match status.and_then(|s| s.phase) {
        None | Some(BackupPhase::Pending) => true,
        Some(BackupPhase::Failed) => routing::rejected_by_operator(
            status.map(|s| s.conditions.as_slice()).unwrap_or_default(),
        ),
        Some(
            BackupPhase::Running
            | BackupPhase::Exporting
            | BackupPhase::Succeeded
            | BackupPhase::Cancelled,
        ) => false,
    }
}

/// Step 5: the writes that bring an unaccepted backup where `verdict` says.
pub fn plan_backup(backup: &VirtualMachineBackup, verdict: &Verdict, now: Timestamp) -> Plan {
    let status = backup.status.as_ref();
    let existing = status.map(|s| s.conditions.as_slice()).unwrap_or_default();
    let generation = backup.meta().generation;
    let vm = &backup.spec.virtual_machine;
    let may_set_phase = operator_may_set_phase(status);
    match verdict {
        Verdict::Route { node } => {
            let (conds, conds_changed) =
                operator_conditions(existing, vec![accepted(node, vm)], generation, now);
            let phase = may_set_phase.then_some(BackupPhase::Pending);
            let mut desired = VirtualMachineBackupStatus {
                phase,
                conditions: conds,
                node_name: Some(node.clone()),
                ..Default::default()
            };
            let lifecycle_changed = phase.is_some()
                && routing::with_lifecycle(
                    &mut desired,
                    existing,
                    status.and_then(|s| s.observed_generation),
                    generation,
                    now,
                );
            let changed = conds_changed
                || lifecycle_changed
                || (phase.is_some() && status.and_then(|s| s.phase) != phase)
                || status.and_then(|s| s.node_name.as_deref()) != Some(node.as_str());
            Plan {
                metadata: routing::routing_metadata(backup, node, vm, BACKUP_FINALIZER),
                status: changed.then_some(desired),
                checkpoint: checkpoint_for_backup(backup, node),
                // Unlike a checkpoint, a backup is an action a person started and
                // follows in `kubectl describe`; backups come one at a time, not in
                // bursts of thousands, so each keeps its `Routed` event.
                event: Some((
                    EventType::Normal,
                    routing::REASON_ROUTED,
                    format!("routed to node {node} where VM {vm} runs"),
                )),
                requeue: None,
            }
        }
        Verdict::Reject(r) => {
            let (conds, conds_changed) =
                operator_conditions(existing, rejected(r), generation, now);
            let phase = may_set_phase.then_some(BackupPhase::Failed);
            let mut desired = VirtualMachineBackupStatus {
                phase,
                conditions: conds,
                failure_reason: Some(r.reason.to_string()),
                ..Default::default()
            };
            let lifecycle_changed = phase.is_some()
                && routing::with_lifecycle(
                    &mut desired,
                    existing,
                    status.and_then(|s| s.observed_generation),
                    generation,
                    now,
                );
            let changed = conds_changed
                || lifecycle_changed
                || (phase.is_some() && status.and_then(|s| s.phase) != phase);
            Plan {
                status: changed.then_some(desired),
                event: changed.then(|| (EventType::Warning, r.reason, r.message.clone())),
                // A missing VM is noticed through the QemuInstance watch (and
                // re-checked rarely); a missing base is polled.
                requeue: Some(if r.reason == routing::REASON_VM_NOT_FOUND {
                    routing::RECHECK_MISSING_VM
                } else {
                    REVALIDATE_AFTER
                }),
                ..Default::default()
            }
        }
        // Say `Pending` (kstatus InProgress) while waiting, not nothing: a
        // status-less object is Current to kstatus.
        Verdict::WaitForNode => {
            let phase = may_set_phase.then_some(BackupPhase::Pending);
            let (conds, _) = operator_conditions(existing, Vec::new(), generation, now);
            let mut desired = VirtualMachineBackupStatus {
                phase,
                conditions: conds,
                ..Default::default()
            };
            let lifecycle_changed = phase.is_some()
                && routing::with_lifecycle(
                    &mut desired,
                    existing,
                    status.and_then(|s| s.observed_generation),
                    generation,
                    now,
                );
            let changed =
                lifecycle_changed || (phase.is_some() && status.and_then(|s| s.phase) != phase);
            Plan {
                status: changed.then_some(desired),
                requeue: Some(Duration::from_secs(10)),
                ..Default::default()
            }
        }
    }
}

/// The reconcile: runs the steps above.
pub async fn reconcile(backup: Arc<VirtualMachineBackup>, ctx: Arc<Context>) -> Result<Action> {
    let namespace = routing::namespace_of(backup.as_ref())?;
    let name = backup.name_any();
    let span =
        tracing::info_span!("reconcile", controller = CONTROLLER, %namespace, backup = %name);
    let _enter = span.enter();
    ctx.health.metrics.reconciled(CONTROLLER);
    let api = ctx.api::<VirtualMachineBackup>(&namespace);

    // 1. resolve
    let vm = routing::find_vm(&ctx, &namespace, &backup.spec.virtual_machine);
    let checkpoint_named = |n: &str| ctx.checkpoints.get(&ObjectRef::new(n).within(&namespace));

    // 2. deletion
    if routing::deleting(backup.as_ref()) {
        let has_finalizer = backup.finalizers().iter().any(|f| f == BACKUP_FINALIZER);
        let cleaned = backup
            .status
            .as_ref()
            .is_some_and(|s| conditions::is_true(&s.conditions, routing::CLEANED_UP));
        return match routing::plan_deletion(
            has_finalizer,
            cleaned,
            is_routed(backup.as_ref()),
            vm.is_some(),
        ) {
            DeletionPlan::Nothing => Ok(Action::await_change()),
            DeletionPlan::WaitForAgent => Ok(Action::requeue(Duration::from_secs(30))),
            DeletionPlan::RemoveFinalizer(reason) => {
                delete_repository_snapshot(&ctx, backup.as_ref()).await?;
                if nbd_tls::wanted(&backup) {
                    nbd_tls::remove(&ctx, backup.as_ref()).await?;
                }
                routing::remove_finalizer(&api, backup.as_ref(), BACKUP_FINALIZER).await?;
                tracing::info!(?reason, "finalizer removed");
                routing::publish(
                    &ctx,
                    backup.as_ref(),
                    EventType::Normal,
                    "Deleted",
                    reason.message().into(),
                )
                .await;
                Ok(Action::await_change())
            }
        };
    }

    // 3. ttl
    let ttl = ttl_decision(&backup, Timestamp::now());
    match ttl {
        TtlDecision::Expired => {
            let ttl_secs = backup.spec.ttl_seconds_after_finished.unwrap_or_default();
            routing::publish(
                &ctx,
                backup.as_ref(),
                EventType::Normal,
                "Expired",
                format!("finished more than ttlSecondsAfterFinished={ttl_secs}s ago; deleting the backup (its files stay)"),
            )
            .await;
            let dp = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: backup.uid(),
                    resource_version: None,
                }),
                ..Default::default()
            };
            match api.delete(&name, &dp).await {
                Ok(_) => tracing::info!("expired backup deleted"),
                Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
                Err(e) => return Err(Error::kube("deleting an expired backup")(e)),
            }
            return Ok(Action::await_change());
        }
        TtlDecision::WaitFor(_) | TtlDecision::NotApplicable => {}
    }
    let ttl_requeue = match ttl {
        TtlDecision::WaitFor(d) => Some(d + Duration::from_millis(200)),
        _ => None,
    };

    // A finished TCP export's credentials are useless: they go now, not with the backup.
    let finished = backup
        .status
        .as_ref()
        .and_then(|s| s.phase)
        .is_some_and(BackupPhase::is_finished);
    if finished && nbd_tls::wanted(&backup) {
        nbd_tls::remove(&ctx, backup.as_ref()).await?;
    }
    // A backup the operator rejected may still be routed once its input is fixed.
    let finished_by_agent = finished
        && !routing::rejected_by_operator(
            backup
                .status
                .as_ref()
                .map(|s| s.conditions.as_slice())
                .unwrap_or_default(),
        );

    // Accepted backups belong to the agent; only the TTL is still the operator's.
    let conds = backup
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    if conditions::is_true(conds, routing::ACCEPTED) && is_routed(backup.as_ref()) {
        return Ok(ttl_requeue.map_or_else(Action::await_change, Action::requeue));
    }

    // 4. validate
    let base = backup
        .spec
        .incremental
        .as_deref()
        .and_then(checkpoint_named);
    let existing = backup
        .spec
        .checkpoint
        .as_ref()
        .and_then(|c| checkpoint_named(&c.name));
    let mut verdict = validate_backup(
        &backup,
        routing::placement(vm.as_deref()),
        base.as_deref(),
        existing.as_deref(),
    );
    if matches!(verdict, Verdict::Route { .. })
        && let Some(rejection) = check_repository(&ctx, &namespace, &backup).await?
    {
        verdict = Verdict::Reject(rejection);
    }
    // The export's TLS credentials exist before the agent may start it.
    if matches!(verdict, Verdict::Route { .. })
        && nbd_tls::wanted(&backup)
        && !finished_by_agent
        && let nbd_tls::Issued::Conflict(rejection) = nbd_tls::ensure(&ctx, &backup).await?
    {
        verdict = Verdict::Reject(rejection);
    }

    // 5. plan
    let mut plan = plan_backup(&backup, &verdict, Timestamp::now());

    // 6. apply: the checkpoint first, so the agent finds it when it starts the backup.
    if let Some(checkpoint) = plan.checkpoint.take() {
        match create_checkpoint(&ctx, &namespace, &backup, &checkpoint).await? {
            Created::New => {
                routing::publish(
                    &ctx,
                    backup.as_ref(),
                    EventType::Normal,
                    "CheckpointCreated",
                    format!("created VirtualMachineCheckpoint {}", checkpoint.name_any()),
                )
                .await;
            }
            Created::AlreadyOurs => {}
            Created::Foreign => {
                verdict = Verdict::Reject(Rejection {
                    reason: REASON_CHECKPOINT_EXISTS,
                    message: format!(
                        "VirtualMachineCheckpoint {:?} already exists and was not created by this backup: choose another spec.checkpoint.name",
                        checkpoint.name_any()
                    ),
                });
                plan = plan_backup(&backup, &verdict, Timestamp::now());
                plan.checkpoint = None;
            }
        }
    }
    let mut version = None;
    if let Some(status) = &plan.status {
        version = routing::apply_status(&api, &name, backup.resource_version(), status).await?;
        tracing::info!(phase = ?status.phase, node = ?status.node_name, "status written");
    }
    let routing_in_flight =
        routing::write_routing(&ctx, &api, backup.as_ref(), plan.metadata.as_ref(), version)
            .await?;

    // 7. report
    if let Some((type_, reason, note)) = plan.event {
        routing::publish(&ctx, backup.as_ref(), type_, reason, note).await;
    }
    let recheck = routing_in_flight.then_some(routing::RECHECK_ROUTING);
    let requeue = [plan.requeue, ttl_requeue, recheck]
        .into_iter()
        .flatten()
        .min();
    Ok(requeue.map_or_else(Action::await_change, Action::requeue))
}

/// `deletionPolicy: Delete`: the backup's repository snapshot goes before
/// its finalizer. A repository that cannot be reached keeps the finalizer
/// (the error retries with backoff); an already missing snapshot is fine.
async fn delete_repository_snapshot(ctx: &Context, backup: &VirtualMachineBackup) -> Result<()> {
    use crate::repository_controller::{SnapshotDeletion, delete_backup_snapshot};
    match delete_backup_snapshot(ctx, backup).await {
        Ok(SnapshotDeletion::NotApplicable) => {}
        Ok(SnapshotDeletion::Deleted(id)) => {
            tracing::info!(snapshot = %id, "repository snapshot deleted");
            routing::publish(
                ctx,
                backup,
                EventType::Normal,
                "SnapshotDeleted",
                format!("deletionPolicy Delete: deleted repository snapshot {id}"),
            )
            .await;
        }
        Ok(SnapshotDeletion::Kept(why)) => {
            tracing::warn!(%why, "repository snapshot kept");
            routing::publish(ctx, backup, EventType::Warning, "SnapshotKept", why).await;
        }
        Err(error) => {
            routing::publish(
                ctx,
                backup,
                EventType::Warning,
                "SnapshotDeletionFailed",
                format!("{error}; retrying (the backup stays until its snapshot is deleted)"),
            )
            .await;
            return Err(error);
        }
    }
    Ok(())
}

enum Created {
    New,
    AlreadyOurs,
    Foreign,
}

/// Creates the backup's checkpoint; idempotent across retries.
async fn create_checkpoint(
    ctx: &Context,
    namespace: &str,
    backup: &VirtualMachineBackup,
    checkpoint: &VirtualMachineCheckpoint,
) -> Result<Created> {
    let api = ctx.api::<VirtualMachineCheckpoint>(namespace);
    match api
        .create(&crate::routing::create_params(), checkpoint)
        .await
    {
        Ok(_) => Ok(Created::New),
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let current = api
                .get(&checkpoint.name_any())
                .await
                .map_err(Error::kube("reading the backup's checkpoint"))?;
            Ok(if created_by(&current, backup) {
                Created::AlreadyOurs
            } else {
                Created::Foreign
            })
        }
        Err(e) => Err(Error::kube("creating the backup's checkpoint")(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_api::{BackupCheckpoint, BackupDisk, VirtualMachineBackupSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    const T: Timestamp = Timestamp::UNIX_EPOCH;

    fn backup(spec: VirtualMachineBackupSpec) -> VirtualMachineBackup {
        let mut b = VirtualMachineBackup::new("b1", spec);
        b.metadata.namespace = Some("ns".into());
        b.metadata.uid = Some("uid-b1".into());
        b
    }

    fn spec() -> VirtualMachineBackupSpec {
        VirtualMachineBackupSpec {
            virtual_machine: "vm1".into(),
            ..Default::default()
        }
    }

    fn checkpoint(name: &str, vm: &str) -> VirtualMachineCheckpoint {
        let mut c = VirtualMachineCheckpoint::new(
            name,
            VirtualMachineCheckpointSpec {
                virtual_machine: vm.into(),
                ..Default::default()
            },
        );
        c.metadata.namespace = Some("ns".into());
        c
    }

    fn node() -> Placement {
        Placement::Node("node-1".into())
    }

    fn reason(v: Verdict) -> &'static str {
        match v {
            Verdict::Reject(r) => r.reason,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn incremental_base_must_exist_for_the_same_vm() {
        let b = backup(VirtualMachineBackupSpec {
            incremental: Some("c0".into()),
            ..spec()
        });
        assert_eq!(
            reason(validate_backup(&b, node(), None, None)),
            REASON_UNKNOWN_BASE
        );
        let foreign = checkpoint("c0", "vm2");
        assert_eq!(
            reason(validate_backup(&b, node(), Some(&foreign), None)),
            REASON_BASE_OF_OTHER_VM
        );
        let mut deleting = checkpoint("c0", "vm1");
        deleting.metadata.deletion_timestamp = Some(Time(T));
        assert_eq!(
            reason(validate_backup(&b, node(), Some(&deleting), None)),
            REASON_UNKNOWN_BASE
        );
        // A base that is not Ready is routed anyway: the agent knows the bitmaps.
        let base = checkpoint("c0", "vm1");
        assert_eq!(
            validate_backup(&b, node(), Some(&base), None),
            Verdict::Route {
                node: "node-1".into()
            }
        );
        assert_eq!(
            reason(validate_backup(&b, Placement::Missing, Some(&base), None)),
            "VirtualMachineNotFound"
        );
        assert_eq!(
            validate_backup(&b, Placement::Unplaced, Some(&base), None),
            Verdict::WaitForNode
        );
    }

    #[test]
    fn checkpoint_name_must_be_free_or_ours() {
        let b = backup(VirtualMachineBackupSpec {
            checkpoint: Some(BackupCheckpoint { name: "c1".into() }),
            ..spec()
        });
        let foreign = checkpoint("c1", "vm1");
        assert_eq!(
            reason(validate_backup(&b, node(), None, Some(&foreign))),
            REASON_CHECKPOINT_EXISTS
        );
        let ours = checkpoint_for_backup(&b, "node-1").unwrap();
        assert!(matches!(
            validate_backup(&b, node(), None, Some(&ours)),
            Verdict::Route { .. }
        ));
    }

    #[test]
    fn backup_checkpoint_is_routed_labelled_and_follows_disk_selection() {
        let b = backup(VirtualMachineBackupSpec {
            checkpoint: Some(BackupCheckpoint { name: "c1".into() }),
            disks: Some(vec![
                BackupDisk {
                    name: "vda".into(),
                    backup: None,
                },
                BackupDisk {
                    name: "vdb".into(),
                    backup: Some(false),
                },
            ]),
            ..spec()
        });
        let c = checkpoint_for_backup(&b, "node-1").unwrap();
        assert_eq!(c.labels()[CREATED_BY_BACKUP_LABEL], "b1");
        assert_eq!(
            c.annotations().get(CREATED_BY_BACKUP_UID_ANNOTATION),
            b.metadata.uid.as_ref()
        );
        assert_eq!(c.labels()[NODE_LABEL], "node-1");
        assert_eq!(c.labels()[VM_LABEL], "vm1");
        assert_eq!(c.finalizers(), [CHECKPOINT_FINALIZER.to_string()]);
        assert!(c.owner_references().is_empty());
        let disks = c.spec.disks.unwrap();
        assert_eq!(disks[0].checkpoint, Some(CheckpointMode::Bitmap));
        assert_eq!(disks[1].checkpoint, Some(CheckpointMode::None));
        assert!(checkpoint_for_backup(&backup(spec()), "n").is_none());
    }

    #[test]
    fn plan_routes_and_rejects() {
        let b = backup(spec());
        let plan = plan_backup(
            &b,
            &Verdict::Route {
                node: "node-1".into(),
            },
            T,
        );
        assert_eq!(
            plan.status.as_ref().unwrap().phase,
            Some(BackupPhase::Pending)
        );
        assert!(plan.metadata.is_some());
        let r = Rejection {
            reason: REASON_UNKNOWN_BASE,
            message: "m".into(),
        };
        let plan = plan_backup(&b, &Verdict::Reject(r.clone()), T);
        assert_eq!(
            plan.status.as_ref().unwrap().phase,
            Some(BackupPhase::Failed)
        );
        assert_eq!(plan.requeue, Some(REVALIDATE_AFTER));
        // The agent's phases are never overwritten.
        let mut running = b.clone();
        running.status = Some(VirtualMachineBackupStatus {
            phase: Some(BackupPhase::Running),
            ..Default::default()
        });
        let plan = plan_backup(&running, &Verdict::Reject(r), T);
        assert_eq!(plan.status.unwrap().phase, None);
    }

    #[test]
    fn ttl_counts_from_completion_or_condition_transition() {
        let now: Timestamp = "2026-01-01T00:01:00Z".parse().unwrap();
        let mut b = backup(VirtualMachineBackupSpec {
            ttl_seconds_after_finished: Some(90),
            ..spec()
        });
        assert_eq!(ttl_decision(&b, now), TtlDecision::NotApplicable);
        b.status = Some(VirtualMachineBackupStatus {
            phase: Some(BackupPhase::Running),
            ..Default::default()
        });
        assert_eq!(ttl_decision(&b, now), TtlDecision::NotApplicable);
        let status = b.status.as_mut().unwrap();
        status.phase = Some(BackupPhase::Succeeded);
        status.completion_time = Some(Time("2026-01-01T00:00:00Z".parse().unwrap()));
        assert_eq!(
            ttl_decision(&b, now),
            TtlDecision::WaitFor(Duration::from_secs(30))
        );
        let later: Timestamp = "2026-01-01T00:01:30Z".parse().unwrap();
        assert_eq!(ttl_decision(&b, later), TtlDecision::Expired);
        // Without completionTime: the Ready condition's transition.
        let status = b.status.as_mut().unwrap();
        status.completion_time = None;
        status.phase = Some(BackupPhase::Failed);
        status.conditions = vec![Condition {
            type_: "Ready".into(),
            status: "False".into(),
            reason: "X".into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: Time("2026-01-01T00:00:50Z".parse().unwrap()),
        }];
        assert_eq!(
            ttl_decision(&b, now),
            TtlDecision::WaitFor(Duration::from_secs(80))
        );
        b.spec.ttl_seconds_after_finished = None;
        assert_eq!(ttl_decision(&b, now), TtlDecision::NotApplicable);
    }
}
