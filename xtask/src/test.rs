//! `cargo xtask test`: installs what the tests need (apt packages, Go-built
//! control plane, helm, the kstatus/Argo CD health checker), then runs every
//! test of the workspace.

use std::process::Command;

use anyhow::{Result, bail};
use cairn_e2e::tools::{ETCD_VERSION, K8S_VERSION, Tools};

pub fn run(cargo_args: &[String]) -> Result<()> {
    let tools = Tools::ensure()?;
    println!(
        "cairn test: kube-apiserver {K8S_VERSION} ({}), etcd {ETCD_VERSION} ({}), kubectl {}, helm {}, kstatus-checker {}",
        tools.kube_apiserver.display(),
        tools.etcd.display(),
        tools.kubectl.display(),
        tools.helm.display(),
        tools.kstatus_checker.display()
    );
    let qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()?;
    println!(
        "cairn test: {}",
        String::from_utf8_lossy(&qemu.stdout)
            .lines()
            .next()
            .unwrap_or("qemu: unknown")
    );
    crate::crdgen::run(true)?;

    // Build the binaries the end-to-end tests run as real processes.
    cargo(&["build", "--workspace", "--bins"])?;
    let mut args = vec!["test", "--workspace", "--no-fail-fast"];
    args.extend(cargo_args.iter().map(String::as_str));
    cargo(&args)
}

fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(args)
        .current_dir(cairn_e2e::tools::repo_root())
        .status()?;
    if !status.success() {
        bail!("cargo {} failed with {status}", args.join(" "));
    }
    Ok(())
}
