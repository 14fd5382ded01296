//! `BackupRepository`: where backups leave the node — a deduplicated,
//! compressed and (optionally) encrypted store on S3 or a shared directory,
//! set up by the platform admin and used by tenants by name.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::Condition;

/// Desired repository. Cluster-scoped: the admin creates it, tenants name it in
/// a VirtualMachineBackup's `target.repository`.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "cairn.dev",
    version = "v1alpha1",
    kind = "BackupRepository",
    plural = "backuprepositories",
    shortname = "vmrepo",
    category = "cairn",
    label("app.kubernetes.io/part-of", "cairn"),
    status = "BackupRepositoryStatus",
    doc = "A deduplicated, compressed and optionally encrypted backup store on S3 or a shared directory: where backups leave the node they protect.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Encrypted", type_ = "boolean", json_path = ".status.encrypted"),
    printcolumn(
        name = "Snapshots",
        type_ = "integer",
        format = "int64",
        json_path = ".status.snapshotCount"
    ),
    printcolumn(
        name = "Stored",
        type_ = "integer",
        format = "int64",
        json_path = ".status.storedBytes"
    ),
    printcolumn(name = "Dedup", type_ = "string", json_path = ".status.dedupRatio"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("self.storage == oldSelf.storage").message("storage is immutable: create a new BackupRepository for another location"))]
#[x_kube(validation = Rule::new("!has(oldSelf.chunkSize) || (has(self.chunkSize) && self.chunkSize == oldSelf.chunkSize)").message("chunkSize is immutable: the chunks already stored were cut at the old size"))]
#[x_kube(validation = Rule::new("has(self.encryption) == has(oldSelf.encryption)").message("encryption cannot be switched on or off on an existing repository"))]
#[serde(rename_all = "camelCase")]
pub struct BackupRepositorySpec {
    /// Where the data lives: exactly one of `s3` or `directory`.
    pub storage: RepositoryStorage,

    /// Authenticated encryption of every stored object with the key in a Secret
    /// of Cairn's namespace. Absent = unencrypted (the status says so).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<RepositoryEncryption>,

    /// Compression of chunks before encryption.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<Compression>,

    /// Fixed chunk size in bytes: a power of two from 64 KiB to 16 MiB. Fixed when
    /// the repository is initialised. Default: see docs/repository-format.md.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self in [65536, 131072, 262144, 524288, 1048576, 2097152, 4194304, 8388608, 16777216]").message("chunkSize must be a power of two from 65536 (64 KiB) to 16777216 (16 MiB)"))]
    pub chunk_size: Option<i64>,

    /// Namespaces whose backups may use this repository; a backup from any other
    /// namespace fails with `RepositoryNotAllowed`. Absent = no namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_namespaces: Option<AllowedNamespaces>,

    /// Schedules of prune + garbage collection and of verification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance: Option<RepositoryMaintenance>,
}

/// Exactly one storage backend.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(validation = Rule::new("has(self.s3) != has(self.directory)").message("storage takes exactly one of s3 or directory"))]
#[serde(rename_all = "camelCase")]
pub struct RepositoryStorage {
    /// An S3-compatible object store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Storage>,
    /// A directory mounted at the same path on every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory: Option<DirectoryStorage>,
}

/// An S3-compatible bucket.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct S3Storage {
    /// Endpoint URL, e.g. `https://s3.eu-west-1.amazonaws.com` or `http://127.0.0.1:7070`.
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new("self.startsWith('http://') || self.startsWith('https://')").message("endpoint must be an http:// or https:// URL"))]
    pub endpoint: String,
    /// Bucket name.
    #[schemars(length(min = 3, max = 63))]
    pub bucket: String,
    /// Key prefix inside the bucket (no leading slash).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512), regex(pattern = r"^[^/].*$"))]
    pub prefix: Option<String>,
    /// Region (default `us-east-1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub region: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`), as most self-hosted servers want.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_style: Option<bool>,
    /// Secret in Cairn's namespace with keys `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`.
    #[schemars(length(min = 1, max = 253))]
    pub credentials_secret: String,
}

/// A shared directory.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DirectoryStorage {
    /// Absolute path, present on every node (NFS, CephFS, ...), under an allowed root.
    #[schemars(length(min = 2, max = 4096))]
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("storage.directory.path must be absolute"))]
    #[x_kube(validation = Rule::new("!self.contains('/../') && !self.endsWith('/..')").message("storage.directory.path must not contain '..'"))]
    pub path: String,
}

/// Where the encryption key is.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RepositoryEncryption {
    /// Secret in Cairn's namespace whose key `key` holds the repository key (any
    /// length; it is stretched). Losing it loses every backup in the repository.
    #[schemars(length(min = 1, max = 253))]
    pub key_secret: String,
}

/// Chunk compression.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Compression {
    /// zstd (the default).
    #[default]
    #[serde(rename = "zstd")]
    Zstd,
    /// Stored as is.
    #[serde(rename = "none")]
    None,
}

/// Which namespaces may use a repository.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AllowedNamespaces {
    /// Namespaces by name; `*` allows every namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
    /// Namespaces by label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

/// Maintenance schedules (5-field cron, UTC).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RepositoryMaintenance {
    /// When to prune deleted snapshots and collect unreferenced chunks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prune_schedule: Option<String>,
    /// When to read and authenticate every chunk of every snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_schedule: Option<String>,
    /// Chunks written less than this long ago are never collected, so an
    /// in-flight backup's chunks survive a concurrent GC (default 86400).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 2592000))]
    pub gc_grace_seconds: Option<i64>,
    /// Change this value to run prune + GC now (e.g. a timestamp).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prune_requested: Option<String>,
    /// Change this value to run a verify now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_requested: Option<String>,
}

/// Observed repository state.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackupRepositoryStatus {
    /// `Ready`: reachable, initialised, and the key matches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// On-storage format version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format_version: Option<i64>,
    /// Whether stored objects are encrypted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encrypted: Option<bool>,
    /// Chunk size the repository was initialised with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_size: Option<i64>,
    /// Bytes of all snapshots as disks (what restores would write).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logical_bytes: Option<i64>,
    /// Bytes stored (after dedup, zero elision and compression).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_bytes: Option<i64>,
    /// logicalBytes / storedBytes, e.g. `12.3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedup_ratio: Option<String>,
    /// Snapshots in the repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_count: Option<i64>,
    /// Last prune + GC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_prune: Option<MaintenanceRun>,
    /// Last verify.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verify: Option<MaintenanceRun>,
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// One maintenance run.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MaintenanceRun {
    /// When it finished.
    pub time: Option<Time>,
    /// `Succeeded` or `Failed`.
    pub result: String,
    /// What it did or found, in a sentence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The request value it answered (`maintenance.pruneRequested` / `verifyRequested`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
}
