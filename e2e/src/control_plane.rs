//! A real Kubernetes control plane on loopback: etcd, kube-apiserver (RBAC on)
//! and kube-controller-manager (namespace deletion, garbage collection, service
//! account tokens), with a CA and an admin kubeconfig of its own.
//!
//! Processes are started either detached (for `cargo xtask cluster up`, stopped
//! by [`stop_recorded`]) or tied to an owner process by a small watchdog, so a
//! test binary that exits never leaves a control plane behind.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine;

use crate::tools::Tools;

/// User name of the local cluster's operator processes: Cairn's own
/// identity, the one the `cairn.dev/` metadata admission policy lets through
/// (the admin kubeconfig's user is not).
pub const OPERATOR_USER: &str = "cairn-operator";
/// User name of the local cluster's agent processes.
pub const AGENT_USER: &str = "cairn-agent";
const OPERATOR_TOKEN: &str = "cairn-operator-token";
const AGENT_TOKEN: &str = "cairn-agent-token";

/// A running control plane.
#[derive(Clone, Debug)]
pub struct ControlPlane {
    /// Directory with certificates, data, logs and the kubeconfig.
    pub dir: PathBuf,
    /// Admin kubeconfig (group `system:masters`).
    pub kubeconfig: PathBuf,
    /// `https://127.0.0.1:<port>`.
    pub server: String,
    /// CA certificate that signed the API server's serving certificate.
    pub ca_cert: PathBuf,
    /// Private key service-account tokens are signed with.
    pub sa_key: PathBuf,
    /// Tools the control plane runs with.
    pub tools: Tools,
    /// kube-apiserver's command line, kept so [`ControlPlane::restart_apiserver`] can reuse it.
    pub apiserver_args: Vec<String>,
    /// Process that owns the control plane (its death stops everything), if any.
    pub owner: Option<u32>,
}

/// Picks a free TCP port on loopback.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Starts `program args` with output to `log`, recording its pid in `dir/pids`.
/// With `owner`, a watchdog kills it once the owner process is gone.
pub fn spawn_service(
    dir: &Path,
    name: &str,
    program: &Path,
    args: &[String],
    envs: &[(&str, String)],
    owner: Option<u32>,
) -> Result<u32> {
    let logs = dir.join("logs");
    fs::create_dir_all(&logs)?;
    // Appended, so a restarted service keeps the log of its predecessor.
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(logs.join(format!("{name}.log")))?;
    let mut cmd = match owner {
        // The watchdog runs the service in the background and polls its owner;
        // `exec` is avoided so it can outlive and then kill the service.
        Some(owner) => {
            let mut c = Command::new("bash");
            c.arg("-c")
                .arg(
                    r#"owner=$1; shift; "$@" & child=$!
trap 'kill $child 2>/dev/null; exit 0' TERM INT
while kill -0 "$owner" 2>/dev/null && kill -0 "$child" 2>/dev/null; do sleep 0.5; done
kill "$child" 2>/dev/null; sleep 2; kill -9 "$child" 2>/dev/null; wait "$child" 2>/dev/null"#,
                )
                .arg("watchdog")
                .arg(owner.to_string())
                .arg(program)
                .args(args);
            c
        }
        None => {
            let mut c = Command::new(program);
            c.args(args);
            c
        }
    };
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {name} ({})", program.display()))?;
    let pid = child.id();
    let mut pids = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("pids"))?;
    use std::io::Write;
    writeln!(pids, "{pid} {name}")?;
    // The child is reaped by `stop_recorded` or by init; forgetting it is deliberate.
    std::mem::forget(child);
    Ok(pid)
}

use std::os::unix::process::CommandExt;

/// Stops every process recorded in `dir/pids` (their whole process groups), newest first.
pub fn stop_recorded(dir: &Path) -> Result<()> {
    let Ok(text) = fs::read_to_string(dir.join("pids")) else {
        return Ok(());
    };
    let pids: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for pid in pids.iter().rev() {
        let _ = Command::new("kill")
            .arg("--")
            .arg(format!("-{pid}"))
            .status();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for pid in pids.iter().rev() {
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            if fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z ")) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("kill")
            .args(["-9", "--", &format!("-{pid}")])
            .stderr(Stdio::null())
            .status();
    }
    fs::remove_file(dir.join("pids"))?;
    Ok(())
}

/// The pid most recently recorded in `dir/pids` under `name`.
pub fn recorded_pid(dir: &Path, name: &str) -> Result<u32> {
    let text = fs::read_to_string(dir.join("pids"))
        .with_context(|| format!("reading {}", dir.join("pids").display()))?;
    text.lines()
        .rev()
        .find_map(|l| {
            let mut parts = l.split_whitespace();
            let pid = parts.next()?;
            (parts.next() == Some(name)).then(|| pid.parse().ok())?
        })
        .with_context(|| format!("no process {name} recorded in {}", dir.display()))
}

/// Kills the process recorded as `name` in `dir/pids` (its whole process group,
/// with SIGKILL, like a crash) and waits until it is gone.
pub fn kill_recorded(dir: &Path, name: &str) -> Result<u32> {
    let pid = recorded_pid(dir, name)?;
    let _ = Command::new("kill")
        .args(["-9", "--", &format!("-{pid}")])
        .stderr(Stdio::null())
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let gone = match fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(s) => s.contains(") Z "),
        };
        if gone {
            return Ok(pid);
        }
        if Instant::now() > deadline {
            bail!("{name} (pid {pid}) did not die");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sh(script: &str, cwd: &Path) -> Result<()> {
    let out = Command::new("bash")
        .arg("-ec")
        .arg(script)
        .current_dir(cwd)
        .output()?;
    if !out.status.success() {
        bail!(
            "`{script}` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn make_certs(pki: &Path) -> Result<()> {
    fs::create_dir_all(pki)?;
    sh(
        r#"
openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj "/CN=cairn-test-ca" \
  -keyout ca.key -out ca.crt 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" -keyout apiserver.key -out apiserver.csr 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\n' > ext.cnf
openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 \
  -extfile ext.cnf -out apiserver.crt 2>/dev/null
openssl genrsa -out sa.key 2048 2>/dev/null
openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
"#,
        pki,
    )
}

/// Writes a kubeconfig for `server` that authenticates with a bearer `token`.
pub fn write_kubeconfig(path: &Path, server: &str, ca_cert: &Path, token: &str) -> Result<()> {
    let ca = fs::read(ca_cert)?;
    let ca_b64 = base64::engine::general_purpose::STANDARD.encode(ca);
    fs::write(
        path,
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: cairn
  cluster:
    server: {server}
    certificate-authority-data: {ca_b64}
users:
- name: cairn
  user:
    token: {token}
contexts:
- name: cairn
  context:
    cluster: cairn
    user: cairn
current-context: cairn
"
        ),
    )?;
    Ok(())
}

impl ControlPlane {
    /// Starts etcd, kube-apiserver and kube-controller-manager under `dir` and waits
    /// until the API server is ready. With `owner`, the processes die with that process.
    pub fn start(tools: &Tools, dir: &Path, owner: Option<u32>) -> Result<Self> {
        fs::create_dir_all(dir)?;
        let dir = dir.canonicalize()?;
        let pki = dir.join("pki");
        make_certs(&pki)?;
        let token = "cairn-admin-token";
        fs::write(
            pki.join("tokens.csv"),
            format!(
                "{token},cairn-admin,cairn-admin,\"system:masters\"\n\
                 {OPERATOR_TOKEN},{OPERATOR_USER},{OPERATOR_USER},\"system:masters\"\n\
                 {AGENT_TOKEN},{AGENT_USER},{AGENT_USER},\"system:masters\"\n"
            ),
        )?;

        let etcd_port = free_port()?;
        let peer_port = free_port()?;
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        spawn_service(
            &dir,
            "etcd",
            &tools.etcd,
            &[
                format!("--data-dir={}", dir.join("etcd").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=default={peer_url}"),
                "--name=default".into(),
                "--log-level=warn".into(),
                "--unsafe-no-fsync".into(),
                "--quota-backend-bytes=4294967296".into(),
            ],
            &[],
            owner,
        )?;

        let port = free_port()?;
        let server = format!("https://127.0.0.1:{port}");
        let p = |f: &str| pki.join(f).display().to_string();
        let apiserver_args = vec![
            format!("--etcd-servers={etcd_url}"),
            format!("--secure-port={port}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--tls-cert-file={}", p("apiserver.crt")),
            format!("--tls-private-key-file={}", p("apiserver.key")),
            format!("--client-ca-file={}", p("ca.crt")),
            format!("--token-auth-file={}", p("tokens.csv")),
            "--authorization-mode=RBAC".into(),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            format!("--service-account-key-file={}", p("sa.pub")),
            format!("--service-account-signing-key-file={}", p("sa.key")),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            "--allow-privileged=true".into(),
            "--profiling=false".into(),
            format!("--cert-dir={}", dir.join("apiserver-certs").display()),
        ];
        spawn_service(
            &dir,
            "kube-apiserver",
            &tools.kube_apiserver,
            &apiserver_args,
            &[],
            owner,
        )?;

        let kubeconfig = dir.join("kubeconfig");
        write_kubeconfig(&kubeconfig, &server, &pki.join("ca.crt"), token)?;
        write_kubeconfig(
            &dir.join("kubeconfig-operator"),
            &server,
            &pki.join("ca.crt"),
            OPERATOR_TOKEN,
        )?;
        write_kubeconfig(
            &dir.join("kubeconfig-agent"),
            &server,
            &pki.join("ca.crt"),
            AGENT_TOKEN,
        )?;
        let cp = Self {
            dir: dir.clone(),
            kubeconfig,
            server,
            ca_cert: pki.join("ca.crt"),
            sa_key: pki.join("sa.key"),
            tools: tools.clone(),
            apiserver_args,
            owner,
        };
        cp.wait_ready(Duration::from_secs(90))?;

        spawn_service(
            &dir,
            "kube-controller-manager",
            &tools.kube_controller_manager,
            &[
                format!("--kubeconfig={}", cp.kubeconfig.display()),
                format!("--authentication-kubeconfig={}", cp.kubeconfig.display()),
                format!("--authorization-kubeconfig={}", cp.kubeconfig.display()),
                "--leader-elect=false".into(),
                format!("--service-account-private-key-file={}", p("sa.key")),
                format!("--root-ca-file={}", p("ca.crt")),
                "--controllers=namespace,garbagecollector,serviceaccount,serviceaccount-token,clusterrole-aggregation".into(),
                "--use-service-account-credentials=false".into(),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={}", free_port()?),
            ],
            &[],
            owner,
        )?;
        Ok(cp)
    }

    /// Waits until `/readyz` answers ok.
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.kubectl_output(&["get", "--raw", "/readyz"]);
            if let Ok(o) = &out
                && o.status.success()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                let log = fs::read_to_string(self.dir.join("logs/kube-apiserver.log"))
                    .unwrap_or_default();
                let tail: String = log
                    .lines()
                    .rev()
                    .take(30)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n");
                bail!("kube-apiserver not ready after {timeout:?}; log tail:\n{tail}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Kubeconfig of Cairn's operator ([`OPERATOR_USER`], also `system:masters`).
    pub fn operator_kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig-operator")
    }

    /// Kubeconfig of Cairn's agents ([`AGENT_USER`], also `system:masters`).
    pub fn agent_kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig-agent")
    }

    /// Runs kubectl with the admin kubeconfig and returns its output.
    pub fn kubectl_output(&self, args: &[&str]) -> std::io::Result<std::process::Output> {
        Command::new(&self.tools.kubectl)
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(args)
            .output()
    }

    /// Runs kubectl with the admin kubeconfig; fails with kubectl's stderr,
    /// saying `what` failed, when it does not succeed.
    pub fn kubectl_checked(&self, what: &str, args: &[&str]) -> Result<std::process::Output> {
        let out = self.kubectl_output(args)?;
        if !out.status.success() {
            bail!("{what} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(out)
    }

    /// The API server's version string (`gitVersion`).
    pub fn server_version(&self) -> Result<String> {
        let out = self.kubectl_output(&["version", "-o", "json"])?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok(v["serverVersion"]["gitVersion"]
            .as_str()
            .unwrap_or("unknown")
            .to_string())
    }

    /// Kills kube-apiserver (SIGKILL, as a crash would) and starts it again with
    /// the same arguments on the same port; returns once `/readyz` answers.
    /// Clients see their connections and watches break and must recover.
    pub fn restart_apiserver(&self) -> Result<()> {
        kill_recorded(&self.dir, "kube-apiserver")?;
        // The watchdog dies first; the server's socket closes a moment later.
        let addr = self
            .server
            .trim_start_matches("https://")
            .trim_end_matches('/')
            .to_string();
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpListener::bind(&addr).is_err() {
            if Instant::now() > deadline {
                bail!("{addr} still in use 30 s after kube-apiserver was killed");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        spawn_service(
            &self.dir,
            "kube-apiserver",
            &self.tools.kube_apiserver,
            &self.apiserver_args,
            &[],
            self.owner,
        )?;
        self.wait_ready(Duration::from_secs(90))
    }

    /// Stops every process this control plane started.
    pub fn stop(&self) -> Result<()> {
        stop_recorded(&self.dir)
    }
}
