//! Backups of a stopped VM through `kubectl apply`: the agent opens the
//! images the QemuInstance last recorded in a paused QEMU of its own and runs
//! the same push, pull and repository paths. Full and incremental restore
//! byte for byte; the checkpoints a backup creates land in the images; a VM
//! started during an offline backup is refused by QEMU's image lock, never
//! corrupted, and starts once the backup is over.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use cairn_api::{BackupPhase, CheckpointPhase, QemuInstance};
use cairn_e2e::harness::TestEnv;
use cairn_e2e::repository_access::{backup_into, restore_sha, snapshot_of};
use cairn_e2e::scenario::*;
use cairn_e2e::vm::TestVm;
use cairn_e2e::wait;
use kube::Api;
use sha2::{Digest, Sha256};

async fn stop(env: &TestEnv, vm: &mut TestVm) -> Result<()> {
    vm.quit()?;
    let api: Api<QemuInstance> = Api::namespaced(env.client.clone(), &env.namespace);
    wait::until(&api, &vm.name, T, "QemuInstance stopped", |qi| {
        qi.status.as_ref().and_then(|s| s.run_state.as_deref()) == Some("stopped")
    })
    .await?;
    Ok(())
}

async fn start(env: &TestEnv, vm: &mut TestVm) -> Result<()> {
    vm.launch()?;
    let api: Api<QemuInstance> = Api::namespaced(env.client.clone(), &env.namespace);
    wait::until(&api, &vm.name, T, "QemuInstance running", |qi| {
        qi.status.as_ref().and_then(|s| s.run_state.as_deref()) == Some("running")
    })
    .await?;
    Ok(())
}

/// The image as a file: its content and bitmaps, read with qemu-img.
fn image_bitmaps(vm: &TestVm) -> Result<Vec<String>> {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(&vm.disks[0].image)
        .output()?;
    let info: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let mut names: Vec<String> = info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| b["name"].as_str().map(String::from))
        .collect();
    names.sort();
    Ok(names)
}

#[tokio::test(flavor = "multi_thread")]
async fn full_and_incremental_push_of_a_stopped_vm() -> Result<()> {
    let (env, cluster) = TestEnv::with_cluster("offline-push").await?;
    let size = 32 * MIB;
    let mut vm = start_vm1(cluster, &env, size).await?;
    let dir = cluster
        .backup_dir("node-1")
        .join(&env.namespace)
        .join("vm1");
    let mut model = DiskModel::new(size);
    model.write(&vm, "disk0", 0x41, 0, 4 * MIB)?;
    model.write(&vm, "disk0", 0x42, 20 * MIB, MIB)?;
    stop(&env, &mut vm).await?;

    apply(
        &env,
        &backup_yaml("full", "vm1", &push_extra(&dir, None, Some("c1"))),
    )?;
    wait_backup(&env, "full", BackupPhase::Succeeded).await?;
    wait_verified(&env, "full").await?;
    let at_full = model.sha256();
    // The checkpoint the backup created is in the image, and Ready.
    wait_checkpoint(&env, "c1", CheckpointPhase::Ready).await?;
    ensure!(image_bitmaps(&vm)? == ["c1"], "{:?}", image_bitmaps(&vm)?);

    // The VM runs again, writes, stops: the incremental reads only that.
    start(&env, &mut vm).await?;
    model.write(&vm, "disk0", 0x43, 8 * MIB, 512 * 1024)?;
    stop(&env, &mut vm).await?;
    apply(
        &env,
        &backup_yaml("inc", "vm1", &push_extra(&dir, Some("c1"), Some("c2"))),
    )?;
    let b = wait_backup(&env, "inc", BackupPhase::Succeeded).await?;
    wait_verified(&env, "inc").await?;
    let disk = &b.status.as_ref().context("status")?.disks[0];
    ensure!(
        disk.incremental_from.as_deref() == Some("c1"),
        "not incremental: {disk:?}"
    );
    ensure!(
        disk.bytes_copied.unwrap_or(i64::MAX) <= 2 * MIB as i64,
        "copied too much: {disk:?}"
    );
    wait_checkpoint(&env, "c2", CheckpointPhase::Ready).await?;
    ensure!(image_bitmaps(&vm)? == ["c1", "c2"]);

    let out = tempfile::tempdir()?;
    ensure!(restore(&dir, "full", &out.path().join("full.raw"))? == at_full);
    ensure!(restore(&dir, "inc", &out.path().join("inc.raw"))? == model.sha256());
    // Nothing of the helper is left: the image opens for writing.
    start(&env, &mut vm).await?;
    ensure!(leftovers(&vm)?.is_empty(), "{:?}", leftovers(&vm)?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_vm_into_a_repository() -> Result<()> {
    let (env, cluster) = TestEnv::with_cluster("offline-repo").await?;
    let size = 32 * MIB;
    let mut vm = start_vm1(cluster, &env, size).await?;
    let mut model = DiskModel::new(size);
    model.write(&vm, "disk0", 0x51, 4 * MIB, 6 * MIB)?;
    stop(&env, &mut vm).await?;
    apply(
        &env,
        &backup_yaml("full", "vm1", &backup_into("local-dir", None, Some("r1"))),
    )?;
    let snap = snapshot_of(&env, "full").await?;
    let id = snap.snapshot.clone().context("snapshot id")?;
    ensure!(restore_sha(&env, "local-dir", &id, "disk0")? == model.sha256());
    wait_checkpoint(&env, "r1", CheckpointPhase::Ready).await?;
    ensure!(image_bitmaps(&vm)? == ["r1"]);
    Ok(())
}

/// A pull export keeps the stopped VM's images open: starting the VM then is
/// refused by QEMU's lock (the image is not touched), the export reads the
/// disk exactly, and the VM starts once the backup is deleted.
#[tokio::test(flavor = "multi_thread")]
async fn starting_the_vm_during_an_offline_backup_is_refused_not_corrupting() -> Result<()> {
    let (env, cluster) = TestEnv::with_cluster("offline-lock").await?;
    let size = 16 * MIB;
    let mut vm = start_vm1(cluster, &env, size).await?;
    let mut model = DiskModel::new(size);
    model.write(&vm, "disk0", 0x61, MIB, 2 * MIB)?;
    stop(&env, &mut vm).await?;
    apply(&env, &backup_yaml("pull", "vm1", "  mode: Pull\n"))?;
    let b = wait_backup(&env, "pull", BackupPhase::Exporting).await?;
    let url = b
        .status
        .as_ref()
        .and_then(|s| s.disks.first())
        .and_then(|d| d.target.clone())
        .context("export URL")?;

    let err = vm
        .launch()
        .expect_err("the VM started on images an offline backup holds");
    ensure!(err.to_string().contains("lock"), "{err:#}");

    let out = tempfile::tempdir()?;
    let raw = out.path().join("pulled.raw");
    let o = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &url])
        .arg(&raw)
        .output()?;
    ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    ensure!(hex(&Sha256::digest(std::fs::read(&raw)?)) == model.sha256());

    kubectl(&env, &["delete", "vmb", "pull", "--timeout=60s"])?;
    wait::condition(Duration::from_secs(30), "the VM starts", || {
        vm.launch().is_ok()
    })
    .await?;
    ensure!(content_sha(&vm)? == model.sha256());
    Ok(())
}

fn content_sha(vm: &TestVm) -> Result<String> {
    cairn_e2e::vm::content_sha256(&vm.disks[0].image)
}

/// A tenant of another namespace names the stopped VM: the VM lookup is by
/// namespace, so nothing of the victim's is opened or changed — the backup
/// fails `VirtualMachineNotFound` and the victim's VM starts at once.
#[tokio::test(flavor = "multi_thread")]
async fn another_namespace_cannot_back_up_a_stopped_vm() -> Result<()> {
    let (victim, cluster) = TestEnv::with_cluster("offline-victim").await?;
    let (thief, _) = TestEnv::with_cluster("offline-thief").await?;
    let size = 16 * MIB;
    let mut vm = start_vm1(cluster, &victim, size).await?;
    let mut model = DiskModel::new(size);
    model.write(&vm, "disk0", 0x71, 0, MIB)?;
    stop(&victim, &mut vm).await?;
    let before = content_sha(&vm)?;
    let dir = cluster
        .backup_dir("node-1")
        .join(&thief.namespace)
        .join("stolen");
    apply(
        &thief,
        &backup_yaml("steal", "vm1", &push_extra(&dir, None, Some("stolen"))),
    )?;
    let b = wait_backup(&thief, "steal", BackupPhase::Failed).await?;
    let ready = condition(&b.status.as_ref().context("status")?.conditions, "Ready")
        .context("Ready")?
        .clone();
    ensure!(ready.reason == "VirtualMachineNotFound", "{ready:?}");
    ensure!(files_in(&dir).is_empty(), "{:?}", files_in(&dir));
    ensure!(image_bitmaps(&vm)?.is_empty(), "{:?}", image_bitmaps(&vm)?);
    ensure!(content_sha(&vm)? == before);
    // No helper holds the victim's images.
    start(&victim, &mut vm).await?;
    Ok(())
}
