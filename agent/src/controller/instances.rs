//! Publishes every VM discovery found as a `QemuInstance` in the namespace its
//! socket path names, and removes the ones whose socket vanished.

use std::collections::BTreeSet;
use std::sync::Arc;

use cairn_api::{
    AGENT_MANAGER, InstanceBitmap, InstanceDisk, NODE_LABEL, QemuInstance, QemuInstanceStatus,
};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use tracing::{debug, info, warn};

use super::Context;
use super::status::{apply_status, now};
use crate::inventory::{VmInventory, VmRef};

/// Keeps QemuInstances in step with discovery until the process stops.
pub async fn run(ctx: Arc<Context>) {
    let mut events = ctx.discovery.subscribe();
    let mut tick = tokio::time::interval(ctx.config.resync_interval);
    loop {
        publish_all(&ctx).await;
        tokio::select! {
            _ = tick.tick() => {}
            _ = events.recv() => {
                // Let a burst of changes settle into one pass.
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// One pass: publish present VMs, delete QemuInstances of vanished ones.
pub async fn publish_all(ctx: &Context) {
    let vms = ctx.discovery.vms();
    ctx.health.vms.set(vms.len() as i64);
    let mut present = BTreeSet::new();
    for vm in &vms {
        present.insert((vm.namespace.clone(), vm.name.clone()));
        let status = match ctx.discovery.inventory(&vm.namespace, &vm.name).await {
            Ok(inv) => instance_status(&ctx.config.node_name, &inv),
            Err(e) => {
                debug!(vm = %vm, error = %e, "VM not answering");
                disconnected_status(&ctx.config.node_name, vm)
            }
        };
        if let Err(e) = publish(ctx, vm, &status).await {
            warn!(vm = %vm, error = %e, "cannot publish QemuInstance");
        }
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
                if !present.contains(&(ns.clone(), qi.name_any())) {
                    info!(namespace = %ns, vm = %qi.name_any(), "QMP socket gone; deleting QemuInstance");
                    let api: Api<QemuInstance> = Api::namespaced(ctx.client.clone(), &ns);
                    let _ = api.delete(&qi.name_any(), &DeleteParams::default()).await;
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
    apply_status(&api, &vm.name, status).await
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

fn disconnected_status(node: &str, vm: &VmRef) -> QemuInstanceStatus {
    QemuInstanceStatus {
        node_name: Some(node.to_string()),
        qmp_socket: Some(vm.socket.display().to_string()),
        run_state: Some("disconnected".into()),
        ..Default::default()
    }
}
