//! Publishes every VM discovery found as a `QemuInstance` in the namespace its
//! socket path names. When a socket vanishes the instance turns `stopped`
//! (QEMU restarts and short outages keep routing stable and checkpoints of a
//! stopped VM deletable offline) and is deleted after the stopped grace.
//! Unchanged status is re-sent only every [`HEARTBEAT`], so idle VMs cost the
//! API server almost nothing.
//!
//! Built for hundreds of VMs per node: each VM to publish (one that appeared,
//! or whose QEMU reported a change) gets a task of its own at once, so a burst
//! of new VMs is never held behind a pass or behind each other; at most
//! [`CONCURRENCY`] of them read and write at the same time, one VM is never
//! published by two tasks at once, and notices that arrive while a VM waits
//! for its turn fold into that one read. A VM already published gets a status
//! write only (its metadata is applied when it is first published).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_api::{
    AGENT_MANAGER, InstanceBitmap, InstanceDisk, NODE_LABEL, QemuInstance, QemuInstanceStatus,
};
use futures::StreamExt;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use tokio::sync::Semaphore;
use tokio::sync::broadcast::error::RecvError;
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

/// A VM as `(namespace, name)`.
type VmKey = (String, String);

/// What the publishing tasks share.
pub struct Shared {
    /// Never locked across an await.
    published: Mutex<Published>,
    /// VMs with a task waiting for its turn: a notice for one of them needs no new task.
    queued: Mutex<HashSet<VmRef>>,
    /// One publisher per VM at a time (entries are dropped with the VM).
    vm_locks: Mutex<HashMap<VmKey, Arc<tokio::sync::Mutex<()>>>>,
    /// Bounds the VMs read and written at once.
    permits: Semaphore,
}

impl Default for Shared {
    fn default() -> Self {
        Self {
            published: Mutex::default(),
            queued: Mutex::default(),
            vm_locks: Mutex::default(),
            permits: Semaphore::new(CONCURRENCY),
        }
    }
}

impl Shared {
    /// Marks `vm` as waiting; false when a task for it is already waiting.
    fn enqueue(&self, vm: &VmRef) -> bool {
        self.queued.lock().expect("queued lock").insert(vm.clone())
    }

    /// The lock of the VM `(namespace, name)`.
    fn vm_lock(&self, key: &VmKey) -> Arc<tokio::sync::Mutex<()>> {
        self.vm_locks
            .lock()
            .expect("vm locks")
            .entry(key.clone())
            .or_default()
            .clone()
    }

    /// Forgets the per-VM locks of VMs not in `present` (their socket is
    /// gone) that no task holds or waits for.
    fn forget_absent(&self, present: &BTreeSet<VmKey>) {
        self.vm_locks
            .lock()
            .expect("vm locks")
            .retain(|key, l| present.contains(key) || Arc::strong_count(l) > 1);
    }
}

/// What a discovery or change notice asks of the loop.
#[derive(Debug, PartialEq)]
enum Wanted {
    /// Publish this VM now.
    Vm(VmRef),
    /// A VM vanished or notices were lost: a full pass.
    Pass,
    /// The sender is gone.
    Stop,
    Nothing,
}

fn from_discovery(ev: Result<DiscoveryEvent, RecvError>) -> Wanted {
    match ev {
        Ok(DiscoveryEvent::Appeared(vm)) => Wanted::Vm(vm),
        Ok(DiscoveryEvent::Disappeared(_)) | Err(RecvError::Lagged(_)) => Wanted::Pass,
        Err(RecvError::Closed) => Wanted::Stop,
    }
}

fn from_change(ev: Result<VmRef, RecvError>) -> Wanted {
    match ev {
        Ok(vm) => Wanted::Vm(vm),
        Err(RecvError::Lagged(_)) => Wanted::Pass,
        Err(RecvError::Closed) => Wanted::Nothing,
    }
}

/// Keeps QemuInstances in step with discovery until the process stops: a
/// VM is re-read when it appears or its QEMU reports a change (an event, a
/// reconnect, a command that changes state), every VM on each resync tick.
/// Passes run one at a time; a pass asked for during one follows it.
pub async fn run(ctx: Arc<Context>) {
    let mut events = ctx.discovery.subscribe();
    let mut changes = ctx.discovery.subscribe_changes();
    let mut tick = tokio::time::interval(ctx.config.resync_interval);
    let shared = Arc::new(Shared::default());
    let mut pass: Option<tokio::task::JoinHandle<()>> = None;
    let mut pass_due = false;
    loop {
        let wanted = tokio::select! {
            _ = tick.tick() => Wanted::Pass,
            ev = events.recv() => from_discovery(ev),
            ev = changes.recv() => from_change(ev),
            _ = async { pass.as_mut().expect("guarded").await }, if pass.is_some() => {
                pass = None;
                Wanted::Nothing
            }
        };
        match wanted {
            Wanted::Vm(vm) => {
                if shared.enqueue(&vm) {
                    let (ctx, shared) = (ctx.clone(), shared.clone());
                    tokio::spawn(async move { publish_vm(&ctx, &shared, &vm).await });
                }
            }
            Wanted::Pass => pass_due = true,
            Wanted::Stop => return,
            Wanted::Nothing => {}
        }
        if pass_due && pass.is_none() {
            pass_due = false;
            let (ctx, shared) = (ctx.clone(), shared.clone());
            pass = Some(tokio::spawn(
                async move { publish_all(&ctx, &shared).await },
            ));
        }
    }
}

/// Reads and publishes `vms`, [`CONCURRENCY`] at a time.
async fn publish_many(ctx: &Context, shared: &Shared, vms: impl IntoIterator<Item = VmRef>) {
    futures::stream::iter(vms)
        .for_each_concurrent(CONCURRENCY, |vm| async move {
            shared.enqueue(&vm);
            publish_vm(ctx, shared, &vm).await;
        })
        .await;
}

/// Reads one VM's inventory and publishes it when it changed (or the
/// heartbeat is due), in its turn: after any publish of the same VM in
/// flight, within the bound of [`CONCURRENCY`].
async fn publish_vm(ctx: &Context, shared: &Shared, vm: &VmRef) {
    let key = (vm.namespace.clone(), vm.name.clone());
    let queued_at = Instant::now();
    let lock = shared.vm_lock(&key);
    let _one = lock.lock().await;
    // A QEMU still starting does not hold a permit others could use.
    ctx.discovery.connected(&vm.namespace, &vm.name).await;
    let _permit = shared.permits.acquire().await.expect("never closed");
    // From here on a new notice needs a new read.
    shared.queued.lock().expect("queued lock").remove(vm);
    let read_at = Instant::now();
    let last = {
        let mut p = shared.published.lock().expect("published lock");
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
    let write_at = Instant::now();
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
            debug!(
                vm = %vm,
                first = last.is_none(),
                waited_ms = (read_at - queued_at).as_millis() as u64,
                read_ms = (write_at - read_at).as_millis() as u64,
                write_ms = write_at.elapsed().as_millis() as u64,
                "QemuInstance published"
            );
            let mut p = shared.published.lock().expect("published lock");
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
    let present: BTreeSet<VmKey> = vms
        .iter()
        .map(|vm| (vm.namespace.clone(), vm.name.clone()))
        .collect();
    shared.forget_absent(&present);
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
                // A VM that came back since the pass began is its own task's:
                // after that task, or before it, never interleaved with it.
                let lock = shared.vm_lock(&key);
                let _one = lock.lock().await;
                if ctx.discovery.session(&key.0, &key.1).is_ok() {
                    continue;
                }
                let api: Api<QemuInstance> = Api::namespaced(ctx.client.clone(), &ns);
                let (since, expired, was_published) = {
                    let mut p = shared.published.lock().expect("published lock");
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
    fn an_appearing_or_changed_vm_is_published_on_its_own() {
        assert_eq!(
            from_discovery(Ok(DiscoveryEvent::Appeared(vm("a")))),
            Wanted::Vm(vm("a"))
        );
        assert_eq!(from_change(Ok(vm("b"))), Wanted::Vm(vm("b")));
    }

    #[test]
    fn a_vanished_vm_or_lost_notices_need_a_full_pass() {
        assert_eq!(
            from_discovery(Ok(DiscoveryEvent::Disappeared(vm("a")))),
            Wanted::Pass
        );
        assert_eq!(from_discovery(Err(RecvError::Lagged(3))), Wanted::Pass);
        assert_eq!(from_change(Err(RecvError::Lagged(1))), Wanted::Pass);
        assert_eq!(from_discovery(Err(RecvError::Closed)), Wanted::Stop);
    }

    #[test]
    fn notices_for_a_waiting_vm_fold_into_its_read() {
        let shared = Shared::default();
        assert!(shared.enqueue(&vm("a")));
        assert!(!shared.enqueue(&vm("a")), "a second task for a waiting VM");
        assert!(shared.enqueue(&vm("b")));
        shared.queued.lock().unwrap().remove(&vm("a"));
        assert!(
            shared.enqueue(&vm("a")),
            "a notice after the read began needs a new read"
        );
    }

    #[tokio::test]
    async fn one_vm_is_never_published_by_two_tasks_at_once() {
        let shared = Shared::default();
        let (a, b) = (
            ("ns".to_string(), "a".to_string()),
            ("ns".to_string(), "b".to_string()),
        );
        let lock = shared.vm_lock(&a);
        let held = lock.lock().await;
        assert!(shared.vm_lock(&a).try_lock().is_err());
        assert!(shared.vm_lock(&b).try_lock().is_ok());
        // A lock in use survives a pass that no longer sees the VM; a free one goes.
        shared.forget_absent(&BTreeSet::new());
        assert!(shared.vm_locks.lock().unwrap().contains_key(&a));
        drop(held);
        drop(lock);
        shared.forget_absent(&BTreeSet::new());
        assert!(!shared.vm_locks.lock().unwrap().contains_key(&a));
    }
}
