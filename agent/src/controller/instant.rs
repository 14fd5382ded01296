//! Instant recovery: a repository snapshot served as a read-only NBD export
//! straight from the repository, for a VM that starts at once on a local
//! qcow2 overlay backed by it while QEMU's `block-stream` pulls the data in.
//!
//! One export per disk (named after the disk) on the unix socket
//! `<export dir>/<namespace>/<restore>.sock`, bound by the agent (mode 0660,
//! the export group) like pull-backup sockets. Chunks are fetched on demand,
//! verified, and kept in a bounded cache; zero chunks are announced as holes.
//!
//! When the VM no longer needs the export: every client has disconnected,
//! no VM of the namespace on this node still names the socket in its block
//! graph, and either a client process that disconnected is still running
//! (QEMU dropped the backing file while running: its `block-stream`
//! completed and the overlay holds everything; the process is known from the
//! socket's peer credentials) or every 64 KiB granule of the snapshot's data
//! has been read whole at least once (a client copied it all). A VM that
//! merely stopped keeps the export served: its overlay still needs it. Then
//! the export is torn down and the restore Succeeds. A read the repository cannot answer fails that one
//! request with EIO (the guest sees an I/O error for a region never fetched;
//! fetched regions live in the overlay) and the `Degraded` condition says so.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use cairn_api::{
    BackupProgress, ResolvedRestoreSource, RestoreDiskStatus, RestoreExport, RestorePhase,
    VirtualMachineRestore, VirtualMachineRestoreStatus,
};
use cairn_nbd::server::BlockSource;
use cairn_nbd::{Extent, Server};
use cairn_repo::DiskReader;
use kube::{Api, ResourceExt};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Context;
use super::restores::{Failure, open_repository_snapshot, select_disks};
use super::status::{agent_conditions, apply_status, cond, error_chain, now};
use crate::backup::pull::{claim_socket_name, remove_socket};

/// Granule of the "read at least once" bookkeeping.
const GRANULE: u64 = 64 * 1024;
/// Chunks each disk's cache holds (256 KiB chunks: 64 MiB).
const CACHE_CHUNKS: usize = 256;

/// One disk of a snapshot as an NBD block source, recording what was read.
pub struct SnapshotSource {
    reader: DiskReader,
    /// One bit per granule: read whole at least once.
    read: Vec<AtomicU64>,
    /// Granules holding data (not zero chunks): what must be read.
    data_granules: u64,
    /// Data granules read so far.
    granules_read: AtomicU64,
    /// Reads the repository could not answer.
    failures: AtomicU64,
    last_error: std::sync::Mutex<Option<String>>,
}

impl SnapshotSource {
    /// Wraps `reader`.
    pub fn new(reader: DiskReader) -> Self {
        let size = reader.size();
        let granules = size.div_ceil(GRANULE);
        let cs = u64::from(reader.index().chunk_size);
        // The last chunk may be short: count the granules of each data chunk.
        let data_granules = reader
            .index()
            .chunks
            .iter()
            .enumerate()
            .filter(|(_, c)| !c.is_zero())
            .map(|(i, _)| {
                let start = i as u64 * cs;
                let end = (start + cs).min(size);
                end.div_ceil(GRANULE) - start / GRANULE
            })
            .sum::<u64>()
            .min(granules);
        Self {
            read: (0..granules.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            data_granules,
            granules_read: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            last_error: std::sync::Mutex::new(None),
            reader,
        }
    }

    fn is_data_granule(&self, g: u64) -> bool {
        let cs = u64::from(self.reader.index().chunk_size);
        let chunk = (g * GRANULE / cs) as usize;
        self.reader
            .index()
            .chunks
            .get(chunk)
            .is_some_and(|c| !c.is_zero())
    }

    fn mark(&self, offset: u64, length: u64) {
        let size = self.reader.size();
        let first = offset.div_ceil(GRANULE);
        let end = (offset + length).min(size);
        // A granule counts when the read covered it whole (the disk's tail granule may be short).
        let last = if end == size {
            size.div_ceil(GRANULE)
        } else {
            end / GRANULE
        };
        for g in first..last {
            let bit = 1u64 << (g % 64);
            let old = self.read[(g / 64) as usize].fetch_or(bit, Ordering::Relaxed);
            if old & bit == 0 && self.is_data_granule(g) {
                self.granules_read.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Bytes of data read at least once, and the bytes of data there are.
    pub fn served(&self) -> (u64, u64) {
        let read = self.granules_read.load(Ordering::Relaxed);
        (
            (read * GRANULE).min(self.reader.size()),
            (self.data_granules * GRANULE).min(self.reader.size()),
        )
    }

    /// Whether every data granule was read.
    pub fn complete(&self) -> bool {
        self.granules_read.load(Ordering::Relaxed) >= self.data_granules
    }
}

impl BlockSource for SnapshotSource {
    fn size(&self) -> u64 {
        self.reader.size()
    }

    async fn read_at(&self, offset: u64, length: usize) -> std::io::Result<Bytes> {
        match self.reader.read_at(offset, length).await {
            Ok(data) => {
                self.mark(offset, length as u64);
                Ok(Bytes::from(data))
            }
            Err(e) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                let text = error_chain(&e);
                warn!(error = %text, offset, length, "instant restore read failed");
                *self.last_error.lock().expect("error lock") = Some(text.clone());
                Err(std::io::Error::other(text))
            }
        }
    }

    async fn extents(&self, offset: u64, length: u64) -> std::io::Result<Vec<Extent>> {
        let cs = u64::from(self.reader.index().chunk_size);
        let size = self.reader.size();
        let end = (offset + length).min(size);
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let i = (pos / cs) as usize;
            let chunk_end = ((i as u64 + 1) * cs).min(end);
            let zero = self
                .reader
                .index()
                .chunks
                .get(i)
                .is_none_or(|c| c.is_zero());
            let flags = if zero {
                cairn_nbd::proto::state::HOLE | cairn_nbd::proto::state::ZERO
            } else {
                0
            };
            match out.last_mut() {
                Some(last) if last.flags == flags => last.length += chunk_end - pos,
                _ => out.push(Extent {
                    offset: pos,
                    length: chunk_end - pos,
                    flags,
                }),
            }
            pos = chunk_end;
            if out.len() >= 1024 {
                break;
            }
        }
        Ok(out)
    }
}

/// VMs of namespace `ns` on this node whose block graph names `socket`.
async fn vms_using(ctx: &Context, ns: &str, socket: &str) -> Vec<String> {
    let mut out = Vec::new();
    for vm in ctx
        .discovery
        .vms()
        .into_iter()
        .filter(|v| v.namespace == ns)
    {
        let Ok((_, client)) = ctx.discovery.session(&vm.namespace, &vm.name) else {
            continue;
        };
        if let Ok(nodes) = client
            .execute_raw(
                "query-named-block-nodes",
                Some(serde_json::json!({"flat": true})),
            )
            .await
            && nodes.to_string().contains(socket)
        {
            out.push(vm.name);
        }
    }
    out
}

/// Whether process `pid` is running (not gone, not a zombie).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // `pid (comm) S …`: the state follows the last ')'.
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X')
    })
}

/// Removes the export socket of restore `r` (its task was stopped already).
pub async fn stop(ctx: &Context, r: &VirtualMachineRestore) {
    let ns = r.namespace().unwrap_or_default();
    if let Ok((dir, sock)) = ctx.pull.socket_location(&ns, None, &r.name_any()) {
        remove_socket(&dir, &sock);
    }
}

/// Serves the snapshot until the VM no longer needs it (then Succeeded) or
/// the task is stopped (deletion). Writes status itself.
pub async fn serve(
    ctx: &Arc<Context>,
    r: &VirtualMachineRestore,
    source: &ResolvedRestoreSource,
    status: &mut VirtualMachineRestoreStatus,
) -> Result<(), Failure> {
    let ns = r.namespace().unwrap_or_default();
    let name = r.name_any();
    let generation = r.metadata.generation;
    let api: Api<VirtualMachineRestore> = Api::namespaced(ctx.client.clone(), &ns);
    let (repo, snapshot, manifest) = open_repository_snapshot(ctx, &ns, source).await?;
    let known: Vec<String> = manifest.disks.iter().map(|d| d.name.clone()).collect();
    let disks = select_disks(r, &known)?;
    let mut server = Server::new();
    let mut sources = Vec::new();
    for d in &disks {
        let reader = DiskReader::open(&repo, &snapshot, d, CACHE_CHUNKS)
            .await
            .map_err(|e| Failure::new(super::status::repository_reason(&e), error_chain(&e)))?;
        let src = Arc::new(SnapshotSource::new(reader));
        server = server.with_export(
            d.clone(),
            format!("disk {d} of snapshot {snapshot}"),
            src.clone(),
        );
        sources.push((d.clone(), src));
    }
    let (dir, sock) = ctx
        .pull
        .socket_location(&ns, None, &name)
        .map_err(|e| Failure::new(super::status::backup_reason(&e), error_chain(&e)))?;
    claim_socket_name(&dir, &sock)
        .map_err(|e| Failure::new(super::status::backup_reason(&e), error_chain(&e)))?;
    let std_listener = std::os::unix::net::UnixListener::bind(dir.proc_path().join(&sock))
        .map_err(|e| {
            Failure::new(
                "TargetError",
                format!("binding {}: {e}", dir.display_path(&sock).display()),
            )
        })?;
    let cleanup = |dir: &crate::tenant_dir::TenantDir| remove_socket(dir, &sock);
    if let Err(e) = dir.set_mode(&sock, 0o660, ctx.pull.socket_group) {
        cleanup(&dir);
        return Err(Failure::new("TargetError", error_chain(&e)));
    }
    std_listener.set_nonblocking(true).ok();
    let listener = match tokio::net::UnixListener::from_std(std_listener) {
        Ok(l) => l,
        Err(e) => {
            cleanup(&dir);
            return Err(Failure::new("TargetError", e.to_string()));
        }
    };
    let socket = dir.display_path(&sock);
    let url = match disks.as_slice() {
        [one] => format!("nbd+unix:///{one}?socket={}", socket.display()),
        _ => format!("nbd+unix:///?socket={}", socket.display()),
    };
    let total: u64 = sources.iter().map(|(_, s)| s.served().1).sum();
    let disk_status = |sources: &[(String, Arc<SnapshotSource>)]| {
        sources
            .iter()
            .map(|(d, s)| RestoreDiskStatus {
                name: d.clone(),
                size: Some(i64::try_from(s.size()).unwrap_or(i64::MAX)),
                export_name: Some(d.clone()),
                bytes_served: Some(i64::try_from(s.served().0).unwrap_or(i64::MAX)),
                ..Default::default()
            })
            .collect::<Vec<_>>()
    };
    let progress = |sources: &[(String, Arc<SnapshotSource>)]| BackupProgress {
        bytes_done: i64::try_from(sources.iter().map(|(_, s)| s.served().0).sum::<u64>())
            .unwrap_or(i64::MAX),
        bytes_total: i64::try_from(total).unwrap_or(i64::MAX),
    };
    status.phase = Some(RestorePhase::Serving);
    status.export = Some(RestoreExport {
        url: url.clone(),
        released: false,
    });
    status.disks = disk_status(&sources);
    status.progress = Some(progress(&sources));
    status.conditions = agent_conditions(
        &status.conditions,
        &[cond(
            "Ready",
            true,
            "Serving",
            format!(
                "snapshot {snapshot} is served at {url}; start the VM on an overlay backed by it and block-stream"
            ),
        )],
        generation,
    );
    if let Err(e) = apply_status(&api, &name, &*status).await {
        cleanup(&dir);
        return Err(Failure::new("StatusWriteFailed", e.to_string()));
    }
    info!(restore = %name, namespace = %ns, %url, "instant restore serving");

    let shutdown = CancellationToken::new();
    let connected = Arc::new(AtomicUsize::new(0));
    let ever_connected = Arc::new(AtomicBool::new(false));
    let mut connections = JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut reported = (status.progress.clone(), 0u64);
    let socket_text = socket.display().to_string();
    // Processes of clients that disconnected.
    let departed: Arc<std::sync::Mutex<Vec<i32>>> = Arc::default();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let pid = stream.peer_cred().ok().and_then(|c| c.pid());
                    let (rd, wr) = stream.into_split();
                    let (server, token) = (server.clone(), shutdown.child_token());
                    let (connected, ever) = (connected.clone(), ever_connected.clone());
                    let departed = departed.clone();
                    connected.fetch_add(1, Ordering::SeqCst);
                    ever.store(true, Ordering::SeqCst);
                    connections.spawn(async move {
                        server.serve_connection(rd, wr, token).await;
                        if let Some(pid) = pid {
                            departed.lock().expect("departed lock").push(pid);
                        }
                        connected.fetch_sub(1, Ordering::SeqCst);
                    });
                }
                Err(e) => warn!(error = %e, "accepting an NBD client failed"),
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = tick.tick() => {
                let failures: u64 = sources.iter().map(|(_, s)| s.failures.load(Ordering::Relaxed)).sum();
                let now_progress = Some(progress(&sources));
                let idle = ever_connected.load(Ordering::SeqCst) && connected.load(Ordering::SeqCst) == 0;
                let dropped_while_running = departed.lock().expect("departed lock").iter().any(|p| alive(*p));
                let released = idle
                    && (dropped_while_running || sources.iter().all(|(_, s)| s.complete()))
                    && vms_using(ctx, &ns, &socket_text).await.is_empty();
                if now_progress != reported.0 || failures != reported.1 || released {
                    status.progress = now_progress.clone();
                    status.disks = disk_status(&sources);
                    let mut updates = Vec::new();
                    if failures > 0 {
                        let last = sources.iter().find_map(|(_, s)| s.last_error.lock().ok().and_then(|e| e.clone())).unwrap_or_default();
                        updates.push(cond("Degraded", true, "RepositoryReadFailed", format!("{failures} read(s) of never-fetched regions failed with an I/O error for the VM; last: {last}")));
                    } else if reported.1 > 0 {
                        updates.push(cond("Degraded", false, "Healthy", "reads succeed again"));
                    }
                    if released {
                        status.phase = Some(RestorePhase::Succeeded);
                        status.completion_time = Some(now());
                        status.export = Some(RestoreExport { url: url.clone(), released: true });
                        updates.push(cond("Ready", true, "Released", "every data region was read and the clients disconnected: the VM's overlay no longer needs the export, which is torn down"));
                    }
                    status.conditions = agent_conditions(&status.conditions, &updates, generation);
                    let _ = apply_status(&api, &name, &*status).await;
                    reported = (now_progress, failures);
                }
                if released {
                    break;
                }
            }
        }
    }
    shutdown.cancel();
    drop(listener);
    while connections.join_next().await.is_some() {}
    cleanup(&dir);
    info!(restore = %name, namespace = %ns, "instant restore released; export torn down");
    Ok(())
}
