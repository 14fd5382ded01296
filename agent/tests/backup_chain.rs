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
        new_checkpoint: new_cp.map(str::to_string),
        target_dir: dir.to_path_buf(),
        fallback_to_full: false,
        speed_limit: None,
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
    let target = backups.join("chain");
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
        let m = &out.manifest;
        assert_eq!(m.disks.len(), 2);
        for (i, d) in m.disks.iter().enumerate() {
            assert_eq!(
                d.sha256,
                models[i].sha256(),
                "round {round} disk {} checksum",
                d.disk
            );
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
        let manifest = target.join(format!("{name}.manifest.json"));
        for (disk, want) in [("disk0", d0), ("disk1", d1)] {
            let out = restored.join(format!("{name}-{disk}.raw"));
            let r = restore(&RestoreRequest {
                manifest: manifest.clone(),
                output: out.clone(),
                format: OutputFormat::Raw,
                disk: Some(disk.into()),
            })
            .await
            .unwrap();
            assert_eq!(r.len(), 1);
            assert!(
                read_raw(&out) == *want,
                "{name} {disk} differs from the disk at backup time"
            );
            std::fs::remove_file(&out).unwrap();
        }
    }

    // The binary's restore subcommand on the directory (newest manifest), qcow2 output.
    let out = restored.join("latest");
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_cairn-agent"))
        .args(["restore", "--format", "qcow2", "--manifest"])
        .arg(&target)
        .arg("--output")
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
    let last = expected.last().unwrap();
    assert!(image_bytes(&out.join("disk0.qcow2")) == last.1);
    assert!(image_bytes(&out.join("disk1.qcow2")) == last.2);

    // A damaged chain is detected by the checksum.
    let newest = target.join("b20.disk0.qcow2");
    let st = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x01 0 4096"])
        .arg(&newest)
        .status()
        .unwrap();
    assert!(st.success());
    let err = restore(&RestoreRequest {
        manifest: target.join("b20.manifest.json"),
        output: restored.join("bad.raw"),
        format: OutputFormat::Raw,
        disk: Some("disk0".into()),
    })
    .await
    .unwrap_err();
    assert!(err.to_string().contains("damaged"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_from_older_checkpoint_after_newer_backups() {
    let size = 16 * MIB;
    let vm = TestVm::start("chains", &[("disk0", "qcow2", size)]).await;
    let backups = vm.path().join("backups");
    std::fs::create_dir_all(&backups).unwrap();
    let policy = TargetPolicy::new([backups.clone()]);
    let target = backups.join("c");
    let mut model = DiskModel::new(size);

    vm.write("disk0", 0x11, 0, MIB).await;
    model.write(0x11, 0, MIB);
    run_push_backup(
        &vm.client,
        &vm.vm,
        &policy,
        &request("full", &target, None, Some("a")),
    )
    .await
    .unwrap();
    for (i, cp) in ["b", "c", "d"].iter().enumerate() {
        let off = (i as u64 + 2) * MIB;
        vm.write("disk0", 0x20 + i as u8, off, MIB / 2).await;
        model.write(0x20 + i as u8, off, MIB / 2);
        let prev = if i == 0 {
            "a".to_string()
        } else {
            ["b", "c", "d"][i - 1].to_string()
        };
        run_push_backup(
            &vm.client,
            &vm.vm,
            &policy,
            &request(&format!("inc-{cp}"), &target, Some(&prev), Some(cp)),
        )
        .await
        .unwrap();
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
            "branch.disk0.qcow2".to_string(),
            "full.disk0.qcow2".to_string()
        ]
    );
    assert_eq!(d.sha256, model.sha256());
    assert!(
        d.bytes_copied >= 3 * MIB / 2 && d.bytes_copied < 4 * MIB,
        "copied {}",
        d.bytes_copied
    );
    let raw = vm.path().join("branch.raw");
    restore(&RestoreRequest {
        manifest: out.manifest_path.clone(),
        output: raw.clone(),
        format: OutputFormat::Raw,
        disk: None,
    })
    .await
    .unwrap();
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
    assert_eq!(out.manifest.disks[0].sha256, model.sha256());
    // Same request again: idempotent, reports the finished backup.
    let again = run_push_backup(
        &vm.client,
        &vm.vm,
        &policy,
        &request("inc-e", &target, Some("d"), None),
    )
    .await
    .unwrap();
    assert!(again.already_complete);
    assert_no_leftovers(&vm.client).await;
}
