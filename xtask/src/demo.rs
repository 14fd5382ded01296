//! `cargo xtask demo`: Cairn's main job on an embedded local control plane.
//!
//! Starts the local cluster (etcd, kube-apiserver, the operator, one agent),
//! boots a guestless QEMU VM whose QMP socket the agent discovers, writes data
//! into it, takes a full and an incremental backup with `kubectl apply`,
//! restores the chain with `cairn-agent restore` and checks the result byte for
//! byte against what was written; then takes a full and an incremental backup
//! into the encrypted S3 repository `local-s3` and restores both snapshots with
//! only the storage settings and the key. Prints each command and a short report.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use cairn_e2e::local_cluster::{LocalCluster, binary};
use cairn_e2e::vm::TestVm;
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;
const DISK: u64 = 256 * MIB;

pub fn run() -> Result<()> {
    let started = Instant::now();
    let dir = crate::cluster::state_dir();
    LocalCluster::down(&dir)?;
    let _ = std::fs::remove_dir_all(&dir);
    crate::cluster::build_binaries()?;
    let cluster = LocalCluster::up(&dir, 1, None)?;
    let result = demo(&cluster, started);
    LocalCluster::down(&dir)?;
    match &result {
        Ok(()) => println!(
            "\ncluster stopped; state and logs kept in {}",
            dir.display()
        ),
        Err(_) => eprintln!(
            "\ndemo failed; logs are in {}/logs and {}/control-plane/logs",
            dir.display(),
            dir.display()
        ),
    }
    result
}

struct Kubectl<'a>(&'a LocalCluster);

impl Kubectl<'_> {
    fn run(&self, args: &[&str]) -> Result<String> {
        println!("$ kubectl {}", args.join(" "));
        let out = Command::new(&self.0.cp.tools.kubectl)
            .arg(format!("--kubeconfig={}", self.0.cp.kubeconfig.display()))
            .args(args)
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "kubectl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        print!("{text}");
        Ok(text)
    }

    fn apply(&self, yaml: &str) -> Result<()> {
        println!("$ kubectl apply -f - <<EOF\n{}EOF", yaml);
        let mut child = Command::new(&self.0.cp.tools.kubectl)
            .arg(format!("--kubeconfig={}", self.0.cp.kubeconfig.display()))
            .args(["apply", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()?;
        use std::io::Write;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(yaml.as_bytes())?;
        ensure!(child.wait()?.success(), "kubectl apply failed");
        Ok(())
    }
}

fn step(name: &str) {
    println!("\n== {name}");
}

fn demo(cluster: &LocalCluster, started: Instant) -> Result<()> {
    let k = Kubectl(cluster);
    let node = &cluster.nodes[0];
    println!(
        "Cairn demo on kube-apiserver {} ({})",
        cluster.cp.server_version()?,
        cluster.cp.server
    );
    print!("{}", cluster.exports());

    step("A VM appears: QEMU with its QMP socket where the agent looks");
    k.run(&["create", "namespace", "demo"])?;
    let vm_dir = cluster.state_dir.join("vms");
    let vm = TestVm::start(
        &cluster.qmp_dir(node),
        "demo",
        "vm1",
        &vm_dir,
        &[("disk0", "qcow2", DISK)],
    )?;
    println!(
        "started qemu-system-x86_64 with -qmp unix:{}",
        vm.agent_socket.display()
    );
    k.run(&[
        "wait",
        "--for=create",
        "qemuinstance/vm1",
        "-n",
        "demo",
        "--timeout=60s",
    ])?;
    k.run(&[
        "wait",
        "--for=jsonpath={.status.runState}=running",
        "qemuinstance/vm1",
        "-n",
        "demo",
        "--timeout=60s",
    ])?;
    k.run(&["get", "qemuinstances", "-n", "demo"])?;

    step("The guest writes 64 MiB");
    let mut disk = vec![0u8; DISK as usize];
    let write = |disk: &mut [u8], pattern: u8, offset: u64, len: u64| -> Result<()> {
        vm.write("disk0", pattern, offset, len)?;
        disk[offset as usize..(offset + len) as usize].fill(pattern);
        Ok(())
    };
    for i in 0..16u64 {
        write(&mut disk, 0x10 + i as u8, i * 16 * MIB, 4 * MIB)?;
    }

    let target = cluster.backup_dir(node).join("demo/vm1");
    step("Full backup, starting checkpoint cp-full in the same instant");
    let t = Instant::now();
    k.apply(&backup("full-1", None, "cp-full", &target))?;
    k.run(&[
        "wait",
        "--for=jsonpath={.status.phase}=Succeeded",
        "vmbackup/full-1",
        "-n",
        "demo",
        "--timeout=120s",
    ])?;
    let full_time = t.elapsed();
    let full_sha = hex(&Sha256::digest(&disk));

    step("The guest writes 8 MiB more");
    write(&mut disk, 0xaa, 100 * MIB, 4 * MIB)?;
    write(&mut disk, 0xbb, 200 * MIB, 4 * MIB)?;

    step("Incremental backup: only what changed since cp-full");
    let t = Instant::now();
    k.apply(&backup("inc-1", Some("cp-full"), "cp-inc-1", &target))?;
    k.run(&[
        "wait",
        "--for=jsonpath={.status.phase}=Succeeded",
        "vmbackup/inc-1",
        "-n",
        "demo",
        "--timeout=120s",
    ])?;
    let inc_time = t.elapsed();
    let inc_sha = hex(&Sha256::digest(&disk));
    k.run(&["get", "cairn", "-n", "demo"])?;
    let copied = k.run(&[
        "get",
        "vmbackup",
        "inc-1",
        "-n",
        "demo",
        "-o",
        "jsonpath={.status.disks[0].bytesCopied}",
    ])?;
    println!();

    step("The agent verifies each backup after it succeeded: file checksums recorded");
    for name in ["full-1", "inc-1"] {
        k.run(&[
            "wait",
            "--for=condition=Verified",
            &format!("vmbackup/{name}"),
            "-n",
            "demo",
            "--timeout=120s",
        ])?;
    }
    k.run(&[
        "get",
        "vmbackup",
        "-n",
        "demo",
        "-o",
        "custom-columns=NAME:.metadata.name,FILE:.status.disks[0].target,SHA256:.status.disks[0].sha256",
    ])?;

    step("Restore both points and verify them against what the guest wrote");
    let restore_dir = cluster.state_dir.join("restored");
    std::fs::create_dir_all(&restore_dir)?;
    let mut rows = Vec::new();
    for (name, expected) in [("full-1", &full_sha), ("inc-1", &inc_sha)] {
        // Backup files are keyed by the backup's UID: <name>.<uid>.manifest.json.
        let uid = k.run(&[
            "get",
            "vmbackup",
            name,
            "-n",
            "demo",
            "-o",
            "jsonpath={.metadata.uid}",
        ])?;
        let manifest = target.join(format!("{name}.{}.manifest.json", uid.trim()));
        let out = restore_dir.join(format!("{name}.raw"));
        let t = Instant::now();
        println!(
            "$ cairn-agent restore --manifest {} --output {} --format raw",
            manifest.display(),
            out.display()
        );
        let o = Command::new(binary("cairn-agent"))
            .args(["restore", "--format", "raw", "--manifest"])
            .arg(&manifest)
            .arg("--output")
            .arg(&out)
            .output()?;
        ensure!(
            o.status.success(),
            "restore of {name} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let printed = String::from_utf8_lossy(&o.stdout).to_string();
        print!("{printed}");
        ensure!(
            printed.trim_end().ends_with("\tverified"),
            "restore of {name} did not verify its backup files: {printed}"
        );
        let took = t.elapsed();
        let actual = hex(&Sha256::digest(std::fs::read(&out)?));
        ensure!(
            &actual == expected,
            "restored {name} differs from the disk at backup time"
        );
        rows.push((name, took, actual));
    }

    println!("\n== Report");
    println!(
        "full backup (256 MiB disk, 64 MiB data): {:>7.2} s  apply → Succeeded",
        full_time.as_secs_f64()
    );
    println!(
        "incremental backup ({} bytes copied):  {:>7.2} s  apply → Succeeded",
        copied.trim(),
        inc_time.as_secs_f64()
    );
    for (name, time, sha) in rows {
        println!(
            "restore {name:<7} backup files verified; output sha256 {}… matches  {:>7.2} s",
            &sha[..16],
            time.as_secs_f64()
        );
    }
    println!("backup files: {}", list(&target)?);
    let repo_rows = repository_part(cluster, &k, &vm, &mut disk)?;
    for row in repo_rows {
        println!("{row}");
    }
    println!("{}", resource_restore(cluster, &k, node, &inc_sha)?);
    println!("demo took {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Restore as a resource: the incremental `inc-1` applied as a
/// VirtualMachineRestore, checked against the disk at its instant. Returns
/// the report line.
fn resource_restore(
    cluster: &LocalCluster,
    k: &Kubectl<'_>,
    node: &str,
    expected: &str,
) -> Result<String> {
    step("Restore as a resource: kubectl apply a VirtualMachineRestore of inc-1");
    let dir = cluster.backup_dir(node).join("demo/restored-by-resource");
    let t = Instant::now();
    k.apply(&format!(
        "apiVersion: cairn.dev/v1alpha1\nkind: VirtualMachineRestore\nmetadata:\n  name: restore-inc-1\n  namespace: demo\nspec:\n  source:\n    backup:\n      name: inc-1\n  target:\n    directory:\n      path: {}\n      format: raw\n",
        dir.display()
    ))?;
    k.run(&[
        "wait",
        "--for=jsonpath={.status.phase}=Succeeded",
        "vmrestore/restore-inc-1",
        "-n",
        "demo",
        "--timeout=180s",
    ])?;
    let took = t.elapsed();
    k.run(&["get", "vmrestore", "-n", "demo", "-o", "wide"])?;
    let status: serde_json::Value = serde_json::from_str(&k.run(&[
        "get",
        "vmrestore",
        "restore-inc-1",
        "-n",
        "demo",
        "-o",
        "jsonpath={.status.disks[0]}",
    ])?)?;
    println!();
    let path = status["path"].as_str().context("no status.disks[0].path")?;
    let actual = hex(&Sha256::digest(std::fs::read(path)?));
    ensure!(
        actual == expected && status["sha256"] == actual.as_str(),
        "the restored {path} differs from the disk at inc-1 (or from its status sha256)"
    );
    Ok(format!(
        "VirtualMachineRestore of inc-1: {:>6.2} s apply → Succeeded; {path} sha256 {}… matches",
        took.as_secs_f64(),
        &actual[..16]
    ))
}

/// Off the node: a full and an incremental backup into the encrypted
/// BackupRepository `local-s3` (the local S3 server), both restored with
/// `cairn-agent restore --repository` (no cluster needed) and compared with
/// what the guest wrote. Returns the report lines.
fn repository_part(
    cluster: &LocalCluster,
    k: &Kubectl<'_>,
    vm: &TestVm,
    disk: &mut [u8],
) -> Result<Vec<String>> {
    let repo = cairn_e2e::local_cluster::S3_REPOSITORY;
    step(&format!(
        "Off the node: full backup into BackupRepository {repo} (deduplicated, compressed, encrypted, on S3)"
    ));
    k.run(&["get", "backuprepositories"])?;
    let mut rows = Vec::new();
    let mut points = Vec::new();
    for (name, incremental, checkpoint) in [
        ("repo-full", None, "cp-repo-full"),
        ("repo-inc", Some("cp-repo-full"), "cp-repo-inc"),
    ] {
        if incremental.is_some() {
            step("The guest writes 4 MiB more; incremental into the repository reads only that");
            vm.write("disk0", 0xcc, 150 * MIB, 4 * MIB)?;
            disk[(150 * MIB) as usize..(154 * MIB) as usize].fill(0xcc);
        }
        let inc = incremental
            .map(|i| format!("  incremental: {i}\n"))
            .unwrap_or_default();
        let t = Instant::now();
        k.apply(&format!(
            "apiVersion: cairn.dev/v1alpha1\nkind: VirtualMachineBackup\nmetadata:\n  name: {name}\n  namespace: demo\nspec:\n  virtualMachine: vm1\n{inc}  checkpoint:\n    name: {checkpoint}\n  target:\n    repository:\n      name: {repo}\n"
        ))?;
        k.run(&[
            "wait",
            "--for=jsonpath={.status.phase}=Succeeded",
            &format!("vmbackup/{name}"),
            "-n",
            "demo",
            "--timeout=180s",
        ])?;
        let took = t.elapsed();
        let status: serde_json::Value = serde_json::from_str(&k.run(&[
            "get",
            "vmbackup",
            name,
            "-n",
            "demo",
            "-o",
            "jsonpath={.status.repository}",
        ])?)?;
        println!();
        let snapshot = status["snapshot"]
            .as_str()
            .context("no snapshot id in status.repository")?
            .to_string();
        rows.push(format!(
            "{name:<9} into {repo}: {:>6.2} s apply → Succeeded; read {} B, uploaded {} B, chunks new {} / reused {}",
            took.as_secs_f64(),
            status["bytesRead"],
            status["bytesUploaded"],
            status["chunksNew"],
            status["chunksReused"]
        ));
        points.push((name, snapshot, hex(&Sha256::digest(&*disk))));
    }

    step("Restore both snapshots with only the storage settings and the key");
    let s3 = &cluster.s3;
    let key = cairn_e2e::local_s3::s3_dir(&cluster.state_dir).join("local-s3.key");
    let location = format!("s3://{}?endpoint={}", s3.bucket, s3.endpoint);
    for (name, snapshot, expected) in points {
        let out = cluster.state_dir.join("restored").join(name);
        println!(
            "$ cairn-agent restore --repository {location} --snapshot {snapshot} --key-file {} --format raw --output {}",
            key.display(),
            out.display()
        );
        let t = Instant::now();
        let o = Command::new(binary("cairn-agent"))
            .args([
                "restore",
                "--repository",
                &location,
                "--snapshot",
                &snapshot,
            ])
            .arg("--key-file")
            .arg(&key)
            .args(["--format", "raw", "--overwrite", "--output"])
            .arg(&out)
            .env("AWS_ACCESS_KEY_ID", &s3.access_key_id)
            .env("AWS_SECRET_ACCESS_KEY", &s3.secret_access_key)
            .output()?;
        ensure!(
            o.status.success(),
            "restore of {name} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        print!("{}", String::from_utf8_lossy(&o.stdout));
        let actual = hex(&Sha256::digest(std::fs::read(out.join("disk0.raw"))?));
        ensure!(
            actual == expected,
            "restored {name} differs from the disk at backup time"
        );
        rows.push(format!(
            "restore {name:<9} every chunk authenticated; sha256 {}… matches  {:>6.2} s",
            &actual[..16],
            t.elapsed().as_secs_f64()
        ));
    }
    // The operator refreshes repository figures every minute; show what it has.
    k.run(&["get", "backuprepository", repo])?;
    Ok(rows)
}

fn backup(name: &str, incremental: Option<&str>, checkpoint: &str, dir: &Path) -> String {
    let inc = incremental
        .map(|i| format!("  incremental: {i}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: cairn.dev/v1alpha1\nkind: VirtualMachineBackup\nmetadata:\n  name: {name}\n  namespace: demo\nspec:\n  virtualMachine: vm1\n{inc}  checkpoint:\n    name: {checkpoint}\n  target:\n    directory:\n      path: {}\n",
        dir.display()
    )
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn list(dir: &Path) -> Result<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| {
            let len = e.metadata().map(|m| m.len()).unwrap_or(0);
            format!(
                "{} ({:.1} MiB)",
                e.file_name().to_string_lossy(),
                len as f64 / MIB as f64
            )
        })
        .collect();
    names.sort();
    Ok(names.join(", "))
}
