//! Tenant attacks on the data path, against a real QEMU: every path a tenant
//! names stays inside `<allowed root>/<namespace>/`, backups are keyed by UID,
//! base lookups never cross VMs, pull sockets never replace a foreign file,
//! and a full fleecing scratch breaks the export, not the guest. Each case
//! asserts the refusal reason and that nothing changed for the victim.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use cairn_agent::backup::{
    BackupError, FileScope, Manifest, PullRequest, PushRequest, TargetPolicy, check_pull_export,
    cleanup_leftovers, run_push_backup, start_pull_export, stop_pull_export,
};
use cairn_agent::identity::OperationId;
use cairn_agent::image::OutputFormat;
use cairn_agent::restore::{RestoreError, RestoreRequest, restore};
use common::*;

fn push(uid: &str, name: &str, dir: &Path) -> PushRequest {
    PushRequest {
        operation: OperationId::new(uid),
        name: name.into(),
        disks: None,
        incremental: None,
        incremental_uid: None,
        new_checkpoint: None,
        new_checkpoint_uid: None,
        target_dir: dir.to_path_buf(),
        fallback_to_full: false,
        standalone_incremental: false,
        speed_limit: None,
        quiesce: None,
    }
}

fn assert_refused(e: &BackupError, path: &Path, allowed: &Path) {
    assert!(
        matches!(e, BackupError::OutsideAllowedRoots { .. }),
        "{path:?}: {e}"
    );
    let msg = e.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains(&allowed.display().to_string()), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_targets_stay_in_the_namespace() {
    let vm = TestVm::start("pt", &[("disk0", "qcow2", 4 * MIB)]).await;
    let root = vm.path().join("backups");
    let outside = vm.path().join("outside");
    std::fs::create_dir_all(root.join("other/theirs")).unwrap();
    std::fs::create_dir_all(root.join("default")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(root.join("other/theirs/keep"), b"victim").unwrap();
    let policy = TargetPolicy::new([root.clone()]);
    std::os::unix::fs::symlink(&outside, root.join("default/out")).unwrap();
    std::os::unix::fs::symlink(root.join("other"), root.join("default/to-other")).unwrap();
    let before = (tree(&root), tree(&outside));
    let allowed = root.join("default");
    for bad in [
        root.join("other/theirs"),
        root.join("other/new"),
        root.join("default/../other/theirs"),
        root.join("default/a/../../other"),
        root.clone(),
        root.join("x"),
        outside.clone(),
        root.join("default/out/sub"),
        root.join("default/out"),
        root.join("default/to-other/theirs"),
        PathBuf::from("default/relative"),
    ] {
        let e = run_push_backup(&vm.client, &vm.vm, &policy, &push("u1", "b", &bad))
            .await
            .unwrap_err();
        assert_refused(&e, &bad, &allowed);
    }
    assert_eq!(
        (tree(&root), tree(&outside)),
        before,
        "something was created"
    );
    assert_eq!(
        std::fs::read(root.join("other/theirs/keep")).unwrap(),
        b"victim"
    );
    assert_no_leftovers(&vm.client).await;
    // The namespace's own directory works, created as needed.
    let ok = root.join("default/deep/er");
    run_push_backup(&vm.client, &vm.vm, &policy, &push("u1", "b", &ok))
        .await
        .unwrap();
    assert_eq!(files_in(&ok).len(), 2, "{:?}", files_in(&ok));
}

/// A thread swaps the target's parent between a directory and a symlink to
/// outside while backups run: nothing ever lands outside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlink_swap_race_never_escapes() {
    let vm = TestVm::start("race", &[("disk0", "qcow2", 4 * MIB)]).await;
    let root = vm.path().join("backups");
    let outside = vm.path().join("outside");
    std::fs::create_dir_all(root.join("default/race")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    let policy = TargetPolicy::new([root.clone()]);
    let stop = Arc::new(AtomicBool::new(false));
    let swapper = {
        let (stop, race, outside) = (stop.clone(), root.join("default/race"), outside.clone());
        let real = race.with_file_name("race.real");
        std::thread::spawn(move || {
            let mut swaps = 0u64;
            while !stop.load(Ordering::SeqCst) {
                if std::fs::rename(&race, &real).is_ok() {
                    let _ = std::os::unix::fs::symlink(&outside, &race);
                    std::thread::yield_now();
                    let _ = std::fs::remove_file(&race);
                    let _ = std::fs::rename(&real, &race);
                    swaps += 1;
                }
            }
            swaps
        })
    };
    let (mut ok, mut refused) = (0, 0);
    for i in 0..12 {
        let target = root.join("default/race/sub");
        match run_push_backup(
            &vm.client,
            &vm.vm,
            &policy,
            &push(&format!("race-{i}"), &format!("b{i}"), &target),
        )
        .await
        {
            Ok(_) => ok += 1,
            Err(
                BackupError::OutsideAllowedRoots { .. }
                | BackupError::TenantPath(_)
                | BackupError::Image { .. }
                | BackupError::Qmp { .. },
            ) => refused += 1,
            Err(e) => panic!("unexpected: {e}"),
        }
        assert!(tree(&outside).is_empty(), "escaped: {:?}", tree(&outside));
    }
    stop.store(true, Ordering::SeqCst);
    let swaps = swapper.join().unwrap();
    eprintln!("{ok} backups written, {refused} refused, {swaps} swaps");
    assert!(tree(&outside).is_empty(), "escaped: {:?}", tree(&outside));
    assert!(swaps > 0);
    assert_no_leftovers(&vm.client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_are_uids_and_bases_never_cross_vms() {
    let size = 8 * MIB;
    let a = TestVm::start("vma", &[("disk0", "qcow2", size)]).await;
    let b = TestVm::start("vmb", &[("disk0", "qcow2", size)]).await;
    // Both VMs back up into one directory (same namespace).
    let root = a.path().join("backups");
    let dir = root.join("default/shared");
    std::fs::create_dir_all(&root).unwrap();
    let policy = TargetPolicy::new([root.clone()]);
    let mut model_a = DiskModel::new(size);
    a.write("disk0", 0xa1, 0, MIB).await;
    model_a.write(0xa1, 0, MIB);
    b.write("disk0", 0xb1, 0, 2 * MIB).await;

    let mut full_a = push("uid-full-a", "full", &dir);
    full_a.new_checkpoint = Some("cp".into());
    full_a.new_checkpoint_uid = Some("cp-uid-a".into());
    let out_a = run_push_backup(&a.client, &a.vm, &policy, &full_a)
        .await
        .unwrap();
    verify_and_check(&out_a.manifest_path).await;
    // VM b re-uses the checkpoint name (and even the backup name), later.
    let mut full_b = push("uid-full-b", "full", &dir);
    full_b.new_checkpoint = Some("cp".into());
    full_b.new_checkpoint_uid = Some("cp-uid-b".into());
    let out_b = run_push_backup(&b.client, &b.vm, &policy, &full_b)
        .await
        .unwrap();
    verify_and_check(&out_b.manifest_path).await;
    assert_ne!(out_a.manifest_path, out_b.manifest_path);

    // Partial files of another backup with the same name are not ours to clean.
    let foreign_partial = dir.join(format!(
        "{}.disk0.qcow2",
        Manifest::stem("inc", "uid-someone-else")
    ));
    std::fs::write(&foreign_partial, b"in flight").unwrap();

    // A's incremental from "cp" (A's UID) chains onto A's full, not B's newer one.
    a.write("disk0", 0xa2, 4 * MIB, MIB).await;
    model_a.write(0xa2, 4 * MIB, MIB);
    let mut inc = push("uid-inc-a", "inc", &dir);
    inc.incremental = Some("cp".into());
    inc.incremental_uid = Some("cp-uid-a".into());
    let out = run_push_backup(&a.client, &a.vm, &policy, &inc)
        .await
        .unwrap();
    assert_eq!(
        out.manifest.disks[0].backing_chain[1],
        out_a.manifest.disks[0].file
    );
    assert_eq!(
        out.manifest.incremental_from_uid.as_deref(),
        Some("cp-uid-a")
    );
    verify_and_check(&out.manifest_path).await;
    let raw = a.path().join("a.raw");
    let r = restore(&RestoreRequest {
        manifest: out.manifest_path.clone(),
        output: raw.clone(),
        format: OutputFormat::Raw,
        disk: None,
        verify: true,
    })
    .await
    .unwrap();
    assert!(r[0].verified);
    assert!(read_raw(&raw) == model_a.bytes);
    assert_eq!(std::fs::read(&foreign_partial).unwrap(), b"in flight");

    // Cleanup of a backup's leftovers removes only its own UID's files.
    let mine = dir.join(format!("{}.disk0.qcow2", inc.stem()));
    let report = cleanup_leftovers(
        &a.client,
        &OperationId::new("uid-inc-a"),
        Some(FileScope {
            dir: &policy.resolve_dir("default", &dir).unwrap(),
            stem: &Manifest::stem("inc", "uid-inc-a"),
        }),
    )
    .await
    .unwrap();
    assert!(
        report.files.is_empty(),
        "a complete backup is kept: {report:?}"
    );
    assert!(mine.exists());
    assert_eq!(std::fs::read(&foreign_partial).unwrap(), b"in flight");

    // A checkpoint re-created under the same name (new UID): the old backup
    // is not its base.
    let mut stale = push("uid-inc-a2", "inc2", &dir);
    stale.incremental = Some("cp".into());
    stale.incremental_uid = Some("cp-uid-recreated".into());
    let e = run_push_backup(&a.client, &a.vm, &policy, &stale)
        .await
        .unwrap_err();
    assert!(
        matches!(e, BackupError::BaseUnusable { .. })
            && e.to_string().contains("no earlier backup"),
        "{e}"
    );

    // A chain stitched across VMs (what a name-only lookup produced) is
    // refused by a verified restore.
    let mut stitched = Manifest::clone(&load_manifest(&out.manifest_path));
    stitched.name = "stitched".into();
    stitched.uid = "uid-stitched".into();
    stitched.disks[0].backing_chain[1] = out_b.manifest.disks[0].file.clone();
    let handle = cairn_agent::tenant_dir::TenantDir::open_trusted(&dir).unwrap();
    let path = stitched.store(&handle).unwrap();
    let e = restore(&RestoreRequest {
        manifest: path,
        output: a.path().join("stitched.raw"),
        format: OutputFormat::Raw,
        disk: None,
        verify: true,
    })
    .await
    .unwrap_err();
    assert!(matches!(e, RestoreError::ForeignChainFile { .. }), "{e}");
    assert!(!a.path().join("stitched.raw").exists());

    // A manifest whose file names leave the directory is never used.
    let mut evil = load_manifest(&out_a.manifest_path);
    evil.uid = "uid-evil".into();
    evil.name = "evil".into();
    evil.checkpoint_uid = Some("cp-uid-evil".into());
    evil.disks[0].file = "../../../etc/passwd".into();
    let json = serde_json::to_vec(&evil).unwrap();
    std::fs::write(dir.join("evil.uid-evil.manifest.json"), json).unwrap();
    let mut via_evil = push("uid-via-evil", "via", &dir);
    via_evil.incremental = Some("cp".into());
    via_evil.incremental_uid = Some("cp-uid-evil".into());
    let e = run_push_backup(&a.client, &a.vm, &policy, &via_evil)
        .await
        .unwrap_err();
    assert!(matches!(e, BackupError::BaseUnusable { .. }), "{e}");
    let e = restore(&RestoreRequest {
        manifest: dir.join("evil.uid-evil.manifest.json"),
        output: a.path().join("evil.raw"),
        format: OutputFormat::Raw,
        disk: None,
        verify: false,
    })
    .await
    .unwrap_err();
    assert!(
        e.to_string().contains("not valid") || format!("{e:?}").contains("ManifestFileName"),
        "{e:?}"
    );
    assert_no_leftovers(&a.client).await;
    assert_no_leftovers(&b.client).await;
}

fn inode(p: &Path) -> u64 {
    std::fs::symlink_metadata(p).unwrap().ino()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_sockets_never_replace_foreign_files() {
    let vm = TestVm::start("ps", &[("disk0", "qcow2", 4 * MIB)]).await;
    let policy = pull_policy(vm.path());
    // Another namespace's QMP socket (the predictable layout), listening.
    let victim_dir = vm.root.join("victim");
    std::fs::create_dir_all(&victim_dir).unwrap();
    let victim = victim_dir.join("vm.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&victim).unwrap();
    let victim_ino = inode(&victim);
    // A file of our own namespace's export directory that is not a socket.
    std::fs::create_dir_all(policy.export_dir.join("default")).unwrap();
    let plain = policy.export_dir.join("default/plain.sock");
    std::fs::write(&plain, b"not a socket").unwrap();
    let other_ns = policy.export_dir.join("victim/x.sock");
    let allowed = policy.export_dir.join("default");
    let request = |socket: PathBuf| PullRequest {
        operation: OperationId::new("pull-attack"),
        name: "p".into(),
        disks: None,
        incremental: None,
        new_checkpoint: None,
        socket: Some(socket),
        fallback_to_full: false,
        quiesce: None,
        tcp: None,
    };
    for bad in [
        victim.clone(),
        vm.vm.socket.clone(),
        other_ns.clone(),
        policy.export_dir.join("default/../victim/x.sock"),
        policy.export_dir.join("x.sock"),
    ] {
        let e = start_pull_export(&vm.client, &vm.vm, &policy, &request(bad.clone()))
            .await
            .unwrap_err();
        assert_refused(&e, &bad, &allowed);
    }
    let e = start_pull_export(&vm.client, &vm.vm, &policy, &request(plain.clone()))
        .await
        .unwrap_err();
    assert!(
        matches!(e, BackupError::TenantPath(_)) && e.to_string().contains("not Cairn's"),
        "{e}"
    );
    assert_eq!(std::fs::read(&plain).unwrap(), b"not a socket");
    assert_eq!(inode(&victim), victim_ino, "victim socket replaced");
    std::os::unix::net::UnixStream::connect(&victim).expect("victim still connectable");
    assert!(!other_ns.exists());
    assert_no_leftovers(&vm.client).await;
    // The VM's own QMP socket is still the one QEMU listens on.
    assert!(vm.client.query_jobs().await.is_ok());
}

fn mount_tmpfs(dir: &Path, size: &str) {
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .status()
        .unwrap();
    assert!(st.success(), "mount tmpfs (tests run as root)");
}

fn umount(dir: &Path) {
    let _ = Command::new("umount").arg(dir).status();
}

struct Unmount(PathBuf);
impl Drop for Unmount {
    fn drop(&mut self) {
        umount(&self.0);
    }
}

/// A fleecing scratch that fills up while the guest writes: the guest's
/// writes succeed, the export fails clearly, and nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_scratch_breaks_the_export_not_the_guest() {
    let size = 32 * MIB;
    let mut vm = TestVm::start("scr", &[("disk0", "qcow2", size)]).await;
    vm.write("disk0", 0x11, 0, 8 * MIB).await;
    let policy = pull_policy(vm.path());
    mount_tmpfs(&policy.scratch_dir, "6m");
    let _guard = Unmount(policy.scratch_dir.clone());
    let request = PullRequest {
        operation: OperationId::new("pull-scratch"),
        name: "s".into(),
        disks: None,
        incremental: None,
        new_checkpoint: None,
        socket: None,
        fallback_to_full: false,
        quiesce: None,
        tcp: None,
    };
    // Honest size check: 8 MiB allocated do not fit in 6 MiB.
    let e = start_pull_export(&vm.client, &vm.vm, &policy, &request)
        .await
        .unwrap_err();
    assert!(matches!(e, BackupError::InsufficientSpace { .. }), "{e}");
    assert!(tree(&policy.scratch_dir.join("default")).is_empty());
    assert_no_leftovers(&vm.client).await;
    umount(&policy.scratch_dir);
    mount_tmpfs(&policy.scratch_dir, "16m");

    let export = start_pull_export(&vm.client, &vm.vm, &policy, &request)
        .await
        .unwrap();
    let disks = vec!["disk0".to_string()];
    check_pull_export(&policy, &vm.vm, None, "s", &disks)
        .await
        .expect("a fresh export reads");
    // Something else fills the scratch filesystem.
    let filler = policy.scratch_dir.join("default/filler");
    let st = Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "count=32", "status=none"])
        .arg(format!("of={}", filler.display()))
        .status()
        .unwrap();
    assert!(!st.success(), "filler should hit ENOSPC");
    // The guest overwrites its data: copy-before-write cannot copy, the view
    // breaks, the writes themselves succeed.
    vm.write("disk0", 0x22, 0, 8 * MIB).await;
    vm.write("disk0", 0x33, 16 * MIB, 4 * MIB).await;
    let e = check_pull_export(&policy, &vm.vm, None, "s", &disks)
        .await
        .unwrap_err();
    assert!(matches!(e, BackupError::ScratchFull { .. }), "{e}");
    assert!(
        e.to_string().contains("guest writes were not affected"),
        "{e}"
    );
    stop_pull_export(&vm.client, &request.operation, &policy, &vm.vm, None, "s")
        .await
        .unwrap();
    std::fs::remove_file(&filler).unwrap();
    assert_no_leftovers(&vm.client).await;
    assert!(tree(&policy.scratch_dir.join("default")).is_empty());
    assert!(!export.socket.exists());
    // Guest data is what the guest wrote, and the disk takes writes as before.
    vm.write("disk0", 0x44, 24 * MIB, MIB).await;
    vm.quit().await;
    let bytes = image_bytes(&vm.disk("disk0").path);
    assert!(bytes[..8 * MIB as usize].iter().all(|&b| b == 0x22));
    assert!(
        bytes[16 * MIB as usize..20 * MIB as usize]
            .iter()
            .all(|&b| b == 0x33)
    );
    assert!(
        bytes[24 * MIB as usize..25 * MIB as usize]
            .iter()
            .all(|&b| b == 0x44)
    );
}
