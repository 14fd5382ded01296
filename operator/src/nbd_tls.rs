//! TLS-PSK credentials of pull backups served over TCP (`target.nbd.tcp`).
//!
//! The operator issues one random key per backup and writes it twice:
//! - `<backup>-nbd-tls` in the backup's namespace, for the tenant's client
//!   (`username`, `key` in hex, `keys.psk`), owned by the backup (an
//!   ownerReference, so the garbage collector removes it with the backup
//!   even if the operator never gets to);
//! - `cairn-nbd-psk-<backup uid>` in Cairn's own namespace, for the agent,
//!   which may read Secrets there only and never a tenant's. It also records
//!   the UID of the tenant's copy (annotation), which makes the operator's
//!   writes idempotent and lets it delete exactly that object later (a
//!   delete with a UID precondition never removes a Secret someone else
//!   created under the same name).
//!
//! ```text
//! ensure(backup)   before routing:  agent copy (create or reuse) → tenant copy (create) → record its UID
//! remove(backup)   once the backup finished or is being deleted: tenant copy (UID precondition) → agent copy
//! ```
//!
//! The operator creates and deletes Secrets in tenant namespaces but never
//! reads them (no `get`/`list`/`watch` outside Cairn's namespace).

use std::collections::BTreeMap;

use cairn_api::{
    NBD_TLS_KEY_KEY, NBD_TLS_KEYS_FILE_KEY, NBD_TLS_USERNAME_KEY, VirtualMachineBackup,
    nbd_psk_agent_secret_name, nbd_tls_secret_name,
};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, ObjectMeta, Patch, Preconditions};
use kube::{Resource, ResourceExt};

use crate::context::Context;
use crate::error::{Error, Result};
use crate::routing::Rejection;

/// Annotation on the agent's copy: UID of the tenant's copy the operator created.
pub const TENANT_SECRET_UID_ANNOTATION: &str = "cairn.dev/tenant-secret-uid";
/// Label on both copies: UID of the backup they belong to.
pub const BACKUP_UID_LABEL: &str = "cairn.dev/backup-uid";
/// The tenant's copy exists and the operator did not create it.
pub const REASON_SECRET_EXISTS: &str = "CredentialsSecretExists";

/// Whether `backup` is served over TCP and so needs credentials.
pub fn wanted(backup: &VirtualMachineBackup) -> bool {
    backup.spec.mode == cairn_api::BackupMode::Pull
        && backup
            .spec
            .target
            .as_ref()
            .and_then(|t| t.nbd.as_ref())
            .is_some_and(|n| n.tcp.is_some())
}

/// What [`ensure`] found.
#[derive(Debug)]
pub enum Issued {
    /// Both copies exist.
    Ready,
    /// The tenant's copy cannot be created: a Secret of that name is in the way.
    Conflict(Rejection),
}

/// The Secret data: user name, hex key, and the `keys.psk` line.
pub fn secret_data(username: &str, key_hex: &str) -> BTreeMap<String, ByteString> {
    let b = |s: &str| ByteString(s.as_bytes().to_vec());
    BTreeMap::from([
        (NBD_TLS_USERNAME_KEY.to_string(), b(username)),
        (NBD_TLS_KEY_KEY.to_string(), b(key_hex)),
        (
            NBD_TLS_KEYS_FILE_KEY.to_string(),
            b(&format!("{username}:{key_hex}\n")),
        ),
    ])
}

/// A fresh random 256-bit key, hex-encoded.
pub fn new_key() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

fn labels(uid: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/part-of".into(), "cairn".into()),
        (
            "app.kubernetes.io/managed-by".into(),
            "cairn-operator".into(),
        ),
        (BACKUP_UID_LABEL.into(), uid.into()),
    ])
}

/// The agent's copy, in Cairn's namespace.
pub fn agent_secret(
    cairn_namespace: &str,
    backup: &VirtualMachineBackup,
    uid: &str,
    key_hex: &str,
) -> Secret {
    let username = backup.name_any();
    Secret {
        metadata: ObjectMeta {
            name: Some(nbd_psk_agent_secret_name(uid)),
            namespace: Some(cairn_namespace.into()),
            labels: Some(labels(uid)),
            annotations: Some(BTreeMap::from([(
                "cairn.dev/backup".into(),
                format!("{}/{}", backup.namespace().unwrap_or_default(), username),
            )])),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(secret_data(&username, key_hex)),
        ..Default::default()
    }
}

/// The tenant's copy, in the backup's namespace, owned by the backup.
pub fn tenant_secret(
    backup: &VirtualMachineBackup,
    uid: &str,
    data: BTreeMap<String, ByteString>,
) -> Secret {
    let owner = OwnerReference {
        api_version: VirtualMachineBackup::api_version(&()).into_owned(),
        kind: VirtualMachineBackup::kind(&()).into_owned(),
        name: backup.name_any(),
        uid: uid.into(),
        controller: Some(true),
        block_owner_deletion: None,
    };
    Secret {
        metadata: ObjectMeta {
            name: Some(nbd_tls_secret_name(&backup.name_any())),
            namespace: backup.namespace(),
            labels: Some(labels(uid)),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Default::default()
    }
}

fn is_code(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// Issues the backup's credentials (idempotent): see the module docs.
pub async fn ensure(ctx: &Context, backup: &VirtualMachineBackup) -> Result<Issued> {
    let uid = backup.uid().unwrap_or_default();
    let cairn_ns = &ctx.repositories.namespace;
    let own = ctx.api::<Secret>(cairn_ns);
    let agent_name = nbd_psk_agent_secret_name(&uid);
    let agent = match own
        .get_opt(&agent_name)
        .await
        .map_err(Error::kube("reading the export's TLS credentials"))?
    {
        Some(s) => s,
        None => {
            let fresh = agent_secret(cairn_ns, backup, &uid, &new_key());
            match own.create(&crate::routing::create_params(), &fresh).await {
                Ok(s) => s,
                Err(e) if is_code(&e, 409) => own
                    .get(&agent_name)
                    .await
                    .map_err(Error::kube("reading the export's TLS credentials"))?,
                Err(e) => return Err(Error::kube("issuing the export's TLS credentials")(e)),
            }
        }
    };
    if agent
        .annotations()
        .contains_key(TENANT_SECRET_UID_ANNOTATION)
    {
        return Ok(Issued::Ready);
    }
    let ns = backup.namespace().unwrap_or_default();
    let tenant = ctx.api::<Secret>(&ns);
    let data = agent.data.clone().unwrap_or_default();
    let secret_name = nbd_tls_secret_name(&backup.name_any());
    let created = match tenant
        .create(
            &crate::routing::create_params(),
            &tenant_secret(backup, &uid, data),
        )
        .await
    {
        Ok(s) => s,
        Err(e) if is_code(&e, 409) => {
            return Ok(Issued::Conflict(Rejection {
                reason: REASON_SECRET_EXISTS,
                message: format!(
                    "Secret {secret_name:?} already exists in namespace {ns:?} and Cairn did not create it for this backup; it would receive the export's TLS credentials: delete or rename it, or give the backup another name"
                ),
            }));
        }
        Err(e) => {
            return Err(Error::kube(format!(
                "creating Secret {secret_name} with the export's TLS credentials"
            ))(e));
        }
    };
    let patch = serde_json::json!({
        "metadata": { "annotations": { TENANT_SECRET_UID_ANNOTATION: created.uid() } }
    });
    own.patch(
        &agent_name,
        &crate::routing::merge_params(),
        &Patch::Merge(&patch),
    )
    .await
    .map_err(Error::kube(
        "recording the tenant's copy of the TLS credentials",
    ))?;
    tracing::info!(secret = %secret_name, "issued the export's TLS credentials");
    Ok(Issued::Ready)
}

/// Deletes both copies of the backup's credentials (idempotent). The tenant's
/// copy goes only when its UID is the one recorded at creation.
pub async fn remove(ctx: &Context, backup: &VirtualMachineBackup) -> Result<()> {
    let uid = backup.uid().unwrap_or_default();
    let own = ctx.api::<Secret>(&ctx.repositories.namespace);
    let agent_name = nbd_psk_agent_secret_name(&uid);
    let Some(agent) = own
        .get_opt(&agent_name)
        .await
        .map_err(Error::kube("reading the export's TLS credentials"))?
    else {
        return Ok(());
    };
    let precondition = |uid: Option<String>| DeleteParams {
        preconditions: Some(Preconditions {
            uid,
            resource_version: None,
        }),
        ..Default::default()
    };
    if let Some(tenant_uid) = agent.annotations().get(TENANT_SECRET_UID_ANNOTATION) {
        let ns = backup.namespace().unwrap_or_default();
        let name = nbd_tls_secret_name(&backup.name_any());
        match ctx
            .api::<Secret>(&ns)
            .delete(&name, &precondition(Some(tenant_uid.clone())))
            .await
        {
            Ok(_) => tracing::info!(secret = %name, "deleted the export's TLS credentials"),
            // Gone already, or a different object now has the name: not ours.
            Err(e) if is_code(&e, 404) || is_code(&e, 409) => {}
            Err(e) => {
                return Err(Error::kube(format!(
                    "deleting Secret {name} with the export's TLS credentials"
                ))(e));
            }
        }
    }
    match own.delete(&agent_name, &precondition(agent.uid())).await {
        Ok(_) => {}
        Err(e) if is_code(&e, 404) || is_code(&e, 409) => {}
        Err(e) => return Err(Error::kube("deleting the export's TLS credentials")(e)),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_data_holds_a_keys_file_qemu_reads() {
        let key = new_key();
        assert_eq!(key.len(), 64);
        assert!(key.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(key, new_key());
        let d = secret_data("b1", &key);
        assert_eq!(d["username"].0, b"b1");
        assert_eq!(d["keys.psk"].0, format!("b1:{key}\n").into_bytes());
    }

    #[test]
    fn tenant_copy_is_owned_by_the_backup() {
        let mut b = VirtualMachineBackup::new("b1", Default::default());
        b.metadata.namespace = Some("ns".into());
        b.metadata.uid = Some("u-1".into());
        let s = tenant_secret(&b, "u-1", secret_data("b1", &new_key()));
        assert_eq!(s.metadata.name.as_deref(), Some("b1-nbd-tls"));
        assert_eq!(s.metadata.namespace.as_deref(), Some("ns"));
        let owner = &s.metadata.owner_references.unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("VirtualMachineBackup", "u-1")
        );
        let a = agent_secret("cairn-system", &b, "u-1", &new_key());
        assert_eq!(a.metadata.name.as_deref(), Some("cairn-nbd-psk-u-1"));
        assert_eq!(a.metadata.namespace.as_deref(), Some("cairn-system"));
        assert!(a.metadata.owner_references.is_none());
    }
}
