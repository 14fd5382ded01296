//! Bad input end to end: every case ends `Failed` with a condition whose
//! reason is stable and whose message names the problem, and leaves nothing
//! behind — no stray bitmaps, no `cairn-` jobs, block nodes or exports in
//! QEMU, no files in the backup target.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, ensure};
use cairn_api::{BackupPhase, CheckpointPhase, VirtualMachineBackup, VirtualMachineCheckpoint};
use cairn_e2e::harness::TestEnv;
use cairn_e2e::local_cluster::LocalCluster;
use cairn_e2e::scenario::*;
use cairn_e2e::vm::TestVm;
use cairn_e2e::wait;
use kube::Api;

/// The `Ready` condition's (reason, message) of a failed checkpoint.
async fn checkpoint_failure(env: &TestEnv, name: &str) -> Result<(String, String)> {
    let cp = wait_checkpoint(env, name, CheckpointPhase::Failed).await?;
    let status = cp.status.unwrap_or_default();
    let c = condition(&status.conditions, "Ready")
        .ok_or_else(|| anyhow::anyhow!("checkpoint {name} Failed without a Ready condition"))?;
    ensure!(
        c.status == "False",
        "Ready is {} on a Failed checkpoint",
        c.status
    );
    // kstatus reads Stalled: a terminal failure says so with the same reason.
    let stalled = condition(&status.conditions, "Stalled")
        .ok_or_else(|| anyhow::anyhow!("checkpoint {name} Failed without a Stalled condition"))?;
    ensure!(
        stalled.status == "True" && stalled.reason == c.reason && stalled.message == c.message,
        "Stalled does not repeat the failure: {stalled:?} vs Ready {c:?}"
    );
    Ok((c.reason.clone(), c.message.clone()))
}

/// The `Ready` condition's (reason, message) of a failed backup.
async fn backup_failure(env: &TestEnv, name: &str) -> Result<(String, String)> {
    let b = wait_backup(env, name, BackupPhase::Failed).await?;
    let status = b.status.unwrap_or_default();
    let c = condition(&status.conditions, "Ready")
        .ok_or_else(|| anyhow::anyhow!("backup {name} Failed without a Ready condition"))?;
    ensure!(
        c.status == "False",
        "Ready is {} on a Failed backup",
        c.status
    );
    // kstatus reads Stalled: a terminal failure says so with the same reason.
    let stalled = condition(&status.conditions, "Stalled")
        .ok_or_else(|| anyhow::anyhow!("backup {name} Failed without a Stalled condition"))?;
    ensure!(
        stalled.status == "True" && stalled.reason == c.reason && stalled.message == c.message,
        "Stalled does not repeat the failure: {stalled:?} vs Ready {c:?}"
    );
    Ok((c.reason.clone(), c.message.clone()))
}

fn assert_failure(got: &(String, String), reason: &str, names: &[&str]) {
    assert_eq!(got.0, reason, "reason; message: {}", got.1);
    for n in names {
        assert!(got.1.contains(n), "message does not name {n:?}: {}", got.1);
    }
}

/// Nothing of Cairn's is left in QEMU and only `bitmaps` are on `disk`.
fn assert_clean(vm: &TestVm, disk: &str, bitmaps: &[&str]) -> Result<()> {
    let left = leftovers(vm)?;
    assert!(left.is_empty(), "left behind in QEMU: {left:?}");
    let mut have = vm.bitmaps(disk)?;
    have.sort();
    let mut want: Vec<String> = bitmaps.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(have, want, "bitmaps on {disk}");
    Ok(())
}

fn target(cluster: &LocalCluster, env: &TestEnv, vm: &str) -> PathBuf {
    cluster.backup_dir("node-1").join(&env.namespace).join(vm)
}

fn assert_no_files(dir: &Path) {
    let files = files_in(dir);
    assert!(
        files.is_empty(),
        "files left in {}: {files:?}",
        dir.display()
    );
}

/// Deletes a (failed) object and waits until it is gone: a failure must not
/// leave a finalizer stuck.
async fn delete_and_wait(env: &TestEnv, kind: &str, name: &str) -> Result<()> {
    kubectl(env, &["delete", kind, name, "--wait=false"])?;
    match kind {
        "vmcp" => {
            let api: Api<VirtualMachineCheckpoint> =
                Api::namespaced(env.client.clone(), &env.namespace);
            wait::gone(&api, name, T).await
        }
        _ => {
            let api: Api<VirtualMachineBackup> =
                Api::namespaced(env.client.clone(), &env.namespace);
            wait::gone(&api, name, T).await
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_vm() -> Result<()> {
    let (env, cluster) = TestEnv::with_cluster("bad-vm").await?;
    // A real VM in the namespace, so "nothing happened" can be checked on it.
    let vm = start_vm1(cluster, &env, 16 * MIB).await?;
    let dir = target(cluster, &env, "ghost");
    apply(&env, &checkpoint_yaml("cp", "ghost", ""))?;
    apply(
        &env,
        &backup_yaml("b", "ghost", &push_extra(&dir, None, None)),
    )?;
    let got = checkpoint_failure(&env, "cp").await?;
    assert_failure(&got, "VirtualMachineNotFound", &["ghost"]);
    let got = backup_failure(&env, "b").await?;
    assert_failure(&got, "VirtualMachineNotFound", &["ghost"]);
    assert_clean(&vm, "disk0", &[])?;
    assert!(!dir.exists(), "{} was created", dir.display());
    delete_and_wait(&env, "vmcp", "cp").await?;
    delete_and_wait(&env, "vmb", "b").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_disk() -> Result<()> {
    let (env, cluster) = TestEnv::with_cluster("bad-disk").await?;
    let vm = start_vm1(cluster, &env, 16 * MIB).await?;
    let dir = target(cluster, &env, "vm1");
    apply(
        &env,
        &checkpoint_yaml("cp", "vm1", "  disks:\n  - name: disk0\n  - name: vdz\n"),
    )?;
    let mut extra = push_extra(&dir, None, Some("cp-by-b"));
    extra.push_str("  disks:\n  - name: vdz\n");
    apply(&env, &backup_yaml("b", "vm1", &extra))?;
    let got = checkpoint_failure(&env, "cp").await?;
    assert_failure(&got, "UnknownDisk", &["vdz"]);
    let got = backup_failure(&env, "b").await?;
    assert_failure(&got, "UnknownDisk", &["vdz"]);
    // The checkpoint the backup was to create fails with it.
    let got = checkpoint_failure(&env, "cp-by-b").await?;
    assert_failure(&got, "BackupFailed", &["b"]);
    assert_clean(&vm, "disk0", &[])?;
    assert_no_files(&dir);
    delete_and_wait(&env, "vmcp", "cp").await?;
    delete_and_wait(&env, "vmb", "b").await?;
    assert_clean(&vm, "disk0", &[])?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn raw_disk_selected_explicitly() -> Result<()> {
    let (env, cluster) = TestEnv::with_cluster("bad-raw").await?;
    let vm = start_vm(
        cluster,
        &env,
        "node-1",
        "vm1",
        &[("disk0", "qcow2", 16 * MIB), ("disk1", "raw", 16 * MIB)],
    )?;
    wait_instance(&env, "vm1", "node-1").await?;
    let dir = target(cluster, &env, "vm1");
    apply(
        &env,
        &checkpoint_yaml("cp", "vm1", "  disks:\n  - name: disk0\n  - name: disk1\n"),
    )?;
    let mut extra = push_extra(&dir, None, Some("cp-by-b"));
    extra.push_str("  disks:\n  - name: disk1\n");
    apply(&env, &backup_yaml("b", "vm1", &extra))?;
    let got = checkpoint_failure(&env, "cp").await?;
    assert_failure(&got, "DiskNotQcow2", &["disk1"]);
    let got = backup_failure(&env, "b").await?;
    assert_failure(&got, "DiskNotQcow2", &["disk1"]);
    // All or nothing: disk0 got no bitmap either.
    assert_clean(&vm, "disk0", &[])?;
    assert_no_files(&dir);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_incremental_base() -> Result<()> {
    let (env, cluster) = TestEnv::with_cluster("bad-base").await?;
    let vm = start_vm1(cluster, &env, 16 * MIB).await?;
    let dir = target(cluster, &env, "vm1");
    apply(
        &env,
        &backup_yaml(
            "b",
            "vm1",
            &push_extra(&dir, Some("no-such-cp"), Some("next")),
        ),
    )?;
    let got = backup_failure(&env, "b").await?;
    assert_failure(&got, "UnknownIncrementalBase", &["no-such-cp"]);
    // Rejected before routing: the checkpoint to create is not created at all.
    let api: Api<VirtualMachineCheckpoint> = Api::namespaced(env.client.clone(), &env.namespace);
    assert!(
        api.get_opt("next").await?.is_none(),
        "checkpoint next was created"
    );
    assert_clean(&vm, "disk0", &[])?;
    assert_no_files(&dir);
    delete_and_wait(&env, "vmb", "b").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn incremental_base_of_another_vm() -> Result<()> {
    let (env, cluster) = TestEnv::with_cluster("bad-foreign").await?;
    let vm1 = start_vm(
        cluster,
        &env,
        "node-1",
        "vm1",
        &[("disk0", "qcow2", 16 * MIB)],
    )?;
    let vm2 = start_vm(
        cluster,
        &env,
        "node-1",
        "vm2",
        &[("disk0", "qcow2", 16 * MIB)],
    )?;
    wait_instance(&env, "vm1", "node-1").await?;
    wait_instance(&env, "vm2", "node-1").await?;
    apply(&env, &checkpoint_yaml("cp-vm2", "vm2", ""))?;
    wait_checkpoint(&env, "cp-vm2", CheckpointPhase::Ready).await?;
    let dir = target(cluster, &env, "vm1");
    apply(
        &env,
        &backup_yaml("b", "vm1", &push_extra(&dir, Some("cp-vm2"), None)),
    )?;
    let got = backup_failure(&env, "b").await?;
    assert_failure(&got, "IncrementalBaseOfOtherVM", &["cp-vm2", "vm2", "vm1"]);
    assert_clean(&vm1, "disk0", &[])?;
    assert_clean(&vm2, "disk0", &["cp-vm2"])?;
    assert_no_files(&dir);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn inconsistent_base_without_fallback() -> Result<()> {
    let (env, cluster) = TestEnv::with_cluster("bad-inconsistent").await?;
    let mut vm = start_vm1(cluster, &env, 16 * MIB).await?;
    let dir = target(cluster, &env, "vm1");
    apply(
        &env,
        &backup_yaml("full", "vm1", &push_extra(&dir, None, Some("c1"))),
    )?;
    wait_backup(&env, "full", BackupPhase::Succeeded).await?;
    wait_checkpoint(&env, "c1", CheckpointPhase::Ready).await?;
    let before = files_in(&dir);
    // Persist c1, then crash QEMU: c1 loads inconsistent.
    vm.quit()?;
    vm.launch()?;
    // Kill only once QEMU has loaded (and marked in use) the persisted bitmap.
    wait::condition(T, "QEMU to load bitmap c1", || {
        vm.bitmaps("disk0")
            .is_ok_and(|b| b.contains(&"c1".to_string()))
    })
    .await?;
    vm.kill();
    vm.launch()?;
    wait_checkpoint_ready_condition(&env, "c1", "False", "BitmapInconsistent").await?;
    // The relaunched QEMU is published (the killed one's QemuInstance was removed).
    wait_instance_until(&env, "vm1", "the relaunched VM", |qi| {
        instance_bitmap_inconsistent(qi, "c1")
    })
    .await?;
    apply(
        &env,
        &backup_yaml("inc", "vm1", &push_extra(&dir, Some("c1"), Some("c2"))),
    )?;
    // Right after a QEMU restart the operator may briefly not see the VM and
    // reject with VirtualMachineNotFound, which it revises once the VM is back.
    let api: Api<VirtualMachineBackup> = Api::namespaced(env.client.clone(), &env.namespace);
    wait::until(&api, "inc", T, "a verdict on the base", |b| {
        b.status
            .as_ref()
            .and_then(|s| condition(&s.conditions, "Ready"))
            .is_some_and(|c| {
                c.reason != "VirtualMachineNotFound" && c.status == "False" && c.reason != "Running"
            })
    })
    .await?;
    let got = backup_failure(&env, "inc").await?;
    assert_failure(
        &got,
        "IncrementalBaseUnusable",
        &["c1", "disk0", "inconsistent", "fallbackToFull"],
    );
    let got = checkpoint_failure(&env, "c2").await?;
    assert_failure(&got, "BackupFailed", &["inc"]);
    // Only the inconsistent bitmap (which only a delete may remove) is there.
    assert_clean(&vm, "disk0", &["c1"])?;
    assert_eq!(files_in(&dir), before, "the failed backup left files");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn target_outside_allowed_roots() -> Result<()> {
    let (env, cluster) = TestEnv::with_cluster("bad-target").await?;
    let vm = start_vm1(cluster, &env, 16 * MIB).await?;
    let outside = std::env::temp_dir().join(format!("elsewhere-{}", env.namespace));
    // Inside the root by prefix, outside by path: the schema refuses `..` at admission.
    let escape = cluster.backup_dir("node-1").join("..").join("escaped");
    let (ok, _, err) = env.kubectl_stdin(
        &["apply", "-f", "-"],
        &backup_yaml("b2", "vm1", &push_extra(&escape, None, None)),
    )?;
    assert!(
        !ok && err.contains(".."),
        "`..` in the target was admitted: {err}"
    );
    apply(
        &env,
        &backup_yaml("b", "vm1", &push_extra(&outside, None, Some("c-out"))),
    )?;
    let got = backup_failure(&env, "b").await?;
    let root = cluster.backup_dir("node-1").display().to_string();
    assert_failure(
        &got,
        "TargetNotAllowed",
        &[outside.to_str().unwrap(), root.as_str()],
    );
    let got = checkpoint_failure(&env, "c-out").await?;
    assert_failure(&got, "BackupFailed", &["b"]);
    assert!(!outside.exists(), "{} was created", outside.display());
    let escaped = cluster.state_dir.join("nodes/node-1/escaped");
    assert!(!escaped.exists(), "{} was created", escaped.display());
    assert_clean(&vm, "disk0", &[])?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn duplicate_bitmap() -> Result<()> {
    let (env, cluster) = TestEnv::with_cluster("bad-dup").await?;
    let vm = start_vm(
        cluster,
        &env,
        "node-1",
        "vm1",
        &[("disk0", "qcow2", 16 * MIB)],
    )?;
    // A bitmap someone else made, named like the checkpoint.
    vm.qmp(
        "block-dirty-bitmap-add",
        serde_json::json!({"node": "disk0-fmt", "name": "dup", "persistent": true}),
    )?;
    wait_instance(&env, "vm1", "node-1").await?;
    apply(&env, &checkpoint_yaml("dup", "vm1", ""))?;
    let got = checkpoint_failure(&env, "dup").await?;
    assert_failure(&got, "BitmapExists", &["dup", "disk0"]);
    assert_clean(&vm, "disk0", &["dup"])?;
    // Deleting the failed checkpoint must not take the foreign bitmap with it.
    delete_and_wait(&env, "vmcp", "dup").await?;
    assert_clean(&vm, "disk0", &["dup"])?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn redefine_of_missing_bitmap() -> Result<()> {
    let (env, cluster) = TestEnv::with_cluster("bad-redefine").await?;
    let vm = start_vm1(cluster, &env, 16 * MIB).await?;
    apply(
        &env,
        &checkpoint_yaml(
            "redef",
            "vm1",
            "  redefine: true\n  disks:\n  - name: disk0\n    bitmap: never-made\n",
        ),
    )?;
    let got = checkpoint_failure(&env, "redef").await?;
    assert_failure(&got, "BitmapMissing", &["never-made", "disk0"]);
    assert_clean(&vm, "disk0", &[])?;
    delete_and_wait(&env, "vmcp", "redef").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn vm_killed_mid_backup() -> Result<()> {
    let (env, cluster) = TestEnv::with_cluster("bad-vm-gone").await?;
    let size = 256 * MIB;
    let mut vm = start_vm1(cluster, &env, size).await?;
    vm.write("disk0", 0x5a, 0, size)?;
    let dir = target(cluster, &env, "vm1");
    let (job, ()) = std::thread::scope(|s| -> Result<(String, ())> {
        let t = s.spawn(|| throttle_next_job(&vm, MIB, Duration::from_secs(60)));
        apply(
            &env,
            &backup_yaml("b", "vm1", &push_extra(&dir, None, Some("c1"))),
        )?;
        Ok((t.join().expect("throttle thread")?, ()))
    })?;
    let api: Api<VirtualMachineBackup> = Api::namespaced(env.client.clone(), &env.namespace);
    wait::until(&api, "b", T, "backup Running", |b| {
        b.status.as_ref().and_then(|s| s.phase) == Some(BackupPhase::Running)
    })
    .await?;
    ensure!(
        !files_in(&dir).is_empty(),
        "job {job} runs but no target file exists"
    );
    vm.kill();
    let got = backup_failure(&env, "b").await?;
    assert_failure(&got, "VirtualMachineGone", &["vm1"]);
    assert_no_files(&dir);
    // The checkpoint made in the backup's transaction died with QEMU: it fails
    // (backup failed) or, if it was adopted before the kill, its bitmap is missing.
    vm.launch()?;
    let cp = wait_checkpoint_until(&env, "c1", "c1 Failed or BitmapMissing", |c| {
        let s = c.status.clone().unwrap_or_default();
        s.phase == Some(CheckpointPhase::Failed)
            || condition(&s.conditions, "Ready")
                .is_some_and(|c| c.status == "False" && c.reason == "BitmapMissing")
    })
    .await?;
    let s = cp.status.unwrap_or_default();
    let ready = condition(&s.conditions, "Ready").cloned().unwrap();
    assert!(
        ["BackupFailed", "BitmapMissing"].contains(&ready.reason.as_str()),
        "c1: {ready:?}"
    );
    assert_clean(&vm, "disk0", &[])?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn quiesce_without_guest_agent() -> Result<()> {
    let (env, cluster) = TestEnv::with_cluster("bad-quiesce").await?;
    let vm = start_vm1(cluster, &env, 16 * MIB).await?;
    apply(&env, &checkpoint_yaml("q", "vm1", "  quiesce: true\n"))?;
    let got = checkpoint_failure(&env, "q").await?;
    assert_failure(&got, "QuiesceUnavailable", &["vm1", "guest agent"]);
    assert_clean(&vm, "disk0", &[])?;
    delete_and_wait(&env, "vmcp", "q").await?;
    Ok(())
}
