//! The peer: virtnbdbackup on libvirt, on a copy of the same image. Guest
//! writes go through a second QMP monitor added to the domain with
//! `<qemu:commandline>` (libvirt marks the domain tainted; it does not matter
//! here), so both sides see the same simulated workload at the same speed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use cairn_agent::qmp::QmpClient;

use super::data::FRACTIONS;
use super::qemu::{copy_image, dirty, drop_caches, qmp_options, run};
use super::{Config, Samples};

const DOMAIN: &str = "cairn-bench-peer";
const QDEV: &str = "/machine/peripheral/virtio-disk0/virtio-backend";

/// What the peer measured.
#[derive(Default, serde::Serialize, serde::Deserialize)]
pub struct PeerResults {
    /// `virtnbdbackup -l full`.
    pub full: Samples,
    /// `virtnbdbackup -l inc` per dirty fraction.
    pub inc: [Samples; 3],
    /// Why the peer could not run, if it could not.
    pub unavailable: Option<String>,
}

fn virsh(args: &[&str]) -> Result<String> {
    run(Command::new("virsh")
        .arg("-c")
        .arg("qemu:///system")
        .args(args))
}

/// Installs (when root and missing) and starts libvirt; Err says why it cannot run.
pub fn ensure_libvirt() -> Result<()> {
    let script = cairn_e2e::tools::repo_root().join("e2e/tools/install-bench-packages.sh");
    let out = Command::new("bash").arg(&script).output()?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn domain_xml(image: &Path, monitor: &Path) -> String {
    format!(
        r#"<domain type='{kind}' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{DOMAIN}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='{image}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-qmp'/>
    <qemu:arg value='unix:{monitor},server=on,wait=off'/>
  </qemu:commandline>
</domain>
"#,
        kind = if Path::new("/dev/kvm").exists() {
            "kvm"
        } else {
            "qemu"
        },
        image = image.display(),
        monitor = monitor.display(),
    )
}

fn chown_qemu(path: &Path) -> Result<()> {
    run(Command::new("chown")
        .args(["-R", "libvirt-qemu:kvm"])
        .arg(path))?;
    Ok(())
}

fn virtnbdbackup(level: &str, out: &Path, scratch: &Path) -> Result<f64> {
    let t = Instant::now();
    run(Command::new("virtnbdbackup")
        .args(["-d", DOMAIN, "-l", level, "--noprogress", "-o"])
        .arg(out)
        .arg("--scratchdir")
        .arg(scratch)
        .arg("--socketfile")
        .arg(scratch.join("nbd.sock")))?;
    Ok(t.elapsed().as_secs_f64())
}

/// Full and incremental backups with virtnbdbackup, `cfg.runs` times.
pub async fn run_all(cfg: &Config, base: &Path, r: &mut PeerResults) -> Result<()> {
    ensure_libvirt()?;
    let work: PathBuf = cfg.work.join("peer");
    let _ = virsh(&["destroy", DOMAIN]);
    let _ = virsh(&["undefine", DOMAIN, "--checkpoints-metadata"]);
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    // libvirt-qemu must reach the image: every parent directory traversable.
    let mut p = work.clone();
    while p.pop() {
        let _ = Command::new("chmod").arg("o+x").arg(&p).status();
    }
    let image = work.join("peer.qcow2");
    copy_image(base, &image)?;
    let scratch = work.join("scratch");
    std::fs::create_dir_all(&scratch)?;
    let monitor = scratch.join("writer.sock");
    chown_qemu(&work)?;
    let xml = work.join("domain.xml");
    std::fs::write(&xml, domain_xml(&image, &monitor))?;
    virsh(&["define", xml.to_str().context("path")?])?;
    virsh(&["start", DOMAIN])?;
    let result = async {
        let writer = QmpClient::connect(&monitor, qmp_options()).await?;
        for run_no in 0..cfg.runs {
            eprintln!("bench: virtnbdbackup run {}/{}", run_no + 1, cfg.runs);
            let out = work.join(format!("backup-{run_no}"));
            drop_caches();
            r.full.push(virtnbdbackup("full", &out, &scratch)?);
            for (i, f) in FRACTIONS.iter().enumerate() {
                dirty(
                    &writer,
                    QDEV,
                    cfg.disk_size,
                    *f,
                    (run_no * 10 + i) as u64 + 1,
                )
                .await?;
                drop_caches();
                r.inc[i].push(virtnbdbackup("inc", &out, &scratch)?);
            }
            std::fs::remove_dir_all(&out)?;
        }
        anyhow::Ok(())
    }
    .await;
    let _ = virsh(&["destroy", DOMAIN]);
    let _ = virsh(&["undefine", DOMAIN, "--checkpoints-metadata"]);
    let _ = std::fs::remove_dir_all(&work);
    result
}
