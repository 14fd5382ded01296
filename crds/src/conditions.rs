//! Condition bookkeeping in the metav1.Condition shape.
//!
//! `lastTransitionTime` only moves when a condition's `status` changes, so
//! re-applying the same status is a no-op for watchers (kstatus, Argo CD, Flux).

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
}
