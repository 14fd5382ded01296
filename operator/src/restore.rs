//! The VirtualMachineRestore controller.
//!
//! ```text
//! reconcile(restore)
//!   1. deletion  plan_deletion: remove the finalizer once the agent stopped the work and
//!                removed partial output (CleanedUp), or at once when nothing runs
//!   2. routed    an accepted, routed restore belongs to the agent
//!   3. resolve   resolve_source: the backup (same namespace, Succeeded, push) or the
//!                repository snapshot; the repository must allow the namespace
//!   4. node      where the chain files are; for repositories spec.nodeName, the node
//!                that wrote the snapshot, or a node running this namespace's VMs
//!   5. apply     status (Accepted, nodeName, the resolved source), then labels + finalizer
//! ```
//!
//! The operator never reads backup data: whether a snapshot exists and was
//! taken of this namespace is checked by the agent when it opens it.

use std::sync::Arc;
use std::time::Duration;

use cairn_api::conditions::NewCondition;
use cairn_api::{
    BackupMode, BackupPhase, NODE_LABEL, RESTORE_FINALIZER, ResolvedRestoreSource, RestoreMode,
    RestorePhase, VirtualMachineBackup, VirtualMachineRestore, VirtualMachineRestoreStatus,
    conditions,
};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::context::Context;
use crate::error::Result;
use crate::routing::{self, DeletionPlan, Rejection, operator_conditions, rejected};

/// Name of this controller in metrics and logs.
pub const CONTROLLER: &str = "restore";
/// The source backup does not exist in the namespace.
pub const REASON_BACKUP_NOT_FOUND: &str = "BackupNotFound";
/// The source backup failed or was cancelled.
pub const REASON_BACKUP_NOT_SUCCEEDED: &str = "BackupNotSucceeded";
/// The source backup holds nothing to restore from (a pull export).
pub const REASON_BACKUP_NOT_RESTORABLE: &str = "BackupNotRestorable";
/// Instant recovery needs a repository snapshot.
pub const REASON_INSTANT_NEEDS_REPOSITORY: &str = "InstantNeedsRepository";
/// A chain restore was asked to run away from its files.
pub const REASON_NODE_MISMATCH: &str = "NodeMismatch";
/// How often a restore waiting for its backup (or rejected) looks again.
pub const RECHECK: Duration = Duration::from_secs(10);

/// What the source resolves to.
#[derive(Clone, Debug, PartialEq)]
pub enum Resolution {
    /// Route to `node` with this source.
    Route {
        /// Node to run on (`None`: no node known yet).
        node: Option<String>,
        /// The resolved source.
        source: ResolvedRestoreSource,
        /// The VM the backup was of, when known (for the VM label).
        vm: Option<String>,
        /// Repository whose namespace rules still have to be checked.
        repository: Option<String>,
    },
    /// The source backup is still running.
    WaitForBackup(String),
    /// The spec cannot work.
    Reject(Rejection),
}

/// Step 3–4 for a backup source (pure): `backup` is the named backup of the
/// restore's namespace, from the cache.
pub fn resolve_backup(
    restore: &VirtualMachineRestore,
    name: &str,
    backup: Option<&VirtualMachineBackup>,
) -> Resolution {
    let ns = restore.namespace().unwrap_or_default();
    let Some(backup) = backup.filter(|b| b.meta().deletion_timestamp.is_none()) else {
        return Resolution::Reject(Rejection {
            reason: REASON_BACKUP_NOT_FOUND,
            message: format!(
                "VirtualMachineBackup {name:?} does not exist in namespace {ns:?}: name a backup of this namespace (the restore starts once it exists)"
            ),
        });
    };
    let status = backup.status.clone().unwrap_or_default();
    let phase = status.phase.unwrap_or_default();
    if backup.spec.mode == BackupMode::Pull {
        return Resolution::Reject(Rejection {
            reason: REASON_BACKUP_NOT_RESTORABLE,
            message: format!(
                "VirtualMachineBackup {name:?} is a pull export: it stored nothing Cairn can restore; restore from a push backup or a repository snapshot"
            ),
        });
    }
    match phase {
        BackupPhase::Succeeded => {}
        BackupPhase::Failed | BackupPhase::Cancelled => {
            return Resolution::Reject(Rejection {
                reason: REASON_BACKUP_NOT_SUCCEEDED,
                message: format!(
                    "VirtualMachineBackup {name:?} is {}: it holds no complete backup to restore",
                    phase.as_str()
                ),
            });
        }
        BackupPhase::Pending | BackupPhase::Running | BackupPhase::Exporting => {
            return Resolution::WaitForBackup(format!(
                "waiting for VirtualMachineBackup {name:?} to succeed (it is {})",
                phase.as_str()
            ));
        }
    }
    let target = backup.spec.target.clone().unwrap_or_default();
    let uid = backup.uid();
    let vm = Some(backup.spec.virtual_machine.clone());
    if let Some(repo) = &target.repository {
        let snapshot = status.repository.as_ref().and_then(|r| r.snapshot.clone());
        return Resolution::Route {
            node: restore.spec.node_name.clone().or(status.node_name),
            source: ResolvedRestoreSource {
                backup_uid: uid,
                repository: Some(repo.name.clone()),
                snapshot,
                ..Default::default()
            },
            vm,
            repository: Some(repo.name.clone()),
        };
    }
    if restore.spec.mode == RestoreMode::Instant {
        return Resolution::Reject(Rejection {
            reason: REASON_INSTANT_NEEDS_REPOSITORY,
            message: format!(
                "mode Instant serves a repository snapshot, and VirtualMachineBackup {name:?} is a qcow2 chain: use mode Copy, or back up into a BackupRepository"
            ),
        });
    }
    let Some(dir) = target.directory else {
        return Resolution::Reject(Rejection {
            reason: REASON_BACKUP_NOT_RESTORABLE,
            message: format!("VirtualMachineBackup {name:?} has no target to restore from"),
        });
    };
    let files_on = status.node_name;
    if let (Some(want), Some(have)) = (&restore.spec.node_name, &files_on)
        && want != have
    {
        return Resolution::Reject(Rejection {
            reason: REASON_NODE_MISMATCH,
            message: format!(
                "the files of VirtualMachineBackup {name:?} are on node {have:?}, not {want:?}: a qcow2-chain restore runs where its files are (drop spec.nodeName)"
            ),
        });
    }
    Resolution::Route {
        node: files_on,
        source: ResolvedRestoreSource {
            backup_uid: uid,
            directory: Some(dir.path),
            ..Default::default()
        },
        vm,
        repository: None,
    }
}

/// Step 4 for a repository source: the given node, else a node that runs a
/// VM of the namespace, else any node with an agent (one that reported a VM).
fn pick_node(ctx: &Context, restore: &VirtualMachineRestore, namespace: &str) -> Option<String> {
    if let Some(n) = &restore.spec.node_name {
        return Some(n.clone());
    }
    let nodes: Vec<(bool, String)> = ctx
        .vms
        .state()
        .iter()
        .filter_map(|vm| {
            let node = vm.status.as_ref()?.node_name.clone()?;
            Some((vm.namespace().as_deref() == Some(namespace), node))
        })
        .collect();
    let mut own: Vec<&String> = nodes.iter().filter(|(o, _)| *o).map(|(_, n)| n).collect();
    let mut any: Vec<&String> = nodes.iter().map(|(_, n)| n).collect();
    own.sort();
    any.sort();
    own.first().or(any.first()).map(|n| n.to_string())
}

/// The reconcile.
pub async fn reconcile(restore: Arc<VirtualMachineRestore>, ctx: Arc<Context>) -> Result<Action> {
    let namespace = routing::namespace_of(restore.as_ref())?;
    let name = restore.name_any();
    let span =
        tracing::info_span!("reconcile", controller = CONTROLLER, %namespace, restore = %name);
    let _enter = span.enter();
    ctx.health.metrics.reconciled(CONTROLLER);
    let api = ctx.api::<VirtualMachineRestore>(&namespace);
    let status = restore.status.clone().unwrap_or_default();
    let routed = routing::is_routed(restore.as_ref());

    // 1. deletion
    if routing::deleting(restore.as_ref()) {
        let has_finalizer = restore.finalizers().iter().any(|f| f == RESTORE_FINALIZER);
        let cleaned = conditions::is_true(&status.conditions, routing::CLEANED_UP);
        let agent_has_work = !status.phase.unwrap_or_default().is_finished();
        return match routing::plan_deletion(has_finalizer, cleaned, routed, agent_has_work) {
            DeletionPlan::Nothing => Ok(Action::await_change()),
            DeletionPlan::WaitForAgent => Ok(Action::requeue(Duration::from_secs(30))),
            DeletionPlan::RemoveFinalizer(_) => {
                routing::remove_finalizer(&api, restore.as_ref(), RESTORE_FINALIZER).await?;
                Ok(Action::await_change())
            }
        };
    }

    // 2. routed restores belong to the agent
    if conditions::is_true(&status.conditions, routing::ACCEPTED) && routed {
        return Ok(Action::await_change());
    }
    if status.phase.is_some_and(|p| p.is_finished())
        && !routing::rejected_by_operator(&status.conditions)
    {
        return Ok(Action::await_change());
    }

    // 3–4. resolve
    let mut resolution = match (&restore.spec.source.backup, &restore.spec.source.repository) {
        (Some(b), _) => {
            let backup = ctx.backups.get(&ObjectRef::new(&b.name).within(&namespace));
            resolve_backup(&restore, &b.name, backup.as_deref())
        }
        (None, Some(r)) => Resolution::Route {
            node: pick_node(&ctx, &restore, &namespace),
            source: ResolvedRestoreSource {
                repository: Some(r.name.clone()),
                snapshot: Some(r.snapshot.clone()),
                ..Default::default()
            },
            vm: None,
            repository: Some(r.name.clone()),
        },
        (None, None) => Resolution::Reject(Rejection {
            reason: "InvalidSource",
            message: "spec.source names neither a backup nor a repository".into(),
        }),
    };
    if let Resolution::Route {
        repository: Some(repo),
        ..
    } = &resolution
        && let Some(r) = crate::backup::check_repository_use(&ctx, &namespace, repo).await?
    {
        resolution = Resolution::Reject(r);
    }
    if let Resolution::Route { node: None, .. } = &resolution {
        resolution = Resolution::WaitForBackup(
            "no node with a Cairn agent is known yet (no QemuInstance reports a node); the restore is routed once one does".into(),
        );
    }

    // 5. apply
    let now = Timestamp::now();
    let generation = restore.meta().generation;
    let (wanted, phase, node, source, failure): (Vec<NewCondition<'_>>, _, _, _, _) =
        match &resolution {
            Resolution::Route { node, source, .. } => {
                let node = node.clone().unwrap_or_default();
                (
                    vec![NewCondition {
                        type_: routing::ACCEPTED,
                        status: true,
                        reason: routing::REASON_ROUTED,
                        message: format!("routed to the agent on node {node:?}"),
                    }],
                    RestorePhase::Pending,
                    Some(node),
                    Some(source.clone()),
                    None,
                )
            }
            Resolution::WaitForBackup(why) => (
                vec![NewCondition {
                    type_: routing::ACCEPTED,
                    status: false,
                    reason: "Waiting",
                    message: why.clone(),
                }],
                RestorePhase::Pending,
                None,
                None,
                None,
            ),
            Resolution::Reject(r) => (
                rejected(r),
                RestorePhase::Failed,
                None,
                None,
                Some(r.reason.to_string()),
            ),
        };
    let (conds, conds_changed) = operator_conditions(&status.conditions, wanted, generation, now);
    let mut desired = VirtualMachineRestoreStatus {
        phase: Some(phase),
        conditions: conds,
        node_name: node.clone(),
        source,
        failure_reason: failure,
        ..Default::default()
    };
    let lifecycle_changed = routing::with_lifecycle(
        &mut desired,
        &status.conditions,
        status.observed_generation,
        generation,
        now,
    );
    let changed = conds_changed
        || lifecycle_changed
        || status.phase != desired.phase
        || status.node_name != desired.node_name
        || status.source != desired.source;
    let mut version = None;
    if changed {
        version = routing::apply_status(&api, &name, restore.resource_version(), &desired).await?;
    }
    match resolution {
        Resolution::Route { node, vm, .. } => {
            let node = node.unwrap_or_default();
            let mut finalizers = restore.finalizers().to_vec();
            if !finalizers.iter().any(|f| f == RESTORE_FINALIZER) {
                finalizers.push(RESTORE_FINALIZER.to_string());
            }
            let mut labels = serde_json::Map::new();
            labels.insert(NODE_LABEL.into(), json!(node));
            if let Some(vm) = vm {
                labels.insert(cairn_api::VM_LABEL.into(), json!(vm));
            }
            let patch = json!({"metadata": {
                "resourceVersion": restore.resource_version(),
                "labels": labels,
                "finalizers": finalizers,
            }});
            routing::patch_metadata(&api, restore.as_ref(), &patch, version).await?;
            routing::publish(
                &ctx,
                restore.as_ref(),
                EventType::Normal,
                "Routed",
                format!("routed to node {node}"),
            )
            .await;
            Ok(Action::await_change())
        }
        Resolution::WaitForBackup(_) => Ok(Action::requeue(RECHECK)),
        Resolution::Reject(r) => {
            if changed {
                routing::publish(
                    &ctx,
                    restore.as_ref(),
                    EventType::Warning,
                    r.reason,
                    r.message,
                )
                .await;
            }
            // A backup or repository applied later (GitOps order) still lets it start.
            Ok(Action::requeue(Duration::from_secs(60)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_api::{
        BackupTarget, DirectoryTarget, RepositorySnapshotStatus, RepositoryTarget,
        RestoreBackupSource, RestoreSource, VirtualMachineBackupSpec, VirtualMachineBackupStatus,
        VirtualMachineRestoreSpec,
    };

    fn restore(node: Option<&str>, mode: RestoreMode) -> VirtualMachineRestore {
        let mut r = VirtualMachineRestore::new(
            "r",
            VirtualMachineRestoreSpec {
                source: RestoreSource {
                    backup: Some(RestoreBackupSource { name: "b".into() }),
                    repository: None,
                },
                mode,
                node_name: node.map(Into::into),
                ..Default::default()
            },
        );
        r.metadata.namespace = Some("ns".into());
        r
    }

    fn backup(phase: BackupPhase, target: BackupTarget) -> VirtualMachineBackup {
        let mut b = VirtualMachineBackup::new(
            "b",
            VirtualMachineBackupSpec {
                virtual_machine: "vm".into(),
                target: Some(target),
                ..Default::default()
            },
        );
        b.metadata.namespace = Some("ns".into());
        b.metadata.uid = Some("uid-1".into());
        b.status = Some(VirtualMachineBackupStatus {
            phase: Some(phase),
            node_name: Some("node-1".into()),
            repository: Some(RepositorySnapshotStatus {
                name: "repo".into(),
                snapshot: Some("snap".into()),
                ..Default::default()
            }),
            ..Default::default()
        });
        b
    }

    fn dir() -> BackupTarget {
        BackupTarget {
            directory: Some(DirectoryTarget {
                path: "/b/ns/x".into(),
            }),
            ..Default::default()
        }
    }

    fn repo() -> BackupTarget {
        BackupTarget {
            repository: Some(RepositoryTarget {
                name: "repo".into(),
            }),
            ..Default::default()
        }
    }

    fn reason(r: Resolution) -> &'static str {
        match r {
            Resolution::Reject(r) => r.reason,
            Resolution::WaitForBackup(_) => "Wait",
            Resolution::Route { .. } => "Route",
        }
    }

    #[test]
    fn backup_sources_resolve_by_phase_and_kind() {
        let r = restore(None, RestoreMode::Copy);
        assert_eq!(
            reason(resolve_backup(&r, "b", None)),
            REASON_BACKUP_NOT_FOUND
        );
        for (phase, want) in [
            (BackupPhase::Failed, REASON_BACKUP_NOT_SUCCEEDED),
            (BackupPhase::Cancelled, REASON_BACKUP_NOT_SUCCEEDED),
            (BackupPhase::Running, "Wait"),
            (BackupPhase::Pending, "Wait"),
            (BackupPhase::Succeeded, "Route"),
        ] {
            assert_eq!(
                reason(resolve_backup(&r, "b", Some(&backup(phase, dir())))),
                want
            );
        }
        let mut pull = backup(BackupPhase::Succeeded, BackupTarget::default());
        pull.spec.mode = BackupMode::Pull;
        assert_eq!(
            reason(resolve_backup(&r, "b", Some(&pull))),
            REASON_BACKUP_NOT_RESTORABLE
        );
    }

    #[test]
    fn chains_restore_where_their_files_are() {
        let b = backup(BackupPhase::Succeeded, dir());
        match resolve_backup(&restore(None, RestoreMode::Copy), "b", Some(&b)) {
            Resolution::Route { node, source, .. } => {
                assert_eq!(node.as_deref(), Some("node-1"));
                assert_eq!(source.directory.as_deref(), Some("/b/ns/x"));
                assert_eq!(source.backup_uid.as_deref(), Some("uid-1"));
            }
            other => panic!("{other:?}"),
        }
        let elsewhere = restore(Some("node-2"), RestoreMode::Copy);
        assert_eq!(
            reason(resolve_backup(&elsewhere, "b", Some(&b))),
            REASON_NODE_MISMATCH
        );
        let instant = restore(None, RestoreMode::Instant);
        assert_eq!(
            reason(resolve_backup(&instant, "b", Some(&b))),
            REASON_INSTANT_NEEDS_REPOSITORY
        );
    }

    #[test]
    fn repository_backups_resolve_to_their_snapshot_anywhere() {
        let b = backup(BackupPhase::Succeeded, repo());
        match resolve_backup(
            &restore(Some("node-2"), RestoreMode::Instant),
            "b",
            Some(&b),
        ) {
            Resolution::Route {
                node,
                source,
                repository,
                ..
            } => {
                assert_eq!(node.as_deref(), Some("node-2"));
                assert_eq!(source.snapshot.as_deref(), Some("snap"));
                assert_eq!(repository.as_deref(), Some("repo"));
            }
            other => panic!("{other:?}"),
        }
    }
}
