//! `VirtualMachineRestore`: restore as a resource — a backup's qcow2 chain or
//! a repository snapshot turned back into image files (verified while read,
//! published only when complete), or served at once over NBD so a VM can start
//! on an overlay while the data streams in (instant recovery).

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::Condition;

/// Desired restore. Immutable after creation.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "cairn.dev",
    version = "v1alpha1",
    kind = "VirtualMachineRestore",
    plural = "virtualmachinerestores",
    shortname = "vmrestore",
    category = "cairn",
    label("app.kubernetes.io/part-of", "cairn"),
    namespaced,
    status = "VirtualMachineRestoreStatus",
    doc = "A restore of a backup (its qcow2 chain or repository snapshot) into new image files, verified while read, or served over NBD for instant recovery.",
    printcolumn(
        name = "Backup",
        type_ = "string",
        json_path = ".spec.source.backup.name"
    ),
    printcolumn(
        name = "Repository",
        type_ = "string",
        json_path = ".spec.source.repository.name"
    ),
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mode"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the restored images (or the instant export) are usable now"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        description = "Why it is (not) Ready"
    ),
    printcolumn(name = "Node", type_ = "string", json_path = ".status.nodeName"),
    printcolumn(
        name = "Done",
        type_ = "integer",
        format = "int64",
        json_path = ".status.progress.bytesDone",
        priority = 1
    ),
    printcolumn(
        name = "Total",
        type_ = "integer",
        format = "int64",
        json_path = ".status.progress.bytesTotal",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("self == oldSelf").message("spec is immutable: create a new VirtualMachineRestore instead"))]
#[x_kube(validation = Rule::new("has(self.source.backup) != has(self.source.repository)").message("source takes exactly one of backup or repository"))]
#[x_kube(validation = Rule::new("self.mode != 'Copy' || (has(self.target) && has(self.target.directory))").message("mode Copy needs target.directory"))]
#[x_kube(validation = Rule::new("self.mode != 'Instant' || !has(self.target)").message("mode Instant serves an NBD export and writes no files: remove target"))]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineRestoreSpec {
    /// What to restore: a VirtualMachineBackup of this namespace, or a snapshot of a
    /// BackupRepository this namespace may use.
    pub source: RestoreSource,

    /// `Copy` (default): write new image files into target.directory. `Instant`: serve
    /// the repository snapshot as a read-only NBD export at once, for a VM to start on a
    /// local overlay backed by it while `block-stream` pulls the data in.
    #[serde(default)]
    pub mode: RestoreMode,

    /// Disks to restore, by device name. Default: every disk of the backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub disks: Option<Vec<RestoreDisk>>,

    /// Where the restored images go (mode Copy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<RestoreTarget>,

    /// Node to restore on. Default: the node that holds the backup files (qcow2
    /// chains), or the node that wrote the snapshot (repositories). A chain restore
    /// must run where its files are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub node_name: Option<String>,
}

/// Where a restore reads from: exactly one of `backup` or `repository`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreSource {
    /// A Succeeded push-mode VirtualMachineBackup of the same namespace: its qcow2
    /// chain (directory target) or its repository snapshot (repository target).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<RestoreBackupSource>,
    /// A snapshot of a BackupRepository that allows this namespace; only snapshots
    /// taken of this namespace's VMs are visible.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<RestoreRepositorySource>,
}

/// A VirtualMachineBackup by name.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreBackupSource {
    /// Name of the VirtualMachineBackup (same namespace).
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
}

/// A repository snapshot.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreRepositorySource {
    /// Name of the (cluster-scoped) BackupRepository.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Snapshot id (a backup's `status.repository.snapshot`).
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z0-9][-A-Za-z0-9_.]*$")
    )]
    pub snapshot: String,
}

/// How the data is restored.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RestoreMode {
    /// Write verified image files, published under their final names when complete.
    #[default]
    Copy,
    /// Serve the snapshot over NBD straight from the repository (repository sources only).
    Instant,
}

/// One disk to restore.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreDisk {
    /// Device name as in the backup (e.g. `vda`).
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z0-9][-A-Za-z0-9_.]*$")
    )]
    pub name: String,
}

/// Where restored images are written.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(validation = Rule::new("!has(self.format) || !has(self.directory) || !has(self.directory.format) || self.format == self.directory.format").message("target.format and target.directory.format disagree: give the format once"))]
#[serde(rename_all = "camelCase")]
pub struct RestoreTarget {
    /// A directory on the node, inside `<allowed root>/<namespace>/`; one file per disk,
    /// named `<disk>.<format>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory: Option<RestoreDirectory>,
    /// Output format, the same as `directory.format` (either place may say it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<RestoreFormat>,
    /// Replace existing files of the same names (same as `directory.overwrite`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overwrite: Option<bool>,
}

impl RestoreTarget {
    /// The output format (qcow2 when not given).
    pub fn output_format(&self) -> RestoreFormat {
        self.directory
            .as_ref()
            .and_then(|d| d.format)
            .or(self.format)
            .unwrap_or_default()
    }

    /// Whether existing files may be replaced.
    pub fn overwrites(&self) -> bool {
        self.directory
            .as_ref()
            .and_then(|d| d.overwrite)
            .unwrap_or(false)
            || self.overwrite.unwrap_or(false)
    }
}

/// A directory on the restoring node.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RestoreDirectory {
    /// Absolute path inside `<allowed root>/<namespace>/` on the node; missing
    /// directories are created. Symlinks below the root are refused, and so is `..`.
    #[schemars(length(min = 2, max = 4096))]
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("target.directory.path must be absolute"))]
    #[x_kube(validation = Rule::new("!self.contains('/../') && !self.endsWith('/..')").message("target.directory.path must not contain '..'"))]
    pub path: String,
    /// `qcow2` (default) or `raw`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<RestoreFormat>,
    /// Replace an existing `<disk>.<format>` file (refused with `TargetExists` otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overwrite: Option<bool>,
}

/// Image format of restored files.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RestoreFormat {
    /// A standalone qcow2 image.
    #[default]
    Qcow2,
    /// A raw (sparse) image.
    Raw,
}

impl RestoreFormat {
    /// File extension and `qemu-img` format name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Qcow2 => "qcow2",
            Self::Raw => "raw",
        }
    }
}

/// Lifecycle phase of a restore.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RestorePhase {
    /// Accepted, waiting for the node's agent (or for the source backup to finish).
    #[default]
    Pending,
    /// Copying and verifying.
    Running,
    /// Instant: the export is served; see status.export.
    Serving,
    /// Finished: the images are in place (Copy), or the VM no longer needs the export (Instant).
    Succeeded,
    /// Could not complete; see the conditions. No output was published.
    Failed,
}

impl RestorePhase {
    /// The phase's name as it appears in `status.phase`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Running => "Running",
            Self::Serving => "Serving",
            Self::Succeeded => "Succeeded",
            Self::Failed => "Failed",
        }
    }

    /// Whether the restore has reached an end state.
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }
}

/// Observed state of a restore.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineRestoreStatus {
    /// Lifecycle phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RestorePhase>,
    /// Conditions: `Accepted` (the operator resolved the source and picked the node),
    /// `Ready`, `Reconciling`, `Stalled` (terminal failure, with its reason).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// Node that runs the restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// What the source resolved to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<ResolvedRestoreSource>,
    /// When the agent started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// When the restore finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// Bytes written (Copy) or distinct bytes served (Instant) so far, over all disks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<crate::BackupProgress>,
    /// Per-disk results.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub disks: Vec<RestoreDiskStatus>,
    /// Instant: where to read the export.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export: Option<RestoreExport>,
    /// Why the restore failed, in one sentence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The source as the operator resolved it (written by the operator).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedRestoreSource {
    /// The backup's UID (backup sources).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_uid: Option<String>,
    /// The backup's directory (qcow2-chain sources).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory: Option<String>,
    /// Repository name (repository sources and repository backups).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// Snapshot id (repository sources and repository backups).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
}

/// One restored disk.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreDiskStatus {
    /// Device name.
    pub name: String,
    /// Copy: the image file written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Virtual size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<i64>,
    /// Copy: SHA-256 (hex) of the image file written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Instant: the NBD export name of this disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export_name: Option<String>,
    /// Instant: bytes of this disk's data read by clients at least once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_served: Option<i64>,
}

/// An instant-recovery NBD export.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreExport {
    /// NBD URL of the server, e.g. `nbd+unix:///vda?socket=/run/cairn/exports/<namespace>/<restore>.sock`.
    pub url: String,
    /// The export no longer needed: every data region was read and the clients left
    /// (the overlay holds everything; QEMU's `block-stream` finished).
    #[serde(default)]
    pub released: bool,
}

impl crate::conditions::LifecycleStatus for VirtualMachineRestoreStatus {
    /// `Pending`, `Running`: in progress. `Serving`, `Succeeded`: current.
    /// `Failed`: failed.
    fn lifecycle(&self) -> (crate::conditions::Lifecycle, &'static str) {
        use crate::conditions::Lifecycle;
        let phase = self.phase.unwrap_or_default();
        let lifecycle = match phase {
            RestorePhase::Pending | RestorePhase::Running => Lifecycle::InProgress,
            RestorePhase::Serving | RestorePhase::Succeeded => Lifecycle::Current,
            RestorePhase::Failed => Lifecycle::Failed,
        };
        (lifecycle, phase.as_str())
    }
    fn conditions_mut(&mut self) -> &mut Vec<Condition> {
        &mut self.conditions
    }
    fn observed_generation_mut(&mut self) -> &mut Option<i64> {
        &mut self.observed_generation
    }
}
