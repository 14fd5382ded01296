//! A hostile tenant against the checkpoint side (issue: tenant isolation):
//! `cairn.dev/` labels and annotations, a redefined `domain` naming another
//! tenant's image, disabled bitmaps passed off as checkpoints, and the default
//! disk selection of incrementals. Each case checks the refusal reason and
//! that nothing changed for the victim (bitmaps in QEMU and in image files).

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, ensure};
use cairn_api::{BackupPhase, CheckpointPhase};
use cairn_e2e::harness::TestEnv;
use cairn_e2e::scenario::*;
use serde_json::json;

/// Bitmap names in a (stopped) image file, as `qemu-img info` reports them.
fn image_bitmaps(image: &Path) -> Result<Vec<String>> {
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(image)
        .output()?;
    ensure!(out.status.success(), "qemu-img info {}", image.display());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| b["name"].as_str().map(String::from))
        .collect())
}

/// Runs kubectl with `kubeconfig` and `stdin`, returning (success, stderr).
fn kubectl_as_stdin(
    env: &TestEnv,
    kubeconfig: &Path,
    args: &[&str],
    stdin: &str,
) -> Result<(bool, String)> {
    use std::io::Write;
    let mut child = env
        .kubectl_as(kubeconfig, args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(stdin.as_bytes())?;
    let out = child.wait_with_output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Applies `yaml` as `kubeconfig`'s user, expecting the `cairn.dev/` policy
/// to refuse it; returns kubectl's error.
fn expect_refused(env: &TestEnv, kubeconfig: &Path, yaml: &str) -> Result<String> {
    let (ok, err) = kubectl_as_stdin(env, kubeconfig, &["apply", "-f", "-"], yaml)?;
    ensure!(!ok, "applied:\n{yaml}");
    ensure!(
        err.contains("under cairn.dev/ are set by Cairn only"),
        "refused for another reason: {err}"
    );
    Ok(err)
}

#[tokio::test(flavor = "multi_thread")]
async fn cairn_metadata_is_refused_at_admission_and_not_trusted_by_the_agent() -> Result<()> {
    let (env, cluster) = TestEnv::with_cluster("tenant-labels").await?;
    let vm = start_vm1(cluster, &env, 16 * MIB).await?;
    // The VM owner's own bitmap, made outside Cairn.
    vm.qmp(
        "block-dirty-bitmap-add",
        json!({"node": "disk0-fmt", "name": "victim-cp", "persistent": true}),
    )?;
    let tenant = env.tenant_kubeconfig("mallory")?;

    let forged = "apiVersion: cairn.dev/v1alpha1\nkind: VirtualMachineCheckpoint\nmetadata:\n  name: victim-cp\n  labels:\n    cairn.dev/created-by-backup: b-real\n  annotations:\n    cairn.dev/created-by-backup-uid: made-up\nspec:\n  virtualMachine: vm1\n";
    // A tenant, and the cluster admin too, are refused at admission.
    let err = expect_refused(&env, &tenant, forged)?;
    assert!(err.contains("mallory"), "{err}");
    expect_refused(&env, &env.cp.kubeconfig, forged)?;
    // Labelling an existing object is refused the same way, in both directions.
    let (ok, err) = kubectl_as_stdin(
        &env,
        &tenant,
        &["apply", "-f", "-"],
        &checkpoint_yaml("plain", "vm1", ""),
    )?;
    ensure!(ok, "a tenant cannot create a plain checkpoint: {err}");
    wait_checkpoint(&env, "plain", CheckpointPhase::Ready).await?;
    for args in [
        [
            "label",
            "vmcp",
            "plain",
            "cairn.dev/node=node-2",
            "--overwrite",
        ],
        ["label", "vmcp", "plain", "cairn.dev/node-", "--overwrite"],
        [
            "annotate",
            "vmcp",
            "plain",
            "cairn.dev/created-by-backup-uid=x",
            "--overwrite",
        ],
    ] {
        let out = env.kubectl_as(&tenant, &args).output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "kubectl {args:?} was allowed");
        ensure!(err.contains("set by Cairn only"), "{args:?}: {err}");
    }
    let routed = kubectl(
        &env,
        &[
            "get",
            "vmcp",
            "plain",
            "-o",
            "jsonpath={.metadata.labels.cairn\\.dev/node}",
        ],
    )?;
    assert_eq!(routed, "node-1");

    // Where no admission policy runs (simulated with Cairn's own identity),
    // the agent still adopts nothing on the label alone: a real backup exists
    // under that name, but it did not ask for this checkpoint.
    let dir = cluster
        .backup_dir("node-1")
        .join(&env.namespace)
        .join("vm1");
    apply(
        &env,
        &backup_yaml("b-real", "vm1", &push_extra(&dir, None, Some("real-cp"))),
    )?;
    wait_backup(&env, "b-real", BackupPhase::Succeeded).await?;
    let operator = env.cp.operator_kubeconfig();
    let (ok, err) = kubectl_as_stdin(&env, &operator, &["apply", "-f", "-"], forged)?;
    ensure!(ok, "Cairn's identity may write cairn.dev/ metadata: {err}");
    let cp = wait_checkpoint(&env, "victim-cp", CheckpointPhase::Failed).await?;
    let ready = condition(&cp.status.as_ref().context("status")?.conditions, "Ready")
        .context("Ready")?
        .clone();
    assert_eq!(ready.reason, "NotCreatedByBackup", "{}", ready.message);
    assert!(ready.message.contains("b-real"), "{}", ready.message);
    // Deleting the failed checkpoint leaves the owner's bitmap alone.
    kubectl(&env, &["delete", "vmcp", "victim-cp", "--timeout=60s"])?;
    let mut have = vm.bitmaps("disk0")?;
    have.sort();
    assert_eq!(have, ["plain", "real-cp", "victim-cp"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redefined_domain_is_a_claim_checked_against_the_vm() -> Result<()> {
    let (env, cluster) = TestEnv::with_cluster("tenant-domain").await?;
    let vm = start_vm1(cluster, &env, 16 * MIB).await?;
    vm.qmp(
        "block-dirty-bitmap-add",
        json!({"node": "disk0-fmt", "name": "cp-r", "persistent": true}),
    )?;
    // Another tenant's stopped VM image, carrying a bitmap of the same name.
    let victim_dir = cluster
        .state_dir
        .join("vms")
        .join(format!("{}-victim", env.namespace));
    std::fs::create_dir_all(&victim_dir)?;
    let victim = victim_dir.join("victim-disk0.qcow2");
    cairn_e2e::vm::create_image(&victim, "qcow2", 16 * MIB)?;
    let out = Command::new("qemu-img")
        .args(["bitmap", "--add"])
        .arg(&victim)
        .arg("cp-r")
        .output()?;
    ensure!(out.status.success(), "qemu-img bitmap --add");

    let redefine = |name: &str, file: &Path| {
        checkpoint_yaml(
            name,
            "vm1",
            &format!(
                "  redefine: true\n  disks:\n  - name: disk0\n    checkpoint: Bitmap\n    bitmap: cp-r\n  domain:\n    disks:\n    - name: disk0\n      file: {}\n      format: qcow2\n",
                file.display()
            ),
        )
    };
    let tenant = env.tenant_kubeconfig("mallory")?;
    let (ok, err) = kubectl_as_stdin(
        &env,
        &tenant,
        &["apply", "-f", "-"],
        &redefine("steal", &victim),
    )?;
    ensure!(ok, "{err}");
    let cp = wait_checkpoint(&env, "steal", CheckpointPhase::Failed).await?;
    let status = cp.status.context("status")?;
    let ready = condition(&status.conditions, "Ready").context("Ready")?;
    assert_eq!(ready.reason, "DomainMismatch", "{}", ready.message);
    assert!(
        ready.message.contains(&victim.display().to_string()),
        "{}",
        ready.message
    );
    assert!(status.domain.is_none(), "an unverified domain was recorded");
    // The VM stops; deleting the failed checkpoint touches no image.
    let mut vm = vm;
    vm.quit()?;
    kubectl(&env, &["delete", "vmcp", "steal", "--timeout=60s"])?;
    assert_eq!(image_bitmaps(&victim)?, ["cp-r"]);
    assert_eq!(image_bitmaps(&vm.disk("disk0").image)?, ["cp-r"]);

    // The truth is accepted and recorded as QEMU reports it.
    vm.launch()?;
    let own = vm.disk("disk0").image.clone();
    apply(&env, &redefine("honest", &own))?;
    let cp = wait_checkpoint(&env, "honest", CheckpointPhase::Ready).await?;
    let status = cp.status.context("status")?;
    let recorded = condition(&status.conditions, "DomainRecorded").context("DomainRecorded")?;
    assert_eq!(
        (recorded.status.as_str(), recorded.reason.as_str()),
        ("True", "Verified")
    );
    let domain = status.domain.context("domain")?;
    assert_eq!(domain.disks.len(), 1);
    assert_eq!(domain.disks[0].file, own.display().to_string());
    assert_eq!(domain.disks[0].node_name.as_deref(), Some("disk0-fmt"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn disabled_bitmaps_are_not_checkpoints() -> Result<()> {
    let (env, cluster) = TestEnv::with_cluster("tenant-disabled").await?;
    let vm = start_vm1(cluster, &env, 16 * MIB).await?;
    vm.qmp(
        "block-dirty-bitmap-add",
        json!({"node": "disk0-fmt", "name": "cp-off", "persistent": true, "disabled": true}),
    )?;
    apply(
        &env,
        &checkpoint_yaml("cp-off", "vm1", "  redefine: true\n"),
    )?;
    let cp = wait_checkpoint(&env, "cp-off", CheckpointPhase::Failed).await?;
    let ready = condition(&cp.status.as_ref().context("status")?.conditions, "Ready")
        .context("Ready")?
        .clone();
    assert_eq!(ready.reason, "BitmapDisabled", "{}", ready.message);
    assert!(ready.message.contains("disk0"), "{}", ready.message);

    // A Ready checkpoint whose bitmap gets disabled stops reading healthy,
    // and an incremental from it is refused: it would miss writes.
    let dir = cluster
        .backup_dir("node-1")
        .join(&env.namespace)
        .join("vm1");
    apply(
        &env,
        &backup_yaml("full", "vm1", &push_extra(&dir, None, Some("cp1"))),
    )?;
    wait_backup(&env, "full", BackupPhase::Succeeded).await?;
    wait_checkpoint(&env, "cp1", CheckpointPhase::Ready).await?;
    vm.qmp(
        "block-dirty-bitmap-disable",
        json!({"node": "disk0-fmt", "name": "cp1"}),
    )?;
    let cp = wait_checkpoint(&env, "cp1", CheckpointPhase::Failed).await?;
    let ready = condition(&cp.status.as_ref().context("status")?.conditions, "Ready")
        .context("Ready")?
        .clone();
    assert_eq!(ready.reason, "BitmapDisabled", "{}", ready.message);
    let shown = kubectl(&env, &["get", "vmcp", "cp1", "--no-headers"])?;
    assert!(
        !shown.contains("Ready "),
        "kubectl get shows a healthy phase: {shown}"
    );
    apply(
        &env,
        &backup_yaml("inc", "vm1", &push_extra(&dir, Some("cp1"), None)),
    )?;
    let b = wait_backup(&env, "inc", BackupPhase::Failed).await?;
    let failed = condition(&b.status.as_ref().context("status")?.conditions, "Ready")
        .context("Ready")?
        .clone();
    assert_eq!(
        failed.reason, "IncrementalBaseUnusable",
        "{}",
        failed.message
    );
    assert!(failed.message.contains("disabled"), "{}", failed.message);
    // Enabled again, it is a checkpoint again.
    vm.qmp(
        "block-dirty-bitmap-enable",
        json!({"node": "disk0-fmt", "name": "cp1"}),
    )?;
    wait_checkpoint(&env, "cp1", CheckpointPhase::Ready).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_incremental_takes_by_default_the_disks_that_carry_its_base() -> Result<()> {
    let (env, cluster) = TestEnv::with_cluster("tenant-selection").await?;
    let _vm = start_vm(
        cluster,
        &env,
        "node-1",
        "vm1",
        &[("disk0", "qcow2", 16 * MIB), ("disk1", "qcow2", 16 * MIB)],
    )?;
    wait_instance(&env, "vm1", "node-1").await?;
    let dir = cluster
        .backup_dir("node-1")
        .join(&env.namespace)
        .join("vm1");
    let mut extra = push_extra(&dir, None, Some("cp-a"));
    extra.push_str("  disks:\n  - name: disk0\n");
    apply(&env, &backup_yaml("full", "vm1", &extra))?;
    wait_backup(&env, "full", BackupPhase::Succeeded).await?;
    wait_checkpoint(&env, "cp-a", CheckpointPhase::Ready).await?;
    // No disk list: disk1 never had cp-a, so only disk0 is backed up.
    apply(
        &env,
        &backup_yaml("inc", "vm1", &push_extra(&dir, Some("cp-a"), None)),
    )?;
    let b = wait_backup(&env, "inc", BackupPhase::Succeeded).await?;
    let disks: Vec<String> = b
        .status
        .context("status")?
        .disks
        .iter()
        .map(|d| d.name.clone())
        .collect();
    assert_eq!(disks, ["disk0"]);
    Ok(())
}
