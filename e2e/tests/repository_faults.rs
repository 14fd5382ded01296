//! Faults in the middle of a repository upload, end to end (real control
//! plane, QEMU, agent and versitygw): the S3 server dies, or the agent is
//! killed. Nothing half-done may stay visible: no snapshot, no QEMU export,
//! block node or bitmap; and the next backup works.
//!
//! Each test runs its own versitygw (so killing it touches no other test)
//! behind a [`SlowLink`] at 1 MiB/s per connection, and fills the disk with
//! random data (no dedup, no compression), so the upload of 64 MiB takes
//! tens of seconds and the fault lands while packs are really uploading:
//! the tests wait until some but not all packs are stored and the status
//! reports bytes read, and check both before striking.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use cairn_api::{BackupPhase, VirtualMachineBackup};
use cairn_e2e::harness::TestEnv;
use cairn_e2e::local_cluster::LocalCluster;
use cairn_e2e::local_s3::{LocalS3, SERVICE};
use cairn_e2e::repository_access::{backup_into, restore_sha, snapshot_of};
use cairn_e2e::scenario::*;
use cairn_e2e::slow_link::SlowLink;
use kube::Api;

/// The tests kill processes (a server, an agent): one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Disk size: 8 packs of 8 MiB, far more than the ingest keeps in flight.
const SIZE: u64 = 64 * MIB;
/// Upload speed per connection while the fault is prepared.
const SLOW: u64 = MIB;

/// A BackupRepository on a versitygw of the test's own, reached through a
/// [`SlowLink`].
struct OwnS3 {
    /// BackupRepository name.
    name: String,
    state: PathBuf,
    server: LocalS3,
    link: SlowLink,
}

impl OwnS3 {
    async fn start(cluster: &LocalCluster, env: &TestEnv) -> Result<Self> {
        let state = cluster.state_dir.join("own-s3").join(&env.namespace);
        let server = start_server(&state).await?;
        let upstream: SocketAddr = server
            .endpoint
            .trim_start_matches("http://")
            .parse()
            .context("versitygw endpoint")?;
        let link = SlowLink::start(upstream, SLOW)?;
        let name = format!("own-{}", env.namespace);
        let yaml = format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: cairn-system\nstringData:\n  AWS_ACCESS_KEY_ID: {}\n  AWS_SECRET_ACCESS_KEY: {}\n---\n\
             apiVersion: cairn.dev/v1alpha1\nkind: BackupRepository\nmetadata:\n  name: {name}\nspec:\n  storage:\n    s3:\n      endpoint: {}\n      bucket: {}\n      region: us-east-1\n      pathStyle: true\n      credentialsSecret: {name}\n  allowedNamespaces:\n    names: [{}]\n",
            server.access_key_id,
            server.secret_access_key,
            link.endpoint(),
            server.bucket,
            env.namespace
        );
        let file = tempfile::NamedTempFile::new()?;
        std::fs::write(file.path(), yaml)?;
        cluster.cp.kubectl_checked(
            "creating the test's repository",
            &["apply", "-f", file.path().to_str().context("temp path")?],
        )?;
        Ok(Self {
            name,
            state,
            server,
            link,
        })
    }

    /// Kills the server (SIGKILL, as a crash or a lost host would).
    fn kill(&self) -> Result<()> {
        cairn_e2e::control_plane::kill_recorded(&self.state, SERVICE)?;
        Ok(())
    }

    /// Starts it again on the same port, data and credentials.
    async fn restart(&mut self) -> Result<()> {
        let again = start_server(&self.state).await?;
        ensure!(
            again == self.server,
            "versitygw came back elsewhere: {again:?}"
        );
        Ok(())
    }

    /// The bucket's objects under `prefix` (versitygw's posix backend keeps
    /// one file per object), read from disk so it works with the server down.
    fn objects(&self, prefix: &str) -> Vec<PathBuf> {
        let root = cairn_e2e::local_s3::s3_dir(&self.state)
            .join("data")
            .join(&self.server.bucket)
            .join(prefix);
        let mut out = Vec::new();
        let mut stack = vec![root];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push(p);
                }
            }
        }
        out
    }

    /// Snapshot manifests: a snapshot exists if and only if its manifest does.
    fn manifests(&self) -> Vec<PathBuf> {
        let mut m: Vec<PathBuf> = self
            .objects("snapshots")
            .into_iter()
            .filter(|p| p.file_name().is_some_and(|n| n == "manifest"))
            .collect();
        m.sort();
        m
    }

    fn packs(&self) -> usize {
        self.objects("packs").len()
    }
}

async fn start_server(state: &Path) -> Result<LocalS3> {
    let state = state.to_path_buf();
    tokio::task::spawn_blocking(move || {
        LocalS3::start(
            &cairn_e2e::tools::Tools::cached(),
            &state,
            Some(std::process::id()),
        )
    })
    .await?
}

/// Waits until backup `name` is uploading: Running, bytes read reported,
/// at least one pack stored; then checks it is not done (fewer packs than
/// the disk needs, fewer bytes read than the disk, no manifest).
async fn wait_mid_upload(env: &TestEnv, s3: &OwnS3, name: &str) -> Result<i64> {
    let api: Api<VirtualMachineBackup> = Api::namespaced(env.client.clone(), &env.namespace);
    let deadline = Instant::now() + T;
    loop {
        let b = api.get(name).await?;
        let status = b.status.unwrap_or_default();
        let done = status.progress.as_ref().map_or(0, |p| p.bytes_done);
        match status.phase {
            Some(BackupPhase::Running) if done > 0 && s3.packs() > 0 => {
                ensure!(
                    done < SIZE as i64,
                    "the backup read the whole disk already ({done} bytes): not mid-upload"
                );
                ensure!(
                    s3.packs() < (SIZE / (8 * MIB)) as usize && s3.manifests().is_empty(),
                    "the upload is complete already ({} packs, manifests {:?})",
                    s3.packs(),
                    s3.manifests()
                );
                return Ok(done);
            }
            Some(p) if p.is_finished() => bail!("backup {name} ended {p:?} before the fault"),
            _ => {}
        }
        ensure!(
            Instant::now() < deadline,
            "backup {name} never got mid-upload: {status:?}, {} packs",
            s3.packs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The Ready condition's reason of a finished backup.
fn reason(b: &VirtualMachineBackup) -> Result<(String, String)> {
    let c = condition(&b.status.as_ref().context("status")?.conditions, "Ready")
        .context("Ready condition")?;
    Ok((c.reason.clone(), c.message.clone()))
}

/// The common start: VM with a random 64 MiB disk, the test's own S3
/// repository, a backup making checkpoint `c1` caught mid-upload.
async fn backup_caught_mid_upload(
    test: &str,
) -> Result<(
    TestEnv,
    &'static LocalCluster,
    OwnS3,
    cairn_e2e::vm::TestVm,
    DiskModel,
)> {
    let (env, cluster) = TestEnv::with_cluster(test).await?;
    let s3 = OwnS3::start(cluster, &env).await?;
    let vm = start_vm1(cluster, &env, SIZE).await?;
    let mut model = DiskModel::new(SIZE);
    model.write_random(&vm, "disk0", 0, SIZE)?;
    apply(
        &env,
        &backup_yaml("b1", "vm1", &backup_into(&s3.name, None, Some("c1"))),
    )?;
    wait_mid_upload(&env, &s3, "b1").await?;
    Ok((env, cluster, s3, vm, model))
}

/// After the failed backup: no snapshot, nothing left in QEMU; then a new
/// backup at full speed succeeds and restores to the disk.
async fn nothing_half_done_and_the_next_backup_works(
    env: &TestEnv,
    s3: &OwnS3,
    vm: &cairn_e2e::vm::TestVm,
    model: &DiskModel,
) -> Result<()> {
    assert!(s3.manifests().is_empty(), "{:?}", s3.manifests());
    assert!(leftovers(vm)?.is_empty(), "{:?}", leftovers(vm)?);
    assert!(
        vm.bitmaps("disk0")?.is_empty(),
        "the failed backup's checkpoint bitmap stayed: {:?}",
        vm.bitmaps("disk0")?
    );
    s3.link.set_rate(0);
    apply(
        env,
        &backup_yaml("b2", "vm1", &backup_into(&s3.name, None, Some("c2"))),
    )?;
    let b2 = snapshot_of(env, "b2").await?;
    let id = b2.snapshot.context("snapshot id")?;
    assert_eq!(s3.manifests().len(), 1, "{:?}", s3.manifests());
    assert_eq!(restore_sha(env, &s3.name, &id, "disk0")?, model.sha256());
    assert_eq!(vm.bitmaps("disk0")?, ["c2"]);
    assert!(leftovers(vm)?.is_empty(), "{:?}", leftovers(vm)?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_server_lost_mid_upload_fails_repository_unavailable() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let (env, _cluster, mut s3, vm, model) = backup_caught_mid_upload("repo-s3-lost").await?;
    s3.kill()?;
    let b1 = wait_backup(&env, "b1", BackupPhase::Failed).await?;
    let (why, message) = reason(&b1)?;
    assert_eq!(why, "RepositoryUnavailable", "{message}");
    s3.restart().await?;
    nothing_half_done_and_the_next_backup_works(&env, &s3, &vm, &model).await
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_killed_mid_upload_leaves_no_snapshot() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let (env, cluster, s3, vm, model) = backup_caught_mid_upload("repo-agent-killed").await?;
    let packs = s3.packs();
    cluster.stop_process("agent-node-1")?;
    // What the killed agent uploaded stays, unreferenced, until GC.
    assert!(s3.packs() >= packs);
    cluster.start_agent("node-1")?;
    // An upload cannot be resumed by another process: the new agent fails
    // the backup and cleans up QEMU.
    let b1 = wait_backup(&env, "b1", BackupPhase::Failed).await?;
    let (why, message) = reason(&b1)?;
    assert_eq!(why, "AgentRestarted", "{message}");
    nothing_half_done_and_the_next_backup_works(&env, &s3, &vm, &model).await
}
