//! GitOps health, judged by the real libraries over live objects.
//!
//! Flux, kpt and Config Sync judge a resource with kstatus
//! (sigs.k8s.io/cli-utils `status.Compute`); Argo CD runs the Lua health
//! scripts of docs/gitops/argocd-health-checks.yaml in gopher-lua. Both are
//! built into `kstatus-checker` (e2e/tools/kstatus-checker, installed by
//! `Tools::ensure`). This test drives checkpoints and backups through every
//! phase on the local cluster (real QEMU, operator, agent), records every
//! version of them the API server sends on a watch — so even phases that last
//! milliseconds are seen exactly as written — and asserts for each version:
//!
//! | kind / phase                              | kstatus    | Argo CD     |
//! |-------------------------------------------|------------|-------------|
//! | checkpoint Pending, Creating              | InProgress | Progressing |
//! | checkpoint Ready                          | Current    | Healthy     |
//! | checkpoint Failed                         | Failed     | Degraded    |
//! | backup Pending, Running                   | InProgress | Progressing |
//! | backup Exporting (export served), Succeeded | Current  | Healthy     |
//! | backup Failed                             | Failed     | Degraded    |
//!
//! A failure's kstatus message is its reason's message (the `Stalled`
//! condition repeats `Ready=False`), and the final state of every object is
//! fetched again with `kubectl get -o json` and judged the same way.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail, ensure};
use cairn_api::{BackupPhase, CheckpointPhase};
use cairn_e2e::harness::TestEnv;
use cairn_e2e::scenario::*;
use futures::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::watcher;
use serde_json::Value;

/// What kstatus and Argo CD say about one object.
#[derive(Debug, PartialEq, Eq)]
struct Health {
    kstatus: String,
    kstatus_message: String,
    argocd: String,
    argocd_message: String,
}

/// Runs the checker over one object.
struct Checker {
    bin: PathBuf,
    dir: tempfile::TempDir,
    /// Argo CD health script per kind.
    lua: BTreeMap<String, PathBuf>,
}

impl Checker {
    fn new(env: &TestEnv) -> Result<Self> {
        let bin = env.cp.tools.kstatus_checker.clone();
        ensure!(
            bin.exists(),
            "{} is missing: Tools::ensure builds it",
            bin.display()
        );
        let dir = tempfile::tempdir()?;
        let doc = cairn_e2e::tools::repo_root().join("docs/gitops/argocd-health-checks.yaml");
        let cm: Value = serde_saphyr::from_str(&std::fs::read_to_string(&doc)?)
            .with_context(|| format!("parsing {}", doc.display()))?;
        let mut lua = BTreeMap::new();
        for kind in [
            "VirtualMachineCheckpoint",
            "VirtualMachineBackup",
            "QemuInstance",
        ] {
            let key = format!("resource.customizations.health.cairn.dev_{kind}");
            let script = cm["data"][&key]
                .as_str()
                .with_context(|| format!("{} has no {key}", doc.display()))?;
            let path = dir.path().join(format!("{kind}.lua"));
            std::fs::write(&path, script)?;
            lua.insert(kind.to_string(), path);
        }
        Ok(Self { bin, dir, lua })
    }

    fn run(&self, args: &[&Path]) -> Result<(String, String)> {
        let out = Command::new(&self.bin).args(args).output()?;
        ensure!(
            out.status.success(),
            "kstatus-checker {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut lines = text.splitn(2, '\n');
        Ok((
            lines.next().unwrap_or_default().to_string(),
            lines.next().unwrap_or_default().trim_end().to_string(),
        ))
    }

    fn health(&self, obj: &Value) -> Result<Health> {
        let kind = obj["kind"].as_str().context("object without kind")?;
        let file = self.dir.path().join("object.json");
        std::fs::write(&file, serde_json::to_vec(obj)?)?;
        let (kstatus, kstatus_message) = self.run(&[Path::new("kstatus"), &file])?;
        let script = self.lua.get(kind).context("no health script")?;
        let (argocd, argocd_message) = self.run(&[Path::new("argocd-lua"), script, &file])?;
        Ok(Health {
            kstatus,
            kstatus_message,
            argocd,
            argocd_message,
        })
    }
}

/// Every version of every object of `kind` in the namespace, as the watch delivered them.
fn record(env: &TestEnv, kind: &str, plural: &str) -> Arc<Mutex<Vec<Value>>> {
    let ar = ApiResource {
        group: "cairn.dev".into(),
        version: "v1alpha1".into(),
        api_version: "cairn.dev/v1alpha1".into(),
        kind: kind.into(),
        plural: plural.into(),
    };
    let api: Api<DynamicObject> = Api::namespaced_with(env.client.clone(), &env.namespace, &ar);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    let kind = kind.to_string();
    tokio::spawn(async move {
        let mut events = watcher(api, watcher::Config::default()).boxed();
        while let Some(ev) = events.next().await {
            let objs = match ev {
                Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => vec![o],
                _ => continue,
            };
            for mut o in objs {
                o.types = Some(kube::api::TypeMeta {
                    api_version: "cairn.dev/v1alpha1".into(),
                    kind: kind.clone(),
                });
                if let Ok(v) = serde_json::to_value(&o) {
                    sink.lock().unwrap().push(v);
                }
            }
        }
    });
    seen
}

/// The (kstatus, Argo CD) verdict a version of an object must get.
fn expected(obj: &Value) -> Option<(&'static str, &'static str)> {
    if obj["metadata"]["deletionTimestamp"].is_string() {
        return None;
    }
    let phase = obj["status"]["phase"].as_str()?;
    let ready = |status: &str| {
        obj["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == status)
    };
    const PROGRESS: (&str, &str) = ("InProgress", "Progressing");
    const CURRENT: (&str, &str) = ("Current", "Healthy");
    const FAILED: (&str, &str) = ("Failed", "Degraded");
    Some(match (obj["kind"].as_str()?, phase) {
        ("VirtualMachineCheckpoint", "Pending" | "Creating") => PROGRESS,
        // A bitmap lost after the fact: Ready turned False, nothing will fix it.
        ("VirtualMachineCheckpoint", "Ready") if ready("False") => FAILED,
        ("VirtualMachineCheckpoint", "Ready") => CURRENT,
        ("VirtualMachineCheckpoint", "Failed") => FAILED,
        ("VirtualMachineBackup", "Pending" | "Running") => PROGRESS,
        ("VirtualMachineBackup", "Exporting") if ready("True") => CURRENT,
        ("VirtualMachineBackup", "Exporting") => PROGRESS,
        ("VirtualMachineBackup", "Succeeded") => CURRENT,
        ("VirtualMachineBackup", "Failed" | "Cancelled") => FAILED,
        _ => return None,
    })
}

fn describe(obj: &Value) -> String {
    format!(
        "{} {} (phase {}, rv {})",
        obj["kind"].as_str().unwrap_or("?"),
        obj["metadata"]["name"].as_str().unwrap_or("?"),
        obj["status"]["phase"].as_str().unwrap_or("-"),
        obj["metadata"]["resourceVersion"].as_str().unwrap_or("?"),
    )
}

/// Judges every recorded version; returns the phases seen per object.
fn judge(checker: &Checker, versions: &[Value]) -> Result<BTreeMap<String, Vec<String>>> {
    let mut phases: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut wrong = Vec::new();
    for obj in versions {
        let Some((kstatus, argocd)) = expected(obj) else {
            continue;
        };
        let key = format!(
            "{}/{}",
            obj["kind"].as_str().unwrap_or_default(),
            obj["metadata"]["name"].as_str().unwrap_or_default()
        );
        let phase = obj["status"]["phase"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let seen = phases.entry(key).or_default();
        if seen.last() != Some(&phase) {
            seen.push(phase);
        }
        let h = checker.health(obj)?;
        if h.kstatus != kstatus || h.argocd != argocd {
            wrong.push(format!(
                "{}: kstatus {} ({}), Argo CD {} ({}); want {kstatus}, {argocd}\n  conditions: {}",
                describe(obj),
                h.kstatus,
                h.kstatus_message,
                h.argocd,
                h.argocd_message,
                obj["status"]["conditions"]
            ));
        }
        if kstatus == "Failed" {
            // The failure's own words reach the GitOps tools.
            let ready = obj["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["type"] == "Ready")
                .cloned()
                .unwrap_or_default();
            let msg = ready["message"].as_str().unwrap_or_default();
            let reason = ready["reason"].as_str().unwrap_or_default();
            if h.kstatus_message != msg || !h.argocd_message.contains(reason) {
                wrong.push(format!(
                    "{}: failure not passed on: kstatus says {:?}, Argo CD {:?}, Ready is {reason}: {msg}",
                    describe(obj),
                    h.kstatus_message,
                    h.argocd_message
                ));
            }
        }
    }
    if !wrong.is_empty() {
        bail!("wrong health:\n{}", wrong.join("\n"));
    }
    Ok(phases)
}

fn kubectl_json(env: &TestEnv, kind: &str, name: &str) -> Result<Value> {
    let out = kubectl(env, &["get", kind, name, "-o", "json"])?;
    Ok(serde_json::from_str(&out)?)
}

#[tokio::test(flavor = "multi_thread")]
async fn kstatus_and_argocd_agree_with_every_phase() -> Result<()> {
    let (env, cluster) = TestEnv::with_cluster("gitops-health").await?;
    let checker = Checker::new(&env)?;
    let checkpoints = record(
        &env,
        "VirtualMachineCheckpoint",
        "virtualmachinecheckpoints",
    );
    let backups = record(&env, "VirtualMachineBackup", "virtualmachinebackups");
    let vm = start_vm1(cluster, &env, 16 * MIB).await?;
    let dir = cluster
        .backup_dir("node-1")
        .join(&env.namespace)
        .join("vm1");

    // Checkpoints: Pending → Creating → Ready; a quiesce without guest agent and
    // an unknown VM fail.
    apply(&env, &checkpoint_yaml("cp-ok", "vm1", ""))?;
    wait_checkpoint(&env, "cp-ok", CheckpointPhase::Ready).await?;
    apply(
        &env,
        &checkpoint_yaml("cp-quiesce", "vm1", "  quiesce: true\n"),
    )?;
    wait_checkpoint(&env, "cp-quiesce", CheckpointPhase::Failed).await?;
    apply(&env, &checkpoint_yaml("cp-no-vm", "no-such-vm", ""))?;
    wait_checkpoint(&env, "cp-no-vm", CheckpointPhase::Failed).await?;

    // Backups: a full push (Pending → Running → Succeeded, and the checkpoint it
    // creates), an incremental pull (Exporting), a push outside the allowed
    // roots (Failed).
    vm.write("disk0", 0x11, 0, MIB)?;
    apply(
        &env,
        &backup_yaml("full", "vm1", &push_extra(&dir, None, Some("cp-full"))),
    )?;
    wait_backup(&env, "full", BackupPhase::Succeeded).await?;
    wait_checkpoint(&env, "cp-full", CheckpointPhase::Ready).await?;
    vm.write("disk0", 0x22, 2 * MIB, MIB)?;
    apply(
        &env,
        &backup_yaml("pull", "vm1", "  mode: Pull\n  incremental: cp-full\n"),
    )?;
    wait_backup(&env, "pull", BackupPhase::Exporting).await?;
    let outside = std::env::temp_dir().join(format!("elsewhere-{}", env.namespace));
    apply(
        &env,
        &backup_yaml("outside", "vm1", &push_extra(&outside, None, None)),
    )?;
    wait_backup(&env, "outside", BackupPhase::Failed).await?;

    // The final state of each, fetched as a user's tool would.
    let finals = [
        ("vmcp", "cp-ok", "Current", "Healthy"),
        ("vmcp", "cp-full", "Current", "Healthy"),
        ("vmcp", "cp-quiesce", "Failed", "Degraded"),
        ("vmcp", "cp-no-vm", "Failed", "Degraded"),
        ("vmb", "full", "Current", "Healthy"),
        ("vmb", "pull", "Current", "Healthy"),
        ("vmb", "outside", "Failed", "Degraded"),
    ];
    for (kind, name, kstatus, argocd) in finals {
        let obj = kubectl_json(&env, kind, name)?;
        let h = checker.health(&obj)?;
        assert_eq!(
            (h.kstatus.as_str(), h.argocd.as_str()),
            (kstatus, argocd),
            "{kind} {name}: {h:?}\n{:#}",
            obj["status"]
        );
        let generation = &obj["metadata"]["generation"];
        assert_eq!(
            &obj["status"]["observedGeneration"], generation,
            "{kind} {name}: observedGeneration"
        );
    }
    let quiesce = checker.health(&kubectl_json(&env, "vmcp", "cp-quiesce")?)?;
    assert!(
        quiesce.argocd_message.starts_with("QuiesceUnavailable: "),
        "{quiesce:?}"
    );

    // Let the watches deliver the last writes, then judge every version seen.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let cps = judge(&checker, &checkpoints.lock().unwrap().clone())?;
    let bs = judge(&checker, &backups.lock().unwrap().clone())?;
    eprintln!("phases judged: {cps:?} {bs:?}");
    let has = |m: &BTreeMap<String, Vec<String>>, key: &str, phase: &str| {
        m.get(key).is_some_and(|p| p.iter().any(|x| x == phase))
    };
    for phase in ["Pending", "Creating", "Ready"] {
        assert!(
            has(&cps, "VirtualMachineCheckpoint/cp-ok", phase),
            "cp-ok never seen {phase}: {cps:?}"
        );
    }
    for (name, phase) in [
        ("full", "Pending"),
        ("full", "Running"),
        ("full", "Succeeded"),
        ("pull", "Exporting"),
        ("outside", "Failed"),
    ] {
        assert!(
            has(&bs, &format!("VirtualMachineBackup/{name}"), phase),
            "{name} never seen {phase}: {bs:?}"
        );
    }
    assert!(has(&cps, "VirtualMachineCheckpoint/cp-quiesce", "Failed"));
    assert!(has(&cps, "VirtualMachineCheckpoint/cp-no-vm", "Failed"));

    // The QemuInstance is healthy to Argo CD and current to kstatus.
    let qi = checker.health(&kubectl_json(&env, "qemuinstance", "vm1")?)?;
    assert_eq!(
        (qi.kstatus.as_str(), qi.argocd.as_str()),
        ("Current", "Healthy")
    );

    // `kubectl get` shows the Ready condition beside the phase.
    for (kind, name) in [("vmcp", "cp-quiesce"), ("vmb", "outside")] {
        let obj = kubectl_json(&env, kind, name)?;
        let reason = obj["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == "Ready")
            .and_then(|c| c["reason"].as_str())
            .context("no Ready reason")?
            .to_string();
        let table = kubectl(&env, &["get", kind, name])?;
        let header = table.lines().next().unwrap_or_default();
        assert!(
            header.contains("READY") && header.contains("REASON"),
            "{table}"
        );
        assert!(
            table
                .lines()
                .any(|l| l.starts_with(name) && l.contains("False") && l.contains(&reason)),
            "{table}"
        );
    }
    drop(vm);
    Ok(())
}
