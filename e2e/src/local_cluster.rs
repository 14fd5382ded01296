//! The local cluster of DESIGN.md: a control plane with Cairn's CRDs, the
//! operator, and one agent per simulated node (`node-1` …), all as local
//! processes. Node `X`'s agent watches `$CAIRN_STATE_DIR/nodes/X/qmp` and may
//! write a namespace's backups under `$CAIRN_STATE_DIR/nodes/X/backups/<ns>/`;
//! its pull export sockets go in `$CAIRN_STATE_DIR/nodes/X/exports/<ns>/`
//! and fleecing scratch images in `$CAIRN_STATE_DIR/nodes/X/scratch/<ns>/`.
//!
//! Repositories: a versitygw S3 server on loopback ([`crate::local_s3`]) with
//! the bucket `cairn`, Cairn's namespace `cairn-system` with the Secrets
//! `local-s3-credentials` and `local-s3-key`, and the cluster-scoped
//! BackupRepositories `local-s3` (encrypted) and `local-dir`
//! (`$CAIRN_STATE_DIR/repository`), both open to every namespace.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use base64::Engine;
use cairn_api::{
    AllowedNamespaces, BackupRepository, BackupRepositorySpec, DirectoryStorage,
    RepositoryEncryption, RepositoryStorage, S3Storage,
};
use rand::RngCore;

use crate::control_plane::{ControlPlane, kill_recorded, spawn_service, stop_recorded};
use crate::local_s3::LocalS3;
use crate::tools::Tools;

/// Cairn's own namespace in the local cluster: repository Secrets live here
/// (`CAIRN_NAMESPACE` of the operator and the agents).
pub const CAIRN_NAMESPACE: &str = "cairn-system";
/// The encrypted BackupRepository on the local S3 server.
pub const S3_REPOSITORY: &str = "local-s3";
/// The unencrypted BackupRepository in `$CAIRN_STATE_DIR/repository`.
pub const DIRECTORY_REPOSITORY: &str = "local-dir";
/// Secret (in [`CAIRN_NAMESPACE`]) with `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`.
pub const S3_CREDENTIALS_SECRET: &str = "local-s3-credentials";
/// Secret (in [`CAIRN_NAMESPACE`]) whose `key` holds `local-s3`'s 32-byte key.
pub const S3_KEY_SECRET: &str = "local-s3-key";

/// Ports TCP pull exports of the local cluster's agents use (on 127.0.0.1).
pub const LOCAL_EXPORT_PORTS: &str = "20809-20908";

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
    /// The S3 server behind the `local-s3` repository.
    pub s3: LocalS3,
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
        let s3 =
            LocalS3::start(&tools, &state_dir, owner).context("starting the local S3 server")?;
        let nodes: Vec<String> = (1..=nodes).map(|i| format!("node-{i}")).collect();
        let cluster = Self {
            state_dir,
            cp,
            nodes,
            owner,
            s3,
        };
        for node in &cluster.nodes {
            fs::create_dir_all(cluster.qmp_dir(node))?;
            fs::create_dir_all(cluster.backup_dir(node))?;
        }
        fs::create_dir_all(cluster.repository_dir())?;
        cluster.install_repositories()?;
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

    /// Root of directory repositories (`CAIRN_REPOSITORY_ROOTS` of the agents) and
    /// the path of `local-dir`: `$CAIRN_STATE_DIR/repository`.
    pub fn repository_dir(&self) -> PathBuf {
        self.state_dir.join("repository")
    }

    /// The 32-byte key of `local-s3`: random on the first start of a state
    /// directory, then kept in `$CAIRN_STATE_DIR/s3/local-s3.key` (mode 0600)
    /// so a restarted cluster still opens the repository on the kept S3 data.
    pub fn s3_repository_key(&self) -> Result<Vec<u8>> {
        let path = crate::local_s3::s3_dir(&self.state_dir).join("local-s3.key");
        if let Ok(key) = fs::read(&path)
            && key.len() == 32
        {
            return Ok(key);
        }
        let mut key = vec![0u8; 32];
        rand::rng().fill_bytes(&mut key);
        fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| f.write_all(&key))
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(key)
    }

    /// The BackupRepositories `cluster up` creates: `local-s3` and `local-dir`.
    pub fn repositories(&self) -> [BackupRepository; 2] {
        let everyone = Some(AllowedNamespaces {
            names: vec!["*".into()],
            selector: None,
        });
        let s3 = BackupRepository::new(
            S3_REPOSITORY,
            BackupRepositorySpec {
                storage: RepositoryStorage {
                    s3: Some(S3Storage {
                        endpoint: self.s3.endpoint.clone(),
                        bucket: self.s3.bucket.clone(),
                        prefix: None,
                        region: Some(cairn_repo::test_support::REGION.into()),
                        path_style: Some(true),
                        credentials_secret: S3_CREDENTIALS_SECRET.into(),
                    }),
                    directory: None,
                },
                encryption: Some(RepositoryEncryption {
                    key_secret: S3_KEY_SECRET.into(),
                }),
                allowed_namespaces: everyone.clone(),
                ..Default::default()
            },
        );
        let dir = BackupRepository::new(
            DIRECTORY_REPOSITORY,
            BackupRepositorySpec {
                storage: RepositoryStorage {
                    s3: None,
                    directory: Some(DirectoryStorage {
                        path: self.repository_dir().display().to_string(),
                    }),
                },
                allowed_namespaces: everyone,
                ..Default::default()
            },
        );
        [s3, dir]
    }

    /// Creates (server-side apply, admin kubeconfig) the namespace
    /// `cairn-system`, the Secrets of `local-s3` and both BackupRepositories.
    fn install_repositories(&self) -> Result<()> {
        let b64 = |v: &[u8]| base64::engine::general_purpose::STANDARD.encode(v);
        let secret = |name: &str, data: serde_json::Value| {
            serde_json::json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": name, "namespace": CAIRN_NAMESPACE},
                "type": "Opaque", "data": data,
            })
        };
        let mut objects = vec![
            serde_json::json!({
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": CAIRN_NAMESPACE},
            }),
            secret(
                S3_CREDENTIALS_SECRET,
                serde_json::json!({
                    "AWS_ACCESS_KEY_ID": b64(self.s3.access_key_id.as_bytes()),
                    "AWS_SECRET_ACCESS_KEY": b64(self.s3.secret_access_key.as_bytes()),
                }),
            ),
            secret(
                S3_KEY_SECRET,
                serde_json::json!({"key": b64(&self.s3_repository_key()?)}),
            ),
        ];
        for repo in self.repositories() {
            objects.push(serde_json::to_value(repo)?);
        }
        self.remove_stale_s3_repository()?;
        let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": objects});
        let file = tempfile::NamedTempFile::new()?;
        fs::write(file.path(), serde_json::to_vec(&list)?)?;
        self.cp.kubectl_checked(
            "creating the local repositories",
            &[
                "apply",
                "--server-side",
                "--field-manager=cairn-local-cluster",
                "--force-conflicts",
                "-f",
                file.path().to_str().context("temp path is not UTF-8")?,
            ],
        )?;
        Ok(())
    }

    /// Deletes a `local-s3` left in etcd by an earlier start whose S3 server had
    /// another endpoint (its storage is immutable, so it cannot be updated).
    fn remove_stale_s3_repository(&self) -> Result<()> {
        let out = self.cp.kubectl_output(&[
            "get",
            "backuprepository",
            S3_REPOSITORY,
            "--ignore-not-found",
            "-o",
            "jsonpath={.spec.storage.s3.endpoint}",
        ])?;
        let endpoint = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || endpoint.is_empty() || endpoint == self.s3.endpoint {
            return Ok(());
        }
        eprintln!(
            "local cluster: {S3_REPOSITORY} pointed at {endpoint}; re-creating it for {}",
            self.s3.endpoint
        );
        self.cp.kubectl_checked(
            &format!("deleting the stale {S3_REPOSITORY}"),
            &["delete", "backuprepository", S3_REPOSITORY, "--timeout=30s"],
        )?;
        Ok(())
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
                ("CAIRN_NAMESPACE", CAIRN_NAMESPACE.into()),
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
                ("CAIRN_NAMESPACE", CAIRN_NAMESPACE.into()),
                (
                    "CAIRN_REPOSITORY_ROOTS",
                    self.repository_dir().display().to_string(),
                ),
                ("CAIRN_RESCAN_SECONDS", "2".into()),
                // A freeze of the test guest takes ~60 ms; hung-agent tests wait less.
                ("CAIRN_QUIESCE_TIMEOUT_SECONDS", "5".into()),
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
                // TCP pull exports listen on loopback, every node sharing the range.
                ("CAIRN_EXPORT_ADDRESS", "127.0.0.1".into()),
                ("CAIRN_EXPORT_PORTS", LOCAL_EXPORT_PORTS.into()),
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

    /// The `export` lines for a shell: `KUBECONFIG`, `CAIRN_STATE_DIR`, and the
    /// local S3 server's `CAIRN_S3_ENDPOINT`, `CAIRN_S3_BUCKET`,
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` on one line.
    pub fn exports(&self) -> String {
        format!(
            "export KUBECONFIG={}\nexport CAIRN_STATE_DIR={}\n{}\n",
            self.cp.kubeconfig.display(),
            self.state_dir.display(),
            self.s3.export_line()
        )
    }

    /// Stops everything a cluster in `state_dir` started (versitygw, the
    /// operator and agents, then the control plane).
    pub fn down(state_dir: &Path) -> Result<()> {
        stop_recorded(state_dir)?;
        stop_recorded(&state_dir.join("control-plane"))
    }
}
