//! Test rig: a real versitygw S3 server on loopback, in-memory disk images,
//! and helpers to compare restores.
#![allow(dead_code)]

use cairn_repo::{
    DiskSource, Extent, IngestOptions, InitOptions, Manifest, OutputFormat, RepoError, Repository,
    RepositoryKey, S3Config, SnapshotSpec, StorageConfig,
};
use rand::{Rng, RngCore, SeedableRng};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub const ACCESS_KEY: &str = "cairntestaccess";
pub const SECRET_KEY: &str = "cairntestsecretkey0123456789";

/// Finds (or builds through e2e/tools/install-versitygw.sh, once per test
/// process) the versitygw binary.
pub fn versitygw_binary() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(find_or_build_versitygw).clone()
}

fn find_or_build_versitygw() -> PathBuf {
    if let Ok(p) = std::env::var("CAIRN_VERSITYGW") {
        return p.into();
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../e2e/tools/install-versitygw.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("running {} failed: {e}", script.display()));
    assert!(
        out.status.success(),
        "versitygw is not installed and {} could not build it (status {})",
        script.display(),
        out.status
    );
    let path = String::from_utf8(out.stdout).expect("utf-8 path");
    let path = PathBuf::from(path.trim());
    assert!(
        path.exists(),
        "the install script printed {path:?}, which does not exist"
    );
    path
}

/// A versitygw server on a free loopback port; killed on drop.
pub struct S3Server {
    child: Option<Child>,
    port: u16,
    pub endpoint: String,
    pub root: tempfile::TempDir,
}

fn spawn_versitygw(root: &Path, port: u16) -> Option<Child> {
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(root.join("versitygw.log"))
        .unwrap();
    let mut child = Command::new(versitygw_binary())
        .env("ROOT_ACCESS_KEY", ACCESS_KEY)
        .env("ROOT_SECRET_KEY", SECRET_KEY)
        .args(["--port", &format!("127.0.0.1:{port}"), "posix"])
        .arg(&data)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start versitygw");
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some(child);
        }
        if let Ok(Some(_)) = child.try_wait() {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

impl S3Server {
    pub fn start() -> S3Server {
        let root = tempfile::tempdir().expect("tempdir");
        for _attempt in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            if let Some(child) = spawn_versitygw(root.path(), port) {
                return S3Server {
                    child: Some(child),
                    port,
                    endpoint: format!("http://127.0.0.1:{port}"),
                    root,
                };
            }
        }
        let log = std::fs::read_to_string(root.path().join("versitygw.log")).unwrap_or_default();
        panic!("versitygw did not start; its log:\n{log}");
    }

    /// Kills the server (the repository becomes unreachable).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and data.
    pub fn restart(&mut self) {
        self.stop();
        for _ in 0..20 {
            if let Some(c) = spawn_versitygw(self.root.path(), self.port) {
                self.child = Some(c);
                return;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!("versitygw did not restart on port {}", self.port);
    }

    /// Creates a bucket with a signed CreateBucket request through the S3 API.
    pub async fn create_bucket(&self, bucket: &str) {
        create_bucket(&self.endpoint, bucket).await;
    }

    pub fn config(&self, bucket: &str, prefix: Option<&str>) -> StorageConfig {
        StorageConfig::S3(S3Config {
            endpoint: self.endpoint.clone(),
            bucket: bucket.into(),
            prefix: prefix.map(Into::into),
            region: None,
            access_key_id: ACCESS_KEY.into(),
            secret_access_key: SECRET_KEY.into(),
        })
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Creates a bucket with a signed CreateBucket request
/// ([`cairn_repo::test_support`]).
pub async fn create_bucket(endpoint: &str, bucket: &str) {
    let access = cairn_repo::test_support::BucketAccess {
        endpoint,
        access_key_id: ACCESS_KEY,
        secret_access_key: SECRET_KEY,
    };
    if let Err(e) = access.create_bucket(bucket) {
        panic!("CreateBucket {bucket} failed: {e}");
    }
}

/// An in-memory disk that counts what is read from it.
#[derive(Clone)]
pub struct MemDisk {
    pub data: Arc<Vec<u8>>,
    pub bytes_read: Arc<AtomicU64>,
    pub delay: Option<Duration>,
}

impl MemDisk {
    pub fn new(data: Vec<u8>) -> MemDisk {
        MemDisk {
            data: Arc::new(data),
            bytes_read: Arc::default(),
            delay: None,
        }
    }
    pub fn size(&self) -> u64 {
        self.data.len() as u64
    }
}

impl DiskSource for MemDisk {
    async fn read_at(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        if let Some(d) = self.delay {
            tokio::time::sleep(d).await;
        }
        self.bytes_read.fetch_add(len as u64, Ordering::Relaxed);
        Ok(self.data[offset as usize..offset as usize + len].to_vec())
    }
}

/// A random image with zero regions (holes), repeated blocks and a tail
/// that is not chunk-aligned.
pub fn random_image(seed: u64, size: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut img = vec![0u8; size];
    let mut pos = 0;
    while pos < size {
        let len = rng.random_range(1..200_000).min(size - pos);
        match rng.random_range(0..4) {
            0 => {} // zeros
            1 => img[pos..pos + len].fill(rng.random()),
            _ => rng.fill_bytes(&mut img[pos..pos + len]),
        }
        pos += len;
    }
    img
}

/// Scattered random writes; returns the dirty extents.
pub fn random_writes(rng: &mut impl Rng, img: &mut [u8], count: usize) -> Vec<Extent> {
    let mut dirty = Vec::new();
    for _ in 0..count {
        let len = rng.random_range(1..100_000).min(img.len());
        let off = rng.random_range(0..img.len() - len);
        if rng.random_bool(0.2) {
            img[off..off + len].fill(0);
        } else {
            rng.fill_bytes(&mut img[off..off + len]);
        }
        dirty.push(Extent {
            offset: off as u64,
            length: len as u64,
        });
    }
    dirty
}

pub fn spec(namespace: &str, vm: &str, base: Option<&str>) -> SnapshotSpec {
    SnapshotSpec {
        namespace: namespace.into(),
        vm: vm.into(),
        vm_uid: Some(format!("uid-{vm}")),
        backup_uid: format!("backup-{}", rand::random::<u32>()),
        checkpoint: None,
        base: base.map(Into::into),
        time: None,
    }
}

pub fn small_repo_options() -> InitOptions {
    InitOptions {
        chunk_size: 64 << 10,
        pack_size: 1 << 20,
        ..Default::default()
    }
}

pub fn key() -> RepositoryKey {
    RepositoryKey::Key(b"a test key of thirty-two bytes!!".to_vec())
}

/// Backs up one disk named `vda`.
pub async fn backup(
    repo: &Repository,
    namespace: &str,
    vm: &str,
    disk: &MemDisk,
    base: Option<(&str, &[Extent])>,
) -> Result<Manifest, RepoError> {
    let mut w = repo
        .begin_snapshot(
            spec(namespace, vm, base.map(|b| b.0)),
            IngestOptions::default(),
        )
        .await?;
    w.add_disk("vda", disk.size(), disk, base.map(|b| b.1))
        .await?;
    w.commit().await
}

/// Restores `vda` of a snapshot and returns its bytes.
pub async fn restore_bytes(repo: &Repository, snapshot: &str) -> Result<Vec<u8>, RepoError> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("disk.raw");
    cairn_repo::restore_disk(repo, snapshot, "vda", &out, OutputFormat::Raw, false).await?;
    Ok(std::fs::read(out).unwrap())
}

/// Names of the files in a directory (to check nothing was left behind).
pub fn dir_entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}
