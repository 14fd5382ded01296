//! Pull backups: a point-in-time NBD export of each disk over a unix socket.
//!
//! Per disk, a `copy-before-write` filter is inserted above the disk (the
//! device is moved onto it with `qom-set drive`): before a guest write reaches
//! the disk, the old data is copied into a scratch qcow2, and a
//! `snapshot-access` node on the filter reads the disk as it was when the
//! export started; that node is what the NBD export serves. The filter runs
//! with `on-cbw-error: break-snapshot` and a `cbw-timeout`: when the scratch
//! fills up (or a copy stalls), QEMU drops the point-in-time view instead of
//! failing the guest's write, reads of the export fail from then on, and
//! [`check_pull_export`] reports [`BackupError::ScratchFull`] /
//! [`BackupError::ExportBroken`] so the controller tears it down.
//!
//! The filter is inserted, the temporary bitmap merged (incremental) and the
//! new checkpoint created while the VM is paused (`stop` drains in-flight
//! I/O; `cont` right after), so bitmap and view describe the same instant.
//!
//! Where things live:
//! - the socket: `<export dir>/<namespace>/<backup>.sock` by default; a path
//!   the tenant names must lie inside `<export dir>/<namespace>/` (opened
//!   with [`TenantDir`]); anything already at that name that is not a dead
//!   socket is refused, never replaced. QEMU is not given the path (its
//!   `nbd-server-start` would unlink whatever is there before binding): the
//!   agent binds the socket itself inside the directory it holds open, gives it mode `0660` and the configured group,
//!   and hands QEMU the listening descriptor (`getfd` + `nbd-server-start`
//!   with `addr.type: fd`). The directories are `0750`, so other local users
//!   can neither reach nor connect to it.
//! - scratch images: `<scratch dir>/<namespace>/cairn-<op>-fleece-<disk>.qcow2`,
//!   created exclusively through a [`TenantDir`] and handed to QEMU as an
//!   open descriptor (`add-fd`, opened as `/dev/fdset/<n>`).
//!
//! [`stop_pull_export`] removes everything again.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::fs::FileType;
use tracing::{info, warn};

use super::{BackupError, cleanup_leftovers, qmp_err, validate_backup_name};
use crate::checkpoint::plan_checkpoint;
use crate::identity::{NodeRole, OperationId};
use crate::image;
use crate::inventory::{Disk, VmRef, read_inventory, select_disks, select_incremental_disks};
use crate::qmp::{BackingChoice, BitmapSpec, QmpClient, QmpError, TransactionStep};
use crate::tenant_dir::{DirMode, TenantDir, TenantDirError};

/// How much free scratch space a pull export must find before it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ScratchReserve {
    /// Room for every allocated byte of each exported disk (plus metadata):
    /// copy-before-write copies at most the data that exists when the export
    /// starts (unallocated areas cost only metadata), so this is the worst case.
    #[default]
    Allocated,
    /// Room for each disk's full virtual size: stricter, for images whose
    /// host allocation says little (preallocated files, raw-backed devices).
    Virtual,
}

impl std::str::FromStr for ScratchReserve {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "allocated" => Ok(Self::Allocated),
            "virtual" => Ok(Self::Virtual),
            other => Err(format!(
                "unknown scratch reserve {other:?}: use allocated or virtual"
            )),
        }
    }
}

/// Where pull exports put their sockets and scratch images, on this node.
#[derive(Debug, Clone)]
pub struct PullPolicy {
    /// Export sockets go in `<export_dir>/<namespace>/`.
    pub export_dir: PathBuf,
    /// Group owning export sockets and their directories (mode 0660 / 0750);
    /// `None` keeps the agent's group.
    pub socket_group: Option<u32>,
    /// Scratch images go in `<scratch_dir>/<namespace>/`.
    pub scratch_dir: PathBuf,
    /// Free-space check for the scratch.
    pub scratch_reserve: ScratchReserve,
    /// Seconds a single copy-before-write may take before the view is dropped
    /// (the guest write then proceeds).
    pub cbw_timeout_seconds: u32,
}

impl PullPolicy {
    /// The export socket of backup `backup` in `namespace`: the directory
    /// handle and the socket's file name. `requested` (the tenant's
    /// `unixSocket.path`) must lie inside `<export dir>/<namespace>/`.
    pub fn socket_location(
        &self,
        namespace: &str,
        requested: Option<&Path>,
        backup: &str,
    ) -> Result<(TenantDir, String), BackupError> {
        let mode = DirMode {
            mode: 0o750,
            group: self.socket_group,
        };
        let roots = [self.export_dir.clone()];
        match requested {
            None => {
                let dir = TenantDir::open(&roots, namespace, None, mode)?;
                Ok((dir, format!("{backup}.sock")))
            }
            Some(p) => {
                let (Some(parent), Some(name)) = (p.parent(), p.file_name()) else {
                    return Err(TenantDirError::Outside {
                        path: p.to_path_buf(),
                        allowed: format!("{}/", self.export_dir.join(namespace).display()),
                        reason: "it names no file".into(),
                    }
                    .into());
                };
                let name = name.to_string_lossy().to_string();
                // `<dir>/..` has no file name; `..` elsewhere is refused by TenantDir.
                let dir = TenantDir::open(&roots, namespace, Some(parent), mode).map_err(|e| {
                    match e {
                        // Name the socket path the tenant gave, not its directory.
                        TenantDirError::Outside {
                            allowed, reason, ..
                        } => TenantDirError::Outside {
                            path: p.to_path_buf(),
                            allowed,
                            reason,
                        },
                        e => e,
                    }
                })?;
                crate::tenant_dir::check_name(&name)?;
                Ok((dir, name))
            }
        }
    }

    /// The namespace's scratch directory.
    pub fn scratch(&self, namespace: &str) -> Result<TenantDir, BackupError> {
        Ok(TenantDir::open(
            std::slice::from_ref(&self.scratch_dir),
            namespace,
            None,
            DirMode::PRIVATE,
        )?)
    }
}

/// A pull export to start.
#[derive(Debug, Clone)]
pub struct PullRequest {
    /// Names every QEMU-side object (use the resource UID).
    pub operation: OperationId,
    /// Backup name (the default socket is `<backup>.sock`).
    pub name: String,
    /// Disk names; `None` = every writable qcow2 disk.
    pub disks: Option<Vec<String>>,
    /// Base checkpoint whose changes are exposed as a dirty-bitmap context.
    pub incremental: Option<String>,
    /// Checkpoint to create at the export point, in the same transaction.
    pub new_checkpoint: Option<String>,
    /// Unix socket the tenant asked for; `None` = the default.
    pub socket: Option<PathBuf>,
    /// Export a disk without a dirty-bitmap context when its base is unusable.
    pub fallback_to_full: bool,
    /// Freeze the guest's filesystems through its agent around the export point.
    pub quiesce: Option<crate::qga::GuestAgent>,
}

/// One exported disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedDisk {
    /// Disk name.
    pub disk: String,
    /// NBD export name.
    pub export_name: String,
    /// `nbd+unix:///<export>?socket=<path>`.
    pub url: String,
    /// Meta context with the blocks changed since the base, e.g. `qemu:dirty-bitmap:<name>`.
    pub bitmap_context: Option<String>,
    /// The base checkpoint, if incremental.
    pub incremental_from: Option<String>,
    /// An incremental was asked for but the base was unusable.
    pub fell_back_to_full: bool,
}

/// A running pull export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullExport {
    /// NBD socket (its real path, for clients).
    pub socket: PathBuf,
    /// Exported disks.
    pub disks: Vec<ExportedDisk>,
    /// How the guest was frozen for the export point (`quiesce`).
    pub quiesce: Option<crate::qga::QuiesceReport>,
}

struct PullDisk<'a> {
    disk: &'a Disk,
    /// The device (qdev path) and its current root node.
    qdev: String,
    root: String,
    allocated: u64,
    temp_bitmap: Option<String>,
    fell_back: bool,
    scratch_file: String,
    scratch_node: String,
    cbw_node: String,
    access_node: String,
}

/// Starts a point-in-time NBD export of the selected disks.
pub async fn start_pull_export(
    client: &QmpClient,
    vm: &VmRef,
    policy: &PullPolicy,
    request: &PullRequest,
) -> Result<PullExport, BackupError> {
    validate_backup_name(&request.name)?;
    let vm_name = vm.to_string();
    let op = &request.operation;
    let (sock_dir, sock_name) =
        policy.socket_location(&vm.namespace, request.socket.as_deref(), &request.name)?;
    let scratch = policy.scratch(&vm.namespace)?;
    let inv = read_inventory(client, vm).await?;
    let selected = match &request.incremental {
        Some(base) => {
            select_incremental_disks(&vm_name, &inv.disks, request.disks.as_deref(), base)?
        }
        None => select_disks(&vm_name, &inv.disks, request.disks.as_deref())?,
    };
    let devices = client
        .query_block()
        .await
        .map_err(qmp_err(&vm_name, "query-block"))?;
    let nodes = client
        .query_named_block_nodes()
        .await
        .map_err(qmp_err(&vm_name, "query-named-block-nodes"))?;
    let mut disks = Vec::new();
    for d in selected {
        let mut temp_bitmap = None;
        let mut fell_back = false;
        if let Some(cp) = &request.incremental {
            let reason = crate::checkpoint::bitmap_problem(d.bitmap(cp)).map(|p| p.describe());
            match reason {
                None => temp_bitmap = Some(op.temp_bitmap(&d.name)),
                Some(_) if request.fallback_to_full => fell_back = true,
                Some(reason) => {
                    return Err(BackupError::BaseUnusable {
                        vm: vm_name,
                        disk: d.name.clone(),
                        checkpoint: cp.clone(),
                        reason: reason.to_string(),
                    });
                }
            }
        }
        // The device showing this disk, and the node it is attached to now.
        let dev = devices.iter().find(|dev| {
            dev.inserted.as_ref().is_some_and(|i| {
                i.node_name.as_deref() == Some(&d.node_name) || i.file == d.file.to_string_lossy()
            })
        });
        let (Some(qdev), Some(root)) = (
            dev.and_then(|x| x.qdev.clone()),
            dev.and_then(|x| x.inserted.as_ref().and_then(|i| i.node_name.clone())),
        ) else {
            return Err(BackupError::JobFailed {
                vm: vm_name,
                disk: d.name.clone(),
                message:
                    "the disk is not attached to a device with a node name; a pull export needs one"
                        .into(),
            });
        };
        let allocated = nodes
            .iter()
            .find(|n| n.node_name.as_deref() == Some(&d.node_name))
            .and_then(|n| n.image.actual_size)
            .unwrap_or(d.virtual_size);
        disks.push(PullDisk {
            disk: d,
            qdev,
            root,
            allocated,
            temp_bitmap,
            fell_back,
            scratch_file: format!("{}fleece-{}.qcow2", op.prefix(), d.name),
            scratch_node: op.node_name(&d.name, NodeRole::Scratch),
            cbw_node: op.node_name(&d.name, NodeRole::CopyBeforeWrite),
            access_node: op.node_name(&d.name, NodeRole::SnapshotAccess),
        });
    }
    for p in &disks {
        crate::tenant_dir::check_name(&p.scratch_file)?;
    }
    let mut steps = Vec::new();
    if let Some(cp) = &request.new_checkpoint {
        let sel: Vec<&Disk> = disks.iter().map(|p| p.disk).collect();
        steps.extend(plan_checkpoint(&vm_name, &sel, cp)?);
    }
    // Scratch space: copy-before-write copies at most the data present when
    // the export starts (see ScratchReserve), plus qcow2 metadata.
    let needed: u64 = disks
        .iter()
        .map(|p| {
            let data = match policy.scratch_reserve {
                ScratchReserve::Allocated => p.allocated.min(p.disk.virtual_size),
                ScratchReserve::Virtual => p.disk.virtual_size,
            };
            super::target::qcow2_estimate(data, p.disk.virtual_size)
        })
        .sum();
    let available = scratch.available_bytes()?;
    if needed > available {
        return Err(BackupError::InsufficientSpace {
            vm: vm_name,
            path: scratch.path().to_path_buf(),
            needed,
            available,
        });
    }

    cleanup_leftovers(client, op, None)
        .await
        .map_err(qmp_err(&vm_name, "cleanup"))?;
    remove_scratch_files(&scratch, op);
    claim_socket_name(&sock_dir, &sock_name)?;
    let mut held = Vec::new();
    let result = setup(
        client, &vm_name, policy, request, &disks, steps, &scratch, &mut held, &sock_dir,
        &sock_name,
    )
    .await;
    match result {
        Ok(export) => {
            info!(vm = %vm, socket = %export.socket.display(), disks = export.disks.len(), "pull export started");
            Ok(export)
        }
        Err((e, checkpoint_created)) => {
            let _ = cleanup_leftovers(client, op, None).await;
            if let (true, Some(cp)) = (checkpoint_created, &request.new_checkpoint) {
                for p in &disks {
                    let _ = client.remove_bitmap(&p.disk.node_name, cp).await;
                }
            }
            remove_scratch_files(&scratch, op);
            remove_socket(&sock_dir, &sock_name);
            Err(e)
        }
    }
}

/// Makes sure nothing but a dead socket is at the export socket's name
/// (QEMU unlinks whatever is there before it binds): a live socket or any
/// other file is refused, a dead socket (a crashed export's) is removed.
pub(crate) fn claim_socket_name(dir: &TenantDir, name: &str) -> Result<(), BackupError> {
    match dir.kind(name)? {
        None => Ok(()),
        Some(FileType::Socket) => {
            let live = std::os::unix::net::UnixStream::connect(dir.proc_path().join(name)).is_ok();
            if live {
                return Err(TenantDirError::InTheWay {
                    path: dir.display_path(name),
                    what: "a socket something is listening on".into(),
                }
                .into());
            }
            dir.remove(name)?;
            Ok(())
        }
        Some(kind) => Err(TenantDirError::InTheWay {
            path: dir.display_path(name),
            what: format!("a {kind:?}, not a socket Cairn left"),
        }
        .into()),
    }
}

pub(crate) fn remove_socket(dir: &TenantDir, name: &str) {
    if matches!(dir.kind(name), Ok(Some(FileType::Socket))) {
        let _ = dir.remove(name);
    }
}

fn remove_scratch_files(scratch: &TenantDir, op: &OperationId) {
    for name in scratch.names() {
        if name.starts_with(&op.prefix()) {
            let _ = scratch.remove(&name);
        }
    }
}

/// Runs `steps` with the guest paused (when it runs), so that the transaction
/// and the filter insertion happen at one instant for the guest; with
/// `quiesce`, inside a freeze of the guest's filesystems (freeze, pause,
/// transaction, resume, thaw: the guest agent needs a running guest).
async fn at_one_instant(
    client: &QmpClient,
    vm: &str,
    steps: &[TransactionStep],
    disks: &[PullDisk<'_>],
    quiesce: Option<&crate::qga::GuestAgent>,
) -> Result<Option<crate::qga::QuiesceReport>, (BackupError, bool)> {
    match quiesce {
        Some(agent) => {
            let (result, report) = agent
                .quiesced(paused(client, vm, steps, disks))
                .await
                .map_err(|e| (BackupError::from(e), false))?;
            result.map(|()| Some(report))
        }
        None => paused(client, vm, steps, disks).await.map(|()| None),
    }
}

async fn paused(
    client: &QmpClient,
    vm: &str,
    steps: &[TransactionStep],
    disks: &[PullDisk<'_>],
) -> Result<(), (BackupError, bool)> {
    let fail = |step: &str, created: bool| {
        let f = qmp_err(vm, step);
        move |e: QmpError| (f(e), created)
    };
    let running = client
        .query_run_state()
        .await
        .map_err(fail("query-status", false))?
        == "running";
    if running {
        client.stop_vm().await.map_err(fail("stop", false))?;
    }
    let result = async {
        if !steps.is_empty() {
            client
                .transaction(steps)
                .await
                .map_err(fail("transaction", false))?;
        }
        for p in disks {
            client
                .set_device_drive(&p.qdev, &p.cbw_node)
                .await
                .map_err(fail("qom-set drive", true))?;
        }
        Ok(())
    }
    .await;
    if running && let Err(e) = client.cont_vm().await {
        warn!(%vm, error = %e, "cannot resume the VM after inserting the export filter");
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn setup(
    client: &QmpClient,
    vm: &str,
    policy: &PullPolicy,
    request: &PullRequest,
    disks: &[PullDisk<'_>],
    mut steps: Vec<TransactionStep>,
    scratch: &TenantDir,
    held: &mut Vec<File>,
    sock_dir: &TenantDir,
    sock_name: &str,
) -> Result<PullExport, (BackupError, bool)> {
    let op = &request.operation;
    let fail = |step: &str| {
        let f = qmp_err(vm, step);
        move |e: QmpError| (f(e), false)
    };
    for p in disks {
        let handle = scratch
            .create_new(&p.scratch_file, 0o600)
            .map_err(|e| (BackupError::from(e), false))?;
        image::create_qcow2_at(&handle, p.disk.virtual_size, None)
            .await
            .map_err(|source| {
                (
                    BackupError::Image {
                        step: "create scratch image".into(),
                        source,
                    },
                    false,
                )
            })?;
        let file = super::qemu_file(client, &handle, &p.scratch_node, false)
            .await
            .map_err(|e| (e, false))?;
        client
            .add_qcow2_node(
                &p.scratch_node,
                &file,
                false,
                false,
                &BackingChoice::Detached,
            )
            .await
            .map_err(fail("blockdev-add scratch"))?;
        held.push(handle);
        client
            .add_copy_before_write(
                &p.cbw_node,
                &p.root,
                &p.scratch_node,
                policy.cbw_timeout_seconds,
            )
            .await
            .map_err(fail("blockdev-add copy-before-write"))?;
        if let (Some(tmp), Some(base)) = (&p.temp_bitmap, &request.incremental) {
            steps.push(TransactionStep::AddBitmap(BitmapSpec {
                node: p.disk.node_name.clone(),
                name: tmp.clone(),
                persistent: false,
                disabled: true,
            }));
            steps.push(TransactionStep::MergeBitmaps {
                node: p.disk.node_name.clone(),
                target: tmp.clone(),
                sources: vec![base.clone()],
            });
        }
    }
    let quiesce = at_one_instant(client, vm, &steps, disks, request.quiesce.as_ref()).await?;
    let created = request.new_checkpoint.is_some();
    for p in disks {
        client
            .add_snapshot_access(&p.access_node, &p.cbw_node)
            .await
            .map_err(|e| (qmp_err(vm, "blockdev-add snapshot-access")(e), created))?;
    }

    // The agent binds the socket inside the directory it holds open, sets its
    // mode and group, and hands QEMU the listening descriptor (getfd): QEMU
    // never resolves or unlinks a path.
    let listener = std::os::unix::net::UnixListener::bind(sock_dir.proc_path().join(sock_name))
        .map_err(|source| {
            (
                BackupError::TargetIo {
                    path: sock_dir.display_path(sock_name),
                    source,
                },
                created,
            )
        })?;
    sock_dir
        .set_mode(sock_name, 0o660, policy_group(policy))
        .map_err(|e| (BackupError::from(e), created))?;
    let fd_name = format!("{}nbd", op.prefix());
    client
        .getfd(&fd_name, std::os::fd::OwnedFd::from(listener))
        .await
        .map_err(|e| (qmp_err(vm, "getfd")(e), created))?;
    if let Err(e) = client.nbd_server_start_fd(&fd_name).await {
        return Err(match e {
            QmpError::Command { ref desc, .. } if desc.contains("already running") => {
                (BackupError::NbdServerBusy { vm: vm.to_string() }, created)
            }
            e => (qmp_err(vm, "nbd-server-start")(e), created),
        });
    }
    let socket = sock_dir.display_path(sock_name);
    let mut exported = Vec::new();
    for p in disks {
        let bitmaps: Vec<(String, String)> = p
            .temp_bitmap
            .iter()
            .map(|b| (p.disk.node_name.clone(), b.clone()))
            .collect();
        client
            .nbd_export_add(
                &op.export_id(&p.disk.name),
                &p.access_node,
                &p.disk.name,
                &bitmaps,
            )
            .await
            .map_err(|e| (qmp_err(vm, "block-export-add")(e), created))?;
        exported.push(ExportedDisk {
            disk: p.disk.name.clone(),
            export_name: p.disk.name.clone(),
            url: format!("nbd+unix:///{}?socket={}", p.disk.name, socket.display()),
            bitmap_context: p
                .temp_bitmap
                .as_ref()
                .map(|b| format!("qemu:dirty-bitmap:{b}")),
            incremental_from: p.temp_bitmap.as_ref().and(request.incremental.clone()),
            fell_back_to_full: p.fell_back,
        });
    }
    Ok(PullExport {
        socket,
        disks: exported,
        quiesce,
    })
}

fn policy_group(policy: &PullPolicy) -> Option<u32> {
    policy.socket_group
}

/// Checks that every export of `operation` still serves its point-in-time
/// view: reads the first sector of each through the export socket (a
/// copy-before-write that failed, because the scratch filled up or a copy
/// timed out, makes every read of the view fail). `disks` are the exported
/// disk names.
pub async fn check_pull_export(
    policy: &PullPolicy,
    vm: &VmRef,
    request_socket: Option<&Path>,
    backup: &str,
    disks: &[String],
) -> Result<(), BackupError> {
    let (sock_dir, sock_name) = policy.socket_location(&vm.namespace, request_socket, backup)?;
    let socket = sock_dir.proc_path().join(&sock_name);
    for disk in disks {
        let url = format!("nbd+unix:///{disk}?socket={}", socket.display());
        let out = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::process::Command::new("qemu-io")
                .args(["-r", "-f", "raw", "-c", "read 0 512", &url])
                .kill_on_drop(true)
                .output(),
        )
        .await;
        let failed = match &out {
            Ok(Ok(o)) => {
                let text = String::from_utf8_lossy(&o.stdout).to_string()
                    + &String::from_utf8_lossy(&o.stderr);
                (!o.status.success() || text.contains("failed")).then_some(text)
            }
            Ok(Err(e)) => {
                warn!(error = %e, "cannot run qemu-io to check the export; assuming it is fine");
                None
            }
            Err(_) => Some("reading the export timed out".to_string()),
        };
        if let Some(text) = failed {
            let scratch = policy.scratch(&vm.namespace)?;
            let free = scratch.available_bytes().unwrap_or(0);
            return Err(if free < (4 << 20) {
                BackupError::ScratchFull {
                    vm: vm.to_string(),
                    disk: disk.clone(),
                    path: scratch.path().to_path_buf(),
                }
            } else {
                BackupError::ExportBroken {
                    vm: vm.to_string(),
                    disk: disk.clone(),
                    detail: text
                        .trim()
                        .lines()
                        .last()
                        .unwrap_or("read failed")
                        .to_string(),
                }
            });
        }
    }
    Ok(())
}

/// Tears a pull export down: exports, NBD server, filters (devices go back
/// to their disks), scratch nodes, temporary bitmaps, scratch files and the
/// socket. Idempotent.
pub async fn stop_pull_export(
    client: &QmpClient,
    operation: &OperationId,
    policy: &PullPolicy,
    vm: &VmRef,
    request_socket: Option<&Path>,
    backup: &str,
) -> Result<(), BackupError> {
    cleanup_leftovers(client, operation, None)
        .await
        .map_err(qmp_err(&vm.to_string(), "teardown"))?;
    remove_local_files(operation, policy, vm, request_socket, backup);
    Ok(())
}

/// The file side of [`stop_pull_export`], for when QEMU is gone: scratch
/// files of `operation` and the export socket.
pub fn remove_local_files(
    operation: &OperationId,
    policy: &PullPolicy,
    vm: &VmRef,
    request_socket: Option<&Path>,
    backup: &str,
) {
    if let Ok(scratch) = policy.scratch(&vm.namespace) {
        remove_scratch_files(&scratch, operation);
    }
    if let Ok((dir, name)) = policy.socket_location(&vm.namespace, request_socket, backup) {
        let live = std::os::unix::net::UnixStream::connect(dir.proc_path().join(&name)).is_ok();
        if !live {
            remove_socket(&dir, &name);
        }
    }
}
