//! BackupRepository rules the operator enforces before it routes a backup:
//! the repository must exist and allow the backup's namespace
//! (`spec.allowedNamespaces`: names, `*`, or a label selector over namespaces).
//! Pure functions, tested here; the reconcile only fetches what they judge.

use std::collections::BTreeMap;

use cairn_api::{BackupRepository, VirtualMachineBackup};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::ResourceExt;

use crate::routing::Rejection;

/// Reason of a backup whose repository does not exist.
pub const REASON_REPOSITORY_NOT_FOUND: &str = "RepositoryNotFound";
/// Reason of a backup from a namespace the repository does not allow.
pub const REASON_REPOSITORY_NOT_ALLOWED: &str = "RepositoryNotAllowed";

/// Whether `repo` lets backups of `namespace` (with `labels`) in.
pub fn allows(repo: &BackupRepository, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
    let Some(allowed) = repo.spec.allowed_namespaces.as_ref() else {
        return false;
    };
    allowed.names.iter().any(|n| n == "*" || n == namespace)
        || allowed
            .selector
            .as_ref()
            .is_some_and(|s| selector_matches(s, labels))
}

/// Kubernetes label-selector semantics (`matchLabels` and `matchExpressions`
/// ANDed). An empty selector matches everything, as in the API.
pub fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let exprs_ok = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        let have = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => have.is_some_and(|v| values.contains(v)),
            "NotIn" => have.is_none_or(|v| !values.contains(v)),
            "Exists" => have.is_some(),
            "DoesNotExist" => have.is_none(),
            // Unknown operators match nothing: refuse rather than allow.
            _ => false,
        }
    });
    labels_ok && exprs_ok
}

/// Why the backup may not use its repository target, if it may not. `repo`
/// is the named BackupRepository (None: it does not exist) and `labels` the
/// labels of the backup's namespace.
pub fn check_target(
    backup: &VirtualMachineBackup,
    repo: Option<&BackupRepository>,
    labels: &BTreeMap<String, String>,
) -> Option<Rejection> {
    let name = backup
        .spec
        .target
        .as_ref()
        .and_then(|t| t.repository.as_ref())
        .map(|r| r.name.as_str())?;
    check_use(name, &backup.namespace().unwrap_or_default(), repo, labels)
}

/// Why namespace `ns` (with `labels`) may not use the BackupRepository
/// `name` (`repo`; None: it does not exist), if it may not.
pub fn check_use(
    name: &str,
    ns: &str,
    repo: Option<&BackupRepository>,
    labels: &BTreeMap<String, String>,
) -> Option<Rejection> {
    let Some(repo) = repo else {
        return Some(Rejection {
            reason: REASON_REPOSITORY_NOT_FOUND,
            message: format!(
                "BackupRepository {name:?} does not exist: ask the cluster admin which repositories namespace {ns:?} may use"
            ),
        });
    };
    if !allows(repo, ns, labels) {
        return Some(Rejection {
            reason: REASON_REPOSITORY_NOT_ALLOWED,
            message: format!(
                "BackupRepository {name:?} does not allow namespace {ns:?} (spec.allowedNamespaces): ask the cluster admin to allow it, or use another repository"
            ),
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_api::{
        AllowedNamespaces, BackupRepositorySpec, BackupTarget, RepositoryTarget,
        VirtualMachineBackupSpec,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn repo(allowed: Option<AllowedNamespaces>) -> BackupRepository {
        BackupRepository::new(
            "r",
            BackupRepositorySpec {
                allowed_namespaces: allowed,
                ..Default::default()
            },
        )
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn names_star_and_absent() {
        let by_name = repo(Some(AllowedNamespaces {
            names: vec!["team-a".into()],
            selector: None,
        }));
        assert!(allows(&by_name, "team-a", &labels(&[])));
        assert!(!allows(&by_name, "team-b", &labels(&[])));
        let everyone = repo(Some(AllowedNamespaces {
            names: vec!["*".into()],
            selector: None,
        }));
        assert!(allows(&everyone, "anything", &labels(&[])));
        // Nothing said: nobody, so a new repository leaks to no one by default.
        assert!(!allows(&repo(None), "team-a", &labels(&[])));
    }

    #[test]
    fn selectors_follow_kubernetes_semantics() {
        let sel = LabelSelector {
            match_labels: Some([("tier".to_string(), "gold".to_string())].into()),
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "env".into(),
                operator: "NotIn".into(),
                values: Some(vec!["dev".into()]),
            }]),
        };
        let r = repo(Some(AllowedNamespaces {
            names: vec![],
            selector: Some(sel),
        }));
        assert!(allows(&r, "x", &labels(&[("tier", "gold")])));
        assert!(allows(
            &r,
            "x",
            &labels(&[("tier", "gold"), ("env", "prod")])
        ));
        assert!(!allows(
            &r,
            "x",
            &labels(&[("tier", "gold"), ("env", "dev")])
        ));
        assert!(!allows(&r, "x", &labels(&[("tier", "silver")])));
        let exists = LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "backup".into(),
                operator: "Exists".into(),
                values: None,
            }]),
        };
        assert!(selector_matches(&exists, &labels(&[("backup", "")])));
        assert!(!selector_matches(&exists, &labels(&[])));
        let bogus = LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "a".into(),
                operator: "Maybe".into(),
                values: None,
            }]),
        };
        assert!(!selector_matches(&bogus, &labels(&[("a", "b")])));
    }

    #[test]
    fn backups_name_the_problem() {
        let mut b = VirtualMachineBackup::new(
            "b",
            VirtualMachineBackupSpec {
                virtual_machine: "vm1".into(),
                target: Some(BackupTarget {
                    repository: Some(RepositoryTarget { name: "r".into() }),
                    ..Default::default()
                }),
                ..Default::default()
            },
        );
        b.metadata.namespace = Some("team-b".into());
        let r = check_target(&b, None, &labels(&[])).unwrap();
        assert_eq!(r.reason, REASON_REPOSITORY_NOT_FOUND);
        let only_a = repo(Some(AllowedNamespaces {
            names: vec!["team-a".into()],
            selector: None,
        }));
        let r = check_target(&b, Some(&only_a), &labels(&[])).unwrap();
        assert_eq!(r.reason, REASON_REPOSITORY_NOT_ALLOWED);
        assert!(
            r.message.contains("team-b") && r.message.contains("\"r\""),
            "{}",
            r.message
        );
        b.metadata.namespace = Some("team-a".into());
        assert!(check_target(&b, Some(&only_a), &labels(&[])).is_none());
    }
}
