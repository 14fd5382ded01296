//! A tenant attacks other namespaces through every path and name it controls,
//! on the real control plane with the real operator, agent and QEMU. The
//! tenant acts with a TokenRequest token of a ServiceAccount bound to the
//! chart's own tenant ClusterRole (`<release>-edit`, rendered from the chart).
//! Each case asserts the refusal reason and that nothing changed for the
//! victim (files listed, sockets by inode and still connectable).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use cairn_api::{BackupPhase, VirtualMachineBackup};
use cairn_e2e::harness::TestEnv;
use cairn_e2e::scenario::*;
use cairn_e2e::tools::repo_root;
use cairn_e2e::wait;
use kube::{Api, ResourceExt};

/// kubectl authenticated only by the tenant's bearer token.
struct Tenant {
    kubectl: PathBuf,
    server: String,
    ca: PathBuf,
    token: String,
    namespace: String,
    empty_config: tempfile::NamedTempFile,
}

impl Tenant {
    /// A ServiceAccount `tenant` in `env`'s namespace bound (RoleBinding) to
    /// the chart's tenant ClusterRole, and a TokenRequest token for it.
    fn new(env: &TestEnv) -> Result<Tenant> {
        let suffix = env.namespace.rsplit('-').next().unwrap().to_string();
        let fullname = format!("cairn-ta-{suffix}");
        let out = Command::new(&env.cp.tools.helm)
            .args(["template", "t"])
            .arg(repo_root().join("charts/cairn"))
            .args([
                "--show-only",
                "templates/aggregated-roles.yaml",
                "--set",
                &format!("fullnameOverride={fullname}"),
            ])
            .env(
                "HELM_CACHE_HOME",
                std::env::temp_dir().join("ta-helm/cache"),
            )
            .env(
                "HELM_CONFIG_HOME",
                std::env::temp_dir().join("ta-helm/config"),
            )
            .env("HELM_DATA_HOME", std::env::temp_dir().join("ta-helm/data"))
            .env_remove("KUBECONFIG")
            .output()?;
        ensure!(
            out.status.success(),
            "helm template: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let roles = String::from_utf8_lossy(&out.stdout).to_string();
        ensure!(roles.contains(&format!("{fullname}-edit")), "{roles}");
        apply(env, &roles)?;
        kubectl(env, &["create", "serviceaccount", "tenant"])?;
        kubectl(
            env,
            &[
                "create",
                "rolebinding",
                "tenant",
                &format!("--clusterrole={fullname}-edit"),
                &format!("--serviceaccount={}:tenant", env.namespace),
            ],
        )?;
        let token = kubectl(env, &["create", "token", "tenant", "--duration=1h"])?;
        Ok(Tenant {
            kubectl: env.cp.tools.kubectl.clone(),
            server: env.cp.server.clone(),
            ca: env.cp.ca_cert.clone(),
            token: token.trim().to_string(),
            namespace: env.namespace.clone(),
            empty_config: tempfile::NamedTempFile::new()?,
        })
    }

    /// `kubectl apply` as the tenant; `(ok, stdout + stderr)`.
    fn apply(&self, yaml: &str) -> Result<(bool, String)> {
        self.run(&["apply", "-f", "-"], yaml)
    }

    fn run(&self, args: &[&str], stdin: &str) -> Result<(bool, String)> {
        use std::io::Write;
        let mut child = Command::new(&self.kubectl)
            .arg(format!(
                "--kubeconfig={}",
                self.empty_config.path().display()
            ))
            .arg(format!("--server={}", self.server))
            .arg(format!("--certificate-authority={}", self.ca.display()))
            .arg(format!("--token={}", self.token))
            .arg(format!("--namespace={}", self.namespace))
            .args(args)
            .env_remove("KUBECONFIG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child.stdin.take().unwrap().write_all(stdin.as_bytes())?;
        let out = child.wait_with_output()?;
        Ok((
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ))
    }

    fn must_apply(&self, yaml: &str) -> Result<()> {
        let (ok, out) = self.apply(yaml)?;
        ensure!(ok, "tenant apply failed: {out}\n{yaml}");
        Ok(())
    }

    fn delete(&self, kind: &str, name: &str) -> Result<()> {
        let (ok, out) = self.run(&["delete", kind, name, "--timeout=60s"], "")?;
        ensure!(ok, "tenant delete {kind} {name}: {out}");
        Ok(())
    }
}

/// `(reason, message)` of the Ready condition of a Failed backup.
async fn failure(env: &TestEnv, name: &str) -> Result<(String, String)> {
    let b = wait_backup(env, name, BackupPhase::Failed).await?;
    let c = condition(&b.status.unwrap_or_default().conditions, "Ready")
        .cloned()
        .context("Ready")?;
    Ok((c.reason, c.message))
}

fn tree(dir: &Path) -> Vec<String> {
    fn walk(dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            out.push(p.display().to_string());
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                walk(&p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, &mut out);
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn push_paths_stay_in_the_tenants_namespace() -> Result<()> {
    let (env, cluster) = TestEnv::with_cluster("ta-push").await?;
    let (victim, _) = TestEnv::with_cluster("ta-victim").await?;
    let vm = start_vm1(cluster, &env, 8 * MIB).await?;
    let tenant = Tenant::new(&env)?;
    let root = cluster.backup_dir("node-1");
    let own = root.join(&env.namespace);
    let theirs = root.join(&victim.namespace);
    std::fs::create_dir_all(theirs.join("vm1"))?;
    std::fs::write(theirs.join("vm1/keep"), b"victim data")?;
    let outside = cluster.state_dir.join(format!("outside-{}", env.namespace));
    std::fs::create_dir_all(&outside)?;
    std::fs::create_dir_all(&own)?;
    std::os::unix::fs::symlink(&outside, own.join("link"))?;
    let before = (tree(&theirs), tree(&outside));

    let cases = [
        ("into-victim", theirs.join("vm1")),
        ("new-in-victim", theirs.join("new")),
        ("root", root.join("x")),
        ("symlink", own.join("link/sub")),
    ];
    for (name, path) in &cases {
        tenant.must_apply(&backup_yaml(name, "vm1", &push_extra(path, None, None)))?;
    }
    for (name, path) in &cases {
        let (reason, message) = failure(&env, name).await?;
        assert_eq!(reason, "TargetNotAllowed", "{name}: {message}");
        assert!(
            message.contains(&path.display().to_string())
                && message.contains(&format!("{}/", own.display())),
            "{name}: {message}"
        );
    }
    let (_, message) = failure(&env, "symlink").await?;
    assert!(message.contains("symlink"), "{message}");
    // `..` in every path field: refused at admission, or by the agent.
    for (name, extra) in [
        (
            "dots-dir",
            format!(
                "  target:\n    directory:\n      path: {}/../{}/vm1\n",
                own.display(),
                victim.namespace
            ),
        ),
        (
            "dots-sock",
            format!(
                "  mode: Pull\n  target:\n    nbd:\n      unixSocket:\n        path: {}/../{}/x.sock\n",
                cluster.export_dir("node-1").join(&env.namespace).display(),
                victim.namespace
            ),
        ),
    ] {
        let (ok, out) = tenant.apply(&backup_yaml(name, "vm1", &extra))?;
        if ok {
            let (reason, message) = failure(&env, name).await?;
            assert_eq!(reason, "TargetNotAllowed", "{name}: {message}");
        } else {
            assert!(out.contains(".."), "{name}: {out}");
        }
    }
    assert_eq!((tree(&theirs), tree(&outside)), before, "victim changed");
    assert_eq!(std::fs::read(theirs.join("vm1/keep"))?, b"victim data");
    assert!(leftovers(&vm)?.is_empty(), "{:?}", leftovers(&vm)?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn pull_socket_cannot_take_another_namespaces_qmp_socket() -> Result<()> {
    let (env, cluster) = TestEnv::with_cluster("ta-pull").await?;
    let (victim, _) = TestEnv::with_cluster("ta-pvictim").await?;
    let vm = start_vm1(cluster, &env, 8 * MIB).await?;
    let victim_vm = start_vm1(cluster, &victim, 8 * MIB).await?;
    let tenant = Tenant::new(&env)?;
    let victim_socket = cluster
        .qmp_dir("node-1")
        .join(&victim.namespace)
        .join("vm1.sock");
    let ino = std::fs::symlink_metadata(&victim_socket)?.ino();
    let own_exports = cluster.export_dir("node-1").join(&env.namespace);
    for (name, path) in [
        ("steal-qmp", victim_socket.clone()),
        (
            "other-exports",
            cluster
                .export_dir("node-1")
                .join(&victim.namespace)
                .join("x.sock"),
        ),
    ] {
        tenant.must_apply(&backup_yaml(
            name,
            "vm1",
            &format!(
                "  mode: Pull\n  target:\n    nbd:\n      unixSocket:\n        path: {}\n",
                path.display()
            ),
        ))?;
        let (reason, message) = failure(&env, name).await?;
        assert_eq!(reason, "TargetNotAllowed", "{name}: {message}");
        assert!(
            message.contains(&path.display().to_string())
                && message.contains(&own_exports.display().to_string()),
            "{message}"
        );
    }
    assert_eq!(
        std::fs::symlink_metadata(&victim_socket)?.ino(),
        ino,
        "victim socket replaced"
    );
    std::os::unix::net::UnixStream::connect(&victim_socket)
        .context("victim QMP socket no longer connectable")?;
    assert!(leftovers(&victim_vm)?.is_empty());
    wait_instance(&victim, "vm1", "node-1").await?;

    // The default socket: <export dir>/<ns>/<backup>.sock, 0660 in a 0750 dir;
    // exportTimeoutSeconds ends it Succeeded (ExportClosed), nothing left.
    tenant.must_apply(&backup_yaml(
        "mine",
        "vm1",
        "  mode: Pull\n  exportTimeoutSeconds: 5\n",
    ))?;
    let b = wait_backup(&env, "mine", BackupPhase::Exporting).await?;
    let sock = own_exports.join("mine.sock");
    let url = b
        .status
        .as_ref()
        .and_then(|s| s.export.as_ref())
        .context("export")?;
    assert!(url.url.contains(&sock.display().to_string()), "{}", url.url);
    assert_eq!(
        std::fs::symlink_metadata(&sock)?.permissions().mode() & 0o777,
        0o660
    );
    assert_eq!(
        std::fs::metadata(&own_exports)?.permissions().mode() & 0o777,
        0o750
    );
    let b = wait_backup(&env, "mine", BackupPhase::Succeeded).await?;
    let ready = condition(&b.status.unwrap_or_default().conditions, "Ready")
        .cloned()
        .context("Ready")?;
    assert_eq!(ready.reason, "ExportClosed", "{}", ready.message);
    assert!(!sock.exists(), "socket left after the export closed");
    assert!(leftovers(&vm)?.is_empty(), "{:?}", leftovers(&vm)?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn recreated_backup_copies_current_data_and_bases_never_cross_vms() -> Result<()> {
    let (env, cluster) = TestEnv::with_cluster("ta-ident").await?;
    let size = 8 * MIB;
    let vm1 = start_vm1(cluster, &env, size).await?;
    let vm2 = start_vm(cluster, &env, "node-1", "vm2", &[("disk0", "qcow2", size)])?;
    wait_instance(&env, "vm2", "node-1").await?;
    let tenant = Tenant::new(&env)?;
    let dir = cluster
        .backup_dir("node-1")
        .join(&env.namespace)
        .join("shared");
    let api: Api<VirtualMachineBackup> = Api::namespaced(env.client.clone(), &env.namespace);

    // 1. Same name, deleted and re-created: the second copies the current data.
    let mut model = DiskModel::new(size);
    model.write(&vm1, "disk0", 0x11, 0, MIB)?;
    tenant.must_apply(&backup_yaml("b", "vm1", &push_extra(&dir, None, None)))?;
    let first = wait_verified(&env, "b").await?;
    let first_file = first.status.as_ref().unwrap().disks[0]
        .target
        .clone()
        .unwrap();
    let first_uid = first.uid().unwrap();
    tenant.delete("vmb", "b")?;
    wait::gone(&api, "b", T).await?;
    model.write(&vm1, "disk0", 0x22, 2 * MIB, MIB)?;
    tenant.must_apply(&backup_yaml("b", "vm1", &push_extra(&dir, None, None)))?;
    let second = wait_verified(&env, "b").await?;
    assert_ne!(second.uid().unwrap(), first_uid);
    let second_file = second.status.as_ref().unwrap().disks[0]
        .target
        .clone()
        .unwrap();
    assert_ne!(
        second_file, first_file,
        "the re-created backup reused the old file"
    );
    assert!(
        second_file.contains(&second.uid().unwrap()),
        "{second_file}"
    );
    assert_eq!(
        cairn_e2e::vm::content_sha256(Path::new(&second_file))?,
        model.sha256(),
        "the re-created backup does not hold the current data"
    );
    assert!(
        Path::new(&first_file).exists(),
        "Retain keeps the old files"
    );

    // 2. A checkpoint name re-used on another VM: vm1's full created `cp`;
    // `cp` is deleted and vm2's backup (elsewhere) creates a new `cp`; an
    // incremental of vm2 from `cp` into the shared directory must not chain
    // onto vm1's full.
    tenant.must_apply(&backup_yaml(
        "full1",
        "vm1",
        &push_extra(&dir, None, Some("cp")),
    ))?;
    wait_backup(&env, "full1", BackupPhase::Succeeded).await?;
    tenant.delete("vmcp", "cp")?;
    let other = cluster
        .backup_dir("node-1")
        .join(&env.namespace)
        .join("vm2-own");
    tenant.must_apply(&backup_yaml(
        "full2",
        "vm2",
        &push_extra(&other, None, Some("cp")),
    ))?;
    wait_backup(&env, "full2", BackupPhase::Succeeded).await?;
    let before = tree(&dir);
    tenant.must_apply(&backup_yaml(
        "inc2",
        "vm2",
        &push_extra(&dir, Some("cp"), None),
    ))?;
    let (reason, message) = failure(&env, "inc2").await?;
    assert_eq!(reason, "IncrementalBaseUnusable", "{message}");
    assert!(message.contains("no earlier backup"), "{message}");
    assert_eq!(tree(&dir), before, "the refused incremental left files");
    assert!(leftovers(&vm1)?.is_empty() && leftovers(&vm2)?.is_empty());
    Ok(())
}

/// A local attacker swaps the tenant's target directory for a symlink to
/// outside while backups run: nothing lands outside.
#[tokio::test(flavor = "multi_thread")]
async fn symlink_swap_during_backups_never_escapes() -> Result<()> {
    let (env, cluster) = TestEnv::with_cluster("ta-race").await?;
    let vm = start_vm1(cluster, &env, 4 * MIB).await?;
    let tenant = Tenant::new(&env)?;
    let own = cluster.backup_dir("node-1").join(&env.namespace);
    let race = own.join("race");
    std::fs::create_dir_all(&race)?;
    let outside = cluster.state_dir.join(format!("outside-{}", env.namespace));
    std::fs::create_dir_all(&outside)?;
    let stop = Arc::new(AtomicBool::new(false));
    let swapper = {
        let (stop, race, outside) = (stop.clone(), race.clone(), outside.clone());
        std::thread::spawn(move || {
            let real = race.with_file_name("race.real");
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                if std::fs::rename(&race, &real).is_ok() {
                    let _ = std::os::unix::fs::symlink(&outside, &race);
                    std::thread::sleep(Duration::from_micros(200));
                    let _ = std::fs::remove_file(&race);
                    let _ = std::fs::rename(&real, &race);
                    n += 1;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            n
        })
    };
    for i in 0..4 {
        tenant.must_apply(&backup_yaml(
            &format!("r{i}"),
            "vm1",
            &push_extra(&race.join("sub"), None, None),
        ))?;
    }
    let api: Api<VirtualMachineBackup> = Api::namespaced(env.client.clone(), &env.namespace);
    for i in 0..4 {
        let b = wait::until(
            &api,
            &format!("r{i}"),
            Duration::from_secs(120),
            "finished",
            |b| {
                b.status
                    .as_ref()
                    .and_then(|s| s.phase)
                    .is_some_and(BackupPhase::is_finished)
            },
        )
        .await?;
        let st = b.status.unwrap_or_default();
        if st.phase == Some(BackupPhase::Failed) {
            let c = condition(&st.conditions, "Ready")
                .cloned()
                .context("Ready")?;
            assert!(
                ["TargetNotAllowed", "TargetError", "ImageError", "QemuError"]
                    .contains(&c.reason.as_str()),
                "{}: {}",
                c.reason,
                c.message
            );
        }
        assert!(tree(&outside).is_empty(), "escaped: {:?}", tree(&outside));
    }
    stop.store(true, Ordering::SeqCst);
    let swaps = swapper.join().unwrap();
    eprintln!("{swaps} swaps");
    assert!(tree(&outside).is_empty(), "escaped: {:?}", tree(&outside));
    assert!(leftovers(&vm)?.is_empty(), "{:?}", leftovers(&vm)?);
    Ok(())
}

/// TCP pull exports: a tenant of another namespace, acting with its own
/// token (even one allowed to read every Secret of its namespace), cannot
/// read the victim's export key, cannot take the victim's port, and its
/// refused backup leaves the victim's export serving.
#[tokio::test(flavor = "multi_thread")]
async fn tcp_export_keys_and_ports_stay_with_their_namespace() -> Result<()> {
    let (victim, cluster) = TestEnv::with_cluster("ta-tcp-victim").await?;
    let (env, _) = TestEnv::with_cluster("ta-tcp").await?;
    let _victim_vm = start_vm1(cluster, &victim, 8 * MIB).await?;
    let vm = start_vm1(cluster, &env, 8 * MIB).await?;
    apply(
        &victim,
        &backup_yaml(
            "v",
            "vm1",
            "  mode: Pull\n  target:\n    nbd:\n      tcp: {}\n",
        ),
    )?;
    let b = wait_backup(&victim, "v", BackupPhase::Exporting).await?;
    let url = b.status.unwrap().export.context("export")?.url;
    let port: u16 = url.rsplit(':').next().unwrap().parse()?;

    let tenant = Tenant::new(&env)?;
    // Let the tenant read Secrets of its own namespace, as `edit` does in a
    // real cluster.
    kubectl(
        &env,
        &[
            "create",
            "role",
            "own-secrets",
            "--verb=get,list,watch",
            "--resource=secrets",
        ],
    )?;
    kubectl(
        &env,
        &[
            "create",
            "rolebinding",
            "own-secrets",
            "--role=own-secrets",
            &format!("--serviceaccount={}:tenant", env.namespace),
        ],
    )?;
    let (ok, out) = tenant.run(&["get", "secrets"], "")?;
    ensure!(ok, "the tenant cannot list its own Secrets: {out}");
    for args in [
        vec![
            "get",
            "secret",
            "v-nbd-tls",
            "-n",
            victim.namespace.as_str(),
            "-o",
            "yaml",
        ],
        vec!["get", "secrets", "-n", victim.namespace.as_str()],
        vec!["get", "secrets", "-n", "cairn-system"],
    ] {
        let (ok, out) = tenant.run(&args, "")?;
        ensure!(
            !ok && out.contains("Forbidden"),
            "{args:?} was allowed: {out}"
        );
        ensure!(!out.contains("keys.psk"), "{args:?} leaked the key: {out}");
    }

    // The victim's port: refused with a clear reason; the victim still serves.
    tenant.must_apply(&backup_yaml(
        "steal-port",
        "vm1",
        &format!("  mode: Pull\n  target:\n    nbd:\n      tcp:\n        port: {port}\n"),
    ))?;
    let (reason, message) = failure(&env, "steal-port").await?;
    assert_eq!(reason, "ExportPortInUse", "{message}");
    assert!(leftovers(&vm)?.is_empty(), "{:?}", leftovers(&vm)?);
    let api: Api<VirtualMachineBackup> = Api::namespaced(victim.client.clone(), &victim.namespace);
    let v = api.get("v").await?;
    assert_eq!(v.status.unwrap().phase, Some(BackupPhase::Exporting));
    std::net::TcpStream::connect(("127.0.0.1", port))
        .context("the victim's export no longer listens")?;
    victim
        .kubectl(&["delete", "vmb", "v", "--timeout=60s"])
        .output()?;
    Ok(())
}
