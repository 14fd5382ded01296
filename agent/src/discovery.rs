//! Finds QEMU processes by their QMP sockets and keeps one session per VM.
//!
//! The layout is `<root>/<namespace>/<vm>.sock`; the namespace comes from the
//! path only. `<vm>.qga.sock` next to it is that VM's guest agent, not a VM. A `notify` watcher triggers a rescan on any change below the
//! root, and a periodic rescan catches whatever the watcher missed. Each
//! socket gets one reconnecting [`QmpClient`]; when the socket disappears the
//! session is dropped. Changes are announced as [`DiscoveryEvent`]s.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::{broadcast, mpsc};
use tracing::{info, warn};

use crate::inventory::{InventoryError, VmInventory, VmRef, read_inventory};
use crate::qmp::{ConnectionState, QmpClient, QmpOptions};

/// Discovery settings.
#[derive(Debug, Clone)]
pub struct DiscoveryOptions {
    /// Socket directory root.
    pub root: PathBuf,
    /// Periodic rescan interval.
    pub rescan_interval: Duration,
    /// Options of each QMP session.
    pub qmp: QmpOptions,
}

/// A change in the set of VMs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiscoveryEvent {
    /// A socket appeared; a session was started.
    Appeared(VmRef),
    /// A socket vanished; its session was dropped.
    Disappeared(VmRef),
}

/// Discovery failures.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The root cannot be created or watched.
    #[error("cannot watch socket directory {root}")]
    Watch {
        /// The root.
        root: PathBuf,
        /// The watcher failure.
        #[source]
        source: notify::Error,
    },
    /// No such VM (yet).
    #[error("no QMP socket for VM {namespace}/{name} under {root}")]
    UnknownVm {
        /// Namespace.
        namespace: String,
        /// VM name.
        name: String,
        /// The root.
        root: PathBuf,
    },
    /// Reading the inventory failed.
    #[error(transparent)]
    Inventory(#[from] InventoryError),
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
}

/// Suffix of a VM's guest-agent socket, which sits next to its QMP socket.
pub const GUEST_AGENT_SUFFIX: &str = ".qga.sock";

/// Lists `<root>/<namespace>/<vm>.sock` unix sockets, sorted; guest-agent
/// sockets (`<vm>.qga.sock`) are not VMs.
pub fn scan_socket_dir(root: &Path) -> Vec<VmRef> {
    let mut out = Vec::new();
    let Ok(namespaces) = std::fs::read_dir(root) else {
        return out;
    };
    for ns in namespaces.flatten() {
        let ns_name = ns.file_name().to_string_lossy().to_string();
        if !valid_segment(&ns_name) || !ns.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            continue;
        }
        let Ok(files) = std::fs::read_dir(ns.path()) else {
            continue;
        };
        for f in files.flatten() {
            let file = f.file_name().to_string_lossy().to_string();
            if file.ends_with(GUEST_AGENT_SUFFIX) {
                continue;
            }
            let Some(vm) = file.strip_suffix(".sock") else {
                continue;
            };
            if valid_segment(vm) && f.file_type().map(|t| t.is_socket()).unwrap_or(false) {
                out.push(VmRef {
                    namespace: ns_name.clone(),
                    name: vm.to_string(),
                    socket: f.path(),
                });
            }
        }
    }
    out.sort();
    out
}

struct Inner {
    options: DiscoveryOptions,
    sessions: Mutex<BTreeMap<(String, String), (VmRef, QmpClient)>>,
    events: broadcast::Sender<DiscoveryEvent>,
    changes: broadcast::Sender<VmRef>,
    rescans: std::sync::atomic::AtomicU64,
}

/// The set of discovered VMs and their sessions. Cheap to clone; the
/// background watcher stops when the last clone is dropped.
#[derive(Clone)]
pub struct Discovery {
    inner: Arc<Inner>,
}

impl Discovery {
    /// Creates the root if needed, scans it once and starts watching.
    pub fn start(options: DiscoveryOptions) -> Result<Self, DiscoveryError> {
        let root = options.root.clone();
        let werr = |source| DiscoveryError::Watch {
            root: root.clone(),
            source,
        };
        std::fs::create_dir_all(&root).map_err(|e| werr(notify::Error::io(e)))?;
        let (ev_tx, _) = broadcast::channel(256);
        let inner = Arc::new(Inner {
            options,
            sessions: Mutex::new(BTreeMap::new()),
            events: ev_tx,
            changes: broadcast::channel(1024).0,
            rescans: Default::default(),
        });
        let (tx, mut rx) = mpsc::channel::<()>(16);
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            // Reading the directories (as a rescan does) is reported as access;
            // reacting to it would rescan in a loop. Sockets come and go as
            // create/remove/rename; errors and unknown kinds rescan to be safe.
            if let Ok(event) = &res
                && event.kind.is_access()
            {
                return;
            }
            let _ = tx.try_send(());
        })
        .map_err(werr)?;
        watcher
            .watch(&root, RecursiveMode::Recursive)
            .map_err(werr)?;
        let discovery = Self { inner };
        discovery.rescan();
        let weak: Weak<Inner> = Arc::downgrade(&discovery.inner);
        let interval = discovery.inner.options.rescan_interval;
        tokio::spawn(async move {
            let _watcher = watcher; // lives as long as the task
            let mut tick = tokio::time::interval(interval);
            loop {
                tokio::select! {
                    _ = rx.recv() => {
                        // Coalesce bursts of file events.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        while rx.try_recv().is_ok() {}
                    }
                    _ = tick.tick() => {}
                }
                let Some(inner) = weak.upgrade() else { break };
                Discovery { inner }.rescan();
            }
        });
        Ok(discovery)
    }

    /// Rescans the root now; starts and drops sessions as sockets come and go.
    pub fn rescan(&self) {
        self.inner
            .rescans
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let found = scan_socket_dir(&self.inner.options.root);
        let mut sessions = self.inner.sessions.lock().expect("discovery lock");
        let keys: BTreeSet<(String, String)> = found
            .iter()
            .map(|v| (v.namespace.clone(), v.name.clone()))
            .collect();
        let gone: Vec<(String, String)> = sessions
            .keys()
            .filter(|k| !keys.contains(k))
            .cloned()
            .collect();
        for k in gone {
            if let Some((vm, _client)) = sessions.remove(&k) {
                info!(vm = %vm, "QMP socket vanished");
                let _ = self.inner.events.send(DiscoveryEvent::Disappeared(vm));
            }
        }
        for vm in found {
            let key = (vm.namespace.clone(), vm.name.clone());
            if sessions.contains_key(&key) {
                continue;
            }
            info!(vm = %vm, socket = %vm.socket.display(), "QMP socket discovered");
            let client = QmpClient::spawn(&vm.socket, self.inner.options.qmp.clone());
            forward_changes(&client, &vm, self.inner.changes.clone());
            sessions.insert(key, (vm.clone(), client));
            let _ = self.inner.events.send(DiscoveryEvent::Appeared(vm));
        }
    }

    /// How many times the socket directory was scanned.
    pub fn rescans(&self) -> u64 {
        self.inner
            .rescans
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The VMs currently known.
    pub fn vms(&self) -> Vec<VmRef> {
        self.inner
            .sessions
            .lock()
            .expect("discovery lock")
            .values()
            .map(|(v, _)| v.clone())
            .collect()
    }

    /// The session of a VM.
    pub fn session(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<(VmRef, QmpClient), DiscoveryError> {
        self.inner
            .sessions
            .lock()
            .expect("discovery lock")
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
            .ok_or_else(|| DiscoveryError::UnknownVm {
                namespace: namespace.to_string(),
                name: name.to_string(),
                root: self.inner.options.root.clone(),
            })
    }

    /// Waits until the VM's QMP session is connected (or closed), at most
    /// one handshake timeout: a QEMU that is still starting keeps nobody
    /// else waiting.
    pub async fn connected(&self, namespace: &str, name: &str) {
        let Ok((_, client)) = self.session(namespace, name) else {
            return;
        };
        let limit = client.options().handshake_timeout;
        let mut state = client.state();
        let ready = state.wait_for(|s| !matches!(s, ConnectionState::Connecting));
        let _ = tokio::time::timeout(limit, ready).await;
    }

    /// Reads a VM's inventory through its session.
    pub async fn inventory(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<VmInventory, DiscoveryError> {
        let (vm, client) = self.session(namespace, name)?;
        Ok(read_inventory(&client, &vm).await?)
    }

    /// Inventories of every VM that answers; failures are logged and skipped.
    pub async fn inventories(&self) -> Vec<VmInventory> {
        let mut out = Vec::new();
        for vm in self.vms() {
            match self.inventory(&vm.namespace, &vm.name).await {
                Ok(inv) => out.push(inv),
                Err(e) => warn!(vm = %vm, error = %e, "cannot read inventory"),
            }
        }
        out
    }

    /// Subscribes to appear/disappear events.
    pub fn subscribe(&self) -> broadcast::Receiver<DiscoveryEvent> {
        self.inner.events.subscribe()
    }

    /// Subscribes to VMs whose state may have changed: a QMP event, a
    /// connection that came or went, or a state-changing command sent through
    /// the session. Bursts repeat a VM; a lagging receiver should look at all.
    pub fn subscribe_changes(&self) -> broadcast::Receiver<VmRef> {
        self.inner.changes.subscribe()
    }
}

/// Announces `vm` on `changes` whenever its session reports an event, a
/// connection change or a state-changing command; ends with the session.
fn forward_changes(client: &QmpClient, vm: &VmRef, changes: broadcast::Sender<VmRef>) {
    let mut events = client.subscribe();
    let mut state = client.state();
    let mut commands = client.changes();
    let vm = vm.clone();
    tokio::spawn(async move {
        loop {
            let open = tokio::select! {
                e = events.recv() => !matches!(e, Err(broadcast::error::RecvError::Closed)),
                r = state.changed() => r.is_ok(),
                r = commands.changed() => r.is_ok(),
            };
            if !open {
                break;
            }
            let _ = changes.send(vm.clone());
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_agent_sockets_are_not_vms() {
        let root = tempfile::tempdir().unwrap();
        let ns = root.path().join("tenant");
        std::fs::create_dir(&ns).unwrap();
        let _vm = std::os::unix::net::UnixListener::bind(ns.join("vm1.sock")).unwrap();
        let _qga = std::os::unix::net::UnixListener::bind(ns.join("vm1.qga.sock")).unwrap();
        let found = scan_socket_dir(root.path());
        let names: Vec<&str> = found.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["vm1"]);
    }
}
