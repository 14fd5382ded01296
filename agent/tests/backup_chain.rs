//! Push backup chains against a real QEMU: every point of a 20-round
//! incremental chain restores to exactly the disk as it was then.

mod common;

use cairn_agent::backup::{BackupKind, PushRequest, TargetPolicy, run_push_backup};
use cairn_agent::checkpoint::{delete_checkpoint, inspect_checkpoint};
use cairn_agent::identity::OperationId;
use cairn_agent::image::OutputFormat;
use cairn_agent::restore::{RestoreRequest, restore};
use common::*;
use rand::{Rng, SeedableRng};

/// File stem of test backup `name` (its UID is `uid-<name>`).
fn stem(name: &str) -> String {
    cairn_agent::backup::Manifest::stem(name, &format!("uid-{name}"))
}

fn request(
    name: &str,
    dir: &std::path::Path,
    inc: Option<&str>,
    new_cp: Option<&str>,
) -> PushRequest {
    PushRequest {
        operation: OperationId::new(format!("uid-{name}")),
        name: name.to_string(),
        disks: None,
        incremental: inc.map(str::to_string),
        incremental_uid: None,
        new_checkpoint: new_cp.map(str::to_string),
        new_checkpoint_uid: None,
        target_dir: dir.to_path_buf(),
        fallback_to_full: false,
        standalone_incremental: false,
        speed_limit: None,
        quiesce: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_round_incremental_chain_restores_every_point() {
    let size = 16 * MIB;
    let vm = TestVm::start(
        "chain",
        &[("disk0", "qcow2", size), ("disk1", "qcow2", size)],
    )
    .await;
    let backups = vm.path().join("backups");
    std::fs::create_dir_all(&backups).unwrap();
    let policy = TargetPolicy::new([backups.clone()]);
    let target = backups.join("default/chain");
    let mut models = [DiskModel::new(size), DiskModel::new(size)];
    let seed: u64 = rand::rng().random();
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut expected = Vec::new(); // (backup name, [sha disk0, sha disk1], [bytes])

    for round in 0..21 {
        // Random writes on both disks.
        for (i, disk) in ["disk0", "disk1"].iter().enumerate() {
            for _ in 0..rng.random_range(1..6) {
                let len = rng.random_range(1..64u64) * 4096;
                let off = rng.random_range(0..(size - len) / 4096) * 4096;
                let pat: u8 = rng.random_range(1..=255);
                vm.write(disk, pat, off, len).await;
                models[i].write(pat, off, len);
            }
        }
        let name = format!("b{round:02}");
        let cp = format!("cp{round:02}");
        let base = (round > 0).then(|| format!("cp{:02}", round - 1));
        let out = run_push_backup(
            &vm.client,
            &vm.vm,
            &policy,
            &request(&name, &target, base.as_deref(), Some(&cp)),
        )
        .await
        .unwrap_or_else(|e| panic!("round {round}: {e}"));
        // The backup returns unverified; verification records the file checksums.
        let m = &verify_and_check(&out.manifest_path).await;
        assert_eq!(m.disks.len(), 2);
        for d in &m.disks {
            let want = if round == 0 {
                BackupKind::Full
            } else {
                BackupKind::Incremental
            };
            assert_eq!(d.kind, want);
            assert_eq!(d.backing_chain.len(), round + 1);
        }
        if round > 0 {
            // Incrementals copy only what changed: far less than the disk.
            assert!(
                m.disks[0].bytes_copied < size / 2,
                "round {round} copied {}",
                m.disks[0].bytes_copied
            );
            // The previous checkpoint stays (bitmap-mode never); remove it to keep QEMU lean.
            let prev = base.unwrap();
            if round % 2 == 0 {
                delete_checkpoint(&vm.client, &vm.vm, &prev, None)
                    .await
                    .unwrap();
            }
        }
        let info = inspect_checkpoint(&vm.client, &vm.vm, &cp).await.unwrap();
        assert_eq!(info.disks.len(), 2);
        expected.push((name, models[0].bytes.clone(), models[1].bytes.clone()));
    }
    assert_no_leftovers(&vm.client).await;

    // Restore every point of the chain and compare byte for byte.
    let restored = vm.path().join("restored");
    std::fs::create_dir_all(&restored).unwrap();
    for (name, d0, d1) in &expected {
        let manifest = target.join(format!("{}.manifest.json", stem(name)));
        for (disk, want) in [("disk0", d0), ("disk1", d1)] {
            let out = restored.join(format!("{name}-{disk}.raw"));
            let r = restore(&RestoreRequest {
                manifest: manifest.clone(),
                output: out.clone(),
                format: OutputFormat::Raw,
                disk: Some(disk.into()),
                verify: true,
            })
            .await
            .unwrap();
            assert_eq!(r.len(), 1);
            assert!(r[0].verified);
            assert!(
                read_raw(&out) == *want,
                "{name} {disk} differs from the disk at backup time"
            );
            std::fs::remove_file(&out).unwrap();
        }
    }

    // The binary's restore subcommand on the directory (newest manifest), qcow2 output.
    let out = restored.join("latest");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_cairn-agent"))
        .args(["restore", "--format", "qcow2", "--manifest"])
        .arg(&target)
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let printed = String::from_utf8_lossy(&o.stdout);
    for disk in ["disk0", "disk1"] {
        let line = format!(
            "{disk}\t{}\tverified",
            out.join(format!("{disk}.qcow2")).display()
        );
        assert!(printed.lines().any(|l| l == line), "{printed}");
    }
    let last = expected.last().unwrap();
    assert!(image_bytes(&out.join("disk0.qcow2")) == last.1);
    assert!(image_bytes(&out.join("disk1.qcow2")) == last.2);

    // A damaged newest file is detected by its checksum.
    let newest = target.join(format!("{}.disk0.qcow2", stem("b20")));
    let st = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x01 0 4096"])
        .arg(&newest)
        .status()
        .unwrap();
    assert!(st.success());
    let restore_one = |name: &str, disk: &str, verify: bool| {
        let request = RestoreRequest {
            manifest: target.join(format!("{}.manifest.json", stem(name))),
            output: restored.join("one.raw"),
            format: OutputFormat::Raw,
            disk: Some(disk.into()),
            verify,
        };
        async move { restore(&request).await }
    };
    let err = restore_one("b20", "disk0", true).await.unwrap_err();
    assert!(
        err.to_string().contains("damaged")
            && err
                .to_string()
                .contains(&format!("{}.disk0.qcow2", stem("b20"))),
        "{err}"
    );
    assert!(
        !restored.join("one.raw").exists(),
        "nothing written on refusal"
    );

    // One flipped byte in an older member of a chain: every later point of
    // that disk is refused, earlier points and the other disk still restore.
    let older = target.join(format!("{}.disk1.qcow2", stem("b05")));
    let mut bytes = std::fs::read(&older).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&older, &bytes).unwrap();
    for later in ["b05", "b12", "b20"] {
        let err = restore_one(later, "disk1", true).await.unwrap_err();
        assert!(
            err.to_string().contains("damaged")
                && err
                    .to_string()
                    .contains(&format!("{}.disk1.qcow2", stem("b05"))),
            "{later}: {err}"
        );
    }
    restore_one("b04", "disk1", true).await.unwrap();
    assert!(read_raw(&restored.join("one.raw")) == expected[4].2);
    // A refused restore leaves an existing output as it was, and no partial file.
    restore_one("b12", "disk1", true).await.unwrap_err();
    assert!(read_raw(&restored.join("one.raw")) == expected[4].2);
    let names: Vec<String> = std::fs::read_dir(&restored)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| !n.starts_with('.')),
        "partial restore left behind: {names:?}"
    );
    restore_one("b20", "disk1", false).await.unwrap();
    // --no-verify restores whatever the files hold, and says so.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_cairn-agent"))
        .args(["restore", "--no-verify", "--disk", "disk1", "--manifest"])
        .arg(target.join(format!("{}.manifest.json", stem("b20"))))
        .arg("--output")
        .arg(restored.join("nv.qcow2"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        String::from_utf8_lossy(&o.stdout)
            .trim_end()
            .ends_with("\tunverified")
    );
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_cairn-agent"))
        .args(["restore", "--disk", "disk1", "--manifest"])
        .arg(target.join(format!("{}.manifest.json", stem("b20"))))
        .arg("--output")
        .arg(restored.join("v.qcow2"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("damaged"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_from_older_checkpoint_after_newer_backups() {
    let size = 16 * MIB;
    let vm = TestVm::start("chains", &[("disk0", "qcow2", size)]).await;
    let backups = vm.path().join("backups");
    std::fs::create_dir_all(&backups).unwrap();
    let policy = TargetPolicy::new([backups.clone()]);
    let target = backups.join("default/c");
    let mut model = DiskModel::new(size);

    vm.write("disk0", 0x11, 0, MIB).await;
    model.write(0x11, 0, MIB);
    let out = run_push_backup(
        &vm.client,
        &vm.vm,
        &policy,
        &request("full", &target, None, Some("a")),
    )
    .await
    .unwrap();
    verify_and_check(&out.manifest_path).await;
    for (i, cp) in ["b", "c", "d"].iter().enumerate() {
        let off = (i as u64 + 2) * MIB;
        vm.write("disk0", 0x20 + i as u8, off, MIB / 2).await;
        model.write(0x20 + i as u8, off, MIB / 2);
        let prev = if i == 0 {
            "a".to_string()
        } else {
            ["b", "c", "d"][i - 1].to_string()
        };
        let out = run_push_backup(
            &vm.client,
            &vm.vm,
            &policy,
            &request(&format!("inc-{cp}"), &target, Some(&prev), Some(cp)),
        )
        .await
        .unwrap();
        verify_and_check(&out.manifest_path).await;
    }
    vm.write("disk0", 0x77, 10 * MIB, 4096).await;
    model.write(0x77, 10 * MIB, 4096);

    // A second chain branching off the oldest checkpoint: contains everything since "a".
    let out = run_push_backup(
        &vm.client,
        &vm.vm,
        &policy,
        &request("branch", &target, Some("a"), None),
    )
    .await
    .unwrap();
    let d = &out.manifest.disks[0];
    assert_eq!(d.kind, BackupKind::Incremental);
    assert_eq!(
        d.backing_chain,
        vec![
            format!("{}.disk0.qcow2", stem("branch")),
            format!("{}.disk0.qcow2", stem("full"))
        ]
    );
    assert!(
        d.bytes_copied >= 3 * MIB / 2 && d.bytes_copied < 4 * MIB,
        "copied {}",
        d.bytes_copied
    );
    let raw = vm.path().join("branch.raw");
    let restore_branch = RestoreRequest {
        manifest: out.manifest_path.clone(),
        output: raw.clone(),
        format: OutputFormat::Raw,
        disk: None,
        verify: true,
    };
    // Not verified yet: restore refuses a file without a recorded checksum.
    let err = restore(&restore_branch).await.unwrap_err();
    assert!(
        err.to_string().contains("no recorded checksum")
            && err
                .to_string()
                .contains(&format!("{}.disk0.qcow2", stem("branch"))),
        "{err}"
    );
    let m = verify_and_check(&out.manifest_path).await;
    // The incremental's file holds only what changed: far smaller than the disk.
    assert!(m.disks[0].file_size < 8 * MIB, "{}", m.disks[0].file_size);
    restore(&restore_branch).await.unwrap();
    assert!(read_raw(&raw) == model.bytes);

    // The newer chain continues to work as well.
    let out = run_push_backup(
        &vm.client,
        &vm.vm,
        &policy,
        &request("inc-e", &target, Some("d"), None),
    )
    .await
    .unwrap();
    assert_eq!(out.manifest.disks[0].backing_chain.len(), 5);
    verify_and_check(&out.manifest_path).await;
    let raw = vm.path().join("inc-e.raw");
    restore(&RestoreRequest {
        manifest: out.manifest_path.clone(),
        output: raw.clone(),
        format: OutputFormat::Raw,
        disk: None,
        verify: true,
    })
    .await
    .unwrap();
    assert!(read_raw(&raw) == model.bytes);
    // Same request again: idempotent, reports the finished backup.
    let again = run_push_backup(
        &vm.client,
        &vm.vm,
        &policy,
        &request("inc-e", &target, Some("d"), None),
    )
    .await
    .unwrap();
    // Same backup (same UID) again: idempotent, reports the finished backup.
    assert!(again.already_complete);

    // Delete and re-create under the same name (TTL + GitOps re-apply): a new
    // UID, so a new backup of the current data, beside the old one's files.
    vm.write("disk0", 0x99, 12 * MIB, MIB).await;
    model.write(0x99, 12 * MIB, MIB);
    let mut again = request("inc-e", &target, None, None);
    again.operation = OperationId::new("uid-inc-e-recreated");
    let out2 = run_push_backup(&vm.client, &vm.vm, &policy, &again)
        .await
        .unwrap();
    assert!(
        !out2.already_complete,
        "a re-created backup must copy the current data"
    );
    assert_ne!(out2.manifest_path, out.manifest_path);
    assert_eq!(out2.manifest.uid, "uid-inc-e-recreated");
    assert!(
        out.manifest_path.exists(),
        "the older backup's manifest is kept"
    );
    verify_and_check(&out2.manifest_path).await;
    let raw = vm.path().join("recreated.raw");
    restore(&RestoreRequest {
        manifest: out2.manifest_path.clone(),
        output: raw.clone(),
        format: OutputFormat::Raw,
        disk: None,
        verify: true,
    })
    .await
    .unwrap();
    assert!(
        read_raw(&raw) == model.bytes,
        "re-created backup holds old data"
    );
    assert_no_leftovers(&vm.client).await;
}
