//! Pull backups over TCP with TLS-PSK (`target.nbd.tcp`), on the local
//! cluster: the real operator issues the key, the real agent has real QEMU
//! serve the export on 127.0.0.1, and real NBD clients (`qemu-img`,
//! `nbdcopy`) read it — with the key, and refused without it. Deleting the
//! backup leaves no listener, QOM object, key file or Secret behind.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use cairn_api::{BackupPhase, VirtualMachineBackup};
use cairn_e2e::harness::TestEnv;
use cairn_e2e::local_cluster::{CAIRN_NAMESPACE, LocalCluster};
use cairn_e2e::scenario::*;
use cairn_e2e::vm::TestVm;
use cairn_e2e::wait;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, ResourceExt};

const SIZE: u64 = 64 * MIB;

fn tcp_backup(name: &str, port: Option<u16>) -> String {
    let port = port.map(|p| format!(" port: {p} ")).unwrap_or_default();
    backup_yaml(
        name,
        "vm1",
        &format!("  mode: Pull\n  target:\n    nbd:\n      tcp: {{{port}}}\n"),
    )
}

/// `username` and a directory holding `keys.psk` (mode 0600), from the Secret.
fn client_keys(secret: &Secret, dir: &Path) -> Result<String> {
    let data = secret.data.as_ref().context("Secret without data")?;
    let field = |k: &str| -> Result<String> {
        Ok(String::from_utf8(
            data.get(k).with_context(|| format!("no {k}"))?.0.clone(),
        )?)
    };
    let username = field("username")?;
    let key = field("key")?;
    let keys = field("keys.psk")?;
    ensure!(keys == format!("{username}:{key}\n"), "keys.psk: {keys:?}");
    ensure!(key.len() == 64 && key.chars().all(|c| c.is_ascii_hexdigit()));
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("keys.psk"), keys)?;
    std::fs::set_permissions(dir.join("keys.psk"), std::fs::Permissions::from_mode(0o600))?;
    Ok(username)
}

/// `qemu-img convert` of the export to a raw file through TLS with the key in `dir`.
fn convert(dir: &Path, username: &str, port: u16, out: &Path) -> std::process::Output {
    Command::new("qemu-img")
        .arg("convert")
        .arg("--object")
        .arg(format!(
            "tls-creds-psk,id=tls0,dir={},endpoint=client,username={username}",
            dir.display()
        ))
        .arg("--image-opts")
        .arg(format!(
            "driver=nbd,host=127.0.0.1,port={port},export=disk0,tls-creds=tls0"
        ))
        .args(["-O", "raw"])
        .arg(out)
        .output()
        .expect("qemu-img runs")
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn file_sha256(path: &Path) -> Result<String> {
    use sha2::Digest;
    Ok(hex(&sha2::Sha256::digest(std::fs::read(path)?)))
}

/// QOM objects, exports and block nodes Cairn left in QEMU.
fn qemu_leftovers(vm: &TestVm) -> Result<Vec<String>> {
    let mut left = Vec::new();
    let objects = vm.qmp("qom-list", serde_json::json!({"path": "/objects"}))?;
    for o in objects.as_array().into_iter().flatten() {
        if let Some(n) = o["name"].as_str().filter(|n| n.starts_with("cairn-")) {
            left.push(format!("object {n}"));
        }
    }
    let exports = vm.qmp("query-block-exports", serde_json::json!({}))?;
    for e in exports.as_array().into_iter().flatten() {
        left.push(format!("export {}", e["id"]));
    }
    left.extend(leftovers(vm)?);
    Ok(left)
}

/// The agent's key directory of backup `uid` on node-1
/// (`<runtime dir>/nbd-tls/cairn-<tag>-tls`, the tag derived from the UID).
fn key_dir(cluster: &LocalCluster, uid: &str) -> std::path::PathBuf {
    use sha2::Digest;
    let tag = hex(&sha2::Sha256::digest(uid.as_bytes())[..5]);
    cluster
        .state_dir
        .join("nodes/node-1/run/nbd-tls")
        .join(format!("cairn-{tag}-tls"))
}

async fn secret_exists(env: &TestEnv, ns: &str, name: &str) -> Result<bool> {
    let api: Api<Secret> = Api::namespaced(env.client.clone(), ns);
    Ok(api.get_opt(name).await?.is_some())
}

async fn wait_secret_gone(env: &TestEnv, ns: &str, name: &str) -> Result<()> {
    let api: Api<Secret> = Api::namespaced(env.client.clone(), ns);
    wait::gone(&api, name, Duration::from_secs(60))
        .await
        .with_context(|| format!("Secret {ns}/{name} still exists"))
}

fn connectable(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn tcp_tls_export_is_read_whole_with_the_key_and_refused_without() -> Result<()> {
    let (env, cluster) = TestEnv::with_cluster("pull-tls").await?;
    let vm = start_vm1(cluster, &env, SIZE).await?;
    let mut model = DiskModel::new(SIZE);
    model.write_random(&vm, "disk0", 0, 3 * MIB)?;
    model.write_random(&vm, "disk0", 40 * MIB, 5 * MIB)?;
    model.write(&vm, "disk0", 0x5a, SIZE - MIB, MIB)?;

    apply(&env, &tcp_backup("tls-1", None))?;
    let b = wait_backup(&env, "tls-1", BackupPhase::Exporting).await?;
    let uid = b.uid().context("uid")?;
    let status = b.status.clone().unwrap();
    let export = status.export.clone().context("status.export")?;
    let port: u16 = export
        .url
        .strip_prefix("nbds://127.0.0.1:")
        .with_context(|| format!("export URL {}", export.url))?
        .parse()?;
    let (first, last) = cairn_e2e::local_cluster::LOCAL_EXPORT_PORTS
        .split_once('-')
        .unwrap();
    ensure!(
        (first.parse()?..=last.parse()?).contains(&port),
        "port {port}"
    );
    assert_eq!(export.tls_secret_name.as_deref(), Some("tls-1-nbd-tls"));
    assert_eq!(
        status.disks[0].target.as_deref(),
        Some(format!("nbds://127.0.0.1:{port}/disk0").as_str())
    );
    // Nothing secret in status.
    let status_text = serde_json::to_string(&status)?;

    // The tenant's copy, in the backup's namespace, owned by the backup.
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &env.namespace);
    let secret = secrets.get("tls-1-nbd-tls").await?;
    let owner = &secret.metadata.owner_references.clone().unwrap_or_default()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str()),
        ("VirtualMachineBackup", uid.as_str())
    );
    let keys = tempfile::tempdir()?;
    let username = client_keys(&secret, keys.path())?;
    let key = String::from_utf8(secret.data.as_ref().unwrap()["key"].0.clone())?;
    ensure!(!status_text.contains(&key), "the key appears in status");
    // The agent's copy, in Cairn's namespace.
    let agent_copy = format!("cairn-nbd-psk-{uid}");
    ensure!(secret_exists(&env, CAIRN_NAMESPACE, &agent_copy).await?);
    // QEMU holds a tls-creds object of this backup; the agent's key file is private.
    let objects = vm.qmp("qom-list", serde_json::json!({"path": "/objects"}))?;
    ensure!(
        objects.as_array().unwrap().iter().any(|o| o["name"]
            .as_str()
            .is_some_and(|n| n.starts_with("cairn-") && n.ends_with("tls"))),
        "no tls-creds object: {objects}"
    );
    let kd = key_dir(cluster, &uid);
    assert_eq!(std::fs::metadata(&kd)?.permissions().mode() & 0o777, 0o700);
    assert_eq!(
        std::fs::metadata(kd.join("keys.psk"))?.permissions().mode() & 0o777,
        0o600
    );

    // With the key: the whole disk, byte for byte.
    let out_dir = tempfile::tempdir()?;
    let raw = out_dir.path().join("disk0.raw");
    let o = convert(keys.path(), &username, port, &raw);
    ensure!(
        o.status.success(),
        "qemu-img convert over TLS: {}",
        text(&o)
    );
    assert_eq!(file_sha256(&raw)?, model.sha256(), "qemu-img copy differs");
    // nbdcopy with the nbds:// URL and the keys file.
    let raw2 = out_dir.path().join("disk0-nbdcopy.raw");
    std::fs::File::create(&raw2)?.set_len(SIZE)?;
    let url = format!(
        "nbds://{username}@127.0.0.1:{port}/disk0?tls-psk-file={}",
        keys.path().join("keys.psk").display()
    );
    let o = Command::new("nbdcopy").arg(&url).arg(&raw2).output()?;
    ensure!(o.status.success(), "nbdcopy over TLS: {}", text(&o));
    assert_eq!(file_sha256(&raw2)?, model.sha256(), "nbdcopy copy differs");

    // Without the key: plain NBD is refused by the server (TLS required)…
    let o = Command::new("qemu-img")
        .args(["info", "--image-opts"])
        .arg(format!(
            "driver=nbd,host=127.0.0.1,port={port},export=disk0"
        ))
        .output()?;
    ensure!(!o.status.success(), "plain NBD was served: {}", text(&o));
    // …and so is a client with a wrong key.
    let wrong = tempfile::tempdir()?;
    std::fs::write(
        wrong.path().join("keys.psk"),
        format!("{username}:{}\n", "ab".repeat(32)),
    )?;
    let bad = out_dir.path().join("bad.raw");
    let o = convert(wrong.path(), &username, port, &bad);
    ensure!(
        !o.status.success(),
        "a wrong key was accepted: {}",
        text(&o)
    );
    // A guest write after the export started does not show (point in time).
    vm.write("disk0", 0x77, 0, MIB)?;
    let raw3 = out_dir.path().join("disk0-again.raw");
    let o = convert(keys.path(), &username, port, &raw3);
    ensure!(o.status.success(), "{}", text(&o));
    assert_eq!(file_sha256(&raw3)?, model.sha256());

    // Delete: listener, QOM object, key files and both Secrets go.
    let out = env
        .kubectl(&["delete", "vmb", "tls-1", "--timeout=60s"])
        .output()?;
    ensure!(out.status.success(), "{}", text(&out));
    ensure!(!connectable(port), "port {port} still listens after delete");
    let left = qemu_leftovers(&vm)?;
    ensure!(left.is_empty(), "left in QEMU: {left:?}");
    ensure!(!kd.exists(), "key dir left: {}", kd.display());
    wait_secret_gone(&env, &env.namespace, "tls-1-nbd-tls").await?;
    wait_secret_gone(&env, CAIRN_NAMESPACE, &agent_copy).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn tcp_export_failures_are_clear_and_leave_nothing() -> Result<()> {
    let (env, cluster) = TestEnv::with_cluster("pull-tls-fail").await?;
    let vm = start_vm1(cluster, &env, 8 * MIB).await?;
    let api: Api<VirtualMachineBackup> = Api::namespaced(env.client.clone(), &env.namespace);

    // A port of the range that something else listens on.
    let (first, last) = cairn_e2e::local_cluster::LOCAL_EXPORT_PORTS
        .split_once('-')
        .unwrap();
    let (first, last): (u16, u16) = (first.parse()?, last.parse()?);
    let squatter = (first..=last)
        .rev()
        .find_map(|p| std::net::TcpListener::bind(("127.0.0.1", p)).ok())
        .context("no free port in the range")?;
    let taken = squatter.local_addr()?.port();

    let cases = [
        (
            "busy",
            Some(taken),
            "ExportPortInUse",
            format!("port {taken}"),
        ),
        (
            "outside",
            Some(first - 1),
            "ExportPortOutsideRange",
            format!("{first}-{last}"),
        ),
    ];
    for (name, port, reason, words) in cases {
        apply(&env, &tcp_backup(name, port))?;
        let b = wait_backup(&env, name, BackupPhase::Failed).await?;
        let uid = b.uid().unwrap();
        let (r, msg) = failure_of(&b);
        assert_eq!(r, reason, "{name}: {msg}");
        ensure!(msg.contains(&words), "{name}: {msg}");
        // The operator removes the credentials of a finished backup.
        wait_secret_gone(&env, &env.namespace, &format!("{name}-nbd-tls")).await?;
        wait_secret_gone(&env, CAIRN_NAMESPACE, &format!("cairn-nbd-psk-{uid}")).await?;
        let left = qemu_leftovers(&vm)?;
        ensure!(left.is_empty(), "{name}: left in QEMU: {left:?}");
        ensure!(!key_dir(cluster, &uid).exists(), "{name}: key dir left");
        env.kubectl(&["delete", "vmb", name, "--timeout=60s"])
            .output()?;
        wait::gone(&api, name, Duration::from_secs(60)).await?;
    }
    drop(squatter);

    // A Secret of the tenant's own under the credentials' name is never
    // overwritten or deleted: the backup is refused.
    let (ok, _, err) = env.kubectl_stdin(
        &[
            "create",
            "secret",
            "generic",
            "mine-nbd-tls",
            "--from-literal=a=b",
        ],
        "",
    )?;
    ensure!(ok, "{err}");
    apply(&env, &tcp_backup("mine", None))?;
    let b = wait_backup(&env, "mine", BackupPhase::Failed).await?;
    let (r, msg) = failure_of(&b);
    assert_eq!(r, "CredentialsSecretExists", "{msg}");
    env.kubectl(&["delete", "vmb", "mine", "--timeout=60s"])
        .output()?;
    wait::gone(&api, "mine", Duration::from_secs(60)).await?;
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &env.namespace);
    let mine = secrets.get("mine-nbd-tls").await?;
    assert_eq!(mine.data.unwrap()["a"].0, b"b");
    let left = qemu_leftovers(&vm)?;
    ensure!(left.is_empty(), "left in QEMU: {left:?}");
    Ok(())
}

/// (reason, message) of a Failed backup's Ready condition.
fn failure_of(b: &VirtualMachineBackup) -> (String, String) {
    let s = b.status.clone().unwrap_or_default();
    condition(&s.conditions, "Ready")
        .map(|c| (c.reason.clone(), c.message.clone()))
        .unwrap_or_default()
}

/// A tenant of namespace B (allowed to read Secrets of its own namespace, as
/// `edit`/`admin` are) cannot read A's export credentials; the agent's
/// service account, bound as the chart binds it, cannot read them either.
#[tokio::test(flavor = "multi_thread")]
async fn other_tenants_and_the_agent_cannot_read_the_credentials() -> Result<()> {
    let (env, cluster) = TestEnv::with_cluster("pull-tls-a").await?;
    let other = TestEnv::on(&cluster.cp, "pull-tls-b").await?;
    let _vm = start_vm1(cluster, &env, 8 * MIB).await?;
    apply(&env, &tcp_backup("tls-a", None))?;
    wait_backup(&env, "tls-a", BackupPhase::Exporting).await?;
    ensure!(secret_exists(&env, &env.namespace, "tls-a-nbd-tls").await?);

    // Tenant B: a ServiceAccount that may read every Secret of namespace B.
    let b_ns = other.namespace.clone();
    for args in [
        vec!["create", "serviceaccount", "tenant", "-n", &b_ns],
        vec![
            "create",
            "role",
            "secrets",
            "--verb=get,list,watch",
            "--resource=secrets",
            "-n",
            &b_ns,
        ],
        vec![
            "create",
            "rolebinding",
            "secrets",
            "--role=secrets",
            "--serviceaccount",
            &format!("{b_ns}:tenant"),
            "-n",
            &b_ns,
        ],
    ] {
        let o = other.kubectl(&args).output()?;
        ensure!(o.status.success(), "{args:?}: {}", text(&o));
    }
    let tenant_b = format!("system:serviceaccount:{b_ns}:tenant");
    let own = other
        .kubectl(&[
            "auth", "can-i", "get", "secrets", "-n", &b_ns, "--as", &tenant_b,
        ])
        .output()?;
    assert_eq!(String::from_utf8_lossy(&own.stdout).trim(), "yes");
    let steal = other
        .kubectl(&[
            "get",
            "secret",
            "tls-a-nbd-tls",
            "-n",
            &env.namespace,
            "--as",
            &tenant_b,
            "-o",
            "yaml",
        ])
        .output()?;
    ensure!(!steal.status.success(), "tenant B read A's credentials");
    ensure!(text(&steal).contains("Forbidden"), "{}", text(&steal));
    ensure!(!String::from_utf8_lossy(&steal.stdout).contains("keys.psk"));

    // The agent's service account, with the chart's agent RBAC (rendered by
    // helm, bound in a release namespace of its own).
    let release_ns = TestEnv::on(&cluster.cp, "pull-tls-rel").await?;
    let rendered = Command::new(&env.cp.tools.helm)
        .args(["template", "t"])
        .arg(cairn_e2e::tools::repo_root().join("charts/cairn"))
        .args(["--show-only", "templates/agent-rbac.yaml"])
        .args(["--namespace", &release_ns.namespace])
        .args([
            "--set",
            &format!("fullnameOverride=tls-{}", &release_ns.namespace),
        ])
        .env(
            "HELM_CACHE_HOME",
            std::env::temp_dir().join("tls-helm/cache"),
        )
        .env(
            "HELM_CONFIG_HOME",
            std::env::temp_dir().join("tls-helm/config"),
        )
        .env("HELM_DATA_HOME", std::env::temp_dir().join("tls-helm/data"))
        .env_remove("KUBECONFIG")
        .output()?;
    ensure!(
        rendered.status.success(),
        "helm template: {}",
        text(&rendered)
    );
    let o = release_ns
        .kubectl(&[
            "create",
            "serviceaccount",
            &format!("tls-{}-agent", release_ns.namespace),
        ])
        .output()?;
    ensure!(o.status.success(), "{}", text(&o));
    let (ok, _, err) = release_ns.kubectl_stdin(
        &["apply", "-f", "-"],
        &String::from_utf8_lossy(&rendered.stdout),
    )?;
    ensure!(ok, "{err}");
    let agent = format!(
        "system:serviceaccount:{0}:tls-{0}-agent",
        release_ns.namespace
    );
    let read = env
        .kubectl(&["get", "secret", "tls-a-nbd-tls", "--as", &agent])
        .output()?;
    ensure!(!read.status.success(), "the agent read a tenant Secret");
    ensure!(text(&read).contains("Forbidden"), "{}", text(&read));
    for verb in ["get", "list", "watch"] {
        let o = env
            .kubectl(&["auth", "can-i", verb, "secrets", "--as", &agent])
            .output()?;
        assert_eq!(
            String::from_utf8_lossy(&o.stdout).trim(),
            "no",
            "agent {verb} secrets in a tenant namespace"
        );
    }
    // …while it may read the release namespace's (its copy lives there).
    let o = release_ns
        .kubectl(&["auth", "can-i", "get", "secrets", "--as", &agent])
        .output()?;
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "yes");

    let o = env
        .kubectl(&["delete", "vmb", "tls-a", "--timeout=60s"])
        .output()?;
    ensure!(o.status.success(), "{}", text(&o));
    wait_secret_gone(&env, &env.namespace, "tls-a-nbd-tls").await?;
    Ok(())
}

/// The export's health check reads through TLS with the agent's key (the
/// export stays `Exporting` across several checks), and the export timeout
/// tears everything down: `Succeeded`, no listener, nothing in QEMU, no key
/// file, no Secrets.
#[tokio::test(flavor = "multi_thread")]
async fn tcp_export_survives_its_checks_and_goes_at_its_timeout() -> Result<()> {
    let (env, cluster) = TestEnv::with_cluster("pull-tls-ttl").await?;
    let vm = start_vm1(cluster, &env, 8 * MIB).await?;
    apply(
        &env,
        &backup_yaml(
            "short",
            "vm1",
            "  mode: Pull\n  exportTimeoutSeconds: 35\n  target:\n    nbd:\n      tcp: {}\n",
        ),
    )?;
    let b = wait_backup(&env, "short", BackupPhase::Exporting).await?;
    let uid = b.uid().unwrap();
    let url = b.status.unwrap().export.unwrap().url;
    let port: u16 = url.rsplit(':').next().unwrap().parse()?;
    ensure!(connectable(port), "nothing listens on {port}");
    // The agent checks the export every 10 s through TLS; a failing check
    // would tear it down (ExportBroken).
    tokio::time::sleep(Duration::from_secs(22)).await;
    let api: Api<VirtualMachineBackup> = Api::namespaced(env.client.clone(), &env.namespace);
    let now = api.get("short").await?;
    let s = now.status.unwrap();
    assert_eq!(s.phase, Some(BackupPhase::Exporting), "{:?}", s.conditions);
    let b = wait_backup(&env, "short", BackupPhase::Succeeded).await?;
    let (reason, _) = failure_of(&b);
    assert_eq!(reason, "ExportClosed");
    ensure!(
        !connectable(port),
        "port {port} still listens after the timeout"
    );
    let left = qemu_leftovers(&vm)?;
    ensure!(left.is_empty(), "left in QEMU: {left:?}");
    ensure!(!key_dir(cluster, &uid).exists(), "key dir left");
    wait_secret_gone(&env, &env.namespace, "short-nbd-tls").await?;
    wait_secret_gone(&env, CAIRN_NAMESPACE, &format!("cairn-nbd-psk-{uid}")).await?;
    Ok(())
}
