//! The VirtualMachineBackupSchedule controller.
//!
//! ```text
//! reconcile(schedule)
//!   1. resolve   parse schedule + timeZone; the VMs (one, or the selector's, same namespace only);
//!                the schedule's backups per VM (owner reference UID) and checkpoints (label)
//!   2. due       timing::due: the newest scheduled time not handled yet, CronJob's missed-run rules
//!   3. plan      per VM, plan_vm: the run to create (full or incremental from the previous run's
//!                checkpoint), Forbid/Replace, the backups retention drops, the checkpoints no run needs
//!   4. apply     create the run, delete replaced/pruned backups and unneeded checkpoints
//!   5. report    status (server-side apply), events, the last-success gauge; requeue at the next time
//! ```
//!
//! Names are deterministic (`<schedule>[-<vm>]-<unix seconds>` of the
//! scheduled time), so a restarted operator finds the run it created and never
//! doubles it. Every run creates a checkpoint named like itself, which the
//! next run is incremental from; pruned backups carry `deletionPolicy: Delete`
//! so their files or repository snapshots go with them.

pub mod retention;
pub mod timing;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use cairn_api::conditions::{NewCondition, set_condition};
use cairn_api::{
    BackupCheckpoint, BackupPhase, CHAIN_INDEX_ANNOTATION, DeletionPolicy, SCHEDULE_LABEL,
    SCHEDULED_TIME_ANNOTATION, VM_LABEL, VirtualMachineBackup, VirtualMachineBackupSchedule,
    VirtualMachineBackupScheduleStatus, VirtualMachineBackupSpec, VirtualMachineCheckpoint,
    condition_types,
};
use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ObjectMeta, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};

use crate::context::Context;
use crate::error::{Error, Result};
use crate::routing;
use timing::{CronSchedule, Due};

/// Name of this controller in metrics and logs.
pub const CONTROLLER: &str = "schedule";
/// Condition: the newest finished run failed.
pub const LAST_RUN_FAILED: &str = "LastRunFailed";
/// Condition: `spec.suspend` is set.
pub const SUSPENDED: &str = "Suspended";
/// Reason: the cron expression or time zone is invalid.
pub const REASON_INVALID_SCHEDULE: &str = "InvalidSchedule";
/// Reason: the selector matches no VM of the namespace.
pub const REASON_NO_VMS: &str = "NoVirtualMachinesSelected";
/// `fullEvery` of directory targets when not given.
pub const DEFAULT_FULL_EVERY_DIRECTORY: u32 = 7;
/// The longest a schedule waits before it looks again (new VMs, finished runs).
pub const RECHECK: Duration = Duration::from_secs(60);
/// How often the last-success series of deleted schedules are dropped.
pub const METRICS_SWEEP: Duration = Duration::from_secs(10);
/// How soon a schedule looks again while one of its runs is active.
pub const ACTIVE_RECHECK: Duration = Duration::from_secs(2);

/// One backup of a schedule, as the planner sees it.
#[derive(Clone, Debug)]
pub struct Run {
    /// The backup.
    pub backup: Arc<VirtualMachineBackup>,
    /// Its scheduled time.
    pub time: DateTime<Utc>,
}

impl Run {
    /// A run from an owned backup (its scheduled-time annotation, else its creation).
    pub fn of(backup: Arc<VirtualMachineBackup>) -> Option<Self> {
        let time = backup
            .annotations()
            .get(SCHEDULED_TIME_ANNOTATION)
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc))
            .or_else(|| {
                let c = backup.meta().creation_timestamp.as_ref()?;
                DateTime::from_timestamp_millis(c.0.as_millisecond())
            })?;
        Some(Self { backup, time })
    }
    fn name(&self) -> String {
        self.backup.name_any()
    }
    fn phase(&self) -> Option<BackupPhase> {
        self.backup.status.as_ref().and_then(|s| s.phase)
    }
    fn succeeded(&self) -> bool {
        self.phase() == Some(BackupPhase::Succeeded)
    }
    fn finished(&self) -> bool {
        self.phase().is_some_and(BackupPhase::is_finished)
    }
    fn chain_index(&self) -> u32 {
        self.backup
            .annotations()
            .get(CHAIN_INDEX_ANNOTATION)
            .and_then(|i| i.parse().ok())
            .unwrap_or(0)
    }
    fn checkpoint(&self) -> Option<&str> {
        self.backup
            .spec
            .checkpoint
            .as_ref()
            .map(|c| c.name.as_str())
    }
}

/// The name of the run of `schedule` for `vm` (when the schedule has a
/// selector) at `time`: at most 63 characters, so it can be a label value
/// (the checkpoint it creates is labelled with it).
pub fn run_name(schedule: &str, vm: Option<&str>, time: DateTime<Utc>) -> String {
    let prefix = match vm {
        Some(vm) => format!("{schedule}-{vm}"),
        None => schedule.to_string(),
    };
    let suffix = time.timestamp().to_string();
    if prefix.len() + 1 + suffix.len() <= 63 {
        return format!("{prefix}-{suffix}");
    }
    // FNV-1a: stable across releases, unlike std's hasher.
    let hash = prefix.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let room = 63 - suffix.len() - 1 - 8 - 1;
    let short = prefix[..room].trim_end_matches(['-', '.']);
    format!("{short}-{:08x}-{suffix}", hash as u32)
}

/// The runs of one VM, newest first.
pub fn sorted(mut runs: Vec<Run>) -> Vec<Run> {
    runs.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| b.name().cmp(&a.name())));
    runs
}

/// Effective `fullEvery` (see the field's docs).
pub fn full_every(schedule: &VirtualMachineBackupSchedule) -> u32 {
    match schedule.spec.full_every {
        Some(n) => u32::try_from(n.max(0)).unwrap_or(0),
        None if directory_target(schedule) => DEFAULT_FULL_EVERY_DIRECTORY,
        None => u32::MAX,
    }
}

fn directory_target(schedule: &VirtualMachineBackupSchedule) -> bool {
    schedule.spec.template.target.directory.is_some()
}

/// Step 3a: the backup of the run at `time` for `vm`, given that VM's earlier
/// runs (newest first) and whether a checkpoint is still usable as a base.
///
/// Incremental from the newest succeeded run's checkpoint while that chain
/// holds fewer than `fullEvery` incrementals; full otherwise (a new chain). After a failed
/// run the next one falls back to full on any disk whose base is unusable.
pub fn next_backup(
    schedule: &VirtualMachineBackupSchedule,
    vm: &str,
    time: DateTime<Utc>,
    runs: &[Run],
    checkpoint_usable: impl Fn(&str) -> bool,
) -> VirtualMachineBackup {
    let every = full_every(schedule);
    let selector = schedule.spec.selector.is_some();
    let name = run_name(&schedule.name_any(), selector.then_some(vm), time);
    let base = runs
        .iter()
        .find(|r| r.succeeded())
        .filter(|r| r.chain_index() < every)
        .and_then(|r| Some((r.checkpoint()?.to_string(), r.chain_index() + 1)))
        .filter(|(cp, _)| checkpoint_usable(cp));
    let last_failed = runs
        .iter()
        .find(|r| r.finished())
        .is_some_and(|r| !r.succeeded());
    let (incremental, index) = match base {
        Some((cp, i)) => (Some(cp), i),
        None => (None, 0),
    };
    let t = &schedule.spec.template;
    let labels = BTreeMap::from([
        (SCHEDULE_LABEL.to_string(), schedule.name_any()),
        (VM_LABEL.to_string(), vm.to_string()),
        ("app.kubernetes.io/part-of".to_string(), "cairn".to_string()),
    ]);
    let annotations = BTreeMap::from([
        (
            SCHEDULED_TIME_ANNOTATION.to_string(),
            time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        ),
        (CHAIN_INDEX_ANNOTATION.to_string(), index.to_string()),
    ]);
    VirtualMachineBackup {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: schedule.namespace(),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: owner_reference(schedule).map(|o| vec![o]),
            ..Default::default()
        },
        spec: VirtualMachineBackupSpec {
            virtual_machine: vm.to_string(),
            fallback_to_full: incremental.is_some() && (t.fallback_to_full || last_failed),
            incremental,
            // With fullEvery 0 no run builds on another: no checkpoint, no bitmap.
            checkpoint: (every > 0).then_some(BackupCheckpoint { name }),
            disks: t.disks.clone(),
            target: Some(t.target.clone()),
            deletion_policy: Some(DeletionPolicy::Delete),
            ..Default::default()
        },
        status: None,
    }
}

fn owner_reference(schedule: &VirtualMachineBackupSchedule) -> Option<OwnerReference> {
    Some(OwnerReference {
        api_version: VirtualMachineBackupSchedule::api_version(&()).into_owned(),
        kind: VirtualMachineBackupSchedule::kind(&()).into_owned(),
        name: schedule.name_any(),
        uid: schedule.uid()?,
        controller: Some(true),
        block_owner_deletion: None,
    })
}

/// What retention decides for one VM's runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pruning {
    /// Succeeded backups kept, newest first.
    pub kept: Vec<String>,
    /// Backups to delete (with their data).
    pub delete: Vec<String>,
}

/// Step 3b: which of one VM's runs (newest first) retention keeps.
///
/// Succeeded runs: Proxmox's rules ([`retention::select`]); the newest is
/// always kept (the next run builds on it), and for directory targets every
/// backup a kept incremental is backed by is kept too. Failed and cancelled
/// runs: only the newest one, and only while it is newer than every success
/// (as Proxmox keeps the last failed backup). Running backups are never pruned.
pub fn prune(
    schedule: &VirtualMachineBackupSchedule,
    runs: &[Run],
    zone: chrono_tz::Tz,
) -> Pruning {
    let succeeded: Vec<&Run> = runs.iter().filter(|r| r.succeeded()).collect();
    let times: Vec<DateTime<Utc>> = succeeded.iter().map(|r| r.time).collect();
    let retention = schedule.spec.retention.clone().unwrap_or_default();
    let mut keep: HashSet<usize> = retention::select(&times, &retention, zone);
    if !succeeded.is_empty() {
        keep.insert(0);
    }
    let mut kept: HashSet<String> = keep.iter().map(|&i| succeeded[i].name()).collect();
    if directory_target(schedule) {
        // A kept incremental needs every backup of its chain before it.
        let by_checkpoint: BTreeMap<&str, &Run> = runs
            .iter()
            .filter_map(|r| Some((r.checkpoint()?, r)))
            .collect();
        let mut todo: Vec<&Run> = keep.iter().map(|&i| succeeded[i]).collect();
        while let Some(r) = todo.pop() {
            if let Some(parent) = r
                .backup
                .spec
                .incremental
                .as_deref()
                .and_then(|b| by_checkpoint.get(b))
                && kept.insert(parent.name())
            {
                todo.push(parent);
            }
        }
    }
    let newest_success = succeeded.first().map(|r| r.time);
    let newest_failure = runs
        .iter()
        .find(|r| r.finished() && !r.succeeded())
        .filter(|r| newest_success.is_none_or(|s| r.time > s))
        .map(Run::name);
    let mut out = Pruning::default();
    for r in runs {
        let name = r.name();
        if r.succeeded() {
            if kept.contains(&name) {
                out.kept.push(name);
            } else {
                out.delete.push(name);
            }
        } else if r.finished() && newest_failure.as_ref() != Some(&name) {
            out.delete.push(name);
        }
    }
    out
}

/// Step 3c: checkpoints of the schedule for one VM that no run needs: every
/// one except the newest succeeded run's (the next base) and those running
/// backups create or build on. So a VM carries one bitmap per schedule, two
/// while a run is under way.
pub fn unneeded_checkpoints(
    runs: &[Run],
    checkpoints: &[Arc<VirtualMachineCheckpoint>],
) -> Vec<String> {
    let mut needed: HashSet<&str> = HashSet::new();
    if let Some(cp) = runs
        .iter()
        .find(|r| r.succeeded())
        .and_then(Run::checkpoint)
    {
        needed.insert(cp);
    }
    for r in runs.iter().filter(|r| !r.finished()) {
        needed.extend(r.checkpoint());
        needed.extend(r.backup.spec.incremental.as_deref());
    }
    checkpoints
        .iter()
        .filter(|c| !routing::deleting(c.as_ref()))
        .map(|c| c.name_any())
        .filter(|n| !needed.contains(n.as_str()))
        .collect()
}

/// What a due run does for one VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunDecision {
    /// The VM already has a run for this (or a later) time.
    Done,
    /// Start the run.
    Start,
    /// Forbid: a run is still going; try again when it finished.
    Skip(String),
    /// Replace: cancel (delete) these running backups, then start.
    Replace(Vec<String>),
}

/// Step 3d: whether the run at `time` starts for a VM with `runs` (newest first).
pub fn decide_run(
    schedule: &VirtualMachineBackupSchedule,
    runs: &[Run],
    time: DateTime<Utc>,
) -> RunDecision {
    if runs.iter().any(|r| r.time >= time) {
        return RunDecision::Done;
    }
    let active: Vec<String> = runs
        .iter()
        .filter(|r| !r.finished())
        .map(Run::name)
        .collect();
    if active.is_empty() {
        return RunDecision::Start;
    }
    match schedule.spec.concurrency_policy.unwrap_or_default() {
        cairn_api::ConcurrencyPolicy::Forbid => RunDecision::Skip(active.join(", ")),
        cairn_api::ConcurrencyPolicy::Replace => RunDecision::Replace(active),
    }
}

fn to_time(t: DateTime<Utc>) -> Time {
    Time(Timestamp::from_millisecond(t.timestamp_millis()).unwrap_or_default())
}

fn from_time(t: &Time) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_millis(t.0.as_millisecond())
}

fn condition(
    type_: &'static str,
    status: bool,
    reason: &'static str,
    message: String,
) -> NewCondition<'static> {
    NewCondition {
        type_,
        status,
        reason,
        message,
    }
}

/// Step 1: what the schedule acts on, from the caches.
pub struct Resolved {
    /// The VMs to back up now (empty: none found).
    pub vms: Vec<String>,
    /// Every VM with runs or checkpoints of the schedule (also one that left the selector).
    pub all_vms: Vec<String>,
    /// The schedule's runs that are not being deleted.
    pub runs: Vec<Run>,
    /// The schedule's checkpoints.
    pub checkpoints: Vec<Arc<VirtualMachineCheckpoint>>,
}

impl Resolved {
    fn new(ctx: &Context, schedule: &VirtualMachineBackupSchedule, namespace: &str) -> Self {
        let uid = schedule.uid().unwrap_or_default();
        let name = schedule.name_any();
        let runs: Vec<Run> = ctx
            .backups
            .state()
            .into_iter()
            .filter(|b| b.namespace().as_deref() == Some(namespace))
            .filter(|b| b.owner_references().iter().any(|o| o.uid == uid))
            .filter(|b| !routing::deleting(b.as_ref()))
            .filter_map(Run::of)
            .collect();
        let checkpoints: Vec<Arc<VirtualMachineCheckpoint>> = ctx
            .checkpoints
            .state()
            .into_iter()
            .filter(|c| c.namespace().as_deref() == Some(namespace))
            .filter(|c| c.labels().get(SCHEDULE_LABEL) == Some(&name))
            .collect();
        let vms = schedule_vms(ctx, schedule, namespace);
        let mut all_vms = vms.clone();
        for vm in runs
            .iter()
            .map(|r| r.backup.spec.virtual_machine.clone())
            .chain(checkpoints.iter().map(|c| c.spec.virtual_machine.clone()))
        {
            if !all_vms.contains(&vm) {
                all_vms.push(vm);
            }
        }
        Self {
            vms,
            all_vms,
            runs,
            checkpoints,
        }
    }

    /// The runs of `vm`, newest first.
    pub fn runs_of(&self, vm: &str) -> Vec<Run> {
        sorted(
            self.runs
                .iter()
                .filter(|r| r.backup.spec.virtual_machine == vm)
                .cloned()
                .collect(),
        )
    }
}

/// The reconcile: runs the steps above.
pub async fn reconcile(
    schedule: Arc<VirtualMachineBackupSchedule>,
    ctx: Arc<Context>,
) -> Result<Action> {
    let namespace = routing::namespace_of(schedule.as_ref())?;
    let name = schedule.name_any();
    let span =
        tracing::info_span!("reconcile", controller = CONTROLLER, %namespace, schedule = %name);
    let _enter = span.enter();
    ctx.health.metrics.reconciled(CONTROLLER);
    if routing::deleting(schedule.as_ref()) {
        return Ok(Action::await_change());
    }
    let now = Utc::now();
    let old = schedule.status.clone().unwrap_or_default();

    // 1. resolve
    let spec = &schedule.spec;
    let cron = match CronSchedule::parse(&spec.schedule, spec.time_zone.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            let mut status = old.clone();
            let ready = condition(
                condition_types::READY,
                false,
                REASON_INVALID_SCHEDULE,
                e.to_string(),
            );
            let g = schedule.meta().generation;
            status.observed_generation = g;
            let message = ready.message.clone();
            set_kstatus(&mut status.conditions, Some(message), g);
            if set_condition(&mut status.conditions, ready, g, Timestamp::now()) {
                let (t, r) = (EventType::Warning, REASON_INVALID_SCHEDULE);
                routing::publish(&ctx, schedule.as_ref(), t, r, e.to_string()).await;
            }
            write_status(&ctx, &namespace, &name, &old, status).await?;
            return Ok(Action::await_change());
        }
    };
    let state = Resolved::new(&ctx, &schedule, &namespace);

    // 2. due
    let since = old
        .last_schedule_time
        .as_ref()
        .or(schedule.meta().creation_timestamp.as_ref())
        .and_then(from_time)
        .unwrap_or(now);
    let due = if spec.suspend || state.vms.is_empty() {
        Due::No
    } else {
        timing::due(&cron, since, now, spec.starting_deadline_seconds)
    };

    // 3.+4. plan and apply
    let handled = start_due_runs(&ctx, &schedule, due, &state).await?;
    let kept = prune_and_clean(&ctx, &schedule, &state, cron.zone()).await?;

    // 5. report
    let next = (!spec.suspend).then(|| cron.next(now)).flatten();
    let (status, event) = report(&schedule, &state, &old, handled, kept, next);
    if let Some(t) = status.last_successful_time.as_ref().and_then(from_time) {
        ctx.health
            .metrics
            .schedule_succeeded(&namespace, &name, t.timestamp());
    }
    if let Some((type_, reason, note)) = event {
        routing::publish(&ctx, schedule.as_ref(), type_, reason, note).await;
    }
    // A run's end wakes the schedule through its owner reference, but the
    // backup cache read here is another watch and may not have it yet: look
    // again soon while runs are active.
    let soon = if status.active.is_empty() {
        RECHECK
    } else {
        ACTIVE_RECHECK
    };
    tracing::debug!(?due, active = ?status.active, "schedule reconciled");
    write_status(&ctx, &namespace, &name, &old, status).await?;
    ctx.succeeded(&format!("{CONTROLLER}/{namespace}/{name}"));
    let wait = next
        .map(|n| (n - Utc::now()).to_std().unwrap_or_default() + Duration::from_millis(100))
        .unwrap_or(soon)
        .min(soon);
    Ok(Action::requeue(wait))
}

/// Steps 3+4 for the due time: start (or hold back, or replace) each VM's
/// run. Returns the newest scheduled time now handled, when it moves on.
async fn start_due_runs(
    ctx: &Context,
    schedule: &VirtualMachineBackupSchedule,
    due: Due,
    state: &Resolved,
) -> Result<Option<DateTime<Utc>>> {
    let t = match due {
        Due::No => return Ok(None),
        Due::Missed(t) => {
            let note = format!(
                "the run scheduled for {t} was not started within startingDeadlineSeconds={}; waiting for the next one",
                schedule.spec.starting_deadline_seconds.unwrap_or_default()
            );
            routing::publish(ctx, schedule, EventType::Warning, "Missed", note).await;
            return Ok(Some(t));
        }
        Due::Run(t) => t,
    };
    let api = ctx.api::<VirtualMachineBackup>(&schedule.namespace().unwrap_or_default());
    let mut all_started = true;
    for vm in &state.vms {
        let runs = state.runs_of(vm);
        match decide_run(schedule, &runs, t) {
            RunDecision::Done => {}
            RunDecision::Skip(active) => {
                all_started = false;
                tracing::info!(%vm, %active, "run held back: the previous one still runs (Forbid)");
            }
            RunDecision::Replace(active) => {
                for b in &active {
                    delete_backup(&api, b, None).await?;
                }
                let note = format!(
                    "cancelled {} of VM {vm} to start the run scheduled for {t} (concurrencyPolicy Replace)",
                    active.join(", ")
                );
                routing::publish(ctx, schedule, EventType::Normal, "Replaced", note).await;
                start_run(ctx, schedule, vm, t, &runs, &state.checkpoints).await?;
            }
            RunDecision::Start => {
                start_run(ctx, schedule, vm, t, &runs, &state.checkpoints).await?;
            }
        }
    }
    Ok(all_started.then_some(t))
}

/// Steps 3+4 for retention: deletes the backups [`prune`] drops and the
/// checkpoints [`unneeded_checkpoints`] finds, VM by VM (on the cache as it
/// was: a run just created is unfinished, so never pruned). Returns the kept
/// backups.
async fn prune_and_clean(
    ctx: &Context,
    schedule: &VirtualMachineBackupSchedule,
    state: &Resolved,
    zone: chrono_tz::Tz,
) -> Result<Vec<String>> {
    let namespace = schedule.namespace().unwrap_or_default();
    let api = ctx.api::<VirtualMachineBackup>(&namespace);
    let cp_api = ctx.api::<VirtualMachineCheckpoint>(&namespace);
    let mut kept = Vec::new();
    let mut pruned = Vec::new();
    for vm in &state.all_vms {
        let runs = state.runs_of(vm);
        let p = prune(schedule, &runs, zone);
        for b in &p.delete {
            let uid = runs
                .iter()
                .find(|r| &r.name() == b)
                .and_then(|r| r.backup.uid());
            delete_backup(&api, b, uid).await?;
            pruned.push(b.clone());
        }
        kept.extend(p.kept);
        let mine: Vec<Arc<VirtualMachineCheckpoint>> = state
            .checkpoints
            .iter()
            .filter(|c| &c.spec.virtual_machine == vm)
            .cloned()
            .collect();
        for cp in unneeded_checkpoints(&runs, &mine) {
            tracing::info!(checkpoint = %cp, %vm, "deleting a checkpoint no run needs");
            match cp_api.delete(&cp, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(Error::kube(format!("deleting checkpoint {cp}"))(e)),
            }
        }
    }
    if !pruned.is_empty() {
        let note = format!("retention deleted {} with their data", pruned.join(", "));
        routing::publish(ctx, schedule, EventType::Normal, "Pruned", note).await;
    }
    Ok(kept)
}

/// An event to publish: type, reason, note.
pub type Note = (EventType, &'static str, String);

/// Step 5 (pure): the status, and the event of the newest finished run when
/// it is news (`RunSucceeded` / `RunFailed`).
pub fn report(
    schedule: &VirtualMachineBackupSchedule,
    state: &Resolved,
    old: &VirtualMachineBackupScheduleStatus,
    handled: Option<DateTime<Utc>>,
    kept: Vec<String>,
    next: Option<DateTime<Utc>>,
) -> (VirtualMachineBackupScheduleStatus, Option<Note>) {
    let g = schedule.meta().generation;
    let ts = Timestamp::now();
    let all = sorted(state.runs.clone());
    let mut status = VirtualMachineBackupScheduleStatus {
        conditions: old.conditions.clone(),
        last_schedule_time: handled.map(to_time).or(old.last_schedule_time.clone()),
        last_successful_time: all
            .iter()
            .find(|r| r.succeeded())
            .map(|r| to_time(r.time))
            .or(old.last_successful_time.clone()),
        next_schedule_time: next.map(to_time),
        active: all
            .iter()
            .filter(|r| !r.finished())
            .map(Run::name)
            .collect(),
        kept_backups: kept,
        observed_generation: g,
    };
    let conds = &mut status.conditions;
    set_kstatus(conds, None, g);
    set_condition(conds, ready_condition(schedule, &state.vms), g, ts);
    let suspended = if schedule.spec.suspend {
        let msg = "spec.suspend is set: no runs start; retention still applies";
        condition(SUSPENDED, true, "Suspended", msg.into())
    } else {
        condition(SUSPENDED, false, "Active", "runs start on schedule".into())
    };
    set_condition(conds, suspended, g, ts);
    let newest = all.iter().find(|r| r.finished());
    let event = match newest {
        Some(r) if !r.succeeded() => {
            let st = r.backup.status.as_ref();
            let reason = st
                .and_then(|s| cairn_api::conditions::find(&s.conditions, condition_types::READY))
                .map(|c| c.reason.clone())
                .unwrap_or_else(|| "RunFailed".into());
            let why = st
                .and_then(|s| s.failure_reason.clone())
                .unwrap_or_else(|| format!("phase {:?}", r.phase()));
            let c = NewCondition {
                type_: LAST_RUN_FAILED,
                status: true,
                reason: &reason,
                message: format!("backup {} failed: {why}", r.name()),
            };
            set_condition(conds, c, g, ts).then(|| {
                let note = format!(
                    "backup {} failed ({reason}): {why}; the next run starts on schedule",
                    r.name()
                );
                (EventType::Warning, "RunFailed", note)
            })
        }
        Some(r) => {
            let msg = format!("backup {} succeeded", r.name());
            let c = condition(LAST_RUN_FAILED, false, "Succeeded", msg.clone());
            set_condition(conds, c, g, ts).then_some((EventType::Normal, "RunSucceeded", msg))
        }
        None => {
            let c = condition(
                LAST_RUN_FAILED,
                false,
                "NoRunYet",
                "no run finished yet".into(),
            );
            set_condition(conds, c, g, ts);
            None
        }
    };
    (status, event)
}

/// kstatus (Flux, kpt): `Stalled=True` while the spec can never work (an
/// invalid schedule or time zone, `stalled` is the message), else False;
/// `Reconciling=False` (a schedule is never half-applied: waiting for a VM or
/// the next run is its normal state).
fn set_kstatus(conds: &mut Vec<cairn_api::Condition>, stalled: Option<String>, g: Option<i64>) {
    let ts = Timestamp::now();
    let (status, reason, message) = match stalled {
        Some(m) => (true, REASON_INVALID_SCHEDULE, m),
        None => (false, "Valid", "the schedule is valid".to_string()),
    };
    let stalled = condition(condition_types::STALLED, status, reason, message);
    set_condition(conds, stalled, g, ts);
    let rec = condition(
        condition_types::RECONCILING,
        false,
        "Scheduled",
        "nothing to converge: runs start on schedule".into(),
    );
    set_condition(conds, rec, g, ts);
}

/// `Ready`: the schedule parses (checked before) and finds its VMs.
fn ready_condition(
    schedule: &VirtualMachineBackupSchedule,
    vms: &[String],
) -> NewCondition<'static> {
    let namespace = schedule.namespace().unwrap_or_default();
    match (&schedule.spec.virtual_machine, vms.is_empty()) {
        (_, false) => condition(
            condition_types::READY,
            true,
            "Scheduled",
            format!(
                "backing up {} on {:?}",
                vms.join(", "),
                schedule.spec.schedule
            ),
        ),
        (Some(vm), true) => condition(
            condition_types::READY,
            false,
            routing::REASON_VM_NOT_FOUND,
            format!(
                "VM (QemuInstance) {vm:?} does not exist in namespace {namespace:?}: no runs start until it does"
            ),
        ),
        (None, true) => condition(
            condition_types::READY,
            false,
            REASON_NO_VMS,
            format!(
                "the selector matches no VM (QemuInstance) in namespace {namespace:?}: no runs start until one matches"
            ),
        ),
    }
}

/// The VMs a schedule backs up: its `virtualMachine`, or the QemuInstances of
/// its own namespace its selector matches (never another namespace's).
fn schedule_vms(
    ctx: &Context,
    schedule: &VirtualMachineBackupSchedule,
    namespace: &str,
) -> Vec<String> {
    if let Some(vm) = &schedule.spec.virtual_machine {
        return routing::find_vm(ctx, namespace, vm)
            .map(|_| vec![vm.clone()])
            .unwrap_or_default();
    }
    let Some(selector) = &schedule.spec.selector else {
        return Vec::new();
    };
    let mut vms: Vec<String> = ctx
        .vms
        .state()
        .into_iter()
        .filter(|v| v.namespace().as_deref() == Some(namespace))
        .filter(|v| crate::repository::selector_matches(selector, v.labels()))
        .map(|v| v.name_any())
        .collect();
    vms.sort();
    vms
}

async fn start_run(
    ctx: &Context,
    schedule: &VirtualMachineBackupSchedule,
    vm: &str,
    t: DateTime<Utc>,
    runs: &[Run],
    checkpoints: &[Arc<VirtualMachineCheckpoint>],
) -> Result<()> {
    let usable = |cp: &str| {
        checkpoints.iter().any(|c| {
            c.name_any() == cp && !routing::deleting(c.as_ref()) && c.spec.virtual_machine == vm
        })
    };
    let backup = next_backup(schedule, vm, t, runs, usable);
    let name = backup.name_any();
    let kind = match &backup.spec.incremental {
        Some(base) => format!("incremental from checkpoint {base}"),
        None => "full".to_string(),
    };
    let api = ctx.api::<VirtualMachineBackup>(&schedule.namespace().unwrap_or_default());
    match api.create(&crate::routing::create_params(), &backup).await {
        Ok(_) => {
            tracing::info!(backup = %name, %vm, %kind, "run started");
            routing::publish(
                ctx,
                schedule,
                EventType::Normal,
                "Scheduled",
                format!("created backup {name} of VM {vm} ({kind}) for {t}"),
            )
            .await;
        }
        // Created before (a restart between create and status): exactly one run.
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => return Err(Error::kube(format!("creating backup {name}"))(e)),
    }
    Ok(())
}

async fn delete_backup(
    api: &kube::Api<VirtualMachineBackup>,
    name: &str,
    uid: Option<String>,
) -> Result<()> {
    let dp = DeleteParams {
        preconditions: uid.map(|uid| Preconditions {
            uid: Some(uid),
            resource_version: None,
        }),
        ..Default::default()
    };
    match api.delete(name, &dp).await {
        Ok(_) => {
            tracing::info!(backup = %name, "backup deleted");
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
        Err(e) => Err(Error::kube(format!("deleting backup {name}"))(e)),
    }
}

async fn write_status(
    ctx: &Context,
    namespace: &str,
    name: &str,
    old: &VirtualMachineBackupScheduleStatus,
    status: VirtualMachineBackupScheduleStatus,
) -> Result<()> {
    if *old == status {
        return Ok(());
    }
    // Only the operator writes a schedule's status: no resourceVersion
    // precondition (a spec edit in between must not fail the write).
    let api = ctx.api::<VirtualMachineBackupSchedule>(namespace);
    let body = serde_json::json!({
        "apiVersion": VirtualMachineBackupSchedule::api_version(&()),
        "kind": VirtualMachineBackupSchedule::kind(&()),
        "status": status,
    });
    api.patch_status(
        name,
        &kube::api::PatchParams::apply(cairn_api::OPERATOR_MANAGER).force(),
        &kube::api::Patch::Apply(&body),
    )
    .await
    .map_err(Error::kube(format!("writing the status of {name}")))?;
    Ok(())
}

#[cfg(test)]
mod tests;
