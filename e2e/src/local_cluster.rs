//! The local cluster of DESIGN.md: a control plane with Cairn's CRDs, the
//! operator, and one agent per simulated node (`node-1` …), all as local
//! processes. Node `X`'s agent watches `$CAIRN_STATE_DIR/nodes/X/qmp` and may
//! write a namespace's backups under `$CAIRN_STATE_DIR/nodes/X/backups/<ns>/`;
//! its pull export sockets go in `$CAIRN_STATE_DIR/nodes/X/exports/<ns>/`
//! and fleecing scratch images in `$CAIRN_STATE_DIR/nodes/X/scratch/<ns>/`.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::control_plane::{ControlPlane, kill_recorded, spawn_service, stop_recorded};
use crate::tools::Tools;

/// A running local cluster.
#[derive(Clone, Debug)]
pub struct LocalCluster {
    /// `$CAIRN_STATE_DIR`.
    pub state_dir: PathBuf,
    /// The control plane.
    pub cp: ControlPlane,
    /// Simulated node names.
    pub nodes: Vec<String>,
    /// Process that owns the cluster (its death stops everything), if any.
    pub owner: Option<u32>,
}

/// Where the workspace's binaries are: `$CAIRN_BIN_DIR` when set (e.g.
/// `target/release` for benchmarks), else the debug build.
pub fn binary(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("CAIRN_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::tools::repo_root().join("target"));
    target.join("debug").join(name)
}

impl LocalCluster {
    /// Starts the control plane, installs the CRDs, lays out the node directories and,
    /// when the binaries are built, starts the operator and one agent per node.
    pub fn up(state_dir: &Path, nodes: usize, owner: Option<u32>) -> Result<Self> {
        let tools = Tools::ensure()?;
        fs::create_dir_all(state_dir)?;
        let state_dir = state_dir.canonicalize()?;
        let cp = ControlPlane::start(&tools, &state_dir.join("control-plane"), owner)?;
        crate::harness::install_crds(&cp)?;
        crate::harness::install_admission_policy(&cp)?;
        let nodes: Vec<String> = (1..=nodes).map(|i| format!("node-{i}")).collect();
        let cluster = Self {
            state_dir,
            cp,
            nodes,
            owner,
        };
        for node in &cluster.nodes {
            fs::create_dir_all(cluster.qmp_dir(node))?;
            fs::create_dir_all(cluster.backup_dir(node))?;
        }
        if binary("cairn-operator").exists() {
            // Two replicas by default, as the chart runs them: the Lease picks the
            // active one. `CAIRN_OPERATOR_REPLICAS` changes it (the bench uses 1).
            let replicas: usize = std::env::var("CAIRN_OPERATOR_REPLICAS")
                .ok()
                .and_then(|r| r.parse().ok())
                .unwrap_or(2);
            for i in 0..replicas {
                cluster.start_operator(&format!("operator-{i}"))?;
            }
        }
        if binary("cairn-agent").exists() {
            for node in &cluster.nodes {
                cluster.start_agent(node)?;
            }
        }
        Ok(cluster)
    }

    /// QMP socket directory of `node`.
    pub fn qmp_dir(&self, node: &str) -> PathBuf {
        self.state_dir.join("nodes").join(node).join("qmp")
    }

    /// Allowed backup root of `node`.
    pub fn backup_dir(&self, node: &str) -> PathBuf {
        self.state_dir.join("nodes").join(node).join("backups")
    }

    /// Export socket directory of `node` (`<ns>/<backup>.sock` below it).
    pub fn export_dir(&self, node: &str) -> PathBuf {
        self.state_dir.join("nodes").join(node).join("exports")
    }

    /// Fleecing scratch directory of `node` (`<ns>/` below it).
    pub fn scratch_dir(&self, node: &str) -> PathBuf {
        self.state_dir.join("nodes").join(node).join("scratch")
    }

    /// Starts one operator replica named `id` (leader election picks the active one).
    pub fn start_operator(&self, id: &str) -> Result<u32> {
        spawn_service(
            &self.state_dir,
            id,
            &binary("cairn-operator"),
            &[],
            &[
                (
                    "KUBECONFIG",
                    self.cp.operator_kubeconfig().display().to_string(),
                ),
                ("POD_NAME", id.to_string()),
                ("RUST_LOG", "info,cairn=debug".into()),
                ("CAIRN_METRICS_ADDR", "127.0.0.1:0".into()),
            ],
            self.owner,
        )
        .context("starting the operator")
    }

    /// Starts the agent of `node`.
    pub fn start_agent(&self, node: &str) -> Result<u32> {
        let node_dir = self.state_dir.join("nodes").join(node);
        spawn_service(
            &self.state_dir,
            &format!("agent-{node}"),
            &binary("cairn-agent"),
            &[],
            &[
                (
                    "KUBECONFIG",
                    self.cp.agent_kubeconfig().display().to_string(),
                ),
                ("NODE_NAME", node.to_string()),
                ("CAIRN_SOCKET_DIR", self.qmp_dir(node).display().to_string()),
                (
                    "CAIRN_ALLOWED_ROOTS",
                    self.backup_dir(node).display().to_string(),
                ),
                ("CAIRN_RESCAN_SECONDS", "2".into()),
                (
                    "CAIRN_RUNTIME_DIR",
                    node_dir.join("run").display().to_string(),
                ),
                (
                    "CAIRN_EXPORT_DIR",
                    self.export_dir(node).display().to_string(),
                ),
                (
                    "CAIRN_SCRATCH_DIR",
                    self.scratch_dir(node).display().to_string(),
                ),
                ("RUST_LOG", "info,cairn=debug".into()),
                ("CAIRN_METRICS_ADDR", "127.0.0.1:0".into()),
            ],
            self.owner,
        )
        .context("starting an agent")
    }

    /// Kills the cluster process recorded as `name` (`agent-node-1`, `operator-0`)
    /// with SIGKILL, as a crash would, and waits until it is gone.
    pub fn stop_process(&self, name: &str) -> Result<u32> {
        kill_recorded(&self.state_dir, name)
    }

    /// Kills the agent of `node` and starts a new one.
    pub fn restart_agent(&self, node: &str) -> Result<u32> {
        self.stop_process(&format!("agent-{node}"))?;
        self.start_agent(node)
    }

    /// Kills the operator replica `id` and starts a new one.
    pub fn restart_operator(&self, id: &str) -> Result<u32> {
        self.stop_process(id)?;
        self.start_operator(id)
    }

    /// The `export` lines for a shell.
    pub fn exports(&self) -> String {
        format!(
            "export KUBECONFIG={}\nexport CAIRN_STATE_DIR={}\n",
            self.cp.kubeconfig.display(),
            self.state_dir.display()
        )
    }

    /// Stops everything a cluster in `state_dir` started.
    pub fn down(state_dir: &Path) -> Result<()> {
        stop_recorded(state_dir)?;
        stop_recorded(&state_dir.join("control-plane"))
    }
}
