//! Backups into the local cluster's repositories (`local-dir`, `local-s3` on a
//! real S3 server) through `kubectl apply`: full then incremental, each
//! snapshot restored with `cairn-agent restore --repository` (no cluster) and
//! compared byte for byte with the disk at its backup instant; incrementals
//! read only what changed; tenancy (a namespace the repository does not
//! allow; dedup within a namespace but never across namespaces).

use anyhow::{Context, Result, ensure};
use cairn_api::BackupPhase;
use cairn_e2e::harness::TestEnv;
use cairn_e2e::repository_access::{backup_into, restore_sha, snapshot_of};
use cairn_e2e::scenario::*;

async fn full_then_incremental(repo: &str) -> Result<()> {
    let (env, cluster) = TestEnv::with_cluster(&format!("repo-{repo}")).await?;
    let size = 64 * MIB;
    let vm = start_vm1(cluster, &env, size).await?;
    let mut model = DiskModel::new(size);
    model.write(&vm, "disk0", 0x11, 0, 8 * MIB)?;
    model.write(&vm, "disk0", 0x12, 40 * MIB, 3 * MIB)?;
    apply(
        &env,
        &backup_yaml("full", "vm1", &backup_into(repo, None, Some("c1"))),
    )?;
    let full = snapshot_of(&env, "full").await?;
    let full_id = full.snapshot.clone().context("snapshot id")?;
    let at_full = model.sha256();
    // Written after the backup started: not in the full snapshot.
    model.write(&vm, "disk0", 0x13, 20 * MIB, MIB)?;
    model.write(&vm, "disk0", 0x14, 60 * MIB, 64 * 1024)?;
    apply(
        &env,
        &backup_yaml("inc", "vm1", &backup_into(repo, Some("c1"), Some("c2"))),
    )?;
    let inc = snapshot_of(&env, "inc").await?;
    let inc_id = inc.snapshot.clone().context("snapshot id")?;
    assert_eq!(inc.base_snapshot.as_deref(), Some(full_id.as_str()));
    // Only chunks touched by the 1 MiB + 64 KiB of writes were read.
    let read = inc.bytes_read.unwrap_or(i64::MAX);
    ensure!(
        read > 0 && read <= 4 * MIB as i64,
        "the incremental read {read} bytes for about 1 MiB of changes"
    );
    assert!(
        full.bytes_read.unwrap_or(0) >= (11 * MIB) as i64,
        "{full:?}"
    );
    assert!(full.bytes_uploaded.unwrap_or(0) > 0, "{full:?}");
    // Each snapshot restores on its own to the disk at its instant.
    assert_eq!(restore_sha(&env, repo, &full_id, "disk0")?, at_full);
    assert_eq!(restore_sha(&env, repo, &inc_id, "disk0")?, model.sha256());
    // The checkpoints the backups made are real: the VM carries them.
    let mut bitmaps = vm.bitmaps("disk0")?;
    bitmaps.sort();
    assert_eq!(bitmaps, ["c1", "c2"]);
    assert!(leftovers(&vm)?.is_empty(), "{:?}", leftovers(&vm)?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn full_and_incremental_into_the_directory_repository() -> Result<()> {
    full_then_incremental("local-dir").await
}

#[tokio::test(flavor = "multi_thread")]
async fn full_and_incremental_into_the_s3_repository() -> Result<()> {
    full_then_incremental("local-s3").await
}

#[tokio::test(flavor = "multi_thread")]
async fn repositories_keep_tenants_apart() -> Result<()> {
    let (env, cluster) = TestEnv::with_cluster("repo-tenancy").await?;
    let size = 16 * MIB;
    // A repository that allows one other namespace only.
    let only = format!("only-{}", env.namespace);
    let dir = cluster.state_dir.join("repository").join(&only);
    apply(
        &env,
        &format!(
            "apiVersion: cairn.dev/v1alpha1\nkind: BackupRepository\nmetadata:\n  name: {only}\nspec:\n  storage:\n    directory:\n      path: {}\n  allowedNamespaces:\n    names: [somebody-else]\n",
            dir.display()
        ),
    )?;
    let vm = start_vm1(cluster, &env, size).await?;
    vm.write("disk0", 0x21, 0, 4 * MIB)?;
    apply(
        &env,
        &backup_yaml("refused", "vm1", &backup_into(&only, None, None)),
    )?;
    let b = wait_backup(&env, "refused", BackupPhase::Failed).await?;
    let ready = condition(&b.status.as_ref().context("status")?.conditions, "Ready")
        .context("Ready")?
        .clone();
    assert_eq!(ready.reason, "RepositoryNotAllowed", "{}", ready.message);
    assert!(ready.message.contains(&env.namespace), "{}", ready.message);
    // Refused before routing: no agent ever opened the repository for it.
    assert!(
        b.status
            .as_ref()
            .and_then(|s| s.repository.as_ref())
            .is_none(),
        "{:?}",
        b.status
    );
    kubectl(&env, &["delete", "backuprepository", &only])?;

    // Same data in a second VM of the namespace: nothing new is stored.
    let vm2 = start_vm(cluster, &env, "node-1", "vm2", &[("disk0", "qcow2", size)])?;
    wait_instance(&env, "vm2", "node-1").await?;
    vm2.write("disk0", 0x21, 0, 4 * MIB)?;
    apply(
        &env,
        &backup_yaml("a", "vm1", &backup_into("local-dir", None, None)),
    )?;
    let a = snapshot_of(&env, "a").await?;
    apply(
        &env,
        &backup_yaml("b", "vm2", &backup_into("local-dir", None, None)),
    )?;
    let b = snapshot_of(&env, "b").await?;
    assert!(a.chunks_new.unwrap_or(0) > 0, "{a:?}");
    assert_eq!(
        b.chunks_new,
        Some(0),
        "a clone in the same namespace deduplicates: {b:?}"
    );

    // The same bytes from another namespace are stored again: chunk ids are
    // keyed per namespace, so one tenant cannot probe for another's data.
    let other = TestEnv::on(&cluster.cp, "repo-tenancy-2").await?;
    let vm3 = start_vm(
        cluster,
        &other,
        "node-1",
        "vm1",
        &[("disk0", "qcow2", size)],
    )?;
    wait_instance(&other, "vm1", "node-1").await?;
    vm3.write("disk0", 0x21, 0, 4 * MIB)?;
    apply(
        &other,
        &backup_yaml("c", "vm1", &backup_into("local-dir", None, None)),
    )?;
    let c = snapshot_of(&other, "c").await?;
    assert_eq!(
        c.chunks_new, a.chunks_new,
        "cross-namespace dedup: {c:?} vs {a:?}"
    );
    Ok(())
}
