//! Bad input gets a clear error and leaves nothing behind (real QEMU).

mod common;

use std::process::Command;

use cairn_agent::backup::{
    BackupError, PushRequest, TargetPolicy, run_push_backup, start_push_backup,
};
use cairn_agent::checkpoint::{
    CheckpointError, CheckpointRequest, Domain, create_checkpoint, create_checkpoint_offline,
    delete_checkpoint, delete_checkpoint_offline, redefine_checkpoint,
};
use cairn_agent::identity::OperationId;
use cairn_agent::inventory::{SelectionError, read_inventory};
use common::*;

fn cp(name: &str, disks: Option<&[&str]>) -> CheckpointRequest {
    CheckpointRequest {
        name: name.into(),
        disks: disks.map(|d| d.iter().map(|s| s.to_string()).collect()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_errors_leave_no_bitmaps() {
    let vm = TestVm::start(
        "badcp",
        &[
            ("disk0", "qcow2", 16 * MIB),
            ("disk1", "qcow2", 16 * MIB),
            ("vdb", "raw", 8 * MIB),
        ],
    )
    .await;
    let inv = read_inventory(&vm.client, &vm.vm).await.unwrap();
    assert_eq!(
        inv.disks
            .iter()
            .map(|d| d.name.as_str())
            .collect::<Vec<_>>(),
        ["disk0", "disk1", "vdb"]
    );
    assert_eq!(inv.disks[0].node_name, "disk0-fmt");
    assert_eq!(inv.disks[0].virtual_size, 16 * MIB);
    assert_eq!(inv.disks[0].file, vm.disk("disk0").path);

    let e = create_checkpoint(&vm.client, &vm.vm, &cp("c", Some(&["nope"])))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            CheckpointError::Selection(SelectionError::UnknownDisk { .. })
        ),
        "{e}"
    );
    let e = create_checkpoint(&vm.client, &vm.vm, &cp("c", Some(&["disk0", "vdb"])))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            CheckpointError::Selection(SelectionError::NotQcow2 { .. })
        ),
        "{e}"
    );
    assert!(
        e.to_string().contains("vdb") && e.to_string().contains("raw"),
        "{e}"
    );
    for n in ["disk0-fmt", "disk1-fmt"] {
        assert!(bitmaps_on(&vm.client, n).await.is_empty());
    }

    // Default selection skips the raw disk.
    let info = create_checkpoint(&vm.client, &vm.vm, &cp("c1", None))
        .await
        .unwrap();
    assert_eq!(info.disks.len(), 2);
    assert_eq!(info.domain.as_ref().unwrap().disks.len(), 3);
    let e = create_checkpoint(&vm.client, &vm.vm, &cp("c1", None))
        .await
        .unwrap_err();
    assert!(matches!(e, CheckpointError::AlreadyExists { .. }), "{e}");

    // All or nothing: c2 exists on disk1 only (added behind Cairn's back), so a
    // checkpoint c2 on both disks fails and disk0 gets nothing.
    vm.client
        .add_bitmap(&cairn_agent::qmp::BitmapSpec {
            node: "disk1-fmt".into(),
            name: "c2".into(),
            persistent: true,
            disabled: false,
        })
        .await
        .unwrap();
    let e = create_checkpoint(&vm.client, &vm.vm, &cp("c2", None))
        .await
        .unwrap_err();
    assert!(matches!(e, CheckpointError::AlreadyExists { .. }), "{e}");
    assert_eq!(
        bitmaps_on(&vm.client, "disk0-fmt").await,
        vec!["c1".to_string()]
    );

    let e = redefine_checkpoint(&vm.client, &vm.vm, &cp("missing", None), None)
        .await
        .unwrap_err();
    assert!(matches!(e, CheckpointError::Missing { .. }), "{e}");
    vm.client
        .add_bitmap(&cairn_agent::qmp::BitmapSpec {
            node: "disk0-fmt".into(),
            name: "tmp".into(),
            persistent: false,
            disabled: false,
        })
        .await
        .unwrap();
    let e = redefine_checkpoint(&vm.client, &vm.vm, &cp("tmp", Some(&["disk0"])), None)
        .await
        .unwrap_err();
    assert!(matches!(e, CheckpointError::NotPersistent { .. }), "{e}");

    // Delete is idempotent.
    assert_eq!(
        delete_checkpoint(&vm.client, &vm.vm, "c1", None)
            .await
            .unwrap()
            .len(),
        2
    );
    assert!(
        delete_checkpoint(&vm.client, &vm.vm, "c1", None)
            .await
            .unwrap()
            .is_empty()
    );
    assert_no_leftovers(&vm.client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_checkpoints_on_stopped_vm() {
    let mut vm = TestVm::start("offline", &[("disk0", "qcow2", 16 * MIB)]).await;
    let inv = read_inventory(&vm.client, &vm.vm).await.unwrap();
    let domain = Domain::observe(&inv);
    vm.quit().await;
    let info = create_checkpoint_offline("default/offline", &domain, &cp("off1", None))
        .await
        .unwrap();
    assert_eq!(info.disks.len(), 1);
    let e = create_checkpoint_offline("default/offline", &domain, &cp("off1", None))
        .await
        .unwrap_err();
    assert!(matches!(e, CheckpointError::AlreadyExists { .. }), "{e}");
    vm.restart().await;
    let info = redefine_checkpoint(&vm.client, &vm.vm, &cp("off1", None), None)
        .await
        .unwrap();
    assert!(info.disks[0].recording);
    vm.quit().await;
    assert_eq!(
        delete_checkpoint_offline(&domain, "off1").await.unwrap(),
        vec!["disk0".to_string()]
    );
    assert!(
        delete_checkpoint_offline(&domain, "off1")
            .await
            .unwrap()
            .is_empty()
    );
}

fn push(uid: &str, dir: &std::path::Path) -> PushRequest {
    PushRequest {
        operation: OperationId::new(uid),
        name: "b".into(),
        disks: None,
        incremental: None,
        incremental_uid: None,
        new_checkpoint: Some("newcp".into()),
        new_checkpoint_uid: None,
        target_dir: dir.to_path_buf(),
        fallback_to_full: false,
        standalone_incremental: false,
        speed_limit: None,
        quiesce: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_errors_leave_nothing_behind() {
    let vm = TestVm::start(
        "badbk",
        &[("disk0", "qcow2", 32 * MIB), ("vdb", "raw", 8 * MIB)],
    )
    .await;
    let root = vm.path().join("backups");
    std::fs::create_dir_all(&root).unwrap();
    let policy = TargetPolicy::new([root.clone()]);

    // Outside the allowed roots, by path, by `..` and by symlink.
    for bad in [vm.path().join("elsewhere"), root.join("../escape")] {
        let e = run_push_backup(&vm.client, &vm.vm, &policy, &push("u", &bad))
            .await
            .unwrap_err();
        assert!(matches!(e, BackupError::OutsideAllowedRoots { .. }), "{e}");
    }
    std::fs::create_dir_all(root.join("default")).unwrap();
    std::os::unix::fs::symlink(vm.path(), root.join("default/link")).unwrap();
    let e = run_push_backup(
        &vm.client,
        &vm.vm,
        &policy,
        &push("u", &root.join("default/link/x")),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, BackupError::OutsideAllowedRoots { .. }), "{e}");
    assert!(!vm.path().join("x").exists());

    // Raw disk named explicitly; unknown disk; unknown incremental base.
    let mut r = push("u", &root.join("default/t"));
    r.disks = Some(vec!["vdb".into()]);
    let e = run_push_backup(&vm.client, &vm.vm, &policy, &r)
        .await
        .unwrap_err();
    assert!(
        matches!(e, BackupError::Selection(SelectionError::NotQcow2 { .. })),
        "{e}"
    );
    r.disks = Some(vec!["zzz".into()]);
    let e = run_push_backup(&vm.client, &vm.vm, &policy, &r)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            BackupError::Selection(SelectionError::UnknownDisk { .. })
        ),
        "{e}"
    );
    let mut r = push("u", &root.join("default/t"));
    r.incremental = Some("never-made".into());
    let e = run_push_backup(&vm.client, &vm.vm, &policy, &r)
        .await
        .unwrap_err();
    assert!(matches!(e, BackupError::BaseUnusable { .. }), "{e}");
    // New checkpoint name already taken.
    create_checkpoint(&vm.client, &vm.vm, &cp("newcp", None))
        .await
        .unwrap();
    let e = run_push_backup(
        &vm.client,
        &vm.vm,
        &policy,
        &push("u", &root.join("default/t")),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, BackupError::Checkpoint(_)), "{e}");
    delete_checkpoint(&vm.client, &vm.vm, "newcp", None)
        .await
        .unwrap();
    assert!(files_in(&root.join("default/t")).is_empty());
    assert_no_leftovers(&vm.client).await;

    // Target filesystem too small: refused before anything starts.
    let small = root.join("default/small");
    std::fs::create_dir_all(&small).unwrap();
    mount_tmpfs(&small, "8m");
    let e = run_push_backup(&vm.client, &vm.vm, &policy, &push("u", &small))
        .await
        .unwrap_err();
    umount(&small);
    assert!(matches!(e, BackupError::InsufficientSpace { .. }), "{e}");

    // Space runs out mid-job: the filesystem fits the estimate, then fills up.
    vm.write("disk0", 0x5a, 0, 30 * MIB).await;
    let tight = root.join("default/tight");
    std::fs::create_dir_all(&tight).unwrap();
    mount_tmpfs(&tight, "40m");
    let mut r = push("u2", &tight);
    r.speed_limit = Some(16 * MIB);
    let running = start_push_backup(&vm.client, &vm.vm, &policy, &r)
        .await
        .unwrap();
    let filler = tight.join("filler");
    let st = Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "count=40", "status=none"])
        .arg(format!("of={}", filler.display()))
        .status()
        .unwrap();
    assert!(!st.success(), "filler should hit ENOSPC");
    let e = running.wait().await.unwrap_err();
    let left = files_in(&tight);
    umount(&tight);
    assert!(matches!(e, BackupError::NoSpace { .. }), "{e}");
    assert!(e.to_string().contains("disk0"));
    assert_eq!(left, vec!["filler".to_string()], "partial files left");
    assert!(
        bitmaps_on(&vm.client, "disk0-fmt").await.is_empty(),
        "new checkpoint bitmap left"
    );
    assert_no_leftovers(&vm.client).await;
}

fn mount_tmpfs(dir: &std::path::Path, size: &str) {
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .status()
        .unwrap();
    assert!(st.success(), "mount tmpfs (tests run as root)");
}

fn umount(dir: &std::path::Path) {
    let _ = Command::new("umount").arg(dir).status();
}
