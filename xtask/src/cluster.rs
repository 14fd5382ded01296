//! `cargo xtask cluster up|down` and the demo built on it.

use std::path::PathBuf;

use anyhow::Result;
use cairn_e2e::local_cluster::LocalCluster;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum Action {
    /// Start etcd, kube-apiserver, the CRDs, a versitygw S3 server with the
    /// BackupRepositories `local-s3` and `local-dir`, the operator and one agent per
    /// node; print `export` lines for KUBECONFIG, CAIRN_STATE_DIR and the S3 server
    /// (CAIRN_S3_ENDPOINT, CAIRN_S3_BUCKET, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY).
    Up {
        /// Number of simulated nodes.
        #[arg(long, default_value_t = 1)]
        nodes: usize,
    },
    /// Stop everything `cluster up` started (the S3 server too; its data stays).
    Down,
}

pub fn state_dir() -> PathBuf {
    std::env::var_os("CAIRN_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("cairn-cluster"))
}

pub fn run(action: Action) -> Result<()> {
    match action {
        Action::Up { nodes } => {
            let dir = state_dir();
            LocalCluster::down(&dir)?;
            build_binaries()?;
            let cluster = LocalCluster::up(&dir, nodes, None)?;
            eprintln!(
                "cluster up: kube-apiserver {} at {}, nodes {:?}, S3 {} (bucket {}), repositories local-s3 and local-dir; logs in {}",
                cluster.cp.server_version().unwrap_or_default(),
                cluster.cp.server,
                cluster.nodes,
                cluster.s3.endpoint,
                cluster.s3.bucket,
                dir.display()
            );
            print!("{}", cluster.exports());
            Ok(())
        }
        Action::Down => LocalCluster::down(&state_dir()),
    }
}

/// Builds the operator and agent binaries the cluster runs.
pub fn build_binaries() -> Result<()> {
    cairn_e2e::harness::build_binaries()
}
