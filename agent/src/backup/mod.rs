//! Backups: push (QEMU writes qcow2 files into a directory) and pull
//! (QEMU serves a point-in-time NBD export).
//!
//! A push backup is a short pipeline: resolve the target under the allowed
//! roots → read the inventory → [`push::plan_push`] (pure: which disks, full or
//! incremental, which backing file) → check free space → create target files
//! and nodes → one `transaction` that starts every `blockdev-backup` job (and
//! adds the new checkpoint's bitmaps) → [`push::RunningBackup::wait`] → write
//! the [`manifest::Manifest`] (unverified) → later, off the critical path,
//! [`verify_backup`] records each new file's SHA-256 in it. Every QEMU-side name comes from the caller's
//! [`crate::identity::OperationId`], so calling [`push::start_push_backup`]
//! again after an agent restart re-attaches to the running jobs, and
//! [`cleanup_leftovers`] removes anything a crashed attempt left.

pub mod manifest;
pub mod pull;
pub mod push;
pub mod repository;
pub mod target;
pub mod verify;

use std::path::PathBuf;
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::checkpoint::CheckpointError;
use crate::identity::OperationId;
use crate::image::ImageError;
use crate::inventory::{InventoryError, SelectionError};
use crate::qmp::{QmpClient, QmpError};
use crate::tenant_dir::{TenantDir, TenantDirError};

pub use manifest::{BackupKind, Manifest, ManifestDisk};
pub use pull::{
    ExportedDisk, PskCredentials, PullExport, PullPolicy, PullRequest, ScratchReserve, TcpEndpoint,
    TcpExportPolicy, TcpExportRequest, check_pull_export, check_tcp_pull_export,
    remove_local_files, start_pull_export, stop_pull_export,
};
pub use push::{
    BackupOutcome, BackupProgress, PushRequest, RunningBackup, run_push_backup, start_push_backup,
};
pub use target::TargetPolicy;
pub use verify::{verify_backup, verify_backup_file};

/// Failures of backup operations. Whatever the variant, the operation has
/// cleaned up what it created (nodes, jobs, files, the new checkpoint's bitmaps)
/// unless the VM itself was gone.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// `quiesce` was asked for and the guest could not be frozen (nothing ran).
    #[error(transparent)]
    Quiesce(#[from] crate::qga::QgaError),
    /// The disk selection is invalid.
    #[error(transparent)]
    Selection(#[from] SelectionError),
    /// The new checkpoint cannot be created.
    #[error(transparent)]
    Checkpoint(Box<CheckpointError>),
    /// Reading the VM's disks failed.
    #[error(transparent)]
    Inventory(#[from] InventoryError),
    /// The backup name cannot be used as a file name.
    #[error("backup name {name:?} is not usable: use letters, digits, `.`, `-`, `_`")]
    InvalidName {
        /// The name.
        name: String,
    },
    /// A path the tenant named does not resolve inside its namespace's allowed directory.
    #[error("{path} is refused: {reason}; it must lie inside {allowed}")]
    OutsideAllowedRoots {
        /// Requested path.
        path: PathBuf,
        /// The allowed directory, `<root>/<namespace>/`.
        allowed: String,
        /// Why.
        reason: String,
    },
    /// A file in the way, a file name that is not a single component, or an
    /// I/O failure in a tenant directory.
    #[error(transparent)]
    TenantPath(TenantDirError),
    /// A manifest names a file that is not a single path component.
    #[error("manifest {path} names file {name:?}, which is not a plain file name; it is ignored")]
    ManifestFileName {
        /// The manifest.
        path: PathBuf,
        /// The offending name.
        name: String,
    },
    /// A manifest with this backup's file names belongs to another backup.
    #[error(
        "{path} belongs to backup {other_uid} of VM {other_vm}, not to this one ({uid}); Cairn never reuses another backup's files: remove it or choose another target"
    )]
    ForeignManifest {
        /// The manifest.
        path: PathBuf,
        /// This backup's UID.
        uid: String,
        /// UID recorded in the manifest.
        other_uid: String,
        /// VM recorded in the manifest.
        other_vm: String,
    },
    /// The fleecing scratch of a pull export filled up: copy-before-write
    /// broke the point-in-time view (guest writes carried on).
    #[error(
        "the fleecing scratch in {path} of disk {disk} of VM {vm} filled up during the export, so the point-in-time view was dropped (guest writes were not affected); the export was torn down: give the scratch directory more room and retry"
    )]
    ScratchFull {
        /// Which VM.
        vm: String,
        /// Disk name.
        disk: String,
        /// Scratch directory.
        path: PathBuf,
    },
    /// The point-in-time view of a pull export broke (copy-before-write
    /// failed or exceeded its timeout); guest writes carried on.
    #[error(
        "the point-in-time view of disk {disk} of VM {vm} broke during the export ({detail}); guest writes were not affected; the export was torn down: retry"
    )]
    ExportBroken {
        /// Which VM.
        vm: String,
        /// Disk name.
        disk: String,
        /// What QEMU said.
        detail: String,
    },
    /// Not enough free space for the backup.
    #[error(
        "target {path} has {available} bytes free but the backup of VM {vm} may need {needed}; free space or choose another target"
    )]
    InsufficientSpace {
        /// Which VM.
        vm: String,
        /// Target directory.
        path: PathBuf,
        /// Estimated need.
        needed: u64,
        /// Free bytes.
        available: u64,
    },
    /// The target filesystem filled up during the job.
    #[error(
        "target of disk {disk} of VM {vm} ran out of space during the backup; free space and retry"
    )]
    NoSpace {
        /// Which VM.
        vm: String,
        /// Disk name.
        disk: String,
    },
    /// The incremental base cannot be used on a disk.
    #[error(
        "checkpoint {checkpoint} cannot be the base on disk {disk} of VM {vm}: {reason}; take a full backup or set fallbackToFull"
    )]
    BaseUnusable {
        /// Which VM.
        vm: String,
        /// Disk name.
        disk: String,
        /// Base checkpoint.
        checkpoint: String,
        /// Why (missing, inconsistent, no earlier backup file).
        reason: String,
    },
    /// A block job failed.
    #[error("backup of disk {disk} of VM {vm} failed in QEMU: {message}")]
    JobFailed {
        /// Which VM.
        vm: String,
        /// Disk name.
        disk: String,
        /// QEMU's message.
        message: String,
    },
    /// The backup repository failed (unreachable, wrong key, corrupt object…).
    #[error("backup of VM {vm} into the repository failed")]
    Repository {
        /// Which VM.
        vm: String,
        /// What the repository said.
        #[source]
        source: cairn_repo::RepoError,
    },
    /// Reading the point-in-time export of a disk failed.
    #[error("reading the export of disk {disk} of VM {vm} failed: {message}")]
    Export {
        /// Which VM.
        vm: String,
        /// Disk name.
        disk: String,
        /// The NBD client's error.
        message: String,
    },
    /// The backup was cancelled.
    #[error("backup {name} of VM {vm} was cancelled")]
    Cancelled {
        /// Which VM.
        vm: String,
        /// Backup name.
        name: String,
    },
    /// QEMU went away during the operation.
    #[error(
        "VM {vm} went away during backup {name}; its files were removed, retry once the VM runs"
    )]
    VmGone {
        /// Which VM.
        vm: String,
        /// Backup name.
        name: String,
        /// The transport failure.
        #[source]
        source: QmpError,
    },
    /// The TCP port a pull export asked for is taken on the node.
    #[error(
        "port {port} on {address} is already in use on this node; omit target.nbd.tcp.port to get a free port, or choose another"
    )]
    ExportPortInUse {
        /// Export address of the node.
        address: String,
        /// The port.
        port: u16,
    },
    /// The TCP port a pull export asked for lies outside the node's export range.
    #[error(
        "port {port} is outside this node's export port range {first}-{last}; choose a port in it or omit the port"
    )]
    ExportPortOutsideRange {
        /// The port asked for.
        port: i64,
        /// First port of the range.
        first: u16,
        /// Last port of the range.
        last: u16,
    },
    /// Every port of the node's export range is taken.
    #[error(
        "every port of this node's export range {first}-{last} on {address} is in use; delete finished pull backups or widen the range (chart value agent.exports.tcp.ports)"
    )]
    NoFreeExportPort {
        /// Export address of the node.
        address: String,
        /// First port of the range.
        first: u16,
        /// Last port of the range.
        last: u16,
    },
    /// The node has no TCP export address configured, or it does not parse.
    #[error(
        "this node serves no TCP exports: {detail}; set the chart value agent.exports.tcp.address (agent flag --export-address), or use target.nbd.unixSocket"
    )]
    TcpExportsDisabled {
        /// What is wrong.
        detail: String,
    },
    /// The TLS key of a TCP export cannot be written or read.
    #[error("the TLS key of the export cannot be prepared: {detail}")]
    TlsKey {
        /// What failed (never the key).
        detail: String,
    },
    /// A pull export is already being served from this VM.
    #[error("VM {vm} already serves an NBD export that Cairn did not start; stop it first")]
    NbdServerBusy {
        /// Which VM.
        vm: String,
    },
    /// QEMU refused a step.
    #[error("backup step {step} on VM {vm} failed")]
    Qmp {
        /// Which VM.
        vm: String,
        /// What was being done.
        step: String,
        /// The QMP failure.
        #[source]
        source: QmpError,
    },
    /// An image tool failed.
    #[error("image tool step {step} failed")]
    Image {
        /// What was being done.
        step: String,
        /// The tool failure.
        #[source]
        source: ImageError,
    },
    /// Filesystem trouble on the target.
    #[error("cannot use {path}")]
    TargetIo {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A backup file no longer is what the backup wrote (found while verifying).
    #[error("backup file {path} cannot be verified: {reason}")]
    FileChanged {
        /// The file.
        path: PathBuf,
        /// What differs.
        reason: String,
    },
    /// A manifest is unreadable.
    #[error("manifest {path} is not valid")]
    BadManifest {
        /// The path.
        path: PathBuf,
        /// The decoding failure.
        #[source]
        source: serde_json::Error,
    },
}

impl From<TenantDirError> for BackupError {
    fn from(e: TenantDirError) -> Self {
        match e {
            TenantDirError::Outside {
                path,
                allowed,
                reason,
            } => BackupError::OutsideAllowedRoots {
                path,
                allowed,
                reason,
            },
            e => BackupError::TenantPath(e),
        }
    }
}

impl From<CheckpointError> for BackupError {
    fn from(e: CheckpointError) -> Self {
        BackupError::Checkpoint(Box::new(e))
    }
}

/// Checks a backup name usable as a file name stem.
pub fn validate_backup_name(name: &str) -> Result<(), BackupError> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if ok {
        Ok(())
    } else {
        Err(BackupError::InvalidName {
            name: name.to_string(),
        })
    }
}

/// What [`cleanup_leftovers`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeftoverReport {
    /// Jobs cancelled and/or dismissed.
    pub jobs: Vec<String>,
    /// Exports removed.
    pub exports: Vec<String>,
    /// Block nodes removed.
    pub nodes: Vec<String>,
    /// Temporary bitmaps removed, as `node/bitmap`.
    pub bitmaps: Vec<String>,
    /// QOM objects removed (the TLS credentials of a TCP export).
    pub objects: Vec<String>,
    /// Files removed.
    pub files: Vec<PathBuf>,
}

impl LeftoverReport {
    /// True when nothing was found.
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
            && self.exports.is_empty()
            && self.nodes.is_empty()
            && self.bitmaps.is_empty()
            && self.objects.is_empty()
            && self.files.is_empty()
    }
}

/// Where an operation's files live, for [`cleanup_leftovers`].
#[derive(Debug)]
pub struct FileScope<'a> {
    /// Directory (opened inside the namespace's allowed directory).
    pub dir: &'a TenantDir,
    /// The backup's file stem ([`Manifest::stem`], name + UID): files
    /// `<stem>.*.qcow2` without `<stem>.manifest.json` are partial.
    pub stem: &'a str,
}

fn qmp_err(vm: &str, step: &str) -> impl FnOnce(QmpError) -> BackupError + use<> {
    let (vm, step) = (vm.to_string(), step.to_string());
    move |source| {
        if source.is_disconnect() {
            BackupError::VmGone {
                vm,
                name: step,
                source,
            }
        } else {
            BackupError::Qmp { vm, step, source }
        }
    }
}

/// Waits until none of `ids` is still running; returns the concluded ones.
async fn wait_jobs_settled(
    client: &QmpClient,
    ids: &[String],
    limit: Duration,
) -> Result<(), QmpError> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let jobs = client.query_jobs().await?;
        let busy = jobs
            .iter()
            .any(|j| ids.contains(&j.id) && j.status != "concluded");
        if !busy || tokio::time::Instant::now() > deadline {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Removes everything QEMU-side that carries `op`'s prefix (jobs are
/// cancelled and dismissed, exports and nodes deleted, temporary bitmaps
/// removed, the NBD server stopped when only Cairn used it) and, given a
/// [`FileScope`], partial files of that backup. Safe to call any time and
/// repeatedly; never touches checkpoint bitmaps.
pub async fn cleanup_leftovers(
    client: &QmpClient,
    op: &OperationId,
    files: Option<FileScope<'_>>,
) -> Result<LeftoverReport, QmpError> {
    let prefix = op.prefix();
    let mut report = LeftoverReport::default();

    // Exports first: they hold nodes and bitmaps.
    let exports = client.query_block_exports().await?;
    for e in exports.iter().filter(|e| e.id.starts_with(&prefix)) {
        if let Err(err) = client.block_export_del(&e.id).await {
            warn!(export = %e.id, error = %err, "cannot remove export");
        }
        report.exports.push(e.id.clone());
    }
    if !report.exports.is_empty() {
        wait_exports_gone(client, &prefix).await?;
        let remaining = client.query_block_exports().await?;
        if remaining.is_empty() {
            let _ = client.nbd_server_stop().await;
        }
    }

    let jobs = client.query_jobs().await?;
    let ours: Vec<String> = jobs
        .iter()
        .filter(|j| j.id.starts_with(&prefix))
        .map(|j| j.id.clone())
        .collect();
    for j in jobs
        .iter()
        .filter(|j| ours.contains(&j.id) && j.status != "concluded")
    {
        if let Err(err) = client.job_cancel(&j.id).await {
            warn!(job = %j.id, error = %err, "cannot cancel job");
        }
    }
    wait_jobs_settled(client, &ours, Duration::from_secs(30)).await?;
    for id in &ours {
        let _ = client.job_dismiss(id).await;
        report.jobs.push(id.clone());
    }

    // Nodes depend on each other (snapshot-access → copy-before-write →
    // scratch) and a device may sit on our filter: delete what can go, put
    // devices back on the filter's child, repeat.
    for pass in 0..4 {
        let ours: Vec<String> = client
            .query_named_block_nodes()
            .await?
            .into_iter()
            .filter_map(|n| n.node_name)
            .filter(|n| n.starts_with(&prefix))
            .collect();
        if ours.is_empty() {
            break;
        }
        for name in ours {
            match client.blockdev_del(&name).await {
                Ok(()) => report.nodes.push(name),
                Err(err) if pass == 3 => {
                    warn!(node = %name, error = %err, "cannot remove block node")
                }
                Err(_) => {}
            }
        }
        detach_filters(client, &prefix).await?;
    }
    for n in client.query_named_block_nodes().await? {
        let Some(node) = n.node_name else { continue };
        for b in n.dirty_bitmaps {
            let Some(name) = b.name else { continue };
            if name.starts_with(&prefix) {
                match client.remove_bitmap(&node, &name).await {
                    Ok(()) => report.bitmaps.push(format!("{node}/{name}")),
                    Err(err) => warn!(%node, bitmap = %name, error = %err, "cannot remove bitmap"),
                }
            }
        }
    }

    remove_fdsets(client, &prefix).await?;
    // The TLS credentials of a TCP export (the server that used them was
    // stopped with our exports above, or by the failed setup itself; a
    // server without exports is never stopped here, it may not be ours).
    for id in client
        .list_objects()
        .await?
        .into_iter()
        .filter(|o| o.starts_with(&prefix))
    {
        match client.object_del(&id).await {
            Ok(()) => report.objects.push(id),
            Err(err) => warn!(object = %id, error = %err, "cannot remove object"),
        }
    }
    if let Some(scope) = files {
        report.files = remove_partial_files(scope.dir, scope.stem, &prefix);
    }
    if !report.is_empty() {
        info!(identity = %op.identity(), ?report, "removed leftovers");
    }
    Ok(report)
}

/// Hands QEMU an open file as `/dev/fdset/<n>` (QMP `add-fd`, SCM_RIGHTS):
/// QEMU then opens exactly this inode, never a path a tenant could swap, and
/// needs no access to the directory. With `direct`, a second descriptor of
/// the same file opened `O_DIRECT` joins the set (when the filesystem allows
/// it), for `cache.direct`. The set is tagged with `opaque` (the operation's
/// prefix), so [`cleanup_leftovers`] finds it again.
pub(crate) async fn qemu_file(
    client: &QmpClient,
    file: &std::fs::File,
    opaque: &str,
    direct: bool,
) -> Result<String, BackupError> {
    let io = |e: std::io::Error| BackupError::TargetIo {
        path: PathBuf::from(opaque),
        source: e,
    };
    let dup = file.try_clone().map_err(io)?;
    let vm = client.socket().display().to_string();
    let id = client
        .add_fd(dup.into(), None, opaque)
        .await
        .map_err(qmp_err(&vm, "add-fd"))?;
    if direct {
        use rustix::fs::{Mode, OFlags};
        let reopened = rustix::fs::open(
            crate::tenant_dir::fd_path(file),
            OFlags::RDWR | OFlags::DIRECT | OFlags::CLOEXEC,
            Mode::empty(),
        );
        if let Ok(fd) = reopened {
            client
                .add_fd(fd, Some(id), opaque)
                .await
                .map_err(qmp_err(&vm, "add-fd"))?;
        }
    }
    Ok(format!("/dev/fdset/{id}"))
}

/// Removes the fd sets tagged with `prefix` ([`qemu_file`]).
pub(crate) async fn remove_fdsets(client: &QmpClient, prefix: &str) -> Result<usize, QmpError> {
    let mut n = 0;
    for (id, tags) in client.query_fdsets().await? {
        if tags.iter().any(|t| t.starts_with(prefix)) {
            client.remove_fdset(id).await?;
            n += 1;
        }
    }
    Ok(n)
}

/// Puts every device whose root node is one of our filters back onto the
/// filter's `file` child (what it used before the export).
async fn detach_filters(client: &QmpClient, prefix: &str) -> Result<(), QmpError> {
    for dev in client.query_block().await? {
        let (Some(qdev), Some(root)) = (dev.qdev.as_deref(), dev.inserted.as_ref()) else {
            continue;
        };
        let Some(root) = root.node_name.as_deref().filter(|n| n.starts_with(prefix)) else {
            continue;
        };
        if let Some(child) = client.child_node(root, "file").await? {
            match client.set_device_drive(qdev, &child).await {
                Ok(()) => {
                    info!(device = %qdev, node = %child, "device detached from the export filter")
                }
                Err(err) => {
                    debug!(device = %qdev, error = %err, "cannot detach the export filter yet")
                }
            }
        }
    }
    Ok(())
}

async fn wait_exports_gone(client: &QmpClient, prefix: &str) -> Result<(), QmpError> {
    for _ in 0..200 {
        let exports = client.query_block_exports().await?;
        if !exports.iter().any(|e| e.id.starts_with(prefix)) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Ok(())
}

/// Removes `<stem>.*.qcow2` when `<stem>.manifest.json` is absent, the
/// manifest's temporary file, and scratch files carrying `prefix`: only files
/// of this backup's UID (the stem carries it), never another backup's.
fn remove_partial_files(dir: &TenantDir, stem: &str, prefix: &str) -> Vec<PathBuf> {
    let manifest = Manifest::file_name(stem);
    let complete = dir.exists(&manifest);
    let tmp_manifest = format!("{manifest}.tmp");
    let mut removed = Vec::new();
    for file in dir.names() {
        let partial_data =
            !complete && file.starts_with(&format!("{stem}.")) && file.ends_with(".qcow2");
        let scratch = file.starts_with(prefix);
        if (partial_data || file == tmp_manifest || scratch) && dir.remove(&file).is_ok() {
            removed.push(dir.display_path(&file));
        }
    }
    removed
}
