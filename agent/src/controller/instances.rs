//! Publishes every VM discovery found as a `QemuInstance` in the namespace its
//! socket path names. When a socket vanishes the instance turns `stopped`
//! (QEMU restarts and short outages keep routing stable and checkpoints of a
//! stopped VM deletable offline) and is deleted after the stopped grace.
//! Unchanged status is re-sent only every [`HEARTBEAT`], so idle VMs cost the
//! API server almost nothing.
//!
//! Built for hundreds of VMs per node: a VM that appears is published on its
//! own (not with a pass over every VM), up to [`CONCURRENCY`] VMs are read
//! and written at once, and a VM already published gets a status write only
//! (its metadata is applied when it is first published).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_api::{
    AGENT_MANAGER, InstanceBitmap, InstanceDisk, NODE_LABEL, QemuInstance, QemuInstanceStatus,
};
use futures::StreamExt;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tracing::{debug, info, warn};

use super::Context;
use super::status::{apply_any_status, now};
use crate::discovery::{DiscoveryError, DiscoveryEvent};
use crate::inventory::{VmInventory, VmRef};

/// How often an unchanged status is re-sent (it refreshes `lastSeen`, which
/// only people read: the operator routes by node and run state). Every five
/// minutes keeps 500 idle VMs under two writes a second.
pub const HEARTBEAT: Duration = Duration::from_secs(300);

/// VMs whose inventory is read and published at the same time.
pub const CONCURRENCY: usize = 16;

/// What the loop remembers between passes.
#[derive(Default)]
pub struct Published {
    /// Last status sent per VM (without `lastSeen`) and when.
    sent: HashMap<(String, String), (QemuInstanceStatus, Instant)>,
    /// Since when a VM's socket has been gone.
    gone: HashMap<(String, String), Instant>,
}

/// [`Published`] shared by the VMs of one pass (never locked across an await).
type Shared = Mutex<Published>;

/// Keeps QemuInstances in step with discovery until the process stops: a
/// VM is re-read when it appears or its QEMU reports a change (an event, a
/// reconnect, a command that changes state), every VM on each resync tick.
pub async fn run(ctx: Arc<Context>) {
    let mut events = ctx.discovery.subscribe();
    let mut changes = ctx.discovery.subscribe_changes();
    let mut tick = tokio::time::interval(ctx.config.resync_interval);
    let published = Shared::default();
    // Let a burst of changes settle into one pass.
    let settle = || tokio::time::sleep(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tick.tick() => publish_all(&ctx, &published).await,
            first = events.recv() => {
                // Appeared VMs are published on their own, all of a burst at
                // once; a vanished one needs the pass that marks it stopped.
                settle().await;
                match drain_discovery(first, &mut events) {
                    None => publish_all(&ctx, &published).await,
                    Some(appeared) => {
                        ctx.health.vms.set(ctx.discovery.vms().len() as i64);
                        publish_many(&ctx, &published, appeared).await;
                    }
                }
            }
            first = changes.recv() => {
                settle().await;
                match drain_changes(first, &mut changes) {
                    None => publish_all(&ctx, &published).await,
                    Some(vms) => publish_many(&ctx, &published, vms).await,
                }
            }
        }
    }
}

/// The VMs that appeared in a burst of discovery events; `None` when one
/// vanished or events were lost (a full pass is due).
fn drain_discovery(
    first: Result<DiscoveryEvent, RecvError>,
    events: &mut broadcast::Receiver<DiscoveryEvent>,
) -> Option<BTreeSet<VmRef>> {
    let mut appeared = BTreeSet::new();
    let mut full_pass = false;
    let mut next = first.map_err(|e| match e {
        RecvError::Lagged(n) => TryRecvError::Lagged(n),
        RecvError::Closed => TryRecvError::Closed,
    });
    loop {
        match next {
            Ok(DiscoveryEvent::Appeared(vm)) => {
                appeared.insert(vm);
            }
            Ok(DiscoveryEvent::Disappeared(_)) | Err(TryRecvError::Lagged(_)) => full_pass = true,
            Err(_) => break,
        }
        next = events.try_recv();
    }
    (!full_pass).then_some(appeared)
}

/// The VMs of a burst of change notices; `None` when notices were lost.
fn drain_changes(
    first: Result<VmRef, RecvError>,
    changes: &mut broadcast::Receiver<VmRef>,
) -> Option<BTreeSet<VmRef>> {
    let mut vms = BTreeSet::new();
    let mut lagged = first.is_err();
    vms.extend(first.ok());
    loop {
        match changes.try_recv() {
            Ok(vm) => {
                vms.insert(vm);
            }
            Err(TryRecvError::Lagged(_)) => lagged = true,
            Err(_) => break,
        }
    }
    (!lagged).then_some(vms)
}

/// Reads and publishes `vms`, [`CONCURRENCY`] at a time.
async fn publish_many(ctx: &Context, published: &Shared, vms: impl IntoIterator<Item = VmRef>) {
    futures::stream::iter(vms)
        .for_each_concurrent(CONCURRENCY, |vm| async move {
            publish_vm(ctx, published, &vm).await;
        })
        .await;
}

/// Reads one VM's inventory and publishes it when it changed (or the heartbeat is due).
async fn publish_vm(ctx: &Context, published: &Shared, vm: &VmRef) {
    let key = (vm.namespace.clone(), vm.name.clone());
    let last = {
        let mut p = published.lock().expect("published lock");
        p.gone.remove(&key);
        p.sent.get(&key).cloned()
    };
    let mut status = match ctx.discovery.inventory(&vm.namespace, &vm.name).await {
        Ok(inv) => instance_status(&ctx.config.node_name, &inv),
        // Its socket is gone: the pass that follows the discovery event marks
        // it stopped, and a late change must not turn that back to disconnected.
        Err(DiscoveryError::UnknownVm { .. }) => return,
        Err(e) => {
            debug!(vm = %vm, error = %e, "VM not answering");
            disconnected_status(&ctx.config.node_name, vm, last.as_ref().map(|(s, _)| s))
        }
    };
    let seen = status.last_seen.take();
    if last
        .as_ref()
        .is_some_and(|(sent, at)| *sent == status && at.elapsed() < HEARTBEAT)
    {
        return;
    }
    let mut full = status.clone();
    full.last_seen = seen;
    // Published before: the object exists, its status is all that changes.
    let result = match last {
        Some(_) => match publish_status(ctx, vm, &full).await {
            Err(e) if is_not_found(&e) => publish(ctx, vm, &full).await,
            other => other,
        },
        None => publish(ctx, vm, &full).await,
    };
    match result {
        Ok(()) => {
            let mut p = published.lock().expect("published lock");
            p.sent.insert(key, (status, Instant::now()));
        }
        Err(e) => warn!(vm = %vm, error = %e, "cannot publish QemuInstance"),
    }
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(r) if r.code == 404)
}

/// One pass: publish present VMs; mark vanished ones stopped, delete them after the grace.
pub async fn publish_all(ctx: &Context, shared: &Shared) {
    let vms = ctx.discovery.vms();
    ctx.health.vms.set(vms.len() as i64);
    let present: BTreeSet<(String, String)> = vms
        .iter()
        .map(|vm| (vm.namespace.clone(), vm.name.clone()))
        .collect();
    publish_many(ctx, shared, vms).await;
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
                let (since, expired, was_published) = {
                    let mut p = shared.lock().expect("published lock");
                    let since = *p.gone.entry(key.clone()).or_insert_with(Instant::now);
                    let expired = since.elapsed() >= ctx.config.stopped_grace;
                    if expired {
                        p.gone.remove(&key);
                    }
                    (since, expired, p.sent.remove(&key).is_some())
                };
                if expired {
                    info!(namespace = %ns, vm = %key.1, "QMP socket gone for the stopped grace; deleting QemuInstance");
                    let _ = api.delete(&key.1, &DeleteParams::default()).await;
                } else if was_published || since.elapsed() < ctx.config.resync_interval {
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

/// The status of a QemuInstance this agent created before.
async fn publish_status(
    ctx: &Context,
    vm: &VmRef,
    status: &QemuInstanceStatus,
) -> Result<(), kube::Error> {
    let api: Api<QemuInstance> = Api::namespaced(ctx.client.clone(), &vm.namespace);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str) -> VmRef {
        VmRef {
            namespace: "ns".into(),
            name: name.into(),
            socket: format!("/run/cairn/qmp/ns/{name}.sock").into(),
        }
    }

    #[test]
    fn a_burst_of_appearing_vms_is_published_on_its_own() {
        let (tx, mut rx) = broadcast::channel(16);
        for n in ["a", "b", "a"] {
            tx.send(DiscoveryEvent::Appeared(vm(n))).unwrap();
        }
        let first = rx.try_recv().map_err(|_| RecvError::Closed);
        let vms = drain_discovery(first, &mut rx).expect("no full pass");
        assert_eq!(vms.into_iter().collect::<Vec<_>>(), [vm("a"), vm("b")]);
    }

    #[test]
    fn a_vanished_vm_or_lost_events_need_a_full_pass() {
        let (tx, mut rx) = broadcast::channel(16);
        tx.send(DiscoveryEvent::Appeared(vm("a"))).unwrap();
        tx.send(DiscoveryEvent::Disappeared(vm("b"))).unwrap();
        let first = rx.try_recv().map_err(|_| RecvError::Closed);
        assert_eq!(drain_discovery(first, &mut rx), None);
        assert_eq!(drain_discovery(Err(RecvError::Lagged(3)), &mut rx), None);
        let (_tx, mut changes) = broadcast::channel::<VmRef>(4);
        assert_eq!(drain_changes(Err(RecvError::Lagged(1)), &mut changes), None);
        assert_eq!(
            drain_changes(Ok(vm("a")), &mut changes),
            Some(BTreeSet::from([vm("a")]))
        );
    }
}
