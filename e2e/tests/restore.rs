//! VirtualMachineRestore on the real control plane + QEMU (+ the real S3
//! server): every point of a 10-round qcow2 chain restores to the disk at its
//! instant; a repository snapshot restores by backup and by snapshot id;
//! instant recovery serves a snapshot that a VM streams into its overlay
//! while it reads and writes; and every bad input fails clearly, publishes
//! nothing and leaves existing files alone.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use cairn_api::{BackupPhase, RestorePhase, VirtualMachineRestore};
use cairn_e2e::harness::TestEnv;
use cairn_e2e::local_cluster::LocalCluster;
use cairn_e2e::scenario::*;
use cairn_e2e::vm::{TestVm, VmDisk, content_sha256};
use cairn_e2e::wait;
use kube::Api;
use serde_json::json;
use sha2::{Digest, Sha256};

fn restore_yaml(name: &str, source: &str, rest: &str) -> String {
    format!(
        "apiVersion: cairn.dev/v1alpha1\nkind: VirtualMachineRestore\nmetadata:\n  name: {name}\nspec:\n  source:\n{source}{rest}"
    )
}

fn from_backup(b: &str) -> String {
    format!("    backup:\n      name: {b}\n")
}

fn into_dir(dir: &Path, format: &str, overwrite: bool) -> String {
    let mut s = format!(
        "  target:\n    directory:\n      path: {}\n      format: {format}\n",
        dir.display()
    );
    if overwrite {
        s.push_str("      overwrite: true\n");
    }
    s
}

/// Waits until the restore ends (or serves); fails early on another end.
async fn wait_restore(
    env: &TestEnv,
    name: &str,
    phase: RestorePhase,
) -> Result<VirtualMachineRestore> {
    let api: Api<VirtualMachineRestore> = Api::namespaced(env.client.clone(), &env.namespace);
    let r = wait::until(
        &api,
        name,
        Duration::from_secs(120),
        &format!("restore {phase:?}"),
        |r| {
            let p = r.status.as_ref().and_then(|s| s.phase);
            p == Some(phase) || p.is_some_and(RestorePhase::is_finished)
        },
    )
    .await?;
    let p = r.status.as_ref().and_then(|s| s.phase);
    ensure!(
        p == Some(phase),
        "restore {name} ended {p:?}, not {phase:?}: {:#?}",
        r.status
    );
    Ok(r)
}

/// The Ready reason of a restore.
fn reason(r: &VirtualMachineRestore) -> String {
    r.status
        .as_ref()
        .and_then(|s| condition(&s.conditions, "Ready"))
        .map(|c| format!("{}: {}", c.reason, c.message))
        .unwrap_or_default()
}

fn file_sha(path: &Path) -> Result<String> {
    Ok(hex(&Sha256::digest(
        std::fs::read(path).with_context(|| path.display().to_string())?,
    )))
}

/// Restores `backup` into `dir` as raw and checks the file and the status checksum.
async fn restore_raw(env: &TestEnv, name: &str, backup: &str, dir: &Path) -> Result<String> {
    apply(
        env,
        &restore_yaml(name, &from_backup(backup), &into_dir(dir, "raw", false)),
    )?;
    let r = wait_restore(env, name, RestorePhase::Succeeded).await?;
    let s = r.status.context("status")?;
    let disk = s.disks.first().context("a restored disk")?;
    let path = PathBuf::from(disk.path.as_deref().context("path")?);
    ensure!(
        path == dir.join("disk0.raw"),
        "restored to {}",
        path.display()
    );
    let sha = file_sha(&path)?;
    ensure!(
        disk.sha256.as_deref() == Some(sha.as_str()),
        "status sha256 {:?} vs file {sha}",
        disk.sha256
    );
    let p = s.progress.context("progress")?;
    ensure!(p.bytes_done == p.bytes_total && p.bytes_total > 0, "{p:?}");
    Ok(sha)
}

fn hidden_files(dir: &Path) -> Vec<String> {
    files_in(dir)
        .into_iter()
        .filter(|f| f.starts_with('.'))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_point_of_a_ten_round_chain_restores_and_bad_input_fails_cleanly() -> Result<()> {
    let (env, cluster) = TestEnv::with_cluster("restore-chain").await?;
    let size = 16 * MIB;
    let vm = start_vm1(cluster, &env, size).await?;
    let backups = cluster.backup_dir("node-1").join(&env.namespace);
    let chain_dir = backups.join("chain");
    let mut model = DiskModel::new(size);
    let mut points = Vec::new();
    for round in 0..10u64 {
        model.write(
            &vm,
            "disk0",
            0x20 + round as u8,
            (round * 1_300_000) % (size - MIB),
            200_000 + round * 7_000,
        )?;
        let (inc, cp) = (
            round.checked_sub(1).map(|r| format!("c{r}")),
            format!("c{round}"),
        );
        let name = format!("b{round}");
        apply(
            &env,
            &backup_yaml(
                &name,
                "vm1",
                &push_extra(&chain_dir, inc.as_deref(), Some(&cp)),
            ),
        )?;
        wait_backup(&env, &name, BackupPhase::Succeeded).await?;
        wait_verified(&env, &name).await?;
        points.push((name, model.sha256()));
    }
    for (i, (backup, want)) in points.iter().enumerate() {
        let out = backups.join(format!("restored-{i}"));
        let got = restore_raw(&env, &format!("r{i}"), backup, &out).await?;
        assert_eq!(
            &got, want,
            "restore of {backup} differs from the disk at its instant"
        );
    }
    // qcow2 output of the newest point.
    let q = backups.join("restored-qcow2");
    apply(
        &env,
        &restore_yaml("rq", &from_backup("b9"), &into_dir(&q, "qcow2", false)),
    )?;
    wait_restore(&env, "rq", RestorePhase::Succeeded).await?;
    assert_eq!(content_sha256(&q.join("disk0.qcow2"))?, points[9].1);

    // The target exists: refused, the file untouched; overwrite replaces it.
    let taken = backups.join("restored-0");
    let before = file_sha(&taken.join("disk0.raw"))?;
    apply(
        &env,
        &restore_yaml("again", &from_backup("b5"), &into_dir(&taken, "raw", false)),
    )?;
    let r = wait_restore(&env, "again", RestorePhase::Failed).await?;
    assert!(reason(&r).starts_with("TargetExists"), "{}", reason(&r));
    assert_eq!(file_sha(&taken.join("disk0.raw"))?, before);
    apply(
        &env,
        &restore_yaml("over", &from_backup("b5"), &into_dir(&taken, "raw", true)),
    )?;
    wait_restore(&env, "over", RestorePhase::Succeeded).await?;
    assert_eq!(file_sha(&taken.join("disk0.raw"))?, points[5].1);

    // Another namespace's directory: refused, nothing created there.
    let foreign = cluster
        .backup_dir("node-1")
        .join("someone-else")
        .join("loot");
    apply(
        &env,
        &restore_yaml(
            "escape",
            &from_backup("b9"),
            &into_dir(&foreign, "raw", false),
        ),
    )?;
    let r = wait_restore(&env, "escape", RestorePhase::Failed).await?;
    assert!(reason(&r).starts_with("TargetNotAllowed"), "{}", reason(&r));
    assert!(
        !foreign.exists(),
        "a refused restore created {}",
        foreign.display()
    );
    // A symlink inside the namespace pointing out of it: refused too.
    let outside = tempfile::tempdir()?;
    std::os::unix::fs::symlink(outside.path(), backups.join("link"))?;
    apply(
        &env,
        &restore_yaml(
            "via-link",
            &from_backup("b9"),
            &into_dir(&backups.join("link/x"), "raw", false),
        ),
    )?;
    let r = wait_restore(&env, "via-link", RestorePhase::Failed).await?;
    assert!(reason(&r).starts_with("TargetNotAllowed"), "{}", reason(&r));
    assert!(
        std::fs::read_dir(outside.path())?.next().is_none(),
        "something was written through the symlink"
    );

    // Unknown backup, unknown disk.
    apply(
        &env,
        &restore_yaml(
            "nobody",
            &from_backup("missing"),
            &into_dir(&backups.join("n"), "raw", false),
        ),
    )?;
    let r = wait_restore(&env, "nobody", RestorePhase::Failed).await?;
    assert!(reason(&r).starts_with("BackupNotFound"), "{}", reason(&r));
    apply(
        &env,
        &restore_yaml(
            "nodisk",
            &from_backup("b9"),
            &format!(
                "  disks:\n  - name: vdz\n{}",
                into_dir(&backups.join("nd"), "raw", false)
            ),
        ),
    )?;
    let r = wait_restore(&env, "nodisk", RestorePhase::Failed).await?;
    assert!(reason(&r).starts_with("UnknownDisk"), "{}", reason(&r));

    // A damaged chain file: fails naming it, publishes nothing.
    let victim = files_in(&chain_dir)
        .into_iter()
        .find(|f| f.starts_with("b3.") && f.ends_with(".qcow2"))
        .context("b3's file")?;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(chain_dir.join(&victim))?;
        f.write_all_at(b"rot", 300_000)?;
    }
    let dmg = backups.join("damaged");
    apply(
        &env,
        &restore_yaml("damaged", &from_backup("b6"), &into_dir(&dmg, "raw", false)),
    )?;
    let r = wait_restore(&env, "damaged", RestorePhase::Failed).await?;
    assert!(
        reason(&r).starts_with("ChecksumFailed") && reason(&r).contains(&victim),
        "{}",
        reason(&r)
    );
    assert!(
        files_in(&dmg).is_empty(),
        "a failed restore left {:?}",
        files_in(&dmg)
    );
    // A later point whose chain skips nothing damaged still restores? No: b9's chain includes b3.
    // A point before the damage restores fine.
    let early = backups.join("early");
    assert_eq!(restore_raw(&env, "early", "b2", &early).await?, points[2].1);
    assert!(hidden_files(&early).is_empty());

    // Immutable spec; delete of a finished restore keeps its output.
    let (ok, _, err) = env.kubectl_stdin(
        &["apply", "-f", "-"],
        &restore_yaml("early", &from_backup("b1"), &into_dir(&early, "raw", false)),
    )?;
    assert!(!ok && err.contains("immutable"), "{err}");
    kubectl(
        &env,
        &[
            "delete",
            "vmrestore",
            "early",
            "--wait=true",
            "--timeout=60s",
        ],
    )?;
    assert!(early.join("disk0.raw").exists());
    Ok(())
}

/// A raw image of `sha`-known content restored from a repository snapshot.
async fn repository_setup(
    env: &TestEnv,
    cluster: &LocalCluster,
    size: u64,
) -> Result<(TestVm, DiskModel, String)> {
    let vm = start_vm1(cluster, env, size).await?;
    let mut model = DiskModel::new(size);
    model.write(&vm, "disk0", 0x31, 0, 3 * MIB)?;
    model.write(&vm, "disk0", 0x32, 9 * MIB, MIB + 4096)?;
    apply(
        env,
        &backup_yaml(
            "full",
            "vm1",
            "  target:\n    repository:\n      name: local-s3\n",
        ),
    )?;
    let b = wait_backup(env, "full", BackupPhase::Succeeded).await?;
    let snap = b
        .status
        .and_then(|s| s.repository)
        .and_then(|r| r.snapshot)
        .context("snapshot")?;
    Ok((vm, model, snap))
}

#[tokio::test(flavor = "multi_thread")]
async fn repository_snapshots_restore_by_backup_and_by_id_and_stay_in_their_namespace() -> Result<()>
{
    let (env, cluster) = TestEnv::with_cluster("restore-repo").await?;
    let size = 16 * MIB;
    let (vm, model, snap) = repository_setup(&env, cluster, size).await?;
    // Changed after the backup: not in the snapshot.
    vm.write("disk0", 0x99, 0, MIB)?;
    let backups = cluster.backup_dir("node-1").join(&env.namespace);
    assert_eq!(
        restore_raw(&env, "by-backup", "full", &backups.join("a")).await?,
        model.sha256()
    );
    let by_id = format!("    repository:\n      name: local-s3\n      snapshot: {snap}\n");
    apply(
        &env,
        &restore_yaml(
            "by-id",
            &by_id,
            &into_dir(&backups.join("b"), "qcow2", false),
        ),
    )?;
    wait_restore(&env, "by-id", RestorePhase::Succeeded).await?;
    assert_eq!(
        content_sha256(&backups.join("b/disk0.qcow2"))?,
        model.sha256()
    );
    // Unknown snapshot id.
    let unknown = "    repository:\n      name: local-s3\n      snapshot: nosuchsnapshot\n";
    apply(
        &env,
        &restore_yaml(
            "unknown",
            unknown,
            &into_dir(&backups.join("c"), "raw", false),
        ),
    )?;
    let r = wait_restore(&env, "unknown", RestorePhase::Failed).await?;
    assert!(reason(&r).starts_with("SnapshotNotFound"), "{}", reason(&r));
    assert!(files_in(&backups.join("c")).is_empty());

    // Another tenant knows the snapshot id: it looks exactly like an unknown one.
    let (other, _) = TestEnv::with_cluster("restore-repo-thief").await?;
    let theirs = cluster
        .backup_dir("node-1")
        .join(&other.namespace)
        .join("stolen");
    apply(
        &other,
        &restore_yaml("steal", &by_id, &into_dir(&theirs, "raw", false)),
    )?;
    let r = wait_restore(&other, "steal", RestorePhase::Failed).await?;
    assert!(reason(&r).starts_with("SnapshotNotFound"), "{}", reason(&r));
    assert!(!reason(&r).contains(&env.namespace), "{}", reason(&r));
    assert!(
        files_in(&theirs).is_empty(),
        "the thief got {:?}",
        files_in(&theirs)
    );
    // …and cannot name our backup either (names are namespace-local).
    apply(
        &other,
        &restore_yaml(
            "steal2",
            &from_backup("full"),
            &into_dir(&theirs, "raw", false),
        ),
    )?;
    let r = wait_restore(&other, "steal2", RestorePhase::Failed).await?;
    assert!(reason(&r).starts_with("BackupNotFound"), "{}", reason(&r));
    // A repository the namespace may not use.
    let (ok, _, err) = env.kubectl_stdin(&["apply", "-f", "-"], "apiVersion: cairn.dev/v1alpha1\nkind: BackupRepository\nmetadata:\n  name: restore-only-a\nspec:\n  storage:\n    directory:\n      path: /nonexistent\n  allowedNamespaces:\n    names: [\"nobody\"]\n")?;
    ensure!(ok, "{err}");
    let denied = format!("    repository:\n      name: restore-only-a\n      snapshot: {snap}\n");
    apply(
        &other,
        &restore_yaml("denied", &denied, &into_dir(&theirs, "raw", false)),
    )?;
    let r = wait_restore(&other, "denied", RestorePhase::Failed).await?;
    assert!(
        reason(&r).starts_with("RepositoryNotAllowed"),
        "{}",
        reason(&r)
    );
    kubectl(&env, &["delete", "backuprepository", "restore-only-a"])?;
    Ok(())
}

/// Starts VM `restored` on a new qcow2 overlay (in `<state>/<dir_name>/<ns>/`)
/// whose backing file is export `disk0` at `socket`. Its QMP socket is where
/// the agent sees it: the agent tells from the VM's block graph when the
/// overlay no longer needs the export. Returns the VM, the overlay and its directory.
fn vm_on_export(
    cluster: &LocalCluster,
    env: &TestEnv,
    dir_name: &str,
    socket: &str,
    size: u64,
) -> Result<(TestVm, PathBuf, PathBuf)> {
    let dir = cluster.state_dir.join(dir_name).join(&env.namespace);
    std::fs::create_dir_all(&dir)?;
    let overlay = dir.join("overlay.qcow2");
    let backing = format!(
        "json:{}",
        json!({"driver": "raw", "file": {"driver": "nbd", "server": {"type": "unix", "path": socket}, "export": "disk0"}})
    );
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b", &backing])
        .arg(&overlay)
        .arg(size.to_string())
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let vm = TestVm::start_on(
        &cluster.qmp_dir("node-1"),
        &env.namespace,
        "restored",
        &dir,
        vec![VmDisk {
            name: "disk0".into(),
            image: overlay.clone(),
            format: "qcow2".into(),
            size,
        }],
    )?;
    Ok((vm, overlay, dir))
}

#[tokio::test(flavor = "multi_thread")]
async fn instant_recovery_serves_the_snapshot_while_the_vm_streams_it_in() -> Result<()> {
    let (env, cluster) = TestEnv::with_cluster("restore-instant").await?;
    let size = 16 * MIB;
    let (mut vm, mut model, _snap) = repository_setup(&env, cluster, size).await?;
    vm.quit()?;
    apply(
        &env,
        &restore_yaml("instant", &from_backup("full"), "  mode: Instant\n"),
    )?;
    let r = wait_restore(&env, "instant", RestorePhase::Serving).await?;
    let s = r.status.context("status")?;
    let url = s.export.as_ref().context("export")?.url.clone();
    let socket = url
        .split("socket=")
        .nth(1)
        .context("socket in url")?
        .to_string();
    ensure!(
        socket.starts_with(
            &cluster
                .export_dir("node-1")
                .join(&env.namespace)
                .display()
                .to_string()
        ),
        "{socket}"
    );
    assert_eq!(s.disks[0].export_name.as_deref(), Some("disk0"));

    // A VM on a local overlay backed by the export.
    let (mut restored, overlay, dir) = vm_on_export(cluster, &env, "instant", &socket, size)?;
    // Reads of never-fetched regions return the snapshot's bytes.
    let hmp = |cmd: String| -> Result<String> {
        let out = restored.qmp(
            "human-monitor-command",
            json!({"command-line": format!("qemu-io -d /machine/peripheral/disk0/virtio-backend \"{cmd}\"")}),
        )?;
        Ok(out.as_str().unwrap_or_default().to_string())
    };
    let log = dir.join("restored.qemu.log");
    let before = std::fs::read_to_string(&log).unwrap_or_default().len();
    hmp(format!("read -P 0x32 {} 65536", 9 * MIB))?;
    let read = std::fs::read_to_string(&log)?
        .get(before..)
        .unwrap_or_default()
        .to_string();
    ensure!(
        read.contains("read 65536/65536") && !read.contains("fail"),
        "{read}"
    );
    // The guest writes while the data streams in.
    model.write(&restored, "disk0", 0x41, 2 * MIB, 512 * 1024)?;
    restored.qmp(
        "block-stream",
        json!({"job-id": "pull", "device": "disk0-fmt"}),
    )?;
    model.write(&restored, "disk0", 0x42, 12 * MIB, 64 * 1024)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let jobs = restored.qmp("query-block-jobs", json!({}))?;
        if jobs.as_array().is_none_or(|a| a.is_empty()) {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "block-stream did not finish: {jobs}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The VM no longer needs the export: the restore ends and the socket goes.
    let r = wait_restore(&env, "instant", RestorePhase::Succeeded).await?;
    let s = r.status.context("status")?;
    assert!(s.export.as_ref().is_some_and(|e| e.released), "{s:?}");
    assert!(!Path::new(&socket).exists(), "the export socket stayed");
    restored.quit()?;
    let info = std::process::Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&overlay)
        .output()?;
    let info: serde_json::Value = serde_json::from_slice(&info.stdout)?;
    ensure!(
        info.get("backing-filename").is_none(),
        "the overlay still has a backing file: {info}"
    );
    assert_eq!(
        content_sha256(&overlay)?,
        model.sha256(),
        "overlay != snapshot + the guest's writes"
    );

    // Instant needs a repository snapshot: a chain backup is refused.
    let chain = cluster
        .backup_dir("node-1")
        .join(&env.namespace)
        .join("chain");
    let mut vm2 = start_vm(
        cluster,
        &env,
        "node-1",
        "vm2",
        &[("disk0", "qcow2", 4 * MIB)],
    )?;
    wait_instance(&env, "vm2", "node-1").await?;
    apply(
        &env,
        &backup_yaml("pushed", "vm2", &push_extra(&chain, None, None)),
    )?;
    wait_backup(&env, "pushed", BackupPhase::Succeeded).await?;
    apply(
        &env,
        &restore_yaml("instant-chain", &from_backup("pushed"), "  mode: Instant\n"),
    )?;
    let r = wait_restore(&env, "instant-chain", RestorePhase::Failed).await?;
    assert!(
        reason(&r).starts_with("InstantNeedsRepository"),
        "{}",
        reason(&r)
    );
    vm2.quit()?;

    // Deleting a serving restore tears its export down.
    apply(
        &env,
        &restore_yaml("instant2", &from_backup("full"), "  mode: Instant\n"),
    )?;
    let r = wait_restore(&env, "instant2", RestorePhase::Serving).await?;
    let url = r.status.and_then(|s| s.export).context("export")?.url;
    let socket2 = url.split("socket=").nth(1).context("socket")?.to_string();
    assert!(Path::new(&socket2).exists());
    kubectl(
        &env,
        &[
            "delete",
            "vmrestore",
            "instant2",
            "--wait=true",
            "--timeout=60s",
        ],
    )?;
    assert!(
        !Path::new(&socket2).exists(),
        "a deleted restore's export socket stayed"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_agent_restarts_the_restore_deleting_one_cleans_up_and_space_is_checked_first()
-> Result<()> {
    // Node 2 only: this test kills its agent, and the other tests of this
    // binary share the cluster on node 1.
    let (env, cluster) = TestEnv::with_cluster("restore-faults").await?;
    let size = 512 * MIB;
    let vm = start_vm(cluster, &env, "node-2", "big", &[("disk0", "qcow2", size)])?;
    wait_instance(&env, "big", "node-2").await?;
    let mut model = DiskModel::new(size);
    for i in 0..3u64 {
        model.write(&vm, "disk0", 0x61 + i as u8, i * 160 * MIB, 128 * MIB)?;
    }
    let root = cluster.backup_dir("node-2").join(&env.namespace);
    apply(
        &env,
        &backup_yaml("big", "big", &push_extra(&root.join("chain"), None, None)),
    )?;
    wait_backup(&env, "big", BackupPhase::Succeeded).await?;
    wait_verified(&env, "big").await?;
    let api: Api<VirtualMachineRestore> = Api::namespaced(env.client.clone(), &env.namespace);
    let running = |name: &'static str| {
        let api = api.clone();
        async move {
            wait::until(
                &api,
                name,
                Duration::from_secs(60),
                "restore Running",
                |r| r.status.as_ref().and_then(|s| s.phase) == Some(RestorePhase::Running),
            )
            .await
        }
    };

    // Space is checked before anything is written.
    let small = root.join("small");
    std::fs::create_dir_all(&small)?;
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&small)
        .status()?
        .success();
    ensure!(mounted, "mounting a small tmpfs failed");
    apply(
        &env,
        &restore_yaml(
            "tiny",
            &from_backup("big"),
            &into_dir(&small.join("x"), "raw", false),
        ),
    )?;
    let r = wait_restore(&env, "tiny", RestorePhase::Failed).await;
    let listing = files_in(&small.join("x"));
    let _ = std::process::Command::new("umount").arg(&small).status();
    let r = r?;
    assert!(reason(&r).starts_with("NoSpace"), "{}", reason(&r));
    assert!(listing.is_empty(), "a refused restore wrote {listing:?}");

    // The agent dies mid-restore: the new one starts it again; nothing
    // partial is ever visible under the final name.
    let out = root.join("after-crash");
    apply(
        &env,
        &restore_yaml(
            "crash",
            &from_backup("big"),
            &into_dir(&out, "qcow2", false),
        ),
    )?;
    running("crash").await?;
    cluster.restart_agent("node-2")?;
    let r = wait_restore(&env, "crash", RestorePhase::Succeeded).await?;
    assert_eq!(content_sha256(&out.join("disk0.qcow2"))?, model.sha256());
    assert!(hidden_files(&out).is_empty(), "{:?}", files_in(&out));
    let disk = &r.status.context("status")?.disks[0];
    assert_eq!(
        disk.sha256.as_deref(),
        Some(file_sha(&out.join("disk0.qcow2"))?.as_str())
    );

    // Deleting a running restore stops it and leaves no output at all.
    let gone = root.join("deleted");
    apply(
        &env,
        &restore_yaml(
            "doomed",
            &from_backup("big"),
            &into_dir(&gone, "qcow2", false),
        ),
    )?;
    running("doomed").await?;
    kubectl(
        &env,
        &[
            "delete",
            "vmrestore",
            "doomed",
            "--wait=true",
            "--timeout=60s",
        ],
    )?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        files_in(&gone).is_empty(),
        "a deleted restore left {:?}",
        files_in(&gone)
    );
    drop(vm);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn instant_recovery_reports_an_unreachable_repository_and_recovers() -> Result<()> {
    // The only test of this binary on `local-dir`, whose directory it moves away.
    let (env, cluster) = TestEnv::with_cluster("restore-unreachable").await?;
    let size = 16 * MIB;
    let mut vm = start_vm(cluster, &env, "node-1", "src", &[("disk0", "qcow2", size)])?;
    wait_instance(&env, "src", "node-1").await?;
    let mut model = DiskModel::new(size);
    model.write(&vm, "disk0", 0x71, 0, 2 * MIB)?;
    model.write(&vm, "disk0", 0x72, 12 * MIB, 2 * MIB)?;
    apply(
        &env,
        &backup_yaml(
            "full",
            "src",
            "  target:\n    repository:\n      name: local-dir\n",
        ),
    )?;
    wait_backup(&env, "full", BackupPhase::Succeeded).await?;
    vm.quit()?;
    apply(
        &env,
        &restore_yaml("instant", &from_backup("full"), "  mode: Instant\n"),
    )?;
    let r = wait_restore(&env, "instant", RestorePhase::Serving).await?;
    let url = r.status.and_then(|s| s.export).context("export")?.url;
    let socket = url.split("socket=").nth(1).context("socket")?.to_string();
    let (mut restored, overlay, dir) =
        vm_on_export(cluster, &env, "instant-unreachable", &socket, size)?;
    // qemu-io reports on QEMU's stdout (its log), not in the HMP reply.
    let log = dir.join("restored.qemu.log");
    let read = |offset: u64, pattern: u8| -> Result<String> {
        let before = std::fs::read_to_string(&log).unwrap_or_default().len();
        restored.qmp(
            "human-monitor-command",
            json!({"command-line": format!("qemu-io -d /machine/peripheral/disk0/virtio-backend \"read -P {pattern:#x} {offset} 65536\"")}),
        )?;
        let text = std::fs::read_to_string(&log)?;
        Ok(text.get(before..).unwrap_or_default().to_string())
    };
    // A fetched region, then the repository goes away.
    ensure!(
        !read(0, 0x71)?.contains("fail"),
        "reading a fetched region failed"
    );
    let repo = cluster.repository_dir();
    let moved = repo.with_extension("away");
    std::fs::rename(&repo, &moved)?;
    let unfetched = read(12 * MIB + 512 * 1024, 0x72);
    let again = read(0, 0x71);
    std::fs::rename(&moved, &repo)?;
    let unfetched = unfetched?;
    ensure!(
        unfetched.contains("error") || unfetched.contains("fail"),
        "an unfetched read succeeded with the repository gone: {unfetched}"
    );
    // The region read before is served from the cache.
    ensure!(
        !again?.contains("fail"),
        "a fetched region failed while the repository was away"
    );
    let api: Api<VirtualMachineRestore> = Api::namespaced(env.client.clone(), &env.namespace);
    let r = wait::until(&api, "instant", Duration::from_secs(30), "Degraded", |r| {
        r.status
            .as_ref()
            .and_then(|s| condition(&s.conditions, "Degraded"))
            .is_some_and(|c| c.status == "True")
    })
    .await?;
    assert_eq!(r.status.and_then(|s| s.phase), Some(RestorePhase::Serving));
    // Back: reads work again, and the stream completes the restore.
    ensure!(
        !read(12 * MIB + 512 * 1024, 0x72)?.contains("fail"),
        "reads failed after the repository came back"
    );
    restored.qmp(
        "block-stream",
        json!({"job-id": "pull", "device": "disk0-fmt"}),
    )?;
    let r = wait_restore(&env, "instant", RestorePhase::Succeeded).await?;
    assert!(r.status.and_then(|s| s.export).is_some_and(|e| e.released));
    restored.quit()?;
    assert_eq!(content_sha256(&overlay)?, model.sha256());
    Ok(())
}

/// Applies `yaml` as the user of `kubeconfig`; returns success and stderr.
fn apply_as(env: &TestEnv, kubeconfig: &Path, yaml: &str) -> Result<(bool, String)> {
    use std::io::Write;
    let mut child = env
        .kubectl_as(kubeconfig, &["apply", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(yaml.as_bytes())?;
    let out = child.wait_with_output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn tenants_create_restores_but_cannot_route_them() -> Result<()> {
    let (env, cluster) = TestEnv::with_cluster("restore-tenant").await?;
    let tenant = env.tenant_kubeconfig("mallory")?;
    let dir = cluster.backup_dir("node-1").join(&env.namespace).join("r");
    let plain = restore_yaml("plain", &from_backup("none"), &into_dir(&dir, "raw", false));
    let (ok, err) = apply_as(&env, &tenant, &plain)?;
    ensure!(ok, "a tenant with `edit` cannot create a restore: {err}");
    let r = wait_restore(&env, "plain", RestorePhase::Failed).await?;
    assert!(reason(&r).starts_with("BackupNotFound"), "{}", reason(&r));
    // Routing is the operator's: a tenant's own node label is refused.
    let forged = plain.replace(
        "metadata:\n  name: plain\n",
        "metadata:\n  name: forged\n  labels:\n    cairn.dev/node: node-2\n",
    );
    let (ok, err) = apply_as(&env, &tenant, &forged)?;
    ensure!(
        !ok && err.contains("set by Cairn only"),
        "a forged routing label was allowed: {err}"
    );
    Ok(())
}

/// Every pack file the S3 server holds for the bucket.
fn pack_files(cluster: &LocalCluster) -> Vec<PathBuf> {
    let root = cluster.state_dir.join("s3/data/cairn/packs");
    let mut out = Vec::new();
    for d in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(d.path()).into_iter().flatten().flatten() {
            out.push(f.path());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupted_chunk_fails_the_restore_naming_snapshot_disk_and_offset() -> Result<()> {
    let (env, cluster) = TestEnv::with_cluster("restore-rot").await?;
    let size = 16 * MIB;
    let vm = start_vm(cluster, &env, "node-1", "rot", &[("disk0", "qcow2", size)])?;
    wait_instance(&env, "rot", "node-1").await?;
    vm.write("disk0", 0x55, 4 * MIB, 2 * MIB)?;
    let before = pack_files(cluster);
    apply(
        &env,
        &backup_yaml(
            "full",
            "rot",
            "  target:\n    repository:\n      name: local-s3\n",
        ),
    )?;
    let b = wait_backup(&env, "full", BackupPhase::Succeeded).await?;
    let snap = b
        .status
        .and_then(|s| s.repository)
        .and_then(|r| r.snapshot)
        .context("snapshot")?;
    // This namespace's chunks are keyed apart from every other's: its packs are new.
    let ours: Vec<PathBuf> = pack_files(cluster)
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    ensure!(!ours.is_empty(), "the backup wrote no pack");
    for p in &ours {
        use std::os::unix::fs::FileExt;
        // Byte 24: inside the first sealed chunk's ciphertext (8-byte header,
        // 12-byte nonce), so the chunk fails authentication.
        let f = std::fs::OpenOptions::new().read(true).write(true).open(p)?;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, 24)?;
        f.write_all_at(&[b[0] ^ 0x5a], 24)?;
    }
    let out = cluster
        .backup_dir("node-1")
        .join(&env.namespace)
        .join("rot");
    apply(
        &env,
        &restore_yaml(
            "rotten",
            &from_backup("full"),
            &into_dir(&out, "raw", false),
        ),
    )?;
    let r = wait_restore(&env, "rotten", RestorePhase::Failed).await?;
    let why = reason(&r);
    assert!(why.starts_with("ChunkCorrupt"), "{why}");
    assert!(
        why.contains(&snap) && why.contains("disk0") && why.contains("offset"),
        "{why}"
    );
    assert!(
        files_in(&out).is_empty(),
        "a refused restore left {:?}",
        files_in(&out)
    );
    Ok(())
}
