//! Routing many checkpoints (issue 14): on its own local cluster (real etcd +
//! kube-apiserver, the release operator), with the agent stopped so the
//! objects stay Pending and only the operator works, `objects` checkpoints of
//! one VM are created 32 at a time; measured: the creates, created → all
//! routed (labelled `cairn.dev/node`, seen through a watch), operator RSS, and a full resync by a
//! new operator process.

use std::collections::HashSet;
use std::fmt::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use cairn_api::{QemuInstance, VirtualMachineCheckpoint};
use cairn_e2e::local_cluster::LocalCluster;
use futures::StreamExt;
use kube::api::{Patch, PatchParams, PostParams};
use kube::core::PartialObjectMeta;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};

use super::control::{
    checkpoint_object, kubectl, operator_metrics, recorded_pid, rss_mib, service_pid, stop_watchdog,
};

const NODE: &str = "node-1";
const NS: &str = "bench-routing";
/// Creates in flight, as a GitOps tool or a script would issue them.
const IN_FLIGHT: usize = 32;

/// What the routing section measured.
#[derive(Default, serde::Serialize, serde::Deserialize)]
pub struct RoutingResults {
    /// Checkpoints created.
    pub objects: usize,
    /// Seconds to create them through the API.
    pub create_secs: f64,
    /// Last create returned → all routed (seconds).
    pub created_to_routed_secs: f64,
    /// First create → all routed (seconds).
    pub first_create_to_routed_secs: f64,
    /// Operator RSS before the objects were created (MiB).
    pub operator_rss_idle_mib: f64,
    /// Operator RSS with the objects routed (MiB).
    pub operator_rss_mib: f64,
    /// New operator process → leader lease held (seconds).
    pub resync_leader_secs: f64,
    /// New operator process → every object reconciled again (seconds).
    pub resync_secs: f64,
    /// Operator RSS after the resync (MiB).
    pub operator_rss_resync_mib: f64,
    /// 1-minute load average when the creates started.
    pub load: Option<f64>,
}

/// Runs the section on a cluster of its own, stopped afterwards whatever happens.
pub async fn run_all(cfg: &super::Config, r: &mut RoutingResults) -> Result<()> {
    let state = cfg.work.join("cluster-routing");
    LocalCluster::down(&state)?;
    let _ = std::fs::remove_dir_all(&state);
    let cluster = LocalCluster::up(&state, 1, Some(std::process::id()))?;
    let result = measure(cfg, &cluster, r).await;
    LocalCluster::down(&state)?;
    let _ = std::fs::remove_dir_all(&state);
    result
}

/// A QemuInstance on `NODE`, written as the (stopped) agent would.
async fn fake_vm(client: &kube::Client, name: &str) -> Result<()> {
    let api: Api<QemuInstance> = Api::namespaced(client.clone(), NS);
    let vm: QemuInstance = serde_json::from_value(serde_json::json!({
        "apiVersion": "cairn.dev/v1alpha1", "kind": "QemuInstance",
        "metadata": {"name": name},
    }))?;
    api.create(&PostParams::default(), &vm).await?;
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"status": {"nodeName": NODE, "runState": "running"}})),
    )
    .await?;
    Ok(())
}

async fn measure(
    cfg: &super::Config,
    cluster: &LocalCluster,
    r: &mut RoutingResults,
) -> Result<()> {
    let client = cairn_e2e::harness::client_for(&cluster.cp.kubeconfig).await?;
    kubectl(cluster, &["create", "namespace", NS], None)?;
    // The agent stays out: the objects stay Pending, the time is the operator's and the API server's.
    cluster.stop_process(&format!("agent-{NODE}"))?;
    fake_vm(&client, "vm").await?;
    let op_watchdog = recorded_pid(&cluster.state_dir, "operator-0").context("operator pid")?;
    let operator = service_pid(op_watchdog, "cairn-operator").context("operator process")?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    r.operator_rss_idle_mib = rss_mib(operator)?;
    r.objects = cfg.objects;
    r.load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok());

    eprintln!("bench: routing {} checkpoint objects", cfg.objects);
    let cps: Api<VirtualMachineCheckpoint> = Api::namespaced(client.clone(), NS);
    let routed = tokio::spawn(all_labelled(client.clone(), cfg.objects));
    let t = Instant::now();
    let creates = (0..cfg.objects).map(|i| {
        let cps = cps.clone();
        async move {
            let o = checkpoint_object(&format!("obj-{i:05}"), "vm")?;
            cps.create(&PostParams::default(), &o).await?;
            anyhow::Ok(())
        }
    });
    let results: Vec<Result<()>> = futures::stream::iter(creates)
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;
    results.into_iter().collect::<Result<()>>()?;
    r.create_secs = t.elapsed().as_secs_f64();
    let routed = routed.await.context("routing watch")??;
    r.first_create_to_routed_secs = routed.saturating_duration_since(t).as_secs_f64();
    r.created_to_routed_secs = r.first_create_to_routed_secs - r.create_secs;
    tokio::time::sleep(Duration::from_secs(3)).await;
    r.operator_rss_mib = rss_mib(operator)?;

    // Full resync: a fresh operator process until it reconciled every object.
    // TERM, so the old leader hands over its lease as in a rolling update.
    stop_watchdog(op_watchdog);
    for _ in 0..100 {
        if !std::path::Path::new(&format!("/proc/{operator}")).exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t = Instant::now();
    let watchdog = cluster.start_operator("operator-1")?;
    let log: PathBuf = cluster.state_dir.join("logs/operator-1.log");
    let mut leader_at = None;
    loop {
        if let Some((leader, n)) = operator_metrics(&log) {
            if leader && leader_at.is_none() {
                leader_at = Some(t.elapsed().as_secs_f64());
            }
            if n as usize >= cfg.objects {
                break;
            }
        }
        ensure!(
            t.elapsed() < Duration::from_secs(600),
            "resync did not finish"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    r.resync_secs = t.elapsed().as_secs_f64();
    r.resync_leader_secs = leader_at.unwrap_or(r.resync_secs);
    if let Some(pid) = service_pid(watchdog, "cairn-operator") {
        r.operator_rss_resync_mib = rss_mib(pid)?;
    }
    Ok(())
}

/// When the `n`-th checkpoint with a routing label was seen, through a
/// watch with that label selector set up before the creates (the server sends
/// whole objects; only their metadata is decoded). Listing thousands of
/// objects again and again would load the API server being measured.
async fn all_labelled(client: kube::Client, n: usize) -> Result<Instant> {
    let api: Api<PartialObjectMeta<VirtualMachineCheckpoint>> = Api::namespaced(client, NS);
    let config = watcher::Config::default().labels(cairn_api::NODE_LABEL);
    let mut stream = watcher(api, config).applied_objects().boxed();
    let mut seen = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(900);
    while seen.len() < n {
        let next = tokio::time::timeout_at(deadline.into(), stream.next()).await;
        match next {
            Ok(Some(Ok(obj))) => {
                seen.insert(obj.name_any());
            }
            Ok(Some(Err(e))) => eprintln!("bench: routing watch: {e}"),
            Ok(None) => anyhow::bail!("routing watch ended"),
            Err(_) => anyhow::bail!("only {} of {n} checkpoints routed", seen.len()),
        }
    }
    Ok(Instant::now())
}

/// The section as Markdown tables (no heading).
pub fn render(r: &RoutingResults) -> String {
    let mut out = String::new();
    if r.objects == 0 {
        out.push_str("Not measured.\n");
        return out;
    }
    let load = r.load.map_or("–".into(), |l| format!("{l:.2}"));
    let _ = writeln!(
        out,
        "{} checkpoints of one VM created {IN_FLIGHT} at a time, agent stopped (the objects stay Pending: the operator's work only); 1-minute load average at the start {load}.\n",
        r.objects
    );
    let _ = writeln!(out, "| measurement | value |\n|---|---|");
    let rows = [
        ("creates (all returned)", format!("{:.1} s", r.create_secs)),
        (
            "last create returned → all routed",
            format!("{:.1} s", r.created_to_routed_secs),
        ),
        (
            "first create → all routed",
            format!("{:.1} s", r.first_create_to_routed_secs),
        ),
        (
            "operator RSS idle",
            format!("{:.1} MiB", r.operator_rss_idle_mib),
        ),
        (
            "operator RSS with the objects",
            format!("{:.1} MiB", r.operator_rss_mib),
        ),
        (
            "full resync: new operator process → leader lease held",
            format!("{:.1} s", r.resync_leader_secs),
        ),
        (
            "full resync: new operator process → every object reconciled",
            format!("{:.1} s", r.resync_secs),
        ),
        (
            "operator RSS after the resync",
            format!("{:.1} MiB", r.operator_rss_resync_mib),
        ),
    ];
    for (what, value) in rows {
        let _ = writeln!(out, "| {what} | {value} |");
    }
    out
}

/// (target, measured, met?) for the targets table.
pub fn targets(r: &RoutingResults) -> Vec<(String, String, Option<bool>)> {
    let has = r.objects > 0;
    vec![
        (
            format!("{} checkpoints created → all routed ≤ 15 s", r.objects),
            format!(
                "{:.1} s after the last create ({:.1} s from the first; the creates took {:.1} s)",
                r.created_to_routed_secs, r.first_create_to_routed_secs, r.create_secs
            ),
            has.then_some(r.created_to_routed_secs <= 15.0),
        ),
        (
            format!("operator RSS ≤ 150 MiB with {} checkpoints", r.objects),
            format!(
                "{:.1} MiB",
                r.operator_rss_mib.max(r.operator_rss_resync_mib)
            ),
            has.then_some(r.operator_rss_mib.max(r.operator_rss_resync_mib) <= 150.0),
        ),
        (
            format!("full resync ≤ 10 s ({} objects)", r.objects),
            format!("{:.1} s", r.resync_secs),
            has.then_some(r.resync_secs <= 10.0),
        ),
    ]
}
