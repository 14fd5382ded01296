//! The operator against a real kube-apiserver (no agent: the test plays the
//! agent where the contract needs one, e.g. writing `CleanedUp=True`).

mod in_process;

use std::time::Duration;

use anyhow::Result;
use cairn_api::{
    CHECKPOINT_FINALIZER, CREATED_BY_BACKUP_LABEL, NODE_LABEL, VM_LABEL, VirtualMachineBackup,
    VirtualMachineCheckpoint, conditions,
};
use cairn_e2e::harness::TestEnv;
use in_process::{create_vm, eventually, start};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

fn condition<'a>(
    conds: &'a [k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    type_: &str,
) -> Option<(&'a str, &'a str)> {
    conditions::find(conds, type_).map(|c| (c.status.as_str(), c.reason.as_str()))
}

/// Writes status as the agent would (server-side apply, manager `cairn-agent`).
async fn agent_status<K>(
    api: &Api<K>,
    name: &str,
    kind: &str,
    status: serde_json::Value,
) -> Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch_status(
        name,
        &PatchParams::apply(cairn_api::AGENT_MANAGER).force(),
        &Patch::Apply(json!({"apiVersion": "cairn.dev/v1alpha1", "kind": kind, "status": status})),
    )
    .await?;
    Ok(())
}

fn cleaned_up() -> serde_json::Value {
    json!({"conditions": [{
        "type": "CleanedUp", "status": "True", "reason": "BitmapsRemoved",
        "message": "removed", "lastTransitionTime": "2026-01-01T00:00:00Z"
    }]})
}

async fn checkpoint(
    api: &Api<VirtualMachineCheckpoint>,
    name: &str,
    vm: &str,
    finalizer: bool,
) -> Result<()> {
    let mut meta = json!({"name": name});
    if finalizer {
        meta["finalizers"] = json!([CHECKPOINT_FINALIZER]);
    }
    api.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "apiVersion": "cairn.dev/v1alpha1", "kind": "VirtualMachineCheckpoint",
            "metadata": meta, "spec": {"virtualMachine": vm}
        }))?,
    )
    .await?;
    Ok(())
}

async fn gone<K>(api: &Api<K>, name: &str) -> Result<Option<()>>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    Ok(api.get_opt(name).await?.is_none().then_some(()))
}

#[tokio::test]
async fn checkpoints_are_routed_chained_and_cleaned_up() -> Result<()> {
    let env = TestEnv::new("op-checkpoints").await?;
    let ns = env.namespace.clone();
    let op = start(&env, "op-a");
    let cps: Api<VirtualMachineCheckpoint> = Api::namespaced(env.client.clone(), &ns);
    create_vm(&env.client, &ns, "vm1", "node-1").await?;

    // Routed: labels, finalizer, Pending, Accepted=True.
    checkpoint(&cps, "cp-a", "vm1", false).await?;
    let a = eventually("cp-a routed", || async {
        let c = cps.get("cp-a").await?;
        let s = c.status.clone().unwrap_or_default();
        let routed = c.labels().get(NODE_LABEL).map(String::as_str) == Some("node-1");
        Ok(
            (condition(&s.conditions, "Accepted") == Some(("True", "Routed")) && routed)
                .then_some(c),
        )
    })
    .await?;
    assert_eq!(a.labels().get(VM_LABEL).map(String::as_str), Some("vm1"));
    assert!(a.finalizers().contains(&CHECKPOINT_FINALIZER.to_string()));
    let s = a.status.unwrap();
    assert_eq!(s.phase, Some(cairn_api::CheckpointPhase::Pending));
    assert_eq!(s.node_name.as_deref(), Some("node-1"));
    assert_eq!(s.parent, None);

    // A second checkpoint gets cp-a as parent (creationTimestamp has one-second resolution).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    checkpoint(&cps, "cp-b", "vm1", false).await?;
    eventually("cp-b parent", || async {
        let s = cps.get("cp-b").await?.status.unwrap_or_default();
        Ok((s.parent.as_deref() == Some("cp-a")).then_some(()))
    })
    .await?;

    // Unknown VM: Failed, then routed once the QemuInstance appears.
    checkpoint(&cps, "cp-x", "vm2", false).await?;
    let s = eventually("cp-x rejected", || async {
        let s = cps.get("cp-x").await?.status.unwrap_or_default();
        Ok((s.phase == Some(cairn_api::CheckpointPhase::Failed)).then_some(s))
    })
    .await?;
    assert_eq!(
        condition(&s.conditions, "Ready"),
        Some(("False", "VirtualMachineNotFound"))
    );
    assert_eq!(
        condition(&s.conditions, "Accepted"),
        Some(("False", "VirtualMachineNotFound"))
    );
    assert!(
        conditions::find(&s.conditions, "Ready")
            .unwrap()
            .message
            .contains("vm2")
    );
    create_vm(&env.client, &ns, "vm2", "node-2").await?;
    let x = eventually("cp-x recovered", || async {
        let c = cps.get("cp-x").await?;
        let s = c.status.clone().unwrap_or_default();
        // Status is written first, the routing label right after it.
        let routed = c.labels().get(NODE_LABEL).map(String::as_str) == Some("node-2");
        Ok((s.phase == Some(cairn_api::CheckpointPhase::Pending) && routed).then_some(c))
    })
    .await?;
    let s = x.status.unwrap();
    assert_eq!(
        condition(&s.conditions, "Accepted"),
        Some(("True", "Routed"))
    );
    assert!(conditions::find(&s.conditions, "Ready").is_none(), "{s:?}");

    // Deleting a routed checkpoint waits for the agent's CleanedUp=True.
    cps.delete("cp-a", &DeleteParams::default()).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let a = cps.get("cp-a").await?;
    assert!(a.metadata.deletion_timestamp.is_some());
    assert!(a.finalizers().contains(&CHECKPOINT_FINALIZER.to_string()));
    agent_status(&cps, "cp-a", "VirtualMachineCheckpoint", cleaned_up()).await?;
    eventually("cp-a deleted", || gone(&cps, "cp-a")).await?;
    // Its child is re-parented (libvirt: children of a deleted checkpoint move to its parent).
    eventually("cp-b re-parented", || async {
        let s = cps.get("cp-b").await?.status.unwrap_or_default();
        Ok(s.parent.is_none().then_some(()))
    })
    .await?;

    // Deleting an object that was never routed completes without an agent.
    checkpoint(&cps, "cp-y", "vm-missing", true).await?;
    eventually("cp-y rejected", || async {
        let s = cps.get("cp-y").await?.status.unwrap_or_default();
        Ok((s.phase == Some(cairn_api::CheckpointPhase::Failed)).then_some(()))
    })
    .await?;
    cps.delete("cp-y", &DeleteParams::default()).await?;
    eventually("cp-y deleted", || gone(&cps, "cp-y")).await?;

    expect_events(
        &env.client,
        &ns,
        &["Routed", "VirtualMachineNotFound", "Deleted"],
    )
    .await?;
    let metrics = op.status.metrics_text();
    assert!(metrics.contains("cairn_operator_leader 1"), "{metrics}");
    assert!(metrics.contains("controller=\"checkpoint\""), "{metrics}");
    op.stop().await;
    Ok(())
}

fn backup_manifest(name: &str, extra: serde_json::Value) -> Result<VirtualMachineBackup> {
    let mut spec = json!({"virtualMachine": "vm1", "mode": "Push", "target": {"directory": {"path": "/backups/vm1"}}});
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    Ok(serde_json::from_value(json!({
        "apiVersion": "cairn.dev/v1alpha1", "kind": "VirtualMachineBackup",
        "metadata": {"name": name}, "spec": spec
    }))?)
}

#[tokio::test]
async fn backups_are_validated_create_checkpoints_and_expire() -> Result<()> {
    let env = TestEnv::new("op-backups").await?;
    let ns = env.namespace.clone();
    let op = start(&env, "op-b");
    let backups: Api<VirtualMachineBackup> = Api::namespaced(env.client.clone(), &ns);
    let cps: Api<VirtualMachineCheckpoint> = Api::namespaced(env.client.clone(), &ns);
    create_vm(&env.client, &ns, "vm1", "node-1").await?;
    let pp = PostParams::default();

    // Unknown incremental base.
    backups
        .create(
            &pp,
            &backup_manifest("b-inc", json!({"incremental": "nope"}))?,
        )
        .await?;
    let s = eventually("b-inc rejected", || async {
        let s = backups.get("b-inc").await?.status.unwrap_or_default();
        Ok((s.phase == Some(cairn_api::BackupPhase::Failed)).then_some(s))
    })
    .await?;
    assert_eq!(
        condition(&s.conditions, "Ready"),
        Some(("False", "UnknownIncrementalBase"))
    );
    assert!(
        conditions::find(&s.conditions, "Ready")
            .unwrap()
            .message
            .contains("nope")
    );

    // A backup that creates a checkpoint.
    backups
        .create(
            &pp,
            &backup_manifest("b-cp", json!({"checkpoint": {"name": "cp-new"}}))?,
        )
        .await?;
    let c = eventually("cp-new created", || async {
        Ok(cps.get_opt("cp-new").await?)
    })
    .await?;
    assert_eq!(
        c.labels().get(CREATED_BY_BACKUP_LABEL).map(String::as_str),
        Some("b-cp")
    );
    assert_eq!(
        c.labels().get(NODE_LABEL).map(String::as_str),
        Some("node-1")
    );
    assert!(c.owner_references().is_empty());
    assert!(c.finalizers().contains(&CHECKPOINT_FINALIZER.to_string()));
    let b = eventually("b-cp routed", || async {
        let b = backups.get("b-cp").await?;
        let s = b.status.clone().unwrap_or_default();
        Ok((s.phase == Some(cairn_api::BackupPhase::Pending)
            && condition(&s.conditions, "Accepted") == Some(("True", "Routed")))
        .then_some(b))
    })
    .await?;
    assert_eq!(
        b.labels().get(NODE_LABEL).map(String::as_str),
        Some("node-1")
    );
    assert!(
        b.finalizers()
            .contains(&cairn_api::BACKUP_FINALIZER.to_string())
    );
    // Its checkpoint is routed by the checkpoint controller.
    eventually("cp-new accepted", || async {
        let s = cps.get("cp-new").await?.status.unwrap_or_default();
        Ok((condition(&s.conditions, "Accepted") == Some(("True", "Routed"))).then_some(()))
    })
    .await?;

    // A checkpoint name taken by someone else.
    backups
        .create(
            &pp,
            &backup_manifest("b-taken", json!({"checkpoint": {"name": "cp-new"}}))?,
        )
        .await?;
    eventually("b-taken rejected", || async {
        let s = backups.get("b-taken").await?.status.unwrap_or_default();
        Ok(
            (condition(&s.conditions, "Ready") == Some(("False", "CheckpointExists")))
                .then_some(()),
        )
    })
    .await?;

    // TTL: the agent finishes the backup; the operator deletes it after 1 s.
    backups
        .create(
            &pp,
            &backup_manifest("b-ttl", json!({"ttlSecondsAfterFinished": 1}))?,
        )
        .await?;
    eventually("b-ttl routed", || async {
        let b = backups.get("b-ttl").await?;
        let routed = b.labels().contains_key(NODE_LABEL);
        let s = b.status.unwrap_or_default();
        Ok((s.phase == Some(cairn_api::BackupPhase::Pending) && routed).then_some(()))
    })
    .await?;
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    agent_status(
        &backups,
        "b-ttl",
        "VirtualMachineBackup",
        json!({"phase": "Succeeded", "completionTime": now}),
    )
    .await?;
    eventually("b-ttl deletion requested", || async {
        let b = backups.get("b-ttl").await?;
        Ok(b.metadata.deletion_timestamp.is_some().then_some(()))
    })
    .await?;
    // Routed: the finalizer waits for the agent.
    agent_status(&backups, "b-ttl", "VirtualMachineBackup", cleaned_up()).await?;
    eventually("b-ttl deleted", || gone(&backups, "b-ttl")).await?;

    // Deleting the backup keeps its checkpoint.
    backups.delete("b-cp", &DeleteParams::default()).await?;
    agent_status(&backups, "b-cp", "VirtualMachineBackup", cleaned_up()).await?;
    eventually("b-cp deleted", || gone(&backups, "b-cp")).await?;
    assert!(cps.get_opt("cp-new").await?.is_some());
    expect_events(
        &env.client,
        &ns,
        &["Routed", "CheckpointCreated", "Expired", "Deleted"],
    )
    .await?;
    op.stop().await;
    Ok(())
}

#[tokio::test]
async fn only_one_replica_leads() -> Result<()> {
    let env = TestEnv::new("op-leader").await?;
    let a = start(&env, "replica-a");
    let b = start(&env, "replica-b");
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.namespace);
    eventually("a leader", || async {
        Ok((a.status.is_leader() || b.status.is_leader()).then_some(()))
    })
    .await?;
    eventually("both ready", || async {
        Ok((a.status.is_ready() && b.status.is_ready()).then_some(()))
    })
    .await?;
    for _ in 0..12 {
        assert!(
            a.status.is_leader() ^ b.status.is_leader(),
            "exactly one replica leads"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let holder = leases
        .get("cairn-operator")
        .await?
        .spec
        .and_then(|s| s.holder_identity)
        .unwrap_or_default();
    let (leader, follower, leader_id) = if a.status.is_leader() {
        (a, b, "replica-a")
    } else {
        (b, a, "replica-b")
    };
    assert_eq!(holder, leader_id);
    // /readyz and /metrics are served on both.
    let addr = follower.status.metrics_addr().expect("bound");
    let body = http_get(addr, "/readyz").await?;
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    let body = http_get(addr, "/metrics").await?;
    assert!(body.contains("cairn_operator_leader 0"), "{body}");

    // The leader stops: the follower takes over.
    leader.stop().await;
    eventually("follower takes over", || async {
        Ok(follower.status.is_leader().then_some(()))
    })
    .await?;
    follower.stop().await;
    Ok(())
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

/// Waits until events with each of `reasons` were recorded in `ns` (what `kubectl describe` shows).
async fn expect_events(client: &Client, ns: &str, reasons: &[&str]) -> Result<()> {
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), ns);
    eventually("events", || async {
        let list = events.list(&Default::default()).await?;
        let seen: Vec<String> = list.items.iter().filter_map(|e| e.reason.clone()).collect();
        Ok(reasons
            .iter()
            .all(|r| seen.iter().any(|s| s == r))
            .then_some(()))
    })
    .await
}
