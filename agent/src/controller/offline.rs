//! Backups of stopped VMs in the controllers: a backup that finds its VM
//! stopped on this node opens the VM's images in an offline helper
//! ([`crate::offline::OfflineVm`]) and holds a lease on it; the helper
//! closes (writing persistent bitmaps back) when its last lease goes.

use std::collections::{BTreeSet, HashMap};

use tracing::warn;

use super::Context;
use crate::checkpoint::Domain;
use crate::inventory::VmRef;
use crate::offline::{OfflineError, OfflineVm};
use crate::qmp::QmpClient;

/// An open helper and the UIDs of the backups using it.
type Leased = (OfflineVm, BTreeSet<String>);

/// Offline helpers by (namespace, VM).
#[derive(Default)]
pub struct OfflineVms(tokio::sync::Mutex<HashMap<(String, String), Leased>>);

impl Context {
    /// The QMP session of `vm`: the offline helper a backup opened on its
    /// images, else the running VM. The helper comes first: while it holds the images no VM can run on
    /// them, and a socket a failed start left behind is not the VM.
    pub async fn session(&self, ns: &str, vm: &str) -> Option<(VmRef, QmpClient)> {
        let helper = self
            .offline
            .0
            .lock()
            .await
            .get(&(ns.to_string(), vm.to_string()))
            .map(|(o, _)| (o.vm.clone(), o.client.clone()));
        helper.or_else(|| self.discovery.session(ns, vm).ok())
    }

    /// Opens the images of stopped VM `vm` (or joins the helper another
    /// backup opened) for the backup `uid`.
    pub async fn open_offline(
        &self,
        ns: &str,
        vm: &str,
        domain: &Domain,
        uid: &str,
    ) -> Result<(VmRef, QmpClient), OfflineError> {
        let key = (ns.to_string(), vm.to_string());
        {
            let mut helpers = self.offline.0.lock().await;
            if let Some((helper, users)) = helpers.get_mut(&key) {
                users.insert(uid.to_string());
                return Ok((helper.vm.clone(), helper.client.clone()));
            }
        }
        // Started without the lock: every reconcile looks sessions up here.
        let helper = OfflineVm::start(
            &self.config.runtime_dir,
            ns,
            vm,
            domain,
            crate::qmp::QmpOptions {
                command_timeout: self.config.qmp_timeout,
                reconnect: false,
                ..Default::default()
            },
        )
        .await?;
        let mut helpers = self.offline.0.lock().await;
        // Another backup of the same VM won the race (its QEMU holds the
        // image lock, so ours could not have opened): use theirs.
        let (helper, users) = helpers
            .entry(key)
            .or_insert_with(|| (helper, BTreeSet::new()));
        users.insert(uid.to_string());
        Ok((helper.vm.clone(), helper.client.clone()))
    }

    /// Drops backup `uid`'s lease on `vm`'s helper; the last lease closes it.
    /// A no-op when `uid` holds none.
    pub async fn release_offline(&self, ns: &str, vm: &str, uid: &str) {
        let mut helpers = self.offline.0.lock().await;
        let key = (ns.to_string(), vm.to_string());
        let Some((_, users)) = helpers.get_mut(&key) else {
            return;
        };
        if !users.remove(uid) || !users.is_empty() {
            return;
        }
        let helper = helpers.remove(&key);
        drop(helpers);
        match helper {
            Some((helper, _)) => helper.stop().await,
            None => warn!(namespace = ns, vm, "offline helper vanished"),
        }
    }
}
