//! The agent at scale, on a local cluster of its own: hundreds of guestless
//! QEMUs (CPUs never started, `-S`) in one namespace. Measures the agent's RSS
//! with one VM and with all of them, its CPU while idle, the QemuInstance writes
//! it makes while idle, and for every VM the time from its QMP socket
//! accepting connections to its QemuInstance carrying a status — seen through
//! a watch, not by listing — for VMs started one at a time and in bursts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use cairn_api::QemuInstance;
use cairn_e2e::local_cluster::LocalCluster;
use futures::StreamExt;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};

use super::control::{
    clock_ticks, cpu_ticks, kubectl, recorded_pid, rss_mib, service_pid, stop_watchdog,
};
use super::qemu::{BenchVm, MIB, run};
use super::{Config, Samples};

const NODE: &str = "node-1";
const NS: &str = "fleet";
/// VMs started one at a time (each after the previous one's QemuInstance).
const SINGLES: usize = 20;
/// VMs started at once, per burst, after the single ones.
pub const BURST: usize = 50;
/// Guest memory of each VM (never touched: the CPUs do not run).
const VM_MEMORY_MIB: u32 = 16;

/// What the fleet section measured.
#[derive(Default, serde::Serialize, serde::Deserialize)]
pub struct FleetResults {
    /// VMs started.
    pub vms: usize,
    /// Agent RSS with one VM (MiB).
    pub agent_rss_one_mib: f64,
    /// Agent RSS with `vms` VMs (MiB), the larger of before and after the idle window.
    pub agent_rss_mib: f64,
    /// RSS of one of the QEMUs (MiB), for sizing the machine.
    pub qemu_rss_mib: f64,
    /// Agent CPU seconds per wall second while idle with `vms` VMs.
    pub idle_cpu: f64,
    /// Seconds of the idle window.
    pub idle_window: u64,
    /// QemuInstance writes (watch events) during the idle window.
    pub idle_writes: u64,
    /// `/proc/loadavg` when the idle window started.
    pub load: String,
    /// Socket accepting → QemuInstance with status, seconds, VMs started one at a time.
    pub appear_single: Samples,
    /// The same for VMs started [`BURST`] at once.
    pub appear_burst: Samples,
    /// Of `appear_burst`: socket accepting → the agent's QMP session connected
    /// (QEMU finishing its start and greeting).
    #[serde(default)]
    pub burst_to_greeting: Samples,
    /// Of `appear_burst`: session connected → QemuInstance seen.
    #[serde(default)]
    pub burst_after_greeting: Samples,
}

impl FleetResults {
    fn appear_all(&self) -> Samples {
        Samples(
            self.appear_single
                .0
                .iter()
                .chain(&self.appear_burst.0)
                .copied()
                .collect(),
        )
    }
}

/// Runs the section on a cluster of its own, stopped afterwards whatever happens.
pub async fn run_all(cfg: &Config, r: &mut FleetResults) -> Result<()> {
    let state = cfg.work.join("fleet-cluster");
    LocalCluster::down(&state)?;
    let _ = std::fs::remove_dir_all(&state);
    let cluster = LocalCluster::up(&state, 1, Some(std::process::id()))?;
    let vms_dir = cfg.work.join("fleet-vms");
    let result = measure(cfg, &cluster, &vms_dir, r).await;
    // The agent's log stays for reading where the time went.
    let _ = std::fs::copy(
        state.join(format!("logs/agent-{NODE}.log")),
        cfg.work.join("fleet-agent.log"),
    );
    LocalCluster::down(&state)?;
    let _ = std::fs::remove_dir_all(&state);
    let _ = std::fs::remove_dir_all(&vms_dir);
    result
}

/// When each QemuInstance was first seen with a status, and how many writes were seen.
#[derive(Default)]
struct Seen {
    first: HashMap<String, Instant>,
    writes: u64,
}

/// Watches the namespace's QemuInstances until dropped.
struct InstanceWatch {
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl InstanceWatch {
    fn start(api: Api<QemuInstance>) -> Self {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let shared = seen.clone();
        let task = tokio::spawn(async move {
            let mut stream = watcher(api, watcher::Config::default())
                .applied_objects()
                .boxed();
            while let Some(item) = stream.next().await {
                let Ok(qi) = item else { continue };
                let at = Instant::now();
                if qi.status.as_ref().is_some_and(|s| s.run_state.is_some()) {
                    let mut s = shared.lock().expect("seen lock");
                    s.writes += 1;
                    s.first.entry(qi.name_any()).or_insert(at);
                }
            }
        });
        Self { seen, task }
    }

    fn writes(&self) -> u64 {
        self.seen.lock().expect("seen lock").writes
    }

    /// Waits until every VM has a QemuInstance; adds socket → instance times
    /// to `out` and returns each VM's (name, accepting, seen).
    async fn wait(
        &self,
        vms: &[BenchVm],
        out: &mut Samples,
        limit: Duration,
    ) -> Result<Vec<(String, Instant, Instant)>> {
        let deadline = Instant::now() + limit;
        loop {
            {
                let s = self.seen.lock().expect("seen lock");
                let seen: Vec<(String, Instant, Instant)> = vms
                    .iter()
                    .filter_map(|v| {
                        let at = *s.first.get(&v.vm.name)?;
                        Some((v.vm.name.clone(), v.listening_at, at))
                    })
                    .collect();
                if seen.len() == vms.len() {
                    out.0.extend(
                        seen.iter()
                            .map(|(_, l, at)| at.saturating_duration_since(*l).as_secs_f64()),
                    );
                    return Ok(seen);
                }
                ensure!(
                    Instant::now() < deadline,
                    "only {} of {} QemuInstances appeared",
                    seen.len(),
                    vms.len()
                );
            }
            // Only the in-process record is looked at here; the times come from the watch.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for InstanceWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn image_path(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("f{i}.qcow2"))
}

async fn start_vm(qmp: &Path, dir: &Path, i: usize) -> Result<BenchVm> {
    let sock = qmp.join(NS).join(format!("f{i}.sock"));
    let image = image_path(dir, i);
    BenchVm::start_for_agent(&sock, NS, &format!("f{i}"), &image, VM_MEMORY_MIB, true).await
}

async fn measure(
    cfg: &Config,
    cluster: &LocalCluster,
    dir: &Path,
    r: &mut FleetResults,
) -> Result<()> {
    let client = cairn_e2e::harness::client_for(&cluster.cp.kubeconfig).await?;
    kubectl(cluster, &["create", "namespace", NS], None)?;
    let watch = InstanceWatch::start(Api::namespaced(client.clone(), NS));
    let agent_watchdog = recorded_pid(&cluster.state_dir, &format!("agent-{NODE}"))
        .context("agent pid not recorded")?;
    let agent = service_pid(agent_watchdog, "cairn-agent").context("agent process")?;
    let qmp = cluster.qmp_dir(NODE);
    std::fs::create_dir_all(dir)?;
    eprintln!("bench: {} images for the fleet", cfg.vms);
    for i in 0..cfg.vms {
        run(std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(image_path(dir, i))
            .arg((64 * MIB).to_string()))?;
    }
    let limit = Duration::from_secs(120);
    let mut fleet: Vec<BenchVm> = Vec::with_capacity(cfg.vms);
    let mut burst_seen = Vec::new();
    let clock = (Instant::now(), chrono::Utc::now());
    let result = async {
        // One VM, then more one at a time.
        eprintln!("bench: fleet, {SINGLES} VMs one at a time");
        for i in 0..SINGLES.min(cfg.vms) {
            let vm = start_vm(&qmp, dir, i).await?;
            watch
                .wait(std::slice::from_ref(&vm), &mut r.appear_single, limit)
                .await?;
            fleet.push(vm);
            if i == 0 {
                tokio::time::sleep(Duration::from_secs(3)).await;
                r.agent_rss_one_mib = rss_mib(agent)?;
                r.qemu_rss_mib = fleet[0].pid().map(rss_mib).transpose()?.unwrap_or(0.0);
            }
        }
        // The rest in bursts.
        while fleet.len() < cfg.vms {
            let from = fleet.len();
            let to = (from + BURST).min(cfg.vms);
            eprintln!("bench: fleet, VMs {from}..{to} at once");
            let burst: Vec<BenchVm> =
                futures::future::try_join_all((from..to).map(|i| start_vm(&qmp, dir, i))).await?;
            let waited = watch.wait(&burst, &mut r.appear_burst, limit).await;
            fleet.extend(burst);
            burst_seen.extend(waited?);
        }
        r.vms = fleet.len();
        split_bursts(cluster, clock, &burst_seen, r);
        // Let the first resyncs settle, then measure.
        tokio::time::sleep(Duration::from_secs(5)).await;
        r.agent_rss_mib = rss_mib(agent)?;
        r.idle_window = cfg.idle_secs;
        r.load = std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ");
        eprintln!(
            "bench: fleet idle for {} s with {} VMs",
            cfg.idle_secs,
            fleet.len()
        );
        let (ticks, writes) = (cpu_ticks(agent)?, watch.writes());
        let t = Instant::now();
        tokio::time::sleep(Duration::from_secs(cfg.idle_secs)).await;
        r.idle_cpu = (cpu_ticks(agent)? - ticks) as f64 / clock_ticks() / t.elapsed().as_secs_f64();
        r.idle_writes = watch.writes() - writes;
        r.agent_rss_mib = r.agent_rss_mib.max(rss_mib(agent)?);
        anyhow::Ok(())
    }
    .await;
    stop_watchdog(agent_watchdog);
    eprintln!("bench: stopping {} VMs", fleet.len());
    futures::stream::iter(fleet.into_iter().map(BenchVm::quit))
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    result
}

/// Splits each burst VM's time at the agent's "qmp connected" (its log, on
/// the same clock): before it, QEMU finishing its start after listen() and
/// answering the greeting; after it, the agent's reads and writes and the API
/// server up to the watch.
fn split_bursts(
    cluster: &LocalCluster,
    (instant, wall): (Instant, chrono::DateTime<chrono::Utc>),
    seen: &[(String, Instant, Instant)],
    r: &mut FleetResults,
) {
    let log = cluster.state_dir.join(format!("logs/agent-{NODE}.log"));
    let Ok(text) = std::fs::read_to_string(log) else {
        return;
    };
    let mut connected: HashMap<String, f64> = HashMap::new();
    for line in text.lines().filter(|l| l.contains("qmp connected")) {
        let Some(name) = line
            .split(&format!("/{NS}/"))
            .nth(1)
            .and_then(|rest| rest.split(".sock").next())
        else {
            continue;
        };
        let Some(at) = line
            .split_whitespace()
            .next()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        else {
            continue;
        };
        let secs = (at.with_timezone(&chrono::Utc) - wall).as_seconds_f64();
        connected.entry(name.to_string()).or_insert(secs);
    }
    for (name, listening, at) in seen {
        let Some(c) = connected.get(name) else {
            continue;
        };
        let l = listening.duration_since(instant).as_secs_f64();
        let a = at.duration_since(instant).as_secs_f64();
        r.burst_to_greeting.0.push((c - l).max(0.0));
        r.burst_after_greeting.0.push((a - c).max(0.0));
    }
}

fn ms(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{:.0} ms", v * 1000.0))
}

/// The section's tables (Markdown, no heading).
pub fn render(r: &FleetResults) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "Guestless QEMUs (`-S`, {VM_MEMORY_MIB} MiB, one 64 MiB qcow2 disk each) in one namespace of a local cluster; load average at the idle window: {}.\n",
        if r.load.is_empty() { "–" } else { &r.load }
    );
    let _ = writeln!(o, "| what | value |\n|---|---|");
    let _ = writeln!(
        o,
        "| agent RSS with 1 VM | {:.1} MiB |",
        r.agent_rss_one_mib
    );
    let _ = writeln!(
        o,
        "| agent RSS with {} VMs | {:.1} MiB |",
        r.vms, r.agent_rss_mib
    );
    let _ = writeln!(
        o,
        "| agent CPU while idle with {} VMs, over {} s | {:.2} % of one core |",
        r.vms,
        r.idle_window,
        r.idle_cpu * 100.0
    );
    let per_min = if r.idle_window > 0 {
        r.idle_writes as f64 * 60.0 / r.idle_window as f64
    } else {
        0.0
    };
    let _ = writeln!(
        o,
        "| QemuInstance writes while idle with {} VMs | {} in {} s ({per_min:.0}/min) |",
        r.vms, r.idle_writes, r.idle_window
    );
    let _ = writeln!(o, "| RSS of one such QEMU | {:.1} MiB |", r.qemu_rss_mib);
    let _ = writeln!(
        o,
        "\nQMP socket accepting → QemuInstance with status (seen by a watch):\n\n| VMs started | VMs | p50 | p99 | max |\n|---|---|---|---|---|"
    );
    for (what, s) in [
        ("one at a time".to_string(), &r.appear_single),
        (format!("{BURST} at once"), &r.appear_burst),
        ("all".to_string(), &r.appear_all()),
        (
            format!("{BURST} at once: accepting → agent's QMP session up"),
            &r.burst_to_greeting,
        ),
        (
            format!("{BURST} at once: session up → QemuInstance seen"),
            &r.burst_after_greeting,
        ),
    ] {
        let _ = writeln!(
            o,
            "| {what} | {} | {} | {} | {} |",
            s.0.len(),
            ms(s.median()),
            ms(s.percentile(99.0)),
            ms(s.max())
        );
    }
    o
}

/// (target, measured, met?) rows for the targets table.
pub fn targets(r: &FleetResults) -> Vec<(String, String, Option<bool>)> {
    let has = r.vms > 0;
    let p99 = r.appear_all().percentile(99.0);
    vec![
        (
            format!("agent RSS ≤ 80 MiB with 500 VMs (here {})", r.vms),
            format!("{:.1} MiB", r.agent_rss_mib),
            has.then_some(r.agent_rss_mib <= 80.0),
        ),
        (
            format!(
                "agent idle CPU ≤ 1 % of a core with 500 VMs (here {})",
                r.vms
            ),
            format!("{:.2} %", r.idle_cpu * 100.0),
            has.then_some(r.idle_cpu <= 0.01),
        ),
        (
            "QMP socket → QemuInstance ≤ 1 s p99".into(),
            ms(p99),
            p99.map(|p| p <= 1.0),
        ),
    ]
}
