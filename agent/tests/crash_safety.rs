//! Crash safety against a real QEMU: an agent dropped mid-backup re-attaches,
//! SIGKILLed QEMU leaves inconsistent bitmaps, clean restarts keep checkpoints.

mod common;

use cairn_agent::backup::{
    BackupError, BackupKind, FileScope, PushRequest, TargetPolicy, cleanup_leftovers,
    run_push_backup, start_push_backup,
};
use cairn_agent::checkpoint::{
    CheckpointError, CheckpointRequest, create_checkpoint, redefine_checkpoint,
};
use cairn_agent::identity::OperationId;
use common::*;

fn req(
    uid: &str,
    name: &str,
    dir: &std::path::Path,
    inc: Option<&str>,
    cp: Option<&str>,
) -> PushRequest {
    PushRequest {
        operation: OperationId::new(uid),
        name: name.into(),
        disks: None,
        incremental: inc.map(str::to_string),
        incremental_uid: None,
        new_checkpoint: cp.map(str::to_string),
        new_checkpoint_uid: None,
        target_dir: dir.to_path_buf(),
        fallback_to_full: false,
        standalone_incremental: false,
        speed_limit: None,
        quiesce: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_dropped_mid_backup_reattaches_or_cleans_up() {
    let size = 32 * MIB;
    let mut vm = TestVm::start("reattach", &[("disk0", "qcow2", size)]).await;
    let backups = vm.path().join("backups");
    std::fs::create_dir_all(&backups).unwrap();
    let policy = TargetPolicy::new([backups.clone()]);
    let target = backups.join("default/t");
    let mut model = DiskModel::new(size);
    for i in 0..8u64 {
        vm.write("disk0", 0x40 + i as u8, i * 4 * MIB, 2 * MIB)
            .await;
        model.write(0x40 + i as u8, i * 4 * MIB, 2 * MIB);
    }
    // Slow job (8 MiB/s) so it is surely running when the "agent" goes away.
    let mut r = req("uid-1", "full", &target, None, Some("cp1"));
    r.speed_limit = Some(8 * MIB);
    {
        let running = start_push_backup(&vm.client, &vm.vm, &policy, &r)
            .await
            .unwrap();
        let p = running.progress().await.unwrap();
        assert!(p.bytes_total > 0);
        drop(running);
    }
    // The agent dies (its session closes); QEMU keeps the job.
    vm.reconnect_client().await;
    let jobs = vm.client.query_jobs().await.unwrap();
    assert_eq!(jobs.len(), 1, "job survives the agent: {jobs:?}");
    assert_ne!(jobs[0].status, "concluded");
    // The restarted agent re-attaches with the same request and finishes.
    let agent = vm.client.clone();
    let out = run_push_backup(&agent, &vm.vm, &policy, &r).await.unwrap();
    verify_and_check(&out.manifest_path).await;
    assert!(image_bytes(&target.join(&out.manifest.disks[0].file)) == model.bytes);
    assert_no_leftovers(&agent).await;

    // Second case: the restarted agent decides to abandon the operation.
    let mut r2 = req("uid-2", "inc", &target, Some("cp1"), Some("cp2"));
    r2.fallback_to_full = false;
    vm.write("disk0", 0x99, 0, 16 * MIB).await;
    r2.speed_limit = Some(2 * MIB);
    drop(agent);
    {
        let running = start_push_backup(&vm.client, &vm.vm, &policy, &r2)
            .await
            .unwrap();
        drop(running);
    }
    vm.reconnect_client().await;
    let agent = vm.client.clone();
    let report = cleanup_leftovers(
        &agent,
        &r2.operation,
        Some(FileScope {
            dir: &policy.resolve_dir("default", &target).unwrap(),
            stem: &r2.stem(),
        }),
    )
    .await
    .unwrap();
    assert_eq!(report.jobs.len(), 1);
    assert_eq!(report.nodes.len(), 1);
    assert_eq!(report.files.len(), 1, "{report:?}");
    assert_no_leftovers(&agent).await;
    assert!(
        !files_in(&target).iter().any(|f| f.starts_with("inc.")),
        "{:?}",
        files_in(&target)
    );
    // Checkpoint bitmaps are not cleanup's business: cp2 came with the transaction.
    assert!(
        bitmaps_on(&agent, "disk0-fmt")
            .await
            .contains(&"cp1".to_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_keep_or_invalidate_bitmaps() {
    let size = 16 * MIB;
    let mut vm = TestVm::start("restart", &[("disk0", "qcow2", size)]).await;
    let cp = |n: &str| CheckpointRequest {
        name: n.into(),
        disks: None,
    };
    create_checkpoint(&vm.client, &vm.vm, &cp("keep"))
        .await
        .unwrap();
    vm.write("disk0", 0x12, 0, MIB).await;

    // Clean quit: the persistent bitmap comes back, with its dirty data.
    vm.quit().await;
    vm.restart().await;
    let info = redefine_checkpoint(&vm.client, &vm.vm, &cp("keep"), None)
        .await
        .unwrap();
    assert_eq!(info.disks[0].dirty_bytes, MIB);
    assert!(!info.disks[0].inconsistent);

    // A bitmap added after start is lost on SIGKILL; the loaded one turns inconsistent.
    create_checkpoint(&vm.client, &vm.vm, &cp("lost"))
        .await
        .unwrap();
    vm.kill();
    vm.restart().await;
    let names = bitmaps_on(&vm.client, "disk0-fmt").await;
    assert_eq!(names, vec!["keep".to_string()]);
    let e = redefine_checkpoint(&vm.client, &vm.vm, &cp("keep"), None)
        .await
        .unwrap_err();
    assert!(matches!(e, CheckpointError::Inconsistent { .. }), "{e}");
    assert!(e.to_string().contains("disk0"));

    // A backup based on it fails clearly, or falls back to full when asked.
    let backups = vm.path().join("backups");
    std::fs::create_dir_all(&backups).unwrap();
    let policy = TargetPolicy::new([backups.clone()]);
    let target = backups.join("default/t");
    run_push_backup(
        &vm.client,
        &vm.vm,
        &policy,
        &req("u0", "base", &target, None, None),
    )
    .await
    .unwrap();
    let e = run_push_backup(
        &vm.client,
        &vm.vm,
        &policy,
        &req("u1", "inc", &target, Some("keep"), None),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, BackupError::BaseUnusable { .. }), "{e}");
    assert!(e.to_string().contains("inconsistent"), "{e}");
    let mut r = req("u2", "inc2", &target, Some("keep"), Some("fresh"));
    r.fallback_to_full = true;
    let out = run_push_backup(&vm.client, &vm.vm, &policy, &r)
        .await
        .unwrap();
    assert!(out.manifest.disks[0].fell_back_to_full);
    assert_eq!(out.manifest.disks[0].kind, BackupKind::Full);
    assert_eq!(out.manifest.disks[0].backing_chain.len(), 1);
    assert_no_leftovers(&vm.client).await;
    // The inconsistent bitmap can still be deleted.
    let removed = cairn_agent::checkpoint::delete_checkpoint(&vm.client, &vm.vm, "keep", None)
        .await
        .unwrap();
    assert_eq!(removed, vec!["disk0".to_string()]);
    assert_eq!(
        bitmaps_on(&vm.client, "disk0-fmt").await,
        vec!["fresh".to_string()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_gone_mid_job_is_a_clear_error_without_files() {
    let size = 32 * MIB;
    let mut vm = TestVm::start("gone", &[("disk0", "qcow2", size)]).await;
    vm.write("disk0", 0x33, 0, 16 * MIB).await;
    let backups = vm.path().join("backups");
    std::fs::create_dir_all(&backups).unwrap();
    let policy = TargetPolicy::new([backups.clone()]);
    let target = backups.join("default/t");
    let agent = vm.client.clone();
    let mut r = req("u", "b", &target, None, Some("cp"));
    r.speed_limit = Some(4 * MIB);
    let running = start_push_backup(&agent, &vm.vm, &policy, &r)
        .await
        .unwrap();
    vm.kill();
    let e = running.wait().await.unwrap_err();
    assert!(matches!(e, BackupError::VmGone { .. }), "{e}");
    assert!(e.to_string().contains("default/gone"), "{e}");
    assert!(files_in(&target).is_empty(), "{:?}", files_in(&target));
}
