//! The guest section: a real Linux guest (the e2e rig, TCG) writes random
//! 4 KiB blocks with `O_DIRECT|O_DSYNC` into a file on its ext4 data disk
//! (`cairn-iowriter`, e2e/tools/iowriter.c), idle and while Cairn's full push
//! backup of that disk runs, with the disk's I/O in the main loop and in an
//! iothread; then the time a quiesce holds the guest frozen (freeze →
//! checkpoint transaction → thaw through qemu-ga) over 20 runs.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use cairn_agent::backup::{PushRequest, TargetPolicy, start_push_backup};
use cairn_agent::checkpoint::{CheckpointRequest, create_checkpoint, delete_checkpoint};
use cairn_agent::identity::OperationId;
use cairn_agent::inventory::VmRef;
use cairn_agent::qga::{GuestAgent, socket_beside};
use cairn_agent::qmp::{QmpClient, QmpOptions};
use cairn_e2e::guest::{GuestImage, GuestMode, GuestOptions, GuestVm, make_data_disk};

use super::{Config, Samples};

/// Writes per second and latency of one writer run.
#[derive(Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct Writes {
    /// Writes per second.
    pub iops: Samples,
    /// Median latency, µs.
    pub p50_us: Samples,
    /// 99th percentile latency, µs.
    pub p99_us: Samples,
}

/// One disk configuration.
#[derive(Default, serde::Serialize, serde::Deserialize)]
pub struct Impact {
    /// Idle.
    pub idle: Writes,
    /// While the backup job ran (the writer's 100 ms buckets inside the job).
    pub during: Samples,
    /// Backup job seconds.
    pub job_secs: Samples,
}

/// What the guest section measured.
#[derive(Default, serde::Serialize, serde::Deserialize)]
pub struct GuestResults {
    /// Accelerator the guest ran on.
    pub accel: String,
    /// Data disk size.
    pub disk_mib: u64,
    /// The writer's file size.
    pub file_mib: u64,
    /// Disk I/O in QEMU's main loop.
    pub main_loop: Impact,
    /// Disk I/O in an iothread.
    pub iothread: Impact,
    /// Freeze → thaw, ms, of quiesced checkpoints.
    pub freeze_ms: Samples,
}

const WRITER_SECS: u64 = 25;

/// The writer's 100 ms buckets (start ms, writes), IOPS, p50 and p99 µs.
type WriterRun = (Vec<(u64, u64)>, f64, f64, f64);

fn parse_writer(out: &str) -> Result<WriterRun> {
    let mut buckets = Vec::new();
    let mut summary = None;
    for line in out.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["b", ms, n] => buckets.push((ms.parse()?, n.parse()?)),
            ["iops", iops, "p50_us", p50, "p99_us", p99, ..] => {
                summary = Some((iops.parse()?, p50.parse()?, p99.parse()?));
            }
            _ => {}
        }
    }
    let (iops, p50, p99) = summary.with_context(|| format!("writer printed no summary: {out}"))?;
    Ok((buckets, iops, p50, p99))
}

fn run_writer(vm: &GuestVm, file_mib: u64, secs: u64) -> Result<String> {
    let out = vm.agent()?.exec(
        "/bin/cairn-iowriter",
        &["/data/iobench", &file_mib.to_string(), &secs.to_string()],
    )?;
    ensure!(
        out.exit_code == 0,
        "cairn-iowriter failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn impact(cfg: &Config, iothread: bool, r: &mut GuestResults) -> Result<Impact> {
    let tag = if iothread { "iothread" } else { "mainloop" };
    let dir = cfg.work.join(format!("guest-{tag}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    // The data disk carries the writer's file, filled with random data on
    // the host, so the backup has it all to copy while the guest writes.
    let seed = dir.join("seed");
    std::fs::create_dir_all(&seed)?;
    let status = std::process::Command::new("dd")
        .args(["if=/dev/urandom", "bs=1M", "status=none"])
        .arg(format!("of={}", seed.join("iobench").display()))
        .arg(format!("count={}", r.file_mib))
        .status()?;
    ensure!(status.success(), "dd failed");
    let disk = make_data_disk(
        "disk0",
        &dir.join("vm-disk0.qcow2"),
        r.disk_mib << 20,
        "qcow2",
        Some(&seed),
    )?;
    std::fs::remove_dir_all(&seed)?;
    let qmp_root = dir.join("qmp");
    let vm = GuestVm::start(
        &qmp_root,
        "bench",
        "guest",
        &dir,
        disk,
        GuestOptions {
            mode: GuestMode::Idle,
            iothread,
            ..GuestOptions::default()
        },
    )?;
    vm.wait_ready(Duration::from_secs(300))?;
    r.accel = vm.accel.as_str().to_string();
    let vmref = VmRef {
        namespace: "bench".into(),
        name: "guest".into(),
        socket: vm.agent_socket.clone(),
    };
    let client = QmpClient::connect(&vmref.socket, QmpOptions::default()).await?;
    let policy = TargetPolicy::new(vec![dir.join("backup")]);
    let mut result = Impact::default();
    let vm = std::sync::Arc::new(vm);
    for run_no in 0..cfg.runs {
        let (_, iops, p50, p99) = parse_writer(&{
            let vm = vm.clone();
            let file = r.file_mib;
            tokio::task::spawn_blocking(move || run_writer(&vm, file, 5)).await??
        })?;
        result.idle.iops.push(iops);
        result.idle.p50_us.push(p50);
        result.idle.p99_us.push(p99);

        // The writer runs WRITER_SECS; the backup starts 3 s in.
        let writer = {
            let vm = vm.clone();
            let file = r.file_mib;
            tokio::task::spawn_blocking(move || run_writer(&vm, file, WRITER_SECS))
        };
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let target = dir
            .join("backup")
            .join("bench")
            .join(format!("run-{run_no}"));
        let request = PushRequest {
            operation: OperationId::new(format!("guest-{tag}-{run_no}")),
            name: format!("impact-{run_no}"),
            disks: None,
            incremental: None,
            incremental_uid: None,
            new_checkpoint: None,
            new_checkpoint_uid: None,
            target_dir: target.clone(),
            fallback_to_full: false,
            standalone_incremental: false,
            speed_limit: None,
            quiesce: None,
        };
        std::fs::create_dir_all(dir.join("backup").join("bench"))?;
        let started = t0.elapsed();
        let running = start_push_backup(&client, &vmref, &policy, &request).await?;
        running.wait().await?;
        let ended = t0.elapsed();
        result.job_secs.push((ended - started).as_secs_f64());
        let (buckets, _, _, _) = parse_writer(&writer.await??)?;
        // Buckets wholly inside the job (the writer started about when t0 did).
        let (lo, hi) = (started.as_millis() as u64, ended.as_millis() as u64);
        let inside: Vec<u64> = buckets
            .iter()
            .filter(|(ms, _)| *ms >= lo && ms + 100 <= hi)
            .map(|(_, n)| *n)
            .collect();
        ensure!(
            !inside.is_empty(),
            "the backup ({:.2} s) ended before a whole 100 ms bucket",
            (ended - started).as_secs_f64()
        );
        result
            .during
            .push(inside.iter().sum::<u64>() as f64 / (inside.len() as f64 * 0.1));
        std::fs::remove_dir_all(&target)?;
    }
    if iothread {
        // Quiesce: freeze → one-bitmap transaction → thaw, as a checkpoint does.
        let agent = GuestAgent::new(
            "bench/guest",
            socket_beside(&vmref.socket),
            Duration::from_secs(10),
        );
        for i in 0..20 {
            let request = CheckpointRequest {
                name: format!("q{i}"),
                disks: None,
            };
            let (created, report) = agent
                .quiesced(create_checkpoint(&client, &vmref, &request))
                .await?;
            created?;
            ensure!(report.thaw_error.is_none(), "{report:?}");
            r.freeze_ms.push(report.frozen_for.as_secs_f64() * 1000.0);
            delete_checkpoint(&client, &vmref, &request.name, None).await?;
        }
    }
    drop(client);
    if let Ok(mut vm) = std::sync::Arc::try_unwrap(vm) {
        vm.quit()?;
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(result)
}

/// Runs the section.
pub async fn run_all(cfg: &Config, r: &mut GuestResults) -> Result<()> {
    GuestImage::ensure()?;
    r.disk_mib = if cfg.quick { 1024 } else { 2048 };
    r.file_mib = r.disk_mib * 3 / 4;
    r.main_loop = impact(cfg, false, r).await?;
    r.iothread = impact(cfg, true, r).await?;
    Ok(())
}

/// The section's rows for BENCHMARKS.md.
pub fn render(r: &GuestResults) -> String {
    let mut out = String::new();
    if r.main_loop.idle.iops.0.is_empty() {
        return out;
    }
    let f = |v: Option<f64>, d: usize| v.map_or("–".into(), |v| format!("{v:.d$}"));
    out.push_str(&format!(
        "\n## 9. Guest impact with a real guest ({} GiB data disk, {} MiB written file, guest on {})\n\n",
        r.disk_mib >> 10,
        r.file_mib,
        r.accel.to_uppercase()
    ));
    out.push_str("Inside the guest, `cairn-iowriter` writes one 4 KiB block at a time at random offsets of a file on its ext4 disk with `O_DIRECT|O_DSYNC` (each write reaches the virtual disk); *during* counts its writes in the 100 ms buckets that lie wholly inside Cairn's full push backup job of that disk (library path, `blockdev-backup` into a qcow2). The guest runs under TCG here (KVM hangs this kernel on these machines), so absolute IOPS are the emulator's; the ratio is the point.\n\n");
    out.push_str("| disk I/O in | idle IOPS (min / median / max) | idle p50 / p99 µs (median) | during backup IOPS (min / median / max) | backup s (median) | during ÷ idle (median; ratio of mins) |\n|---|---|---|---|---|---|\n");
    for (what, i) in [
        ("QEMU main loop", &r.main_loop),
        ("an iothread", &r.iothread),
    ] {
        let ratio = match (i.during.median(), i.idle.iops.median()) {
            (Some(d), Some(idle)) if idle > 0.0 => format!(
                "{:.2} ({:.2})",
                d / idle,
                i.during.min().unwrap_or(0.0) / i.idle.iops.min().unwrap_or(1.0)
            ),
            _ => "–".into(),
        };
        out.push_str(&format!(
            "| {what} | {} / {} / {} | {} / {} | {} / {} / {} | {} | {ratio} |\n",
            f(i.idle.iops.min(), 0),
            f(i.idle.iops.median(), 0),
            f(i.idle.iops.max(), 0),
            f(i.idle.p50_us.median(), 0),
            f(i.idle.p99_us.median(), 0),
            f(i.during.min(), 0),
            f(i.during.median(), 0),
            f(i.during.max(), 0),
            f(i.job_secs.median(), 2),
        ));
    }
    out.push_str(&format!(
        "\nQuiesce, freeze → checkpoint transaction → thaw through qemu-ga, {} runs: min {} ms, p50 {} ms, max {} ms.\n\n",
        r.freeze_ms.0.len(),
        f(r.freeze_ms.min(), 1),
        f(r.freeze_ms.median(), 1),
        f(r.freeze_ms.max(), 1),
    ));
    out
}

/// Section 9's targets.
pub fn targets(r: &GuestResults) -> Vec<super::targets::Target> {
    use super::targets::{Target, at_most};
    let i = &r.iothread;
    let med = i
        .during
        .median()
        .zip(i.idle.iops.median())
        .map(|(d, i)| d / i);
    let min = i.during.min().zip(i.idle.iops.min()).map(|(d, i)| d / i);
    let pct = |v: Option<f64>| v.map_or("–".into(), |v| format!("{:.0} %", v * 100.0));
    vec![
        Target {
            section: "guest",
            what: "guest writes during a full backup ≥ 50 % of idle IOPS (iothread)".into(),
            median: pct(med),
            second: format!("{} (ratio of minimums)", pct(min)),
            met_median: med.map(|v| v >= 0.5),
            met_second: Some(min.is_some_and(|v| v >= 0.5)),
        },
        at_most(
            "guest",
            "quiesce: freeze → transaction → thaw ≤ 100 ms",
            &Samples(r.freeze_ms.0.iter().map(|v| v / 1e3).collect()),
            0.1,
            1e3,
            "ms",
        ),
    ]
}
