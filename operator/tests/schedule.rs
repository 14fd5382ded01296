//! VirtualMachineBackupSchedules against a real kube-apiserver, with the
//! operator in process. No agent and no QEMU: the test plays the agent
//! (finishes the backups it is told to, confirms cleanups), so every
//! decision of the schedule — which runs, full or incremental, which backups
//! and checkpoints go — is checked on the API objects. Files, bitmaps and
//! restores are checked end to end in e2e/tests/schedule.rs.

mod in_process;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Result, bail};
use cairn_api::{
    BackupPhase, CHAIN_INDEX_ANNOTATION, SCHEDULE_LABEL, SCHEDULED_TIME_ANNOTATION,
    VirtualMachineBackup, VirtualMachineBackupSchedule, VirtualMachineCheckpoint, conditions,
};
use cairn_e2e::harness::TestEnv;
use in_process::{create_vm, eventually, start};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

/// How the pretend agent finishes the backups routed to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AgentMode {
    Succeed,
    Fail,
    /// Leave them Running.
    Hold,
}

/// Plays the agent for `ns`: finishes routed backups as `mode` says, makes
/// checkpoints Ready, and confirms every cleanup (`CleanedUp=True`) so the
/// operator removes the finalizers of deleted objects.
fn pretend_agent(
    client: Client,
    ns: String,
    mode: Arc<Mutex<AgentMode>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let backups: Api<VirtualMachineBackup> = Api::namespaced(client.clone(), &ns);
        let cps: Api<VirtualMachineCheckpoint> = Api::namespaced(client.clone(), &ns);
        let cond = |t: &str, s: &str, r: &str| json!({"type": t, "status": s, "reason": r, "message": r, "lastTransitionTime": "2026-01-01T00:00:00Z"});
        loop {
            let m = *mode.lock().unwrap();
            for b in backups
                .list(&ListParams::default())
                .await
                .map(|l| l.items)
                .unwrap_or_default()
            {
                let st = b.status.clone().unwrap_or_default();
                let accepted = conditions::is_true(&st.conditions, "Accepted");
                let body = if b.metadata.deletion_timestamp.is_some() {
                    if conditions::is_true(&st.conditions, "CleanedUp") {
                        continue;
                    }
                    json!({"conditions": [cond("CleanedUp", "True", "Cleaned")]})
                } else if accepted && !st.phase.is_some_and(BackupPhase::is_finished) {
                    match m {
                        AgentMode::Succeed => {
                            json!({"phase": "Succeeded", "conditions": [cond("Ready", "True", "Completed")]})
                        }
                        AgentMode::Fail => {
                            json!({"phase": "Failed", "failureReason": "the VM has no QMP socket", "conditions": [cond("Ready", "False", "VirtualMachineNotRunning")]})
                        }
                        AgentMode::Hold if st.phase != Some(BackupPhase::Running) => {
                            json!({"phase": "Running"})
                        }
                        AgentMode::Hold => continue,
                    }
                } else {
                    continue;
                };
                let _ = backups
                    .patch_status(
                        &b.name_any(),
                        &PatchParams::apply(cairn_api::AGENT_MANAGER).force(),
                        &Patch::Apply(json!({"apiVersion": "cairn.dev/v1alpha1", "kind": "VirtualMachineBackup", "status": body})),
                    )
                    .await;
            }
            for c in cps
                .list(&ListParams::default())
                .await
                .map(|l| l.items)
                .unwrap_or_default()
            {
                let st = c.status.clone().unwrap_or_default();
                let body = if c.metadata.deletion_timestamp.is_some() {
                    if conditions::is_true(&st.conditions, "CleanedUp") {
                        continue;
                    }
                    json!({"conditions": [cond("CleanedUp", "True", "BitmapsRemoved")]})
                } else {
                    continue;
                };
                let _ = cps
                    .patch_status(
                        &c.name_any(),
                        &PatchParams::apply(cairn_api::AGENT_MANAGER).force(),
                        &Patch::Apply(json!({"apiVersion": "cairn.dev/v1alpha1", "kind": "VirtualMachineCheckpoint", "status": body})),
                    )
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    })
}

fn schedule(name: &str, spec: serde_json::Value) -> Result<VirtualMachineBackupSchedule> {
    let mut full = json!({
        "virtualMachine": "vm1",
        "schedule": "* * * * * *",
        "template": {"target": {"directory": {"path": "/backups/ns/vm1"}}},
    });
    for (k, v) in spec.as_object().unwrap() {
        full[k] = v.clone();
    }
    Ok(serde_json::from_value(json!({
        "apiVersion": "cairn.dev/v1alpha1", "kind": "VirtualMachineBackupSchedule",
        "metadata": {"name": name}, "spec": full
    }))?)
}

async fn set_spec(
    api: &Api<VirtualMachineBackupSchedule>,
    name: &str,
    spec: serde_json::Value,
) -> Result<()> {
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": spec})),
    )
    .await?;
    Ok(())
}

/// The schedule's backups (label), oldest first.
async fn runs(
    api: &Api<VirtualMachineBackup>,
    schedule: &str,
) -> Result<Vec<VirtualMachineBackup>> {
    let mut v: Vec<VirtualMachineBackup> = api
        .list(&ListParams::default().labels(&format!("{SCHEDULE_LABEL}={schedule}")))
        .await?
        .items
        .into_iter()
        .filter(|b| b.metadata.deletion_timestamp.is_none())
        .collect();
    v.sort_by_key(|b| b.annotations().get(SCHEDULED_TIME_ANNOTATION).cloned());
    Ok(v)
}

fn index(b: &VirtualMachineBackup) -> u32 {
    b.annotations()[CHAIN_INDEX_ANNOTATION].parse().unwrap()
}

fn phase(b: &VirtualMachineBackup) -> Option<BackupPhase> {
    b.status.as_ref().and_then(|s| s.phase)
}

fn condition(s: &VirtualMachineBackupSchedule, t: &str) -> Option<(String, String)> {
    let st = s.status.as_ref()?;
    conditions::find(&st.conditions, t).map(|c| (c.status.clone(), c.reason.clone()))
}

/// Suspends the schedule and waits until none of its runs is unfinished.
async fn suspend_and_settle(
    schedules: &Api<VirtualMachineBackupSchedule>,
    backups: &Api<VirtualMachineBackup>,
    name: &str,
) -> Result<()> {
    set_spec(schedules, name, json!({"suspend": true})).await?;
    eventually("runs settled", || async {
        let r = runs(backups, name).await?;
        Ok(r.iter()
            .all(|b| phase(b).is_some_and(BackupPhase::is_finished))
            .then_some(()))
    })
    .await
}

/// A namespace with an in-process operator, the pretend agent in `mode`,
/// and VM `vm1`.
struct Fixture {
    env: TestEnv,
    op: in_process::Running,
    agent: tokio::task::JoinHandle<()>,
    mode: Arc<Mutex<AgentMode>>,
    schedules: Api<VirtualMachineBackupSchedule>,
    backups: Api<VirtualMachineBackup>,
}

impl Fixture {
    async fn new(test: &str, mode: AgentMode) -> Result<Self> {
        let env = TestEnv::new(test).await?;
        let op = start(&env, &format!("op-{test}"));
        let mode = Arc::new(Mutex::new(mode));
        let agent = pretend_agent(env.client.clone(), env.namespace.clone(), mode.clone());
        create_vm(&env.client, &env.namespace, "vm1", "node-1").await?;
        Ok(Self {
            schedules: Api::namespaced(env.client.clone(), &env.namespace),
            backups: Api::namespaced(env.client.clone(), &env.namespace),
            env,
            op,
            agent,
            mode,
        })
    }
}

#[tokio::test]
async fn runs_chain_every_full_every_and_retention_keeps_whole_chains() -> Result<()> {
    let Fixture {
        env,
        op,
        agent,
        mode: _,
        schedules,
        backups,
    } = Fixture::new("sched-chain", AgentMode::Succeed).await?;
    let ns = env.namespace.clone();
    let cps: Api<VirtualMachineCheckpoint> = Api::namespaced(env.client.clone(), &ns);
    schedules
        .create(
            &PostParams::default(),
            &schedule("s", json!({"fullEvery": 2, "retention": {"keepLast": 2}}))?,
        )
        .await?;

    // Every run is recorded as it appears (retention deletes the old ones).
    let mut seen: Vec<VirtualMachineBackup> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while seen.len() < 8 {
        for b in runs(&backups, "s").await? {
            if !seen.iter().any(|s| s.name_any() == b.name_any()) {
                seen.push(b);
            }
        }
        if tokio::time::Instant::now() > deadline {
            bail!("only {} runs", seen.len());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    suspend_and_settle(&schedules, &backups, "s").await?;
    for b in runs(&backups, "s").await? {
        if !seen.iter().any(|s| s.name_any() == b.name_any()) {
            seen.push(b);
        }
    }
    seen.sort_by_key(|b| b.annotations()[SCHEDULED_TIME_ANNOTATION].clone());

    // A full backup, two incrementals, each from the run before; again.
    for (i, b) in seen.iter().enumerate() {
        assert_eq!(index(b), (i % 3) as u32, "{}: chain index", b.name_any());
        let want_base = (i % 3 != 0).then(|| seen[i - 1].name_any());
        assert_eq!(
            b.spec.incremental,
            want_base,
            "{}: incremental base",
            b.name_any()
        );
        assert_eq!(
            b.spec.checkpoint.as_ref().map(|c| c.name.clone()),
            Some(b.name_any())
        );
        assert_eq!(
            b.spec.deletion_policy,
            Some(cairn_api::DeletionPolicy::Delete)
        );
        assert_eq!(b.owner_references().len(), 1);
        let t = chrono::DateTime::parse_from_rfc3339(&b.annotations()[SCHEDULED_TIME_ANNOTATION])?;
        assert_eq!(
            b.name_any(),
            format!("s-{}", t.timestamp()),
            "deterministic name"
        );
    }

    // keepLast 2: the two newest, and the chain the older one needs, nothing else.
    let n = seen.len();
    let mut want: BTreeSet<String> = [n - 1, n - 2].iter().map(|&i| seen[i].name_any()).collect();
    let mut i = n - 2;
    while index(&seen[i]) > 0 {
        i -= 1;
        want.insert(seen[i].name_any());
    }
    let now: BTreeSet<String> = eventually("retention applied", || async {
        let now: BTreeSet<String> = runs(&backups, "s")
            .await?
            .iter()
            .map(|b| b.name_any())
            .collect();
        Ok((now == want).then_some(now))
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}; want {want:?}"))?;
    assert!(now.len() < n, "nothing was pruned");

    // Checkpoints: only the newest run's is left (the next run's base).
    let newest = seen[n - 1].name_any();
    eventually("checkpoints pruned", || async {
        let left: Vec<String> = cps
            .list(&ListParams::default().labels(&format!("{SCHEDULE_LABEL}=s")))
            .await?
            .items
            .into_iter()
            .filter(|c| c.metadata.deletion_timestamp.is_none())
            .map(|c| c.name_any())
            .collect();
        Ok((left == [newest.clone()]).then_some(()))
    })
    .await?;

    // Status, conditions, metrics.
    let s = eventually("status", || async {
        let s = schedules.get("s").await?;
        let st = s.status.clone().unwrap_or_default();
        Ok((st.kept_backups.len() == want.len() && st.active.is_empty()).then_some(s))
    })
    .await?;
    let st = s.status.clone().unwrap();
    assert_eq!(st.kept_backups.first(), Some(&newest));
    assert_eq!(condition(&s, "Ready").unwrap().0, "True");
    assert_eq!(
        condition(&s, "Suspended").unwrap(),
        ("True".into(), "Suspended".into())
    );
    assert_eq!(
        condition(&s, "LastRunFailed").unwrap(),
        ("False".into(), "Succeeded".into())
    );
    assert!(st.next_schedule_time.is_none(), "suspended: no next run");
    let newest_time = chrono::DateTime::parse_from_rfc3339(
        &seen[n - 1].annotations()[SCHEDULED_TIME_ANNOTATION],
    )?;
    assert_eq!(
        st.last_successful_time.map(|t| t.0.as_second()),
        Some(newest_time.timestamp())
    );
    let line = format!(
        "cairn_operator_schedule_last_success_timestamp_seconds{{namespace=\"{ns}\",schedule=\"s\"}} {}",
        newest_time.timestamp()
    );
    eventually("the last-success gauge", || async {
        Ok(op.status.metrics_text().contains(&line).then_some(()))
    })
    .await?;
    // A deleted schedule's series goes (else its alert would fire forever).
    schedules.delete("s", &Default::default()).await?;
    let series = format!("namespace=\"{ns}\",schedule=\"s\"}}");
    eventually("the series of the deleted schedule dropped", || async {
        Ok((!op.status.metrics_text().contains(&series)).then_some(()))
    })
    .await?;

    agent.abort();
    op.stop().await;
    Ok(())
}

#[tokio::test]
async fn forbid_replace_failures_and_recovery() -> Result<()> {
    let Fixture {
        env,
        op,
        agent,
        mode,
        schedules,
        backups,
    } = Fixture::new("sched-conc", AgentMode::Hold).await?;
    let ns = env.namespace.clone();
    schedules
        .create(
            &PostParams::default(),
            &schedule("s", json!({"fullEvery": 9}))?,
        )
        .await?;

    // Forbid: while the first run runs, no other starts, however many seconds pass.
    let first = eventually("the first run running", || async {
        let r = runs(&backups, "s").await?;
        Ok(r.first()
            .filter(|b| phase(b) == Some(BackupPhase::Running))
            .map(|b| b.name_any()))
    })
    .await?;
    let s = eventually("active reported", || async {
        let s = schedules.get("s").await?;
        Ok((s
            .status
            .as_ref()
            .is_some_and(|st| st.active == [first.clone()]))
        .then_some(s))
    })
    .await?;
    let last = s.status.unwrap().last_schedule_time.unwrap().0;
    // Three scheduled seconds after the one that started it.
    while k8s_openapi::jiff::Timestamp::now().as_second() < last.as_second() + 4 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = runs(&backups, "s").await?;
    assert_eq!(
        r.len(),
        1,
        "Forbid started another run: {:?}",
        r.iter().map(|b| b.name_any()).collect::<Vec<_>>()
    );

    // Replace: the running one is cancelled (deleted) for the next.
    set_spec(&schedules, "s", json!({"concurrencyPolicy": "Replace"})).await?;
    eventually("the first run replaced", || async {
        let r = runs(&backups, "s").await?;
        Ok((!r.iter().any(|b| b.name_any() == first) && !r.is_empty()).then_some(()))
    })
    .await?;

    // A failed run is reported with its reason ...
    *mode.lock().unwrap() = AgentMode::Fail;
    let s = eventually("LastRunFailed", || async {
        let s = schedules.get("s").await?;
        Ok((condition(&s, "LastRunFailed").is_some_and(|c| c.0 == "True")).then_some(s))
    })
    .await?;
    let (_, reason) = condition(&s, "LastRunFailed").unwrap();
    assert_eq!(reason, "VirtualMachineNotRunning");
    // ... and the next one recovers: full (no success to build on yet), then incremental.
    *mode.lock().unwrap() = AgentMode::Succeed;
    eventually("recovered", || async {
        let s = schedules.get("s").await?;
        Ok((condition(&s, "LastRunFailed").is_some_and(|c| c.0 == "False")).then_some(()))
    })
    .await?;
    let inc = eventually("an incremental after the recovery", || async {
        Ok(runs(&backups, "s")
            .await?
            .into_iter()
            .find(|b| b.spec.incremental.is_some() && phase(b) == Some(BackupPhase::Succeeded)))
    })
    .await?;
    let base = backups
        .get(inc.spec.incremental.as_deref().unwrap())
        .await?;
    assert_eq!(
        phase(&base),
        Some(BackupPhase::Succeeded),
        "an incremental builds on a success"
    );
    suspend_and_settle(&schedules, &backups, "s").await?;
    // Only the newest failure newer than every success is kept: none now.
    eventually("old failures pruned", || async {
        let r = runs(&backups, "s").await?;
        Ok((!r.iter().any(|b| phase(b) == Some(BackupPhase::Failed))).then_some(()))
    })
    .await?;
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(env.client.clone(), &ns);
    eventually("events", || async {
        let seen: Vec<String> = events
            .list(&Default::default())
            .await?
            .items
            .into_iter()
            .filter_map(|e| e.reason)
            .collect();
        Ok([
            "Scheduled",
            "Replaced",
            "RunFailed",
            "RunSucceeded",
            "Pruned",
        ]
        .iter()
        .all(|r| seen.iter().any(|s| s == r))
        .then_some(()))
    })
    .await?;
    agent.abort();
    op.stop().await;
    Ok(())
}

#[tokio::test]
async fn an_operator_down_across_scheduled_times_makes_one_run_not_a_burst() -> Result<()> {
    let Fixture {
        env,
        op,
        agent,
        mode: _,
        schedules,
        backups,
    } = Fixture::new("sched-restart", AgentMode::Succeed).await?;
    schedules
        .create(
            &PostParams::default(),
            &schedule("s", json!({"schedule": "*/3 * * * * *"}))?,
        )
        .await?;
    eventually("a first run", || async {
        Ok(runs(&backups, "s")
            .await?
            .into_iter()
            .find(|b| phase(b) == Some(BackupPhase::Succeeded)))
    })
    .await?;
    op.stop().await;
    let stopped = k8s_openapi::jiff::Timestamp::now().as_second();
    let before: BTreeSet<String> = runs(&backups, "s")
        .await?
        .iter()
        .map(|b| b.name_any())
        .collect();
    // Down across at least three scheduled times.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let restarted = k8s_openapi::jiff::Timestamp::now().as_second();
    let op = start(&env, "op-sched-restart-2");
    let made = eventually("the catch-up run", || async {
        let new: Vec<VirtualMachineBackup> = runs(&backups, "s")
            .await?
            .into_iter()
            .filter(|b| !before.contains(&b.name_any()))
            .collect();
        Ok((!new.is_empty()).then_some(new))
    })
    .await?;
    suspend_and_settle(&schedules, &backups, "s").await?;
    let missed: Vec<i64> = runs(&backups, "s")
        .await?
        .iter()
        .filter(|b| !before.contains(&b.name_any()))
        .map(|b| {
            chrono::DateTime::parse_from_rfc3339(&b.annotations()[SCHEDULED_TIME_ANNOTATION])
                .unwrap()
                .timestamp()
        })
        .filter(|t| *t > stopped && *t <= restarted)
        .collect();
    // Exactly one run for the times missed while down: the newest of them.
    assert_eq!(
        missed.len(),
        1,
        "{missed:?} (made {:?})",
        made.iter().map(|b| b.name_any()).collect::<Vec<_>>()
    );
    assert!(
        missed[0] > restarted - 3,
        "not the newest missed time: {missed:?}, restarted {restarted}"
    );
    agent.abort();
    op.stop().await;
    Ok(())
}

#[tokio::test]
async fn bad_schedules_are_refused_or_reported() -> Result<()> {
    let env = TestEnv::new("sched-bad").await?;
    let ns = env.namespace.clone();
    let op = start(&env, "op-sched-bad");
    let schedules: Api<VirtualMachineBackupSchedule> = Api::namespaced(env.client.clone(), &ns);
    let pp = PostParams::default();
    // The schema refuses what it can tell.
    for (spec, msg) in [
        (
            json!({"selector": {"matchLabels": {"a": "b"}}}),
            "exactly one of virtualMachine or selector",
        ),
        (json!({"schedule": "* *"}), "schedule"),
        (
            json!({"template": {"target": {"nbd": {}}}}),
            "template.target needs directory or repository",
        ),
        (json!({"fullEvery": -1}), "fullEvery"),
    ] {
        let err = schedules
            .create(&pp, &schedule("bad", spec.clone())?)
            .await
            .unwrap_err();
        assert!(err.to_string().contains(msg), "{spec}: {err}");
    }
    // What only the operator can tell is a condition naming the problem.
    schedules
        .create(&pp, &schedule("zone", json!({"timeZone": "Mars/Olympus"}))?)
        .await?;
    schedules
        .create(&pp, &schedule("novm", json!({"virtualMachine": "nope"}))?)
        .await?;
    for (name, reason, needle) in [
        ("zone", "InvalidSchedule", "Mars/Olympus"),
        ("novm", "VirtualMachineNotFound", "nope"),
    ] {
        let s = eventually(name, || async {
            let s = schedules.get(name).await?;
            Ok(condition(&s, "Ready")
                .is_some_and(|c| c.0 == "False")
                .then_some(s))
        })
        .await?;
        assert_eq!(condition(&s, "Ready").unwrap().1, reason);
        // kstatus: an invalid schedule is Failed (Stalled), a missing VM is not.
        let stalled = condition(&s, "Stalled").unwrap();
        assert_eq!(
            stalled.0 == "True",
            reason == "InvalidSchedule",
            "{stalled:?}"
        );
        let conds = s.status.unwrap().conditions;
        let msg = &conditions::find(&conds, "Ready").unwrap().message;
        assert!(msg.contains(needle), "{msg}");
    }
    let backups: Api<VirtualMachineBackup> = Api::namespaced(env.client.clone(), &ns);
    assert!(
        backups.list(&Default::default()).await?.items.is_empty(),
        "a run started anyway"
    );
    op.stop().await;
    Ok(())
}
