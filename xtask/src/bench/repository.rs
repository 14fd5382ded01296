//! The repository section: backups into a BackupRepository through the
//! agent's library path (`run_repository_backup`: a point-in-time export read
//! with Cairn's NBD client, chunked, hashed, compressed, encrypted on S3,
//! packed), into a directory and into a real versitygw on loopback, against
//! `nbdcopy` of the same kind of export, `qemu-img convert`, and restic
//! (Debian's package) backing up the same bytes as a raw file.

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use cairn_agent::backup::repository::{
    RepositoryBackupOutcome, RepositoryBackupRequest, run_repository_backup,
};
use cairn_agent::backup::{
    PullPolicy, PullRequest, ScratchReserve, start_pull_export, stop_pull_export,
};
use cairn_agent::identity::OperationId;
use cairn_e2e::local_s3::{LocalS3, SERVICE};
use cairn_repo::{
    CheckpointRef, InitOptions, OutputFormat, Repository, RepositoryKey, S3Config, StorageConfig,
    restore_disk,
};

use super::qemu::{
    BenchVm, DISK, FMT_NODE, MIB, WRITE, bench_qdev, copy_image, dirty_offsets, drop_caches,
    guest_write, run,
};
use super::{Config, Samples};

/// Share of the disk the incremental dirties (64 KiB writes).
pub const DIRTY: f64 = 0.01;

/// Everything the repository section measured.
#[derive(Default, serde::Serialize, serde::Deserialize)]
pub struct RepoResults {
    /// Chunk size of the repositories (the default).
    pub chunk_size: u64,
    /// Full backup into a directory repository.
    pub full_dir: Samples,
    /// `nbdcopy` of a point-in-time export of the same disk into a file.
    pub full_nbdcopy: Samples,
    /// Full backup into the S3 repository.
    pub full_s3: Samples,
    /// Incremental after 1 % dirty, directory repository.
    pub inc_dir: Samples,
    /// Incremental after 1 % dirty, S3 repository.
    pub inc_s3: Samples,
    /// Bytes the incremental (directory) read from the export, per run.
    pub inc_bytes_read: Vec<u64>,
    /// Bytes written by the guest before the incremental (distinct 64 KiB writes).
    pub dirty_bytes: u64,
    /// The dirty bytes rounded up to whole chunks, per run (as `inc_bytes_read`).
    pub dirty_chunk_bytes: Vec<u64>,
    /// Bytes the directory repository grew by with the incremental, per run.
    pub inc_stored_dir: Vec<u64>,
    /// Bytes the S3 repository grew by with the incremental, per run.
    pub inc_stored_s3: Vec<u64>,
    /// Objects the S3 incremental wrote: (count, bytes), per run.
    pub inc_objects_s3: Vec<(u64, u64)>,
    /// Pack objects in the S3 bucket after the run: (count, bytes), per run.
    pub packs_s3: Vec<(u64, u64)>,
    /// Restore of the incremental snapshot to raw, directory repository.
    pub restore_dir: Samples,
    /// Same, S3 repository.
    pub restore_s3: Samples,
    /// `qemu-img convert` of the base qcow2 to raw.
    pub restore_convert: Samples,
    /// restic: full backup of the raw image.
    pub restic_full: Samples,
    /// restic: backup after the same 1 % of writes.
    pub restic_inc: Samples,
    /// restic: restore of the latest snapshot.
    pub restic_restore: Samples,
    /// Bytes restic's repository grew by with the incremental, per run.
    pub restic_inc_stored: Vec<u64>,
    /// Dedup: a clone of the same base backed up into the directory repository.
    pub clone: Option<CloneDedup>,
    /// Why restic could not run, if it could not.
    pub restic_unavailable: Option<String>,
}

/// A second VM on a copy of the same base image.
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
pub struct CloneDedup {
    /// Size of its disk.
    pub size: u64,
    /// Bytes the repository grew by with its full backup.
    pub added: u64,
    /// Logical bytes (sum of every snapshot's disks) after it.
    pub logical: u64,
    /// Stored bytes after it.
    pub stored: u64,
    /// Chunks new / reused / zero in its backup.
    pub chunks: (u64, u64, u64),
}

/// Two backup targets of one run.
struct Repos {
    dir: Repository,
    s3: Repository,
}

fn cold() {
    drop_caches();
}

fn checkpoint(name: String) -> CheckpointRef {
    CheckpointRef {
        uid: format!("uid-{name}"),
        name,
    }
}

fn request(
    name: &str,
    incremental: Option<CheckpointRef>,
    new: Option<CheckpointRef>,
) -> RepositoryBackupRequest {
    RepositoryBackupRequest {
        operation: OperationId::new(format!("bench-{name}")),
        name: name.into(),
        backup_uid: format!("uid-{name}"),
        disks: None,
        incremental,
        new_checkpoint: new,
        fallback_to_full: false,
        quiesce: None,
    }
}

/// One backup through the agent's path, timed (cold cache first).
async fn timed_backup(
    vm: &BenchVm,
    policy: &PullPolicy,
    repo: &Repository,
    req: &RepositoryBackupRequest,
    into: &mut Samples,
) -> Result<RepositoryBackupOutcome> {
    cold();
    let t = Instant::now();
    let out = run_repository_backup(&vm.client, &vm.vm, policy, repo, req, None).await?;
    into.push(t.elapsed().as_secs_f64());
    Ok(out)
}

/// [`timed_backup`], and how many bytes the repository grew by.
async fn timed_growth(
    vm: &BenchVm,
    policy: &PullPolicy,
    repo: &Repository,
    req: &RepositoryBackupRequest,
    into: &mut Samples,
) -> Result<(RepositoryBackupOutcome, u64)> {
    let before = stored(repo).await?;
    let out = timed_backup(vm, policy, repo, req, into).await?;
    Ok((out, stored(repo).await? - before))
}

async fn stored(repo: &Repository) -> Result<u64> {
    Ok(repo.stats().await?.stored_bytes)
}

/// Objects under the repository root: (count, bytes), only those whose key
/// starts with `prefix`, and the keys.
async fn objects(repo: &Repository, prefix: &str) -> Result<(u64, u64, BTreeSet<String>)> {
    let list = repo.storage().list(prefix).await?;
    let bytes = list.iter().map(|o| o.size).sum();
    let keys = list.into_iter().map(|o| o.key).collect::<BTreeSet<_>>();
    Ok((keys.len() as u64, bytes, keys))
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// Runs the section `cfg.runs` times (once in quick mode).
pub async fn run_all(cfg: &Config, base: &Path, r: &mut RepoResults) -> Result<()> {
    let work = cfg.work.join("repository");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let tools = cairn_e2e::tools::Tools::ensure()?;
    let state = work.join("s3-state");
    let s3 = LocalS3::start(&tools, &state, Some(std::process::id()))?;
    let result = runs(cfg, base, &work, &s3, r).await;
    let _ = cairn_e2e::control_plane::kill_recorded(&state, SERVICE);
    let _ = std::fs::remove_dir_all(&work);
    result
}

async fn runs(
    cfg: &Config,
    base: &Path,
    work: &Path,
    s3: &LocalS3,
    r: &mut RepoResults,
) -> Result<()> {
    let image = work.join("vm.qcow2");
    copy_image(base, &image)?;
    let vm = BenchVm::start(
        &work.join("qmp/bench/repo.sock"),
        "bench",
        "repo",
        &image,
        64,
    )
    .await?;
    for d in ["exports", "scratch"] {
        std::fs::create_dir_all(work.join(d))?;
    }
    let policy = PullPolicy {
        export_dir: work.join("exports"),
        socket_group: None,
        scratch_dir: work.join("scratch"),
        scratch_reserve: ScratchReserve::Allocated,
        cbw_timeout_seconds: 30,
        tcp: Default::default(),
    };
    let raw = raw_image(cfg, base)?;
    let restic = restic_available();
    if let Err(e) = &restic {
        r.restic_unavailable = Some(format!("{e:#}"));
    }
    let runs = if cfg.quick { 1 } else { cfg.runs };
    for run_no in 0..runs {
        eprintln!("bench: repository run {}/{runs}", run_no + 1);
        let dir = work.join(format!("repo-dir-{run_no}"));
        std::fs::create_dir_all(&dir)?;
        let repos = Repos {
            dir: Repository::open_or_init(
                &StorageConfig::Directory { path: dir.clone() },
                &RepositoryKey::None,
                &InitOptions::default(),
            )
            .await?,
            s3: Repository::open_or_init(
                &s3_config(s3, &format!("run-{run_no}")),
                &RepositoryKey::Key(b"cairn bench repository key 0123456789".to_vec()),
                &InitOptions::default(),
            )
            .await?,
        };
        r.chunk_size = repos.dir.chunk_size() as u64;
        one_run(cfg, &vm, &policy, &repos, base, work, run_no, r).await?;
        if run_no == 0 {
            r.clone = Some(clone_dedup(base, work, &policy, &repos.dir).await?);
        }
        if restic.is_ok() {
            restic_run(cfg, &raw, work, run_no, r).await?;
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    vm.quit().await?;
    Ok(())
}

fn s3_config(s3: &LocalS3, prefix: &str) -> StorageConfig {
    StorageConfig::S3(S3Config {
        endpoint: s3.endpoint.clone(),
        bucket: s3.bucket.clone(),
        prefix: Some(prefix.into()),
        region: Some(cairn_repo::test_support::REGION.into()),
        access_key_id: s3.access_key_id.clone(),
        secret_access_key: s3.secret_access_key.clone(),
    })
}

#[allow(clippy::too_many_arguments)]
async fn one_run(
    cfg: &Config,
    vm: &BenchVm,
    policy: &PullPolicy,
    repos: &Repos,
    base: &Path,
    work: &Path,
    run_no: usize,
    r: &mut RepoResults,
) -> Result<()> {
    let size = cfg.disk_size;
    let cp = |repo: &str, i: usize| checkpoint(format!("{repo}{run_no}-{i}"));
    // Full into the directory ("d"), then the same export copied by nbdcopy, then S3 ("s").
    timed_backup(
        vm,
        policy,
        &repos.dir,
        &request(&format!("d-full-{run_no}"), None, Some(cp("d", 0))),
        &mut r.full_dir,
    )
    .await?;
    nbdcopy_export(vm, policy, work, run_no, r).await?;
    timed_backup(
        vm,
        policy,
        &repos.s3,
        &request(&format!("s-full-{run_no}"), None, Some(cp("s", 0))),
        &mut r.full_s3,
    )
    .await?;

    // 1 % scattered 64 KiB writes.
    let (offsets, pattern) = dirty_offsets(size, DIRTY, 1000 + run_no as u64);
    for &off in &offsets {
        guest_write(&vm.writer, &bench_qdev(), pattern, off, WRITE).await?;
    }
    r.dirty_bytes = offsets.len() as u64 * WRITE;
    r.dirty_chunk_bytes
        .push(chunk_bytes_touched(&offsets, repos.dir.chunk_size() as u64));

    let incremental = |repo: &'static str| {
        request(
            &format!("{repo}-inc-{run_no}"),
            Some(cp(repo, 0)),
            Some(cp(repo, 1)),
        )
    };
    let (inc, grew) =
        timed_growth(vm, policy, &repos.dir, &incremental("d"), &mut r.inc_dir).await?;
    ensure!(inc.base.is_some(), "the incremental found no base snapshot");
    r.inc_bytes_read.push(inc.progress.bytes_read);
    r.inc_stored_dir.push(grew);

    let (_, _, keys_before) = objects(&repos.s3, "").await?;
    let (inc_s3, grew) =
        timed_growth(vm, policy, &repos.s3, &incremental("s"), &mut r.inc_s3).await?;
    r.inc_stored_s3.push(grew);
    let list = repos.s3.storage().list("").await?;
    let new: Vec<_> = list
        .iter()
        .filter(|o| !keys_before.contains(&o.key))
        .collect();
    r.inc_objects_s3
        .push((new.len() as u64, new.iter().map(|o| o.size).sum()));
    let (n, bytes, _) = objects(&repos.s3, "packs").await?;
    r.packs_s3.push((n, bytes));

    // Restores of the incremental snapshot, and the peer on the base image.
    let out = work.join("restore.raw");
    for (repo, snap, into) in [
        (&repos.dir, &inc.manifest.id, &mut r.restore_dir),
        (&repos.s3, &inc_s3.manifest.id, &mut r.restore_s3),
    ] {
        cold();
        let t = Instant::now();
        restore_disk(repo, snap, DISK, &out, OutputFormat::Raw, false).await?;
        into.push(t.elapsed().as_secs_f64());
        check_restored(&out, &offsets, pattern)?;
        std::fs::remove_file(&out)?;
    }
    cold();
    let t = Instant::now();
    run(Command::new("qemu-img")
        .args([
            "convert", "-t", "none", "-T", "none", "-f", "qcow2", "-O", "raw",
        ])
        .arg(base)
        .arg(&out))?;
    r.restore_convert.push(t.elapsed().as_secs_f64());
    std::fs::remove_file(&out)?;
    for i in 0..2 {
        for repo in ["d", "s"] {
            let _ = vm.client.remove_bitmap(FMT_NODE, &cp(repo, i).name).await;
        }
    }
    Ok(())
}

/// Bytes of the `cs`-byte chunks that 64 KiB writes at `offsets` touch.
fn chunk_bytes_touched(offsets: &[u64], cs: u64) -> u64 {
    let chunks: BTreeSet<u64> = offsets
        .iter()
        .flat_map(|o| (o / cs)..=((o + WRITE - 1) / cs))
        .collect();
    chunks.len() as u64 * cs
}

/// The restored image carries the guest's writes (a cheap sanity check; the
/// tests compare whole images).
fn check_restored(path: &Path, offsets: &[u64], pattern: u8) -> Result<()> {
    let f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; WRITE as usize];
    for &off in offsets.iter().take(16) {
        f.read_exact_at(&mut buf, off)?;
        ensure!(
            buf.iter().all(|&b| b == pattern),
            "the restored image lacks the guest write at {off}"
        );
    }
    Ok(())
}

/// A point-in-time export of the same kind (fleecing, no bitmap) copied by
/// `nbdcopy` into a raw file; timed from the export's start to its teardown.
async fn nbdcopy_export(
    vm: &BenchVm,
    policy: &PullPolicy,
    work: &Path,
    run_no: usize,
    r: &mut RepoResults,
) -> Result<()> {
    let req = PullRequest {
        operation: OperationId::new(format!("bench-nbdcopy-{run_no}")),
        name: format!("nbdcopy-{run_no}"),
        disks: None,
        incremental: None,
        new_checkpoint: None,
        socket: None,
        fallback_to_full: false,
        quiesce: None,
        tcp: None,
    };
    let out = work.join("nbdcopy.raw");
    cold();
    let t = Instant::now();
    let export = start_pull_export(&vm.client, &vm.vm, policy, &req).await?;
    let copied = run(Command::new("nbdcopy").arg(&export.disks[0].url).arg(&out));
    stop_pull_export(&vm.client, &req.operation, policy, &vm.vm, None, &req.name).await?;
    copied?;
    r.full_nbdcopy.push(t.elapsed().as_secs_f64());
    std::fs::remove_file(&out)?;
    Ok(())
}

/// A second VM on a byte copy of the same base, backed up in full into the
/// directory repository that already holds the first VM's snapshots.
async fn clone_dedup(
    base: &Path,
    work: &Path,
    policy: &PullPolicy,
    repo: &Repository,
) -> Result<CloneDedup> {
    let image = work.join("clone.qcow2");
    copy_image(base, &image)?;
    let vm = BenchVm::start(
        &work.join("qmp/bench/clone.sock"),
        "bench",
        "clone",
        &image,
        64,
    )
    .await?;
    let req = request("clone-full", None, None);
    let out = timed_growth(&vm, policy, repo, &req, &mut Samples::default()).await;
    vm.quit().await?;
    let _ = std::fs::remove_file(&image);
    let (out, added) = out?;
    let stats = repo.stats().await?;
    let p = out.progress;
    Ok(CloneDedup {
        size: out.manifest.disks.iter().map(|d| d.size).sum(),
        added,
        logical: stats.logical_bytes,
        stored: stats.stored_bytes,
        chunks: (p.chunks_new, p.chunks_reused, p.chunks_zero),
    })
}

/// The base image as a raw file (what restic backs up), cached beside it.
fn raw_image(cfg: &Config, base: &Path) -> Result<PathBuf> {
    let raw = cfg.work.join(format!("base-{}m.raw", cfg.disk_size >> 20));
    if !raw.exists() {
        let tmp = raw.with_extension("raw.tmp");
        run(Command::new("qemu-img")
            .args(["convert", "-q", "-f", "qcow2", "-O", "raw"])
            .arg(base)
            .arg(&tmp))?;
        std::fs::rename(&tmp, &raw)?;
    }
    Ok(raw)
}

fn restic_available() -> Result<()> {
    if Command::new("restic").arg("version").output().is_err() {
        // Debian's package, as the method says.
        run(Command::new("apt-get").args(["install", "-y", "-q", "restic"]))
            .context("restic is not installed and apt-get install restic failed")?;
    }
    run(Command::new("restic").arg("version")).map(drop)
}

fn restic(repo: &Path, cache: &Path, args: &[&str], extra: &[&Path]) -> Result<f64> {
    let t = Instant::now();
    run(Command::new("restic")
        .arg("--repo")
        .arg(repo)
        .arg("--cache-dir")
        .arg(cache)
        .args(["--quiet"])
        .args(args)
        .args(extra)
        .env("RESTIC_PASSWORD", "cairn-bench"))?;
    Ok(t.elapsed().as_secs_f64())
}

/// restic on the raw image: full, the same 1 % of writes as Cairn's VM got
/// (written into the file, undone afterwards), incremental, restore.
async fn restic_run(
    cfg: &Config,
    raw: &Path,
    work: &Path,
    run_no: usize,
    r: &mut RepoResults,
) -> Result<()> {
    let repo = work.join(format!("restic-{run_no}"));
    let cache = work.join("restic-cache");
    let _ = std::fs::remove_dir_all(&repo);
    restic(&repo, &cache, &["init"], &[])?;
    cold();
    r.restic_full
        .push(restic(&repo, &cache, &["backup"], &[raw])?);
    let before = dir_bytes(&repo);
    let (offsets, pattern) = dirty_offsets(cfg.disk_size, DIRTY, 1000 + run_no as u64);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(raw)?;
    let mut saved = Vec::with_capacity(offsets.len());
    let mut buf = vec![0u8; WRITE as usize];
    for &off in &offsets {
        file.read_exact_at(&mut buf, off)?;
        saved.push(buf.clone());
        file.write_all_at(&vec![pattern; WRITE as usize], off)?;
    }
    file.sync_all()?;
    let result = async {
        cold();
        r.restic_inc
            .push(restic(&repo, &cache, &["backup"], &[raw])?);
        r.restic_inc_stored.push(dir_bytes(&repo) - before);
        let target = work.join("restic-restore");
        cold();
        r.restic_restore.push(restic(
            &repo,
            &cache,
            &["restore", "latest", "--target"],
            &[&target],
        )?);
        let _ = std::fs::remove_dir_all(&target);
        anyhow::Ok(())
    }
    .await;
    for (off, data) in offsets.iter().zip(&saved) {
        file.write_all_at(data, *off)?;
    }
    file.sync_all()?;
    let _ = std::fs::remove_dir_all(&repo);
    result
}

/// Section 7's targets. Speeds against restic use the end-to-end rows of
/// section 5 (`kubectl apply` → `Succeeded` into the directory repository):
/// restic's figure is its whole command, so Cairn's must be too.
pub fn targets(r: &RepoResults, c: &super::control::ControlResults) -> Vec<super::targets::Target> {
    use super::targets::{at_most, single, speed};
    let mut t = vec![
        speed(
            "repository",
            "repository full (directory), library path, ≥ 0.8× `nbdcopy` of the same export",
            &r.full_dir,
            &r.full_nbdcopy,
            0.8,
        ),
        at_most(
            "repository",
            "repository incremental 1 % ≤ 1.5 s (library path, directory)",
            &r.inc_dir,
            1.5,
            1.0,
            "s",
        ),
    ];
    let over = r
        .inc_bytes_read
        .iter()
        .zip(&r.dirty_chunk_bytes)
        .map(|(read, due)| read.saturating_sub(*due))
        .max();
    t.push(single(
        "repository",
        "incremental reads ≤ dirty bytes rounded up to chunks (every run)",
        over.map_or("–".into(), |b| {
            format!("{:.1} MiB over, at most", b as f64 / MIB as f64)
        }),
        over.map(|b| b == 0),
    ));
    t.push(speed(
        "repository",
        "repository restore to raw (library path) ≥ 0.8× `qemu-img convert` qcow2 → raw",
        &r.restore_dir,
        &r.restore_convert,
        0.8,
    ));
    t.push(speed(
        "control",
        "repository incremental 1 %, `kubectl apply` → `Succeeded`, ≥ 5× faster than restic's `backup`",
        &c.e2e_repo_inc,
        &r.restic_inc,
        5.0,
    ));
    t.push(speed(
        "control",
        "repository full, `kubectl apply` → `Succeeded`, not slower than restic's `backup`",
        &c.e2e_repo_full,
        &r.restic_full,
        1.0,
    ));
    let share = r
        .clone
        .map(|c| c.added as f64 * 100.0 / c.size.max(1) as f64);
    t.push(single(
        "repository",
        "a clone of the same base adds < 5 % of its size",
        share.map_or("–".into(), |v| format!("{v:.3} %")),
        share.map(|v| v < 5.0),
    ));
    let stored = Samples(r.inc_stored_s3.iter().map(|&b| b as f64).collect());
    let per = stored.median().map(|m| m / r.dirty_bytes.max(1) as f64);
    t.push(single(
        "repository",
        "stored bytes per dirty byte ≤ 8 (1 % of 64 KiB writes, S3)",
        per.map_or("–".into(), |v| format!("{v:.2}")),
        per.map(|v| v <= 8.0),
    ));
    let (n, b) = r
        .inc_objects_s3
        .iter()
        .fold((0u64, 0u64), |(n, b), (x, y)| (n + x, b + y));
    let avg = (n > 0).then(|| b as f64 / n as f64);
    t.push(single(
        "repository",
        "S3 objects written by the incremental average ≥ 4 MiB",
        avg.map_or("–".into(), |v| format!("{:.2} MiB", v / MIB as f64)),
        avg.map(|v| v >= (4 * MIB) as f64),
    ));
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_rounded_up_to_the_chunks_they_touch() {
        let cs = 256 << 10;
        // Two writes in one chunk, one straddling two chunks.
        assert_eq!(chunk_bytes_touched(&[0, WRITE], cs), cs);
        assert_eq!(chunk_bytes_touched(&[cs - 4096], cs), 2 * cs);
        assert_eq!(chunk_bytes_touched(&[], cs), 0);
    }
}
