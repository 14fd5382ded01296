//! Data-path measurements without a cluster: Cairn's library (`run_push_backup`,
//! `start_pull_export`, `cairn-agent restore`) against QEMU driven directly over
//! QMP, `qemu-img convert`, `qemu-nbd` + `nbdcopy`, on one guestless QEMU.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use cairn_agent::backup::{
    PullPolicy, PullRequest, PushRequest, ScratchReserve, TargetPolicy, run_push_backup,
    start_pull_export, stop_pull_export, verify_backup_file,
};
use cairn_agent::identity::OperationId;
use serde_json::json;

use super::qemu::{
    BenchVm, FMT_NODE, MIB, bench_qdev, copy_image, direct_backup, dirty, drop_caches, run,
};
use super::{Config, Samples};

/// Dirty fractions of the incremental section.
pub const FRACTIONS: [f64; 3] = [0.01, 0.10, 0.50];

/// Everything the data-path sections measured.
#[derive(Default, serde::Serialize, serde::Deserialize)]
pub struct DataResults {
    /// Full push: Cairn library.
    pub full_cairn: Samples,
    /// After it, separately: the verification step (`verify_backup`).
    pub full_checksum: Samples,
    /// Full push: QEMU blockdev-backup over QMP.
    pub full_qemu: Samples,
    /// `qemu-img convert -t none -T none`.
    pub full_convert: Samples,
    /// Incremental per fraction: Cairn library.
    pub inc_cairn: [Samples; 3],
    /// After it, separately: the verification step (`verify_backup`).
    pub inc_checksum: [Samples; 3],
    /// Incremental per fraction: QEMU's own job.
    pub inc_qemu: [Samples; 3],
    /// Restore: `cairn-agent restore`.
    pub restore_cairn: Samples,
    /// Restore: `qemu-img convert` of the chain.
    pub restore_convert: Samples,
    /// Pull: start_pull_export (full) until ready.
    pub pull_ready: Samples,
    /// Pull: start_pull_export (incremental) until ready.
    pub pull_ready_inc: Samples,
    /// Pull: nbdcopy of the full export.
    pub pull_read_full: Samples,
    /// Pull: dirty extents (10 %) only.
    pub pull_read_dirty: Samples,
    /// Bytes of the dirty read.
    pub pull_dirty_bytes: u64,
    /// qemu-nbd: until the export answers.
    pub qemu_nbd_ready: Samples,
    /// qemu-nbd: nbdcopy of the whole image.
    pub qemu_nbd_read: Samples,
    /// Whether the page cache was dropped before timed steps.
    pub cold_cache: bool,
    /// Whether `qemu-nbd` read with `--cache=none` (runs before 2026-12-01
    /// 03:37 UTC read through the page cache).
    #[serde(default)]
    pub qemu_nbd_direct: bool,
}

fn agent_binary() -> PathBuf {
    cairn_e2e::local_cluster::binary("cairn-agent")
}

fn cold(results: &mut DataResults) {
    results.cold_cache = drop_caches();
}

/// Runs sections 1 (library, QEMU, convert), 2 (Cairn and QEMU), 3, 4 and 6.
pub async fn run_all(cfg: &Config, base: &Path, r: &mut DataResults) -> Result<()> {
    let work = cfg.work.join("data");
    let _ = std::fs::remove_dir_all(&work);
    // Backups of namespace `bench` go in <root>/bench/.
    let out = work.join("out").join("bench");
    std::fs::create_dir_all(&out)?;
    let policy = TargetPolicy::new([work.join("out")]);
    let image = work.join("vm.qcow2");
    copy_image(base, &image)?;
    let vm = BenchVm::start(&work.join("qmp/bench/lib.sock"), "bench", "lib", &image, 64).await?;
    let size = cfg.disk_size;
    let qdev = bench_qdev();

    for run_no in 0..cfg.runs {
        eprintln!("bench: data path run {}/{}", run_no + 1, cfg.runs);
        // 1. Full push: the library and QEMU's own job take turns going first,
        // so neither always runs right after the previous round's deletes.
        let library_first = run_no % 2 == 0;
        for library in [library_first, !library_first] {
            cold(r);
            if library {
                let dir = out.join(format!("full-{run_no}"));
                let t = Instant::now();
                let done = run_push_backup(
                    &vm.client,
                    &vm.vm,
                    &policy,
                    &push_request(&format!("full-{run_no}"), &dir, None, None),
                )
                .await?;
                r.full_cairn.push(t.elapsed().as_secs_f64());
                cold(r);
                let t = Instant::now();
                verify_backup_file(&done.manifest_path).await?;
                r.full_checksum.push(t.elapsed().as_secs_f64());
                std::fs::remove_dir_all(&dir)?;
            } else {
                let target = out.join(format!("direct-{run_no}.qcow2"));
                let t = Instant::now();
                direct_backup(&vm.client, size, &target, None, "full").await?;
                r.full_qemu.push(t.elapsed().as_secs_f64());
                std::fs::remove_file(&target)?;
            }
        }

        cold(r);
        let target = out.join(format!("convert-{run_no}.qcow2"));
        let t = Instant::now();
        run(Command::new("qemu-img")
            .args([
                "convert", "-t", "none", "-T", "none", "-f", "qcow2", "-O", "qcow2",
            ])
            .arg(base)
            .arg(&target))?;
        r.full_convert.push(t.elapsed().as_secs_f64());
        std::fs::remove_file(&target)?;

        // 2. Incrementals 1 %, 10 %, 50 %: a chain full + 3 incrementals (reused by 4).
        let chain = out.join(format!("chain-{run_no}"));
        let cp = |i: usize| format!("c{run_no}-{i}");
        let raw = |i: usize| format!("raw{run_no}-{i}");
        let first = run_push_backup(
            &vm.client,
            &vm.vm,
            &policy,
            &push_request(&format!("chain{run_no}-0"), &chain, None, Some(cp(0))),
        )
        .await?;
        verify_backup_file(&first.manifest_path).await?;
        // The newest backup of the chain: its manifest (named with the
        // operation's identity) and its file.
        let mut newest_manifest = first.manifest_path.clone();
        let mut newest_file = chain.join(&first.manifest.disks[0].file);
        add_bitmap(&vm, &raw(0)).await?;
        let mut prev_direct = out.join(format!("chain-direct-{run_no}-0.qcow2"));
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&prev_direct)
            .arg(size.to_string()))?;
        for (i, f) in FRACTIONS.iter().enumerate() {
            dirty(&vm.writer, &qdev, size, *f, (run_no * 10 + i) as u64 + 1).await?;
            cold(r);
            let direct = out.join(format!("chain-direct-{run_no}-{}.qcow2", i + 1));
            let t = Instant::now();
            direct_backup(
                &vm.client,
                size,
                &direct,
                Some(&prev_direct),
                &format!("bitmap:{}", raw(i)),
            )
            .await?;
            r.inc_qemu[i].push(t.elapsed().as_secs_f64());
            prev_direct = direct;

            cold(r);
            let name = format!("chain{run_no}-{}", i + 1);
            let t = Instant::now();
            let done = run_push_backup(
                &vm.client,
                &vm.vm,
                &policy,
                &push_request(&name, &chain, Some(cp(i)), Some(cp(i + 1))),
            )
            .await?;
            r.inc_cairn[i].push(t.elapsed().as_secs_f64());
            newest_manifest = done.manifest_path.clone();
            newest_file = chain.join(&done.manifest.disks[0].file);
            // Same moment as the new checkpoint: no guest writes in between.
            remove_bitmap(&vm, &raw(i)).await?;
            add_bitmap(&vm, &raw(i + 1)).await?;
            cold(r);
            let t = Instant::now();
            verify_backup_file(&done.manifest_path).await?;
            r.inc_checksum[i].push(t.elapsed().as_secs_f64());
        }
        remove_bitmap(&vm, &raw(FRACTIONS.len())).await?;

        // 4. Restore of full + 3 incrementals.
        let manifest = newest_manifest;
        let newest = newest_file;
        let restored = out.join("restore.qcow2");
        cold(r);
        let t = Instant::now();
        run(Command::new(agent_binary())
            .args(["restore", "--format", "qcow2", "--manifest"])
            .arg(&manifest)
            .arg("--output")
            .arg(&restored))?;
        r.restore_cairn.push(t.elapsed().as_secs_f64());
        std::fs::remove_file(&restored)?;
        cold(r);
        let t = Instant::now();
        run(Command::new("qemu-img")
            .args([
                "convert",
                "-t",
                "none",
                "-T",
                "writeback",
                "-f",
                "qcow2",
                "-O",
                "qcow2",
            ])
            .arg(&newest)
            .arg(&restored))?;
        r.restore_convert.push(t.elapsed().as_secs_f64());
        std::fs::remove_file(&restored)?;
        std::fs::remove_dir_all(&chain)?;
        for i in 0..=FRACTIONS.len() {
            let _ = std::fs::remove_file(out.join(format!("chain-direct-{run_no}-{i}.qcow2")));
            let _ = vm.client.remove_bitmap(FMT_NODE, &cp(i)).await;
        }

        // 3. Pull.
        pull_run(cfg, &vm, &policy, &out, base, run_no, r).await?;

        // 6. Guest impact: the guest section (a real guest writes from inside).
    }
    vm.quit().await?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

fn push_request(
    name: &str,
    dir: &Path,
    incremental: Option<String>,
    checkpoint: Option<String>,
) -> PushRequest {
    PushRequest {
        operation: OperationId::new(format!("bench-{name}")),
        name: name.into(),
        disks: None,
        incremental,
        incremental_uid: None,
        new_checkpoint: checkpoint,
        new_checkpoint_uid: None,
        target_dir: dir.to_path_buf(),
        fallback_to_full: false,
        standalone_incremental: false,
        speed_limit: None,
        quiesce: None,
    }
}

async fn add_bitmap(vm: &BenchVm, name: &str) -> Result<()> {
    vm.client
        .execute_raw(
            "block-dirty-bitmap-add",
            Some(json!({"node": FMT_NODE, "name": name, "persistent": false})),
        )
        .await?;
    Ok(())
}

async fn remove_bitmap(vm: &BenchVm, name: &str) -> Result<()> {
    vm.client
        .execute_raw(
            "block-dirty-bitmap-remove",
            Some(json!({"node": FMT_NODE, "name": name})),
        )
        .await?;
    Ok(())
}

async fn pull_run(
    cfg: &Config,
    vm: &BenchVm,
    policy: &TargetPolicy,
    out: &Path,
    base: &Path,
    run_no: usize,
    r: &mut DataResults,
) -> Result<()> {
    let _ = policy;
    // The node's roots exist before the agent runs (its DaemonSet's host paths).
    std::fs::create_dir_all(out.join("exports"))?;
    std::fs::create_dir_all(out.join("scratch"))?;
    let pull = PullPolicy {
        export_dir: out.join("exports"),
        socket_group: None,
        scratch_dir: out.join("scratch"),
        scratch_reserve: ScratchReserve::Allocated,
        cbw_timeout_seconds: 30,
        tcp: Default::default(),
    };
    let base_cp = format!("pull{run_no}");
    let request = |id: &str, inc: Option<String>, new: Option<String>| PullRequest {
        operation: OperationId::new(format!("bench-pull-{run_no}-{id}")),
        name: format!("pull-{run_no}-{id}"),
        disks: None,
        incremental: inc,
        new_checkpoint: new,
        socket: None,
        fallback_to_full: false,
        quiesce: None,
        tcp: None,
    };
    cold(r);
    let full = request("full", None, Some(base_cp.clone()));
    let t = Instant::now();
    let export = start_pull_export(&vm.client, &vm.vm, &pull, &full).await?;
    r.pull_ready.push(t.elapsed().as_secs_f64());
    let url = export.disks[0].url.clone();
    let t = Instant::now();
    run(Command::new("nbdcopy").arg(&url).arg("null:"))?;
    r.pull_read_full.push(t.elapsed().as_secs_f64());
    stop_pull_export(&vm.client, &full.operation, &pull, &vm.vm, None, &full.name).await?;

    dirty(
        &vm.writer,
        &bench_qdev(),
        cfg.disk_size,
        0.10,
        99 + run_no as u64,
    )
    .await?;
    cold(r);
    let inc = request("inc", Some(base_cp.clone()), None);
    let t = Instant::now();
    let export = start_pull_export(&vm.client, &vm.vm, &pull, &inc).await?;
    r.pull_ready_inc.push(t.elapsed().as_secs_f64());
    let d = &export.disks[0];
    let script = super::dirty_read_script(&cfg.work)?;
    let t = Instant::now();
    let bytes = run(Command::new("/usr/bin/python3")
        .arg(&script)
        .arg(&d.url)
        .arg(d.bitmap_context.as_deref().context("no bitmap context")?))?;
    r.pull_read_dirty.push(t.elapsed().as_secs_f64());
    r.pull_dirty_bytes = bytes.trim().parse().unwrap_or(0);
    stop_pull_export(&vm.client, &inc.operation, &pull, &vm.vm, None, &inc.name).await?;
    let _ = vm.client.remove_bitmap(FMT_NODE, &base_cp).await;

    // Plain qemu-nbd on the same image.
    cold(r);
    let sock = out.join(format!("qemu-nbd-{run_no}.sock"));
    let t = Instant::now();
    r.qemu_nbd_direct = true;
    let mut child = Command::new("qemu-nbd")
        .args([
            "-r",
            "-t",
            "--cache=none",
            "-f",
            "qcow2",
            "-x",
            "disk",
            "-k",
        ])
        .arg(&sock)
        .arg(base)
        .spawn()?;
    let url = format!("nbd+unix:///disk?socket={}", sock.display());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ok = Command::new("nbdinfo")
            .arg("--size")
            .arg(&url)
            .output()
            .is_ok_and(|o| o.status.success());
        if ok || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    r.qemu_nbd_ready.push(t.elapsed().as_secs_f64());
    let t = Instant::now();
    let res = run(Command::new("nbdcopy").arg(&url).arg("null:"));
    r.qemu_nbd_read.push(t.elapsed().as_secs_f64());
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&sock);
    res.map(drop)
}

/// Megabytes.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}
