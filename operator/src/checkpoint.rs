//! The VirtualMachineCheckpoint controller.
//!
//! ```text
//! reconcile(checkpoint)
//!   1. resolve   the VM's QemuInstance and the parent (caches and the chain index, no LIST)
//!   2. deletion  plan_deletion: remove the finalizer once the agent cleaned up, or wait
//!   3. validate  validate_checkpoint: route to the VM's node, reject, or wait for a node
//!   4. plan      plan_checkpoint: labels + finalizer, status (phase, nodeName, parent, Accepted)
//!   5. apply     status by server-side apply, then the routing metadata (labels, finalizer)
//!   6. report    events (Routed after a rejection or a move, VirtualMachineNotFound,
//!                Deleted; published right after the status write) and the next requeue
//! ```
//!
//! `validate_checkpoint`, `compute_parent` and `plan_checkpoint` are pure and
//! tested below. Once the agent moved the phase beyond `Pending` the operator
//! never writes the phase again; it keeps `nodeName`, `parent` and `Accepted`.

use std::sync::Arc;
use std::time::Duration;

use cairn_api::{
    CHECKPOINT_FINALIZER, CheckpointPhase, NODE_LABEL, VirtualMachineCheckpoint,
    VirtualMachineCheckpointStatus, conditions,
};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};

use crate::context::Context;
use crate::error::Result;
use crate::routing::{
    self, DeletionPlan, Placement, Rejection, accepted, is_routed, operator_conditions, rejected,
    rejected_by_operator,
};

/// Name of this controller in metrics and logs.
pub const CONTROLLER: &str = "checkpoint";

/// Decision of [`validate_checkpoint`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Route to the agent of this node.
    Route {
        /// Node the VM runs on.
        node: String,
    },
    /// The spec cannot work as things are.
    Reject(Rejection),
    /// The VM exists but no agent has reported its node yet.
    WaitForNode,
}

/// The writes a reconcile should make.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// Metadata merge patch (labels, finalizer).
    pub metadata: Option<serde_json::Value>,
    /// The operator's status fields, when they differ from what is there.
    pub status: Option<VirtualMachineCheckpointStatus>,
    /// Event to publish: type, reason, note.
    pub event: Option<(EventType, &'static str, String)>,
    /// When to look again (besides watch events).
    pub requeue: Option<Duration>,
}

/// Step 3: where the checkpoint goes, from where its VM runs.
pub fn validate_checkpoint(cp: &VirtualMachineCheckpoint, placement: Placement) -> Verdict {
    match placement {
        Placement::Node(node) => Verdict::Route { node },
        Placement::Unplaced => Verdict::WaitForNode,
        Placement::Missing => Verdict::Reject(Rejection::vm_not_found(
            &cp.spec.virtual_machine,
            cp.namespace().as_deref().unwrap_or_default(),
        )),
    }
}

/// libvirt's parent: the newest other checkpoint of the VM that is not being
/// deleted and was created before `cp` (ties on the one-second
/// creationTimestamp are broken by name, so the chain never has cycles).
pub fn compute_parent<'a>(
    cp: &VirtualMachineCheckpoint,
    siblings: impl IntoIterator<Item = &'a VirtualMachineCheckpoint>,
) -> Option<String> {
    let key = |c: &VirtualMachineCheckpoint| {
        (
            c.meta().creation_timestamp.as_ref().map(|t| t.0),
            c.name_any(),
        )
    };
    let me = key(cp);
    siblings
        .into_iter()
        .filter(|s| {
            s.spec.virtual_machine == cp.spec.virtual_machine
                && s.namespace() == cp.namespace()
                && s.name_any() != cp.name_any()
                && s.meta().deletion_timestamp.is_none()
        })
        .map(key)
        .filter(|k| *k < me)
        .max()
        .map(|(_, name)| name)
}

/// Whether the operator may (still) write the phase: only before the agent took over.
pub fn operator_may_set_phase(status: Option<&VirtualMachineCheckpointStatus>) -> bool {
    match status.and_then(|s| s.phase) {
        None | Some(CheckpointPhase::Pending) => true,
        Some(CheckpointPhase::Failed) => {
            rejected_by_operator(status.map(|s| s.conditions.as_slice()).unwrap_or_default())
        }
        Some(CheckpointPhase::Creating | CheckpointPhase::Ready | CheckpointPhase::Deleting) => {
            false
        }
    }
}

/// Step 4: the writes that bring the checkpoint where `verdict` says.
pub fn plan_checkpoint(
    cp: &VirtualMachineCheckpoint,
    verdict: &Verdict,
    parent: Option<String>,
    now: Timestamp,
) -> Plan {
    let status = cp.status.as_ref();
    let existing = status.map(|s| s.conditions.as_slice()).unwrap_or_default();
    let accepted_before = conditions::is_true(existing, routing::ACCEPTED);
    let generation = cp.meta().generation;
    let vm = &cp.spec.virtual_machine;
    let may_set_phase = operator_may_set_phase(status);
    match verdict {
        Verdict::Route { node } => {
            let (conds, conds_changed) =
                operator_conditions(existing, vec![accepted(node, vm)], generation, now);
            let phase = may_set_phase.then_some(CheckpointPhase::Pending);
            let mut desired = VirtualMachineCheckpointStatus {
                phase,
                conditions: conds,
                node_name: Some(node.clone()),
                parent,
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
                || status.and_then(|s| s.node_name.as_ref()) != desired.node_name.as_ref()
                || status.and_then(|s| s.parent.as_ref()) != desired.parent.as_ref();
            let event = routing::routed_event(
                existing,
                cp.labels().get(NODE_LABEL).map(String::as_str),
                node,
                vm,
            );
            Plan {
                metadata: routing::routing_metadata(cp, node, vm, CHECKPOINT_FINALIZER),
                status: changed.then_some(desired),
                event,
                requeue: None,
            }
        }
        // Once routed, a vanished VM is the agent's business (it reports Ready=False);
        // the operator keeps the routing and only rejects objects it never accepted.
        Verdict::Reject(_) | Verdict::WaitForNode if accepted_before => Plan::default(),
        Verdict::Reject(r) => {
            let (conds, conds_changed) =
                operator_conditions(existing, rejected(r), generation, now);
            let phase = may_set_phase.then_some(CheckpointPhase::Failed);
            let mut desired = VirtualMachineCheckpointStatus {
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
            let changed = conds_changed
                || lifecycle_changed
                || (phase.is_some() && status.and_then(|s| s.phase) != phase);
            Plan {
                metadata: None,
                status: changed.then_some(desired),
                event: changed.then(|| (EventType::Warning, r.reason, r.message.clone())),
                requeue: Some(routing::RECHECK_MISSING_VM),
            }
        }
        // The VM appeared but has no node yet: a rejected checkpoint keeps its
        // rejection until it is routed, so that routing answers the Warning
        // with a `Routed` event (clearing it here lost the event when the
        // QemuInstance's status came a moment after the object).
        Verdict::WaitForNode if rejected_by_operator(existing) => Plan {
            requeue: Some(Duration::from_secs(10)),
            ..Default::default()
        },
        // Say `Pending` (kstatus InProgress) while waiting, not nothing: a
        // status-less object is Current to kstatus.
        Verdict::WaitForNode => {
            let phase = may_set_phase.then_some(CheckpointPhase::Pending);
            let (conds, _) = operator_conditions(existing, Vec::new(), generation, now);
            let mut desired = VirtualMachineCheckpointStatus {
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
pub async fn reconcile(cp: Arc<VirtualMachineCheckpoint>, ctx: Arc<Context>) -> Result<Action> {
    let namespace = routing::namespace_of(cp.as_ref())?;
    let name = cp.name_any();
    let span =
        tracing::info_span!("reconcile", controller = CONTROLLER, %namespace, checkpoint = %name);
    let _enter = span.enter();
    ctx.health.metrics.reconciled(CONTROLLER);
    let api = ctx.api::<VirtualMachineCheckpoint>(&namespace);

    // 1. resolve (the VM only; the parent is looked up when it must be computed)
    let vm = routing::find_vm(&ctx, &namespace, &cp.spec.virtual_machine);

    // 2. deletion
    if routing::deleting(cp.as_ref()) {
        let has_finalizer = cp.finalizers().iter().any(|f| f == CHECKPOINT_FINALIZER);
        let cleaned = cp
            .status
            .as_ref()
            .is_some_and(|s| conditions::is_true(&s.conditions, routing::CLEANED_UP));
        return match routing::plan_deletion(
            has_finalizer,
            cleaned,
            is_routed(cp.as_ref()),
            vm.is_some(),
        ) {
            DeletionPlan::Nothing => Ok(Action::await_change()),
            DeletionPlan::WaitForAgent => {
                tracing::debug!("waiting for the agent to remove the bitmaps");
                Ok(Action::requeue(Duration::from_secs(30)))
            }
            DeletionPlan::RemoveFinalizer(reason) => {
                routing::remove_finalizer(&api, cp.as_ref(), CHECKPOINT_FINALIZER).await?;
                tracing::info!(?reason, "finalizer removed");
                routing::publish(
                    &ctx,
                    cp.as_ref(),
                    EventType::Normal,
                    "Deleted",
                    reason.message().into(),
                )
                .await;
                // Children of this checkpoint get a new parent.
                for child in ctx.checkpoints.state().iter().filter(|c| {
                    c.namespace().as_deref() == Some(namespace.as_str())
                        && c.status.as_ref().and_then(|s| s.parent.as_deref())
                            == Some(name.as_str())
                }) {
                    let _ = ctx
                        .checkpoint_trigger
                        .unbounded_send(ObjectRef::from_obj(child.as_ref()));
                }
                Ok(Action::await_change())
            }
        };
    }

    // 3. validate
    let verdict = validate_checkpoint(&cp, routing::placement(vm.as_deref()));

    // 1b. resolve the parent: an accepted checkpoint keeps its recorded parent while that
    // is still valid (no older checkpoint can appear later), else the VM's chain index
    // (crate::siblings) answers what compute_parent would over the whole cache.
    let recorded = cp.status.as_ref().and_then(|s| s.parent.clone());
    let accepted_before = conditions::is_true(
        cp.status
            .as_ref()
            .map(|s| s.conditions.as_slice())
            .unwrap_or_default(),
        routing::ACCEPTED,
    );
    let parent = match &recorded {
        None if accepted_before => None,
        Some(p)
            if accepted_before
                && ctx
                    .checkpoints
                    .get(&ObjectRef::new(p).within(&namespace))
                    .is_some_and(|o| {
                        compute_parent(&cp, std::iter::once(o.as_ref())).is_some()
                    }) =>
        {
            recorded.clone()
        }
        _ => ctx.siblings.parent(&cp),
    };

    // 4. plan
    let plan = plan_checkpoint(&cp, &verdict, parent, Timestamp::now());

    // 5. apply
    let mut version = None;
    if let Some(status) = &plan.status {
        version = routing::apply_status(&api, &name, cp.resource_version(), status).await?;
        tracing::info!(phase = ?status.phase, node = ?status.node_name, parent = ?status.parent, "status written");
    }
    // 6. report, as soon as the status says it: a failed label write below is
    // retried by a reconcile that no longer sees the change the event tells.
    if let Some((type_, reason, note)) = plan.event {
        routing::publish(&ctx, cp.as_ref(), type_, reason, note).await;
    }
    let routing_in_flight =
        routing::write_routing(&ctx, &api, cp.as_ref(), plan.metadata.as_ref(), version).await?;
    let requeue = match (plan.requeue, routing_in_flight) {
        (r, false) => r,
        (r, true) => Some(r.map_or(routing::RECHECK_ROUTING, |r| {
            r.min(routing::RECHECK_ROUTING)
        })),
    };
    Ok(requeue.map_or_else(Action::await_change, Action::requeue))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use cairn_api::VirtualMachineCheckpointSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    /// A checkpoint of `vm` in namespace `ns`, created at `created` (RFC 3339).
    pub(crate) fn cp(name: &str, vm: &str, created: &str) -> VirtualMachineCheckpoint {
        let mut c = VirtualMachineCheckpoint::new(
            name,
            VirtualMachineCheckpointSpec {
                virtual_machine: vm.into(),
                ..Default::default()
            },
        );
        c.metadata.namespace = Some("ns".into());
        c.metadata.creation_timestamp = Some(Time(created.parse().unwrap()));
        c
    }

    const T: Timestamp = Timestamp::UNIX_EPOCH;

    #[test]
    fn parent_is_newest_older_non_deleting_sibling_of_same_vm() {
        let a = cp("a", "vm", "2026-01-01T00:00:00Z");
        let b = cp("b", "vm", "2026-01-01T00:01:00Z");
        let mut c = cp("c", "vm", "2026-01-01T00:02:00Z");
        let other = cp("o", "other", "2026-01-01T00:01:30Z");
        let d = cp("d", "vm", "2026-01-01T00:03:00Z");
        let all = [a.clone(), b.clone(), c.clone(), other, d.clone()];
        assert_eq!(compute_parent(&a, &all), None);
        assert_eq!(compute_parent(&c, &all).as_deref(), Some("b"));
        assert_eq!(compute_parent(&d, &all).as_deref(), Some("c"));
        // A deleted checkpoint is skipped: its child gets the grandparent.
        c.metadata.deletion_timestamp = Some(Time(T));
        let all = [a, b, c, d.clone()];
        assert_eq!(compute_parent(&d, &all).as_deref(), Some("b"));
    }

    #[test]
    fn parent_ties_break_by_name() {
        let x = cp("x", "vm", "2026-01-01T00:00:00Z");
        let y = cp("y", "vm", "2026-01-01T00:00:00Z");
        let all = [x.clone(), y.clone()];
        assert_eq!(compute_parent(&y, &all).as_deref(), Some("x"));
        assert_eq!(compute_parent(&x, &all), None);
    }

    #[test]
    fn unknown_vm_is_rejected_with_an_actionable_message() {
        let c = cp("a", "vm1", "2026-01-01T00:00:00Z");
        let Verdict::Reject(r) = validate_checkpoint(&c, Placement::Missing) else {
            panic!("expected a rejection");
        };
        assert_eq!(r.reason, "VirtualMachineNotFound");
        assert!(r.message.contains("\"vm1\"") && r.message.contains("\"ns\""));
        let plan = plan_checkpoint(&c, &Verdict::Reject(r.clone()), None, T);
        let status = plan.status.unwrap();
        assert_eq!(status.phase, Some(CheckpointPhase::Failed));
        // Accepted=False, Ready=False, and for kstatus Stalled=True (same reason), Reconciling=False.
        assert_eq!(status.conditions.len(), 4);
        let stalled = conditions::find(&status.conditions, "Stalled").unwrap();
        assert_eq!(
            (stalled.status.as_str(), stalled.reason.as_str()),
            ("True", "VirtualMachineNotFound")
        );
        assert_eq!(stalled.message, r.message);
        assert!(!conditions::is_true(&status.conditions, "Reconciling"));
        assert!(plan.metadata.is_none());
        assert_eq!(plan.event.unwrap().1, "VirtualMachineNotFound");
    }

    #[test]
    fn route_plan_sets_pending_node_parent_and_accepted() {
        let c = cp("b", "vm1", "2026-01-01T00:00:00Z");
        let v = Verdict::Route {
            node: "node-1".into(),
        };
        let plan = plan_checkpoint(&c, &v, Some("a".into()), T);
        let status = plan.status.clone().unwrap();
        assert_eq!(status.phase, Some(CheckpointPhase::Pending));
        assert_eq!(status.node_name.as_deref(), Some("node-1"));
        assert_eq!(status.parent.as_deref(), Some("a"));
        assert!(conditions::is_true(&status.conditions, "Accepted"));
        assert!(conditions::is_true(&status.conditions, "Reconciling"));
        assert!(plan.metadata.is_some());
        // The first routing is said by Accepted=True alone: no event per object.
        assert_eq!(plan.event, None);

        // Applied: a second reconcile has nothing to do.
        let mut done = c.clone();
        done.status = Some(status);
        done.metadata.labels = Some(
            [
                (NODE_LABEL.to_string(), "node-1".to_string()),
                (cairn_api::VM_LABEL.to_string(), "vm1".to_string()),
            ]
            .into(),
        );
        done.metadata.finalizers = Some(vec![CHECKPOINT_FINALIZER.into()]);
        assert_eq!(
            plan_checkpoint(&done, &v, Some("a".into()), T),
            Plan::default()
        );

        // The agent moved it on: the phase is never written again.
        done.status.as_mut().unwrap().phase = Some(CheckpointPhase::Ready);
        let plan = plan_checkpoint(&done, &v, None, T);
        let status = plan.status.unwrap();
        assert_eq!(status.phase, None);
        assert_eq!(status.parent, None);
    }

    #[test]
    fn rejected_checkpoint_recovers_when_the_vm_appears() {
        let mut c = cp("a", "vm1", "2026-01-01T00:00:00Z");
        let r = Rejection::vm_not_found("vm1", "ns");
        c.status = plan_checkpoint(&c, &Verdict::Reject(r.clone()), None, T).status;
        // Same rejection again: nothing to write, no event; only the rare re-check.
        assert_eq!(
            plan_checkpoint(&c, &Verdict::Reject(r), None, T),
            Plan {
                requeue: Some(routing::RECHECK_MISSING_VM),
                ..Plan::default()
            }
        );
        let plan = plan_checkpoint(
            &c,
            &Verdict::Route {
                node: "node-1".into(),
            },
            None,
            T,
        );
        let status = plan.status.unwrap();
        assert_eq!(status.phase, Some(CheckpointPhase::Pending));
        // Accepted, and Reconciling=True / Stalled=False: the rejection's Ready and Stalled are gone.
        let types: Vec<&str> = status.conditions.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, ["Accepted", "Reconciling", "Stalled"]);
        assert!(conditions::is_true(&status.conditions, "Reconciling"));
        assert!(!conditions::is_true(&status.conditions, "Stalled"));
        // After a Warning, a person sees in the events that it was resolved.
        assert_eq!(plan.event.as_ref().map(|e| e.1), Some("Routed"));
    }

    #[test]
    fn a_rejected_checkpoint_keeps_its_rejection_while_its_vm_has_no_node() {
        let mut c = cp("a", "vm1", "2026-01-01T00:00:00Z");
        let r = Rejection::vm_not_found("vm1", "ns");
        c.status = plan_checkpoint(&c, &Verdict::Reject(r), None, T).status;
        // The QemuInstance appeared, its node not yet: nothing is written.
        let plan = plan_checkpoint(&c, &Verdict::WaitForNode, None, T);
        assert_eq!(plan.status, None);
        assert_eq!(plan.requeue, Some(Duration::from_secs(10)));
        // Then routed: the Warning gets its `Routed` answer.
        let plan = plan_checkpoint(
            &c,
            &Verdict::Route {
                node: "node-1".into(),
            },
            None,
            T,
        );
        assert_eq!(plan.event.as_ref().map(|e| e.1), Some("Routed"));
    }

    #[test]
    fn waiting_for_a_node_is_pending_and_reconciling() {
        let mut c = cp("a", "vm1", "2026-01-01T00:00:00Z");
        let plan = plan_checkpoint(&c, &Verdict::WaitForNode, None, T);
        let status = plan.status.clone().unwrap();
        assert_eq!(status.phase, Some(CheckpointPhase::Pending));
        assert!(conditions::is_true(&status.conditions, "Reconciling"));
        assert!(!conditions::is_true(&status.conditions, "Stalled"));
        assert_eq!(plan.requeue, Some(Duration::from_secs(10)));
        // Written once; the next look has nothing to say.
        c.status = Some(status);
        assert_eq!(
            plan_checkpoint(&c, &Verdict::WaitForNode, None, T).status,
            None
        );
    }

    #[test]
    fn accepted_checkpoint_is_not_rejected_when_its_vm_vanishes() {
        let mut c = cp("a", "vm1", "2026-01-01T00:00:00Z");
        c.status = plan_checkpoint(
            &c,
            &Verdict::Route {
                node: "node-1".into(),
            },
            None,
            T,
        )
        .status;
        c.status.as_mut().unwrap().phase = Some(CheckpointPhase::Ready);
        let r = Rejection::vm_not_found("vm1", "ns");
        assert_eq!(
            plan_checkpoint(&c, &Verdict::Reject(r), None, T),
            Plan::default()
        );
    }
}
