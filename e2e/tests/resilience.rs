//! Resilience end to end: redefine without a domain, two nodes, tenancy,
//! restarts of the agent, the operator, kube-apiserver and QEMU, cancelling by
//! deletion, GitOps idempotency and many checkpoints on one VM.
//!
//! Tests of this file share one local cluster. The ones that kill cluster
//! processes take [`exclusive`] so they never pull the rug from under the
//! others; the rest take [`shared`] and run in parallel.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use cairn_api::{
    BackupDiskStatus, BackupPhase, CheckpointPhase, QemuInstance, VirtualMachineBackup,
    VirtualMachineCheckpoint,
};
use cairn_e2e::harness::TestEnv;
use cairn_e2e::local_cluster::LocalCluster;
use cairn_e2e::scenario::*;
use cairn_e2e::vm::TestVm;
use cairn_e2e::wait;
use kube::{Api, ResourceExt};
use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

static CLUSTER_USE: RwLock<()> = RwLock::const_new(());

/// For tests that only use the cluster.
async fn shared() -> RwLockReadGuard<'static, ()> {
    CLUSTER_USE.read().await
}

/// For tests that kill and restart cluster processes.
async fn exclusive() -> RwLockWriteGuard<'static, ()> {
    CLUSTER_USE.write().await
}

fn target(cluster: &LocalCluster, node: &str, env: &TestEnv, vm: &str) -> PathBuf {
    cluster.backup_dir(node).join(&env.namespace).join(vm)
}

/// Restores backup `name` from `dir` and checks it against `model`.
fn assert_restores(dir: &Path, name: &str, model: &DiskModel) -> Result<()> {
    let out = tempfile::tempdir()?;
    let sha = restore(dir, name, &out.path().join(format!("{name}.raw")))?;
    assert_eq!(
        sha,
        model.sha256(),
        "restore of {name} differs from what the guest wrote"
    );
    Ok(())
}

/// The dirty extents `nbdinfo --map=<context>` reports, merged, as (offset, length).
fn dirty_extents(url: &str, context: &str) -> Result<Vec<(u64, u64)>> {
    let out = Command::new("nbdinfo")
        .arg(format!("--map={context}"))
        .arg(url)
        .output()?;
    ensure!(
        out.status.success(),
        "nbdinfo --map failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut extents: Vec<(u64, u64)> = Vec::new();
    for line in text.lines().filter(|l| l.contains("dirty")) {
        let mut f = line.split_whitespace();
        let off: u64 = f.next().context("offset")?.parse()?;
        let len: u64 = f.next().context("length")?.parse()?;
        match extents.last_mut() {
            Some((o, l)) if *o + *l == off => *l += len,
            _ => extents.push((off, len)),
        }
    }
    Ok(extents)
}

/// Flushes `disk` from inside (qemu-io), so the data survives a SIGKILL of QEMU.
fn flush(vm: &TestVm, disk: &str) -> Result<()> {
    vm.qmp(
        "human-monitor-command",
        serde_json::json!({"command-line": format!(
            "qemu-io -d /machine/peripheral/{disk}/virtio-backend \"flush\""
        )}),
    )?;
    Ok(())
}

/// Applies `yaml` (a push backup) while a helper thread waits for its job
/// and slows it to 1 MiB/s; returns the job id.
fn apply_slow_backup(env: &TestEnv, vm: &TestVm, yaml: &str) -> Result<String> {
    std::thread::scope(|s| {
        let t = s.spawn(|| throttle_next_job(vm, MIB, Duration::from_secs(60)));
        let applied = apply(env, yaml);
        let job = t.join().expect("throttle thread");
        applied?;
        job
    })
}

async fn wait_running(env: &TestEnv, name: &str) -> Result<VirtualMachineBackup> {
    let api: Api<VirtualMachineBackup> = Api::namespaced(env.client.clone(), &env.namespace);
    wait::until(&api, name, T, "backup Running", |b| {
        b.status.as_ref().and_then(|s| s.phase) == Some(BackupPhase::Running)
    })
    .await
}

/// Waits until the backup's reported progress passes `beyond` bytes: proof
/// that an agent is watching the job.
async fn wait_progress(env: &TestEnv, name: &str, beyond: i64) -> Result<i64> {
    let api: Api<VirtualMachineBackup> = Api::namespaced(env.client.clone(), &env.namespace);
    let b = wait::until(&api, name, T, "progress to be reported", |b| {
        b.status
            .as_ref()
            .and_then(|s| s.progress.as_ref())
            .is_some_and(|p| p.bytes_done > beyond)
    })
    .await?;
    Ok(b.status.unwrap().progress.unwrap().bytes_done)
}

/// Applies a pull backup `name` of the changes since checkpoint `base`, waits
/// for its export and returns the first disk's status with its dirty extents.
async fn pull_since(
    env: &TestEnv,
    name: &str,
    base: &str,
) -> Result<(BackupDiskStatus, Vec<(u64, u64)>)> {
    apply(
        env,
        &backup_yaml(
            name,
            "vm1",
            &format!("  mode: Pull\n  incremental: {base}\n"),
        ),
    )?;
    let b = wait_backup(env, name, BackupPhase::Exporting).await?;
    let disk = b.status.unwrap().disks[0].clone();
    let url = disk.target.clone().context("export URL")?;
    let ctx = disk.bitmap_context.clone().context("bitmap context")?;
    let extents = dirty_extents(&url, &ctx)?;
    Ok((disk, extents))
}

fn assert_clean(vm: &TestVm) -> Result<()> {
    let left = leftovers(vm)?;
    assert!(left.is_empty(), "left behind in QEMU: {left:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn checkpoint_of_a_stopped_vm_is_created_offline() -> Result<()> {
    let _use = shared().await;
    let (env, cluster) = TestEnv::with_cluster("offline-create").await?;
    let size = 32 * MIB;
    let mut vm = start_vm1(cluster, &env, size).await?;
    vm.quit()?;
    let run_state = |qi: &QemuInstance| {
        qi.status
            .as_ref()
            .and_then(|s| s.run_state.clone())
            .unwrap_or_default()
    };
    wait_instance_until(&env, "vm1", "the VM to be stopped", |qi| {
        run_state(qi) == "stopped"
    })
    .await?;

    apply(&env, &checkpoint_yaml("cp-off", "vm1", ""))?;
    let cp = wait_checkpoint(&env, "cp-off", CheckpointPhase::Ready).await?;
    let status = cp.status.unwrap();
    let ready = condition(&status.conditions, "Ready").context("Ready")?;
    assert_eq!(ready.reason, "CreatedOffline", "{}", ready.message);
    let recorded = condition(&status.conditions, "DomainRecorded").context("DomainRecorded")?;
    assert_eq!(recorded.status, "True", "{recorded:?}");
    let domain = status.domain.context("domain")?;
    assert_eq!(domain.disks.len(), 1);
    assert_eq!(
        Path::new(&domain.disks[0].file),
        vm.disk("disk0").image.as_path()
    );
    let info = Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(&vm.disk("disk0").image)
        .output()?;
    let info: serde_json::Value = serde_json::from_slice(&info.stdout)?;
    let in_image: Vec<&str> = info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| b["name"].as_str())
        .collect();
    assert_eq!(in_image, ["cp-off"], "{info}");

    // Once the VM runs, the bitmap records its writes: an incremental from it
    // holds exactly what was written after it was made.
    vm.launch()?;
    wait_instance_until(&env, "vm1", "the VM to run again", |qi| {
        run_state(qi) == "running"
    })
    .await?;
    vm.write("disk0", 0x51, 4 * MIB, MIB)?;
    let (_, extents) = pull_since(&env, "pull-off", "cp-off").await?;
    assert_eq!(extents, vec![(4 * MIB, MIB)]);
    kubectl(&env, &["delete", "vmb", "pull-off", "--timeout=60s"])?;
    kubectl(&env, &["delete", "vmcp", "cp-off", "--timeout=60s"])?;
    assert_clean(&vm)?;
    assert!(vm.bitmaps("disk0")?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn pull_export_of_a_restarted_qemu_fails_clearly() -> Result<()> {
    let _use = shared().await;
    let (env, cluster) = TestEnv::with_cluster("export-lost").await?;
    let mut vm = start_vm1(cluster, &env, 16 * MIB).await?;
    apply(&env, &backup_yaml("p", "vm1", "  mode: Pull\n"))?;
    let b = wait_backup(&env, "p", BackupPhase::Exporting).await?;
    let _ = b.uid().context("uid")?;
    // Scratch images live in <scratch dir>/<namespace>/.
    let scratch = cluster.scratch_dir("node-1").join(&env.namespace);
    let scratch_files = || -> Vec<String> {
        std::fs::read_dir(&scratch)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert!(
        !scratch_files().is_empty(),
        "no scratch image in {}",
        scratch.display()
    );

    vm.kill();
    vm.launch()?;
    let failed = wait_backup(&env, "p", BackupPhase::Failed).await?;
    let ready = condition(&failed.status.as_ref().unwrap().conditions, "Ready")
        .cloned()
        .context("Ready")?;
    let (reason, message) = (ready.reason, ready.message);
    assert!(
        reason == "ExportLost" || reason == "VirtualMachineGone",
        "{reason}: {message}"
    );
    assert!(
        message.contains("vm1") && message.contains("export"),
        "{message}"
    );
    assert!(
        scratch_files().is_empty(),
        "scratch files left in {}: {:?}",
        scratch.display(),
        scratch_files()
    );
    assert_clean(&vm)?;
    kubectl(&env, &["delete", "vmb", "p", "--timeout=60s"])?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn redefine_without_domain() -> Result<()> {
    let _use = shared().await;
    let (env, cluster) = TestEnv::with_cluster("redefine").await?;
    let size = 64 * MIB;
    let mut vm = start_vm1(cluster, &env, size).await?;
    let mut model = DiskModel::new(size);
    model.write(&vm, "disk0", 0x30, 0, MIB)?;
    vm.quit()?;
    let out = Command::new("qemu-img")
        .args(["bitmap", "--add"])
        .arg(&vm.disk("disk0").image)
        .arg("offline-1")
        .output()?;
    ensure!(
        out.status.success(),
        "qemu-img bitmap --add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The user's own tools keep a full image of the point the bitmap starts at.
    let own = tempfile::tempdir()?;
    let user_full = own.path().join("user-full.qcow2");
    std::fs::copy(&vm.disk("disk0").image, &user_full)?;
    vm.launch()?;
    let qis: Api<QemuInstance> = Api::namespaced(env.client.clone(), &env.namespace);
    wait::until(&qis, "vm1", T, "offline bitmap to show", |qi| {
        qi.status.as_ref().is_some_and(|s| {
            s.disks
                .iter()
                .any(|d| d.bitmaps.iter().any(|b| b.name == "offline-1"))
        })
    })
    .await?;

    apply(
        &env,
        &checkpoint_yaml(
            "redef",
            "vm1",
            "  redefine: true\n  disks:\n  - name: disk0\n    bitmap: offline-1\n",
        ),
    )?;
    let cp = wait_checkpoint(&env, "redef", CheckpointPhase::Ready).await?;
    let status = cp.status.unwrap();
    let domain = condition(&status.conditions, "DomainRecorded").context("DomainRecorded")?;
    assert_eq!(
        (domain.status.as_str(), domain.reason.as_str()),
        ("False", "NotProvided"),
        "{domain:?}"
    );
    assert!(status.domain.is_none(), "{:?}", status.domain);
    assert_eq!(status.disks.len(), 1);
    assert_eq!(status.disks[0].bitmap, "offline-1");
    assert_eq!(vm.bitmaps("disk0")?, vec!["offline-1".to_string()]);

    model.write(&vm, "disk0", 0x31, 2 * MIB, MIB)?;
    let dir = target(cluster, "node-1", &env, "vm1");

    // A push incremental from it: Cairn never wrote the image of that point,
    // so the file stands alone (no backing file) and holds only the changes.
    apply(
        &env,
        &backup_yaml("inc-redef", "vm1", &push_extra(&dir, Some("redef"), None)),
    )?;
    let b = wait_backup(&env, "inc-redef", BackupPhase::Succeeded).await?;
    let bs = b.status.unwrap();
    let ready = condition(&bs.conditions, "Ready")
        .cloned()
        .context("Ready")?;
    assert!(
        ready
            .message
            .contains("only the changes since checkpoint redef")
            && ready.message.contains("qemu-img rebase"),
        "{}",
        ready.message
    );
    assert_eq!(bs.disks[0].incremental_from.as_deref(), Some("redef"));
    assert_eq!(bs.disks[0].backing_file, None);
    let file = PathBuf::from(bs.disks[0].target.clone().context("target")?);
    assert_eq!(file.parent(), Some(dir.as_path()));
    let info = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&file)
        .output()?;
    let info: serde_json::Value = serde_json::from_slice(&info.stdout)?;
    assert!(info.get("backing-filename").is_none(), "{info}");
    // Cairn's restore refuses the chain and says how to complete it...
    let refused = restore(&dir, "inc-redef", &own.path().join("refused.raw"))
        .expect_err("a chain without its base must not restore");
    assert!(
        format!("{refused:#}").contains("qemu-img rebase"),
        "{refused:#}"
    );
    assert!(!own.path().join("refused.raw").exists());
    // ...and following that advice gives the disk as it was at the backup.
    let copy = own.path().join("inc.qcow2");
    std::fs::copy(&file, &copy)?;
    for args in [
        vec!["rebase", "-u", "-F", "qcow2", "-b"],
        vec!["convert", "-O", "raw"],
    ] {
        let mut c = Command::new("qemu-img");
        c.args(&args);
        if args[0] == "rebase" {
            c.arg(&user_full).arg(&copy);
        } else {
            c.arg(&copy).arg(own.path().join("rebased.raw"));
        }
        let o = c.output()?;
        ensure!(
            o.status.success(),
            "qemu-img {}: {}",
            args[0],
            String::from_utf8_lossy(&o.stderr)
        );
    }
    assert!(
        std::fs::read(own.path().join("rebased.raw"))? == model.0,
        "the standalone incremental rebased onto the user's image differs from the disk"
    );

    // A push chain of its own...
    apply(
        &env,
        &backup_yaml("full-1", "vm1", &push_extra(&dir, None, Some("c1"))),
    )?;
    wait_backup(&env, "full-1", BackupPhase::Succeeded).await?;
    assert_restores(&dir, "full-1", &model)?;
    model.write(&vm, "disk0", 0x32, 10 * MIB, MIB)?;
    apply(
        &env,
        &backup_yaml("inc-1", "vm1", &push_extra(&dir, Some("c1"), None)),
    )?;
    wait_backup(&env, "inc-1", BackupPhase::Succeeded).await?;
    assert_restores(&dir, "inc-1", &model)?;

    // ...and the redefined checkpoint as an independent chain, pulled.
    let (disk, extents) = pull_since(&env, "pull-redef", "redef").await?;
    assert_eq!(disk.incremental_from.as_deref(), Some("redef"));
    assert_eq!(
        extents,
        vec![(2 * MIB, MIB), (10 * MIB, MIB)],
        "the redefined bitmap must hold every write since it was added offline"
    );
    kubectl(&env, &["delete", "vmb", "pull-redef", "--timeout=60s"])?;
    assert_clean(&vm)?;
    let mut bitmaps = vm.bitmaps("disk0")?;
    bitmaps.sort();
    assert_eq!(bitmaps, vec!["c1".to_string(), "offline-1".to_string()]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn two_vms_on_two_nodes() -> Result<()> {
    let _use = shared().await;
    let (env, cluster) = TestEnv::with_cluster("two-nodes").await?;
    let size = 32 * MIB;
    let vms = [("vm-a", "node-1", 0xa1u8), ("vm-b", "node-2", 0xb2u8)];
    let mut running = Vec::new();
    for (name, node, pattern) in vms {
        let vm = start_vm(cluster, &env, node, name, &[("disk0", "qcow2", size)])?;
        wait_instance(&env, name, node).await?;
        let mut model = DiskModel::new(size);
        model.write(&vm, "disk0", pattern, MIB, 2 * MIB)?;
        running.push((vm, model));
    }
    for (name, node, _) in vms {
        apply(&env, &checkpoint_yaml(&format!("cp-{name}"), name, ""))?;
        let dir = target(cluster, node, &env, name);
        apply(
            &env,
            &backup_yaml(
                &format!("b-{name}"),
                name,
                &push_extra(&dir, None, Some(&format!("bc-{name}"))),
            ),
        )?;
    }
    for ((name, node, _), (vm, model)) in vms.iter().zip(&running) {
        let cp = wait_checkpoint(&env, &format!("cp-{name}"), CheckpointPhase::Ready).await?;
        assert_eq!(cp.labels()["cairn.dev/node"], *node);
        assert_eq!(cp.status.unwrap().node_name.as_deref(), Some(*node));
        let b = wait_backup(&env, &format!("b-{name}"), BackupPhase::Succeeded).await?;
        assert_eq!(b.labels()["cairn.dev/node"], *node);
        assert_eq!(b.status.as_ref().unwrap().node_name.as_deref(), Some(*node));
        let bc = wait_checkpoint(&env, &format!("bc-{name}"), CheckpointPhase::Ready).await?;
        assert_eq!(bc.labels()["cairn.dev/node"], *node);
        let mut bitmaps = vm.bitmaps("disk0")?;
        bitmaps.sort();
        assert_eq!(
            bitmaps,
            vec![format!("bc-{name}"), format!("cp-{name}")],
            "bitmaps of {name}"
        );
        let dir = target(cluster, node, &env, name);
        assert_restores(&dir, &format!("b-{name}"), model)?;
        assert_clean(vm)?;
    }
    // Nothing landed on the other node.
    assert!(files_in(&target(cluster, "node-2", &env, "vm-a")).is_empty());
    assert!(files_in(&target(cluster, "node-1", &env, "vm-b")).is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn tenancy_other_namespace_cannot_touch_a_vm() -> Result<()> {
    let _use = shared().await;
    let (env_a, cluster) = TestEnv::with_cluster("tenant-a").await?;
    let env_b = TestEnv::on(&cluster.cp, "tenant-b").await?;
    let vm = start_vm(
        cluster,
        &env_a,
        "node-1",
        "vm1",
        &[("disk0", "qcow2", 16 * MIB)],
    )?;
    wait_instance(&env_a, "vm1", "node-1").await?;

    let dir = target(cluster, "node-1", &env_b, "vm1");
    apply(&env_b, &checkpoint_yaml("steal", "vm1", ""))?;
    apply(
        &env_b,
        &backup_yaml("steal-b", "vm1", &push_extra(&dir, None, Some("steal-c"))),
    )?;
    let cp = wait_checkpoint(&env_b, "steal", CheckpointPhase::Failed).await?;
    let c = condition(&cp.status.as_ref().unwrap().conditions, "Ready")
        .cloned()
        .context("Ready")?;
    assert_eq!(c.reason, "VirtualMachineNotFound", "{}", c.message);
    assert!(c.message.contains(&env_b.namespace), "{}", c.message);
    let b = wait_backup(&env_b, "steal-b", BackupPhase::Failed).await?;
    let c = condition(&b.status.as_ref().unwrap().conditions, "Ready")
        .cloned()
        .context("Ready")?;
    assert_eq!(c.reason, "VirtualMachineNotFound", "{}", c.message);
    assert!(
        !cp.labels().contains_key("cairn.dev/node") && !b.labels().contains_key("cairn.dev/node"),
        "routed across namespaces"
    );
    let api: Api<VirtualMachineCheckpoint> =
        Api::namespaced(env_b.client.clone(), &env_b.namespace);
    assert!(api.get_opt("steal-c").await?.is_none());
    // Give a wrongly routed agent time to act, then look at A's VM.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        vm.bitmaps("disk0")?.is_empty(),
        "{:?}",
        vm.bitmaps("disk0")?
    );
    assert_clean(&vm)?;
    assert!(!dir.exists(), "{} was created", dir.display());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_restart_mid_backup() -> Result<()> {
    let _use = exclusive().await;
    let (env, cluster) = TestEnv::with_cluster("agent-restart").await?;
    let size = 256 * MIB;
    let vm = start_vm1(cluster, &env, size).await?;
    let mut model = DiskModel::new(size);
    model.write(&vm, "disk0", 0x5a, 0, size)?;
    let dir = target(cluster, "node-1", &env, "vm1");
    let job = apply_slow_backup(
        &env,
        &vm,
        &backup_yaml("b", "vm1", &push_extra(&dir, None, Some("c1"))),
    )?;
    wait_running(&env, "b").await?;
    let before = wait_progress(&env, "b", 0).await?;

    cluster.restart_agent("node-1")?;
    // The new agent re-attaches: it reports progress of the same job.
    wait_progress(&env, "b", before + MIB as i64).await?;
    set_job_speed(&vm, &job, 0)?;
    let b = wait_backup(&env, "b", BackupPhase::Succeeded).await?;
    assert_eq!(b.status.unwrap().disks.len(), 1);
    wait_checkpoint(&env, "c1", CheckpointPhase::Ready).await?;
    assert_restores(&dir, "b", &model)?;
    assert_clean(&vm)?;
    assert_eq!(vm.bitmaps("disk0")?, vec!["c1".to_string()]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn backup_deleted_while_its_agent_is_down() -> Result<()> {
    let _use = exclusive().await;
    let (env, cluster) = TestEnv::with_cluster("agent-down-delete").await?;
    let size = 256 * MIB;
    let vm = start_vm1(cluster, &env, size).await?;
    vm.write("disk0", 0x4d, 0, size)?;
    let dir = target(cluster, "node-1", &env, "vm1");
    apply_slow_backup(
        &env,
        &vm,
        &backup_yaml("b", "vm1", &push_extra(&dir, None, None)),
    )?;
    wait_running(&env, "b").await?;
    assert!(
        !files_in(&dir).is_empty(),
        "the running backup has no target file"
    );

    cluster.stop_process("agent-node-1")?;
    kubectl(&env, &["delete", "vmb", "b", "--wait=false"])?;
    cluster.start_agent("node-1")?;
    let api: Api<VirtualMachineBackup> = Api::namespaced(env.client.clone(), &env.namespace);
    wait::gone(&api, "b", T).await?;
    assert_clean(&vm)?;
    assert!(
        files_in(&dir).is_empty(),
        "partial files left: {:?}",
        files_in(&dir)
    );
    assert!(vm.bitmaps("disk0")?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn operator_restart_mid_backup() -> Result<()> {
    let _use = exclusive().await;
    let (env, cluster) = TestEnv::with_cluster("operator-restart").await?;
    let size = 256 * MIB;
    let vm = start_vm1(cluster, &env, size).await?;
    let mut model = DiskModel::new(size);
    model.write(&vm, "disk0", 0x6b, 0, size)?;
    let dir = target(cluster, "node-1", &env, "vm1");
    let job = apply_slow_backup(
        &env,
        &vm,
        &backup_yaml("b", "vm1", &push_extra(&dir, None, Some("c1"))),
    )?;
    wait_running(&env, "b").await?;

    cluster.stop_process("operator-0")?;
    // Work that arrives while no operator runs waits for the next one.
    apply(&env, &checkpoint_yaml("during", "vm1", ""))?;
    cluster.start_operator("operator-0")?;
    set_job_speed(&vm, &job, 0)?;
    wait_backup(&env, "b", BackupPhase::Succeeded).await?;
    wait_checkpoint(&env, "c1", CheckpointPhase::Ready).await?;
    let cp = wait_checkpoint(&env, "during", CheckpointPhase::Ready).await?;
    assert_eq!(cp.status.unwrap().parent.as_deref(), Some("c1"));
    assert_restores(&dir, "b", &model)?;
    assert_clean(&vm)?;
    let mut bitmaps = vm.bitmaps("disk0")?;
    bitmaps.sort();
    assert_eq!(bitmaps, vec!["c1".to_string(), "during".to_string()]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn apiserver_restart() -> Result<()> {
    let _use = exclusive().await;
    let (env, cluster) = TestEnv::with_cluster("apiserver-restart").await?;
    let size = 128 * MIB;
    let vm = start_vm1(cluster, &env, size).await?;
    apply(&env, &checkpoint_yaml("before", "vm1", ""))?;
    wait_checkpoint(&env, "before", CheckpointPhase::Ready).await?;
    let mut model = DiskModel::new(size);
    model.write(&vm, "disk0", 0x7c, 0, size)?;
    let dir = target(cluster, "node-1", &env, "vm1");
    let job = apply_slow_backup(
        &env,
        &vm,
        &backup_yaml("b", "vm1", &push_extra(&dir, None, Some("c-b"))),
    )?;
    wait_running(&env, "b").await?;

    tokio::task::spawn_blocking(|| cluster.cp.restart_apiserver()).await??;
    set_job_speed(&vm, &job, 0)?;
    wait_backup(&env, "b", BackupPhase::Succeeded).await?;
    assert_restores(&dir, "b", &model)?;
    // Watches of operator and agent recovered: new work is picked up.
    apply(&env, &checkpoint_yaml("after", "vm1", ""))?;
    let cp = wait_checkpoint(&env, "after", CheckpointPhase::Ready).await?;
    assert_eq!(cp.status.unwrap().parent.as_deref(), Some("c-b"));
    kubectl(&env, &["delete", "vmcp", "before", "--timeout=60s"])?;
    let mut bitmaps = vm.bitmaps("disk0")?;
    bitmaps.sort();
    assert_eq!(bitmaps, vec!["after".to_string(), "c-b".to_string()]);
    assert_clean(&vm)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_a_running_backup_cancels_it() -> Result<()> {
    let _use = shared().await;
    let (env, cluster) = TestEnv::with_cluster("cancel").await?;
    let size = 256 * MIB;
    let vm = start_vm1(cluster, &env, size).await?;
    let dir = target(cluster, "node-1", &env, "vm1");
    apply(
        &env,
        &backup_yaml("full", "vm1", &push_extra(&dir, None, Some("c1"))),
    )?;
    wait_backup(&env, "full", BackupPhase::Succeeded).await?;
    wait_checkpoint(&env, "c1", CheckpointPhase::Ready).await?;
    let files_before = files_in(&dir);
    vm.write("disk0", 0x77, 0, size)?;

    apply_slow_backup(
        &env,
        &vm,
        &backup_yaml("inc", "vm1", &push_extra(&dir, Some("c1"), None)),
    )?;
    wait_running(&env, "inc").await?;
    assert!(
        files_in(&dir).len() > files_before.len(),
        "the running backup has no target file"
    );
    kubectl(&env, &["delete", "vmb", "inc", "--wait=false"])?;
    let api: Api<VirtualMachineBackup> = Api::namespaced(env.client.clone(), &env.namespace);
    wait::gone(&api, "inc", Duration::from_secs(30)).await?;
    assert_clean(&vm)?;
    assert_eq!(files_in(&dir), files_before, "partial files left");
    assert_eq!(vm.bitmaps("disk0")?, vec!["c1".to_string()]);
    // Its bitmap is intact, so it stays Ready with the reason it was made with.
    wait_checkpoint_ready_condition(&env, "c1", "True", "CreatedByBackup").await?;
    Ok(())
}

fn resource_versions(env: &TestEnv) -> Result<BTreeMap<String, String>> {
    let out = kubectl(
        env,
        &[
            "get",
            "vmcp,vmb",
            "-o",
            "jsonpath={range .items[*]}{.kind}/{.metadata.name}={.metadata.resourceVersion}{\"\\n\"}{end}",
        ],
    )?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

#[tokio::test(flavor = "multi_thread")]
async fn gitops_apply_twice_changes_nothing() -> Result<()> {
    let _use = shared().await;
    let (env, cluster) = TestEnv::with_cluster("gitops").await?;
    let vm = start_vm1(cluster, &env, 16 * MIB).await?;
    let dir = target(cluster, "node-1", &env, "vm1");
    let manifests = format!(
        "{}\n---\n{}",
        checkpoint_yaml("nightly-cp", "vm1", "  description: tracked by git\n"),
        backup_yaml(
            "nightly-full",
            "vm1",
            &push_extra(&dir, None, Some("nightly-bc"))
        )
    );
    apply(&env, &manifests)?;
    wait_backup(&env, "nightly-full", BackupPhase::Succeeded).await?;
    // Settled: both checkpoints Ready (verification keeps the reason they were made with).
    wait_checkpoint_ready_condition(&env, "nightly-cp", "True", "Created").await?;
    wait_checkpoint_ready_condition(&env, "nightly-bc", "True", "CreatedByBackup").await?;
    let settled = resource_versions(&env)?;
    assert_eq!(settled.len(), 3, "{settled:?}");

    let (ok, out, err) = env.kubectl_stdin(&["apply", "-f", "-"], &manifests)?;
    ensure!(ok, "second apply failed: {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines.iter().all(|l| l.ends_with(" unchanged")),
        "second apply changed something:\n{out}"
    );
    // Longer than the agent's verify period (15 s).
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(
        resource_versions(&env)?,
        settled,
        "objects kept changing after they settled"
    );
    let mut bitmaps = vm.bitmaps("disk0")?;
    bitmaps.sort();
    assert_eq!(
        bitmaps,
        vec!["nightly-bc".to_string(), "nightly-cp".to_string()]
    );
    assert_eq!(files_in(&dir).len(), 2, "{:?}", files_in(&dir));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_checkpoints_on_one_vm() -> Result<()> {
    let _use = shared().await;
    let (env, cluster) = TestEnv::with_cluster("fifty").await?;
    let vm = start_vm1(cluster, &env, 16 * MIB).await?;
    let names: Vec<String> = (1..=50).map(|i| format!("cp-{i:02}")).collect();
    let yaml = names
        .iter()
        .map(|n| checkpoint_yaml(n, "vm1", ""))
        .collect::<Vec<_>>()
        .join("\n---\n");
    apply(&env, &yaml)?;
    for (i, n) in names.iter().enumerate() {
        let cp = wait_checkpoint(&env, n, CheckpointPhase::Ready).await?;
        let parent = cp.status.unwrap().parent;
        let expected = i.checked_sub(1).map(|p| names[p].clone());
        assert_eq!(parent, expected, "parent of {n}");
    }
    let mut bitmaps = vm.bitmaps("disk0")?;
    bitmaps.sort();
    assert_eq!(bitmaps, names);

    kubectl(&env, &["delete", "vmcp", "--all", "--wait=false"])?;
    let api: Api<VirtualMachineCheckpoint> = Api::namespaced(env.client.clone(), &env.namespace);
    for n in &names {
        wait::gone(&api, n, T).await?;
    }
    assert!(
        vm.bitmaps("disk0")?.is_empty(),
        "{:?}",
        vm.bitmaps("disk0")?
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn qemu_restarts_clean_and_killed() -> Result<()> {
    let _use = shared().await;
    let (env, cluster) = TestEnv::with_cluster("qemu-restart").await?;
    let size = 64 * MIB;
    let mut vm = start_vm1(cluster, &env, size).await?;
    let dir = target(cluster, "node-1", &env, "vm1");
    let mut model = DiskModel::new(size);
    model.write(&vm, "disk0", 0x10, 0, MIB)?;
    apply(
        &env,
        &backup_yaml("full", "vm1", &push_extra(&dir, None, Some("c1"))),
    )?;
    wait_backup(&env, "full", BackupPhase::Succeeded).await?;
    wait_checkpoint(&env, "c1", CheckpointPhase::Ready).await?;

    // Clean restart: c1 is written to the image and found again.
    vm.quit()?;
    vm.launch()?;
    model.write(&vm, "disk0", 0x21, 4 * MIB, MIB)?;
    wait_checkpoint_until(&env, "c1", "c1 found again and counting writes", |c| {
        let s = c.status.clone().unwrap_or_default();
        s.phase == Some(CheckpointPhase::Ready)
            && condition(&s.conditions, "Ready").is_some_and(|c| c.status == "True")
            && s.size.is_some_and(|n| n >= MIB as i64)
    })
    .await?;

    // c2 lives only in QEMU's memory; SIGKILL loses it and leaves c1 inconsistent.
    apply(&env, &checkpoint_yaml("c2", "vm1", ""))?;
    wait_checkpoint(&env, "c2", CheckpointPhase::Ready).await?;
    model.write(&vm, "disk0", 0x22, 8 * MIB, MIB)?;
    flush(&vm, "disk0")?;
    vm.kill();
    vm.launch()?;
    wait_checkpoint_ready_condition(&env, "c2", "False", "BitmapMissing").await?;
    let c1 = wait_checkpoint_ready_condition(&env, "c1", "False", "BitmapInconsistent").await?;
    // The relaunched QEMU is published (the killed one's QemuInstance was removed).
    wait_instance_until(&env, "vm1", "the relaunched VM", |qi| {
        instance_bitmap_inconsistent(qi, "c1")
    })
    .await?;
    assert!(
        c1.status.unwrap().disks.iter().all(|d| d.inconsistent),
        "disk status does not say inconsistent"
    );

    apply(
        &env,
        &backup_yaml("strict", "vm1", &push_extra(&dir, Some("c1"), None)),
    )?;
    let b = wait_backup(&env, "strict", BackupPhase::Failed).await?;
    let ready = condition(&b.status.as_ref().unwrap().conditions, "Ready")
        .cloned()
        .context("Ready")?;
    assert_eq!(ready.reason, "IncrementalBaseUnusable", "{}", ready.message);
    assert!(ready.message.contains("inconsistent"), "{}", ready.message);

    let mut extra = push_extra(&dir, Some("c1"), Some("c3"));
    extra.push_str("  fallbackToFull: true\n");
    apply(&env, &backup_yaml("fallback", "vm1", &extra))?;
    let b = wait_backup(&env, "fallback", BackupPhase::Succeeded).await?;
    let disk = &b.status.as_ref().unwrap().disks[0];
    assert!(disk.fell_back_to_full, "{disk:?}");
    assert!(
        disk.backing_file.is_none(),
        "a full backup has no backing file: {disk:?}"
    );
    assert_restores(&dir, "fallback", &model)?;
    wait_checkpoint(&env, "c3", CheckpointPhase::Ready).await?;
    assert_clean(&vm)?;

    // The broken checkpoints can be deleted; the inconsistent bitmap goes with c1.
    kubectl(&env, &["delete", "vmcp", "c1", "c2", "--timeout=60s"])?;
    assert_eq!(vm.bitmaps("disk0")?, vec!["c3".to_string()]);
    Ok(())
}
