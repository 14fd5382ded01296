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
    /// Exports over TCP with TLS.
    pub tcp: TcpExportPolicy,
}

/// Where TCP exports listen on this node and where their keys are kept.
#[derive(Debug, Clone, Default)]
pub struct TcpExportPolicy {
    /// The node's export address; `None` disables TCP exports.
    pub address: Option<String>,
    /// Ports exports may use, first and last (inclusive).
    pub ports: (u16, u16),
    /// Private directory of the agent (mode 0700) for each export's
    /// `keys.psk`; never a tenant's directory.
    pub key_dir: PathBuf,
}

impl TcpExportPolicy {
    /// The private directory holding `keys.psk` of `op`'s export.
    pub fn key_dir_of(&self, op: &OperationId) -> PathBuf {
        self.key_dir.join(format!("{}tls", op.prefix()))
    }
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
    /// Serve over TCP with TLS-PSK instead of the unix socket.
    pub tcp: Option<TcpExportRequest>,
}

/// A pull export over TCP, protected by TLS with a pre-shared key.
#[derive(Debug, Clone)]
pub struct TcpExportRequest {
    /// Port asked for; `None` = the first free port of the node's range.
    pub port: Option<i32>,
    /// The credentials clients must present.
    pub psk: PskCredentials,
}

/// TLS-PSK credentials: a user name and its key (hex). `Debug` hides the key.
#[derive(Clone, PartialEq, Eq)]
pub struct PskCredentials {
    /// User name (no `:` or line breaks).
    pub username: String,
    /// The key, hex-encoded.
    pub key_hex: String,
}

impl std::fmt::Debug for PskCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PskCredentials")
            .field("username", &self.username)
            .field("key_hex", &"<redacted>")
            .finish()
    }
}

impl PskCredentials {
    /// The `keys.psk` line QEMU and GnuTLS read: `username:hexkey`.
    pub fn keys_file(&self) -> Result<String, BackupError> {
        let bad = |detail: &str| BackupError::TlsKey {
            detail: detail.to_string(),
        };
        if self.username.is_empty()
            || self
                .username
                .chars()
                .any(|c| c == ':' || c.is_control() || c.is_whitespace())
        {
            return Err(bad(
                "the user name is empty or holds ':', blanks or control characters",
            ));
        }
        if self.key_hex.len() < 32
            || !self.key_hex.len().is_multiple_of(2)
            || !self.key_hex.chars().all(|c| c.is_ascii_hexdigit())
        {
            return Err(bad("the key is not hex of at least 16 bytes"));
        }
        Ok(format!("{}:{}\n", self.username, self.key_hex))
    }
}

/// Where a TCP export listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpEndpoint {
    /// The node's export address.
    pub address: String,
    /// The port.
    pub port: u16,
}

impl TcpEndpoint {
    /// `nbds://<address>:<port>` (IPv6 addresses in brackets).
    pub fn url(&self) -> String {
        if self.address.contains(':') {
            format!("nbds://[{}]:{}", self.address, self.port)
        } else {
            format!("nbds://{}:{}", self.address, self.port)
        }
    }
}

/// One exported disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedDisk {
    /// Disk name.
    pub disk: String,
    /// NBD export name.
    pub export_name: String,
    /// `nbd+unix:///<export>?socket=<path>` or `nbds://<address>:<port>/<export>`.
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
    /// NBD socket (its real path, for clients); empty for a TCP export.
    pub socket: PathBuf,
    /// Where a TCP export listens.
    pub tcp: Option<TcpEndpoint>,
    /// Exported disks.
    pub disks: Vec<ExportedDisk>,
    /// How the guest was frozen for the export point (`quiesce`).
    pub quiesce: Option<crate::qga::QuiesceReport>,
}

impl PullExport {
    /// The server's NBD URL: `nbd+unix:///?socket=<path>` or `nbds://<address>:<port>`.
    pub fn url(&self) -> String {
        match &self.tcp {
            Some(t) => t.url(),
            None => format!("nbd+unix:///?socket={}", self.socket.display()),
        }
    }

    /// Where clients connect, for messages: the socket path or `address:port`.
    pub fn location(&self) -> String {
        match &self.tcp {
            Some(t) => format!("{}:{} (TLS)", t.address, t.port),
            None => self.socket.display().to_string(),
        }
    }
}

/// How the export listens, prepared before QEMU is touched.
enum Listen {
    /// A unix socket the agent binds inside the namespace's export directory.
    Unix { dir: TenantDir, name: String },
    /// A TCP port QEMU binds on the node's export address (in QEMU's network
    /// namespace: the agent's may differ), and the private directory with the
    /// export's `keys.psk`.
    Tcp {
        address: String,
        ports: Vec<u16>,
        explicit: bool,
        key_dir: PathBuf,
    },
}

/// The ports a TCP export may try, in order: the one asked for (which must
/// lie in the node's range) or the whole range.
fn candidate_ports(
    policy: &TcpExportPolicy,
    port: Option<i32>,
) -> Result<(String, Vec<u16>), BackupError> {
    let Some(address) = policy.address.clone() else {
        return Err(BackupError::TcpExportsDisabled {
            detail: "no export address is configured".into(),
        });
    };
    if address.parse::<std::net::IpAddr>().is_err() {
        return Err(BackupError::TcpExportsDisabled {
            detail: format!("the export address {address:?} is not an IP address"),
        });
    }
    let (first, last) = policy.ports;
    if first == 0 || first > last {
        return Err(BackupError::TcpExportsDisabled {
            detail: format!("the export port range {first}-{last} is empty"),
        });
    }
    match port {
        Some(p) => match u16::try_from(p).ok().filter(|p| (first..=last).contains(p)) {
            Some(p) => Ok((address, vec![p])),
            None => Err(BackupError::ExportPortOutsideRange {
                port: p.into(),
                first,
                last,
            }),
        },
        None => Ok((address, (first..=last).collect())),
    }
}

/// Whether QEMU's `nbd-server-start` failed because the port is taken.
fn port_taken(e: &QmpError) -> bool {
    matches!(e, QmpError::Command { desc, .. }
        if desc.contains("in use") || desc.contains("available port"))
}

/// Writes `<key dir>/keys.psk` (mode 0600) into a fresh private directory
/// (mode 0700), for QEMU's `tls-creds-psk`.
fn write_key_dir(dir: &Path, psk: &PskCredentials) -> Result<(), BackupError> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let line = psk.keys_file()?;
    let io = |what: &str, e: std::io::Error| BackupError::TlsKey {
        detail: format!("{what} {}: {e}", dir.display()),
    };
    if let Some(parent) = dir.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(|e| io("creating the parent of", e))?;
    }
    remove_key_dir(dir);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(|e| io("creating", e))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(dir.join("keys.psk"))
        .map_err(|e| io("writing keys.psk in", e))?;
    f.write_all(line.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| io("writing keys.psk in", e))?;
    Ok(())
}

/// Removes an export's key directory (idempotent).
fn remove_key_dir(dir: &Path) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            warn!(dir = %dir.display(), error = %e, "cannot remove the export's key directory")
        }
    }
}

/// The TLS user name recorded in an export's `keys.psk`.
fn key_dir_username(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("keys.psk")).ok()?;
    text.split(':').next().map(str::to_string)
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
    let unix = match &request.tcp {
        None => {
            Some(policy.socket_location(&vm.namespace, request.socket.as_deref(), &request.name)?)
        }
        Some(t) => {
            // Refuse a bad port or user name before QEMU is touched.
            t.psk.keys_file()?;
            if policy.tcp.address.is_none() {
                return Err(BackupError::TcpExportsDisabled {
                    detail: "no export address is configured".into(),
                });
            }
            None
        }
    };
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
    let key_dir = policy.tcp.key_dir_of(op);
    remove_key_dir(&key_dir);
    let listen = match (unix, &request.tcp) {
        (Some((dir, name)), _) => {
            claim_socket_name(&dir, &name)?;
            Listen::Unix { dir, name }
        }
        (None, Some(t)) => {
            let (address, ports) = candidate_ports(&policy.tcp, t.port)?;
            write_key_dir(&key_dir, &t.psk)?;
            Listen::Tcp {
                address,
                ports,
                explicit: t.port.is_some(),
                key_dir: key_dir.clone(),
            }
        }
        (None, None) => unreachable!("a request without tcp has a socket location"),
    };
    let socket_of = match &listen {
        Listen::Unix { dir, name } => Some((dir.try_clone()?, name.clone())),
        Listen::Tcp { .. } => None,
    };
    let mut held = Vec::new();
    let result = setup(
        client, &vm_name, policy, request, &disks, steps, &scratch, &mut held, listen,
    )
    .await;
    match result {
        Ok(export) => {
            info!(vm = %vm, at = %export.location(), disks = export.disks.len(), "pull export started");
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
            if let Some((dir, name)) = socket_of {
                remove_socket(&dir, &name);
            }
            remove_key_dir(&key_dir);
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
    listen: Listen,
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

    let (socket, tcp) = match listen {
        Listen::Unix { dir, name } => {
            // The agent binds the socket inside the directory it holds open, sets its
            // mode and group, and hands QEMU the listening descriptor (getfd): QEMU
            // never resolves or unlinks a path.
            let listener = std::os::unix::net::UnixListener::bind(dir.proc_path().join(&name))
                .map_err(|source| {
                    (
                        BackupError::TargetIo {
                            path: dir.display_path(&name),
                            source,
                        },
                        created,
                    )
                })?;
            dir.set_mode(&name, 0o660, policy_group(policy))
                .map_err(|e| (BackupError::from(e), created))?;
            let fd_name = format!("{}nbd", op.prefix());
            client
                .getfd(&fd_name, std::os::fd::OwnedFd::from(listener))
                .await
                .map_err(|e| (qmp_err(vm, "getfd")(e), created))?;
            if let Err(e) = client.nbd_server_start_fd(&fd_name).await {
                let _ = client.closefd(&fd_name).await;
                return Err(server_start_error(vm, e, created));
            }
            (dir.display_path(&name), None)
        }
        Listen::Tcp {
            address,
            ports,
            explicit,
            key_dir,
        } => {
            // QEMU binds the port itself: its network namespace is the one
            // clients reach the node in (the agent's pod may have its own).
            // The `tls-creds-psk` object reads the private `keys.psk`; the
            // server refuses clients that do not complete the TLS handshake.
            let creds = format!("{}tls", op.prefix());
            client
                .add_tls_creds_psk(&creds, &key_dir.display().to_string())
                .await
                .map_err(|e| (qmp_err(vm, "object-add tls-creds-psk")(e), created))?;
            let mut bound = None;
            for port in &ports {
                match client
                    .nbd_server_start_tcp_tls(&address, *port, &creds)
                    .await
                {
                    Ok(()) => {
                        bound = Some(*port);
                        break;
                    }
                    Err(e) if port_taken(&e) && explicit => {
                        return Err((
                            BackupError::ExportPortInUse {
                                address,
                                port: *port,
                            },
                            created,
                        ));
                    }
                    Err(e) if port_taken(&e) => continue,
                    Err(e) => return Err(server_start_error(vm, e, created)),
                }
            }
            let Some(port) = bound else {
                let (first, last) = policy.tcp.ports;
                return Err((
                    BackupError::NoFreeExportPort {
                        address,
                        first,
                        last,
                    },
                    created,
                ));
            };
            (PathBuf::new(), Some(TcpEndpoint { address, port }))
        }
    };
    let mut exported = Vec::new();
    for p in disks {
        let bitmaps: Vec<(String, String)> = p
            .temp_bitmap
            .iter()
            .map(|b| (p.disk.node_name.clone(), b.clone()))
            .collect();
        if let Err(e) = client
            .nbd_export_add(
                &op.export_id(&p.disk.name),
                &p.access_node,
                &p.disk.name,
                &bitmaps,
            )
            .await
        {
            // The server is ours (it started above); with no export of ours
            // on it yet, cleanup_leftovers would not know to stop it.
            if exported.is_empty() {
                let _ = client.nbd_server_stop().await;
            }
            return Err((qmp_err(vm, "block-export-add")(e), created));
        }
        exported.push(ExportedDisk {
            disk: p.disk.name.clone(),
            export_name: p.disk.name.clone(),
            url: match &tcp {
                Some(t) => format!("{}/{}", t.url(), p.disk.name),
                None => format!("nbd+unix:///{}?socket={}", p.disk.name, socket.display()),
            },
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
        tcp,
        disks: exported,
        quiesce,
    })
}

fn server_start_error(vm: &str, e: QmpError, created: bool) -> (BackupError, bool) {
    match e {
        QmpError::Command { ref desc, .. } if desc.contains("already running") => {
            (BackupError::NbdServerBusy { vm: vm.to_string() }, created)
        }
        e => (qmp_err(vm, "nbd-server-start")(e), created),
    }
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
    check_reads(policy, vm, disks, |disk| {
        vec![
            "-r".into(),
            "-f".into(),
            "raw".into(),
            "-c".into(),
            "read 0 512".into(),
            format!("nbd+unix:///{disk}?socket={}", socket.display()),
        ]
    })
    .await
}

/// [`check_pull_export`] for a TCP export of `operation` on `port`: reads
/// through TLS with the export's own key.
pub async fn check_tcp_pull_export(
    policy: &PullPolicy,
    vm: &VmRef,
    operation: &OperationId,
    port: u16,
    disks: &[String],
) -> Result<(), BackupError> {
    let key_dir = policy.tcp.key_dir_of(operation);
    let Some(username) = key_dir_username(&key_dir) else {
        return Err(BackupError::TlsKey {
            detail: format!("{} has no keys.psk", key_dir.display()),
        });
    };
    let host = policy.tcp.address.clone().unwrap_or_default();
    let object = format!(
        "tls-creds-psk,id=tls0,endpoint=client,dir={},username={username}",
        key_dir.display()
    );
    check_reads(policy, vm, disks, |disk| {
        vec![
            "--object".into(),
            object.clone(),
            "-r".into(),
            "-c".into(),
            "read 0 512".into(),
            "--image-opts".into(),
            format!("driver=nbd,host={host},port={port},export={disk},tls-creds=tls0"),
        ]
    })
    .await
}

/// Reads the first sector of each disk with `qemu-io <args_of(disk)>`.
async fn check_reads(
    policy: &PullPolicy,
    vm: &VmRef,
    disks: &[String],
    args_of: impl Fn(&str) -> Vec<String>,
) -> Result<(), BackupError> {
    for disk in disks {
        let out = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::process::Command::new("qemu-io")
                .args(args_of(disk))
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
/// files of `operation`, its TLS key directory and the export socket.
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
    remove_key_dir(&policy.tcp.key_dir_of(operation));
    if let Ok((dir, name)) = policy.socket_location(&vm.namespace, request_socket, backup) {
        let live = std::os::unix::net::UnixStream::connect(dir.proc_path().join(&name)).is_ok();
        if !live {
            remove_socket(&dir, &name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn psk(username: &str, key_hex: &str) -> PskCredentials {
        PskCredentials {
            username: username.into(),
            key_hex: key_hex.into(),
        }
    }

    #[test]
    fn keys_file_is_one_line_and_refuses_what_would_break_it() {
        let key = "0f".repeat(32);
        assert_eq!(psk("b1", &key).keys_file().unwrap(), format!("b1:{key}\n"));
        for (u, k) in [
            ("", key.as_str()),
            ("a:b", key.as_str()),
            ("a\nb", key.as_str()),
            ("a b", key.as_str()),
            ("b1", "abc"),
            ("b1", "zz"),
            ("b1", &key[..30]),
        ] {
            assert!(psk(u, k).keys_file().is_err(), "{u:?} {k:?}");
        }
        assert!(
            !format!("{:?}", psk("b1", &key)).contains(&key),
            "Debug shows the key"
        );
    }

    fn policy(address: Option<&str>, ports: (u16, u16)) -> TcpExportPolicy {
        TcpExportPolicy {
            address: address.map(str::to_string),
            ports,
            key_dir: PathBuf::from("/nonexistent"),
        }
    }

    #[test]
    fn ports_come_from_the_nodes_range_only() {
        let p = policy(Some("127.0.0.1"), (10809, 10811));
        assert_eq!(
            candidate_ports(&p, None).unwrap(),
            ("127.0.0.1".to_string(), vec![10809, 10810, 10811])
        );
        assert_eq!(candidate_ports(&p, Some(10810)).unwrap().1, vec![10810]);
        for port in [10808, 10812, 0, -1, 70000] {
            assert!(
                matches!(
                    candidate_ports(&p, Some(port)),
                    Err(BackupError::ExportPortOutsideRange { .. })
                ),
                "{port}"
            );
        }
        assert!(matches!(
            candidate_ports(&policy(None, (1, 2)), None),
            Err(BackupError::TcpExportsDisabled { .. })
        ));
        assert!(matches!(
            candidate_ports(&policy(Some("node-1.example"), (1, 2)), None),
            Err(BackupError::TcpExportsDisabled { .. })
        ));
        assert!(matches!(
            candidate_ports(&policy(Some("::1"), (5, 4)), None),
            Err(BackupError::TcpExportsDisabled { .. })
        ));
    }

    #[test]
    fn tcp_urls_bracket_ipv6() {
        let t = |a: &str| TcpEndpoint {
            address: a.into(),
            port: 10809,
        };
        assert_eq!(t("10.0.0.1").url(), "nbds://10.0.0.1:10809");
        assert_eq!(t("fd00::1").url(), "nbds://[fd00::1]:10809");
    }

    #[test]
    fn key_dir_is_private_and_removed() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("nbd-tls").join("cairn-x-tls");
        write_key_dir(&dir, &psk("b1", &"ab".repeat(16))).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("keys.psk")), 0o600);
        assert_eq!(key_dir_username(&dir).as_deref(), Some("b1"));
        // Written again (a retried start): replaced, not refused.
        write_key_dir(&dir, &psk("b2", &"cd".repeat(16))).unwrap();
        assert_eq!(key_dir_username(&dir).as_deref(), Some("b2"));
        remove_key_dir(&dir);
        assert!(!dir.exists());
        remove_key_dir(&dir);
    }
}
