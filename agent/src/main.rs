//! `cairn-agent`: the node agent binary.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use cairn_agent::image::OutputFormat;
use cairn_agent::restore::{RestoreRequest, restore};
use cairn_agent::{AgentConfig, run};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    version,
    about = "Cairn node agent: checkpoints and backups of local QEMU VMs"
)]
struct Cli {
    /// QMP socket directory, laid out `<namespace>/<vm>.sock`.
    #[arg(
        long,
        env = "CAIRN_SOCKET_DIR",
        default_value = "/run/cairn/qmp",
        global = true
    )]
    socket_dir: PathBuf,
    /// Roots under which backups may be written (repeat or comma separate).
    #[arg(
        long,
        env = "CAIRN_ALLOWED_ROOTS",
        value_delimiter = ',',
        default_value = "/var/lib/cairn/backups",
        global = true
    )]
    allowed_root: Vec<PathBuf>,
    /// Seconds between full rescans of the socket directory.
    #[arg(
        long,
        env = "CAIRN_RESCAN_SECONDS",
        default_value_t = 10,
        global = true
    )]
    rescan_seconds: u64,
    /// Seconds a QMP command may take.
    #[arg(
        long,
        env = "CAIRN_QMP_TIMEOUT_SECONDS",
        default_value_t = 30,
        global = true
    )]
    qmp_timeout_seconds: u64,
    /// This node's name. When set, the agent joins the cluster: it publishes
    /// QemuInstances and reconciles the checkpoints and backups routed here.
    #[arg(long, env = "NODE_NAME", global = true)]
    node_name: Option<String>,
    /// Agent runtime state directory.
    #[arg(
        long,
        env = "CAIRN_RUNTIME_DIR",
        default_value = "/run/cairn/agent",
        global = true
    )]
    runtime_dir: PathBuf,
    /// Pull export sockets go in `<export dir>/<namespace>/` (mode 0660,
    /// directories 0750); a tenant-given socket path must lie there.
    #[arg(
        long,
        env = "CAIRN_EXPORT_DIR",
        default_value = "/run/cairn/exports",
        global = true
    )]
    export_dir: PathBuf,
    /// Group (name or numeric id) that owns export sockets and directories:
    /// the local users allowed to read exports. Unset: the agent's group.
    #[arg(long, env = "CAIRN_EXPORT_GROUP", global = true)]
    export_group: Option<String>,
    /// Fleecing scratch images of pull exports go in `<scratch dir>/<namespace>/`.
    #[arg(
        long,
        env = "CAIRN_SCRATCH_DIR",
        default_value = "/var/lib/cairn/scratch",
        global = true
    )]
    scratch_dir: PathBuf,
    /// Free scratch space a pull export needs before it starts: `allocated`
    /// (every allocated byte of the exported disks) or `virtual` (their full size).
    #[arg(
        long,
        env = "CAIRN_SCRATCH_RESERVE",
        default_value = "allocated",
        global = true
    )]
    scratch_reserve: cairn_agent::backup::ScratchReserve,
    /// Seconds one copy-before-write of a pull export may take before the
    /// export's point-in-time view is dropped (the guest write then goes on).
    #[arg(
        long,
        env = "CAIRN_CBW_TIMEOUT_SECONDS",
        default_value_t = 30,
        global = true
    )]
    cbw_timeout_seconds: u32,
    /// The node's address TCP pull exports (`target.nbd.tcp`) listen on, and
    /// that clients are told to connect to. Unset: TCP exports are refused.
    #[arg(long, env = "CAIRN_EXPORT_ADDRESS", global = true)]
    export_address: Option<std::net::IpAddr>,
    /// Ports TCP pull exports may use, `FIRST-LAST`.
    #[arg(
        long,
        env = "CAIRN_EXPORT_PORTS",
        default_value = "10809-10908",
        value_parser = parse_port_range,
        global = true
    )]
    export_ports: (u16, u16),
    /// Seconds between full refreshes of QemuInstance status. A VM is also
    /// re-read as soon as its QEMU reports a change (QMP event, reconnect, or
    /// a state-changing command from the agent); the periodic pass catches
    /// what QEMU does not announce (dirty-byte counts, other QMP clients).
    #[arg(
        long,
        env = "CAIRN_RESYNC_SECONDS",
        default_value_t = 30,
        global = true
    )]
    resync_seconds: u64,
    /// Seconds each QEMU guest agent call of `quiesce` may take (sync,
    /// freeze, thaw); a freeze that does not answer fails `QuiesceTimeout`
    /// and the guest is thawed.
    #[arg(
        long,
        env = "CAIRN_QUIESCE_TIMEOUT_SECONDS",
        default_value_t = 10,
        global = true
    )]
    quiesce_timeout_seconds: u64,
    /// Seconds a VM's QemuInstance stays (run state `stopped`) after its socket vanished.
    #[arg(
        long,
        env = "CAIRN_STOPPED_GRACE_SECONDS",
        default_value_t = 600,
        global = true
    )]
    stopped_grace_seconds: u64,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(
        long,
        env = "CAIRN_METRICS_ADDR",
        default_value = "0.0.0.0:8081",
        global = true
    )]
    metrics_addr: String,
    /// Cairn's own namespace: where BackupRepository credentials and keys live.
    #[arg(
        long,
        env = "CAIRN_NAMESPACE",
        default_value = "cairn-system",
        global = true
    )]
    namespace: String,
    /// Roots directory BackupRepositories may lie under (repeat or comma separate).
    #[arg(
        long,
        env = "CAIRN_REPOSITORY_ROOTS",
        value_delimiter = ',',
        default_value = "/var/lib/cairn/repository",
        global = true
    )]
    repository_root: Vec<PathBuf>,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "RUST_LOG", default_value = "info", global = true)]
    log: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (default).
    Run,
    /// Verify a backup chain's files against their recorded checksums and turn
    /// the chain into a standalone image. Prints `<disk>\t<output>\tverified`
    /// (or `unverified` with --no-verify) per disk.
    ///
    /// With `--repository`, restores a repository snapshot instead, with no
    /// cluster: only the storage location and the key. Every chunk is
    /// authenticated as it is read; each disk is written to
    /// `<output>/<disk>.<format>` under a hidden name and renamed when complete.
    #[command(group(clap::ArgGroup::new("source").required(true).args(["manifest", "repository"])))]
    Restore {
        /// Manifest file, or a backup directory (its newest manifest).
        #[arg(long, env = "CAIRN_RESTORE_MANIFEST")]
        manifest: Option<PathBuf>,
        /// Repository location: `s3://<bucket>[/<prefix>]?endpoint=<url>[&region=<r>]`
        /// (credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) or
        /// `dir:///<path>`.
        #[arg(long, env = "CAIRN_RESTORE_REPOSITORY")]
        repository: Option<String>,
        /// Repository snapshot id, or `latest` (of --namespace/--vm).
        #[arg(long, env = "CAIRN_RESTORE_SNAPSHOT", default_value = "latest")]
        snapshot: String,
        /// File with the repository key (the Secret's `key`); absent = unencrypted.
        #[arg(long, env = "CAIRN_RESTORE_KEY_FILE")]
        key_file: Option<PathBuf>,
        /// With `--snapshot latest`: the VM's namespace.
        #[arg(long = "from-namespace")]
        from_namespace: Option<String>,
        /// With `--snapshot latest`: the VM.
        #[arg(long)]
        vm: Option<String>,
        /// Replace existing output files (repository restores).
        #[arg(long)]
        overwrite: bool,
        /// Output image (or directory when the backup has several disks; always
        /// a directory for repository restores).
        #[arg(long, env = "CAIRN_RESTORE_OUTPUT")]
        output: PathBuf,
        /// Output format.
        #[arg(long, env = "CAIRN_RESTORE_FORMAT", value_enum, default_value_t = Format::Qcow2)]
        format: Format,
        /// Only this disk.
        #[arg(long, env = "CAIRN_RESTORE_DISK")]
        disk: Option<String>,
        /// Skip checking the chain files against their recorded checksums.
        #[arg(long, env = "CAIRN_RESTORE_NO_VERIFY")]
        no_verify: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Qcow2,
    Raw,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    match cli.command.unwrap_or(Command::Run) {
        Command::Run if cli.node_name.is_some() => {
            let client = kube::Client::try_default()
                .await
                .context("no Kubernetes client configuration (in-cluster or KUBECONFIG)")?;
            let socket_group = cli.export_group.as_deref().map(resolve_group).transpose()?;
            let config = cairn_agent::controller::NodeAgentConfig {
                node_name: cli.node_name.unwrap_or_default(),
                socket_dir: cli.socket_dir,
                backup_roots: cli.allowed_root,
                runtime_dir: cli.runtime_dir.clone(),
                pull: cairn_agent::backup::PullPolicy {
                    export_dir: cli.export_dir,
                    socket_group,
                    scratch_dir: cli.scratch_dir,
                    scratch_reserve: cli.scratch_reserve,
                    cbw_timeout_seconds: cli.cbw_timeout_seconds.max(1),
                    tcp: cairn_agent::backup::TcpExportPolicy {
                        address: cli.export_address.map(|a| a.to_string()),
                        ports: cli.export_ports,
                        key_dir: cli.runtime_dir.join("nbd-tls"),
                    },
                },
                rescan_interval: Duration::from_secs(cli.rescan_seconds.max(1)),
                qmp_timeout: Duration::from_secs(cli.qmp_timeout_seconds.max(1)),
                resync_interval: Duration::from_secs(cli.resync_seconds.max(1)),
                metrics_addr: cli.metrics_addr,
                stopped_grace: Duration::from_secs(cli.stopped_grace_seconds),
                cairn_namespace: cli.namespace,
                repository_roots: cli.repository_root,
                quiesce_timeout: Duration::from_secs(cli.quiesce_timeout_seconds.max(1)),
            };
            let shutdown = async {
                let _ = tokio::signal::ctrl_c().await;
            };
            cairn_agent::controller::run(client, config, shutdown)
                .await
                .context("agent failed")?;
        }
        Command::Run => {
            let config = AgentConfig {
                socket_dir: cli.socket_dir,
                allowed_roots: cli.allowed_root,
                rescan_interval: Duration::from_secs(cli.rescan_seconds.max(1)),
                qmp_timeout: Duration::from_secs(cli.qmp_timeout_seconds.max(1)),
                report_interval: Duration::from_secs(60),
            };
            let shutdown = async {
                let _ = tokio::signal::ctrl_c().await;
            };
            run(config, shutdown).await.context("agent failed")?;
        }
        Command::Restore {
            repository: Some(location),
            snapshot,
            key_file,
            from_namespace,
            vm,
            overwrite,
            output,
            format,
            disk,
            ..
        } => {
            use cairn_repo::cli;
            let storage = cli::parse_location(&location, |k| std::env::var(k).ok())?;
            let key = cli::load_key(key_file.as_deref())?;
            let repo = cairn_repo::Repository::open(&storage, &key, None)
                .await
                .context("opening the repository")?;
            std::fs::create_dir_all(&output)
                .with_context(|| format!("creating {}", output.display()))?;
            let reports = cli::restore(
                &repo,
                &cli::RestoreRequest {
                    snapshot,
                    namespace: from_namespace,
                    vm,
                    disks: disk.into_iter().collect(),
                    output_dir: output,
                    format: match format {
                        Format::Qcow2 => cairn_repo::OutputFormat::Qcow2,
                        Format::Raw => cairn_repo::OutputFormat::Raw,
                    },
                    overwrite,
                },
            )
            .await
            .context("restore failed")?;
            for r in reports {
                println!("{}\t{}\tverified", r.path.display(), r.size);
            }
        }
        Command::Restore {
            manifest: Some(manifest),
            output,
            format,
            disk,
            no_verify,
            ..
        } => {
            let format = match format {
                Format::Qcow2 => OutputFormat::Qcow2,
                Format::Raw => OutputFormat::Raw,
            };
            let restored = restore(&RestoreRequest {
                manifest,
                output,
                format,
                disk,
                verify: !no_verify,
            })
            .await
            .context("restore failed")?;
            for d in restored {
                let verdict = if d.verified { "verified" } else { "unverified" };
                println!("{}\t{}\t{verdict}", d.disk, d.output.display());
            }
        }
        Command::Restore { .. } => unreachable!("clap requires --manifest or --repository"),
    }
    Ok(())
}

/// A group name or numeric id, as a gid.
fn resolve_group(group: &str) -> anyhow::Result<u32> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let found = nix::unistd::Group::from_name(group)
        .with_context(|| format!("cannot look up group {group:?}"))?
        .with_context(|| format!("no group {group:?} on this node"))?;
    Ok(found.gid.as_raw())
}

/// `FIRST-LAST`, a non-empty range of ports.
fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?} is not FIRST-LAST"))?;
    let first: u16 = a.trim().parse().map_err(|e| format!("{a:?}: {e}"))?;
    let last: u16 = b.trim().parse().map_err(|e| format!("{b:?}: {e}"))?;
    if first == 0 || first > last {
        return Err(format!("{s:?} is empty or starts at 0"));
    }
    Ok((first, last))
}
