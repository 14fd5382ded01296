//! `VirtualMachineBackupSchedule`: backups on a cron schedule, as one
//! GitOps-friendly resource — chains of incrementals with a full every
//! `fullEvery` runs, retention with Proxmox's prune rules, and the
//! checkpoints (dirty bitmaps) nothing needs any more deleted.
//!
//! The operator creates one VirtualMachineBackup per VM and scheduled time,
//! named after the schedule and that time, owned by the schedule
//! (docs/operations.md, "Backup schedules").

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::backup::{BackupDisk, BackupTarget};
use crate::common::Condition;

/// Desired schedule. Unlike backups it may be edited: a change applies from
/// the next scheduled run on.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "cairn.dev",
    version = "v1alpha1",
    kind = "VirtualMachineBackupSchedule",
    plural = "virtualmachinebackupschedules",
    shortname = "vmbsched",
    category = "cairn",
    label("app.kubernetes.io/part-of", "cairn"),
    namespaced,
    status = "VirtualMachineBackupScheduleStatus",
    doc = "Backups of a QEMU VM (or of every VM matching a label selector) on a cron schedule: chains of incremental backups, a full one every fullEvery runs, and retention that deletes old backups with their files.",
    printcolumn(name = "VM", type_ = "string", json_path = ".spec.virtualMachine"),
    printcolumn(name = "Schedule", type_ = "string", json_path = ".spec.schedule"),
    printcolumn(name = "Suspend", type_ = "boolean", json_path = ".spec.suspend"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the schedule is valid and its VMs are found (the Ready condition)"
    ),
    printcolumn(
        name = "Last Run Failed",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"LastRunFailed\")].status",
        description = "Whether the newest finished run failed"
    ),
    printcolumn(
        name = "Last Schedule",
        type_ = "date",
        json_path = ".status.lastScheduleTime"
    ),
    printcolumn(
        name = "Last Success",
        type_ = "date",
        json_path = ".status.lastSuccessfulTime"
    ),
    printcolumn(
        name = "Next",
        type_ = "string",
        json_path = ".status.nextScheduleTime",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("has(self.virtualMachine) != has(self.selector)").message("give exactly one of virtualMachine or selector"))]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineBackupScheduleSpec {
    /// Name of the VM (its QemuInstance) in the same namespace. Exactly one of
    /// `virtualMachine` and `selector`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub virtual_machine: Option<String>,

    /// Back up every QemuInstance of this namespace whose labels match (each VM
    /// gets its own chain). Never reaches into other namespaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,

    /// When to run, in cron syntax: 5 fields (minute hour day-of-month month
    /// day-of-week, e.g. `0 2 * * *`), `@daily`-style nicknames, or 6 fields with
    /// a leading seconds field (`*/20 * * * * *`) for schedules faster than a
    /// minute (tests, demos).
    #[schemars(
        length(min = 1, max = 128),
        regex(
            pattern = r"^\s*(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|\S+(\s+\S+){4,5})\s*$"
        )
    )]
    pub schedule: String,

    /// IANA time zone the schedule and the retention periods are read in, e.g.
    /// `Europe/Berlin` (default `UTC`). Across a DST change a run in the skipped
    /// hour happens once right after it, and a run in the repeated hour once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[A-Za-z0-9_+\-/]+$"))]
    pub time_zone: Option<String>,

    /// What each run backs up and where to: a VirtualMachineBackup spec without
    /// the VM (the schedule fills it in) and without `incremental`/`checkpoint`
    /// (the schedule chains its runs).
    pub template: BackupTemplate,

    /// Start a new chain (a full backup) after this many incrementals: `0` makes
    /// every run full, `6` a full and six incrementals. Default: `7` for
    /// directory targets (each incremental file needs the files before it, so
    /// retention can only drop whole chains), unlimited for repository targets
    /// (every snapshot restores alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub full_every: Option<i32>,

    /// Which backups to keep, with Proxmox's prune rules; the others are deleted
    /// with their files or repository snapshots. Absent (or all zero): keep all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Retention>,

    /// Stop starting runs (a running one finishes). Retention still applies.
    #[serde(default)]
    pub suspend: bool,

    /// What to do when a run is due while the previous one still runs:
    /// `Forbid` (default: skip this run) or `Replace` (cancel the running one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency_policy: Option<ConcurrencyPolicy>,

    /// A run missed (operator down, or Forbid) is still started if no more than
    /// this many seconds late; only the newest missed run is made up, never a
    /// burst. Default: no deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 31536000))]
    pub starting_deadline_seconds: Option<i64>,
}

/// What every run of a schedule backs up.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(validation = Rule::new("has(self.target.directory) || has(self.target.repository)").message("template.target needs directory or repository (schedules push; nbd exports are for one-off pull backups)"))]
#[serde(rename_all = "camelCase")]
pub struct BackupTemplate {
    /// Where the backups go: `directory` (qcow2 chains on the node) or
    /// `repository` (a BackupRepository).
    pub target: BackupTarget,

    /// Disks to include, by device name (default: every qcow2 disk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub disks: Option<Vec<BackupDisk>>,

    /// When the previous run's checkpoint is unusable on a disk (bitmap missing
    /// or inconsistent), back that disk up in full instead of failing the run.
    #[serde(default)]
    pub fallback_to_full: bool,
}

/// Proxmox's prune options: each keeps the newest backup of each of the last N
/// periods that have one (in `timeZone`), considering only backups older than
/// those the options before it kept. A directory chain is kept whole while any
/// of its backups is kept.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Retention {
    /// Keep the newest N backups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10000))]
    pub keep_last: Option<i32>,
    /// Keep the newest backup of each of the last N hours that have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10000))]
    pub keep_hourly: Option<i32>,
    /// Keep the newest backup of each of the last N days that have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10000))]
    pub keep_daily: Option<i32>,
    /// Keep the newest backup of each of the last N ISO weeks (Monday to Sunday) that have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10000))]
    pub keep_weekly: Option<i32>,
    /// Keep the newest backup of each of the last N months that have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10000))]
    pub keep_monthly: Option<i32>,
    /// Keep the newest backup of each of the last N years that have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10000))]
    pub keep_yearly: Option<i32>,
}

/// What a due run does while the previous run of the same VM still runs.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ConcurrencyPolicy {
    /// Skip the due run (it counts as missed; see startingDeadlineSeconds).
    #[default]
    Forbid,
    /// Cancel the running backup (delete it) and start the due run.
    Replace,
}

/// Observed state of a schedule.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineBackupScheduleStatus {
    /// Conditions: `Ready` (schedule, time zone and VMs are valid), `Suspended`,
    /// `LastRunFailed` (the newest finished run failed, with its reason), and
    /// kstatus's `Stalled` (True for an invalid schedule or time zone) and
    /// `Reconciling` (always False).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The scheduled time of the newest run started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<Time>,
    /// The scheduled time of the newest run that succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_successful_time: Option<Time>,
    /// When the next run is due (absent while suspended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_schedule_time: Option<Time>,
    /// Backups of this schedule that are still running.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub active: Vec<String>,
    /// Succeeded backups the retention keeps, newest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kept_backups: Vec<String>,
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
