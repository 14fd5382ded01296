//! What every reconcile gets: the client, the caches, the event recorder,
//! metrics and per-object retry bookkeeping.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_api::{QemuInstance, VirtualMachineBackup, VirtualMachineCheckpoint};
use futures::channel::mpsc::UnboundedSender;
use kube::runtime::controller::Action;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client};

use crate::metrics::Health;

/// Shared state of the controllers.
pub struct Context {
    /// Client of the operator's service account.
    pub client: Client,
    /// Namespace the operator is limited to (`None`: all namespaces).
    pub namespace: Option<String>,
    /// Event recorder (reporting controller `cairn-operator`).
    pub recorder: Recorder,
    /// Cache of QemuInstances.
    pub vms: Store<QemuInstance>,
    /// Cache of checkpoints (shared by both controllers).
    pub checkpoints: Store<VirtualMachineCheckpoint>,
    /// The checkpoints of each VM in chain order, for parents in O(log n).
    pub siblings: Arc<crate::siblings::SiblingIndex>,
    /// Cache of backups.
    pub backups: Store<VirtualMachineBackup>,
    /// Asks the checkpoint controller to look at a checkpoint again (children of a deleted parent).
    pub checkpoint_trigger: UnboundedSender<ObjectRef<VirtualMachineCheckpoint>>,
    /// Metrics and health.
    pub health: Arc<Health>,
    /// Where repository Secrets live and which directories repositories may use.
    pub repositories: crate::repository_controller::RepositorySettings,
    /// Consecutive failures per object, for exponential backoff.
    pub failures: Mutex<HashMap<String, u32>>,
    /// Routing metadata written whose watch event may not be in the cache yet.
    pub routing_written: crate::routing::WrittenRouting,
}

impl Context {
    /// The API of `K` in `namespace`.
    pub fn api<K>(&self, namespace: &str) -> Api<K>
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), namespace)
    }

    /// Forgets the failures of `key` after a successful reconcile.
    pub fn succeeded(&self, key: &str) {
        if let Ok(mut f) = self.failures.lock() {
            f.remove(key);
        }
    }

    /// Requeue after a transient failure of `key`: 1 s, 2 s, 4 s … up to 5 minutes.
    pub fn backoff(&self, key: &str) -> Action {
        let attempts = self
            .failures
            .lock()
            .map(|mut f| {
                let n = f.entry(key.to_string()).or_insert(0);
                *n = n.saturating_add(1);
                *n
            })
            .unwrap_or(1);
        let secs = 1u64 << attempts.saturating_sub(1).min(9);
        Action::requeue(Duration::from_secs(secs.min(300)))
    }
}
