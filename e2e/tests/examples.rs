//! Every file in examples/ works as written: applied in order against the
//! local cluster (real QEMU, operator, agent), each reaches the outcome its
//! header documents (`# Outcome: <Phase> …`).
//!
//! Only placeholders are adjusted: the allowed backup root of the chart
//! (`/var/lib/cairn/backups/default/` → this node's root and the test's
//! namespace) and, in the redefined domain, the VM's real image file and size.
//! The bitmaps that the redefine examples adopt are added through QMP first,
//! as `qemu-img bitmap --add` would have on a stopped VM.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use cairn_api::{BackupPhase, CheckpointPhase, VirtualMachineCheckpoint};
use cairn_e2e::harness::TestEnv;
use cairn_e2e::scenario::*;
use kube::Api;
use serde_json::Value;

/// The examples in the order a user would apply them; every file must be here.
const ORDER: &[&str] = &[
    "checkpoint.yaml",
    "checkpoint-disks.yaml",
    "backup-full.yaml",
    "backup-incremental.yaml",
    "restore.yaml",
    "backup-pull.yaml",
    "checkpoint-redefine.yaml",
    "checkpoint-redefine-domain.yaml",
    "backup-schedule.yaml",
];

const SIZE: u64 = 16 * MIB;

/// The phase an example's header promises.
fn outcome(text: &str) -> Option<String> {
    text.lines()
        .take_while(|l| l.starts_with('#'))
        .find_map(|l| l.strip_prefix("# Outcome: "))
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_string)
}

fn qemu_img_info(file: &str) -> Result<Value> {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json", file])
        .output()?;
    ensure!(
        out.status.success(),
        "qemu-img info {file}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_example_reaches_its_documented_outcome() -> Result<()> {
    let (env, cluster) = TestEnv::with_cluster("examples").await?;
    let listed: BTreeSet<String> = std::fs::read_dir(TestEnv::example(""))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
        .collect();
    let ordered: BTreeSet<String> = ORDER.iter().map(|s| s.to_string()).collect();
    ensure!(
        listed == ordered,
        "examples/ holds {listed:?}; this test applies {ordered:?}: add new examples to ORDER"
    );

    let vm = start_vm(
        cluster,
        &env,
        "node-1",
        "vm1",
        &[("disk0", "qcow2", SIZE), ("disk1", "qcow2", SIZE)],
    )?;
    wait_instance(&env, "vm1", "node-1").await?;
    // The bitmaps the redefine examples adopt.
    for name in ["offline-1", "rebuilt-cluster-cp"] {
        vm.qmp(
            "block-dirty-bitmap-add",
            serde_json::json!({"node": "disk0-fmt", "name": name, "persistent": true}),
        )?;
    }
    let root = cluster.backup_dir("node-1").join(&env.namespace);
    let disk0 = vm.disk("disk0").clone();
    let mut model = DiskModel::new(SIZE);
    model.write(&vm, "disk0", 0x5a, 0, 2 * MIB)?;

    for file in ORDER {
        let path = TestEnv::example(file);
        let text = std::fs::read_to_string(&path)?;
        let want = outcome(&text).with_context(|| format!("{file} documents no `# Outcome:`"))?;
        let manifest = text
            .replace(
                "/var/lib/cairn/backups/default/",
                &format!("{}/", root.display()),
            )
            .replace(
                "/var/lib/vms/vm1/disk0.qcow2",
                &disk0.image.display().to_string(),
            )
            .replace("virtualSize: 4294967296", &format!("virtualSize: {SIZE}"));
        let obj: Value = serde_saphyr::from_str(&manifest)?;
        let kind = obj["kind"].as_str().context("kind")?.to_string();
        let name = obj["metadata"]["name"]
            .as_str()
            .context("name")?
            .to_string();
        apply(&env, &manifest).with_context(|| format!("applying {file}"))?;
        eprintln!("{file}: {kind} {name} → waiting for {want}");
        match kind.as_str() {
            "VirtualMachineCheckpoint" => {
                let phase = match want.as_str() {
                    "Ready" => CheckpointPhase::Ready,
                    "Failed" => CheckpointPhase::Failed,
                    other => bail!("{file}: outcome {other} is not a checkpoint end phase"),
                };
                let cp = wait_checkpoint(&env, &name, phase).await?;
                let ready = condition(&cp.status.as_ref().context("status")?.conditions, "Ready")
                    .cloned()
                    .context("no Ready")?;
                ensure!(
                    (ready.status == "True") == (phase == CheckpointPhase::Ready),
                    "{file}: {ready:?}"
                );
            }
            "VirtualMachineBackup" => {
                let phase = match want.as_str() {
                    "Succeeded" => BackupPhase::Succeeded,
                    "Exporting" => BackupPhase::Exporting,
                    "Failed" => BackupPhase::Failed,
                    other => bail!("{file}: outcome {other} is not a backup phase"),
                };
                wait_backup(&env, &name, phase).await?;
            }
            "VirtualMachineRestore" => {
                let api: Api<cairn_api::VirtualMachineRestore> =
                    Api::namespaced(env.client.clone(), &env.namespace);
                let r = cairn_e2e::wait::until(
                    &api,
                    &name,
                    std::time::Duration::from_secs(120),
                    "restore finished",
                    |r| {
                        r.status
                            .as_ref()
                            .and_then(|s| s.phase)
                            .is_some_and(cairn_api::RestorePhase::is_finished)
                    },
                )
                .await?;
                let phase = r.status.as_ref().and_then(|s| s.phase).context("phase")?;
                ensure!(
                    phase.as_str() == want,
                    "{file}: ended {phase:?}: {:#?}",
                    r.status
                );
            }
            "VirtualMachineBackupSchedule" => {
                ensure!(want == "Ready", "{file}: outcome {want} is not Ready");
                let api: Api<cairn_api::VirtualMachineBackupSchedule> =
                    Api::namespaced(env.client.clone(), &env.namespace);
                let s = cairn_e2e::wait::until(&api, &name, T, "schedule Ready", |s| {
                    s.status
                        .as_ref()
                        .and_then(|st| condition(&st.conditions, "Ready"))
                        .is_some_and(|c| c.status == "True")
                })
                .await?;
                let st = s.status.context("status")?;
                ensure!(
                    st.next_schedule_time.is_some(),
                    "{file}: no nextScheduleTime"
                );
                ensure!(st.active.is_empty(), "{file}: a run started early: {st:?}");
            }
            other => bail!("{file}: unexpected kind {other}"),
        }
        // What each example's header promises beyond the phase.
        match *file {
            "checkpoint.yaml" => {
                for d in ["disk0", "disk1"] {
                    ensure!(vm.bitmaps(d)?.contains(&"cp-monday".to_string()));
                }
            }
            "checkpoint-disks.yaml" => {
                ensure!(vm.bitmaps("disk0")?.contains(&"data-only".to_string()));
                ensure!(!vm.bitmaps("disk1")?.contains(&"data-only".to_string()));
            }
            "backup-full.yaml" => {
                wait_checkpoint(&env, "cp-full-1", CheckpointPhase::Ready).await?;
                // Writes after the full backup, for the incremental to carry.
                model.write(&vm, "disk0", 0xa5, 4 * MIB, MIB)?;
            }
            "restore.yaml" => {
                let out = root.join("restored/disk0.raw");
                let bytes = std::fs::read(&out).with_context(|| out.display().to_string())?;
                ensure!(
                    hex(&<sha2::Sha256 as sha2::Digest>::digest(&bytes)) == model.sha256(),
                    "{} is not disk0 at the instant of vm1-inc-1",
                    out.display()
                );
            }
            "backup-incremental.yaml" => {
                wait_checkpoint(&env, "cp-inc-1", CheckpointPhase::Ready).await?;
                let full = wait_backup(&env, "vm1-full-1", BackupPhase::Succeeded).await?;
                let inc = wait_verified(&env, "vm1-inc-1").await?;
                let target = |b: &cairn_api::VirtualMachineBackup, disk: &str| {
                    b.status
                        .as_ref()
                        .and_then(|s| s.disks.iter().find(|d| d.name == disk))
                        .and_then(|d| d.target.clone())
                        .with_context(|| format!("no target of {disk}"))
                };
                let (full0, inc0) = (target(&full, "disk0")?, target(&inc, "disk0")?);
                ensure!(
                    Path::new(&full0).parent() == Path::new(&inc0).parent()
                        && Path::new(&inc0).starts_with(&root),
                    "full {full0} and incremental {inc0} are not in one directory under {}",
                    root.display()
                );
                let info = qemu_img_info(&inc0)?;
                let backing = info["full-backing-filename"]
                    .as_str()
                    .or(info["backing-filename"].as_str())
                    .unwrap_or_default();
                ensure!(
                    Path::new(backing).file_name() == Path::new(&full0).file_name(),
                    "{inc0} is backed by {backing:?}, not by the full backup {full0}"
                );
                // As the header says: converting the newest file restores the disk.
                let out = tempfile::tempdir()?;
                let raw = out.path().join("disk0.raw");
                let o = std::process::Command::new("qemu-img")
                    .args(["convert", "-U", "-O", "raw", &inc0])
                    .arg(&raw)
                    .output()?;
                ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
                let got = hex(&<sha2::Sha256 as sha2::Digest>::digest(std::fs::read(
                    &raw,
                )?));
                ensure!(
                    got == model.sha256(),
                    "disk0 restored from {inc0} differs from what was written"
                );
            }
            "backup-pull.yaml" => {
                let b = wait_backup(&env, &name, BackupPhase::Exporting).await?;
                let url = b
                    .status
                    .and_then(|s| s.export)
                    .map(|e| e.url)
                    .context("no export URL")?;
                ensure!(url.starts_with("nbd+unix://"), "{url}");
            }
            "checkpoint-redefine.yaml" | "checkpoint-redefine-domain.yaml" => {
                let api: Api<VirtualMachineCheckpoint> =
                    Api::namespaced(env.client.clone(), &env.namespace);
                let cp = api.get(&name).await?;
                let conds = cp.status.map(|s| s.conditions).unwrap_or_default();
                let recorded = condition(&conds, "DomainRecorded").context("DomainRecorded")?;
                let want = if *file == "checkpoint-redefine.yaml" {
                    ("False", "NotProvided")
                } else {
                    ("True", recorded.reason.as_str())
                };
                ensure!(
                    (recorded.status.as_str(), recorded.reason.as_str()) == want,
                    "{file}: {recorded:?}"
                );
            }
            _ => {}
        }
    }
    let _ = kubectl(&env, &["delete", "vmb", "vm1-pull-1", "--wait=true"]);
    drop(vm);
    Ok(())
}
