//! `VirtualMachineBackup`: libvirt's `virDomainBackupBegin` as a resource — a full
//! or incremental backup, pushed by QEMU into qcow2 files or pulled over NBD.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::Condition;

/// Desired backup. Immutable after creation.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "cairn.dev",
    version = "v1alpha1",
    kind = "VirtualMachineBackup",
    plural = "virtualmachinebackups",
    shortname = "vmbackup",
    shortname = "vmb",
    category = "cairn",
    label("app.kubernetes.io/part-of", "cairn"),
    namespaced,
    status = "VirtualMachineBackupStatus",
    doc = "A full or incremental backup of a QEMU VM's disks: pushed by QEMU into qcow2 files, or served over NBD for a client to pull.",
    printcolumn(name = "VM", type_ = "string", json_path = ".spec.virtualMachine"),
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mode"),
    printcolumn(
        name = "Incremental",
        type_ = "string",
        json_path = ".spec.incremental"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the object is usable now (the Ready condition), whatever the phase"
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
#[x_kube(validation = Rule::new("self == oldSelf").message("spec is immutable: create a new VirtualMachineBackup instead"))]
#[x_kube(validation = Rule::new("self.mode != 'Push' || (has(self.target) && (has(self.target.directory) || has(self.target.repository)))").message("mode Push needs target.directory or target.repository"))]
#[x_kube(validation = Rule::new("self.mode != 'Pull' || !has(self.target) || !has(self.target.repository)").message("a repository target is written by the agent from a point-in-time export: use mode Push"))]
#[x_kube(validation = Rule::new("self.mode != 'Pull' || !has(self.target) || !has(self.target.directory)").message("mode Pull serves an NBD export: use target.nbd, not target.directory"))]
#[x_kube(validation = Rule::new("self.mode != 'Push' || !has(self.target) || !has(self.target.nbd)").message("target.nbd is only for mode Pull"))]
#[x_kube(validation = Rule::new("self.mode == 'Pull' || !has(self.exportTimeoutSeconds)").message("exportTimeoutSeconds is only for mode Pull"))]
#[x_kube(validation = Rule::new("!has(self.checkpoint) || !has(self.incremental) || self.checkpoint.name != self.incremental").message("checkpoint.name must differ from incremental: a backup cannot create its own base"))]
#[x_kube(validation = Rule::new("!self.fallbackToFull || has(self.incremental)").message("fallbackToFull only applies to incremental backups"))]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineBackupSpec {
    /// Name of the VM (its QemuInstance) in the same namespace.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub virtual_machine: String,

    /// `Push` (QEMU writes qcow2 files into target.directory) or `Pull` (QEMU serves a
    /// point-in-time NBD export that a client reads).
    #[serde(default)]
    pub mode: BackupMode,

    /// Name of a checkpoint of the same VM: back up only what changed since it. Absent
    /// means a full backup. The checkpoint's bitmap is kept, so other chains still work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub incremental: Option<String>,

    /// Create this new checkpoint atomically at the moment the backup starts, so a chain
    /// of backups has no gap. It becomes its own VirtualMachineCheckpoint resource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<BackupCheckpoint>,

    /// Disks to include, by device name. Default: every disk that has a bitmap in the
    /// incremental base, or every qcow2 disk for a full backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub disks: Option<Vec<BackupDisk>>,

    /// Where the backup goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<BackupTarget>,

    /// When the incremental base is unusable on a disk (bitmap missing or inconsistent),
    /// take a full backup of that disk instead of failing, and say so in status.
    #[serde(default)]
    pub fallback_to_full: bool,

    /// Freeze the guest's filesystems through the QEMU guest agent
    /// (`<ns>/<vm>.qga.sock` beside the monitor) for the instant the backup point
    /// (and its checkpoint) is taken, then thaw them: an application-consistent
    /// backup. Fails `QuiesceUnavailable` without a guest agent, `QuiesceTimeout`
    /// when it does not answer in time; the guest is thawed and nothing is left.
    #[serde(default)]
    pub quiesce: bool,

    /// Pull mode: tear the export down after this many seconds even if the resource still exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 604800))]
    pub export_timeout_seconds: Option<i64>,

    /// What deleting this resource does to the stored backup: `Retain` (default)
    /// keeps the files or repository snapshot, `Delete` removes them unless a kept
    /// incremental still needs them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_policy: Option<DeletionPolicy>,

    /// Delete the resource this many seconds after it finished (Succeeded, Failed or
    /// Cancelled). Backup files are kept unless `deletionPolicy: Delete`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 31536000))]
    pub ttl_seconds_after_finished: Option<i64>,
}

/// How the backup data leaves QEMU.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum BackupMode {
    /// QEMU writes one qcow2 file per disk into target.directory.
    #[default]
    Push,
    /// QEMU serves a point-in-time NBD export with the dirty bitmap as a meta context.
    Pull,
}

/// The checkpoint a backup creates.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupCheckpoint {
    /// Name of the VirtualMachineCheckpoint to create.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
}

/// One disk of a backup.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupDisk {
    /// Device name as the user knows it (e.g. `vda`, `disk0`).
    #[schemars(length(min = 1, max = 128))]
    pub name: String,
    /// Whether to back this disk up (true when omitted). Not defaulted in the stored
    /// object, so re-applying a manifest is a no-op.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<bool>,
}

impl BackupDisk {
    /// Whether this disk is backed up.
    pub fn selected(&self) -> bool {
        self.backup.unwrap_or(true)
    }
}

/// Where backup data goes: a directory (Push) or an NBD export (Pull).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(validation = Rule::new("(has(self.directory) ? 1 : 0) + (has(self.nbd) ? 1 : 0) + (has(self.repository) ? 1 : 0) <= 1").message("target takes one of directory, nbd or repository"))]
#[serde(rename_all = "camelCase")]
pub struct BackupTarget {
    /// Push: directory on the node for the qcow2 files, inside `<backup root>/<namespace>/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory: Option<DirectoryTarget>,
    /// Pull: where the NBD export listens. Default: the unix socket `<export dir>/<namespace>/<backup>.sock`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd: Option<NbdTarget>,
    /// Push into a BackupRepository (deduplicated, off the node): the agent reads a
    /// point-in-time export of the disks and stores one snapshot per backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<RepositoryTarget>,
}

/// A BackupRepository by name.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RepositoryTarget {
    /// Name of the (cluster-scoped) BackupRepository; it must allow this namespace.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
}

/// What happens to the stored backup when the resource is deleted.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DeletionPolicy {
    /// Keep the backup files or repository snapshot (the default).
    #[default]
    Retain,
    /// Delete them too, unless a kept incremental still needs them.
    Delete,
}

/// A directory on the VM's node.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DirectoryTarget {
    /// Absolute path inside `<allowed backup root>/<namespace>/` on the node, e.g.
    /// `/var/lib/cairn/backups/<namespace>/vm1`; missing directories are created.
    /// Symlinks below the root are not followed (refused), and so is `..`.
    #[schemars(length(min = 2, max = 4096))]
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("target.directory.path must be absolute"))]
    #[x_kube(validation = Rule::new("!self.contains('/../') && !self.endsWith('/..')").message("target.directory.path must not contain '..'"))]
    pub path: String,
}

/// Where a pull-mode NBD export listens.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(validation = Rule::new("!(has(self.unixSocket) && has(self.tcp))").message("nbd takes either unixSocket or tcp, not both"))]
#[serde(rename_all = "camelCase")]
pub struct NbdTarget {
    /// Serve on a unix socket on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unix_socket: Option<UnixSocketTarget>,
    /// Serve on TCP with TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpTarget>,
}

/// A unix socket path on the node.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UnixSocketTarget {
    /// Absolute socket path inside the agent's `<export dir>/<namespace>/`; when
    /// omitted, `<export dir>/<namespace>/<backup>.sock`. The socket is mode 0660
    /// (the chart's export group); an existing file of that name is never replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 2, max = 107), regex(pattern = r"^/"))]
    #[x_kube(validation = Rule::new("!self.contains('/../') && !self.endsWith('/..')").message("target.nbd.unixSocket.path must not contain '..'"))]
    pub path: Option<String>,
}

/// An NBD export over TCP, protected by TLS with a pre-shared key (TLS-PSK).
///
/// The export listens on the node's export address (the agent's
/// `--export-address`, chart value `agent.exports.tcp.address`); the operator
/// issues a key for this backup only and stores it in the Secret
/// `<backup>-nbd-tls` of the backup's namespace (`username`, `key` in hex, and
/// `keys.psk` ready for QEMU's `tls-creds-psk`); status.export.url gives
/// `nbds://<address>:<port>`. The Secret goes with the backup.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TcpTarget {
    /// Port to listen on; it must lie in the node's export port range (the
    /// agent's `--export-ports`, chart value `agent.exports.tcp.ports`). When
    /// omitted, the first free port of that range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
}

/// Name of the Secret, in the backup's namespace, that carries the TLS-PSK
/// credentials of a `target.nbd.tcp` export.
pub fn nbd_tls_secret_name(backup: &str) -> String {
    format!("{backup}-nbd-tls")
}

/// Name of the operator's copy of those credentials in Cairn's own namespace,
/// the one the agent reads (it never reads a tenant's Secrets): keyed by the
/// backup's UID, so a re-used backup name never finds an older key.
pub fn nbd_psk_agent_secret_name(backup_uid: &str) -> String {
    format!("cairn-nbd-psk-{backup_uid}")
}

/// Keys of both credential Secrets: the TLS user name, the key (hex), and a
/// ready `keys.psk` (`username:hexkey`) for QEMU or nbdcopy clients.
pub const NBD_TLS_USERNAME_KEY: &str = "username";
/// See [`NBD_TLS_USERNAME_KEY`].
pub const NBD_TLS_KEY_KEY: &str = "key";
/// See [`NBD_TLS_USERNAME_KEY`].
pub const NBD_TLS_KEYS_FILE_KEY: &str = "keys.psk";

/// Lifecycle phase of a backup.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum BackupPhase {
    /// Accepted, waiting for the VM's node.
    #[default]
    Pending,
    /// The QEMU job runs (Push) or the export is being set up (Pull).
    Running,
    /// Pull: the export is being served; see status.export.
    Exporting,
    /// Finished; the files or export data are complete.
    Succeeded,
    /// Could not complete; see the conditions. Nothing is left behind.
    Failed,
    /// Stopped by deleting the resource or by the export timeout.
    Cancelled,
}

impl BackupPhase {
    /// The phase's name as it appears in `status.phase`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Running => "Running",
            Self::Exporting => "Exporting",
            Self::Succeeded => "Succeeded",
            Self::Failed => "Failed",
            Self::Cancelled => "Cancelled",
        }
    }

    /// Whether the backup has reached an end state.
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

/// Observed state of a backup.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineBackupStatus {
    /// Lifecycle phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<BackupPhase>,
    /// Conditions: `Ready` (finished successfully or export ready), `Reconciling`
    /// (work in progress), `Stalled` (a terminal failure, with its reason),
    /// `Verified` (push: the backup files' checksums were recorded after the job).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// Node that runs the backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// When the job started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// When the job finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// Bytes copied so far over all disks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<BackupProgress>,
    /// Per-disk results.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub disks: Vec<BackupDiskStatus>,
    /// Pull mode: where to read the export.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export: Option<BackupExport>,
    /// Name of the checkpoint this backup created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
    /// Set when the backup point was taken with the guest's filesystems frozen
    /// (`spec.quiesce`): the backup is application-consistent. The
    /// `ApplicationConsistent` condition says the same for every backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quiesce: Option<crate::common::QuiesceStatus>,
    /// Repository target: the snapshot written and what it cost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<RepositorySnapshotStatus>,
    /// Why the backup failed, in one sentence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The repository snapshot of a backup.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RepositorySnapshotStatus {
    /// BackupRepository name.
    pub name: String,
    /// Snapshot id in the repository (restore with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// Snapshot this one took unchanged chunks from (incrementals).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_snapshot: Option<String>,
    /// Bytes read from the VM's export.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_read: Option<i64>,
    /// Bytes uploaded (compressed, encrypted, new chunks only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_uploaded: Option<i64>,
    /// Chunks stored by this backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks_new: Option<i64>,
    /// Chunks already in the repository (dedup) or taken from the base snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks_reused: Option<i64>,
}

impl crate::conditions::LifecycleStatus for VirtualMachineBackupStatus {
    /// `Pending`, `Running`: in progress. `Succeeded`: current. `Exporting`:
    /// current once the export is served (`Ready=True`), in progress before.
    /// `Failed`, `Cancelled`: failed (the backup will never complete).
    fn lifecycle(&self) -> (crate::conditions::Lifecycle, &'static str) {
        use crate::conditions::{Lifecycle, is_true};
        let phase = self.phase.unwrap_or_default();
        let lifecycle = match phase {
            BackupPhase::Pending | BackupPhase::Running => Lifecycle::InProgress,
            BackupPhase::Succeeded => Lifecycle::Current,
            BackupPhase::Exporting if is_true(&self.conditions, crate::condition_types::READY) => {
                Lifecycle::Current
            }
            BackupPhase::Exporting => Lifecycle::InProgress,
            BackupPhase::Failed | BackupPhase::Cancelled => Lifecycle::Failed,
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

/// Progress counters.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupProgress {
    /// Bytes done.
    pub bytes_done: i64,
    /// Bytes to do.
    pub bytes_total: i64,
}

/// Result of one disk.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupDiskStatus {
    /// Device name.
    pub name: String,
    /// Bytes copied for this disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_copied: Option<i64>,
    /// Push: the qcow2 file written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Push incremental: the previous backup file this one is backed by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_file: Option<String>,
    /// Pull: the NBD export name of this disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export_name: Option<String>,
    /// Pull: the meta context that carries the dirty bitmap (`qemu:dirty-bitmap:<name>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitmap_context: Option<String>,
    /// Checkpoint this disk's backup is incremental from; absent for a full backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incremental_from: Option<String>,
    /// True when an incremental was asked for but this disk was backed up full (fallbackToFull).
    #[serde(default)]
    pub fell_back_to_full: bool,
    /// Push: SHA-256 (hex) of this disk's backup file (the qcow2 file this backup
    /// wrote, not its backing files, which their own backups cover). Recorded
    /// after the job by a verification step; see the `Verified` condition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// A pull-mode NBD export.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupExport {
    /// NBD URL of the server, e.g. `nbd+unix:///?socket=/run/cairn/exports/<namespace>/<backup>.sock`,
    /// or `nbds://<node address>:<port>` for a TCP export (TLS required).
    pub url: String,
    /// TCP exports: the Secret of this namespace with the TLS-PSK credentials
    /// (`username`, `key`, `keys.psk`) a client needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_secret_name: Option<String>,
    /// When the export is torn down if the resource still exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
}
