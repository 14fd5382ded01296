//! Condition bookkeeping in the metav1.Condition shape.
//!
//! `lastTransitionTime` only moves when a condition's `status` changes, so
//! re-applying the same status is a no-op for watchers (kstatus, Argo CD, Flux).
//!
//! # kstatus conditions (`Reconciling`, `Stalled`)
//!
//! GitOps tools read health with kstatus (Flux, kpt, Config Sync) or a Lua
//! health script (Argo CD, docs/gitops/argocd-health-checks.yaml). kstatus
//! ignores `Ready` and phases: a resource is `InProgress` while
//! `Reconciling=True` (or `status.observedGeneration` trails
//! `metadata.generation`), `Failed` while `Stalled=True`, else `Current`. So
//! every checkpoint and backup carries both conditions, derived by
//! [`set_lifecycle`] from one place — the phase (via [`Lifecycle`], computed
//! per kind by `lifecycle()` on its status) and the `Ready` condition:
//!
//! | lifecycle    | Reconciling                  | Stalled                               |
//! |--------------|------------------------------|---------------------------------------|
//! | `InProgress` | True, reason = phase         | False                                 |
//! | `Current`    | False                        | False                                 |
//! | `Failed`     | False                        | True, reason/message = `Ready=False`'s |
//!
//! Ownership (server-side apply): `Ready`, `Reconciling`, `Stalled` and
//! `observedGeneration` go with `phase`. Whoever writes `phase` writes all of
//! them in the same apply, derived by this same function from the same
//! object, so two field managers never hold different values for them: the
//! operator (`cairn-operator`) while it may set the phase (an unrouted or
//! `Pending` object, or one it rejected), the agent (`cairn-agent`) from the
//! moment it moves the phase on. When the operator stops writing the phase it
//! drops these fields from its apply and the agent's values remain.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// A condition to set, without the bookkeeping fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewCondition<'a> {
    /// Condition type, e.g. `Ready`.
    pub type_: &'a str,
    /// `True`, `False` or `Unknown`.
    pub status: bool,
    /// Stable CamelCase reason.
    pub reason: &'a str,
    /// A sentence a person can act on.
    pub message: String,
}

/// Sets `new` in `conditions`, keeping `lastTransitionTime` when the status is unchanged.
/// Returns whether anything changed.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    new: NewCondition<'_>,
    observed_generation: Option<i64>,
    now: Timestamp,
) -> bool {
    let status = if new.status { "True" } else { "False" }.to_string();
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(existing) => {
            let transition = existing.status != status;
            let changed = transition
                || existing.reason != new.reason
                || existing.message != new.message
                || existing.observed_generation != observed_generation;
            if transition {
                existing.last_transition_time = Time(now);
            }
            existing.status = status;
            existing.reason = new.reason.to_string();
            existing.message = new.message;
            existing.observed_generation = observed_generation;
            changed
        }
        None => {
            conditions.push(Condition {
                type_: new.type_.to_string(),
                status,
                reason: new.reason.to_string(),
                message: new.message,
                observed_generation,
                last_transition_time: Time(now),
            });
            true
        }
    }
}

/// Where a resource stands, in kstatus terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifecycle {
    /// Work towards the spec is under way (kstatus `InProgress`, Argo CD `Progressing`).
    InProgress,
    /// The resource is what its spec asks for (kstatus `Current`, Argo CD `Healthy`).
    Current,
    /// A terminal failure: nothing more happens until a person acts (kstatus
    /// `Failed`, Argo CD `Degraded`).
    Failed,
}

/// Sets `Reconciling` and `Stalled` in `conditions` for `lifecycle`, taking
/// the failure reason and message from the `Ready` condition (in `conditions`,
/// else in `previous`) and keeping `lastTransitionTime` of the same conditions
/// in `previous`. `phase` names the phase (the reason while in progress).
/// Returns whether anything changed.
pub fn set_lifecycle(
    conditions: &mut Vec<Condition>,
    previous: &[Condition],
    lifecycle: Lifecycle,
    phase: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> bool {
    use crate::condition_types::{READY, RECONCILING, STALLED};
    for t in [RECONCILING, STALLED] {
        if find(conditions, t).is_none()
            && let Some(prev) = find(previous, t)
        {
            conditions.push(prev.clone());
        }
    }
    let ready = find(conditions, READY)
        .or_else(|| find(previous, READY))
        .filter(|c| c.status != "True")
        .map(|c| (c.reason.clone(), c.message.clone()));
    let (reconciling, stalled) = match lifecycle {
        Lifecycle::InProgress => {
            let message = ready
                .map(|(_, m)| m)
                .unwrap_or_else(|| format!("phase {phase}"));
            (
                NewCondition {
                    type_: RECONCILING,
                    status: true,
                    reason: phase,
                    message,
                },
                NewCondition {
                    type_: STALLED,
                    status: false,
                    reason: phase,
                    message: format!("phase {phase}: making progress"),
                },
            )
        }
        Lifecycle::Current => (
            NewCondition {
                type_: RECONCILING,
                status: false,
                reason: phase,
                message: format!("phase {phase}: nothing left to do"),
            },
            NewCondition {
                type_: STALLED,
                status: false,
                reason: phase,
                message: format!("phase {phase}: no failure"),
            },
        ),
        Lifecycle::Failed => {
            let (reason, message) =
                ready.unwrap_or_else(|| (phase.to_string(), format!("phase {phase}")));
            let changed = set_condition(
                conditions,
                NewCondition {
                    type_: STALLED,
                    status: true,
                    reason: &reason,
                    message: message.clone(),
                },
                generation,
                now,
            );
            return set_condition(
                conditions,
                NewCondition {
                    type_: RECONCILING,
                    status: false,
                    reason: &reason,
                    message,
                },
                generation,
                now,
            ) | changed;
        }
    };
    let changed = set_condition(conditions, reconciling, generation, now);
    set_condition(conditions, stalled, generation, now) | changed
}

/// The newest generation any condition (or `observed`) was written for: what
/// a status writer without the object at hand records as `observedGeneration`.
/// The specs of Cairn's kinds are immutable, so this is the generation itself.
pub fn newest_generation(conditions: &[Condition], observed: Option<i64>) -> Option<i64> {
    conditions
        .iter()
        .filter_map(|c| c.observed_generation)
        .chain(observed)
        .max()
}

/// A status that carries a phase and conditions, so [`sync_lifecycle`] can
/// derive the kstatus conditions and `observedGeneration` from it.
pub trait LifecycleStatus {
    /// Where the resource stands, and the name of its phase.
    fn lifecycle(&self) -> (Lifecycle, &'static str);
    /// The conditions, to update.
    fn conditions_mut(&mut self) -> &mut Vec<Condition>;
    /// `status.observedGeneration`, to update.
    fn observed_generation_mut(&mut self) -> &mut Option<i64>;
}

/// Brings `Reconciling`, `Stalled` and `observedGeneration` of `status` in
/// line with its phase and `Ready` condition (see the module docs). Returns
/// whether anything changed.
pub fn sync_lifecycle<S: LifecycleStatus>(status: &mut S, now: Timestamp) -> bool {
    let (lifecycle, phase) = status.lifecycle();
    let generation = {
        let observed = *status.observed_generation_mut();
        newest_generation(status.conditions_mut(), observed)
    };
    let og = status.observed_generation_mut();
    let mut changed = *og != generation;
    *og = generation;
    let conditions = status.conditions_mut();
    let previous = conditions.clone();
    changed |= set_lifecycle(conditions, &previous, lifecycle, phase, generation, now);
    changed
}

/// The condition of `type_`, if present.
pub fn find<'c>(conditions: &'c [Condition], type_: &str) -> Option<&'c Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether the condition of `type_` is present with status `True`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    find(conditions, type_).is_some_and(|c| c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready(status: bool, reason: &str) -> NewCondition<'_> {
        NewCondition {
            type_: "Ready",
            status,
            reason,
            message: format!("{reason} happened"),
        }
    }

    #[test]
    fn keeps_transition_time_when_status_is_unchanged() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let t1: Timestamp = "2026-01-01T00:05:00Z".parse().unwrap();
        let mut conds = Vec::new();
        assert!(set_condition(
            &mut conds,
            ready(true, "Created"),
            Some(1),
            t0
        ));
        assert!(!set_condition(
            &mut conds,
            ready(true, "Created"),
            Some(1),
            t1
        ));
        assert_eq!(conds[0].last_transition_time.0, t0);
        // Reason changes but status does not: changed, time kept.
        assert!(set_condition(
            &mut conds,
            ready(true, "Verified"),
            Some(1),
            t1
        ));
        assert_eq!(conds[0].last_transition_time.0, t0);
        assert_eq!(conds[0].reason, "Verified");
    }

    #[test]
    fn moves_transition_time_when_status_flips() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let t1: Timestamp = "2026-01-02T00:00:00Z".parse().unwrap();
        let mut conds = Vec::new();
        set_condition(&mut conds, ready(true, "Created"), Some(1), t0);
        assert!(set_condition(
            &mut conds,
            ready(false, "BitmapMissing"),
            Some(2),
            t1
        ));
        assert_eq!(conds.len(), 1);
        assert_eq!(conds[0].status, "False");
        assert_eq!(conds[0].last_transition_time.0, t1);
        assert_eq!(conds[0].observed_generation, Some(2));
        assert!(!is_true(&conds, "Ready"));
        assert!(find(&conds, "Other").is_none());
    }

    use crate::{
        BackupPhase, CheckpointPhase, VirtualMachineBackupStatus, VirtualMachineCheckpointStatus,
    };

    fn status_of<'c>(conds: &'c [Condition], type_: &str) -> (&'c str, &'c str) {
        let c = find(conds, type_).unwrap_or_else(|| panic!("no {type_} in {conds:?}"));
        (c.status.as_str(), c.reason.as_str())
    }

    #[test]
    fn failure_is_stalled_with_the_ready_reason() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let mut st = VirtualMachineBackupStatus {
            phase: Some(BackupPhase::Failed),
            ..Default::default()
        };
        set_condition(
            &mut st.conditions,
            ready(false, "TargetNotAllowed"),
            Some(3),
            t0,
        );
        assert!(sync_lifecycle(&mut st, t0));
        assert_eq!(
            status_of(&st.conditions, "Stalled"),
            ("True", "TargetNotAllowed")
        );
        assert_eq!(
            find(&st.conditions, "Stalled").unwrap().message,
            "TargetNotAllowed happened"
        );
        assert_eq!(
            status_of(&st.conditions, "Reconciling"),
            ("False", "TargetNotAllowed")
        );
        assert_eq!(st.observed_generation, Some(3));
        // Nothing new to say: nothing changes, times are kept.
        let t1: Timestamp = "2026-01-01T01:00:00Z".parse().unwrap();
        assert!(!sync_lifecycle(&mut st, t1));
        assert_eq!(
            find(&st.conditions, "Stalled")
                .unwrap()
                .last_transition_time
                .0,
            t0
        );
    }

    #[test]
    fn progress_then_success() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let t1: Timestamp = "2026-01-01T00:01:00Z".parse().unwrap();
        let mut st = VirtualMachineCheckpointStatus {
            phase: Some(CheckpointPhase::Creating),
            ..Default::default()
        };
        sync_lifecycle(&mut st, t0);
        assert_eq!(
            status_of(&st.conditions, "Reconciling"),
            ("True", "Creating")
        );
        assert_eq!(status_of(&st.conditions, "Stalled"), ("False", "Creating"));
        st.phase = Some(CheckpointPhase::Ready);
        set_condition(&mut st.conditions, ready(true, "Created"), Some(1), t1);
        assert!(sync_lifecycle(&mut st, t1));
        assert_eq!(status_of(&st.conditions, "Reconciling"), ("False", "Ready"));
        assert_eq!(status_of(&st.conditions, "Stalled"), ("False", "Ready"));
        let rec = find(&st.conditions, "Reconciling").unwrap();
        assert_eq!(rec.last_transition_time.0, t1);
        // A bitmap lost after the fact: a failure, not progress.
        set_condition(
            &mut st.conditions,
            ready(false, "BitmapInconsistent"),
            Some(1),
            t1,
        );
        sync_lifecycle(&mut st, t1);
        assert_eq!(
            status_of(&st.conditions, "Stalled"),
            ("True", "BitmapInconsistent")
        );
    }

    #[test]
    fn backup_phases_map_to_kstatus() {
        let cases = [
            (BackupPhase::Pending, None, Lifecycle::InProgress),
            (BackupPhase::Running, Some(false), Lifecycle::InProgress),
            (BackupPhase::Exporting, Some(false), Lifecycle::InProgress),
            (BackupPhase::Exporting, Some(true), Lifecycle::Current),
            (BackupPhase::Succeeded, Some(true), Lifecycle::Current),
            (BackupPhase::Failed, Some(false), Lifecycle::Failed),
            (BackupPhase::Cancelled, Some(false), Lifecycle::Failed),
        ];
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        for (phase, r, want) in cases {
            let mut st = VirtualMachineBackupStatus {
                phase: Some(phase),
                ..Default::default()
            };
            if let Some(r) = r {
                set_condition(&mut st.conditions, ready(r, "X"), Some(1), t0);
            }
            assert_eq!(st.lifecycle().0, want, "{phase:?} Ready={r:?}");
        }
    }

    #[test]
    fn operator_view_derives_the_same_as_the_agent() {
        // The operator writes only Accepted and derives from the agent's Ready:
        // the result equals what the agent wrote, so the managers never fight.
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let mut agent = VirtualMachineCheckpointStatus {
            phase: Some(CheckpointPhase::Pending),
            ..Default::default()
        };
        set_condition(
            &mut agent.conditions,
            ready(false, "VirtualMachineNotRunning"),
            Some(1),
            t0,
        );
        sync_lifecycle(&mut agent, t0);
        let mut mine = Vec::new();
        set_lifecycle(
            &mut mine,
            &agent.conditions,
            Lifecycle::InProgress,
            "Pending",
            Some(1),
            "2026-02-01T00:00:00Z".parse().unwrap(),
        );
        for t in ["Reconciling", "Stalled"] {
            assert_eq!(find(&mine, t), find(&agent.conditions, t));
        }
    }
}
