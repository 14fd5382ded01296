//! The BackupRepository controller: keeps each repository's status current
//! and runs its maintenance.
//!
//! ```text
//! reconcile(repository)
//!   1. resolve   Secrets of Cairn's namespace + spec → storage settings and key (storage_config, pure)
//!   2. open      open the repository, or initialise it on first use (spec.chunkSize, compression);
//!                failures become a Ready=False reason (classify, pure)
//!   3. maintain  prune + GC and verify when their schedule or request is due (due, pure)
//!   4. measure   logical/stored bytes, dedup ratio, snapshot count
//!   5. report    status (plan_status, pure) with server-side apply; an event per maintenance run
//!   6. requeue   after REFRESH_INTERVAL, or at the next scheduled run if sooner
//! ```
//!
//! Credentials and keys are read from Secrets in Cairn's own namespace
//! ([`RepositorySettings::namespace`]) at every reconcile and live only in
//! memory: they never reach status, events or logs (messages name the
//! Secret, never its content).
//!
//! The backup controller uses [`delete_backup_snapshot`] for
//! `deletionPolicy: Delete`. A repository snapshot is a full index, so
//! deleting one never breaks another snapshot.

use std::collections::{BTreeMap, HashSet};
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use cairn_api::conditions::NewCondition;
use cairn_api::{
    BackupRepository, BackupRepositorySpec, BackupRepositoryStatus, DeletionPolicy, MaintenanceRun,
    VirtualMachineBackup, condition_types,
};
use cairn_repo::{
    GcOptions, InitOptions, Manifest, RepoError, Repository, RepositoryKey, RepositoryStats,
    S3Config, StorageConfig, StorageError, VerifyReport,
};
use chrono::{DateTime, Utc};
use croner::Cron;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use crate::context::Context;
use crate::error::{Error, Result};
use crate::routing;

/// Name of this controller in metrics and logs.
pub const CONTROLLER: &str = "repository";
/// How often a repository's status is refreshed without any change.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(60);
/// How soon a repository that is not ready is looked at again (Secrets are
/// not watched: a Secret created later is found by this poll).
pub const RETRY_NOT_READY: Duration = Duration::from_secs(30);
/// Upper bound of opening a repository and reading its figures; object_store
/// retries for minutes on its own, a status should say "unavailable" sooner.
pub const STORAGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `maintenance.gcGraceSeconds`.
pub const DEFAULT_GC_GRACE_SECONDS: i64 = 86_400;
/// Data keys of the credentials Secret.
pub const ACCESS_KEY_ID: &str = "AWS_ACCESS_KEY_ID";
/// Data keys of the credentials Secret.
pub const SECRET_ACCESS_KEY: &str = "AWS_SECRET_ACCESS_KEY";
/// Data key of the encryption key Secret.
pub const KEY_DATA_KEY: &str = "key";

/// `Ready=True`.
pub const REASON_READY: &str = "RepositoryReady";
/// A Secret named by the spec does not exist in Cairn's namespace.
pub const REASON_SECRET_MISSING: &str = "SecretMissing";
/// A Secret exists but lacks a data key.
pub const REASON_SECRET_INVALID: &str = "SecretInvalid";
/// The storage settings cannot work (directory outside the allowed roots, bad endpoint, short key…).
pub const REASON_INVALID_SETTINGS: &str = "InvalidSettings";
/// The storage did not answer (network, server error, timeout).
pub const REASON_UNAVAILABLE: &str = "RepositoryUnavailable";
/// The bucket does not exist.
pub const REASON_BUCKET_MISSING: &str = "BucketMissing";
/// The server refused the credentials.
pub const REASON_CREDENTIALS_REFUSED: &str = "CredentialsRefused";
/// The key does not match the repository's key.
pub const REASON_WRONG_KEY: &str = "WrongKey";
/// The repository is encrypted and no key was given, or the other way round.
pub const REASON_ENCRYPTION_MISMATCH: &str = "EncryptionMismatch";
/// The repository was initialised with another chunk size.
pub const REASON_CHUNK_SIZE_MISMATCH: &str = "ChunkSizeMismatch";
/// The repository has a newer format than this operator reads.
pub const REASON_UNSUPPORTED_FORMAT: &str = "UnsupportedFormat";
/// The repository config is unreadable.
pub const REASON_DAMAGED: &str = "RepositoryDamaged";

/// kstatus condition: work in progress (always False here: a reconcile ends with a verdict).
pub const RECONCILING: &str = "Reconciling";
/// kstatus condition: the repository cannot be used until something changes.
pub const STALLED: &str = "Stalled";

/// Result of a maintenance run.
pub const RESULT_SUCCEEDED: &str = "Succeeded";
/// Result of a maintenance run.
pub const RESULT_FAILED: &str = "Failed";

/// Where repository Secrets live and which directories repositories may use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepositorySettings {
    /// Cairn's own namespace: the only place repository Secrets are read from.
    pub namespace: String,
    /// Directories that `storage.directory.path` must lie under; empty: any absolute path.
    pub roots: Vec<PathBuf>,
}

impl Default for RepositorySettings {
    fn default() -> Self {
        Self {
            namespace: "cairn-system".into(),
            roots: Vec::new(),
        }
    }
}

/// Why a repository is not usable: a stable reason and a sentence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Stable CamelCase reason.
    pub reason: &'static str,
    /// What is wrong and what to do.
    pub message: String,
}

impl Problem {
    fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

/// S3 credentials read from the credentials Secret. Not `Debug`.
pub struct Credentials {
    /// `AWS_ACCESS_KEY_ID`.
    pub access_key_id: String,
    /// `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: String,
}

// ---------------------------------------------------------------- 1. resolve

/// Checks a directory repository's path against the allowed roots: absolute,
/// without `.`/`..` components, and (when roots are configured) beneath one
/// of them — also after resolving symlinks of the part that exists.
pub fn check_directory(path: &str, roots: &[PathBuf]) -> Result<PathBuf, Problem> {
    let p = Path::new(path);
    let bad = |why: &str| {
        Problem::new(
            REASON_INVALID_SETTINGS,
            format!("storage.directory.path {path:?} {why}"),
        )
    };
    if !p.is_absolute() {
        return Err(bad("is not absolute"));
    }
    if p.components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(bad("must not contain '.' or '..'"));
    }
    if roots.is_empty() {
        return Ok(p.to_path_buf());
    }
    // A root is matched as written and as resolved (a root given through a
    // symlink, e.g. /var/run -> /run, still matches either spelling).
    let under = |candidate: &Path| {
        roots.iter().any(|r| {
            let resolved = std::fs::canonicalize(r).unwrap_or_else(|_| r.clone());
            [r.as_path(), resolved.as_path()]
                .iter()
                .any(|r| candidate.starts_with(r) && candidate != *r)
        })
    };
    // The deepest existing ancestor, with its symlinks resolved, plus the rest.
    let mut existing = p.to_path_buf();
    let mut rest = Vec::new();
    while !existing.exists() {
        match (
            existing.file_name().map(|n| n.to_owned()),
            existing.parent(),
        ) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent.to_path_buf();
            }
            _ => break,
        }
    }
    let mut resolved = std::fs::canonicalize(&existing).unwrap_or(existing);
    for name in rest.into_iter().rev() {
        resolved.push(name);
    }
    if under(p) && under(&resolved) {
        Ok(p.to_path_buf())
    } else {
        let allowed: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
        Err(bad(&format!(
            "is not under an allowed repository root ({}; operator setting CAIRN_REPOSITORY_ROOTS)",
            allowed.join(", ")
        )))
    }
}

/// The storage settings of `spec`, with `credentials` for S3.
pub fn storage_config(
    spec: &BackupRepositorySpec,
    credentials: Option<Credentials>,
    roots: &[PathBuf],
) -> Result<StorageConfig, Problem> {
    match (&spec.storage.s3, &spec.storage.directory, credentials) {
        (Some(s3), None, Some(c)) => Ok(StorageConfig::S3(S3Config {
            endpoint: s3.endpoint.clone(),
            bucket: s3.bucket.clone(),
            prefix: s3.prefix.clone().filter(|p| !p.is_empty()),
            region: s3.region.clone(),
            access_key_id: c.access_key_id,
            secret_access_key: c.secret_access_key,
        })),
        (Some(_), None, None) => Err(Problem::new(
            REASON_SECRET_MISSING,
            "no credentials for storage.s3",
        )),
        (None, Some(dir), _) => Ok(StorageConfig::Directory {
            path: check_directory(&dir.path, roots)?,
        }),
        _ => Err(Problem::new(
            REASON_INVALID_SETTINGS,
            "storage takes exactly one of s3 or directory",
        )),
    }
}

/// Settings for initialising the repository on first use.
pub fn init_options(spec: &BackupRepositorySpec) -> Result<InitOptions, Problem> {
    let mut options = InitOptions::default();
    if let Some(cs) = spec.chunk_size {
        options.chunk_size = u32::try_from(cs).map_err(|_| {
            Problem::new(
                REASON_INVALID_SETTINGS,
                format!("chunkSize {cs} is out of range"),
            )
        })?;
        options.pack_size = options.pack_size.max(options.chunk_size);
    }
    options.compression = match spec.compression.unwrap_or_default() {
        cairn_api::Compression::Zstd => cairn_repo::Compression::Zstd,
        cairn_api::Compression::None => cairn_repo::Compression::None,
    };
    Ok(options)
}

/// The Ready=False reason and message of a repository error. Messages name
/// settings and Secrets, never their values.
pub fn classify(error: &RepoError, name: &str, spec: &BackupRepositorySpec) -> Problem {
    let secret = spec
        .storage
        .s3
        .as_ref()
        .map(|s| s.credentials_secret.as_str())
        .unwrap_or_default();
    let key_secret = spec
        .encryption
        .as_ref()
        .map(|e| e.key_secret.as_str())
        .unwrap_or_default();
    match error {
        RepoError::WrongKey => Problem::new(
            REASON_WRONG_KEY,
            format!(
                "the key in Secret {key_secret:?} is not the key repository {name} was initialised with: restore the original key (nothing was written)"
            ),
        ),
        RepoError::EncryptionMismatch(what) => Problem::new(
            REASON_ENCRYPTION_MISMATCH,
            format!("{what}: spec.encryption must match how the repository was initialised"),
        ),
        RepoError::ChunkSizeMismatch { stored, requested } => Problem::new(
            REASON_CHUNK_SIZE_MISMATCH,
            format!(
                "the repository was initialised with chunks of {stored} bytes, spec.chunkSize asks for {requested}: set chunkSize to {stored} or use another location"
            ),
        ),
        RepoError::UnsupportedVersion { found } => Problem::new(
            REASON_UNSUPPORTED_FORMAT,
            format!(
                "the repository has format version {found}, newer than this operator reads ({}): upgrade Cairn",
                cairn_repo::FORMAT_VERSION
            ),
        ),
        RepoError::BadConfig(_) | RepoError::Damaged { .. } => {
            Problem::new(REASON_DAMAGED, format!("{error}"))
        }
        RepoError::InvalidSettings(what) => Problem::new(REASON_INVALID_SETTINGS, what.clone()),
        RepoError::Storage(StorageError::MissingBucket { bucket }) => Problem::new(
            REASON_BUCKET_MISSING,
            format!("the bucket {bucket:?} does not exist: create it, or fix storage.s3.bucket"),
        ),
        RepoError::Storage(StorageError::Credentials(_)) => Problem::new(
            REASON_CREDENTIALS_REFUSED,
            format!(
                "the storage refused the credentials of Secret {secret:?}: check {ACCESS_KEY_ID} and {SECRET_ACCESS_KEY}"
            ),
        ),
        RepoError::Storage(StorageError::Config(what)) => Problem::new(
            REASON_INVALID_SETTINGS,
            format!("the storage settings are invalid: {what}"),
        ),
        other => Problem::new(
            REASON_UNAVAILABLE,
            format!("the repository storage is not reachable: {}", chain(other)),
        ),
    }
}

/// An error with its sources, in one line (no credentials: object_store
/// errors carry URLs and status texts, never signing keys).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The data of Secret `name` in Cairn's namespace; `None` when it does not exist.
async fn secret_data(
    client: &Client,
    settings: &RepositorySettings,
    name: &str,
) -> Result<Option<BTreeMap<String, Vec<u8>>>> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &settings.namespace);
    let secret = api.get_opt(name).await.map_err(Error::kube(format!(
        "reading Secret {}/{name}",
        settings.namespace
    )))?;
    Ok(secret.map(|s| {
        let mut data: BTreeMap<String, Vec<u8>> = s
            .string_data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.into_bytes()))
            .collect();
        for (k, v) in s.data.unwrap_or_default() {
            data.insert(k, v.0);
        }
        data
    }))
}

fn secret_missing(settings: &RepositorySettings, name: &str, field: &str) -> Problem {
    Problem::new(
        REASON_SECRET_MISSING,
        format!(
            "Secret {name:?} named by {field} does not exist in Cairn's namespace {:?}: create it there",
            settings.namespace
        ),
    )
}

fn secret_invalid(settings: &RepositorySettings, name: &str, key: &str) -> Problem {
    Problem::new(
        REASON_SECRET_INVALID,
        format!(
            "Secret {}/{name} has no non-empty data key {key:?}",
            settings.namespace
        ),
    )
}

/// Step 1: storage settings and key of `repo`, from its spec and the Secrets.
pub async fn resolve(
    client: &Client,
    settings: &RepositorySettings,
    spec: &BackupRepositorySpec,
) -> Result<Result<(StorageConfig, RepositoryKey), Problem>> {
    let credentials = match &spec.storage.s3 {
        Some(s3) => {
            let name = &s3.credentials_secret;
            let Some(data) = secret_data(client, settings, name).await? else {
                return Ok(Err(secret_missing(
                    settings,
                    name,
                    "storage.s3.credentialsSecret",
                )));
            };
            let field = |k: &str| {
                data.get(k)
                    .filter(|v| !v.is_empty())
                    .and_then(|v| String::from_utf8(v.clone()).ok())
                    .map(|v| v.trim().to_string())
                    .ok_or_else(|| secret_invalid(settings, name, k))
            };
            let (id, secret) = match (field(ACCESS_KEY_ID), field(SECRET_ACCESS_KEY)) {
                (Ok(i), Ok(s)) => (i, s),
                (Err(p), _) | (_, Err(p)) => return Ok(Err(p)),
            };
            Some(Credentials {
                access_key_id: id,
                secret_access_key: secret,
            })
        }
        None => None,
    };
    let key = match &spec.encryption {
        Some(enc) => {
            let name = &enc.key_secret;
            let Some(data) = secret_data(client, settings, name).await? else {
                return Ok(Err(secret_missing(settings, name, "encryption.keySecret")));
            };
            match data.get(KEY_DATA_KEY).filter(|v| !v.is_empty()) {
                Some(k) => RepositoryKey::Key(k.clone()),
                None => return Ok(Err(secret_invalid(settings, name, KEY_DATA_KEY))),
            }
        }
        None => RepositoryKey::None,
    };
    Ok(storage_config(spec, credentials, &settings.roots).map(|s| (s, key)))
}

// ------------------------------------------------------------------- 2. open

/// How [`connect`] opens a repository.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    /// Initialise it when it has no config yet (the repository controller).
    OpenOrInit,
    /// Open only (deleting a backup's snapshot never creates a repository).
    Open,
}

/// Steps 1 and 2: resolves the settings of `repo` and opens it.
pub async fn connect(
    client: &Client,
    settings: &RepositorySettings,
    repo: &BackupRepository,
    mode: OpenMode,
) -> Result<Result<Repository, Problem>> {
    let name = repo.name_any();
    let (storage, key) = match resolve(client, settings, &repo.spec).await? {
        Ok(v) => v,
        Err(p) => return Ok(Err(p)),
    };
    let options = match init_options(&repo.spec) {
        Ok(o) => o,
        Err(p) => return Ok(Err(p)),
    };
    if let (OpenMode::OpenOrInit, StorageConfig::Directory { path }) = (mode, &storage)
        && let Err(e) = tokio::fs::create_dir_all(path).await
    {
        return Ok(Err(Problem::new(
            REASON_INVALID_SETTINGS,
            format!(
                "the repository directory {} cannot be created: {e}",
                path.display()
            ),
        )));
    }
    let open = async {
        match mode {
            OpenMode::OpenOrInit => Repository::open_or_init(&storage, &key, &options).await,
            OpenMode::Open => Repository::open(&storage, &key, None).await,
        }
    };
    Ok(match tokio::time::timeout(STORAGE_TIMEOUT, open).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(classify(&e, &name, &repo.spec)),
        Err(_) => Err(Problem::new(
            REASON_UNAVAILABLE,
            format!(
                "the repository storage did not answer within {}s",
                STORAGE_TIMEOUT.as_secs()
            ),
        )),
    })
}

// --------------------------------------------------------------- 3. maintain

/// Parses a 5-field cron schedule (UTC).
pub fn parse_schedule(field: &str, schedule: &str) -> Result<Cron, Problem> {
    if schedule.split_whitespace().count() != 5 && !schedule.trim().starts_with('@') {
        return Err(Problem::new(
            "InvalidSchedule",
            format!("maintenance.{field} {schedule:?} is not a 5-field cron expression"),
        ));
    }
    Cron::from_str(schedule).map_err(|e| {
        Problem::new(
            "InvalidSchedule",
            format!("maintenance.{field} {schedule:?} is not a valid cron expression: {e}"),
        )
    })
}

/// Why a maintenance run is due.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// A scheduled time passed since the last run.
    Schedule(DateTime<Utc>),
    /// `pruneRequested`/`verifyRequested` differs from the last run's `request`.
    Request(String),
}

/// Whether a maintenance run is due at `now`. `since` is when the
/// repository appeared (a schedule does not fire for times before it).
pub fn due(
    schedule: Option<&Cron>,
    requested: Option<&str>,
    last: Option<&MaintenanceRun>,
    since: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Option<Trigger> {
    if let Some(r) = requested.filter(|r| !r.is_empty())
        && last.and_then(|l| l.request.as_deref()) != Some(r)
    {
        return Some(Trigger::Request(r.to_string()));
    }
    let cron = schedule?;
    let previous = cron.find_previous_occurrence(&now, true).ok()?;
    let baseline = last
        .and_then(|l| l.time.as_ref())
        .map(|t| to_chrono(t.0))
        .unwrap_or(since);
    (previous > baseline).then_some(Trigger::Schedule(previous))
}

/// When `schedule` fires next after `now`.
pub fn next_run(schedule: Option<&Cron>, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    schedule?.find_next_occurrence(&now, false).ok()
}

fn to_chrono(t: Timestamp) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(t.as_millisecond()).unwrap_or_default()
}

/// Snapshots of `manifests` that the cluster no longer keeps: those of a
/// VirtualMachineBackup into `repository` that is being deleted with
/// `deletionPolicy: Delete` (matched by UID and namespace, never by name).
pub fn snapshots_to_prune(
    repository: &str,
    manifests: &[Manifest],
    backups: &[Arc<VirtualMachineBackup>],
) -> Vec<String> {
    let doomed: HashSet<(String, String)> = backups
        .iter()
        .filter(|b| routing::deleting(b.as_ref()))
        .filter(|b| b.spec.deletion_policy == Some(DeletionPolicy::Delete))
        .filter(|b| target_repository(b) == Some(repository))
        .filter_map(|b| Some((b.namespace()?, b.uid()?)))
        .collect();
    manifests
        .iter()
        .filter(|m| doomed.contains(&(m.namespace.clone(), m.backup_uid.clone())))
        .map(|m| m.id.clone())
        .collect()
}

fn target_repository(b: &VirtualMachineBackup) -> Option<&str> {
    b.spec
        .target
        .as_ref()
        .and_then(|t| t.repository.as_ref())
        .map(|r| r.name.as_str())
}

/// Prune + GC; returns the run's message.
async fn prune_and_gc(
    repo: &Repository,
    name: &str,
    spec: &BackupRepositorySpec,
    backups: &[Arc<VirtualMachineBackup>],
) -> Result<String, RepoError> {
    let manifests = repo.list_snapshots().await?;
    let doomed = snapshots_to_prune(name, &manifests, backups);
    let mut pruned = 0;
    for id in &doomed {
        match repo.delete_snapshot(id).await {
            Ok(()) | Err(RepoError::SnapshotNotFound(_)) => pruned += 1,
            // Still the base of a running backup: next run.
            Err(RepoError::SnapshotInUse(_)) => {}
            Err(e) => return Err(e),
        }
    }
    let grace = spec
        .maintenance
        .as_ref()
        .and_then(|m| m.gc_grace_seconds)
        .unwrap_or(DEFAULT_GC_GRACE_SECONDS)
        .max(0) as u64;
    let options = GcOptions {
        grace: Duration::from_secs(grace),
        ..Default::default()
    };
    let report = repo.gc(&options).await?;
    Ok(format!(
        "pruned {pruned} snapshot(s); GC kept {} pack(s), condemned {}, deleted {} ({} bytes freed), {} waiting; removed {} other object(s)",
        report.packs_kept,
        report.packs_condemned,
        report.packs_deleted,
        report.bytes_freed,
        report.packs_waiting,
        report.other_deleted
    ))
}

/// Verifies every snapshot. `Repository::verify`'s future is not provably
/// `Send` (a higher-ranked closure inside it), so it runs on a blocking
/// thread driving the runtime's handle instead of inside the reconcile future.
async fn verify_all(repo: Repository) -> Result<VerifyReport, String> {
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || handle.block_on(repo.verify(None)))
        .await
        .map_err(|e| format!("the verify task failed: {e}"))?
        .map_err(|e| chain(&e))
}

/// The result and message of a verify report, naming damaged places.
pub fn verify_outcome(report: &VerifyReport) -> (&'static str, String) {
    if report.is_ok() {
        return (
            RESULT_SUCCEEDED,
            format!(
                "verified {} snapshot(s): {} chunk(s), {} bytes, all intact",
                report.snapshots, report.chunks_ok, report.bytes_ok
            ),
        );
    }
    const SHOWN: usize = 5;
    let places: Vec<String> = report
        .problems
        .iter()
        .take(SHOWN)
        .map(|p| match p.offset {
            Some(o) => format!(
                "snapshot {} disk {} offset {o}: {}",
                p.snapshot, p.disk, p.message
            ),
            None => format!("snapshot {} disk {}: {}", p.snapshot, p.disk, p.message),
        })
        .collect();
    let more = report.problems.len().saturating_sub(SHOWN);
    let mut message = format!(
        "{} damaged chunk(s) in {} snapshot(s) checked: {}",
        report.chunks_bad,
        report.snapshots,
        places.join("; ")
    );
    if more > 0 {
        message.push_str(&format!("; and {more} more place(s)"));
    }
    (RESULT_FAILED, message)
}

// ----------------------------------------------------------------- 5. report

/// What was observed of an open repository.
#[derive(Clone, Debug, PartialEq)]
pub struct Observed {
    /// Format version of the config.
    pub format_version: u32,
    /// Whether objects are encrypted.
    pub encrypted: bool,
    /// Chunk size of the config.
    pub chunk_size: u32,
    /// Figures, when they could be read.
    pub stats: Option<RepositoryStats>,
}

/// `logical / stored`, one decimal (`12.3`).
pub fn format_ratio(ratio: f64) -> String {
    format!("{ratio:.1}")
}

/// Step 5: the status to write. A repository that is not ready keeps its
/// last known figures (they describe the data, which is still there).
pub fn plan_status(
    existing: Option<&BackupRepositoryStatus>,
    outcome: Result<&Observed, &Problem>,
    last_prune: Option<MaintenanceRun>,
    last_verify: Option<MaintenanceRun>,
    generation: Option<i64>,
    now: Timestamp,
) -> BackupRepositoryStatus {
    let mut status = existing.cloned().unwrap_or_default();
    let ready = match outcome {
        Ok(o) => {
            status.format_version = Some(o.format_version.into());
            status.encrypted = Some(o.encrypted);
            status.chunk_size = Some(o.chunk_size.into());
            if let Some(s) = &o.stats {
                status.logical_bytes = Some(s.logical_bytes as i64);
                status.stored_bytes = Some(s.stored_bytes as i64);
                status.dedup_ratio = Some(format_ratio(s.dedup_ratio));
                status.snapshot_count = Some(s.snapshot_count as i64);
            }
            NewCondition {
                type_: condition_types::READY,
                status: true,
                reason: REASON_READY,
                message: format!(
                    "reachable, initialised (format {}, {} byte chunks), {}",
                    o.format_version,
                    o.chunk_size,
                    if o.encrypted {
                        "encrypted, key matches"
                    } else {
                        "not encrypted"
                    }
                ),
            }
        }
        Err(p) => NewCondition {
            type_: condition_types::READY,
            status: false,
            reason: p.reason,
            message: p.message.clone(),
        },
    };
    // kstatus reads Reconciling/Stalled, not Ready: a repository that cannot
    // be used is Stalled (Failed for Flux/kpt), one that can is Current.
    let (reason, ok, message) = (ready.reason, ready.status, ready.message.clone());
    let kstatus = [
        NewCondition {
            type_: RECONCILING,
            status: false,
            reason,
            message: message.clone(),
        },
        NewCondition {
            type_: STALLED,
            status: !ok,
            reason,
            message,
        },
    ];
    let mut wanted = vec![ready];
    wanted.extend(kstatus);
    let (conds, _) = routing::operator_conditions(&status.conditions, wanted, generation, now);
    status.conditions = conds;
    if last_prune.is_some() {
        status.last_prune = last_prune;
    }
    if last_verify.is_some() {
        status.last_verify = last_verify;
    }
    status.observed_generation = generation;
    status
}

fn run_record(result: &str, message: String, request: Option<&str>) -> MaintenanceRun {
    MaintenanceRun {
        time: Some(Time(Timestamp::now())),
        result: result.to_string(),
        message: Some(message),
        request: request.map(str::to_string),
    }
}

async fn apply_status(
    api: &Api<BackupRepository>,
    name: &str,
    status: &BackupRepositoryStatus,
) -> Result<()> {
    let body = json!({
        "apiVersion": BackupRepository::api_version(&()),
        "kind": BackupRepository::kind(&()),
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(cairn_api::OPERATOR_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map_err(Error::kube(format!(
        "writing the status of BackupRepository {name}"
    )))?;
    Ok(())
}

// -------------------------------------------------------------- reconcile

/// The reconcile: runs the steps above.
pub async fn reconcile(repo: Arc<BackupRepository>, ctx: Arc<Context>) -> Result<Action> {
    let name = repo.name_any();
    let span = tracing::info_span!("reconcile", controller = CONTROLLER, repository = %name);
    let _enter = span.enter();
    ctx.health.metrics.reconciled(CONTROLLER);
    let api: Api<BackupRepository> = Api::all(ctx.client.clone());
    let now = Utc::now();
    let since = repo
        .meta()
        .creation_timestamp
        .as_ref()
        .map(|t| to_chrono(t.0))
        .unwrap_or(now);
    let existing = repo.status.as_ref();
    let maintenance = repo.spec.maintenance.clone().unwrap_or_default();

    // 1 + 2. resolve, open
    let opened = connect(&ctx.client, &ctx.repositories, &repo, OpenMode::OpenOrInit).await?;

    // 3. maintain
    let mut schedules = Vec::new();
    let mut last_prune = None;
    let mut last_verify = None;
    let prune_cron = schedule(&ctx, &repo, "pruneSchedule", &maintenance.prune_schedule).await;
    let verify_cron = schedule(&ctx, &repo, "verifySchedule", &maintenance.verify_schedule).await;
    schedules.extend(prune_cron.iter().cloned());
    schedules.extend(verify_cron.iter().cloned());
    if let Ok(r) = &opened {
        if let Some(trigger) = due(
            prune_cron.as_ref(),
            maintenance.prune_requested.as_deref(),
            existing.and_then(|s| s.last_prune.as_ref()),
            since,
            now,
        ) {
            tracing::info!(?trigger, "prune + GC starting");
            let backups = ctx.backups.state();
            let outcome = prune_and_gc(r, &name, &repo.spec, &backups).await;
            let (result, message) = match outcome {
                Ok(m) => (RESULT_SUCCEEDED, m),
                Err(e) => (RESULT_FAILED, format!("prune + GC failed: {}", chain(&e))),
            };
            tracing::info!(result, message, "prune + GC finished");
            event(&ctx, &repo, result, "Prune", &message).await;
            last_prune = Some(run_record(
                result,
                message,
                maintenance.prune_requested.as_deref(),
            ));
        }
        if let Some(trigger) = due(
            verify_cron.as_ref(),
            maintenance.verify_requested.as_deref(),
            existing.and_then(|s| s.last_verify.as_ref()),
            since,
            now,
        ) {
            tracing::info!(?trigger, "verify starting");
            let (result, message) = match verify_all(r.clone()).await {
                Ok(report) => verify_outcome(&report),
                Err(e) => (RESULT_FAILED, format!("verify failed: {e}")),
            };
            tracing::info!(result, message, "verify finished");
            event(&ctx, &repo, result, "Verify", &message).await;
            last_verify = Some(run_record(
                result,
                message,
                maintenance.verify_requested.as_deref(),
            ));
        }
    }

    // 4. measure
    let outcome = match opened {
        Ok(r) => {
            let config = r.config();
            let stats = match tokio::time::timeout(STORAGE_TIMEOUT, r.stats()).await {
                Ok(Ok(s)) => Ok(Some(s)),
                Ok(Err(e)) => Err(classify(&e, &name, &repo.spec)),
                Err(_) => Ok(None),
            };
            stats.map(|stats| Observed {
                format_version: config.version,
                encrypted: config.encryption.is_some(),
                chunk_size: config.chunk_size,
                stats,
            })
        }
        Err(p) => Err(p),
    };

    // 5. report
    let was_ready = existing
        .is_some_and(|s| cairn_api::conditions::is_true(&s.conditions, condition_types::READY));
    let status = plan_status(
        existing,
        outcome.as_ref(),
        last_prune,
        last_verify,
        repo.meta().generation,
        Timestamp::now(),
    );
    if Some(&status) != existing {
        apply_status(&api, &name, &status).await?;
    }
    match &outcome {
        Ok(_) if !was_ready => {
            tracing::info!("repository ready");
            routing::publish(
                &ctx,
                repo.as_ref(),
                EventType::Normal,
                REASON_READY,
                "the repository is reachable and initialised".into(),
            )
            .await;
        }
        Err(p) if existing.and_then(|s| ready_reason(s)) != Some(p.reason) => {
            tracing::warn!(reason = p.reason, message = %p.message, "repository not ready");
            routing::publish(
                &ctx,
                repo.as_ref(),
                EventType::Warning,
                p.reason,
                p.message.clone(),
            )
            .await;
        }
        _ => {}
    }
    ctx.succeeded(&format!("{CONTROLLER}//{name}"));

    // 6. requeue
    let base = if outcome.is_ok() {
        REFRESH_INTERVAL
    } else {
        RETRY_NOT_READY
    };
    let next = schedules
        .iter()
        .filter_map(|c| next_run(Some(c), Utc::now()))
        .min()
        .and_then(|t| (t - Utc::now()).to_std().ok())
        .map(|d| d + Duration::from_secs(1));
    Ok(Action::requeue(next.map_or(base, |n| n.min(base))))
}

fn ready_reason(s: &BackupRepositoryStatus) -> Option<&str> {
    cairn_api::conditions::find(&s.conditions, condition_types::READY).map(|c| c.reason.as_str())
}

async fn schedule(
    ctx: &Context,
    repo: &BackupRepository,
    field: &str,
    value: &Option<String>,
) -> Option<Cron> {
    let value = value.as_deref().filter(|v| !v.trim().is_empty())?;
    match parse_schedule(field, value) {
        Ok(c) => Some(c),
        Err(p) => {
            tracing::warn!(message = %p.message, "invalid maintenance schedule");
            routing::publish(ctx, repo, EventType::Warning, p.reason, p.message).await;
            None
        }
    }
}

async fn event(ctx: &Context, repo: &BackupRepository, result: &str, what: &str, message: &str) {
    let (type_, reason) = match (result, what) {
        (RESULT_SUCCEEDED, "Prune") => (EventType::Normal, "PruneSucceeded"),
        (_, "Prune") => (EventType::Warning, "PruneFailed"),
        (RESULT_SUCCEEDED, _) => (EventType::Normal, "VerifySucceeded"),
        _ => (EventType::Warning, "VerifyFailed"),
    };
    routing::publish(ctx, repo, type_, reason, message.to_string()).await;
}

// ------------------------------------------------- deletionPolicy: Delete

/// What [`delete_backup_snapshot`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SnapshotDeletion {
    /// Nothing to do: Retain, no repository target, or no snapshot recorded.
    NotApplicable,
    /// The snapshot was deleted (or was already gone).
    Deleted(String),
    /// Left in place, with the reason (a sentence for an event).
    Kept(String),
}

/// `deletionPolicy: Delete` for a backup being deleted: deletes its
/// repository snapshot, after checking that the snapshot's manifest names
/// this backup (UID) and namespace. An unreachable repository is an error
/// (the finalizer stays and the reconcile retries with backoff).
pub async fn delete_backup_snapshot(
    ctx: &Context,
    backup: &VirtualMachineBackup,
) -> Result<SnapshotDeletion> {
    if backup.spec.deletion_policy != Some(DeletionPolicy::Delete) {
        return Ok(SnapshotDeletion::NotApplicable);
    }
    let Some(repo_name) = target_repository(backup) else {
        return Ok(SnapshotDeletion::NotApplicable);
    };
    let Some(snapshot) = backup
        .status
        .as_ref()
        .and_then(|s| s.repository.as_ref())
        .and_then(|r| r.snapshot.clone())
    else {
        return Ok(SnapshotDeletion::NotApplicable);
    };
    let repos: Api<BackupRepository> = Api::all(ctx.client.clone());
    let Some(repo) = repos
        .get_opt(repo_name)
        .await
        .map_err(Error::kube(format!("reading BackupRepository {repo_name}")))?
    else {
        return Ok(SnapshotDeletion::Kept(format!(
            "BackupRepository {repo_name} no longer exists; snapshot {snapshot} was not deleted"
        )));
    };
    let unavailable = |message: String| Error::Repository {
        name: repo_name.to_string(),
        message,
    };
    let r = match connect(&ctx.client, &ctx.repositories, &repo, OpenMode::Open).await? {
        Ok(r) => r,
        Err(p) => return Err(unavailable(format!("{}: {}", p.reason, p.message))),
    };
    let manifest = match r.manifest(&snapshot).await {
        Ok(m) => m,
        Err(RepoError::SnapshotNotFound(_)) => return Ok(SnapshotDeletion::Deleted(snapshot)),
        Err(e) => return Err(unavailable(chain(&e))),
    };
    if Some(&manifest.backup_uid) != backup.uid().as_ref()
        || Some(&manifest.namespace) != backup.namespace().as_ref()
    {
        return Ok(SnapshotDeletion::Kept(format!(
            "snapshot {snapshot} in BackupRepository {repo_name} belongs to another backup; it was not deleted"
        )));
    }
    match r.delete_snapshot(&snapshot).await {
        Ok(()) | Err(RepoError::SnapshotNotFound(_)) => Ok(SnapshotDeletion::Deleted(snapshot)),
        Err(e) => Err(unavailable(chain(&e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_api::{
        BackupTarget, DirectoryStorage, RepositoryStorage, RepositoryTarget, S3Storage,
        VirtualMachineBackupSpec,
    };
    use cairn_repo::VerifyProblem;

    fn utc(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn s3_spec() -> BackupRepositorySpec {
        BackupRepositorySpec {
            storage: RepositoryStorage {
                s3: Some(S3Storage {
                    endpoint: "http://127.0.0.1:7070".into(),
                    bucket: "b".into(),
                    credentials_secret: "creds".into(),
                    ..Default::default()
                }),
                directory: None,
            },
            ..Default::default()
        }
    }

    #[test]
    fn directories_must_lie_under_an_allowed_root() {
        let root = tempfile_dir();
        let roots = vec![root.clone()];
        let inside = format!("{}/repo", root.display());
        assert!(check_directory(&inside, &roots).is_ok());
        assert!(check_directory(&format!("{}/a/b", root.display()), &roots).is_ok());
        let p = check_directory("/etc/repo", &roots).unwrap_err();
        assert_eq!(p.reason, REASON_INVALID_SETTINGS);
        assert!(p.message.contains("/etc/repo") && p.message.contains(&root.display().to_string()));
        // The root itself is not a repository path.
        assert!(check_directory(&root.display().to_string(), &roots).is_err());
        assert!(check_directory(&format!("{}/../x", root.display()), &roots).is_err());
        assert!(check_directory("relative/path", &[]).is_err());
        // No roots configured: any absolute path.
        assert!(check_directory("/srv/anything", &[]).is_ok());
        // A symlink inside the root that leads out of it is refused.
        let link = root.join("escape");
        std::os::unix::fs::symlink("/tmp", &link).unwrap();
        assert!(check_directory(&format!("{}/escape/repo", root.display()), &roots).is_err());
        let _ = std::fs::remove_dir_all(&root);
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "cairn-repoctl-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::canonicalize(d).unwrap()
    }

    fn rand_suffix() -> u128 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    }

    #[test]
    fn storage_config_needs_credentials_for_s3() {
        let spec = s3_spec();
        assert_eq!(
            storage_config(&spec, None, &[]).unwrap_err().reason,
            REASON_SECRET_MISSING
        );
        let c = storage_config(
            &spec,
            Some(Credentials {
                access_key_id: "a".into(),
                secret_access_key: "s".into(),
            }),
            &[],
        )
        .unwrap();
        assert!(matches!(c, StorageConfig::S3(ref s) if s.bucket == "b"));
        // Debug output of the settings never shows the credentials.
        assert!(!format!("{c:?}").contains("\"s\""));
        let dir = BackupRepositorySpec {
            storage: RepositoryStorage {
                s3: None,
                directory: Some(DirectoryStorage {
                    path: "/srv/repo".into(),
                }),
            },
            ..Default::default()
        };
        assert!(matches!(
            storage_config(&dir, None, &[]).unwrap(),
            StorageConfig::Directory { .. }
        ));
    }

    #[test]
    fn init_options_follow_the_spec() {
        let mut spec = s3_spec();
        let o = init_options(&spec).unwrap();
        assert_eq!(o.chunk_size, cairn_repo::DEFAULT_CHUNK_SIZE);
        assert_eq!(o.compression, cairn_repo::Compression::Zstd);
        spec.chunk_size = Some(16 << 20);
        spec.compression = Some(cairn_api::Compression::None);
        let o = init_options(&spec).unwrap();
        assert_eq!(o.chunk_size, 16 << 20);
        assert!(o.pack_size >= o.chunk_size);
        assert_eq!(o.compression, cairn_repo::Compression::None);
    }

    #[test]
    fn errors_become_stable_reasons_without_secrets() {
        let spec = s3_spec();
        let cases: Vec<(RepoError, &str)> = vec![
            (RepoError::WrongKey, REASON_WRONG_KEY),
            (
                RepoError::ChunkSizeMismatch {
                    stored: 65536,
                    requested: 131072,
                },
                REASON_CHUNK_SIZE_MISMATCH,
            ),
            (
                RepoError::Storage(StorageError::MissingBucket { bucket: "b".into() }),
                REASON_BUCKET_MISSING,
            ),
            (
                RepoError::EncryptionMismatch("the repository is encrypted"),
                REASON_ENCRYPTION_MISMATCH,
            ),
            (
                RepoError::UnsupportedVersion { found: 99 },
                REASON_UNSUPPORTED_FORMAT,
            ),
            (
                RepoError::Storage(StorageError::Config("bad url".into())),
                REASON_INVALID_SETTINGS,
            ),
            (
                RepoError::Storage(StorageError::NotFound { key: "x".into() }),
                REASON_UNAVAILABLE,
            ),
        ];
        for (e, reason) in cases {
            let p = classify(&e, "r", &spec);
            assert_eq!(p.reason, reason, "{e}");
        }
        let p = classify(&RepoError::WrongKey, "r", &spec);
        assert!(p.message.contains("nothing was written"));
    }

    fn cron(s: &str) -> Cron {
        parse_schedule("pruneSchedule", s).unwrap()
    }

    fn run(time: &str, request: Option<&str>) -> MaintenanceRun {
        MaintenanceRun {
            time: Some(Time(time.parse().unwrap())),
            result: RESULT_SUCCEEDED.into(),
            message: None,
            request: request.map(Into::into),
        }
    }

    #[test]
    fn schedules_fire_once_per_occurrence_after_creation() {
        let daily = cron("0 3 * * *");
        let created = utc("2026-01-01T10:00:00Z");
        // Before the first 03:00 after creation: not due.
        assert_eq!(
            due(
                Some(&daily),
                None,
                None,
                created,
                utc("2026-01-01T23:00:00Z")
            ),
            None
        );
        // After it: due, once.
        let t = utc("2026-01-02T03:00:30Z");
        assert_eq!(
            due(Some(&daily), None, None, created, t),
            Some(Trigger::Schedule(utc("2026-01-02T03:00:00Z")))
        );
        let last = run("2026-01-02T03:00:40Z", None);
        assert_eq!(
            due(
                Some(&daily),
                None,
                Some(&last),
                created,
                utc("2026-01-02T12:00:00Z")
            ),
            None
        );
        // Missed runs (operator down for days) collapse into one.
        assert!(matches!(
            due(
                Some(&daily),
                None,
                Some(&last),
                created,
                utc("2026-01-05T12:00:00Z")
            ),
            Some(Trigger::Schedule(_))
        ));
        assert_eq!(
            next_run(Some(&daily), utc("2026-01-02T12:00:00Z")),
            Some(utc("2026-01-03T03:00:00Z"))
        );
        assert_eq!(next_run(None, created), None);
    }

    #[test]
    fn requests_run_when_they_differ_from_the_last_answer() {
        let now = utc("2026-01-01T10:00:00Z");
        assert_eq!(
            due(None, Some("1"), None, now, now),
            Some(Trigger::Request("1".into()))
        );
        assert_eq!(
            due(
                None,
                Some("1"),
                Some(&run("2026-01-01T09:00:00Z", Some("1"))),
                now,
                now
            ),
            None
        );
        assert_eq!(
            due(
                None,
                Some("2"),
                Some(&run("2026-01-01T09:00:00Z", Some("1"))),
                now,
                now
            ),
            Some(Trigger::Request("2".into()))
        );
        assert_eq!(due(None, Some(""), None, now, now), None);
        assert_eq!(due(None, None, None, now, now), None);
    }

    #[test]
    fn schedules_are_five_field_cron() {
        assert!(parse_schedule("verifySchedule", "*/15 * * * *").is_ok());
        assert!(parse_schedule("verifySchedule", "@daily").is_ok());
        let p = parse_schedule("verifySchedule", "0 0 3 * * *").unwrap_err();
        assert!(p.message.contains("5-field"));
        assert!(parse_schedule("verifySchedule", "61 * * * *").is_err());
    }

    fn observed() -> Observed {
        Observed {
            format_version: 1,
            encrypted: true,
            chunk_size: 65536,
            stats: Some(RepositoryStats {
                logical_bytes: 1234,
                stored_bytes: 100,
                dedup_ratio: 12.34,
                snapshot_count: 2,
                ..Default::default()
            }),
        }
    }

    #[test]
    fn status_reports_figures_and_keeps_them_when_unready() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let t1: Timestamp = "2026-01-01T00:01:00Z".parse().unwrap();
        let s = plan_status(None, Ok(&observed()), None, None, Some(3), t0);
        assert_eq!(s.dedup_ratio.as_deref(), Some("12.3"));
        assert_eq!(s.snapshot_count, Some(2));
        assert_eq!(s.chunk_size, Some(65536));
        assert_eq!(s.encrypted, Some(true));
        assert_eq!(s.format_version, Some(1));
        assert_eq!(s.observed_generation, Some(3));
        assert!(cairn_api::conditions::is_true(&s.conditions, "Ready"));
        // Same observation later: nothing changes (no write, transition time kept).
        let again = plan_status(Some(&s), Ok(&observed()), None, None, Some(3), t1);
        assert_eq!(again, s);
        let p = Problem::new(REASON_WRONG_KEY, "wrong key");
        let bad = plan_status(Some(&s), Err(&p), None, None, Some(3), t1);
        let ready = cairn_api::conditions::find(&bad.conditions, "Ready").unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", REASON_WRONG_KEY)
        );
        assert_eq!(ready.last_transition_time.0, t1);
        assert_eq!(bad.stored_bytes, Some(100));
        let stalled = cairn_api::conditions::find(&bad.conditions, STALLED).unwrap();
        assert_eq!(
            (stalled.status.as_str(), stalled.reason.as_str()),
            ("True", REASON_WRONG_KEY)
        );
        assert!(!cairn_api::conditions::is_true(
            &bad.conditions,
            RECONCILING
        ));
        assert!(!cairn_api::conditions::is_true(&s.conditions, STALLED));
        // Maintenance runs are kept until a new one replaces them.
        let r = run("2026-01-01T00:00:30Z", Some("x"));
        let with_run = plan_status(Some(&bad), Err(&p), Some(r.clone()), None, Some(3), t1);
        assert_eq!(with_run.last_prune, Some(r.clone()));
        let later = plan_status(Some(&with_run), Ok(&observed()), None, None, Some(3), t1);
        assert_eq!(later.last_prune, Some(r));
        assert_eq!(format_ratio(0.0), "0.0");
    }

    #[test]
    fn verify_failures_name_snapshot_disk_and_offset() {
        let ok = VerifyReport {
            snapshots: 2,
            chunks_ok: 10,
            bytes_ok: 655360,
            ..Default::default()
        };
        assert_eq!(verify_outcome(&ok).0, RESULT_SUCCEEDED);
        let bad = VerifyReport {
            snapshots: 1,
            chunks_bad: 1,
            problems: (0..7)
                .map(|i| VerifyProblem {
                    snapshot: "20260101T000000Z-abcd0123".into(),
                    disk: "vda".into(),
                    offset: Some(i * 65536),
                    message: "the chunk x is corrupt".into(),
                })
                .collect(),
            ..Default::default()
        };
        let (result, message) = verify_outcome(&bad);
        assert_eq!(result, RESULT_FAILED);
        assert!(
            message.contains("snapshot 20260101T000000Z-abcd0123 disk vda offset 65536"),
            "{message}"
        );
        assert!(message.contains("and 2 more"), "{message}");
    }

    fn manifest(id: &str, ns: &str, backup_uid: &str) -> Manifest {
        Manifest {
            version: 1,
            id: id.into(),
            namespace: ns.into(),
            vm: "vm1".into(),
            vm_uid: None,
            backup_uid: backup_uid.into(),
            checkpoint: None,
            base: None,
            time: utc("2026-01-01T00:00:00Z"),
            chunk_size: 65536,
            disks: vec![],
        }
    }

    fn backup(uid: &str, policy: DeletionPolicy, deleting: bool) -> Arc<VirtualMachineBackup> {
        let mut b = VirtualMachineBackup::new(
            uid,
            VirtualMachineBackupSpec {
                virtual_machine: "vm1".into(),
                target: Some(BackupTarget {
                    repository: Some(RepositoryTarget { name: "r".into() }),
                    ..Default::default()
                }),
                deletion_policy: Some(policy),
                ..Default::default()
            },
        );
        b.metadata.namespace = Some("ns".into());
        b.metadata.uid = Some(uid.into());
        if deleting {
            b.metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
        }
        Arc::new(b)
    }

    #[test]
    fn prune_takes_only_snapshots_of_deleted_backups_with_delete_policy() {
        let manifests = vec![
            manifest("s1", "ns", "u1"),
            manifest("s2", "ns", "u2"),
            manifest("s3", "ns", "u3"),
            manifest("s4", "other", "u1"),
            manifest("s5", "ns", "gone"),
        ];
        let backups = vec![
            backup("u1", DeletionPolicy::Delete, true),
            backup("u2", DeletionPolicy::Retain, true),
            backup("u3", DeletionPolicy::Delete, false),
        ];
        assert_eq!(snapshots_to_prune("r", &manifests, &backups), vec!["s1"]);
        assert!(snapshots_to_prune("other-repo", &manifests, &backups).is_empty());
    }
}
