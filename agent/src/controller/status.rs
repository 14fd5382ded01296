//! Status writing: server-side apply under the `cairn-agent` field manager,
//! conditions that keep `lastTransitionTime`, and failure reasons.
//!
//! Every checkpoint and backup status goes out through [`apply_status`],
//! which derives the kstatus conditions (`Reconciling`, `Stalled`) and
//! `observedGeneration` from the phase and `Ready` first
//! ([`cairn_api::conditions::sync_lifecycle`]), so no call site can forget
//! them. The agent owns them from the moment it moves the phase on from
//! `Pending` (ownership table in `cairn_api::conditions`).

use cairn_api::conditions::{LifecycleStatus, NewCondition, set_condition, sync_lifecycle};
use cairn_api::{AGENT_MANAGER, Condition};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Condition types the agent owns.
pub const AGENT_CONDITIONS: &[&str] = &[
    "Ready",
    "Reconciling",
    "Stalled",
    "DomainRecorded",
    "CleanedUp",
    "Verified",
    "Degraded",
    cairn_api::CHECKPOINT_CREATED_CONDITION,
    cairn_api::APPLICATION_CONSISTENT_CONDITION,
    cairn_api::GUEST_FROZEN_CONDITION,
];

/// Applies `status` (the agent's whole share of it) to object `name`, with
/// `Reconciling`, `Stalled` and `observedGeneration` derived from its phase.
pub async fn apply_status<K, S>(api: &Api<K>, name: &str, status: &S) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
    S: Serialize + LifecycleStatus + Clone,
{
    let mut status = status.clone();
    sync_lifecycle(&mut status, Timestamp::now());
    apply_any_status(api, name, &status).await
}

/// Applies a status that has no lifecycle (a QemuInstance's).
pub async fn apply_any_status<K, S>(api: &Api<K>, name: &str, status: &S) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
    S: Serialize,
{
    let body = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(AGENT_MANAGER).force(),
        &Patch::Apply(body),
    )
    .await?;
    Ok(())
}

/// Whether `cached` (from the watch cache) is the object as the API server has
/// it now. The cache trails the agent's own status writes by a watch event,
/// so a reconcile that would act on QEMU from the phase checks this first: a
/// stale `Pending` must not start a second job, and a stale `Creating` must
/// not adopt a bitmap whose creation this agent already reported as failed.
pub async fn cache_is_current<K>(api: &Api<K>, cached: &K) -> Result<bool, kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let name = cached.meta().name.clone().unwrap_or_default();
    let fresh = api.get_opt(&name).await?;
    Ok(fresh.is_some_and(|f| f.meta().resource_version == cached.meta().resource_version))
}

/// The agent's conditions out of `existing`, with `updates` set on top.
pub fn agent_conditions(
    existing: &[Condition],
    updates: &[NewCondition<'_>],
    generation: Option<i64>,
) -> Vec<Condition> {
    let mut mine: Vec<Condition> = existing
        .iter()
        .filter(|c| AGENT_CONDITIONS.contains(&c.type_.as_str()))
        .cloned()
        .collect();
    for u in updates {
        set_condition(&mut mine, u.clone(), generation, Timestamp::now());
    }
    mine
}

/// A condition in one call.
pub fn cond<'a>(
    type_: &'a str,
    status: bool,
    reason: &'a str,
    message: impl Into<String>,
) -> NewCondition<'a> {
    NewCondition {
        type_,
        status,
        reason,
        message: message.into(),
    }
}

/// `error: cause: cause…` — the whole chain, for a condition message.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        src = c.source();
    }
    s
}

/// Stable CamelCase reason of a checkpoint failure.
pub fn checkpoint_reason(e: &crate::checkpoint::CheckpointError) -> &'static str {
    use crate::checkpoint::CheckpointError as E;
    match e {
        E::Selection(s) => selection_reason(s),
        E::InvalidName { .. } => "InvalidName",
        E::AlreadyExists { .. } => "BitmapExists",
        E::Missing { .. } => "BitmapMissing",
        E::NotPersistent { .. } => "BitmapNotPersistent",
        E::Inconsistent { .. } => "BitmapInconsistent",
        E::Disabled { .. } => "BitmapDisabled",
        E::DomainMismatch { .. } => "DomainMismatch",
        E::Busy { .. } => "BitmapBusy",
        E::NotFound { .. } => "BitmapMissing",
        E::Inventory(_) => "VirtualMachineUnreachable",
        E::Qmp { .. } => "QemuError",
        E::Image { .. } => "ImageError",
    }
}

/// Stable reason of a repository failure.
pub fn repository_reason(e: &cairn_repo::RepoError) -> &'static str {
    use cairn_repo::RepoError as R;
    use cairn_repo::StorageError as S;
    match e {
        R::WrongKey | R::EncryptionMismatch(_) => "RepositoryKeyMismatch",
        R::ChunkSizeMismatch { .. } => "ChunkSizeMismatch",
        R::Storage(S::Credentials(_)) => "RepositoryCredentialsRefused",
        R::Storage(S::MissingBucket { .. }) => "RepositoryBucketMissing",
        R::Storage(_) => "RepositoryUnavailable",
        R::Source { .. } => "ExportBroken",
        R::ChunkCorrupt { .. } => "ChunkCorrupt",
        R::ChunkMissing { .. } => "ChunkMissing",
        _ => "RepositoryError",
    }
}

fn selection_reason(e: &crate::inventory::SelectionError) -> &'static str {
    use crate::inventory::SelectionError as S;
    match e {
        S::UnknownDisk { .. } => "UnknownDisk",
        S::ReadOnly { .. } => "DiskReadOnly",
        S::Duplicate { .. } => "DuplicateDisk",
        S::NotQcow2 { .. } => "DiskNotQcow2",
        S::NoDisks { .. } => "NoQcow2Disk",
    }
}

/// Stable CamelCase reason of a backup failure.
pub fn backup_reason(e: &crate::backup::BackupError) -> &'static str {
    use crate::backup::BackupError as E;
    match e {
        E::Quiesce(q) => q.reason(),
        E::Selection(s) => selection_reason(s),
        E::Checkpoint(c) => checkpoint_reason(c),
        E::Inventory(_) => "VirtualMachineUnreachable",
        E::InvalidName { .. } => "InvalidName",
        E::OutsideAllowedRoots { .. } => "TargetNotAllowed",
        E::Repository { source, .. } => repository_reason(source),
        E::Export { .. } => "ExportBroken",
        E::TenantPath(t) if t.is_refusal() => "TargetNotAllowed",
        E::TenantPath(_) => "TargetError",
        E::ForeignManifest { .. } => "TargetNotAllowed",
        E::ManifestFileName { .. } => "BadManifest",
        E::ScratchFull { .. } => "ScratchFull",
        E::ExportBroken { .. } => "ExportBroken",
        E::InsufficientSpace { .. } | E::NoSpace { .. } => "NoSpace",
        E::BaseUnusable { .. } => "IncrementalBaseUnusable",
        E::JobFailed { .. } => "JobFailed",
        E::Cancelled { .. } => "Cancelled",
        E::VmGone { .. } => "VirtualMachineGone",
        E::NbdServerBusy { .. } => "NbdServerBusy",
        E::ExportPortInUse { .. } => "ExportPortInUse",
        E::ExportPortOutsideRange { .. } => "ExportPortOutsideRange",
        E::NoFreeExportPort { .. } => "NoFreeExportPort",
        E::TcpExportsDisabled { .. } => "TcpExportsDisabled",
        E::TlsKey { .. } => "TlsKeyUnavailable",
        E::Qmp { .. } => "QemuError",
        E::Image { .. } => "ImageError",
        E::TargetIo { .. } => "TargetError",
        E::BadManifest { .. } => "BadManifest",
        E::FileChanged { .. } => "ChecksumFailed",
    }
}

/// Now, as a Kubernetes Time.
pub fn now() -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now())
}
