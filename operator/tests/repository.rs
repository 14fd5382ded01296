//! The BackupRepository controller against a real kube-apiserver, a real
//! versitygw S3 server and a real directory: status and stats, the failure
//! reasons, on-demand verify and prune, and `deletionPolicy: Delete`.
//! The test writes repository snapshots itself with cairn-repo's ingest API,
//! standing for the agent.

#[path = "../../repository/tests/common/mod.rs"]
mod common;
mod in_process;

use std::time::Duration;

use anyhow::Result;
use cairn_api::{BACKUP_FINALIZER, BackupRepository, VirtualMachineBackup, conditions};
use cairn_e2e::harness::TestEnv;
use cairn_operator::RepositorySettings;
use cairn_repo::{IngestOptions, RepoError, Repository, SnapshotSpec};
use in_process::{Running, eventually};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

const KEY: &[u8] = b"a test key of thirty-two bytes!!";

fn start(env: &TestEnv, roots: Vec<std::path::PathBuf>) -> Running {
    let mut settings = in_process::settings(env, "op-repos");
    settings.repositories = RepositorySettings {
        namespace: env.namespace.clone(),
        roots,
    };
    in_process::start_with(env, settings)
}

async fn secret(client: &Client, ns: &str, name: &str, data: serde_json::Value) -> Result<()> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    api.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": name}, "stringData": data}))?,
    )
    .await?;
    Ok(())
}

async fn repository(
    api: &Api<BackupRepository>,
    name: &str,
    spec: serde_json::Value,
) -> Result<()> {
    api.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "apiVersion": "cairn.dev/v1alpha1", "kind": "BackupRepository",
            "metadata": {"name": name}, "spec": spec
        }))?,
    )
    .await?;
    Ok(())
}

/// Waits until the repository's Ready condition has `status` and `reason`.
async fn ready(
    api: &Api<BackupRepository>,
    name: &str,
    status: &str,
    reason: &str,
) -> Result<BackupRepository> {
    let found = eventually(&format!("{name} Ready={status} {reason}"), || async {
        let r = api.get(name).await?;
        let s = r.status.clone().unwrap_or_default();
        let ok = conditions::find(&s.conditions, "Ready")
            .is_some_and(|c| c.status == status && c.reason == reason);
        Ok(ok.then_some(r))
    })
    .await;
    if found.is_err() {
        let r = api.get(name).await?;
        eprintln!("{name}: {:?}", r.status);
    }
    found
}

/// Writes a one-disk snapshot as the agent would, for backup `backup_uid`.
async fn write_snapshot(
    repo: &Repository,
    ns: &str,
    backup_uid: &str,
    seed: u64,
) -> Result<String> {
    let disk = common::MemDisk::new(common::random_image(seed, 3 << 20));
    let mut w = repo
        .begin_snapshot(
            SnapshotSpec {
                namespace: ns.into(),
                vm: "vm1".into(),
                vm_uid: None,
                backup_uid: backup_uid.into(),
                checkpoint: None,
                base: None,
                time: None,
            },
            IngestOptions::default(),
        )
        .await?;
    w.add_disk("vda", disk.size(), &disk, None).await?;
    Ok(w.commit().await?.id)
}

/// A backup into `repo` that the test's "agent" finished with snapshot `snapshot`.
async fn backup(
    api: &Api<VirtualMachineBackup>,
    name: &str,
    repo: &str,
    policy: &str,
) -> Result<VirtualMachineBackup> {
    Ok(api
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "cairn.dev/v1alpha1", "kind": "VirtualMachineBackup",
                "metadata": {"name": name, "finalizers": [BACKUP_FINALIZER]},
                "spec": {"virtualMachine": "vm1", "target": {"repository": {"name": repo}},
                         "deletionPolicy": policy}
            }))?,
        )
        .await?)
}

async fn record_snapshot(
    api: &Api<VirtualMachineBackup>,
    name: &str,
    repo: &str,
    snapshot: &str,
) -> Result<()> {
    api.patch_status(
        name,
        &PatchParams::apply(cairn_api::AGENT_MANAGER).force(),
        &Patch::Apply(json!({
            "apiVersion": "cairn.dev/v1alpha1", "kind": "VirtualMachineBackup",
            "status": {"repository": {"name": repo, "snapshot": snapshot}}
        })),
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn repositories_report_status_run_maintenance_and_delete_snapshots() -> Result<()> {
    let env = TestEnv::new("op-repos").await?;
    let ns = env.namespace.clone();
    let client = env.client.clone();
    let mut s3 = common::S3Server::start();
    s3.create_bucket("cairn").await;
    let roots = tempfile::tempdir()?;
    let root = std::fs::canonicalize(roots.path())?;
    let op = start(&env, vec![root.clone()]);
    let repos: Api<BackupRepository> = Api::all(client.clone());

    secret(
        &client,
        &ns,
        "s3-credentials",
        json!({"AWS_ACCESS_KEY_ID": common::ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": common::SECRET_KEY}),
    )
    .await?;
    secret(
        &client,
        &ns,
        "repo-key",
        json!({"key": std::str::from_utf8(KEY)?}),
    )
    .await?;
    secret(
        &client,
        &ns,
        "other-key",
        json!({"key": "another key, just as long as it"}),
    )
    .await?;
    let s3_spec = |bucket: &str, creds: &str, key: &str, chunk: i64| {
        json!({
            "storage": {"s3": {"endpoint": s3.endpoint, "bucket": bucket, "prefix": "repo",
                                "pathStyle": true, "credentialsSecret": creds}},
            "encryption": {"keySecret": key},
            "chunkSize": chunk,
            "allowedNamespaces": {"names": [ns]},
        })
    };

    // An encrypted S3 repository is initialised on first use and turns Ready with figures.
    let s3_name = format!("{ns}-s3");
    repository(
        &repos,
        &s3_name,
        s3_spec("cairn", "s3-credentials", "repo-key", 65536),
    )
    .await?;
    let r = ready(&repos, &s3_name, "True", "RepositoryReady").await?;
    let s = r.status.unwrap();
    assert_eq!(s.encrypted, Some(true));
    assert_eq!(s.chunk_size, Some(65536));
    assert_eq!(s.format_version, Some(cairn_repo::FORMAT_VERSION.into()));
    assert_eq!(s.snapshot_count, Some(0));
    assert!(s.stored_bytes.unwrap_or_default() > 0, "{s:?}");
    assert!(s.dedup_ratio.is_some());
    assert_eq!(s.observed_generation, r.metadata.generation);
    // Credentials and keys never reach the status.
    let text = serde_json::to_string(&s)?;
    assert!(!text.contains(common::SECRET_KEY) && !text.contains("thirty-two"));

    // A directory repository under the allowed root, unencrypted.
    let dir_name = format!("{ns}-dir");
    let dir_path = root.join("dir-repo");
    repository(
        &repos,
        &dir_name,
        json!({"storage": {"directory": {"path": dir_path}}, "compression": "none",
               "allowedNamespaces": {"names": ["*"]}}),
    )
    .await?;
    let r = ready(&repos, &dir_name, "True", "RepositoryReady").await?;
    assert_eq!(r.status.unwrap().encrypted, Some(false));
    assert!(dir_path.join("config").exists());
    // Outside the allowed roots: refused, nothing created.
    let outside = format!("{ns}-outside");
    let outside_path = std::env::temp_dir().join(format!("{ns}-outside-repo"));
    repository(
        &repos,
        &outside,
        json!({"storage": {"directory": {"path": outside_path}}}),
    )
    .await?;
    ready(&repos, &outside, "False", "InvalidSettings").await?;
    assert!(!outside_path.exists());

    // The failure reasons.
    let wrong = format!("{ns}-wrongkey");
    repository(
        &repos,
        &wrong,
        s3_spec("cairn", "s3-credentials", "other-key", 65536),
    )
    .await?;
    let r = ready(&repos, &wrong, "False", "WrongKey").await?;
    assert!(!serde_json::to_string(&r.status)?.contains("another key"));
    let chunks = format!("{ns}-chunks");
    repository(
        &repos,
        &chunks,
        s3_spec("cairn", "s3-credentials", "repo-key", 131072),
    )
    .await?;
    ready(&repos, &chunks, "False", "ChunkSizeMismatch").await?;
    let nosecret = format!("{ns}-nosecret");
    repository(
        &repos,
        &nosecret,
        s3_spec("cairn", "absent", "repo-key", 65536),
    )
    .await?;
    let r = ready(&repos, &nosecret, "False", "SecretMissing").await?;
    let msg = conditions::find(&r.status.unwrap().conditions, "Ready")
        .unwrap()
        .message
        .clone();
    assert!(msg.contains("absent") && msg.contains(&ns), "{msg}");
    let nobucket = format!("{ns}-nobucket");
    repository(
        &repos,
        &nobucket,
        s3_spec("missing-bucket", "s3-credentials", "repo-key", 65536),
    )
    .await?;
    ready(&repos, &nobucket, "False", "BucketMissing").await?;
    secret(
        &client,
        &ns,
        "bad-credentials",
        json!({"AWS_ACCESS_KEY_ID": common::ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}),
    )
    .await?;
    let refused = format!("{ns}-refused");
    repository(
        &repos,
        &refused,
        s3_spec("cairn", "bad-credentials", "repo-key", 65536),
    )
    .await?;
    ready(&repos, &refused, "False", "CredentialsRefused").await?;
    // The missing Secret appears: the repository recovers without a spec change.
    secret(
        &client,
        &ns,
        "absent",
        json!({"AWS_ACCESS_KEY_ID": common::ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": common::SECRET_KEY}),
    )
    .await?;
    ready(&repos, &nosecret, "True", "RepositoryReady").await?;

    // Snapshots written "by the agent" for two backups.
    let direct = Repository::open(&s3.config("cairn", Some("repo")), &common::key(), None).await?;
    let backups: Api<VirtualMachineBackup> = Api::namespaced(client.clone(), &ns);
    let doomed = backup(&backups, "b-delete", &s3_name, "Delete").await?;
    let kept = backup(&backups, "b-retain", &s3_name, "Retain").await?;
    let doomed_snap =
        write_snapshot(&direct, &ns, &doomed.metadata.uid.clone().unwrap(), 1).await?;
    let kept_snap = write_snapshot(&direct, &ns, &kept.metadata.uid.clone().unwrap(), 2).await?;
    record_snapshot(&backups, "b-delete", &s3_name, &doomed_snap).await?;
    record_snapshot(&backups, "b-retain", &s3_name, &kept_snap).await?;

    // verifyRequested runs a verify; the refreshed figures count the snapshots.
    repos
        .patch(
            &s3_name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"maintenance": {"verifyRequested": "v1"}}})),
        )
        .await?;
    let s = eventually("verify v1", || async {
        let s = repos.get(&s3_name).await?.status.unwrap_or_default();
        Ok(s.last_verify
            .as_ref()
            .is_some_and(|v| v.request.as_deref() == Some("v1"))
            .then_some(s))
    })
    .await?;
    let v = s.last_verify.unwrap();
    assert_eq!(v.result, "Succeeded", "{v:?}");
    assert!(v.message.unwrap_or_default().contains("2 snapshot"));
    assert_eq!(s.snapshot_count, Some(2));
    assert!(s.logical_bytes.unwrap_or_default() >= 6 << 20);

    // Deleting the Delete backup deletes its snapshot; the Retain one keeps its own.
    backups.delete("b-delete", &DeleteParams::default()).await?;
    backups.delete("b-retain", &DeleteParams::default()).await?;
    for name in ["b-delete", "b-retain"] {
        eventually(&format!("{name} gone"), || async {
            Ok(backups.get_opt(name).await?.is_none().then_some(()))
        })
        .await?;
    }
    assert!(matches!(
        direct.manifest(&doomed_snap).await,
        Err(RepoError::SnapshotNotFound(_))
    ));
    direct.manifest(&kept_snap).await?;

    // pruneRequested runs prune + GC.
    repos
        .patch(
            &s3_name,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"maintenance": {"pruneRequested": "p1", "gcGraceSeconds": 0}}}),
            ),
        )
        .await?;
    let s = eventually("prune p1", || async {
        let s = repos.get(&s3_name).await?.status.unwrap_or_default();
        Ok(s.last_prune
            .as_ref()
            .is_some_and(|v| v.request.as_deref() == Some("p1"))
            .then_some(s))
    })
    .await?;
    assert_eq!(s.last_prune.as_ref().unwrap().result, "Succeeded", "{s:?}");
    assert_eq!(s.snapshot_count, Some(1));

    // A Delete backup whose status names another backup's snapshot: that snapshot stays.
    let foreign = backup(&backups, "b-foreign", &s3_name, "Delete").await?;
    record_snapshot(&backups, "b-foreign", &s3_name, &kept_snap).await?;
    backups
        .delete("b-foreign", &DeleteParams::default())
        .await?;
    eventually("b-foreign gone", || async {
        Ok(backups.get_opt("b-foreign").await?.is_none().then_some(()))
    })
    .await?;
    direct.manifest(&kept_snap).await?;
    drop(foreign);

    // The storage goes away: RepositoryUnavailable, and a Delete backup waits
    // with its finalizer until its snapshot can be deleted.
    let late = backup(&backups, "b-late", &s3_name, "Delete").await?;
    let late_snap = write_snapshot(&direct, &ns, &late.metadata.uid.clone().unwrap(), 3).await?;
    record_snapshot(&backups, "b-late", &s3_name, &late_snap).await?;
    s3.stop();
    repos
        .patch(
            &s3_name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"maintenance": {"gcGraceSeconds": 1}}})),
        )
        .await?;
    ready(&repos, &s3_name, "False", "RepositoryUnavailable").await?;
    backups.delete("b-late", &DeleteParams::default()).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let b = backups.get("b-late").await?;
    assert!(b.metadata.deletion_timestamp.is_some());
    assert!(
        b.metadata
            .finalizers
            .unwrap_or_default()
            .contains(&BACKUP_FINALIZER.to_string())
    );
    s3.restart();
    eventually("b-late gone after the storage is back", || async {
        Ok(backups.get_opt("b-late").await?.is_none().then_some(()))
    })
    .await?;
    assert!(matches!(
        direct.manifest(&late_snap).await,
        Err(RepoError::SnapshotNotFound(_))
    ));

    // A corrupt pack: verify names snapshot, disk and offset.
    let packs = direct.storage().list("packs").await?;
    let pack = packs.iter().max_by_key(|o| o.size).unwrap();
    let mut bytes = direct.storage().get(&pack.key).await?.to_vec();
    bytes[100] ^= 0xff;
    direct.storage().put(&pack.key, bytes).await?;
    repos
        .patch(
            &s3_name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"maintenance": {"verifyRequested": "v2"}}})),
        )
        .await?;
    let s = eventually("verify v2", || async {
        let s = repos.get(&s3_name).await?.status.unwrap_or_default();
        Ok(s.last_verify
            .as_ref()
            .is_some_and(|v| v.request.as_deref() == Some("v2"))
            .then_some(s))
    })
    .await?;
    let v = s.last_verify.unwrap();
    assert_eq!(v.result, "Failed", "{v:?}");
    let m = v.message.unwrap_or_default();
    assert!(
        m.contains(&kept_snap) && m.contains("disk vda offset"),
        "{m}"
    );

    for name in [
        &s3_name, &dir_name, &outside, &wrong, &chunks, &nosecret, &nobucket, &refused,
    ] {
        let _ = repos.delete(name, &DeleteParams::default()).await;
    }
    op.stop().await;
    Ok(())
}
