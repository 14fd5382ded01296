//! What the local cluster provides for backup repositories (DESIGN.md, "Local
//! cluster"): a real S3 server on loopback with a bucket, Cairn's namespace
//! with the Secrets, the BackupRepositories `local-s3` (encrypted) and
//! `local-dir`, the `export` line for the S3 server, and the environment the
//! operator and the agents get. Both repositories are opened with `cairn-repo`
//! using nothing but what the cluster published.

use std::collections::BTreeMap;

use anyhow::{Context, Result, ensure};
use cairn_api::BackupRepository;
use cairn_e2e::control_plane::recorded_pid;
use cairn_e2e::harness::{client_for, local_cluster};
use cairn_e2e::local_cluster::{
    CAIRN_NAMESPACE, DIRECTORY_REPOSITORY, LocalCluster, S3_CREDENTIALS_SECRET, S3_KEY_SECRET,
    S3_REPOSITORY,
};
use cairn_e2e::local_s3::LocalS3;
use cairn_repo::{InitOptions, Repository, RepositoryKey, S3Config, StorageConfig};
use k8s_openapi::api::core::v1::Secret;
use kube::Api;

async fn cluster() -> Result<&'static LocalCluster> {
    tokio::task::spawn_blocking(local_cluster).await?
}

/// The `data` of Secret `name` in Cairn's namespace.
async fn secret_data(client: &kube::Client, name: &str) -> Result<BTreeMap<String, Vec<u8>>> {
    let secret = Api::<Secret>::namespaced(client.clone(), CAIRN_NAMESPACE)
        .get(name)
        .await
        .with_context(|| format!("Secret {CAIRN_NAMESPACE}/{name}"))?;
    Ok(secret
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect())
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_up_provides_local_s3_and_local_dir() -> Result<()> {
    let cluster = cluster().await?;
    let client = client_for(&cluster.cp.kubeconfig).await?;

    // The exported line is the one DESIGN.md names, and it is what the state dir keeps.
    let exports = cluster.exports();
    let lines: Vec<&str> = exports.lines().collect();
    assert_eq!(lines.len(), 3, "export lines: {exports}");
    assert!(lines.iter().all(|l| l.starts_with("export ")), "{exports}");
    let s3_line = lines[2];
    let names: Vec<&str> = s3_line
        .trim_start_matches("export ")
        .split_whitespace()
        .map(|kv| kv.split_once('=').map_or(kv, |(k, _)| k))
        .collect();
    assert_eq!(
        names,
        [
            "CAIRN_S3_ENDPOINT",
            "CAIRN_S3_BUCKET",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY"
        ]
    );
    let exported = LocalS3::parse_export_line(s3_line)?;
    assert_eq!(exported, cluster.s3);
    assert_eq!(LocalS3::load(&cluster.state_dir)?, cluster.s3);
    assert!(exported.endpoint.starts_with("http://127.0.0.1:"));

    // The S3 server answers and the bucket exists for these credentials, not for others.
    ensure!(
        exported.access().bucket_exists(&exported.bucket)?,
        "bucket {} missing on {}",
        exported.bucket,
        exported.endpoint
    );
    assert!(!exported.access().bucket_exists("no-such-bucket")?);
    let mut wrong = exported.clone();
    wrong.secret_access_key = "not-the-secret".into();
    assert!(
        wrong.access().bucket_exists(&exported.bucket).is_err(),
        "a wrong secret must be refused"
    );

    // Secrets in Cairn's namespace.
    let creds = secret_data(&client, S3_CREDENTIALS_SECRET).await?;
    assert_eq!(
        creds.keys().collect::<Vec<_>>(),
        ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
    );
    assert_eq!(
        creds["AWS_ACCESS_KEY_ID"],
        exported.access_key_id.as_bytes()
    );
    assert_eq!(
        creds["AWS_SECRET_ACCESS_KEY"],
        exported.secret_access_key.as_bytes()
    );
    let key = secret_data(&client, S3_KEY_SECRET).await?;
    assert_eq!(key.keys().collect::<Vec<_>>(), ["key"]);
    assert_eq!(key["key"].len(), 32, "the repository key is 32 bytes");
    assert_ne!(key["key"], vec![0u8; 32]);

    // The BackupRepositories, with exactly the promised spec.
    let repos = Api::<BackupRepository>::all(client.clone());
    let s3 = repos.get(S3_REPOSITORY).await?.spec;
    let storage = s3.storage.s3.as_ref().context("local-s3 is on S3")?;
    assert!(s3.storage.directory.is_none());
    assert_eq!(storage.endpoint, exported.endpoint);
    assert_eq!(storage.bucket, exported.bucket);
    assert_eq!(storage.region.as_deref(), Some("us-east-1"));
    assert_eq!(storage.path_style, Some(true));
    assert_eq!(storage.prefix, None);
    assert_eq!(storage.credentials_secret, S3_CREDENTIALS_SECRET);
    assert_eq!(
        s3.encryption.as_ref().map(|e| e.key_secret.as_str()),
        Some(S3_KEY_SECRET)
    );
    assert_eq!(s3.allowed_namespaces.as_ref().unwrap().names, ["*"]);

    let dir = repos.get(DIRECTORY_REPOSITORY).await?.spec;
    assert!(dir.storage.s3.is_none());
    let path = &dir.storage.directory.as_ref().context("local-dir")?.path;
    assert_eq!(
        path,
        &cluster.state_dir.join("repository").display().to_string()
    );
    assert!(std::path::Path::new(path).is_dir(), "{path} exists");
    assert!(dir.encryption.is_none(), "local-dir is unencrypted");
    assert_eq!(dir.allowed_namespaces.as_ref().unwrap().names, ["*"]);

    // Both open with cairn-repo from what the cluster published. A prefix of our
    // own keeps this test's repository apart from what the agents write.
    let s3_storage = StorageConfig::S3(S3Config {
        endpoint: storage.endpoint.clone(),
        bucket: storage.bucket.clone(),
        prefix: Some("e2e-local-cluster-check".into()),
        region: storage.region.clone(),
        access_key_id: String::from_utf8(creds["AWS_ACCESS_KEY_ID"].clone())?,
        secret_access_key: String::from_utf8(creds["AWS_SECRET_ACCESS_KEY"].clone())?,
    });
    let options = InitOptions::default();
    let key = RepositoryKey::Key(key["key"].clone());
    Repository::open_or_init(&s3_storage, &key, &options)
        .await
        .context("opening local-s3's bucket")?;
    Repository::open(&s3_storage, &key, None)
        .await
        .context("reopening local-s3's bucket")?;
    let scratch = tempfile::tempdir_in(path)?;
    Repository::open_or_init(
        &StorageConfig::Directory {
            path: scratch.path().to_path_buf(),
        },
        &RepositoryKey::None,
        &options,
    )
    .await
    .context("initialising a repository under local-dir's path")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn operator_and_agents_get_cairn_namespace_and_repository_roots() -> Result<()> {
    let cluster = cluster().await?;
    let environ = |name: &str| -> Result<BTreeMap<String, String>> {
        let pid = recorded_pid(&cluster.state_dir, name)?;
        let raw = std::fs::read(format!("/proc/{pid}/environ"))?;
        Ok(raw
            .split(|b| *b == 0)
            .filter_map(|kv| {
                let kv = String::from_utf8_lossy(kv);
                let (k, v) = kv.split_once('=')?;
                Some((k.to_string(), v.to_string()))
            })
            .collect())
    };
    let operator = environ("operator-0")?;
    assert_eq!(operator["CAIRN_NAMESPACE"], CAIRN_NAMESPACE);
    for node in &cluster.nodes {
        let agent = environ(&format!("agent-{node}"))?;
        assert_eq!(agent["CAIRN_NAMESPACE"], CAIRN_NAMESPACE);
        assert_eq!(
            agent["CAIRN_REPOSITORY_ROOTS"],
            cluster.repository_dir().display().to_string()
        );
    }
    Ok(())
}
