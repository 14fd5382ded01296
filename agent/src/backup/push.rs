//! Push backups into a directory: one qcow2 per disk, incrementals backed by
//! the previous backup's file.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::broadcast;
use tracing::{debug, info, warn};

use super::manifest::{BackupKind, MANIFEST_VERSION, Manifest, ManifestDisk};
use super::target::{TargetPolicy, qcow2_estimate};
use super::{
    BackupError, FileScope, cleanup_leftovers, qmp_err, validate_backup_name, wait_jobs_settled,
};
use crate::checkpoint::{Domain, bitmap_problem, plan_checkpoint};
use crate::identity::{NodeRole, OperationId};
use crate::image;
use crate::inventory::{
    Disk, VmInventory, VmRef, read_inventory, select_disks, select_incremental_disks,
};
use crate::qmp::{
    BackingChoice, BackupSpec, BackupSync, QmpClient, QmpError, QmpEvent, TransactionStep,
};
use crate::tenant_dir::{TenantDir, check_name};

/// A push backup to run.
#[derive(Debug, Clone)]
pub struct PushRequest {
    /// Names every QEMU-side object and keys the files: its identity is the
    /// backup's UID ([`Manifest::stem`]).
    pub operation: OperationId,
    /// Backup name: with the UID, the stem of the files and manifest in `target_dir`.
    pub name: String,
    /// Disk names; `None` = every writable qcow2 disk.
    pub disks: Option<Vec<String>>,
    /// Base checkpoint; `None` = full.
    pub incremental: Option<String>,
    /// UID of the base checkpoint: the base backup must have recorded the same.
    pub incremental_uid: Option<String>,
    /// Checkpoint to create at the backup point, in the same transaction.
    pub new_checkpoint: Option<String>,
    /// UID of that checkpoint (recorded in the manifest for later base lookups).
    pub new_checkpoint_uid: Option<String>,
    /// Directory inside `<allowed root>/<namespace>/` (created if missing).
    pub target_dir: PathBuf,
    /// Back up a disk fully when its base bitmap is missing or inconsistent.
    pub fallback_to_full: bool,
    /// When no backup in `target_dir` created the base checkpoint, write the
    /// incremental without a backing file instead of failing: for a base whose
    /// point-in-time image Cairn never wrote (a checkpoint made on its own, or
    /// redefined). The manifest records the missing base, and restore refuses
    /// such a chain.
    pub standalone_incremental: bool,
    /// Optional rate limit per disk, bytes per second.
    pub speed_limit: Option<u64>,
    /// Freeze the guest's filesystems through its agent around the transaction.
    pub quiesce: Option<crate::qga::GuestAgent>,
}

/// The plan for one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskPlan {
    /// Disk name.
    pub disk: String,
    /// Source format node.
    pub node: String,
    /// Virtual size.
    pub virtual_size: u64,
    /// Full or incremental.
    pub kind: BackupKind,
    /// Base bitmap of an incremental.
    pub base_bitmap: Option<String>,
    /// Incremental asked for but not possible on this disk.
    pub fell_back_to_full: bool,
    /// Target file name (in the target directory).
    pub file: String,
    /// Backing chain below the target, newest first (file names).
    pub backing_chain: Vec<String>,
    /// Bytes the target may need.
    pub estimate: u64,
    /// Job id.
    pub job_id: String,
    /// Target node name.
    pub target_node: String,
    /// The checkpoint whose image the chain's oldest file would back onto,
    /// when that image is not in the target (see [`PushRequest::standalone_incremental`]).
    pub missing_base: Option<String>,
}

impl PushRequest {
    /// The file stem of this backup: name and UID ([`Manifest::stem`]).
    pub fn stem(&self) -> String {
        Manifest::stem(&self.name, self.operation.identity())
    }
}

/// Decides, per disk, full or incremental and the backing file: pure.
/// `base` is the manifest of the backup that created the base checkpoint.
pub fn plan_push(
    inventory: &VmInventory,
    request: &PushRequest,
    base: Option<&Manifest>,
) -> Result<Vec<DiskPlan>, BackupError> {
    let vm = inventory.vm.to_string();
    let disks = match &request.incremental {
        Some(base) => {
            select_incremental_disks(&vm, &inventory.disks, request.disks.as_deref(), base)?
        }
        None => select_disks(&vm, &inventory.disks, request.disks.as_deref())?,
    };
    disks
        .iter()
        .map(|d| plan_disk(&vm, d, request, base))
        .collect()
}

fn plan_disk(
    vm: &str,
    d: &Disk,
    request: &PushRequest,
    base: Option<&Manifest>,
) -> Result<DiskPlan, BackupError> {
    let op = &request.operation;
    check_name(&format!("{}.{}.qcow2", request.stem(), d.name))?;
    let mut plan = DiskPlan {
        disk: d.name.clone(),
        node: d.node_name.clone(),
        virtual_size: d.virtual_size,
        kind: BackupKind::Full,
        base_bitmap: None,
        fell_back_to_full: false,
        file: format!("{}.{}.qcow2", request.stem(), d.name),
        backing_chain: Vec::new(),
        estimate: qcow2_estimate(d.virtual_size, d.virtual_size),
        job_id: op.job_id(&d.name),
        target_node: op.node_name(&d.name, NodeRole::Target),
        missing_base: None,
    };
    let Some(cp) = &request.incremental else {
        return Ok(plan);
    };
    let unusable = |reason: String| BackupError::BaseUnusable {
        vm: vm.to_string(),
        disk: d.name.clone(),
        checkpoint: cp.clone(),
        reason,
    };
    let bitmap = d.bitmap(cp);
    let problem = match (bitmap, base.and_then(|m| m.disk(&d.name))) {
        (Some(b), prev) if bitmap_problem(bitmap).is_none() => match prev {
            None if request.standalone_incremental => {
                plan.kind = BackupKind::Incremental;
                plan.base_bitmap = Some(cp.clone());
                plan.missing_base = Some(cp.clone());
                plan.estimate = qcow2_estimate(b.dirty_bytes, d.virtual_size);
                None
            }
            None => Some(format!(
                "no earlier backup in {} created that checkpoint for this disk",
                request.target_dir.display()
            )),
            Some(prev) => {
                plan.kind = BackupKind::Incremental;
                plan.base_bitmap = Some(cp.clone());
                plan.backing_chain = prev.backing_chain.clone();
                plan.missing_base = prev.missing_base.clone();
                plan.estimate = qcow2_estimate(b.dirty_bytes, d.virtual_size);
                None
            }
        },
        _ => bitmap_problem(bitmap).map(|p| p.describe().to_string()),
    };
    match problem {
        None => Ok(plan),
        Some(_) if request.fallback_to_full => {
            plan.fell_back_to_full = true;
            Ok(plan)
        }
        Some(reason) => Err(unusable(reason)),
    }
}

/// Progress of a running backup, summed over its disks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BackupProgress {
    /// Bytes done.
    pub bytes_done: u64,
    /// Bytes to do (estimate).
    pub bytes_total: u64,
}

/// A finished push backup.
#[derive(Debug, Clone)]
pub struct BackupOutcome {
    /// Where the manifest was written.
    pub manifest_path: PathBuf,
    /// The manifest.
    pub manifest: Manifest,
    /// True when an earlier call had already finished this backup.
    pub already_complete: bool,
}

/// A push backup whose jobs run in QEMU. Dropping it leaves the jobs
/// running; [`start_push_backup`] with the same request re-attaches.
#[derive(Debug)]
pub struct RunningBackup {
    client: QmpClient,
    vm: VmRef,
    request: PushRequest,
    dir: TenantDir,
    /// Target files created by this process, held open while QEMU uses them.
    files: Vec<File>,
    plan: Vec<DiskPlan>,
    domain: Domain,
    /// Whether the new checkpoint's bitmaps were created by this operation.
    created_checkpoint: bool,
    finished: Option<BackupOutcome>,
    /// How the guest was frozen for the transaction, when it was.
    quiesce: Option<crate::qga::QuiesceReport>,
}

/// Starts (or re-attaches to, or reports the finished) push backup described by `request`.
///
/// The target is opened inside `<allowed root>/<vm namespace>/`; a manifest
/// with this backup's stem counts as "already complete" only when it records
/// this backup's UID and VM.
pub async fn start_push_backup(
    client: &QmpClient,
    vm: &VmRef,
    policy: &TargetPolicy,
    request: &PushRequest,
) -> Result<RunningBackup, BackupError> {
    validate_backup_name(&request.name)?;
    let vm_name = vm.to_string();
    let dir = policy.resolve_dir(&vm.namespace, &request.target_dir)?;
    let stem = request.stem();
    let manifest_file = Manifest::file_name(&stem);
    if dir.exists(&manifest_file) {
        let manifest = Manifest::load(&dir, &manifest_file)?;
        if manifest.uid != request.operation.identity() || manifest.vm != vm_name {
            return Err(BackupError::ForeignManifest {
                path: dir.display_path(&manifest_file),
                uid: request.operation.identity().to_string(),
                other_uid: manifest.uid,
                other_vm: manifest.vm,
            });
        }
        return Ok(RunningBackup {
            client: client.clone(),
            vm: vm.clone(),
            request: request.clone(),
            finished: Some(BackupOutcome {
                manifest_path: dir.display_path(&manifest_file),
                manifest,
                already_complete: true,
            }),
            dir,
            files: Vec::new(),
            plan: Vec::new(),
            domain: Domain::default(),
            created_checkpoint: false,
            quiesce: None,
        });
    }
    let mut running = RunningBackup {
        client: client.clone(),
        vm: vm.clone(),
        request: request.clone(),
        dir,
        files: Vec::new(),
        plan: Vec::new(),
        domain: Domain::default(),
        created_checkpoint: request.new_checkpoint.is_some(),
        finished: None,
        quiesce: None,
    };
    let dir = &running.dir;

    let inv = read_inventory(client, vm).await?;
    running.domain = Domain::observe(&inv);
    let base = match &request.incremental {
        Some(cp) => {
            Manifest::find_by_checkpoint(dir, &vm_name, cp, request.incremental_uid.as_deref())
        }
        None => None,
    };
    let plan = plan_push(&inv, request, base.as_ref())?;

    // Re-attach when our jobs exist (an earlier agent started them).
    let jobs = client
        .query_jobs()
        .await
        .map_err(qmp_err(&vm_name, "query-jobs"))?;
    if plan.iter().any(|p| jobs.iter().any(|j| j.id == p.job_id)) {
        info!(vm = %vm, backup = %request.name, "re-attaching to running backup jobs");
        running.plan = plan;
        return Ok(running);
    }

    // A fresh start: clear whatever a crashed attempt left.
    cleanup_leftovers(
        client,
        &request.operation,
        Some(FileScope { dir, stem: &stem }),
    )
    .await
    .map_err(qmp_err(&vm_name, "cleanup"))?;

    let mut steps: Vec<TransactionStep> = Vec::new();
    if let Some(cp) = &request.new_checkpoint {
        let selected: Vec<&Disk> = plan.iter().filter_map(|p| inv.disk(&p.disk)).collect();
        steps.extend(plan_checkpoint(&vm_name, &selected, cp)?);
    }

    let needed: u64 = plan.iter().map(|p| p.estimate).sum();
    let available = dir.available_bytes()?;
    if needed > available {
        return Err(BackupError::InsufficientSpace {
            vm: vm_name,
            path: dir.path().to_path_buf(),
            needed,
            available,
        });
    }

    running.plan = plan;
    if let Err(e) = running.launch(steps).await {
        running.abort().await;
        return Err(e);
    }
    info!(vm = %vm, backup = %request.name, disks = running.plan.len(), "push backup started");
    Ok(running)
}

/// Starts a push backup and waits for it.
pub async fn run_push_backup(
    client: &QmpClient,
    vm: &VmRef,
    policy: &TargetPolicy,
    request: &PushRequest,
) -> Result<BackupOutcome, BackupError> {
    start_push_backup(client, vm, policy, request)
        .await?
        .wait()
        .await
}

impl RunningBackup {
    /// The per-disk plan.
    pub fn plan(&self) -> &[DiskPlan] {
        &self.plan
    }

    /// The opened target directory.
    pub fn target_dir(&self) -> &TenantDir {
        &self.dir
    }

    /// The target directory's path, for status and messages.
    pub fn target_path(&self) -> &Path {
        self.dir.path()
    }

    fn vm_name(&self) -> String {
        self.vm.to_string()
    }

    async fn launch(&mut self, mut steps: Vec<TransactionStep>) -> Result<(), BackupError> {
        let vm = self.vm_name();
        for p in &self.plan {
            // Created exclusively through the directory handle (no symlink
            // followed); qemu-img and QEMU get /proc/<pid>/fd/<n> of it, so
            // they open exactly this inode.
            let handle = self.dir.create_new(&p.file, 0o640)?;
            self.files.push(handle);
            let handle = self.files.last().expect("just pushed");
            let backing = p.backing_chain.first().map(String::as_str);
            image::create_qcow2_at(handle, p.virtual_size, backing)
                .await
                .map_err(|source| BackupError::Image {
                    step: format!("create {}", self.dir.display_path(&p.file).display()),
                    source,
                })?;
            // QEMU gets the open file (add-fd), not its path.
            let file = super::qemu_file(&self.client, handle, &p.target_node, true).await?;
            // O_DIRECT first (twice as fast, see QEMU-NOTES); buffered if the filesystem refuses.
            let direct = self
                .client
                .add_qcow2_node(&p.target_node, &file, true, false, &BackingChoice::Detached)
                .await;
            if let Err(e) = direct {
                if e.is_disconnect() {
                    return Err(qmp_err(&vm, "blockdev-add")(e));
                }
                debug!(error = %e, disk = %p.disk, "O_DIRECT target refused, using buffered I/O");
                self.client
                    .add_qcow2_node(
                        &p.target_node,
                        &file,
                        false,
                        false,
                        &BackingChoice::Detached,
                    )
                    .await
                    .map_err(qmp_err(&vm, "blockdev-add"))?;
            }
            steps.push(TransactionStep::Backup(BackupSpec {
                job_id: p.job_id.clone(),
                device: p.node.clone(),
                target: p.target_node.clone(),
                sync: match &p.base_bitmap {
                    Some(b) => BackupSync::Bitmap { bitmap: b.clone() },
                    None => BackupSync::Full,
                },
                speed: self.request.speed_limit,
            }));
        }
        // Backups first, so QEMU reports a job problem before a bitmap one.
        steps.sort_by_key(|s| !matches!(s, TransactionStep::Backup(_)));
        info!(vm = %vm, backup = %self.request.name, "backup transaction sent");
        let result = match self.request.quiesce.clone() {
            Some(agent) => {
                let (result, report) = agent.quiesced(self.client.transaction(&steps)).await?;
                self.quiesce = Some(report);
                result
            }
            None => self.client.transaction(&steps).await,
        };
        result.map_err(|e| {
            // The transaction rolled back: the checkpoint bitmaps were not created.
            self.created_checkpoint = false;
            qmp_err(&vm, "transaction")(e)
        })
    }

    /// How the guest was frozen for the transaction (`quiesce`), once it ran.
    pub fn quiesce_report(&self) -> Option<&crate::qga::QuiesceReport> {
        self.quiesce.as_ref()
    }

    /// Current progress from `query-jobs`.
    pub async fn progress(&self) -> Result<BackupProgress, BackupError> {
        let jobs = self
            .client
            .query_jobs()
            .await
            .map_err(qmp_err(&self.vm_name(), "query-jobs"))?;
        let mut p = BackupProgress::default();
        for j in jobs
            .iter()
            .filter(|j| self.plan.iter().any(|d| d.job_id == j.id))
        {
            p.bytes_done += j.current_progress;
            p.bytes_total += j.total_progress;
        }
        Ok(p)
    }

    /// Asks QEMU to cancel the jobs; [`Self::wait`] then cleans up and
    /// returns [`BackupError::Cancelled`].
    pub async fn cancel(&self) -> Result<(), BackupError> {
        for p in &self.plan {
            match self.client.job_cancel(&p.job_id).await {
                Ok(()) => {}
                Err(QmpError::Command { .. }) => {} // already concluded
                Err(e) => return Err(qmp_err(&self.vm_name(), "job-cancel")(e)),
            }
        }
        Ok(())
    }

    /// Waits for every job, then finishes (manifest) or cleans up (error).
    pub async fn wait(mut self) -> Result<BackupOutcome, BackupError> {
        if let Some(done) = self.finished.take() {
            return Ok(done);
        }
        let vm = self.vm_name();
        let mut events = self.client.subscribe();
        let mut bytes: HashMap<String, u64> = HashMap::new();
        let failures = loop {
            let jobs = match self.client.query_jobs().await {
                Ok(j) => j,
                Err(e) if e.is_disconnect() => {
                    self.remove_files();
                    return Err(BackupError::VmGone {
                        vm,
                        name: self.request.name.clone(),
                        source: e,
                    });
                }
                Err(e) => return Err(qmp_err(&vm, "query-jobs")(e)),
            };
            let mut all_done = true;
            let mut failures = Vec::new();
            for p in &self.plan {
                match jobs.iter().find(|j| j.id == p.job_id) {
                    Some(j) if j.status == "concluded" => {
                        bytes.insert(p.disk.clone(), j.current_progress);
                        if let Some(err) = &j.error {
                            failures.push((p.disk.clone(), err.clone()));
                        }
                    }
                    Some(_) => all_done = false,
                    None => {
                        failures.push((p.disk.clone(), "the job disappeared from QEMU".to_string()))
                    }
                }
            }
            if all_done {
                info!(vm = %vm, backup = %self.request.name, "backup jobs concluded");
                break failures;
            }
            if !failures.is_empty() {
                // One disk failed: stop the others now rather than copying on.
                let _ = self.cancel().await;
            }
            self.wait_for_job_event(&mut events).await;
        };
        if !failures.is_empty() {
            self.abort().await;
            let (disk, message) = failures
                .iter()
                .find(|(_, m)| m != "Operation canceled" && m != "Operation cancelled")
                .cloned()
                .unwrap_or_else(|| failures[0].clone());
            warn!(vm = %vm, backup = %self.request.name, %disk, %message, "push backup failed");
            return Err(
                if message.contains("anceled") || message.contains("ancelled") {
                    BackupError::Cancelled {
                        vm,
                        name: self.request.name.clone(),
                    }
                } else if message.contains("No space left") {
                    BackupError::NoSpace { vm, disk }
                } else {
                    BackupError::JobFailed { vm, disk, message }
                },
            );
        }
        match self.finish(&bytes).await {
            Ok(done) => Ok(done),
            Err(e) => {
                self.abort().await;
                Err(e)
            }
        }
    }

    /// Returns once one of our jobs reports a state change that may mean it
    /// concluded (`JOB_STATUS_CHANGE`, `BLOCK_JOB_COMPLETED`/`CANCELLED`/`ERROR`),
    /// or after a short fallback poll interval (events can be missed).
    async fn wait_for_job_event(&self, events: &mut broadcast::Receiver<QmpEvent>) {
        let ours = |e: &QmpEvent| {
            let id = e.data.get("id").or_else(|| e.data.get("device"));
            let id = id.and_then(|v| v.as_str()).unwrap_or_default();
            let relevant = match e.name.as_str() {
                "JOB_STATUS_CHANGE" => matches!(
                    e.data.get("status").and_then(|v| v.as_str()),
                    Some("concluded" | "aborting" | "null")
                ),
                "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED" | "BLOCK_JOB_ERROR" => true,
                _ => false,
            };
            relevant && self.plan.iter().any(|p| p.job_id == id)
        };
        let wait_event = async {
            loop {
                match events.recv().await {
                    Ok(e) if ours(&e) => return,
                    Ok(_) => {}
                    // Missed some: re-check now.
                    Err(broadcast::error::RecvError::Lagged(_)) => return,
                    // No more events (session gone): the poll below takes over.
                    Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
                }
            }
        };
        tokio::select! {
            () = wait_event => {}
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }

    async fn finish(&self, bytes: &HashMap<String, u64>) -> Result<BackupOutcome, BackupError> {
        let vm = self.vm_name();
        for p in &self.plan {
            self.client
                .job_dismiss(&p.job_id)
                .await
                .map_err(qmp_err(&vm, "job-dismiss"))?;
            self.client
                .blockdev_del(&p.target_node)
                .await
                .map_err(qmp_err(&vm, "blockdev-del"))?;
        }
        super::remove_fdsets(&self.client, &self.request.operation.prefix())
            .await
            .map_err(qmp_err(&vm, "remove-fd"))?;
        let mut disks = Vec::new();
        for p in &self.plan {
            // QEMU flushed and closed the file at blockdev-del.
            let (_, _, file_size) = self.dir.identity(&p.file)?;
            let mut chain = vec![p.file.clone()];
            chain.extend(p.backing_chain.iter().cloned());
            disks.push(ManifestDisk {
                disk: p.disk.clone(),
                file: p.file.clone(),
                backing_chain: chain,
                kind: p.kind,
                incremental_from: p.base_bitmap.clone(),
                fell_back_to_full: p.fell_back_to_full,
                virtual_size: p.virtual_size,
                bytes_copied: bytes.get(&p.disk).copied().unwrap_or(0),
                file_size,
                file_sha256: None,
                missing_base: p.missing_base.clone(),
            });
        }
        let manifest = Manifest {
            version: MANIFEST_VERSION,
            name: self.request.name.clone(),
            uid: self.request.operation.identity().to_string(),
            vm: vm.clone(),
            completed_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            incremental_from: self.request.incremental.clone(),
            incremental_from_uid: self
                .request
                .incremental
                .as_ref()
                .and(self.request.incremental_uid.clone()),
            checkpoint: self.request.new_checkpoint.clone(),
            checkpoint_uid: self
                .request
                .new_checkpoint
                .as_ref()
                .and(self.request.new_checkpoint_uid.clone()),
            disks,
            domain: self.domain.clone(),
            verified: false,
        };
        let manifest_path = manifest.store(&self.dir)?;
        info!(vm = %vm, backup = %self.request.name, manifest = %manifest_path.display(), "push backup complete");
        Ok(BackupOutcome {
            manifest_path,
            manifest,
            already_complete: false,
        })
    }

    fn remove_files(&self) {
        for p in &self.plan {
            let _ = self.dir.remove(&p.file);
        }
        let _ = self.dir.remove(&format!(
            "{}.tmp",
            Manifest::file_name(&self.request.stem())
        ));
    }

    /// Best-effort cleanup after a failure: jobs, nodes, files and the new
    /// checkpoint's bitmaps.
    async fn abort(&mut self) {
        let ids: Vec<String> = self.plan.iter().map(|p| p.job_id.clone()).collect();
        for id in &ids {
            let _ = self.client.job_cancel(id).await;
        }
        let _ = wait_jobs_settled(&self.client, &ids, Duration::from_secs(30)).await;
        for p in &self.plan {
            let _ = self.client.job_dismiss(&p.job_id).await;
            let _ = self.client.blockdev_del(&p.target_node).await;
        }
        let _ = super::remove_fdsets(&self.client, &self.request.operation.prefix()).await;
        if let (true, Some(cp)) = (self.created_checkpoint, &self.request.new_checkpoint) {
            for p in &self.plan {
                let _ = self.client.remove_bitmap(&p.node, cp).await;
            }
        }
        self.remove_files();
    }
}
