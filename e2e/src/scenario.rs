//! Building blocks of end-to-end scenarios: manifests, waits on phases,
//! a byte-exact model of what the guest wrote, and restore through the real
//! `cairn-agent restore` binary.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use cairn_api::{
    BackupPhase, CheckpointPhase, QemuInstance, VirtualMachineBackup, VirtualMachineCheckpoint,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::Api;
use sha2::{Digest, Sha256};

use crate::harness::TestEnv;
use crate::local_cluster::{LocalCluster, binary};
use crate::vm::TestVm;
use crate::wait;

/// One mebibyte.
pub const MIB: u64 = 1 << 20;
/// Default wait for a phase.
pub const T: Duration = Duration::from_secs(60);

/// What the guest wrote, byte for byte: the expected disk content.
pub struct DiskModel(pub Vec<u8>);

impl DiskModel {
    /// A zeroed disk of `size` bytes.
    pub fn new(size: u64) -> Self {
        Self(vec![0; size as usize])
    }
    /// Writes through the VM and records the write.
    pub fn write(
        &mut self,
        vm: &TestVm,
        disk: &str,
        pattern: u8,
        offset: u64,
        len: u64,
    ) -> Result<()> {
        vm.write(disk, pattern, offset, len)?;
        self.0[offset as usize..(offset + len) as usize].fill(pattern);
        Ok(())
    }
    /// Writes `len` random (incompressible, never deduplicated) bytes through
    /// the VM and records them.
    pub fn write_random(&mut self, vm: &TestVm, disk: &str, offset: u64, len: u64) -> Result<()> {
        let range = offset as usize..(offset + len) as usize;
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut self.0[range.clone()]);
        let file = tempfile::NamedTempFile::new()?;
        std::fs::write(file.path(), &self.0[range])?;
        vm.write_file(disk, file.path(), offset, len)
    }
    /// sha256 of the expected content.
    pub fn sha256(&self) -> String {
        hex(&Sha256::digest(&self.0))
    }
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `kubectl apply -f -` in the env's namespace.
pub fn apply(env: &TestEnv, yaml: &str) -> Result<()> {
    let (ok, out, err) = env.kubectl_stdin(&["apply", "-f", "-"], yaml)?;
    ensure!(ok, "kubectl apply failed: {err}\n{yaml}");
    let _ = out;
    Ok(())
}

/// A checkpoint manifest; `extra` is more spec lines.
pub fn checkpoint_yaml(name: &str, vm: &str, extra: &str) -> String {
    format!(
        "apiVersion: cairn.dev/v1alpha1\nkind: VirtualMachineCheckpoint\nmetadata:\n  name: {name}\nspec:\n  virtualMachine: {vm}\n{extra}"
    )
}

/// A backup manifest; `extra` is more spec lines.
pub fn backup_yaml(name: &str, vm: &str, extra: &str) -> String {
    format!(
        "apiVersion: cairn.dev/v1alpha1\nkind: VirtualMachineBackup\nmetadata:\n  name: {name}\nspec:\n  virtualMachine: {vm}\n{extra}"
    )
}

/// Spec lines of a push backup into `dir`.
pub fn push_extra(dir: &Path, incremental: Option<&str>, checkpoint: Option<&str>) -> String {
    let mut s = format!("  target:\n    directory:\n      path: {}\n", dir.display());
    if let Some(i) = incremental {
        s.push_str(&format!("  incremental: {i}\n"));
    }
    if let Some(c) = checkpoint {
        s.push_str(&format!("  checkpoint:\n    name: {c}\n"));
    }
    s
}

/// Starts a VM whose socket node `node`'s agent watches.
pub fn start_vm(
    cluster: &LocalCluster,
    env: &TestEnv,
    node: &str,
    name: &str,
    disks: &[(&str, &str, u64)],
) -> Result<TestVm> {
    let dir = cluster.state_dir.join("vms").join(&env.namespace);
    TestVm::start(&cluster.qmp_dir(node), &env.namespace, name, &dir, disks)
}

/// The common fixture: VM `vm1` with one qcow2 disk `disk0` of `size` bytes on
/// `node-1`, once its agent published it.
pub async fn start_vm1(cluster: &LocalCluster, env: &TestEnv, size: u64) -> Result<TestVm> {
    let vm = start_vm(cluster, env, "node-1", "vm1", &[("disk0", "qcow2", size)])?;
    wait_instance(env, "vm1", "node-1").await?;
    Ok(vm)
}

/// Waits until the agent of `node` published the VM.
pub async fn wait_instance(env: &TestEnv, vm: &str, node: &str) -> Result<QemuInstance> {
    let api: Api<QemuInstance> = Api::namespaced(env.client.clone(), &env.namespace);
    wait::until(&api, vm, T, "QemuInstance published", |qi| {
        qi.status
            .as_ref()
            .is_some_and(|s| s.node_name.as_deref() == Some(node) && !s.disks.is_empty())
    })
    .await
}

/// Waits for a checkpoint phase.
pub async fn wait_checkpoint(
    env: &TestEnv,
    name: &str,
    phase: CheckpointPhase,
) -> Result<VirtualMachineCheckpoint> {
    let api: Api<VirtualMachineCheckpoint> = Api::namespaced(env.client.clone(), &env.namespace);
    wait::until(&api, name, T, &format!("checkpoint {phase:?}"), |c| {
        c.status.as_ref().and_then(|s| s.phase) == Some(phase)
    })
    .await
}

/// Waits for a backup phase; fails early when it ends in another one.
pub async fn wait_backup(
    env: &TestEnv,
    name: &str,
    phase: BackupPhase,
) -> Result<VirtualMachineBackup> {
    let api: Api<VirtualMachineBackup> = Api::namespaced(env.client.clone(), &env.namespace);
    wait::until(
        &api,
        name,
        Duration::from_secs(120),
        &format!("backup {phase:?}"),
        |b| {
            let p = b.status.as_ref().and_then(|s| s.phase);
            p == Some(phase) || (p.is_some_and(BackupPhase::is_finished) && p != Some(phase))
        },
    )
    .await
    .and_then(|b| {
        let p = b.status.as_ref().and_then(|s| s.phase);
        ensure!(
            p == Some(phase),
            "backup {name} ended {p:?}, not {phase:?}: {:#?}",
            b.status
        );
        Ok(b)
    })
}

/// Waits until a Succeeded push backup is verified (`Verified=True`, failing
/// early on `Verified=False`) and checks that each `status.disks[].sha256` is
/// the SHA-256 of that disk's backup file (`status.disks[].target`).
pub async fn wait_verified(env: &TestEnv, name: &str) -> Result<VirtualMachineBackup> {
    let api: Api<VirtualMachineBackup> = Api::namespaced(env.client.clone(), &env.namespace);
    let b = wait::until(
        &api,
        name,
        Duration::from_secs(120),
        "backup Verified",
        |b| {
            b.status
                .as_ref()
                .and_then(|s| condition(&s.conditions, "Verified"))
                .is_some()
        },
    )
    .await?;
    let status = b.status.as_ref().context("no status")?;
    let verified = condition(&status.conditions, "Verified").context("no Verified")?;
    ensure!(
        verified.status == "True" && verified.reason == "ChecksumsRecorded",
        "backup {name} not verified: {verified:?}"
    );
    ensure!(
        status.phase == Some(BackupPhase::Succeeded),
        "backup {name} left Succeeded: {status:?}"
    );
    for d in &status.disks {
        let file = d.target.as_deref().context("disk without target")?;
        let actual = hex(&Sha256::digest(std::fs::read(file)?));
        ensure!(
            d.sha256.as_deref() == Some(actual.as_str()),
            "status sha256 {:?} of disk {} is not the sha256 {actual} of {file}",
            d.sha256,
            d.name
        );
    }
    Ok(b)
}

/// The condition of type `t`.
pub fn condition<'a>(conds: &'a [Condition], t: &str) -> Option<&'a Condition> {
    conds.iter().find(|c| c.type_ == t)
}

/// Restores the backup `name` found in `dir` with `cairn-agent restore`
/// (which checks every chain file against its recorded checksum) and returns
/// the sha256 of the restored image itself, for comparison with the model.
/// The agent verifies a backup just after reporting it Succeeded, so a
/// restore refused for a missing checksum is retried for a while.
pub fn restore(dir: &Path, name: &str, out: &Path) -> Result<String> {
    let manifest = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            let f = p.file_name().unwrap().to_string_lossy();
            f.starts_with(&format!("{name}.")) && f.ends_with(".manifest.json")
        })
        .with_context(|| format!("no manifest of {name} in {}", dir.display()))?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let o = loop {
        let o = std::process::Command::new(binary("cairn-agent"))
            .args(["restore", "--manifest"])
            .arg(&manifest)
            .arg("--output")
            .arg(out)
            .args(["--format", "raw"])
            .output()?;
        let unverified = String::from_utf8_lossy(&o.stderr).contains("no recorded checksum");
        if o.status.success() || !unverified || std::time::Instant::now() > deadline {
            break o;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    ensure!(
        o.status.success(),
        "restore failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    ensure!(
        text.trim_end().ends_with("\tverified") && text.contains(&out.display().to_string()),
        "restore did not report the verified output {}: {text}",
        out.display()
    );
    Ok(hex(&Sha256::digest(std::fs::read(out)?)))
}

/// QEMU-side objects Cairn names `cairn-…` that are still present: jobs (any
/// job at all counts), block nodes and exports, as `kind:name`.
pub fn leftovers(vm: &TestVm) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let jobs = vm.qmp("query-jobs", serde_json::json!({}))?;
    for j in jobs.as_array().into_iter().flatten() {
        out.push(format!(
            "job:{} ({})",
            j["id"].as_str().unwrap_or_default(),
            j["status"].as_str().unwrap_or_default()
        ));
    }
    let nodes = vm.qmp("query-named-block-nodes", serde_json::json!({"flat": true}))?;
    for n in nodes.as_array().into_iter().flatten() {
        if let Some(name) = n["node-name"].as_str()
            && name.starts_with("cairn-")
        {
            out.push(format!("node:{name}"));
        }
        for b in n["dirty-bitmaps"].as_array().into_iter().flatten() {
            if let Some(name) = b["name"].as_str()
                && name.starts_with("cairn-")
            {
                out.push(format!("bitmap:{name}"));
            }
        }
    }
    let exports = vm.qmp("query-block-exports", serde_json::json!({}))?;
    for e in exports.as_array().into_iter().flatten() {
        out.push(format!("export:{}", e["id"].as_str().unwrap_or_default()));
    }
    Ok(out)
}

/// Files (names) directly in `dir`; empty when it does not exist.
pub fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Polls the VM's jobs until a Cairn backup job shows up and limits its speed
/// to `speed` bytes/s through the test's own monitor; returns the job id.
/// Start it before applying the backup: a fast job can finish in under a second.
pub fn throttle_next_job(vm: &TestVm, speed: u64, timeout: Duration) -> Result<String> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let jobs = vm.qmp("query-jobs", serde_json::json!({}))?;
        let job = jobs.as_array().into_iter().flatten().find(|j| {
            j["id"].as_str().is_some_and(|id| id.starts_with("cairn-")) && j["type"] == "backup"
        });
        if let Some(j) = job {
            let id = j["id"].as_str().unwrap_or_default().to_string();
            ensure!(
                j["status"] != "concluded",
                "backup job {id} finished before it could be slowed down: {j}"
            );
            set_job_speed(vm, &id, speed)?;
            return Ok(id);
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "no Cairn backup job appeared within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `block-job-set-speed` on the VM's job `id` (0 = unlimited).
pub fn set_job_speed(vm: &TestVm, id: &str, speed: u64) -> Result<()> {
    vm.qmp(
        "block-job-set-speed",
        serde_json::json!({"device": id, "speed": speed}),
    )?;
    Ok(())
}

/// Waits until checkpoint `name` satisfies `pred`.
pub async fn wait_checkpoint_until<F>(
    env: &TestEnv,
    name: &str,
    what: &str,
    pred: F,
) -> Result<VirtualMachineCheckpoint>
where
    F: Fn(&VirtualMachineCheckpoint) -> bool,
{
    let api: Api<VirtualMachineCheckpoint> = Api::namespaced(env.client.clone(), &env.namespace);
    wait::until(&api, name, T, what, pred).await
}

/// Waits until the `Ready` condition of checkpoint `name` has `status` and `reason`.
pub async fn wait_checkpoint_ready_condition(
    env: &TestEnv,
    name: &str,
    status: &str,
    reason: &str,
) -> Result<VirtualMachineCheckpoint> {
    wait_checkpoint_until(env, name, &format!("Ready={status} reason {reason}"), |c| {
        c.status
            .as_ref()
            .and_then(|s| condition(&s.conditions, "Ready"))
            .is_some_and(|c| c.status == status && c.reason == reason)
    })
    .await
}

/// Runs kubectl in the env's namespace; fails with its stderr when it fails.
pub fn kubectl(env: &TestEnv, args: &[&str]) -> Result<String> {
    let out = env.kubectl(args).output()?;
    ensure!(
        out.status.success(),
        "kubectl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Waits until the VM's QemuInstance satisfies `pred` (e.g. shows a bitmap
/// state only the QEMU started last can have).
pub async fn wait_instance_until<F>(
    env: &TestEnv,
    vm: &str,
    what: &str,
    pred: F,
) -> Result<QemuInstance>
where
    F: Fn(&QemuInstance) -> bool,
{
    let api: Api<QemuInstance> = Api::namespaced(env.client.clone(), &env.namespace);
    wait::until(&api, vm, T, what, pred).await
}

/// Whether the QemuInstance reports bitmap `name` on some disk with `inconsistent`.
pub fn instance_bitmap_inconsistent(qi: &QemuInstance, name: &str) -> bool {
    qi.status.as_ref().is_some_and(|s| {
        s.disks
            .iter()
            .any(|d| d.bitmaps.iter().any(|b| b.name == name && b.inconsistent))
    })
}
