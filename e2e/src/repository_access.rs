//! How tests use the local cluster's BackupRepositories: the target lines
//! of a backup manifest, the snapshot a backup wrote, and a restore through
//! `cairn-agent restore --repository` that reads the storage settings and
//! Secrets from the cluster as an admin with no other knowledge.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, ensure};
use base64::Engine;
use cairn_api::{BackupPhase, VirtualMachineBackup};
use sha2::{Digest, Sha256};

use crate::harness::TestEnv;
use crate::local_cluster::binary;
use crate::scenario::{hex, kubectl, wait_backup};

/// The target lines of a backup into repository `repo`.
fn repository_yaml(repo: &str) -> String {
    format!("  target:\n    repository:\n      name: {repo}\n")
}

/// Spec lines of a backup into `repo`, optionally incremental and making a checkpoint.
pub fn backup_into(repo: &str, incremental: Option<&str>, checkpoint: Option<&str>) -> String {
    let mut s = repository_yaml(repo);
    if let Some(i) = incremental {
        s.push_str(&format!("  incremental: {i}\n"));
    }
    if let Some(c) = checkpoint {
        s.push_str(&format!("  checkpoint:\n    name: {c}\n"));
    }
    s
}

/// The repository status of a Succeeded backup.
pub async fn snapshot_of(env: &TestEnv, name: &str) -> Result<cairn_api::RepositorySnapshotStatus> {
    let b: VirtualMachineBackup = wait_backup(env, name, BackupPhase::Succeeded).await?;
    b.status
        .and_then(|s| s.repository)
        .context("a Succeeded repository backup without status.repository")
}

/// A repository location string, the environment it needs and a key file.
pub struct Access {
    /// `dir://…` or `s3://bucket?endpoint=…`.
    pub location: String,
    /// Credentials for an S3 repository.
    pub env: Vec<(String, String)>,
    /// The key, written to a file, for an encrypted repository.
    pub key_file: Option<std::path::PathBuf>,
}

/// How `cairn-agent restore --repository` reaches a repository of the local
/// cluster: its location string, the environment and a key file, read from
/// the cluster as an admin with no other knowledge.
pub fn location_of(env: &TestEnv, repo: &str, dir: &Path) -> Result<Access> {
    let spec: serde_json::Value = serde_json::from_str(&kubectl(
        env,
        &["get", "backuprepository", repo, "-o", "jsonpath={.spec}"],
    )?)?;
    let secret = |name: &str, key: &str| -> Result<Vec<u8>> {
        let b64 = kubectl(
            env,
            &[
                "get",
                "secret",
                name,
                "-n",
                "cairn-system",
                "-o",
                &format!("jsonpath={{.data.{key}}}"),
            ],
        )?;
        Ok(base64::engine::general_purpose::STANDARD.decode(b64.trim())?)
    };
    let key_file = match spec["encryption"]["keySecret"].as_str() {
        Some(s) => {
            let path = dir.join(format!("{repo}.key"));
            std::fs::write(&path, secret(s, "key")?)?;
            Some(path)
        }
        None => None,
    };
    if let Some(path) = spec["storage"]["directory"]["path"].as_str() {
        return Ok(Access {
            location: format!("dir://{path}"),
            env: vec![],
            key_file,
        });
    }
    let s3 = &spec["storage"]["s3"];
    let creds = s3["credentialsSecret"]
        .as_str()
        .context("credentialsSecret")?;
    let text = |k: &str| -> Result<String> { Ok(String::from_utf8(secret(creds, k)?)?) };
    let mut location = format!(
        "s3://{}?endpoint={}",
        s3["bucket"].as_str().context("bucket")?,
        s3["endpoint"].as_str().context("endpoint")?
    );
    if let Some(r) = s3["region"].as_str() {
        location.push_str(&format!("&region={r}"));
    }
    Ok(Access {
        location,
        env: vec![
            ("AWS_ACCESS_KEY_ID".into(), text("AWS_ACCESS_KEY_ID")?),
            (
                "AWS_SECRET_ACCESS_KEY".into(),
                text("AWS_SECRET_ACCESS_KEY")?,
            ),
        ],
        key_file,
    })
}

/// Restores `snapshot`'s `disk` to raw with the CLI and returns its SHA-256.
pub fn restore_sha(env: &TestEnv, repo: &str, snapshot: &str, disk: &str) -> Result<String> {
    let dir = tempfile::tempdir()?;
    let Access {
        location,
        env: envs,
        key_file: key,
    } = location_of(env, repo, dir.path())?;
    let out = dir.path().join("out");
    let mut cmd = Command::new(binary("cairn-agent"));
    cmd.args(["restore", "--repository", &location, "--snapshot", snapshot])
        .args(["--format", "raw", "--disk", disk, "--output"])
        .arg(&out)
        .envs(envs);
    if let Some(k) = &key {
        cmd.arg("--key-file").arg(k);
    }
    let o = cmd.output()?;
    ensure!(
        o.status.success(),
        "restore of {snapshot} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let bytes = std::fs::read(out.join(format!("{disk}.raw")))?;
    Ok(hex(&Sha256::digest(&bytes)))
}
