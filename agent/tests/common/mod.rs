//! Test fixtures: a guestless QEMU with qcow2/raw disks, guest writes through
//! HMP `qemu-io`, and an in-memory model of each disk's expected content.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cairn_agent::inventory::VmRef;
use cairn_agent::qmp::{QmpClient, QmpOptions};

pub const MIB: u64 = 1 << 20;

/// A disk of the test VM.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    pub id: String,
    pub format: &'static str,
    pub size: u64,
    pub path: PathBuf,
}

/// A guestless QEMU owning some disks, with its QMP socket in the discovery layout.
pub struct TestVm {
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
    pub vm: VmRef,
    pub disks: Vec<DiskSpec>,
    pub client: QmpClient,
    child: Option<Child>,
}

pub fn fast_options() -> QmpOptions {
    QmpOptions {
        command_timeout: Duration::from_secs(5),
        handshake_timeout: Duration::from_secs(3),
        reconnect: true,
        backoff_initial: Duration::from_millis(50),
        backoff_max: Duration::from_millis(500),
        event_capacity: 1024,
    }
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

impl TestVm {
    /// Creates images (`(id, format, size)`) in a fresh directory and starts QEMU.
    pub async fn start(name: &str, disks: &[(&str, &'static str, u64)]) -> TestVm {
        init_tracing();
        let dir = tempfile::Builder::new()
            .prefix("cairn-test-")
            .tempdir()
            .unwrap();
        let root = dir.path().join("qmp");
        std::fs::create_dir_all(root.join("default")).unwrap();
        let mut specs = Vec::new();
        for (id, format, size) in disks {
            let path = dir.path().join(format!("{id}.{format}"));
            let st = Command::new("qemu-img")
                .args(["create", "-q", "-f", format])
                .arg(&path)
                .arg(size.to_string())
                .status()
                .unwrap();
            assert!(st.success());
            specs.push(DiskSpec {
                id: id.to_string(),
                format,
                size: *size,
                path,
            });
        }
        let socket = root.join("default").join(format!("{name}.sock"));
        let vm = VmRef {
            namespace: "default".into(),
            name: name.into(),
            socket: socket.clone(),
        };
        let child = spawn_qemu(&socket, &specs);
        let client = QmpClient::connect(&socket, fast_options())
            .await
            .expect("QMP connect");
        TestVm {
            dir,
            root,
            vm,
            disks: specs,
            client,
            child: Some(child),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Starts QEMU again on the same socket and images (after quit/kill).
    pub async fn restart(&mut self) {
        let _ = std::fs::remove_file(&self.vm.socket);
        self.child = Some(spawn_qemu(&self.vm.socket, &self.disks));
        wait_socket(&self.vm.socket).await;
        // The client reconnects by itself; wait until it did.
        let mut st = self.client.state();
        tokio::time::timeout(
            Duration::from_secs(10),
            st.wait_for(|_| self.client.is_connected()),
        )
        .await
        .expect("reconnect")
        .unwrap();
    }

    /// Drops the session (as a dying agent would) and opens a new one.
    /// QEMU serves one client per QMP socket, so the old one must go first.
    pub async fn reconnect_client(&mut self) {
        let old = std::mem::replace(
            &mut self.client,
            QmpClient::spawn("/nonexistent", fast_options()),
        );
        drop(old);
        self.client = QmpClient::connect(&self.vm.socket, fast_options())
            .await
            .expect("QMP reconnect");
    }

    /// Closes the fixture's session so another client (discovery) can connect.
    pub fn release_client(&mut self) {
        let old = std::mem::replace(
            &mut self.client,
            QmpClient::spawn("/nonexistent", fast_options()),
        );
        drop(old);
    }

    /// Clean shutdown through QMP (`quit`): persistent bitmaps get stored.
    pub async fn quit(&mut self) {
        self.client.quit().await.unwrap();
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    /// SIGKILL QEMU.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Guest write through HMP `qemu-io` on the virtio backend.
    pub async fn write(&self, disk: &str, pattern: u8, offset: u64, len: u64) {
        let cmd = format!(
            "qemu-io -d /machine/peripheral/{disk}/virtio-backend \"write -P 0x{pattern:02x} {offset} {len}\""
        );
        let out = self.client.hmp(&cmd).await.unwrap();
        // qemu-io reports success on QEMU's own stdout; HMP returns only errors.
        let lower = out.to_lowercase();
        assert!(
            !lower.contains("fail") && !lower.contains("error") && !lower.contains("not "),
            "qemu-io failed: {out}"
        );
    }

    pub fn disk(&self, id: &str) -> &DiskSpec {
        self.disks.iter().find(|d| d.id == id).unwrap()
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn_qemu(socket: &Path, disks: &[DiskSpec]) -> Child {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-machine",
        "q35,accel=kvm:tcg",
        "-nodefaults",
        "-display",
        "none",
        "-m",
        "64",
    ])
    .arg("-qmp")
    .arg(format!("unix:{},server=on,wait=off", socket.display()));
    for d in disks {
        cmd.arg("-blockdev").arg(format!(
            "driver=file,filename={},node-name={}-file",
            d.path.display(),
            d.id
        ));
        cmd.arg("-blockdev").arg(format!(
            "driver={},file={}-file,node-name={}-fmt",
            d.format, d.id, d.id
        ));
        cmd.arg("-device")
            .arg(format!("virtio-blk-pci,drive={}-fmt,id={}", d.id, d.id));
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = cmd.spawn().expect("qemu-system-x86_64");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "QEMU did not create its socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

async fn wait_socket(socket: &Path) {
    for _ in 0..500 {
        if socket.exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("socket {} never appeared", socket.display());
}

/// Expected content of a disk, kept in memory by mirroring every guest write.
pub struct DiskModel {
    pub bytes: Vec<u8>,
}

impl DiskModel {
    pub fn new(size: u64) -> Self {
        Self {
            bytes: vec![0; size as usize],
        }
    }
    pub fn write(&mut self, pattern: u8, offset: u64, len: u64) {
        self.bytes[offset as usize..(offset + len) as usize].fill(pattern);
    }
    pub fn sha256(&self) -> String {
        hex::encode(ring::digest::digest(&ring::digest::SHA256, &self.bytes))
    }
}

/// Reads a raw image file fully.
pub fn read_raw(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

/// Converts any image (chain) to raw and returns its bytes.
pub fn image_bytes(path: &Path) -> Vec<u8> {
    let out = path.with_extension("check.raw");
    let st = Command::new("qemu-img")
        .args(["convert", "-U", "-O", "raw"])
        .arg(path)
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
    let b = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    b
}

/// Files in a directory (names), sorted.
pub fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Asserts QEMU has no Cairn leftovers: jobs, exports, extra nodes, temp bitmaps.
pub async fn assert_no_leftovers(client: &QmpClient) {
    let jobs = client.query_jobs().await.unwrap();
    assert!(jobs.is_empty(), "jobs left: {jobs:?}");
    let exports = client.query_block_exports().await.unwrap();
    assert!(exports.is_empty(), "exports left: {exports:?}");
    for n in client.query_named_block_nodes().await.unwrap() {
        let name = n.node_name.unwrap_or_default();
        assert!(!name.starts_with("cairn-"), "node left: {name}");
        for b in n.dirty_bitmaps {
            let bn = b.name.unwrap_or_default();
            assert!(
                !bn.starts_with("cairn-"),
                "temp bitmap left: {bn} on {name}"
            );
        }
    }
}

/// Names of all bitmaps on a node.
pub async fn bitmaps_on(client: &QmpClient, node: &str) -> Vec<String> {
    client
        .query_named_block_nodes()
        .await
        .unwrap()
        .into_iter()
        .filter(|n| n.node_name.as_deref() == Some(node))
        .flat_map(|n| n.dirty_bitmaps.into_iter().filter_map(|b| b.name))
        .collect()
}

/// SHA-256 (hex) of a file's bytes, computed independently of the agent.
pub fn sha256_of_file(path: &Path) -> String {
    hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        &std::fs::read(path).unwrap(),
    ))
}

/// Runs `verify_backup` on a fresh (unverified) manifest and checks that it
/// recorded each disk's file size and the SHA-256 of exactly that file.
pub async fn verify_and_check(manifest_path: &Path) -> cairn_agent::backup::Manifest {
    let before = load_manifest(manifest_path);
    assert!(!before.verified, "a fresh manifest is not verified yet");
    assert!(before.disks.iter().all(|d| d.file_sha256.is_none()));
    let m = cairn_agent::backup::verify_backup_file(manifest_path)
        .await
        .unwrap();
    assert!(m.verified);
    assert_eq!(m, load_manifest(manifest_path));
    let dir = manifest_path.parent().unwrap();
    for d in &m.disks {
        let file = dir.join(&d.file);
        assert_eq!(d.file_size, std::fs::metadata(&file).unwrap().len());
        assert_eq!(
            d.file_sha256.as_deref(),
            Some(sha256_of_file(&file).as_str())
        );
    }
    // Idempotent.
    assert_eq!(
        cairn_agent::backup::verify_backup_file(manifest_path)
            .await
            .unwrap(),
        m
    );
    m
}

/// Reads a manifest by path (through a directory handle, as the agent does).
pub fn load_manifest(path: &Path) -> cairn_agent::backup::Manifest {
    let dir = cairn_agent::tenant_dir::TenantDir::open_trusted(path.parent().unwrap()).unwrap();
    let name = path.file_name().unwrap().to_string_lossy().to_string();
    cairn_agent::backup::Manifest::load(&dir, &name).unwrap()
}

/// Every path below `dir` (recursively), sorted: for "nothing changed" checks.
pub fn tree(dir: &Path) -> Vec<String> {
    fn walk(dir: &Path, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            out.push(p.display().to_string());
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                walk(&p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, &mut out);
    out.sort();
    out
}

/// A pull policy rooted in `base`: exports in `base/exports`, scratch in `base/scratch`.
pub fn pull_policy(base: &Path) -> cairn_agent::backup::PullPolicy {
    std::fs::create_dir_all(base.join("exports")).unwrap();
    std::fs::create_dir_all(base.join("scratch")).unwrap();
    cairn_agent::backup::PullPolicy {
        export_dir: base.join("exports"),
        socket_group: None,
        scratch_dir: base.join("scratch"),
        scratch_reserve: cairn_agent::backup::ScratchReserve::Allocated,
        cbw_timeout_seconds: 5,
        tcp: cairn_agent::backup::TcpExportPolicy {
            address: Some("127.0.0.1".into()),
            ports: (21000, 21999),
            key_dir: base.join("keys"),
        },
    }
}
