//! Cairn's node agent as a library: the data path between Kubernetes
//! resources and QEMU.
#![forbid(unsafe_code)]

pub mod backup;
pub mod checkpoint;
pub mod controller;
pub mod discovery;
pub mod identity;
pub mod image;
pub mod inventory;
pub mod offline;
pub mod qga;
pub mod qmp;
pub mod restore;
pub mod tenant_dir;

use std::path::PathBuf;
use std::time::Duration;

/// Settings of a running agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// QMP socket directory root (`<root>/<namespace>/<vm>.sock`).
    pub socket_dir: PathBuf,
    /// Roots under which backups and scratch files may be written.
    pub allowed_roots: Vec<PathBuf>,
    /// Periodic rescan of the socket directory.
    pub rescan_interval: Duration,
    /// QMP command timeout.
    pub qmp_timeout: Duration,
    /// How often the inventory is logged.
    pub report_interval: Duration,
}

/// Agent failures.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Discovery could not start.
    #[error(transparent)]
    Discovery(#[from] discovery::DiscoveryError),
}

/// Runs the node agent until `shutdown` resolves: discovers VMs and keeps
/// their inventories fresh. The Kubernetes side (publishing QemuInstance
/// objects, watching checkpoints and backups) builds on this library.
pub async fn run(
    config: AgentConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    let discovery = discovery::Discovery::start(discovery::DiscoveryOptions {
        root: config.socket_dir.clone(),
        rescan_interval: config.rescan_interval,
        qmp: qmp::QmpOptions {
            command_timeout: config.qmp_timeout,
            ..Default::default()
        },
    })?;
    tracing::info!(socket_dir = %config.socket_dir.display(), roots = ?config.allowed_roots, "agent running");
    let mut tick = tokio::time::interval(config.report_interval);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => {
                for inv in discovery.inventories().await {
                    tracing::info!(vm = %inv.vm, state = %inv.run_state, disks = inv.disks.len(), "vm inventory");
                }
            }
        }
    }
    Ok(())
}
