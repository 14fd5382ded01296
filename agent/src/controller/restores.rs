//! The Kubernetes side of restores (`VirtualMachineRestore`) routed to this
//! node: copy a backup's qcow2 chain or a repository snapshot into new image
//! files, verified while read and published under their final names only
//! when complete ([`copy`]), or serve a repository snapshot over NBD for
//! instant recovery ([`super::instant`]).
//!
//! Phases: Pending → Running → Succeeded | Failed (Copy), Pending → Serving →
//! Succeeded | Failed (Instant). A restore found Running or Serving with no
//! task of this agent (the agent restarted) starts again from scratch: its
//! partial files are removed first, and nothing partial is ever visible under
//! a final name. Deleting a restore stops its task, removes partial output
//! (published files of a finished restore stay) and reports `CleanedUp`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cairn_api::{
    BackupProgress, ResolvedRestoreSource, RestoreDiskStatus, RestoreFormat, RestoreMode,
    RestorePhase, VirtualMachineRestore, VirtualMachineRestoreStatus,
};
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use tracing::{info, warn};

use super::status::{agent_conditions, apply_status, cache_is_current, cond, error_chain, now};
use super::{Context, ControllerError, routed_here};
use crate::backup::Manifest;
use crate::image::{self, OutputFormat};
use crate::restore::{RestoreError, RestoreRequest};
use crate::tenant_dir::TenantDir;

/// A restore failure: a stable reason and a sentence naming the problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// CamelCase reason.
    pub reason: &'static str,
    /// What went wrong and what to do.
    pub message: String,
}

impl Failure {
    /// A failure with `reason` and `message`.
    pub fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

/// Runs the restore controller until the process stops.
pub async fn run(ctx: Arc<Context>) {
    super::run_routed::<VirtualMachineRestore, _, _>(ctx, "restore", reconcile).await;
}

async fn reconcile(
    r: Arc<VirtualMachineRestore>,
    ctx: Arc<Context>,
) -> Result<Action, ControllerError> {
    let status = r.status.clone().unwrap_or_default();
    if !routed_here(
        &ctx.config.node_name,
        status.node_name.as_deref(),
        &status.conditions,
    ) {
        return Ok(Action::await_change());
    }
    let ns = r
        .namespace()
        .ok_or(ControllerError::MissingField("namespace"))?;
    let uid = r.uid().ok_or(ControllerError::MissingField("uid"))?;
    let name = r.name_any();
    let api: Api<VirtualMachineRestore> = Api::namespaced(ctx.client.clone(), &ns);
    let phase = status.phase.unwrap_or_default();

    if r.metadata.deletion_timestamp.is_some() {
        let cleaned = cairn_api::conditions::is_true(&status.conditions, "CleanedUp");
        if cleaned {
            return Ok(Action::await_change());
        }
        stop_task(&ctx, &uid);
        super::instant::stop(&ctx, &r).await;
        if !phase.is_finished() {
            remove_partials(&ctx, &r);
        }
        let mut s = status.clone();
        s.conditions = agent_conditions(
            &s.conditions,
            &[cond(
                "CleanedUp",
                true,
                "Deleted",
                "the restore's work was stopped and its partial output removed; published image files stay",
            )],
            r.metadata.generation,
        );
        apply_status(&api, &name, &s).await?;
        info!(restore = %name, namespace = %ns, "restore deleted; cleaned up");
        return Ok(Action::await_change());
    }
    if phase.is_finished() || super::backups::task_alive(&ctx, &uid) {
        return Ok(Action::await_change());
    }
    // The cache trails this agent's own status writes: a stale Pending must not
    // start a second task, and a stale Running (the task has just finished and
    // written Succeeded) must not look like an agent restart.
    if !cache_is_current(&api, r.as_ref()).await? {
        return Ok(Action::requeue(Duration::from_millis(500)));
    }
    if phase != RestorePhase::Pending {
        // Started by an earlier agent process: start again from scratch.
        warn!(restore = %name, namespace = %ns, phase = phase.as_str(), "restore found in progress with no task here (agent restarted); starting it again");
        remove_partials(&ctx, &r);
    }
    let task = {
        let (ctx, r) = (ctx.clone(), r.clone());
        tokio::spawn(async move {
            let uid = r.uid().unwrap_or_default();
            if let Err(e) = run_restore(&ctx, &r).await {
                warn!(restore = %r.name_any(), error = %error_chain(&e), "writing restore status failed");
            }
            if let Ok(mut jobs) = ctx.jobs.lock() {
                jobs.remove(&uid);
            }
        })
    };
    ctx.jobs.lock().expect("jobs lock").insert(uid, task);
    Ok(Action::await_change())
}

fn stop_task(ctx: &Context, uid: &str) {
    if let Some(h) = ctx.jobs.lock().expect("jobs lock").remove(uid) {
        h.abort();
    }
}

/// The output file name of `disk`.
pub fn output_name(disk: &str, format: RestoreFormat) -> String {
    format!("{disk}.{}", format.as_str())
}

/// Whether `file` is a partial output of `output` (the hidden names the chain
/// and repository restores write before they publish).
fn is_partial_of(file: &str, output: &str) -> bool {
    file.strip_prefix('.')
        .and_then(|f| f.strip_prefix(output))
        .is_some_and(|rest| {
            rest == ".cairn-restore"
                || rest.starts_with(".raw-partial-")
                || rest.starts_with(".qcow2-partial-")
        })
}

/// Removes the hidden partial files a (dead or cancelled) restore left in its
/// target directory. Only hidden names derived from the restore's own disks.
fn remove_partials(ctx: &Context, r: &VirtualMachineRestore) {
    let Some((dir, format)) = target_dir(ctx, r, false) else {
        return;
    };
    let disks: Vec<String> = r
        .spec
        .disks
        .iter()
        .flatten()
        .map(|d| d.name.clone())
        .collect();
    for f in dir.names() {
        let ours = if disks.is_empty() {
            f.starts_with('.')
                && (f.contains(".cairn-restore")
                    || f.contains(".raw-partial-")
                    || f.contains(".qcow2-partial-"))
        } else {
            disks
                .iter()
                .any(|d| is_partial_of(&f, &output_name(d, format)))
        };
        if ours {
            let _ = dir.remove(&f);
        }
    }
}

/// The restore's target directory, opened inside `<root>/<namespace>/`
/// (created when `create`).
fn target_dir(
    ctx: &Context,
    r: &VirtualMachineRestore,
    create: bool,
) -> Option<(TenantDir, RestoreFormat)> {
    let target = r.spec.target.as_ref()?;
    let path = PathBuf::from(&target.directory.as_ref()?.path);
    let ns = r.namespace()?;
    let dir = if create {
        ctx.targets.resolve_dir(&ns, &path).ok()?
    } else {
        TenantDir::open(
            ctx.targets.allowed_roots(),
            &ns,
            Some(&path),
            crate::tenant_dir::DirMode::PRIVATE,
        )
        .ok()?
    };
    Some((dir, target.output_format()))
}

/// Runs one restore and writes its status as it goes.
async fn run_restore(ctx: &Arc<Context>, r: &VirtualMachineRestore) -> Result<(), kube::Error> {
    let ns = r.namespace().unwrap_or_default();
    let name = r.name_any();
    let api: Api<VirtualMachineRestore> = Api::namespaced(ctx.client.clone(), &ns);
    let mut status = r.status.clone().unwrap_or_default();
    let generation = r.metadata.generation;
    let instant = r.spec.mode == RestoreMode::Instant;
    status.phase = Some(RestorePhase::Running);
    status.start_time.get_or_insert_with(now);
    status.failure_reason = None;
    status.conditions = agent_conditions(
        &status.conditions,
        &[cond(
            "Ready",
            false,
            "Running",
            if instant {
                "opening the repository snapshot to serve it"
            } else {
                "restoring and verifying"
            },
        )],
        generation,
    );
    apply_status(&api, &name, &status).await?;
    let source = status.source.clone().unwrap_or_default();
    let result = if instant {
        super::instant::serve(ctx, r, &source, &mut status).await
    } else {
        copy(ctx, r, &source, &api, &mut status).await
    };
    match result {
        Ok(()) if instant => Ok(()),
        Ok(()) => {
            status.phase = Some(RestorePhase::Succeeded);
            status.completion_time = Some(now());
            status.conditions = agent_conditions(
                &status.conditions,
                &[cond(
                    "Ready",
                    true,
                    "Restored",
                    format!("restored and verified {} disk(s)", status.disks.len()),
                )],
                generation,
            );
            info!(restore = %name, namespace = %ns, "restore succeeded");
            apply_status(&api, &name, &status).await
        }
        Err(f) => {
            remove_partials(ctx, r);
            warn!(restore = %name, namespace = %ns, reason = f.reason, message = %f.message, "restore failed");
            fail(&api, &name, status, generation, f).await
        }
    }
}

/// Writes phase Failed with `f` as the Ready condition.
pub async fn fail(
    api: &Api<VirtualMachineRestore>,
    name: &str,
    mut status: VirtualMachineRestoreStatus,
    generation: Option<i64>,
    f: Failure,
) -> Result<(), kube::Error> {
    status.phase = Some(RestorePhase::Failed);
    status.completion_time = Some(now());
    status.failure_reason = Some(f.reason.to_string());
    status.export = None;
    status.conditions = agent_conditions(
        &status.conditions,
        &[cond("Ready", false, f.reason, f.message)],
        generation,
    );
    apply_status(api, name, &status).await
}

/// The disks to restore: the selection, each of which must be among `known`.
pub fn select_disks(r: &VirtualMachineRestore, known: &[String]) -> Result<Vec<String>, Failure> {
    let Some(wanted) = &r.spec.disks else {
        return Ok(known.to_vec());
    };
    let mut out = Vec::new();
    for d in wanted {
        if !known.contains(&d.name) {
            return Err(Failure::new(
                "UnknownDisk",
                format!(
                    "the backup has no disk {:?} (disks: {})",
                    d.name,
                    known.join(", ")
                ),
            ));
        }
        if !out.contains(&d.name) {
            out.push(d.name.clone());
        }
    }
    Ok(out)
}

/// What a copy restore reads from.
enum Source {
    Chain {
        dir: TenantDir,
        manifest_name: String,
        manifest: Box<Manifest>,
    },
    Repository {
        repo: Box<cairn_repo::Repository>,
        snapshot: String,
        manifest: Box<cairn_repo::Manifest>,
    },
}

/// Opens the resolved source, checking it belongs to this restore's namespace.
pub async fn open_repository_snapshot(
    ctx: &Context,
    ns: &str,
    source: &ResolvedRestoreSource,
) -> Result<(cairn_repo::Repository, String, cairn_repo::Manifest), Failure> {
    let repo_name = source.repository.clone().unwrap_or_default();
    let Some(snapshot) = source.snapshot.clone() else {
        return Err(Failure::new(
            "SnapshotNotFound",
            "the backup recorded no repository snapshot",
        ));
    };
    let repo = ctx
        .repositories
        .open(&ctx.client, &repo_name)
        .await
        .map_err(|e| Failure::new(e.reason(), error_chain(&e)))?;
    let not_found = || {
        Failure::new(
            "SnapshotNotFound",
            format!(
                "BackupRepository {repo_name:?} has no snapshot {snapshot:?} of namespace {ns:?}"
            ),
        )
    };
    let manifest = match repo.manifest(&snapshot).await {
        Ok(m) => m,
        Err(cairn_repo::RepoError::SnapshotNotFound(_)) => return Err(not_found()),
        Err(e) => {
            return Err(Failure::new(
                super::status::repository_reason(&e),
                error_chain(&e),
            ));
        }
    };
    // Another namespace's snapshot looks exactly like a missing one: no oracle.
    if manifest.namespace != ns {
        return Err(not_found());
    }
    if source
        .backup_uid
        .as_ref()
        .is_some_and(|u| *u != manifest.backup_uid)
    {
        return Err(Failure::new(
            "SnapshotMismatch",
            format!(
                "snapshot {snapshot:?} was not written by the VirtualMachineBackup this restore names"
            ),
        ));
    }
    Ok((repo, snapshot, manifest))
}

async fn open_source(
    ctx: &Context,
    r: &VirtualMachineRestore,
    source: &ResolvedRestoreSource,
) -> Result<Source, Failure> {
    let ns = r.namespace().unwrap_or_default();
    if source.repository.is_some() {
        let (repo, snapshot, manifest) = open_repository_snapshot(ctx, &ns, source).await?;
        return Ok(Source::Repository {
            repo: Box::new(repo),
            snapshot,
            manifest: Box::new(manifest),
        });
    }
    let (Some(path), Some(uid), Some(backup)) = (
        source.directory.as_deref(),
        source.backup_uid.as_deref(),
        r.spec.source.backup.as_ref(),
    ) else {
        return Err(Failure::new(
            "InvalidSource",
            "the operator resolved no backup directory",
        ));
    };
    let dir = ctx
        .targets
        .resolve_dir(&ns, std::path::Path::new(path))
        .map_err(|e| Failure::new(super::status::backup_reason(&e), error_chain(&e)))?;
    let manifest_name = Manifest::file_name(&Manifest::stem(&backup.name, uid));
    if !dir.exists(&manifest_name) {
        return Err(Failure::new(
            "BackupFilesMissing",
            format!(
                "the manifest {} of VirtualMachineBackup {:?} is missing: its files were removed",
                dir.display_path(&manifest_name).display(),
                backup.name
            ),
        ));
    }
    let manifest = Manifest::load(&dir, &manifest_name)
        .map_err(|e| Failure::new("BadManifest", error_chain(&e)))?;
    if manifest.uid != uid || manifest.vm.split('/').next() != Some(ns.as_str()) {
        return Err(Failure::new(
            "BadManifest",
            format!(
                "{} was not written by VirtualMachineBackup {:?} of namespace {ns:?}",
                dir.display_path(&manifest_name).display(),
                backup.name
            ),
        ));
    }
    Ok(Source::Chain {
        dir,
        manifest_name,
        manifest: Box::new(manifest),
    })
}

fn restore_reason(e: &RestoreError) -> &'static str {
    match e {
        RestoreError::NoManifest { .. } => "BackupFilesMissing",
        RestoreError::Manifest(_) => "BadManifest",
        RestoreError::UnknownDisk { .. } => "UnknownDisk",
        RestoreError::MissingBase { .. } => "MissingBase",
        RestoreError::MissingFile { .. } => "BackupFilesMissing",
        RestoreError::Image { .. } => "ImageError",
        RestoreError::Damaged { .. } => "ChecksumFailed",
        RestoreError::ForeignChainFile { .. } => "ForeignChainFile",
        RestoreError::Unverified { .. } => "Unverified",
        RestoreError::Output { .. } => "TargetError",
    }
}

/// Allocated bytes of the files in `dir` whose names satisfy `pick`.
fn allocated(dir: &TenantDir, pick: impl Fn(&str) -> bool) -> u64 {
    use std::os::unix::fs::MetadataExt;
    dir.names()
        .into_iter()
        .filter(|n| pick(n))
        .filter_map(|n| std::fs::symlink_metadata(dir.proc_path().join(n)).ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// Copy mode: every selected disk into `<target>/<disk>.<format>`.
async fn copy(
    ctx: &Arc<Context>,
    r: &VirtualMachineRestore,
    source: &ResolvedRestoreSource,
    api: &Api<VirtualMachineRestore>,
    status: &mut VirtualMachineRestoreStatus,
) -> Result<(), Failure> {
    let ns = r.namespace().unwrap_or_default();
    let target = r.spec.target.clone().unwrap_or_default();
    let format = target.output_format();
    let overwrite = target.overwrites();
    let path = target
        .directory
        .as_ref()
        .map(|d| d.path.clone())
        .ok_or_else(|| Failure::new("InvalidTarget", "mode Copy needs target.directory"))?;
    let src = open_source(ctx, r, source).await?;
    // (disk, virtual size, upper bound of the data to write)
    let known: Vec<(String, u64, u64)> = match &src {
        Source::Chain { dir, manifest, .. } => {
            let recorded = Manifest::file_checksums(dir);
            manifest
                .disks
                .iter()
                .map(|d| {
                    let data = d
                        .backing_chain
                        .iter()
                        .map(|f| recorded.get(f).map_or(d.virtual_size, |r| r.size))
                        .sum::<u64>()
                        .min(d.virtual_size + (16 << 20));
                    (d.disk.clone(), d.virtual_size, data)
                })
                .collect()
        }
        Source::Repository { manifest, .. } => manifest
            .disks
            .iter()
            .map(|d| {
                let data = (d.chunks - d.zero_chunks) * u64::from(manifest.chunk_size);
                // qcow2 output goes through a raw file first.
                let factor = if format == RestoreFormat::Qcow2 { 2 } else { 1 };
                (d.name.clone(), d.size, data.min(d.size) * factor)
            })
            .collect(),
    };
    let names: Vec<String> = known.iter().map(|k| k.0.clone()).collect();
    let disks = select_disks(r, &names)?;
    let dir = ctx
        .targets
        .resolve_dir(&ns, std::path::Path::new(&path))
        .map_err(|e| Failure::new(super::status::backup_reason(&e), error_chain(&e)))?;
    // Refuse before writing anything: existing outputs, then space.
    for d in &disks {
        let out = output_name(d, format);
        if !overwrite && dir.kind(&out).ok().flatten().is_some() {
            return Err(Failure::new(
                "TargetExists",
                format!(
                    "{} exists; set target.directory.overwrite: true to replace it, or choose another directory",
                    dir.display_path(&out).display()
                ),
            ));
        }
        if dir.kind(&out).ok().flatten().is_some_and(|k| !k.is_file()) {
            return Err(Failure::new(
                "TargetExists",
                format!(
                    "{} exists and is not a regular file; it is never replaced",
                    dir.display_path(&out).display()
                ),
            ));
        }
    }
    let sizes: Vec<(String, u64, u64)> =
        known.into_iter().filter(|k| disks.contains(&k.0)).collect();
    let need: u64 = sizes.iter().map(|s| s.2).sum();
    let free = dir.available_bytes().unwrap_or(u64::MAX);
    if need > free {
        return Err(Failure::new(
            "NoSpace",
            format!(
                "restoring needs up to {need} bytes but {} has {free} bytes free",
                dir.path().display()
            ),
        ));
    }
    let total: u64 = sizes.iter().map(|s| s.1).sum();
    status.progress = Some(BackupProgress {
        bytes_done: 0,
        bytes_total: i64::try_from(total).unwrap_or(i64::MAX),
    });
    status.disks = Vec::new();
    let mut done = 0u64;
    for (disk, size, _) in &sizes {
        let out = output_name(disk, format);
        let work = async {
            match &src {
                Source::Chain {
                    dir: src_dir,
                    manifest_name,
                    ..
                } => {
                    let request = RestoreRequest {
                        manifest: src_dir.proc_path().join(manifest_name),
                        output: dir.proc_path().join(&out),
                        format: match format {
                            RestoreFormat::Qcow2 => OutputFormat::Qcow2,
                            RestoreFormat::Raw => OutputFormat::Raw,
                        },
                        disk: Some(disk.clone()),
                        verify: true,
                    };
                    crate::restore::restore(&request)
                        .await
                        .map(|_| ())
                        .map_err(|e| Failure::new(restore_reason(&e), error_chain(&e)))
                }
                Source::Repository { repo, snapshot, .. } => cairn_repo::restore_disk(
                    repo,
                    snapshot,
                    disk,
                    &dir.proc_path().join(&out),
                    match format {
                        RestoreFormat::Qcow2 => cairn_repo::OutputFormat::Qcow2,
                        RestoreFormat::Raw => cairn_repo::OutputFormat::Raw,
                    },
                    overwrite,
                )
                .await
                .map(|_| ())
                .map_err(|e| Failure::new(super::status::repository_reason(&e), error_chain(&e))),
            }
        };
        // Progress: the allocated bytes of the partial output, every 2 s.
        let ticker = async {
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                let partial = allocated(&dir, |n| is_partial_of(n, &out)).min(*size);
                let mut s = status.clone();
                s.progress = Some(BackupProgress {
                    bytes_done: i64::try_from(done + partial).unwrap_or(i64::MAX),
                    bytes_total: i64::try_from(total).unwrap_or(i64::MAX),
                });
                let _ = apply_status(api, &r.name_any(), &s).await;
            }
        };
        tokio::select! {
            res = work => res?,
            () = ticker => unreachable!("the ticker never ends"),
        }
        let file = dir.open_read(&out).map_err(|e| {
            Failure::new("TargetError", format!("reopening the restored image: {e}"))
        })?;
        let (sha, _) = image::open_file_sha256_and_size(file)
            .await
            .map_err(|e| Failure::new("TargetError", error_chain(&e)))?;
        done += size;
        status.disks.push(RestoreDiskStatus {
            name: disk.clone(),
            path: Some(dir.display_path(&out).display().to_string()),
            size: Some(i64::try_from(*size).unwrap_or(i64::MAX)),
            sha256: Some(sha),
            ..Default::default()
        });
        status.progress = Some(BackupProgress {
            bytes_done: i64::try_from(done).unwrap_or(i64::MAX),
            bytes_total: i64::try_from(total).unwrap_or(i64::MAX),
        });
        let _ = apply_status(api, &r.name_any(), &*status).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_names_belong_to_their_output_only() {
        assert!(is_partial_of(".vda.qcow2.cairn-restore", "vda.qcow2"));
        assert!(is_partial_of(".vda.raw.raw-partial-1a2b3c4d", "vda.raw"));
        assert!(is_partial_of(
            ".vda.qcow2.qcow2-partial-1a2b3c4d",
            "vda.qcow2"
        ));
        assert!(!is_partial_of("vda.qcow2", "vda.qcow2"));
        assert!(!is_partial_of(".vdb.qcow2.cairn-restore", "vda.qcow2"));
        assert!(!is_partial_of(".vda.qcow2.something", "vda.qcow2"));
    }
}
