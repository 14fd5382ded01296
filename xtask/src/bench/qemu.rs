//! Guestless QEMUs and images for the benchmarks: a random-filled qcow2 base
//! image, copies of it, a QEMU with one virtio disk and two monitors (one
//! for the code under test, one for simulated guest writes), and timing helpers.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use cairn_agent::inventory::VmRef;
use cairn_agent::qmp::{QmpClient, QmpOptions};
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

/// One mebibyte.
pub const MIB: u64 = 1 << 20;
/// The granularity of simulated guest writes.
pub const WRITE: u64 = 64 << 10;

/// QMP options with room for long block commands.
pub fn qmp_options() -> QmpOptions {
    QmpOptions {
        command_timeout: Duration::from_secs(600),
        ..QmpOptions::default()
    }
}

/// Runs a command, failing with its stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Drops the page cache (root only) so every run starts cold; false when not allowed.
pub fn drop_caches() -> bool {
    let _ = Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "1").is_ok()
}

/// A qcow2 image of `size` bytes filled with pseudo-random (incompressible) data,
/// made once per size in `dir` (raw file from `/dev/urandom`, then converted).
pub fn random_base_image(dir: &Path, size: u64) -> Result<PathBuf> {
    let path = dir.join(format!("base-{}m.qcow2", size / MIB));
    if path.exists() {
        return Ok(path);
    }
    let raw = dir.join("base.raw.tmp");
    // The kernel's CSPRNG is fast enough (hundreds of MiB/s) and needs no optimised build.
    run(Command::new("dd")
        .arg("if=/dev/urandom")
        .arg(format!("of={}", raw.display()))
        .args(["bs=4M", "iflag=fullblock", "status=none"])
        .arg(format!("count={}", size / (4 * MIB))))?;
    let tmp = dir.join("base.qcow2.tmp");
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&tmp))?;
    std::fs::remove_file(&raw)?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// Copies an image (a plain byte copy of the qcow2 file).
pub fn copy_image(from: &Path, to: &Path) -> Result<()> {
    let _ = std::fs::remove_file(to);
    run(Command::new("cp").arg("--sparse=always").arg(from).arg(to))?;
    Ok(())
}

/// A running guestless QEMU with one virtio-blk disk `disk0`.
pub struct BenchVm {
    /// Cairn's view of it.
    pub vm: VmRef,
    /// Session on the monitor the code under test uses.
    pub client: QmpClient,
    /// Session on the private monitor for simulated guest writes.
    pub writer: QmpClient,
    /// When the main monitor first accepted a connection.
    pub listening_at: Instant,
    child: Option<Child>,
}

/// Disk device id of every bench VM.
pub const DISK: &str = "disk0";
/// Format node of the disk.
pub const FMT_NODE: &str = "disk0-fmt";

impl BenchVm {
    /// Starts QEMU on `image` with its main QMP socket at `socket`
    /// (`<root>/<namespace>/<name>.sock` when an agent should find it).
    pub async fn start(
        socket: &Path,
        namespace: &str,
        name: &str,
        image: &Path,
        memory_mib: u32,
    ) -> Result<Self> {
        Self::launch(socket, namespace, name, image, memory_mib, true, false).await
    }

    async fn launch(
        socket: &Path,
        namespace: &str,
        name: &str,
        image: &Path,
        memory_mib: u32,
        connect_main: bool,
        paused: bool,
    ) -> Result<Self> {
        std::fs::create_dir_all(socket.parent().context("socket dir")?)?;
        // Not `*.sock`: an agent watching the directory must not take this monitor.
        let private = socket.with_extension("writer");
        let _ = std::fs::remove_file(socket);
        let _ = std::fs::remove_file(&private);
        let log = std::fs::File::create(socket.with_extension("qemu.log"))?;
        let child = Command::new("qemu-system-x86_64")
            .args([
                "-machine",
                "q35,accel=kvm:tcg",
                "-nodefaults",
                "-display",
                "none",
            ])
            .args(["-m", &memory_mib.to_string()])
            .args(paused.then_some("-S"))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", socket.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", private.display()))
            .arg("-blockdev")
            .arg(format!(
                "driver=file,filename={},node-name={DISK}-file,cache.direct=on",
                image.display()
            ))
            .arg("-blockdev")
            .arg(format!(
                "driver=qcow2,file={DISK}-file,node-name={FMT_NODE}"
            ))
            .arg("-device")
            .arg(format!("virtio-blk-pci,drive={FMT_NODE},id={DISK}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting qemu-system-x86_64")?;
        // From here on a failure must not leave QEMU running.
        let mut vm = Self {
            vm: VmRef {
                namespace: namespace.into(),
                name: name.into(),
                socket: socket.to_path_buf(),
            },
            client: QmpClient::spawn("/nonexistent", qmp_options()),
            writer: QmpClient::spawn("/nonexistent", qmp_options()),
            listening_at: Instant::now(),
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        // The files appear at bind(); QEMU accepts only after listen().
        let listening = |p: &Path| std::os::unix::net::UnixStream::connect(p).is_ok();
        while !listening(socket) {
            ensure!(Instant::now() < deadline, "QEMU did not create its sockets");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        vm.listening_at = Instant::now();
        while !listening(&private) {
            ensure!(Instant::now() < deadline, "QEMU did not create its sockets");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if connect_main {
            vm.client = QmpClient::connect(socket, qmp_options()).await?;
        }
        vm.writer = QmpClient::connect(&private, qmp_options()).await?;
        Ok(vm)
    }

    /// Starts QEMU with only the private monitor connected: the main socket is
    /// left for an agent to discover. `paused` never starts the CPUs (`-S`): no
    /// firmware runs, so hundreds of such VMs cost memory only.
    pub async fn start_for_agent(
        socket: &Path,
        namespace: &str,
        name: &str,
        image: &Path,
        memory_mib: u32,
        paused: bool,
    ) -> Result<Self> {
        // QEMU serves one client per monitor: leave the main one to the agent.
        Self::launch(socket, namespace, name, image, memory_mib, false, paused).await
    }

    /// The QEMU process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Clean shutdown.
    pub async fn quit(mut self) -> Result<()> {
        let _ = self.writer.execute_raw("quit", None).await;
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
        Ok(())
    }
}

impl Drop for BenchVm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One simulated guest write through HMP `qemu-io` on `qdev`'s virtio backend.
pub async fn guest_write(
    writer: &QmpClient,
    qdev: &str,
    pattern: u8,
    offset: u64,
    len: u64,
) -> Result<()> {
    let cmd = format!("qemu-io -d {qdev} \"write -P 0x{pattern:02x} {offset} {len}\"");
    let out = writer.hmp(&cmd).await?;
    let lower = out.to_lowercase();
    if lower.contains("fail") || lower.contains("error") {
        bail!("qemu-io failed: {out}");
    }
    Ok(())
}

/// The offsets [`dirty`] writes for `(size, fraction, seed)`: distinct
/// random 64 KiB clusters, and the byte pattern it writes there.
pub fn dirty_offsets(size: u64, fraction: f64, seed: u64) -> (Vec<u64>, u8) {
    let clusters = size / WRITE;
    let n = ((clusters as f64) * fraction).round() as usize;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut all: Vec<u64> = (0..clusters).collect();
    // Partial Fisher-Yates: the first n entries are a random distinct sample.
    for i in 0..n {
        let j = rng.random_range(i..all.len());
        all.swap(i, j);
    }
    all.truncate(n);
    let pattern = (seed % 250) as u8 + 1;
    (all.into_iter().map(|c| c * WRITE).collect(), pattern)
}

/// Dirties `fraction` of a `size`-byte disk with distinct random 64 KiB writes;
/// returns the bytes written.
pub async fn dirty(
    writer: &QmpClient,
    qdev: &str,
    size: u64,
    fraction: f64,
    seed: u64,
) -> Result<u64> {
    let (offsets, pattern) = dirty_offsets(size, fraction, seed);
    for &off in &offsets {
        guest_write(writer, qdev, pattern, off, WRITE).await?;
    }
    Ok(offsets.len() as u64 * WRITE)
}

/// The qdev path of a bench VM's disk backend.
pub fn bench_qdev() -> String {
    format!("/machine/peripheral/{DISK}/virtio-backend")
}

/// Waits until job `id` concluded (polling `query-jobs`, 10 ms) and dismisses it.
pub async fn wait_job(client: &QmpClient, id: &str) -> Result<()> {
    loop {
        let jobs = client.execute_raw("query-jobs", None).await?;
        let job = jobs
            .as_array()
            .into_iter()
            .flatten()
            .find(|j| j["id"] == id)
            .cloned()
            .with_context(|| format!("job {id} vanished"))?;
        if job["status"] == "concluded" {
            client
                .execute_raw("job-dismiss", Some(json!({"id": id})))
                .await?;
            if let Some(e) = job.get("error") {
                bail!("job {id} failed: {e}");
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// QEMU's own push backup, driven directly over QMP: `qemu-img create` a
/// target (optionally backed by `backing`), `blockdev-add` it with O_DIRECT,
/// `blockdev-backup`, wait, remove the node. `sync` is `full` or `bitmap:<name>`.
pub async fn direct_backup(
    client: &QmpClient,
    size: u64,
    target: &Path,
    backing: Option<&Path>,
    sync: &str,
) -> Result<()> {
    let mut create = Command::new("qemu-img");
    create.args(["create", "-q", "-f", "qcow2"]);
    if let Some(b) = backing {
        create.arg("-b").arg(b).args(["-F", "qcow2"]);
    }
    run(create.arg(target).arg(size.to_string()))?;
    let node = "bench-direct-tgt";
    client
        .execute_raw(
            "blockdev-add",
            Some(json!({
                "driver": "qcow2", "node-name": node,
                "file": {"driver": "file", "filename": target, "cache": {"direct": true}},
                "cache": {"direct": true},
                "backing": null,
            })),
        )
        .await?;
    let mut args: Value = json!({
        "job-id": "bench-direct", "device": FMT_NODE, "target": node,
        "auto-dismiss": false,
    });
    match sync.strip_prefix("bitmap:") {
        Some(b) => {
            args["sync"] = json!("bitmap");
            args["bitmap"] = json!(b);
            args["bitmap-mode"] = json!("never");
        }
        None => args["sync"] = json!("full"),
    }
    client.execute_raw("blockdev-backup", Some(args)).await?;
    wait_job(client, "bench-direct").await?;
    client
        .execute_raw("blockdev-del", Some(json!({"node-name": node})))
        .await?;
    Ok(())
}
