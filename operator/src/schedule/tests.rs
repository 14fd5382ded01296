//! Planning a schedule's runs, without a cluster.

use super::*;
use cairn_api::{
    BackupTarget, BackupTemplate, DirectoryTarget, RepositoryTarget, Retention,
    VirtualMachineBackupScheduleSpec, VirtualMachineBackupStatus,
};

fn schedule(
    directory: bool,
    full_every: Option<i32>,
    retention: Option<Retention>,
) -> VirtualMachineBackupSchedule {
    let target = if directory {
        BackupTarget {
            directory: Some(DirectoryTarget {
                path: "/b/ns/vm1".into(),
            }),
            ..Default::default()
        }
    } else {
        BackupTarget {
            repository: Some(RepositoryTarget { name: "r".into() }),
            ..Default::default()
        }
    };
    let mut s = VirtualMachineBackupSchedule::new(
        "nightly",
        VirtualMachineBackupScheduleSpec {
            virtual_machine: Some("vm1".into()),
            schedule: "0 * * * *".into(),
            template: BackupTemplate {
                target,
                ..Default::default()
            },
            full_every,
            retention,
            ..Default::default()
        },
    );
    s.metadata.namespace = Some("ns".into());
    s.metadata.uid = Some("sched-uid".into());
    s
}

fn t(hour: u32) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(&format!("2026-03-01T{hour:02}:00:00Z"))
        .unwrap()
        .with_timezone(&Utc)
}

/// Simulates runs: each hour's run is planned from the ones before it and
/// finishes with `phase`.
fn history(s: &VirtualMachineBackupSchedule, phases: &[BackupPhase]) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    for (h, phase) in phases.iter().enumerate() {
        let time = t(h as u32);
        let newest_first = sorted(runs.clone());
        let mut b = next_backup(s, "vm1", time, &newest_first, |_| true);
        b.status = Some(VirtualMachineBackupStatus {
            phase: Some(*phase),
            ..Default::default()
        });
        runs.push(Run {
            backup: Arc::new(b),
            time,
        });
    }
    sorted(runs)
}

fn names(runs: &[Run], f: impl Fn(&Run) -> bool) -> Vec<String> {
    runs.iter().filter(|r| f(r)).map(|r| r.name()).collect()
}

#[test]
fn names_are_deterministic_and_fit_a_label() {
    assert_eq!(run_name("nightly", None, t(1)), "nightly-1772326800");
    assert_eq!(run_name("all", Some("vm1"), t(1)), "all-vm1-1772326800");
    let long = "a".repeat(80);
    let n = run_name(&long, Some("vm"), t(1));
    assert!(n.len() <= 63, "{n}");
    assert_eq!(n, run_name(&long, Some("vm"), t(1)));
    assert_ne!(
        n,
        run_name(&long, Some("vn"), t(1)),
        "different VMs, different names"
    );
}

#[test]
fn chains_restart_every_full_every_runs() {
    let s = schedule(true, Some(2), None);
    let runs = history(&s, &[BackupPhase::Succeeded; 7]);
    let incremental: Vec<Option<String>> = runs
        .iter()
        .rev()
        .map(|r| r.backup.spec.incremental.clone())
        .collect();
    let n = |h: u32| Some(run_name("nightly", None, t(h)));
    assert_eq!(incremental, [None, n(0), n(1), None, n(3), n(4), None]);
    // Every run creates the checkpoint the next builds on, and carries its data away on deletion.
    for r in &runs {
        assert_eq!(r.checkpoint(), Some(r.name().as_str()));
        assert_eq!(r.backup.spec.deletion_policy, Some(DeletionPolicy::Delete));
        assert_eq!(r.backup.owner_references()[0].uid, "sched-uid");
        assert_eq!(r.backup.labels()[SCHEDULE_LABEL], "nightly");
        assert!(!r.backup.spec.fallback_to_full);
    }
}

#[test]
fn every_run_full_needs_no_checkpoint() {
    let s = schedule(true, Some(0), None);
    let runs = history(&s, &[BackupPhase::Succeeded; 3]);
    assert!(runs.iter().all(|r| r.backup.spec.incremental.is_none()));
    assert!(runs.iter().all(|r| r.checkpoint().is_none()));
}

#[test]
fn repository_chains_do_not_restart_by_default() {
    let s = schedule(false, None, None);
    let runs = history(&s, &[BackupPhase::Succeeded; 10]);
    assert_eq!(
        names(&runs, |r| r.backup.spec.incremental.is_none()).len(),
        1
    );
}

#[test]
fn after_a_failure_the_next_run_builds_on_the_last_success_and_may_fall_back() {
    let s = schedule(true, Some(4), None);
    let runs = history(
        &s,
        &[
            BackupPhase::Succeeded,
            BackupPhase::Failed,
            BackupPhase::Succeeded,
        ],
    );
    let third = &runs[0];
    assert_eq!(
        third.backup.spec.incremental.as_deref(),
        Some(run_name("nightly", None, t(0)).as_str())
    );
    assert!(third.backup.spec.fallback_to_full);
    assert_eq!(third.chain_index(), 1);
}

#[test]
fn an_unusable_base_starts_a_new_chain() {
    let s = schedule(true, Some(4), None);
    let runs = history(&s, &[BackupPhase::Succeeded]);
    let b = next_backup(&s, "vm1", t(1), &runs, |_| false);
    assert_eq!(b.spec.incremental, None);
    assert!(
        !b.spec.fallback_to_full,
        "fallbackToFull only with incremental (CEL)"
    );
}

#[test]
fn retention_keeps_whole_chains_for_directories() {
    // Chains of 3: [0 1 2] [3 4 5] [6 7]; keepLast 4 keeps 4..7, and 4 needs 3.
    let s = schedule(
        true,
        Some(2),
        Some(Retention {
            keep_last: Some(4),
            ..Default::default()
        }),
    );
    let runs = history(&s, &[BackupPhase::Succeeded; 8]);
    let p = prune(&s, &runs, chrono_tz::Tz::UTC);
    let n = |h: u32| run_name("nightly", None, t(h));
    assert_eq!(p.kept, [n(7), n(6), n(5), n(4), n(3)]);
    assert_eq!(p.delete, [n(2), n(1), n(0)]);
    // A repository snapshot restores alone: exactly keepLast.
    let s = schedule(
        false,
        Some(2),
        Some(Retention {
            keep_last: Some(4),
            ..Default::default()
        }),
    );
    let runs = history(&s, &[BackupPhase::Succeeded; 8]);
    assert_eq!(
        prune(&s, &runs, chrono_tz::Tz::UTC).kept,
        [n(7), n(6), n(5), n(4)]
    );
}

#[test]
fn retention_drops_old_failures_and_keeps_running_backups() {
    let s = schedule(
        true,
        Some(9),
        Some(Retention {
            keep_last: Some(1),
            ..Default::default()
        }),
    );
    use BackupPhase::*;
    let runs = history(
        &s,
        &[Failed, Succeeded, Cancelled, Succeeded, Failed, Running],
    );
    let p = prune(&s, &runs, chrono_tz::Tz::UTC);
    let n = |h: u32| run_name("nightly", None, t(h));
    // 3 is kept and needs 1 (its base); the failure newer than every success (4) is kept.
    assert_eq!(p.kept, [n(3), n(1)]);
    assert_eq!(p.delete, [n(2), n(0)]);
}

#[test]
fn only_the_next_base_and_running_checkpoints_are_needed() {
    let s = schedule(true, Some(9), None);
    use BackupPhase::*;
    let runs = history(&s, &[Succeeded, Succeeded, Failed, Running]);
    let cps: Vec<Arc<VirtualMachineCheckpoint>> = (0..4)
        .map(|h| {
            Arc::new(VirtualMachineCheckpoint::new(
                &run_name("nightly", None, t(h)),
                Default::default(),
            ))
        })
        .collect();
    let n = |h: u32| run_name("nightly", None, t(h));
    // 1 is the newest success (and the running run's base); 3 is being created.
    assert_eq!(unneeded_checkpoints(&runs, &cps), [n(0), n(2)]);
}

#[test]
fn forbid_skips_replace_cancels() {
    let mut s = schedule(true, None, None);
    let runs = history(&s, &[BackupPhase::Succeeded, BackupPhase::Running]);
    assert_eq!(decide_run(&s, &runs, t(1)), RunDecision::Done);
    assert!(matches!(decide_run(&s, &runs, t(2)), RunDecision::Skip(_)));
    s.spec.concurrency_policy = Some(cairn_api::ConcurrencyPolicy::Replace);
    assert_eq!(
        decide_run(&s, &runs, t(2)),
        RunDecision::Replace(vec![run_name("nightly", None, t(1))])
    );
    let done = history(&s, &[BackupPhase::Succeeded]);
    assert_eq!(decide_run(&s, &done, t(1)), RunDecision::Start);
}
