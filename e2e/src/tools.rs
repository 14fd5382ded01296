//! The real components Cairn's tests and demo run: QEMU 10 and NBD tools from
//! Debian packages, etcd, Kubernetes and the S3 server versitygw built from the
//! Go module proxy, helm from a PyPI wheel, the GitOps health checker (kstatus +
//! gopher-lua) from the Go module proxy. Heavy builds are cached by version
//! outside the work tree.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Kubernetes version the control plane is built at.
pub const K8S_VERSION: &str = "v1.34.4";
/// etcd version the control plane is built at.
pub const ETCD_VERSION: &str = "v3.6.16";
/// Version of sigs.k8s.io/cli-utils whose kstatus the health checker is built from.
pub const CLI_UTILS_VERSION: &str = "v0.37.2";
/// Version of the Lua interpreter Argo CD embeds, for the health checker.
pub const GOPHER_LUA_VERSION: &str = "v1.1.1";
/// Version of the PyPI wheel that carries helm.
pub const HELM_WHEEL_VERSION: &str = "2.0.0";
/// versitygw (S3-compatible server, Apache-2.0) version the local cluster runs.
pub const VERSITYGW_VERSION: &str = "v1.8.0";

/// Paths of the binaries a control plane needs.
#[derive(Clone, Debug)]
pub struct Tools {
    /// etcd server.
    pub etcd: PathBuf,
    /// kube-apiserver.
    pub kube_apiserver: PathBuf,
    /// kube-controller-manager (namespace deletion, garbage collection, service accounts).
    pub kube_controller_manager: PathBuf,
    /// kubectl of the same version as the API server.
    pub kubectl: PathBuf,
    /// helm.
    pub helm: PathBuf,
    /// `kstatus-checker`: kstatus and Argo CD's Lua health over an object's
    /// JSON (e2e/tools/kstatus-checker, built by build-kstatus-checker.sh).
    pub kstatus_checker: PathBuf,
    /// versitygw, the S3-compatible server of the local cluster's `local-s3` repository.
    pub versitygw: PathBuf,
}

/// Root of the repository (the workspace).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e/ lives in the workspace root")
        .to_path_buf()
}

/// Where built tools are cached: `$CAIRN_TOOLS_CACHE`, else `/var/cache/cairn-tools`
/// as root, else `~/.cache/cairn-tools`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CAIRN_TOOLS_CACHE") {
        return PathBuf::from(dir);
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false);
    if root {
        PathBuf::from("/var/cache/cairn-tools")
    } else {
        let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
        PathBuf::from(home).join(".cache/cairn-tools")
    }
}

impl Tools {
    /// The cached tool paths, without installing anything.
    pub fn cached() -> Self {
        let cache = cache_dir();
        let k8s = cache.join(format!("kubernetes-{K8S_VERSION}"));
        let helm = cache.join(format!("helm-wheel-{HELM_WHEEL_VERSION}"));
        Self {
            etcd: cache.join(format!("etcd-{ETCD_VERSION}/etcd")),
            kube_apiserver: k8s.join("kube-apiserver"),
            kube_controller_manager: k8s.join("kube-controller-manager"),
            kubectl: k8s.join("kubectl"),
            helm: helm.join("helm"),
            kstatus_checker: cache
                .join(format!("kstatus-checker-{CLI_UTILS_VERSION}"))
                .join("kstatus-checker"),
            versitygw: cache.join(format!("versitygw-{VERSITYGW_VERSION}/versitygw")),
        }
    }

    /// Installs or builds whatever is missing (apt packages, Go builds, helm) and
    /// returns the paths. Cheap when everything is cached.
    pub fn ensure() -> Result<Self> {
        let tools = Self::cached();
        let scripts = repo_root().join("e2e/tools");
        run_script(&scripts.join("install-packages.sh"), &[])?;
        if !(tools.etcd.exists()
            && tools.kube_apiserver.exists()
            && tools.kubectl.exists()
            && tools.kube_controller_manager.exists())
        {
            eprintln!(
                "building etcd {ETCD_VERSION} and kubernetes {K8S_VERSION} into {} (first run only; 10-25 minutes on 2 cores)",
                cache_dir().display()
            );
            run_script(
                &scripts.join("build-control-plane.sh"),
                &[cache_dir().to_str().context("cache dir is not UTF-8")?],
            )?;
        }
        if !tools.helm.exists() {
            run_script(
                &scripts.join("install-helm.sh"),
                &[cache_dir().to_str().context("cache dir is not UTF-8")?],
            )?;
        }
        // The script keys its cache by version and source, and returns at once when current.
        run_script(
            &scripts.join("build-kstatus-checker.sh"),
            &[cache_dir().to_str().context("cache dir is not UTF-8")?],
        )?;
        if !tools.versitygw.exists() {
            run_script(&scripts.join("install-versitygw.sh"), &[])?;
        }
        Ok(tools)
    }
}

/// Runs an install script; its output goes to stderr (stdout of `cargo xtask
/// cluster up` is for `export` lines only).
fn run_script(script: &Path, args: &[&str]) -> Result<()> {
    let status = Command::new("bash")
        .arg(script)
        .args(args)
        .env("CAIRN_TOOLS_CACHE", cache_dir())
        .env("CAIRN_K8S_VERSION", K8S_VERSION)
        .env("CAIRN_ETCD_VERSION", ETCD_VERSION)
        .env("CAIRN_HELM_WHEEL_VERSION", HELM_WHEEL_VERSION)
        .env("CAIRN_CLI_UTILS_VERSION", CLI_UTILS_VERSION)
        .env("CAIRN_GOPHER_LUA_VERSION", GOPHER_LUA_VERSION)
        .env("CAIRN_VERSITYGW_VERSION", VERSITYGW_VERSION)
        .stdout(std::io::stderr())
        .status()
        .with_context(|| format!("running {}", script.display()))?;
    if !status.success() {
        bail!("{} failed with {status}", script.display());
    }
    Ok(())
}
