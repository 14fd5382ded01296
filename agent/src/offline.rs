//! Backups of a stopped VM: the agent opens the VM's images (its last-known
//! definition, as the agent recorded it) in a QEMU of its own whose CPUs
//! never start (`-S`), with the same node names and device ids, and runs the
//! very same push, pull and repository paths against it over QMP.
//!
//! Why not `qemu-nbd`: one QEMU gives every backup kind (push into qcow2
//! chains, pull, repository), the checkpoint in the same transaction and the
//! verified manifests without a second data path; `qemu-nbd --bitmap` could
//! only export. QEMU's image locks (a writer's `write` lock) make a VM that
//! is started during the backup fail at once ("Failed to get "write" lock"),
//! and the backup waits for nothing: the images cannot change under it.
//!
//! The helper's QMP socket and pid file live in `<runtime dir>/offline/`,
//! never in the discovery directory, so it is never taken for the VM. An
//! agent that restarts kills helpers a previous process left
//! ([`OfflineVm::kill_leftovers`]), releasing their locks.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};
use tracing::{info, warn};

use crate::checkpoint::Domain;
use crate::inventory::VmRef;
use crate::qmp::{QmpClient, QmpOptions};

/// Why a stopped VM's images cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    /// QEMU would not open the images (locked by a VM that started, missing, …).
    #[error("cannot open the images of stopped VM {vm}: {detail}")]
    Open {
        /// VM.
        vm: String,
        /// What QEMU said.
        detail: String,
    },
    /// Local I/O.
    #[error("offline helper for VM {vm}: {source}")]
    Io {
        /// VM.
        vm: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

impl OfflineError {
    /// Whether the images are held by another process (the VM started).
    pub fn is_locked(&self) -> bool {
        matches!(self, Self::Open { detail, .. } if detail.contains("lock"))
    }
}

/// A stopped VM's images, open in a paused QEMU of the agent's own.
pub struct OfflineVm {
    /// The VM (namespace and name as the real one), with the helper's socket.
    pub vm: VmRef,
    /// QMP session with the helper.
    pub client: QmpClient,
    child: Child,
    pid_file: PathBuf,
}

fn helper_dir(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join("offline")
}

impl OfflineVm {
    /// Opens `domain`'s disks for VM `namespace/name`.
    pub async fn start(
        runtime_dir: &Path,
        namespace: &str,
        name: &str,
        domain: &Domain,
        qmp: QmpOptions,
    ) -> Result<Self, OfflineError> {
        let vm_name = format!("{namespace}/{name}");
        let io = |source| OfflineError::Io {
            vm: vm_name.clone(),
            source,
        };
        let dir = helper_dir(runtime_dir);
        std::fs::create_dir_all(&dir).map_err(io)?;
        // Namespace and VM names are DNS labels/subdomains: no `/`, so one
        // file name per VM. A socket path must fit 108 bytes.
        let stem = format!("{namespace}_{name}");
        let socket = dir.join(format!("{stem}.sock"));
        let pid_file = dir.join(format!("{stem}.pid"));
        let _ = std::fs::remove_file(&socket);
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-S",
            "-machine",
            "q35,accel=kvm:tcg",
            "-nodefaults",
            "-display",
            "none",
            "-m",
            "16",
            "-name",
        ])
        .arg(format!("cairn-offline-{stem}"))
        .arg("-pidfile")
        .arg(&pid_file)
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", socket.display()));
        for d in &domain.disks {
            let file = d.file.to_str().ok_or_else(|| OfflineError::Open {
                vm: vm_name.clone(),
                detail: format!("image path {} is not UTF-8", d.file.display()),
            })?;
            // Bitmaps live in qcow2 images, which are opened writable (and
            // so locked against a VM start); other formats read-only.
            let ro = if d.format == "qcow2" { "off" } else { "on" };
            cmd.arg("-blockdev")
                .arg(format!(
                    "driver=file,filename={},node-name={}-cairn-file,read-only={ro}",
                    file.replace(',', ",,"),
                    d.node_name
                ))
                .arg("-blockdev")
                .arg(format!(
                    "driver={},file={n}-cairn-file,node-name={n},read-only={ro}",
                    d.format,
                    n = d.node_name
                ))
                .arg("-device")
                .arg(format!(
                    "virtio-blk-pci,drive={},id={}",
                    d.node_name, d.name
                ));
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(io)?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().map_err(io)? {
                let mut detail = String::new();
                if let Some(mut err) = child.stderr.take() {
                    let _ = tokio::io::AsyncReadExt::read_to_string(&mut err, &mut detail).await;
                }
                return Err(OfflineError::Open {
                    vm: vm_name,
                    detail: format!("{} ({status})", detail.trim()),
                });
            }
            if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                let _ = child.kill().await;
                return Err(OfflineError::Open {
                    vm: vm_name,
                    detail: "QEMU did not open its monitor within 30 s".into(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let client = QmpClient::connect(&socket, qmp)
            .await
            .map_err(|e| OfflineError::Open {
                vm: vm_name.clone(),
                detail: e.to_string(),
            })?;
        info!(vm = %vm_name, disks = domain.disks.len(), "opened a stopped VM's images for a backup");
        Ok(Self {
            vm: VmRef {
                namespace: namespace.into(),
                name: name.into(),
                socket,
            },
            client,
            child,
            pid_file,
        })
    }

    /// Closes the images: `quit` writes persistent bitmaps back (a
    /// checkpoint created by the backup), then the process ends.
    pub async fn stop(mut self) {
        if let Err(e) = self.client.quit().await {
            warn!(vm = %self.vm, error = %e, "quit failed; killing the offline helper");
            let _ = self.child.kill().await;
        }
        match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
            Ok(_) => {}
            Err(_) => {
                warn!(vm = %self.vm, "offline helper did not exit; killing it");
                let _ = self.child.kill().await;
            }
        }
        let _ = std::fs::remove_file(&self.vm.socket);
        let _ = std::fs::remove_file(&self.pid_file);
        info!(vm = %self.vm, "closed a stopped VM's images");
    }

    /// Kills helpers an earlier agent process left running (their pid files
    /// in `<runtime dir>/offline/`), so that their image locks go.
    pub fn kill_leftovers(runtime_dir: &Path) {
        let Ok(entries) = std::fs::read_dir(helper_dir(runtime_dir)) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().and_then(|x| x.to_str()) != Some("pid") {
                continue;
            }
            let pid = std::fs::read_to_string(&path)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok());
            // Only a process whose command line is one of our helpers: pids are reused.
            if let Some(pid) = pid
                && std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| c.windows(14).any(|w| w == b"cairn-offline-"))
            {
                warn!(pid, "killing an offline helper left by an earlier agent");
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                // Its image locks go with the process: wait for it.
                for _ in 0..250 {
                    if !Path::new(&format!("/proc/{pid}")).exists() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            let _ = std::fs::remove_file(&path);
        }
    }
}
