//! `cairn-operator`: parses flags, sets up tracing, calls [`cairn_operator::run`].

use anyhow::Context as _;
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Cairn operator: routes VM checkpoints and backups to node agents"
)]
struct Args {
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "CAIRN_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: String,
    /// Name of the leader-election Lease.
    #[arg(long, env = "CAIRN_LEASE_NAME", default_value = "cairn-operator")]
    lease_name: String,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Identity in the Lease (pod name); default `<hostname>-<pid>`.
    #[arg(long, env = "POD_NAME", default_value_t = default_identity())]
    identity: String,
    /// Watch only this namespace (empty: all namespaces).
    #[arg(long, env = "CAIRN_WATCH_NAMESPACE", default_value = "")]
    watch_namespace: String,
    /// Cairn's own namespace, the only one repository Secrets are read from
    /// (default: POD_NAMESPACE, else cairn-system).
    #[arg(long, env = "CAIRN_NAMESPACE", default_value_t = default_namespace())]
    namespace: String,
    /// Directories a directory BackupRepository must lie under, comma
    /// separated (empty: any absolute path).
    #[arg(long, env = "CAIRN_REPOSITORY_ROOTS", value_delimiter = ',')]
    repository_roots: Vec<std::path::PathBuf>,
}

fn default_namespace() -> String {
    std::env::var("POD_NAMESPACE")
        .ok()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "cairn-system".into())
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "cairn-operator".into());
    format!("{host}-{}", std::process::id())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .init();
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes client configuration (in-cluster or KUBECONFIG)")?;
    let mut settings =
        cairn_operator::Settings::new(&args.metrics_addr, &args.lease_namespace, &args.identity);
    settings.lease.name = args.lease_name;
    settings.watch_namespace = Some(args.watch_namespace).filter(|n| !n.is_empty());
    settings.repositories = cairn_operator::RepositorySettings {
        namespace: Some(args.namespace)
            .filter(|n| !n.is_empty())
            .unwrap_or_else(default_namespace),
        roots: args
            .repository_roots
            .into_iter()
            .filter(|r| !r.as_os_str().is_empty())
            .collect(),
    };
    cairn_operator::run(client, settings).await?;
    Ok(())
}
