//! Measurements on the local cluster (real etcd + kube-apiserver, the release
//! operator and agent): a push backup end to end, checkpoint apply → Ready
//! latency and end-to-end backup timelines. The agent with many VMs is
//! [`super::fleet`]; operator memory and resync with many checkpoint objects
//! are [`super::routing`].

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use cairn_api::{
    BackupPhase, CheckpointPhase, QemuInstance, VirtualMachineBackup, VirtualMachineCheckpoint,
};
use cairn_e2e::local_cluster::LocalCluster;
use futures::StreamExt;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};
use serde::{Deserialize, Serialize};

use super::qemu::{BenchVm, copy_image, drop_caches};
use super::{Config, Samples};

const NODE: &str = "node-1";
const NS: &str = "bench";

/// What the cluster measured.
#[derive(Default, serde::Serialize, serde::Deserialize)]
pub struct ControlResults {
    /// `kubectl apply` of a full push backup → Succeeded.
    pub e2e_full: Samples,
    /// The stages of each of those.
    pub e2e_full_timelines: Vec<Timeline>,
    /// `kubectl apply` of a 1 % incremental push backup → Succeeded.
    pub e2e_inc: Samples,
    /// The stages of each of those.
    pub e2e_inc_timelines: Vec<Timeline>,
    /// `kubectl apply` of a full backup into the `local-dir` repository → Succeeded.
    pub e2e_repo_full: Samples,
    /// The same for a 1 % incremental into it.
    pub e2e_repo_inc: Samples,
    /// Checkpoint create → Ready, seconds.
    pub checkpoint_latency: Samples,
}

/// The stages of one end-to-end backup: what, and when it was reached in
/// seconds after `kubectl apply` started.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Timeline(pub Vec<(String, f64)>);

/// Stages the agent logs (message, stage), in the order they happen.
const AGENT_STAGES: [(&str, &str); 5] = [
    ("backup transaction sent", "agent: QMP transaction sent"),
    (
        "push backup started",
        "agent: transaction answered, job running",
    ),
    ("push backup running", "agent: `Running` status written"),
    ("backup jobs concluded", "agent: QEMU's job concluded"),
    (
        "push backup complete",
        "agent: target closed, manifest written",
    ),
];

/// `kubectl apply` of `yaml` (backup `name` in [`NS`]) until `Succeeded`,
/// observed through a watch; then the stages until `Verified`, from the watch
/// and the agent's log. Returns apply → Succeeded in seconds and the stages.
async fn e2e_backup(
    cluster: &LocalCluster,
    client: &Client,
    name: &str,
    yaml: &str,
    until_verified: bool,
) -> Result<(f64, Timeline)> {
    use kube::runtime::watcher;
    let api: Api<VirtualMachineBackup> = Api::namespaced(client.clone(), NS);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(&'static str, Instant)>();
    let stream = watcher(
        api,
        watcher::Config::default().fields(&format!("metadata.name={name}")),
    );
    let watch = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut seen = std::collections::HashSet::new();
        while let Some(event) = stream.next().await {
            let now = Instant::now();
            let mut mark = |k: &'static str| {
                if seen.insert(k) {
                    let _ = tx.send((k, now));
                }
            };
            let b = match event {
                Ok(watcher::Event::InitDone) => {
                    mark("watching");
                    continue;
                }
                Ok(watcher::Event::Apply(b) | watcher::Event::InitApply(b)) => b,
                _ => continue,
            };
            if kube::ResourceExt::labels(&b).contains_key(cairn_api::NODE_LABEL) {
                mark("operator: routed (label seen)");
            }
            let status = b.status.unwrap_or_default();
            match status.phase {
                Some(BackupPhase::Running) => mark("`Running` seen"),
                Some(BackupPhase::Succeeded) => mark("`Succeeded` seen"),
                Some(p) if p.is_finished() => mark("failed"),
                _ => {}
            }
            if cairn_api::conditions::is_true(
                &status.conditions,
                cairn_api::condition_types::VERIFIED,
            ) {
                mark("`Verified` seen");
                return;
            }
        }
    });
    let recv = async |rx: &mut tokio::sync::mpsc::UnboundedReceiver<(&'static str, Instant)>| {
        tokio::time::timeout(Duration::from_secs(600), rx.recv())
            .await
            .ok()
            .flatten()
            .context("the backup's watch ended")
    };
    while recv(&mut rx).await?.0 != "watching" {}
    let wall = chrono::Utc::now();
    let t = Instant::now();
    kubectl(cluster, &["apply", "-f", "-"], Some(yaml))?;
    let mut stages = vec![(
        "`kubectl apply` returned".to_string(),
        t.elapsed().as_secs_f64(),
    )];
    let mut succeeded = None;
    // Until `Verified` (the watch ends), or two minutes after `Succeeded`.
    let wait = |done: bool| Duration::from_secs(if done { 120 } else { 600 });
    while let Ok(Some((stage, at))) =
        tokio::time::timeout(wait(succeeded.is_some()), rx.recv()).await
    {
        ensure!(stage != "failed", "backup {name} did not succeed");
        let secs = at.duration_since(t).as_secs_f64();
        stages.push((stage.to_string(), secs));
        if stage == "`Succeeded` seen" {
            succeeded = Some(secs);
            if !until_verified {
                break;
            }
        }
    }
    watch.abort();
    let succeeded = succeeded.with_context(|| format!("backup {name} timed out"))?;
    // The agent's own stages, from its log's timestamps (same clock).
    let log = std::fs::read_to_string(cluster.state_dir.join(format!("logs/agent-{NODE}.log")))?;
    let tag = format!(" backup={name} ");
    for (message, stage) in AGENT_STAGES {
        let at = log
            .lines()
            .filter(|l| l.contains(message) && format!("{l} ").contains(&tag))
            .find_map(|l| chrono::DateTime::parse_from_rfc3339(l.split_whitespace().next()?).ok());
        if let Some(at) = at {
            let secs = (at.with_timezone(&chrono::Utc) - wall).as_seconds_f64();
            stages.push((stage.to_string(), secs));
        }
    }
    stages.sort_by(|a, b| a.1.total_cmp(&b.1));
    for (stage, at) in &stages {
        eprintln!("bench:   {name}: {at:7.3} s  {stage}");
    }
    Ok((succeeded, Timeline(stages)))
}

/// PID of the process a `spawn_service` watchdog (`watchdog`) runs, found by parent.
pub(super) fn service_pid(watchdog: u32, comm: &str) -> Option<u32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let name = &stat[stat.find('(').unwrap_or(0) + 1..close];
        let ppid: u32 = stat[close + 2..]
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        if ppid == watchdog && name == comm {
            return Some(pid);
        }
    }
    None
}

/// VmRSS of `pid` in MiB.
pub fn rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .context("no VmRSS")?;
    Ok(kib / 1024.0)
}

/// utime + stime of `pid` in clock ticks.
pub(super) fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = &stat[stat.rfind(')').context("stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

/// The pid recorded in the cluster's `pids` file for `name` (the last one).
pub(super) fn recorded_pid(state: &Path, name: &str) -> Option<u32> {
    std::fs::read_to_string(state.join("pids"))
        .ok()?
        .lines()
        .filter_map(|l| {
            let (pid, n) = l.split_once(' ')?;
            (n == name).then(|| pid.parse().ok())?
        })
        .next_back()
}

/// Stops a `spawn_service` watchdog and the process it runs.
pub(super) fn stop_watchdog(pid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
}

/// `/metrics` of the operator whose log is `log`: (leader, checkpoint reconciles).
pub(super) fn operator_metrics(log: &Path) -> Option<(bool, u64)> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains("serving /metrics"))?;
    let addr = line.split("addr=").nth(1)?.split_whitespace().next()?;
    let addr = addr.trim_matches(|c| c == '"' || c == ',');
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let mut leader = false;
    let mut reconciles = 0u64;
    for l in body.lines().filter(|l| !l.starts_with('#')) {
        let value = l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
        if l.starts_with("cairn_operator_leader") {
            leader = value.unwrap_or(0.0) >= 1.0;
        } else if l.starts_with("cairn_operator_reconciles") && l.contains("checkpoint") {
            reconciles += value.unwrap_or(0.0) as u64;
        }
    }
    Some((leader, reconciles))
}

async fn wait_instances(client: &Client, ns: &str, n: usize, limit: Duration) -> Result<()> {
    let api: Api<QemuInstance> = Api::namespaced(client.clone(), ns);
    let deadline = Instant::now() + limit;
    loop {
        let ready = api
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter(|q| q.status.as_ref().is_some_and(|s| !s.disks.is_empty()))
            .count();
        if ready >= n {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "only {ready} of {n} QemuInstances published in {ns}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs kubectl against the cluster, with `stdin` as its input.
pub(super) fn kubectl(cluster: &LocalCluster, args: &[&str], stdin: Option<&str>) -> Result<()> {
    let mut child = std::process::Command::new(&cluster.cp.tools.kubectl)
        .arg(format!("--kubeconfig={}", cluster.cp.kubeconfig.display()))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let mut input = child.stdin.take().context("stdin")?;
    if let Some(s) = stdin {
        input.write_all(s.as_bytes())?;
    }
    drop(input);
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "kubectl {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

pub(super) fn checkpoint_object(name: &str, vm: &str) -> Result<VirtualMachineCheckpoint> {
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "cairn.dev/v1alpha1",
        "kind": "VirtualMachineCheckpoint",
        "metadata": {"name": name},
        "spec": {"virtualMachine": vm},
    }))?)
}

/// Runs the cluster sections; the cluster is stopped afterwards whatever happens.
pub async fn run_all(cfg: &Config, base: &Path, r: &mut ControlResults) -> Result<()> {
    let state = cfg.work.join("cluster");
    LocalCluster::down(&state)?;
    let _ = std::fs::remove_dir_all(&state);
    let cluster = LocalCluster::up(&state, 1, Some(std::process::id()))?;
    let result = measure(cfg, base, &cluster, r).await;
    LocalCluster::down(&state)?;
    let _ = std::fs::remove_dir_all(&state);
    result
}

async fn measure(
    cfg: &Config,
    base: &Path,
    cluster: &LocalCluster,
    r: &mut ControlResults,
) -> Result<()> {
    let client = cairn_e2e::harness::client_for(&cluster.cp.kubeconfig).await?;
    kubectl(cluster, &["create", "namespace", NS], None)?;
    let vms_dir = cfg.work.join("cluster-vms");
    std::fs::create_dir_all(&vms_dir)?;
    let image = vms_dir.join("vm.qcow2");
    copy_image(base, &image)?;
    let qmp = cluster.qmp_dir(NODE);
    let vm = BenchVm::start_for_agent(&qmp.join(NS).join("vm.sock"), NS, "vm", &image, 64, false)
        .await?;
    wait_instances(&client, NS, 1, Duration::from_secs(60)).await?;
    let backups: Api<VirtualMachineBackup> = Api::namespaced(client.clone(), NS);
    let cps: Api<VirtualMachineCheckpoint> = Api::namespaced(client.clone(), NS);

    // 1 and 2. Full push backups and a 1 % incremental after each, end to end.
    for run_no in 0..cfg.runs {
        eprintln!("bench: end-to-end backups {}/{}", run_no + 1, cfg.runs);
        let dir = cluster
            .backup_dir(NODE)
            .join(NS)
            .join(format!("e2e-{run_no}"));
        let full = format!("full-{run_no}");
        let inc = format!("inc-{run_no}");
        let yaml = |name: &str, extra: &str| {
            format!(
                "apiVersion: cairn.dev/v1alpha1\nkind: VirtualMachineBackup\nmetadata:\n  name: {name}\n  namespace: {NS}\nspec:\n  virtualMachine: vm\n{extra}  target:\n    directory:\n      path: {}\n",
                dir.display()
            )
        };
        drop_caches();
        let (secs, timeline) = e2e_backup(
            cluster,
            &client,
            &full,
            &yaml(&full, &format!("  checkpoint:\n    name: c-{full}\n")),
            true,
        )
        .await?;
        r.e2e_full.push(secs);
        r.e2e_full_timelines.push(timeline);
        // The same 1 % of distinct 64 KiB clusters as section 2's first step.
        super::qemu::dirty(
            &vm.writer,
            &super::qemu::bench_qdev(),
            cfg.disk_size,
            super::data::FRACTIONS[0],
            1000 + run_no as u64,
        )
        .await?;
        drop_caches();
        let (secs, timeline) = e2e_backup(
            cluster,
            &client,
            &inc,
            &yaml(
                &inc,
                &format!("  incremental: c-{full}\n  checkpoint:\n    name: c-{inc}\n"),
            ),
            true,
        )
        .await?;
        r.e2e_inc.push(secs);
        r.e2e_inc_timelines.push(timeline);
        for name in [&inc, &full] {
            backups.delete(name, &Default::default()).await?;
        }
        for name in [&inc, &full] {
            let _ = cps.delete(&format!("c-{name}"), &Default::default()).await;
        }
        let _ = std::fs::remove_dir_all(&dir);

        // The same into the cluster's directory repository (restic's peers).
        let (rfull, rinc) = (format!("repo-full-{run_no}"), format!("repo-inc-{run_no}"));
        let repo_yaml = |name: &str, extra: &str| {
            format!(
                "apiVersion: cairn.dev/v1alpha1\nkind: VirtualMachineBackup\nmetadata:\n  name: {name}\n  namespace: {NS}\nspec:\n  virtualMachine: vm\n{extra}  target:\n    repository:\n      name: local-dir\n"
            )
        };
        drop_caches();
        let (secs, _) = e2e_backup(
            cluster,
            &client,
            &rfull,
            &repo_yaml(&rfull, &format!("  checkpoint:\n    name: c-{rfull}\n")),
            false,
        )
        .await?;
        r.e2e_repo_full.push(secs);
        super::qemu::dirty(
            &vm.writer,
            &super::qemu::bench_qdev(),
            cfg.disk_size,
            super::data::FRACTIONS[0],
            2000 + run_no as u64,
        )
        .await?;
        drop_caches();
        let (secs, _) = e2e_backup(
            cluster,
            &client,
            &rinc,
            &repo_yaml(
                &rinc,
                &format!("  incremental: c-{rfull}\n  checkpoint:\n    name: c-{rinc}\n"),
            ),
            false,
        )
        .await?;
        r.e2e_repo_inc.push(secs);
        for name in [&rinc, &rfull] {
            backups.delete(name, &Default::default()).await?;
            let _ = cps.delete(&format!("c-{name}"), &Default::default()).await;
        }
    }

    // 5a. Checkpoint create → Ready.
    eprintln!("bench: {} checkpoints", cfg.checkpoints);
    for i in 0..cfg.checkpoints {
        let name = format!("lat-{i}");
        let t = Instant::now();
        cps.create(&PostParams::default(), &checkpoint_object(&name, "vm")?)
            .await?;
        loop {
            let c = cps.get(&name).await?;
            match c.status.as_ref().and_then(|s| s.phase) {
                Some(CheckpointPhase::Ready) => break,
                Some(CheckpointPhase::Failed) => bail!("checkpoint {name} failed: {:?}", c.status),
                _ => {}
            }
            ensure!(
                t.elapsed() < Duration::from_secs(60),
                "checkpoint {name} timed out"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        r.checkpoint_latency.push(t.elapsed().as_secs_f64());
    }

    vm.quit().await?;
    let _ = std::fs::remove_dir_all(&vms_dir);
    Ok(())
}

/// Clock ticks per second (`getconf CLK_TCK`).
pub(super) fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}
