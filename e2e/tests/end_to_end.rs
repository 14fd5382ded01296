//! End to end on the local cluster: real etcd + kube-apiserver, the real
//! operator and agent binaries, real QEMU; driven with `kubectl apply`.

use std::path::PathBuf;

use anyhow::{Context, Result, ensure};
use cairn_api::{BackupPhase, CheckpointPhase, VirtualMachineCheckpoint};
use cairn_e2e::harness::TestEnv;
use cairn_e2e::scenario::*;
use cairn_e2e::wait;
use kube::Api;

#[tokio::test(flavor = "multi_thread")]
async fn checkpoint_create_and_delete() -> Result<()> {
    let (env, cluster) = TestEnv::with_cluster("cp-lifecycle").await?;
    let vm = start_vm(
        cluster,
        &env,
        "node-1",
        "vm1",
        &[("disk0", "qcow2", 64 * MIB), ("disk1", "qcow2", 32 * MIB)],
    )?;
    wait_instance(&env, "vm1", "node-1").await?;

    apply(&env, &checkpoint_yaml("cp1", "vm1", ""))?;
    let cp = wait_checkpoint(&env, "cp1", CheckpointPhase::Ready).await?;
    assert_eq!(
        cp.metadata.labels.as_ref().unwrap()["cairn.dev/node"],
        "node-1"
    );
    // The routing labels and the finalizer are owned by the operator's field manager.
    let owners: Vec<&str> = cp
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| {
            m.fields_v1.as_ref().is_some_and(|f| {
                let meta = &f.0["f:metadata"];
                !meta["f:labels"]["f:cairn.dev/node"].is_null() || !meta["f:finalizers"].is_null()
            })
        })
        .filter_map(|m| m.manager.as_deref())
        .collect();
    assert_eq!(
        owners,
        ["cairn-operator"],
        "{:?}",
        cp.metadata.managed_fields
    );
    let status = cp.status.unwrap();
    assert_eq!(status.node_name.as_deref(), Some("node-1"));
    assert_eq!(status.disks.len(), 2, "{:?}", status.disks);
    assert_eq!(
        condition(&status.conditions, "DomainRecorded").map(|c| c.status.as_str()),
        Some("True")
    );
    assert_eq!(status.domain.as_ref().map(|d| d.disks.len()), Some(2));
    assert!(vm.bitmaps("disk0")?.contains(&"cp1".to_string()));
    assert!(vm.bitmaps("disk1")?.contains(&"cp1".to_string()));

    // A second checkpoint gets the first as parent; writes show up as its size.
    apply(&env, &checkpoint_yaml("cp2", "vm1", ""))?;
    let cp2 = wait_checkpoint(&env, "cp2", CheckpointPhase::Ready).await?;
    assert_eq!(cp2.status.unwrap().parent.as_deref(), Some("cp1"));
    vm.write("disk0", 0x11, 0, MIB)?;
    let api: Api<VirtualMachineCheckpoint> = Api::namespaced(env.client.clone(), &env.namespace);
    wait::until(&api, "cp2", T, "size to count the write", |c| {
        c.status
            .as_ref()
            .and_then(|s| s.size)
            .is_some_and(|s| s >= MIB as i64)
    })
    .await?;

    let out = env
        .kubectl(&["delete", "vmcp", "cp1", "--timeout=60s"])
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait::gone(&api, "cp1", T).await?;
    assert!(
        !vm.bitmaps("disk0")?.contains(&"cp1".to_string()),
        "bitmap cp1 left behind"
    );
    assert!(
        vm.bitmaps("disk0")?.contains(&"cp2".to_string()),
        "deleting cp1 broke cp2"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn full_and_incremental_chain_restores_byte_for_byte() -> Result<()> {
    let (env, cluster) = TestEnv::with_cluster("chain").await?;
    let size = 64 * MIB;
    let vm = start_vm1(cluster, &env, size).await?;
    let dir: PathBuf = cluster
        .backup_dir("node-1")
        .join(&env.namespace)
        .join("vm1");
    let mut model = DiskModel::new(size);
    let mut expected = Vec::new();

    model.write(&vm, "disk0", 0xa1, 0, 8 * MIB)?;
    apply(
        &env,
        &backup_yaml("full-1", "vm1", &push_extra(&dir, None, Some("c1"))),
    )?;
    let b = wait_backup(&env, "full-1", BackupPhase::Succeeded).await?;
    wait_verified(&env, "full-1").await?;
    expected.push(("full-1", model.sha256()));
    assert_eq!(b.status.as_ref().unwrap().checkpoint.as_deref(), Some("c1"));
    wait_checkpoint(&env, "c1", CheckpointPhase::Ready).await?;

    let mut base = "c1".to_string();
    for round in 1..=3u8 {
        model.write(
            &vm,
            "disk0",
            0xb0 + round,
            u64::from(round) * 4 * MIB + 4096,
            512 * 1024,
        )?;
        let name = format!("inc-{round}");
        let next = format!("c{}", round + 1);
        apply(
            &env,
            &backup_yaml(&name, "vm1", &push_extra(&dir, Some(&base), Some(&next))),
        )?;
        let b = wait_backup(&env, &name, BackupPhase::Succeeded).await?;
        let disk = &b.status.as_ref().unwrap().disks[0];
        assert_eq!(disk.incremental_from.as_deref(), Some(base.as_str()));
        assert!(
            disk.backing_file.is_some(),
            "incremental has no backing file: {disk:?}"
        );
        assert!(
            disk.bytes_copied.unwrap_or(0) < size as i64 / 4,
            "incremental copied too much: {disk:?}"
        );
        wait_verified(&env, &name).await?;
        expected.push((Box::leak(name.into_boxed_str()), model.sha256()));
        wait_checkpoint(&env, &next, CheckpointPhase::Ready).await?;
        base = next;
    }
    // An independent chain: incremental from the oldest checkpoint still works.
    model.write(&vm, "disk0", 0xee, 40 * MIB, MIB)?;
    apply(
        &env,
        &backup_yaml("from-c1", "vm1", &push_extra(&dir, Some("c1"), None)),
    )?;
    wait_backup(&env, "from-c1", BackupPhase::Succeeded).await?;
    expected.push(("from-c1", model.sha256()));

    let out_dir = tempfile::tempdir()?;
    for (name, sha) in &expected {
        let restored = restore(&dir, name, &out_dir.path().join(format!("{name}.raw")))?;
        assert_eq!(
            &restored, sha,
            "restore of {name} differs from the disk at that backup"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn pull_export_is_readable_and_torn_down() -> Result<()> {
    let (env, cluster) = TestEnv::with_cluster("pull").await?;
    let vm = start_vm1(cluster, &env, 64 * MIB).await?;
    apply(&env, &checkpoint_yaml("base", "vm1", ""))?;
    wait_checkpoint(&env, "base", CheckpointPhase::Ready).await?;
    vm.write("disk0", 0x42, 4 * MIB, MIB)?;

    apply(
        &env,
        &backup_yaml("pull-1", "vm1", "  mode: Pull\n  incremental: base\n"),
    )?;
    let b = wait_backup(&env, "pull-1", BackupPhase::Exporting).await?;
    let status = b.status.unwrap();
    let disk = &status.disks[0];
    let url = disk.target.clone().context("export URL per disk")?;
    let ctx = disk.bitmap_context.clone().context("bitmap context")?;
    assert!(ctx.starts_with("qemu:dirty-bitmap:"), "{ctx}");
    let map = std::process::Command::new("nbdinfo")
        .arg(format!("--map={ctx}"))
        .arg(&url)
        .output()?;
    ensure!(
        map.status.success(),
        "nbdinfo --map failed: {}",
        String::from_utf8_lossy(&map.stderr)
    );
    let text = String::from_utf8_lossy(&map.stdout);
    let dirty: Vec<&str> = text.lines().filter(|l| l.contains("dirty")).collect();
    assert!(
        !dirty.is_empty() && dirty[0].split_whitespace().next() == Some(&(4 * MIB).to_string()),
        "dirty map: {text}"
    );
    let size = std::process::Command::new("nbdinfo")
        .arg("--size")
        .arg(&url)
        .output()?;
    assert_eq!(
        String::from_utf8_lossy(&size.stdout).trim(),
        (64 * MIB).to_string()
    );

    let out = env
        .kubectl(&["delete", "vmb", "pull-1", "--timeout=60s"])
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let exports = vm.qmp("query-block-exports", serde_json::json!({}))?;
    assert_eq!(
        exports.as_array().map(Vec::len),
        Some(0),
        "exports left: {exports}"
    );
    assert_eq!(
        vm.bitmaps("disk0")?,
        vec!["base".to_string()],
        "temporary bitmaps left behind"
    );
    let nodes = vm.qmp("query-named-block-nodes", serde_json::json!({"flat": true}))?;
    let names: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["node-name"].as_str())
        .collect();
    assert!(
        names.iter().all(|n| !n.starts_with("cairn-")),
        "block nodes left: {names:?}"
    );
    Ok(())
}
