//! The agent's Kubernetes side: publishes the VMs discovery finds as
//! `QemuInstance` objects, and reconciles the checkpoints and backups the
//! operator routed to this node (label `cairn.dev/node=<node>`) by calling the
//! data-path library (`checkpoint`, `backup`).
//!
//! How the parts talk: [`Discovery`] owns one QMP session per VM; the
//! [`instances`] loop turns inventories into QemuInstance status; the
//! [`checkpoints`] and [`backups`] controllers look a VM's session up by
//! namespace and name (never across namespaces) and write their status with
//! server-side apply under the `cairn-agent` field manager.

pub mod backups;
pub mod checkpoints;
pub mod health;
pub mod instances;
pub mod instant;
pub mod offline;
pub mod quiesce;
pub mod repositories;
pub mod repository_backups;
pub mod restores;
pub mod status;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_api::NODE_LABEL;
use futures::StreamExt;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Api, Client};
use tokio::task::JoinHandle;

use crate::backup::TargetPolicy;
use crate::discovery::{Discovery, DiscoveryOptions};
use crate::qmp::QmpOptions;

/// Settings of the Kubernetes-connected agent.
#[derive(Debug, Clone)]
pub struct NodeAgentConfig {
    /// This node's name (`NODE_NAME`).
    pub node_name: String,
    /// QMP socket directory root (`<root>/<namespace>/<vm>.sock`).
    pub socket_dir: PathBuf,
    /// Roots under which backups may be written.
    pub backup_roots: Vec<PathBuf>,
    /// Agent state that is not a tenant's (kept for compatibility; unused by backups).
    pub runtime_dir: PathBuf,
    /// Pull exports: socket directory (`<export dir>/<namespace>/`), socket
    /// group, scratch directory and its size policy, copy-before-write timeout.
    pub pull: crate::backup::PullPolicy,
    /// Periodic rescan of the socket directory.
    pub rescan_interval: Duration,
    /// QMP command timeout.
    pub qmp_timeout: Duration,
    /// How often QemuInstance status and Ready checkpoints are refreshed.
    pub resync_interval: Duration,
    /// How long a QemuInstance whose socket vanished stays (`stopped`) before deletion.
    pub stopped_grace: Duration,
    /// Address of `/healthz`, `/readyz` and `/metrics` (`127.0.0.1:0` picks a port).
    pub metrics_addr: String,
    /// Cairn's own namespace, where BackupRepository Secrets live.
    pub cairn_namespace: String,
    /// Roots directory BackupRepositories must lie under.
    pub repository_roots: Vec<PathBuf>,
    /// Deadline of each guest agent call of `quiesce` (sync, freeze, thaw).
    pub quiesce_timeout: Duration,
}

/// State shared by the agent's loops.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Settings.
    pub config: NodeAgentConfig,
    /// VMs on this node.
    pub discovery: Discovery,
    /// Backup targets allowed on this node.
    pub targets: TargetPolicy,
    /// Where pull exports put sockets and scratch images.
    pub pull: crate::backup::PullPolicy,
    /// How BackupRepositories are opened on this node.
    pub repositories: repositories::RepositoryAccess,
    /// Backup jobs this process watches, by backup UID.
    pub jobs: Mutex<HashMap<String, JoinHandle<()>>>,
    /// Stopped VMs' images opened for backups.
    pub offline: offline::OfflineVms,
    /// Metrics and readiness.
    pub health: Arc<health::Health>,
}

/// Errors of the Kubernetes side of the agent.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// The API server refused or failed a request.
    #[error("Kubernetes API request failed")]
    Kube(#[from] kube::Error),
    /// Discovery could not start.
    #[error(transparent)]
    Discovery(#[from] crate::discovery::DiscoveryError),
    /// The metrics endpoint could not bind.
    #[error("cannot serve metrics on {addr}")]
    Metrics {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An object lacks a field the API server always sets.
    #[error("object lacks {0}")]
    MissingField(&'static str),
}

/// Whether the operator routed an object to this node. The routing label
/// only selects what the agent watches: a tenant could set it, so the agent
/// acts only when the operator's own status (which tenants cannot write)
/// names this node and says the object was accepted.
pub fn routed_here(
    node: &str,
    status_node: Option<&str>,
    conditions: &[cairn_api::Condition],
) -> bool {
    status_node == Some(node) && cairn_api::conditions::is_true(conditions, "Accepted")
}

/// Runs a controller over the `K` objects routed to this node (label
/// `cairn.dev/node=<node>`), counting outcomes; errors requeue after 5 s.
async fn run_routed<K, F, Fut>(ctx: Arc<Context>, name: &'static str, reconcile: F)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    F: FnMut(Arc<K>, Arc<Context>) -> Fut,
    Fut: std::future::Future<Output = Result<Action, ControllerError>> + Send + 'static,
{
    let api: Api<K> = Api::all(ctx.client.clone());
    let selector = format!("{NODE_LABEL}={}", ctx.config.node_name);
    let health = ctx.health.clone();
    Controller::new(api, watcher::Config::default().labels(&selector))
        .shutdown_on_signal()
        .run(
            reconcile,
            move |_, e: &ControllerError, _| {
                tracing::warn!(controller = name, error = %status::error_chain(e), "reconcile failed; retrying");
                Action::requeue(Duration::from_secs(5))
            },
            ctx,
        )
        .for_each(|r| {
            let outcome = if r.is_ok() { "ok" } else { "error" };
            health
                .reconciles
                .get_or_create(&health::OutcomeLabel { controller: name, outcome })
                .inc();
            async {}
        })
        .await;
}

/// The export directory is reachable by the socket group only (0750), so
/// other local users cannot reach any export socket below it.
fn restrict_export_dir(pull: &crate::backup::PullPolicy) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(&pull.export_dir, std::fs::Permissions::from_mode(0o750));
    if let Some(g) = pull.socket_group {
        let _ = std::os::unix::fs::chown(&pull.export_dir, None, Some(g));
    }
}

/// Runs the agent until `shutdown` resolves.
pub async fn run(
    client: Client,
    config: NodeAgentConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ControllerError> {
    // The roots are the administrator's: created here, once. Everything below
    // them is created per namespace through TenantDir.
    for root in &config.backup_roots {
        std::fs::create_dir_all(root).ok();
    }
    std::fs::create_dir_all(&config.pull.scratch_dir).ok();
    std::fs::create_dir_all(&config.pull.export_dir).ok();
    restrict_export_dir(&config.pull);
    // Helpers of a previous agent process hold image locks: release them.
    crate::offline::OfflineVm::kill_leftovers(&config.runtime_dir);
    let discovery = Discovery::start(DiscoveryOptions {
        root: config.socket_dir.clone(),
        rescan_interval: config.rescan_interval,
        qmp: QmpOptions {
            command_timeout: config.qmp_timeout,
            ..QmpOptions::default()
        },
    })?;
    let health = Arc::new(health::Health::default());
    let bound = health::serve(&config.metrics_addr, health.clone())
        .await
        .map_err(|source| ControllerError::Metrics {
            addr: config.metrics_addr.clone(),
            source,
        })?;
    client.apiserver_version().await?;
    health.set_ready();
    tracing::info!(metrics = %bound, "serving /healthz, /readyz, /metrics");
    let ctx = Arc::new(Context {
        client,
        targets: TargetPolicy::new(config.backup_roots.clone()),
        pull: config.pull.clone(),
        repositories: repositories::RepositoryAccess {
            namespace: config.cairn_namespace.clone(),
            roots: config.repository_roots.clone(),
        },
        config,
        discovery,
        jobs: Mutex::new(HashMap::new()),
        offline: Default::default(),
        health,
    });
    tracing::info!(node = %ctx.config.node_name, socket_dir = %ctx.config.socket_dir.display(), "agent started");
    tokio::select! {
        () = instances::run(ctx.clone()) => {}
        () = checkpoints::run(ctx.clone()) => {}
        () = backups::run(ctx.clone()) => {}
        () = restores::run(ctx.clone()) => {}
        () = shutdown => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::routed_here;
    use cairn_api::Condition;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn accepted(status: &str) -> Vec<Condition> {
        vec![Condition {
            type_: "Accepted".into(),
            status: status.into(),
            reason: "Routed".into(),
            message: String::new(),
            last_transition_time: Time(k8s_openapi::jiff::Timestamp::now()),
            observed_generation: None,
        }]
    }

    #[test]
    fn the_routing_label_alone_routes_nothing() {
        assert!(routed_here("node-1", Some("node-1"), &accepted("True")));
        // A label set by hand: the operator has written nothing yet.
        assert!(!routed_here("node-1", None, &[]));
        // Routed elsewhere, or rejected.
        assert!(!routed_here("node-1", Some("node-2"), &accepted("True")));
        assert!(!routed_here("node-1", Some("node-1"), &accepted("False")));
    }
}
