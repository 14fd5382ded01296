//! Publishes every VM discovery found as a `QemuInstance` in the namespace its
//! socket path names. When a socket vanishes the instance turns `stopped`
//! (QEMU restarts and short outages keep routing stable and checkpoints of a
//! stopped VM deletable offline) and is deleted after the stopped grace.
//! Unchanged status is re-sent only every [`HEARTBEAT`], so idle VMs cost the
//! API server almost nothing.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_api::{
    AGENT_MANAGER, InstanceBitmap, InstanceDisk, NODE_LABEL, QemuInstance, QemuInstanceStatus,
};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use tracing::{debug, info, warn};

use super::Context;
use super::status::{apply_any_status, now};
use crate::discovery::DiscoveryError;
use crate::inventory::{VmInventory, VmRef};

/// How often an unchanged status is re-sent (it refreshes `lastSeen`).
pub const HEARTBEAT: Duration = Duration::from_secs(60);

/// What the loop remembers between passes.
#[derive(Default)]
pub struct Published {
    /// Last status sent per VM (without `lastSeen`) and when.
    sent: HashMap<(String, String), (QemuInstanceStatus, Instant)>,
    /// Since when a VM's socket has been gone.
    gone: HashMap<(String, String), Instant>,
}

/// Keeps QemuInstances in step with discovery until the process stops: a
/// VM is re-read when its QEMU reports a change (an event, a reconnect, a
/// command that changes state), every VM on each resync tick.
pub async fn run(ctx: Arc<Context>) {
    let mut events = ctx.discovery.subscribe();
    let mut changes = ctx.discovery.subscribe_changes();
    let mut tick = tokio::time::interval(ctx.config.resync_interval);
    let mut published = Published::default();
    // Let a burst of changes settle into one pass.
    let settle = || tokio::time::sleep(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tick.tick() => publish_all(&ctx, &mut published).await,
            _ = events.recv() => {
                // One pass for a burst of VMs appearing or vanishing, not one each.
                settle().await;
                while !matches!(
                    events.try_recv(),
                    Err(tokio::sync::broadcast::error::TryRecvError::Empty
                        | tokio::sync::broadcast::error::TryRecvError::Closed)
                ) {}
                publish_all(&ctx, &mut published).await;
            }
            first = changes.recv() => {
                settle().await;
                let mut vms = BTreeSet::new();
                let mut lagged = first.is_err();
                vms.extend(first.ok());
                loop {
                    match changes.try_recv() {
                        Ok(vm) => {
                            vms.insert(vm);
                        }
                        Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => lagged = true,
                        Err(_) => break,
                    }
                }
                if lagged {
                    publish_all(&ctx, &mut published).await;
                } else {
                    for vm in &vms {
                        publish_vm(&ctx, &mut published, vm).await;
                    }
                }
            }
        }
    }
}

/// Reads one VM's inventory and publishes it when it changed (or the heartbeat is due).
async fn publish_vm(ctx: &Context, published: &mut Published, vm: &VmRef) {
    let key = (vm.namespace.clone(), vm.name.clone());
    published.gone.remove(&key);
    let mut status = match ctx.discovery.inventory(&vm.namespace, &vm.name).await {
        Ok(inv) => instance_status(&ctx.config.node_name, &inv),
        // Its socket is gone: the pass that follows the discovery event marks
        // it stopped, and a late change must not turn that back to disconnected.
        Err(DiscoveryError::UnknownVm { .. }) => return,
        Err(e) => {
            debug!(vm = %vm, error = %e, "VM not answering");
            disconnected_status(
                &ctx.config.node_name,
                vm,
                published.sent.get(&key).map(|(s, _)| s),
            )
        }
    };
    let seen = status.last_seen.take();
    if published
        .sent
        .get(&key)
        .is_some_and(|(last, at)| *last == status && at.elapsed() < HEARTBEAT)
    {
        return;
    }
    let mut full = status.clone();
    full.last_seen = seen;
    match publish(ctx, vm, &full).await {
        Ok(()) => {
            published.sent.insert(key, (status, Instant::now()));
        }
        Err(e) => warn!(vm = %vm, error = %e, "cannot publish QemuInstance"),
    }
}

/// One pass: publish present VMs; mark vanished ones stopped, delete them after the grace.
pub async fn publish_all(ctx: &Context, published: &mut Published) {
    let vms = ctx.discovery.vms();
    ctx.health.vms.set(vms.len() as i64);
    let mut present = BTreeSet::new();
    for vm in &vms {
        present.insert((vm.namespace.clone(), vm.name.clone()));
        publish_vm(ctx, published, vm).await;
    }
    // Remove instances of this node whose socket is gone.
    let all: Api<QemuInstance> = Api::all(ctx.client.clone());
    let selector = format!("{NODE_LABEL}={}", ctx.config.node_name);
    match all
        .list_metadata(&ListParams::default().labels(&selector))
        .await
    {
        Ok(list) => {
            for qi in list.items {
                let ns = qi.namespace().unwrap_or_default();
                let key = (ns.clone(), qi.name_any());
                if present.contains(&key) {
                    continue;
                }
                let api: Api<QemuInstance> = Api::namespaced(ctx.client.clone(), &ns);
                let since = *published
                    .gone
                    .entry(key.clone())
                    .or_insert_with(Instant::now);
                if since.elapsed() >= ctx.config.stopped_grace {
                    info!(namespace = %ns, vm = %key.1, "QMP socket gone for the stopped grace; deleting QemuInstance");
                    let _ = api.delete(&key.1, &DeleteParams::default()).await;
                    published.gone.remove(&key);
                    published.sent.remove(&key);
                } else if published.sent.remove(&key).is_some()
                    || since.elapsed() < ctx.config.resync_interval
                {
                    info!(namespace = %ns, vm = %key.1, "QMP socket gone; QemuInstance marked stopped");
                    let patch = serde_json::json!({"status": {"runState": "stopped"}});
                    let pp = PatchParams {
                        field_manager: Some(AGENT_MANAGER.into()),
                        ..Default::default()
                    };
                    if let Err(e) = api.patch_status(&key.1, &pp, &Patch::Merge(&patch)).await {
                        warn!(namespace = %ns, vm = %key.1, error = %e, "cannot mark QemuInstance stopped");
                    }
                }
            }
        }
        Err(e) => warn!(error = %e, "cannot list QemuInstances"),
    }
}

async fn publish(
    ctx: &Context,
    vm: &VmRef,
    status: &QemuInstanceStatus,
) -> Result<(), kube::Error> {
    let api: Api<QemuInstance> = Api::namespaced(ctx.client.clone(), &vm.namespace);
    let body = serde_json::json!({
        "apiVersion": "cairn.dev/v1alpha1",
        "kind": "QemuInstance",
        "metadata": {
            "name": vm.name,
            "labels": { NODE_LABEL: ctx.config.node_name },
        },
    });
    api.patch(
        &vm.name,
        &PatchParams::apply(AGENT_MANAGER).force(),
        &Patch::Apply(body),
    )
    .await?;
    apply_any_status(&api, &vm.name, status).await
}

/// The QemuInstance status of a VM that answers.
pub fn instance_status(node: &str, inv: &VmInventory) -> QemuInstanceStatus {
    QemuInstanceStatus {
        node_name: Some(node.to_string()),
        qmp_socket: Some(inv.vm.socket.display().to_string()),
        qemu_version: Some(inv.qemu_version.clone()),
        run_state: Some(inv.run_state.clone()),
        disk_count: Some(inv.disks.len() as i32),
        disks: inv
            .disks
            .iter()
            .map(|d| InstanceDisk {
                name: d.name.clone(),
                node_name: Some(d.node_name.clone()),
                file: Some(d.file.display().to_string()),
                format: Some(d.format.as_str().to_string()),
                virtual_size: Some(d.virtual_size as i64),
                read_only: d.read_only,
                bitmaps: d
                    .bitmaps
                    .iter()
                    .map(|b| InstanceBitmap {
                        name: b.name.clone(),
                        granularity: i64::from(b.granularity),
                        recording: b.recording,
                        persistent: b.persistent,
                        busy: b.busy,
                        inconsistent: b.inconsistent,
                        dirty_bytes: b.dirty_bytes as i64,
                    })
                    .collect(),
            })
            .collect(),
        last_seen: Some(now()),
    }
}

/// A VM whose QMP socket does not answer. The last disk layout seen stays
/// published: it is what a checkpoint of the VM, once stopped, is made with
/// offline.
fn disconnected_status(
    node: &str,
    vm: &VmRef,
    last: Option<&QemuInstanceStatus>,
) -> QemuInstanceStatus {
    QemuInstanceStatus {
        node_name: Some(node.to_string()),
        qmp_socket: Some(vm.socket.display().to_string()),
        run_state: Some("disconnected".into()),
        qemu_version: last.and_then(|s| s.qemu_version.clone()),
        disk_count: last.and_then(|s| s.disk_count),
        disks: last.map(|s| s.disks.clone()).unwrap_or_default(),
        last_seen: None,
    }
}
