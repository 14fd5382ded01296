//! Test harness: one real control plane per test binary (started on first use,
//! killed by its watchdog when the binary exits), a client, and a fresh
//! namespace per test.

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use anyhow::{Context, Result, bail};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

use crate::control_plane::ControlPlane;
use crate::local_cluster::LocalCluster;
use crate::tools::Tools;

static CONTROL_PLANE: OnceLock<ControlPlane> = OnceLock::new();
static CLUSTER: OnceLock<LocalCluster> = OnceLock::new();
static STARTING: Mutex<()> = Mutex::new(());

/// The control plane shared by every test of this binary, with Cairn's CRDs installed.
pub fn control_plane() -> Result<&'static ControlPlane> {
    if let Some(cp) = CONTROL_PLANE.get() {
        return Ok(cp);
    }
    let _guard = STARTING.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(cp) = CONTROL_PLANE.get() {
        return Ok(cp);
    }
    let tools = Tools::ensure()?;
    remove_stale_dirs("cairn-e2e-");
    let dir = std::env::temp_dir().join(format!("cairn-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cp = ControlPlane::start(&tools, &dir, Some(std::process::id()))?;
    eprintln!(
        "control plane: kube-apiserver {} with etcd {} at {} (dir {})",
        cp.server_version().unwrap_or_default(),
        crate::tools::ETCD_VERSION,
        cp.server,
        dir.display()
    );
    install_crds(&cp)?;
    Ok(CONTROL_PLANE.get_or_init(|| cp))
}

/// The local cluster (control plane, operator, one agent on each of two nodes)
/// shared by every test of this binary. Builds the binaries first.
pub fn local_cluster() -> Result<&'static LocalCluster> {
    if let Some(c) = CLUSTER.get() {
        return Ok(c);
    }
    let _guard = STARTING.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(c) = CLUSTER.get() {
        return Ok(c);
    }
    build_binaries()?;
    remove_stale_dirs("cairn-e2e-cluster-");
    let dir = std::env::temp_dir().join(format!("cairn-e2e-cluster-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cluster = LocalCluster::up(&dir, 2, Some(std::process::id()))?;
    eprintln!(
        "local cluster: kube-apiserver {} at {}, nodes {:?}, state {}",
        cluster.cp.server_version().unwrap_or_default(),
        cluster.cp.server,
        cluster.nodes,
        dir.display()
    );
    Ok(CLUSTER.get_or_init(|| cluster))
}

/// Builds the operator and agent binaries the tests run as processes (a no-op when fresh).
pub fn build_binaries() -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--quiet",
            "-p",
            "cairn-operator",
            "-p",
            "cairn-agent",
        ])
        .current_dir(crate::tools::repo_root())
        .status()?;
    anyhow::ensure!(
        status.success(),
        "building cairn-operator and cairn-agent failed"
    );
    Ok(())
}

/// Removes `<tmp>/<prefix><pid>` directories of test processes that are gone.
fn remove_stale_dirs(prefix: &str) {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(prefix)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Installs what the chart gives every cluster beyond the CRDs, rendered by
/// `helm template`: the ValidatingAdmissionPolicy for `cairn.dev/` labels and
/// annotations (with the local cluster's operator and agent users as Cairn's
/// identities; the admin user is not one of them) and the roles aggregated
/// into `view`/`edit`/`admin`, so a tenant bound to `edit` acts as with the chart.
pub fn install_admission_policy(cp: &ControlPlane) -> Result<()> {
    let chart = crate::tools::repo_root().join("charts/cairn");
    let out = Command::new(&cp.tools.helm)
        .args(["template", "cairn", chart.to_str().unwrap()])
        .args(["--namespace", "cairn-system"])
        .args(["--show-only", "templates/admission-policy.yaml"])
        .args(["--show-only", "templates/aggregated-roles.yaml"])
        .arg(format!(
            "--set=admissionPolicy.extraCairnUsers={{{},{}}}",
            crate::control_plane::OPERATOR_USER,
            crate::control_plane::AGENT_USER
        ))
        .output()
        .context("running helm template")?;
    if !out.status.success() {
        bail!(
            "rendering the admission policy failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let rendered = tempfile::NamedTempFile::new()?;
    std::fs::write(rendered.path(), &out.stdout)?;
    let out = cp.kubectl_output(&[
        "apply",
        "--server-side",
        "-f",
        rendered.path().to_str().unwrap(),
    ])?;
    if !out.status.success() {
        bail!(
            "installing the admission policy failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The API server loads policies asynchronously: wait until a server-side
    // dry run of a labelled object is refused.
    let probe = tempfile::NamedTempFile::new()?;
    std::fs::write(
        probe.path(),
        "apiVersion: cairn.dev/v1alpha1\nkind: VirtualMachineCheckpoint\nmetadata:\n  name: policy-probe\n  namespace: default\n  labels:\n    cairn.dev/node: probe\nspec:\n  virtualMachine: probe\n",
    )?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let out = cp.kubectl_output(&[
            "create",
            "--dry-run=server",
            "-f",
            probe.path().to_str().unwrap(),
        ])?;
        if !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("set by Cairn only")
        {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "the cairn.dev/ metadata policy is not enforced after 60 s: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

/// Applies the checked-in CRDs and waits until they are established.
pub fn install_crds(cp: &ControlPlane) -> Result<()> {
    let manifests = crate::tools::repo_root().join("crds/manifests");
    let out = cp.kubectl_output(&["apply", "--server-side", "-f", manifests.to_str().unwrap()])?;
    if !out.status.success() {
        bail!(
            "installing CRDs failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = cp.kubectl_output(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd",
        "-l",
        "app.kubernetes.io/part-of=cairn",
    ])?;
    if !out.status.success() {
        bail!(
            "CRDs not established: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A client for the admin kubeconfig at `path`.
pub async fn client_for(path: &std::path::Path) -> Result<Client> {
    let kc = Kubeconfig::read_from(path)?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

/// One test's view: the shared control plane, an admin client and a namespace of its own.
pub struct TestEnv {
    /// The control plane.
    pub cp: &'static ControlPlane,
    /// Admin client.
    pub client: Client,
    /// A fresh namespace, deleted when the env is dropped.
    pub namespace: String,
}

impl TestEnv {
    /// Starts (or reuses) the control plane and creates a namespace named after `test`.
    pub async fn new(test: &str) -> Result<Self> {
        let cp = tokio::task::spawn_blocking(control_plane).await??;
        Self::on(cp, test).await
    }

    /// Starts (or reuses) the local cluster with operator and agents; a namespace for `test`.
    pub async fn with_cluster(test: &str) -> Result<(Self, &'static LocalCluster)> {
        let cluster = tokio::task::spawn_blocking(local_cluster).await??;
        Ok((Self::on(&cluster.cp, test).await?, cluster))
    }

    /// A namespace for `test` on control plane `cp`.
    pub async fn on(cp: &'static ControlPlane, test: &str) -> Result<Self> {
        let client = client_for(&cp.kubeconfig).await?;
        let suffix: u32 = rand::random::<u32>() % 100_000;
        let namespace = format!("{}-{suffix}", test.replace('_', "-"));
        let ns: k8s_openapi::api::core::v1::Namespace =
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": namespace}
            }))?;
        Api::all(client.clone())
            .create(&Default::default(), &ns)
            .await
            .context("creating the test namespace")?;
        Ok(Self {
            cp,
            client,
            namespace,
        })
    }

    /// Runs kubectl in this env's namespace.
    pub fn kubectl(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.cp.tools.kubectl);
        c.arg(format!("--kubeconfig={}", self.cp.kubeconfig.display()))
            .arg(format!("--namespace={}", self.namespace))
            .args(args);
        c
    }

    /// Runs kubectl with `stdin` and returns (success, stdout, stderr).
    pub fn kubectl_stdin(&self, args: &[&str], stdin: &str) -> Result<(bool, String, String)> {
        use std::io::Write;
        let mut child = self
            .kubectl(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        child.stdin.take().unwrap().write_all(stdin.as_bytes())?;
        let out = child.wait_with_output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// A kubeconfig for a tenant of this namespace: ServiceAccount `sa`
    /// bound to the built-in `edit` role (which the chart's aggregated roles
    /// extend to Cairn's kinds), authenticated with a TokenRequest token.
    pub fn tenant_kubeconfig(&self, sa: &str) -> Result<PathBuf> {
        let run = |args: &[&str]| -> Result<String> {
            let out = self.kubectl(args).output()?;
            if !out.status.success() {
                bail!(
                    "kubectl {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        };
        run(&["create", "serviceaccount", sa])?;
        run(&[
            "create",
            "rolebinding",
            &format!("{sa}-edit"),
            "--clusterrole=edit",
            &format!("--serviceaccount={}:{sa}", self.namespace),
        ])?;
        let token = run(&["create", "token", sa, "--duration=2h"])?;
        let path = self
            .cp
            .dir
            .join(format!("kubeconfig-{}-{sa}", self.namespace));
        crate::control_plane::write_kubeconfig(&path, &self.cp.server, &self.cp.ca_cert, &token)?;
        // Aggregation into `edit` is asynchronous (kube-controller-manager).
        let who = format!("system:serviceaccount:{}:{sa}", self.namespace);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let out = self
                .kubectl(&[
                    "auth",
                    "can-i",
                    "create",
                    "virtualmachinecheckpoints.cairn.dev",
                    "--as",
                    &who,
                ])
                .output()?;
            if String::from_utf8_lossy(&out.stdout).trim() == "yes" {
                return Ok(path);
            }
            if std::time::Instant::now() > deadline {
                bail!("{who} never got Cairn's rules through `edit`");
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }

    /// Runs kubectl as the tenant of `kubeconfig` in this env's namespace.
    pub fn kubectl_as(&self, kubeconfig: &std::path::Path, args: &[&str]) -> Command {
        let mut c = Command::new(&self.cp.tools.kubectl);
        c.arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!("--namespace={}", self.namespace))
            .args(args);
        c
    }

    /// Path of a file in the repository's `examples/`.
    pub fn example(name: &str) -> PathBuf {
        crate::tools::repo_root().join("examples").join(name)
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let _ = self
            .kubectl(&["delete", "namespace", &self.namespace, "--wait=false"])
            .output();
    }
}
