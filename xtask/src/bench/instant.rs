//! The instant-recovery section: a repository snapshot of the bench disk
//! served over NBD by the agent's `SnapshotSource` (what `mode: Instant`
//! runs), a guest's first read through it, and a VM's `block-stream` of the
//! whole disk into a local overlay, against a copy restore of the same
//! snapshot (`restore_disk`, what `mode: Copy` runs).

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use cairn_agent::controller::instant::SnapshotSource;
use cairn_nbd::Server;
use cairn_repo::{
    DiskReader, InitOptions, OutputFormat, Repository, RepositoryKey, StorageConfig, restore_disk,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::qemu::{BenchVm, DISK, FMT_NODE, drop_caches, run, wait_job};
use super::{Config, Samples};

/// What the instant-recovery section measured.
#[derive(Default, serde::Serialize, serde::Deserialize)]
pub struct InstantResults {
    /// Snapshot opened, export bound, first sector read by a client.
    pub ready: Samples,
    /// The first 64 MiB read through the export (cold repository).
    pub first_64: Samples,
    /// A VM's `block-stream` of the whole disk into its overlay.
    pub stream: Samples,
    /// Copy restore of the same snapshot to raw.
    pub copy: Samples,
    /// Logical size of the disk.
    pub size: u64,
}

/// A raw file as an ingest source.
struct RawFile(std::fs::File);

impl cairn_repo::ingest::DiskSource for RawFile {
    async fn read_at(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.0.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }
}

fn qemu_io_read(socket: &Path, len: &str) -> Result<f64> {
    let t = Instant::now();
    let out = Command::new("qemu-io")
        .args(["-r", "-f", "raw", "-c", &format!("read 0 {len}")])
        .arg(format!("nbd+unix:///{DISK}?socket={}", socket.display()))
        .output()?;
    ensure!(
        out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("fail"),
        "qemu-io read of the export failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(t.elapsed().as_secs_f64())
}

/// Runs the section on the bench's random base image.
pub async fn run_all(cfg: &Config, base: &Path, r: &mut InstantResults) -> Result<()> {
    let work = cfg.work.join("instant");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let result = runs(cfg, base, &work, r).await;
    let _ = std::fs::remove_dir_all(&work);
    result
}

async fn runs(cfg: &Config, base: &Path, work: &Path, r: &mut InstantResults) -> Result<()> {
    let raw = work.join("disk.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-f", "qcow2", "-O", "raw"])
        .arg(base)
        .arg(&raw))?;
    let size = std::fs::metadata(&raw)?.len();
    r.size = size;
    let repo_dir = work.join("repo");
    std::fs::create_dir_all(&repo_dir)?;
    let repo = Repository::open_or_init(
        &StorageConfig::Directory {
            path: repo_dir.clone(),
        },
        &RepositoryKey::Key(b"cairn bench instant key 0123456789abcdef".to_vec()),
        &InitOptions::default(),
    )
    .await?;
    let mut writer = repo
        .begin_snapshot(
            cairn_repo::ingest::SnapshotSpec {
                namespace: "bench".into(),
                vm: "instant".into(),
                vm_uid: None,
                backup_uid: "bench-instant".into(),
                checkpoint: None,
                base: None,
                time: None,
            },
            Default::default(),
        )
        .await?;
    writer
        .add_disk(DISK, size, &RawFile(std::fs::File::open(&raw)?), None)
        .await?;
    let snapshot = writer.commit().await?.id;
    std::fs::remove_file(&raw)?;

    let runs = if cfg.quick { 1 } else { cfg.runs };
    for run_no in 0..runs {
        eprintln!("bench: instant recovery run {}/{runs}", run_no + 1);
        // Copy restore of the same snapshot.
        let out = work.join("copy.raw");
        drop_caches();
        let t = Instant::now();
        restore_disk(&repo, &snapshot, DISK, &out, OutputFormat::Raw, false).await?;
        r.copy.push(t.elapsed().as_secs_f64());
        std::fs::remove_file(&out)?;

        // Serve: open the snapshot, bind, answer a first read.
        drop_caches();
        let socket = work.join(format!("export-{run_no}.sock"));
        let shutdown = CancellationToken::new();
        let t = Instant::now();
        let reader = DiskReader::open(&repo, &snapshot, DISK, 256).await?;
        let server =
            Server::new().with_export(DISK, "bench", Arc::new(SnapshotSource::new(reader)));
        let serving = {
            let (server, socket, token) = (server.clone(), socket.clone(), shutdown.clone());
            tokio::spawn(async move { server.serve_unix_path(&socket, token).await })
        };
        while !socket.exists() {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        tokio::task::spawn_blocking({
            let socket = socket.clone();
            move || qemu_io_read(&socket, "512")
        })
        .await??;
        r.ready.push(t.elapsed().as_secs_f64());
        // The first 64 MiB, through a fresh export (nothing cached).
        drop(server);
        shutdown.cancel();
        serving.await??;
        let shutdown = CancellationToken::new();
        let reader = DiskReader::open(&repo, &snapshot, DISK, 256).await?;
        let server =
            Server::new().with_export(DISK, "bench", Arc::new(SnapshotSource::new(reader)));
        let serving = {
            let (server, socket, token) = (server.clone(), socket.clone(), shutdown.clone());
            tokio::spawn(async move { server.serve_unix_path(&socket, token).await })
        };
        while !socket.exists() {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        drop_caches();
        let secs = tokio::task::spawn_blocking({
            let socket = socket.clone();
            move || qemu_io_read(&socket, "64M")
        })
        .await??;
        r.first_64.push(secs);

        // A VM on an overlay backed by the export streams everything in.
        let overlay = work.join(format!("overlay-{run_no}.qcow2"));
        let backing = format!(
            "json:{}",
            json!({"driver": "raw", "file": {"driver": "nbd", "server": {"type": "unix", "path": socket}, "export": DISK}})
        );
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b", &backing])
            .arg(&overlay)
            .arg(size.to_string()))?;
        let vm = BenchVm::start(
            &work.join(format!("qmp/bench/instant-{run_no}.sock")),
            "bench",
            "instant",
            &overlay,
            64,
        )
        .await?;
        drop_caches();
        let t = Instant::now();
        vm.client
            .execute_raw(
                "block-stream",
                Some(json!({"job-id": "pull", "device": FMT_NODE, "auto-dismiss": false})),
            )
            .await?;
        wait_job(&vm.client, "pull").await?;
        r.stream.push(t.elapsed().as_secs_f64());
        vm.quit().await?;
        shutdown.cancel();
        serving.await??;
        let info = Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&overlay)
            .output()?;
        let info: serde_json::Value = serde_json::from_slice(&info.stdout)?;
        ensure!(
            info.get("backing-filename").is_none(),
            "the overlay still has a backing file after the stream"
        );
        std::fs::remove_file(&overlay).context("removing the overlay")?;
    }
    Ok(())
}

/// The section's rows for BENCHMARKS.md.
pub fn render(r: &InstantResults) -> String {
    let mut out = String::new();
    if r.ready.0.is_empty() {
        return out;
    }
    let f = |v: Option<f64>| v.map_or("–".into(), |v| format!("{v:.2}"));
    let mibs = |s: &Samples| {
        s.median().map_or("–".into(), |m| {
            format!("{:.0}", r.size as f64 / m / (1 << 20) as f64)
        })
    };
    out.push_str(&format!(
        "\n## 8. Instant recovery from a repository snapshot ({} GiB of random data, encrypted directory repository)\n\n",
        r.size >> 30
    ));
    out.push_str("`mode: Instant` serves the snapshot with the agent's `SnapshotSource` (chunks fetched on demand, verified, 256-chunk cache) through Cairn's NBD server; `mode: Copy` runs `restore_disk`. Library path, no control plane.\n\n");
    out.push_str("| what | min s | median s | max s | MiB/s (median) |\n|---|---|---|---|---|\n");
    let row = |out: &mut String, what: &str, s: &Samples, rate: bool| {
        out.push_str(&format!(
            "| {what} | {} | {} | {} | {} |\n",
            f(s.min()),
            f(s.median()),
            f(s.max()),
            if rate { mibs(s) } else { "–".into() }
        ));
    };
    row(
        &mut out,
        "snapshot opened → export answers its first read",
        &r.ready,
        false,
    );
    row(
        &mut out,
        "first 64 MiB read through the export (`qemu-io`)",
        &r.first_64,
        false,
    );
    row(
        &mut out,
        "VM `block-stream` of the whole disk into its overlay",
        &r.stream,
        true,
    );
    row(
        &mut out,
        "copy restore of the same snapshot to raw (`mode: Copy`)",
        &r.copy,
        true,
    );
    if let (Some(s), Some(c)) = (r.stream.median(), r.copy.median()) {
        out.push_str(&format!(
            "\nStream ÷ copy (time): {:.2}×. The export answered {} s after the snapshot was opened (median; library path, the control plane's apply → Ready of section 5 comes on top).\n\n",
            s / c,
            f(r.ready.median())
        ));
    }
    out
}

/// Section 8's targets.
pub fn targets(r: &InstantResults) -> Vec<super::targets::Target> {
    vec![super::targets::at_most(
        "instant",
        "instant recovery: export readable ≤ 2 s (library path: snapshot opened → first read answered)",
        &r.ready,
        2.0,
        1.0,
        "s",
    )]
}
