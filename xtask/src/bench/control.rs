//! Measurements on the local cluster (real etcd + kube-apiserver, the release
//! operator and agent): a push backup end to end, checkpoint apply → Ready
//! latency, agent memory and idle CPU with many VMs. Operator memory and
//! resync with many checkpoint objects are measured by [`super::routing`].

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

use super::qemu::{BenchVm, MIB, copy_image, drop_caches, run};
use super::{Config, Samples};

const NODE: &str = "node-1";
const NS: &str = "bench";

/// What the cluster measured.
#[derive(Default)]
pub struct ControlResults {
    /// `kubectl apply` of a full push backup → Succeeded.
    pub e2e_full: Samples,
    /// Checkpoint create → Ready, seconds.
    pub checkpoint_latency: Samples,
    /// Operator RSS (MiB) with the checkpoint objects reconciled. This and the
    /// fields down to `operator_rss_resync_mib` stay 0 here: the routing section
    /// ([`super::routing::RoutingResults`]) measures them now; kept until the
    /// report reads them from there.
    pub operator_rss_mib: f64,
    /// Operator RSS before the objects were created (MiB).
    pub operator_rss_empty_mib: f64,
    /// Objects created.
    pub objects: usize,
    /// Seconds to create them through the API.
    pub create_secs: f64,
    /// Seconds until the operator had labelled (routed) them all.
    pub route_secs: f64,
    /// Restart → leader lease held (seconds).
    pub resync_leader_secs: f64,
    /// Restart → every object reconciled again (seconds).
    pub resync_secs: f64,
    /// Operator RSS after the resync (MiB).
    pub operator_rss_resync_mib: f64,
    /// VMs the agent managed for the memory measurement.
    pub vms: usize,
    /// Agent RSS with one VM (MiB).
    pub agent_rss_one_mib: f64,
    /// Agent RSS with `vms` VMs (MiB).
    pub agent_rss_mib: f64,
    /// Agent CPU seconds per wall second while idle with `vms` VMs.
    pub agent_idle_cpu: f64,
    /// Seconds of the idle window.
    pub idle_window: u64,
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
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = &stat[stat.rfind(')').context("stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

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
    let vm = BenchVm::start_for_agent(&qmp.join(NS).join("vm.sock"), NS, "vm", &image, 64).await?;
    wait_instances(&client, NS, 1, Duration::from_secs(60)).await?;
    let agent_watchdog = recorded_pid(&cluster.state_dir, &format!("agent-{NODE}"))
        .context("agent pid not recorded")?;
    let agent = service_pid(agent_watchdog, "cairn-agent").context("agent process")?;
    r.agent_rss_one_mib = rss_mib(agent)?;

    // 1. A full push backup, end to end.
    let backups: Api<VirtualMachineBackup> = Api::namespaced(client.clone(), NS);
    for run_no in 0..cfg.runs {
        eprintln!("bench: end-to-end backup {}/{}", run_no + 1, cfg.runs);
        let dir = cluster
            .backup_dir(NODE)
            .join(NS)
            .join(format!("e2e-{run_no}"));
        let name = format!("full-{run_no}");
        let yaml = format!(
            "apiVersion: cairn.dev/v1alpha1\nkind: VirtualMachineBackup\nmetadata:\n  name: {name}\n  namespace: {NS}\nspec:\n  virtualMachine: vm\n  target:\n    directory:\n      path: {}\n",
            dir.display()
        );
        drop_caches();
        let t = Instant::now();
        kubectl(cluster, &["apply", "-f", "-"], Some(&yaml))?;
        loop {
            let b = backups.get(&name).await?;
            let phase = b.status.as_ref().and_then(|s| s.phase);
            if phase == Some(BackupPhase::Succeeded) {
                break;
            }
            if phase.is_some_and(BackupPhase::is_finished) {
                bail!("backup {name} ended {phase:?}: {:?}", b.status);
            }
            ensure!(
                t.elapsed() < Duration::from_secs(600),
                "backup {name} timed out"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        r.e2e_full.push(t.elapsed().as_secs_f64());
        backups.delete(&name, &Default::default()).await?;
        let _ = std::fs::remove_dir_all(&dir);
    }

    // 5a. Checkpoint create → Ready.
    let cps: Api<VirtualMachineCheckpoint> = Api::namespaced(client.clone(), NS);
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

    // 5b. Agent memory and idle CPU with many VMs.
    eprintln!("bench: agent with {} VMs", cfg.vms);
    r.vms = cfg.vms;
    let fleet_dir = vms_dir.join("fleet");
    std::fs::create_dir_all(&fleet_dir)?;
    let mut starts = Vec::new();
    for i in 0..cfg.vms.saturating_sub(1) {
        let img = fleet_dir.join(format!("f{i}.qcow2"));
        run(std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&img)
            .arg((64 * MIB).to_string()))?;
        let sock = qmp.join("fleet").join(format!("f{i}.sock"));
        starts.push(async move {
            BenchVm::start_for_agent(&sock, "fleet", &format!("f{i}"), &img, 16).await
        });
    }
    kubectl(cluster, &["create", "namespace", "fleet"], None)?;
    let fleet: Vec<BenchVm> = futures::stream::iter(starts)
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    wait_instances(&client, "fleet", fleet.len(), Duration::from_secs(300)).await?;
    // Let the first resyncs settle, then measure.
    tokio::time::sleep(Duration::from_secs(5)).await;
    r.agent_rss_mib = rss_mib(agent)?;
    r.idle_window = cfg.idle_secs;
    let before = cpu_ticks(agent)?;
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(cfg.idle_secs)).await;
    let ticks = cpu_ticks(agent)? - before;
    r.agent_idle_cpu = ticks as f64 / clock_ticks() / t.elapsed().as_secs_f64();
    r.agent_rss_mib = r.agent_rss_mib.max(rss_mib(agent)?);
    for v in fleet {
        v.quit().await?;
    }

    vm.quit().await?;
    let _ = std::fs::remove_dir_all(&vms_dir);
    Ok(())
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}
