//! `cairn-operator`: the cluster brain of Cairn.
//!
//! It routes VirtualMachineCheckpoints and VirtualMachineBackups to the agent
//! of the node their VM runs on (label `cairn.dev/node`), rejects what can
//! never work with a `Failed` status naming the problem, creates the
//! checkpoints backups ask for, owns the finalizers (removed once the agent
//! reports `CleanedUp=True`), computes the checkpoint chain (`status.parent`)
//! and deletes finished backups after their TTL. It never talks to QEMU.
//!
//! How the parts talk:
//! - [`run`] / [`Operator::run`] serve `/metrics`, `/healthz`, `/readyz`
//!   ([`metrics`]), then take part in leader election ([`leader`]); only the
//!   leader runs the controllers, and losing the lease ends `run` with an
//!   error so the process restarts.
//! - [`run_controllers`] starts one reflector per kind (QemuInstances,
//!   checkpoints, backups), shared as caches through [`context::Context`],
//!   and the controllers ([`checkpoint`], [`backup`], [`schedule`] for
//!   VirtualMachineBackupSchedules, [`repository_controller`] for the
//!   cluster-scoped BackupRepositories). A QemuInstance
//!   that appears, disappears or changes node re-triggers the objects of
//!   that VM, so objects applied before their VM recover without user action.
//! - [`routing`] holds what both controllers share, including the
//!   operator ↔ agent finalizer handshake (docs/architecture.md).

#![forbid(unsafe_code)]

pub mod backup;
pub mod checkpoint;
pub mod context;
pub mod error;
pub mod leader;
pub mod metrics;
pub mod nbd_tls;
pub mod repository;
pub mod repository_controller;
pub mod restore;
pub mod routing;
pub mod schedule;
pub mod siblings;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use cairn_api::{
    BackupRepository, QemuInstance, VirtualMachineBackup, VirtualMachineBackupSchedule,
    VirtualMachineCheckpoint, VirtualMachineRestore,
};
use futures::channel::mpsc;
use futures::{FutureExt, Stream, StreamExt};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Api, Client, Resource, ResourceExt};

pub use error::{Error, Result};
pub use leader::LeaseSettings;
pub use repository_controller::RepositorySettings;

use crate::context::Context;
use crate::metrics::{Health, Metrics};

/// Everything [`run`] needs besides the client.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Address of `/metrics`, `/healthz`, `/readyz` (`127.0.0.1:0` picks a free port).
    pub metrics_addr: String,
    /// Leader election.
    pub lease: LeaseSettings,
    /// Watch only this namespace (`None`: the whole cluster).
    pub watch_namespace: Option<String>,
    /// Cairn's namespace (repository Secrets) and the allowed repository roots.
    pub repositories: RepositorySettings,
}

impl Settings {
    /// Defaults for `identity`: 15 s lease, renewed every 5 s, all namespaces.
    pub fn new(metrics_addr: &str, lease_namespace: &str, identity: &str) -> Self {
        Self {
            metrics_addr: metrics_addr.to_string(),
            lease: LeaseSettings {
                name: "cairn-operator".into(),
                namespace: lease_namespace.into(),
                identity: identity.into(),
                lease_duration: Duration::from_secs(15),
                renew_interval: Duration::from_secs(5),
            },
            watch_namespace: None,
            repositories: RepositorySettings {
                namespace: lease_namespace.into(),
                roots: Vec::new(),
            },
        }
    }
}

/// Live view of a running operator (for tests and embedding).
#[derive(Clone)]
pub struct OperatorStatus {
    health: Arc<Health>,
    addr: Arc<OnceLock<SocketAddr>>,
}

impl OperatorStatus {
    /// Whether this replica currently holds the lease and runs the controllers.
    pub fn is_leader(&self) -> bool {
        self.health.metrics.leader.get() == 1
    }
    /// Whether `/readyz` answers ok.
    pub fn is_ready(&self) -> bool {
        self.health.ready.load(Ordering::Relaxed)
    }
    /// The bound address of the HTTP endpoints, once bound.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.addr.get().copied()
    }
    /// The metrics in OpenMetrics text format.
    pub fn metrics_text(&self) -> String {
        self.health.metrics.encode()
    }
}

/// One operator replica.
pub struct Operator {
    client: Client,
    settings: Settings,
    status: OperatorStatus,
}

impl Operator {
    /// A replica using `client` (any client: in-cluster, KUBECONFIG, a test's admin client).
    pub fn new(client: Client, settings: Settings) -> Self {
        let health = Arc::new(Health {
            metrics: Metrics::default(),
            ready: Default::default(),
        });
        Self {
            client,
            settings,
            status: OperatorStatus {
                health,
                addr: Default::default(),
            },
        }
    }

    /// A handle that observes this replica while it runs.
    pub fn status(&self) -> OperatorStatus {
        self.status.clone()
    }

    /// Serves the endpoints, waits for the lease, runs the controllers while
    /// leading. Returns `Ok` when `shutdown` completes (giving the lease up),
    /// and an error when the lease is lost or the controllers stop.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
        let health = self.status.health.clone();
        let (addr, server) = metrics::serve(&self.settings.metrics_addr, health.clone()).await?;
        let _ = self.status.addr.set(addr);
        tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
        let server = tokio::spawn(server);
        let _abort_server = AbortOnDrop(server);

        let work = async {
            // Ready once the API server answers.
            loop {
                match self.client.apiserver_version().await {
                    Ok(v) => {
                        tracing::info!(version = %v.git_version, "connected to the API server");
                        break;
                    }
                    Err(error) => tracing::warn!(%error, "API server not reachable yet"),
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            health.ready.store(true, Ordering::Relaxed);

            let mut elector =
                leader::LeaderElector::new(self.client.clone(), self.settings.lease.clone());
            elector.acquire().await?;
            health.metrics.leader.set(1);
            let controllers = run_controllers(
                self.client.clone(),
                self.settings.watch_namespace.clone(),
                self.settings.lease.identity.clone(),
                self.settings.repositories.clone(),
                health.clone(),
            );
            let error = tokio::select! {
                lost = elector.hold() => lost,
                () = controllers => Error::ControllersStopped,
            };
            health.metrics.leader.set(0);
            Result::<(), Error>::Err(error)
        };
        tokio::select! {
            r = work => r,
            () = shutdown => {
                if health.metrics.leader.get() == 1 {
                    let mut elector = leader::LeaderElector::new(self.client.clone(), self.settings.lease.clone());
                    elector.release().await;
                    health.metrics.leader.set(0);
                }
                tracing::info!("shut down");
                Ok(())
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs one replica with `client` until SIGTERM/ctrl-c (returns `Ok`) or until
/// the lease is lost (returns an error: exit and let the process restart).
pub async fn run(client: Client, settings: Settings) -> Result<()> {
    Operator::new(client, settings).run(shutdown_signal()).await
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            tokio::select! {
                _ = term.recv() => {},
                _ = tokio::signal::ctrl_c() => {},
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

fn api_for<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = kube::core::NamespaceResourceScope>,
    <K as Resource>::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Reconciles in flight per routing controller (checkpoints, backups). A
/// reconcile is two API round trips (status, then labels), so under a burst of
/// creates the operator's share of a saturated API server follows its requests
/// in flight: at 16 it routed about a third as fast as a client creating 32 at
/// a time, and 10,000 checkpoints were routed 33–39 s after the last create; at
/// 64 routing keeps pace with the creates (3 s after the last one). The total
/// is the API server's: the same ~30,000 writes either way.
pub const ROUTING_CONCURRENCY: u16 = 64;

/// A cache of `K` and the stream of changed objects that keeps it filled.
/// `managedFields` are dropped before caching (they are most of an object's
/// size and the operator never reads them).
fn cached<K>(
    api: Api<K>,
) -> (
    Store<K>,
    impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
)
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = watcher(api, watcher::Config::default().any_semantic())
        .default_backoff()
        .modify(|o: &mut K| o.managed_fields_mut().clear())
        .reflect(writer);
    (reader, stream)
}

/// Runs the checkpoint and backup controllers (no leader election) until the
/// returned future is dropped. Used by [`Operator::run`] while leading.
pub async fn run_controllers(
    client: Client,
    namespace: Option<String>,
    identity: String,
    repositories: RepositorySettings,
    health: Arc<Health>,
) {
    let ns = namespace.as_deref();
    let (vms, vm_events) = cached(api_for::<QemuInstance>(&client, ns));
    let (checkpoints, checkpoint_events) = cached(api_for::<VirtualMachineCheckpoint>(&client, ns));
    let siblings = Arc::new(siblings::SiblingIndex::default());
    let index = siblings.clone();
    let checkpoint_events = checkpoint_events.inspect(move |e| {
        if let Ok(e) = e {
            index.observe(e);
        }
    });
    let (backups, backup_events) = cached(api_for::<VirtualMachineBackup>(&client, ns));
    let (restores, restore_events) = cached(api_for::<VirtualMachineRestore>(&client, ns));
    // Repositories are cluster-scoped: watched whole, whatever the namespace limit.
    let (repos, repo_events) = cached(Api::<BackupRepository>::all(client.clone()));

    // QemuInstance changes that matter for routing: created, deleted, moved.
    let (vm_tx_cp, vm_rx_cp) = mpsc::unbounded::<(String, String)>();
    let (vm_tx_b, vm_rx_b) = mpsc::unbounded::<(String, String)>();
    let vm_forwarder = async move {
        let mut nodes: HashMap<(String, String), Option<String>> = HashMap::new();
        // After the first list, a re-list (the watch expired, e.g. across an
        // API server restart) is diffed like any change: VMs that appeared or
        // vanished during the gap must revive or re-judge their objects.
        let mut listed_once = false;
        let mut relisted: HashSet<(String, String)> = HashSet::new();
        let mut events = std::pin::pin!(vm_events);
        let key_of = |o: &QemuInstance| (o.namespace().unwrap_or_default(), o.name_any());
        let trigger = |key: (String, String)| {
            let _ = vm_tx_cp.unbounded_send(key.clone());
            let _ = vm_tx_b.unbounded_send(key);
        };
        while let Some(event) = events.next().await {
            let (obj, gone) = match event {
                Ok(watcher::Event::Apply(o)) => (o, false),
                Ok(watcher::Event::Init) => {
                    relisted.clear();
                    continue;
                }
                Ok(watcher::Event::InitApply(o)) => {
                    relisted.insert(key_of(&o));
                    if !listed_once {
                        // Controllers reconcile everything at start; only remember the node.
                        let node = o.status.as_ref().and_then(|s| s.node_name.clone());
                        nodes.insert(key_of(&o), node);
                        continue;
                    }
                    (o, false)
                }
                Ok(watcher::Event::InitDone) => {
                    if listed_once {
                        let vanished: Vec<_> = nodes
                            .keys()
                            .filter(|k| !relisted.contains(*k))
                            .cloned()
                            .collect();
                        for key in vanished {
                            nodes.remove(&key);
                            trigger(key);
                        }
                    }
                    listed_once = true;
                    continue;
                }
                Ok(watcher::Event::Delete(o)) => (o, true),
                Err(error) => {
                    tracing::warn!(%error, "QemuInstance watch failed; retrying");
                    continue;
                }
            };
            let key = key_of(&obj);
            let node = obj.status.as_ref().and_then(|s| s.node_name.clone());
            let changed = if gone {
                nodes.remove(&key).is_some()
            } else {
                nodes.insert(key.clone(), node.clone()) != Some(node)
            };
            if changed {
                trigger(key);
            }
        }
    };

    let (cp_tx, cp_rx) = mpsc::unbounded::<ObjectRef<VirtualMachineCheckpoint>>();
    let reporter = Reporter {
        controller: cairn_api::OPERATOR_MANAGER.into(),
        instance: Some(identity),
    };
    let ctx = Arc::new(Context {
        client: client.clone(),
        namespace: namespace.clone(),
        recorder: Recorder::new(client.clone(), reporter),
        vms: vms.clone(),
        checkpoints: checkpoints.clone(),
        siblings,
        backups: backups.clone(),
        checkpoint_trigger: cp_tx,
        health: health.clone(),
        repositories,
        failures: Mutex::new(HashMap::new()),
        routing_written: Default::default(),
    });

    let cp_store = checkpoints.clone();
    let cp_by_vm = vm_rx_cp
        .map(move |(ns, vm)| {
            futures::stream::iter(
                cp_store
                    .state()
                    .into_iter()
                    .filter(|c| {
                        c.namespace().as_deref() == Some(ns.as_str())
                            && c.spec.virtual_machine == vm
                    })
                    .map(|c| ObjectRef::from_obj(c.as_ref()))
                    .collect::<Vec<_>>(),
            )
        })
        .flatten();
    let b_store = backups.clone();
    let b_by_vm = vm_rx_b
        .map(move |(ns, vm)| {
            futures::stream::iter(
                b_store
                    .state()
                    .into_iter()
                    .filter(|b| {
                        b.namespace().as_deref() == Some(ns.as_str())
                            && b.spec.virtual_machine == vm
                    })
                    .map(|b| ObjectRef::from_obj(b.as_ref()))
                    .collect::<Vec<_>>(),
            )
        })
        .flatten();

    let config = kube::runtime::controller::Config::default().concurrency(ROUTING_CONCURRENCY);
    let checkpoint_controller =
        Controller::for_stream(checkpoint_events.applied_objects(), checkpoints.clone())
            .with_config(config.clone())
            .reconcile_on(futures::stream::select(cp_by_vm, cp_rx))
            .run(
                |o, c| checkpoint::reconcile(o, c).boxed(),
                |o, e, c| error_policy(checkpoint::CONTROLLER, o.as_ref(), e, &c),
                ctx.clone(),
            )
            .for_each(|r| async move {
                if let Err(error) = r {
                    tracing::debug!(%error, "checkpoint reconcile failed");
                }
            });
    let backup_controller =
        Controller::for_stream(backup_events.applied_objects(), backups.clone())
            .with_config(config)
            .reconcile_on(b_by_vm)
            .run(
                |o, c| backup::reconcile(o, c).boxed(),
                |o, e, c| error_policy(backup::CONTROLLER, o.as_ref(), e, &c),
                ctx.clone(),
            )
            .for_each(|r| async move {
                if let Err(error) = r {
                    tracing::debug!(%error, "backup reconcile failed");
                }
            });

    // Spec changes (generation) and the periodic refresh; its own status writes do not re-trigger it.
    let repository_controller = Controller::for_stream(
        repo_events
            .applied_objects()
            .predicate_filter(predicates::generation, Default::default()),
        repos,
    )
    .with_config(kube::runtime::controller::Config::default().concurrency(4))
    .run(
        |o, c| repository_controller::reconcile(o, c).boxed(),
        |o, e, c| error_policy(repository_controller::CONTROLLER, o.as_ref(), e, &c),
        ctx.clone(),
    )
    .for_each(|r| async move {
        if let Err(error) = r {
            tracing::debug!(%error, "repository reconcile failed");
        }
    });
    let restore_controller = Controller::for_stream(restore_events.applied_objects(), restores)
        .with_config(kube::runtime::controller::Config::default().concurrency(8))
        .run(
            |o, c| restore::reconcile(o, c).boxed(),
            |o, e, c| error_policy(restore::CONTROLLER, o.as_ref(), e, &c),
            ctx.clone(),
        )
        .for_each(|r| async move {
            if let Err(error) = r {
                tracing::debug!(%error, "restore reconcile failed");
            }
        });
    // Restores read the VM and backup caches.
    let (vms_r, backups_r) = (vms.clone(), backups.clone());
    let restore_after_caches = async move {
        let _ = vms_r.wait_until_ready().await;
        let _ = backups_r.wait_until_ready().await;
        restore_controller.await;
    };
    // Prune reads the backup cache.
    let backups_for_repos = backups.clone();
    let repository_after_backups = async {
        let _ = backups_for_repos.wait_until_ready().await;
        repository_controller.await;
    };

    // Schedules: their own watch, and their backups' changes (owner references)
    // wake them, so a finished run is pruned and reported at once.
    let schedule_controller = Controller::new(
        api_for::<VirtualMachineBackupSchedule>(&client, ns),
        watcher::Config::default().any_semantic(),
    );
    // Series of deleted schedules go (schedules have no finalizer, so no
    // reconcile sees them go).
    let schedule_store = schedule_controller.store();
    let metrics_health = health.clone();
    let forget_deleted_schedules = async move {
        let _ = schedule_store.wait_until_ready().await;
        loop {
            tokio::time::sleep(schedule::METRICS_SWEEP).await;
            metrics_health.metrics.retain_schedules(|ns, name| {
                schedule_store
                    .get(&ObjectRef::new(name).within(ns))
                    .is_some()
            });
        }
    };
    let schedule_controller = schedule_controller
        .owns(
            api_for::<VirtualMachineBackup>(&client, ns),
            watcher::Config::default().any_semantic(),
        )
        .with_config(kube::runtime::controller::Config::default().concurrency(4))
        .run(
            |o, c| schedule::reconcile(o, c).boxed(),
            |o, e, c| error_policy(schedule::CONTROLLER, o.as_ref(), e, &c),
            ctx.clone(),
        )
        .for_each(|r| async move {
            if let Err(error) = r {
                tracing::debug!(%error, "schedule reconcile failed");
            }
        });
    // Schedules plan from the VM, checkpoint and backup caches.
    let (vms_s, checkpoints_s, backups_s) = (vms.clone(), checkpoints.clone(), backups.clone());
    let schedule_after_caches = async move {
        let _ = vms_s.wait_until_ready().await;
        let _ = checkpoints_s.wait_until_ready().await;
        let _ = backups_s.wait_until_ready().await;
        schedule_controller.await;
    };

    // The backup controller reads the checkpoint and VM caches: start it once they are filled.
    let backup_after_caches = async {
        let _ = vms.wait_until_ready().await;
        let _ = checkpoints.wait_until_ready().await;
        backup_controller.await;
    };
    let checkpoint_after_vms = async {
        let _ = vms.wait_until_ready().await;
        checkpoint_controller.await;
    };
    tracing::info!(namespace = ?namespace, "controllers started");
    tokio::join!(
        vm_forwarder,
        checkpoint_after_vms,
        backup_after_caches,
        repository_after_backups,
        restore_after_caches,
        schedule_after_caches,
        forget_deleted_schedules
    );
}

/// Transient errors retry with exponential backoff per object; an object
/// without namespace can never work and waits for a change.
fn error_policy<K: Resource>(
    controller: &'static str,
    obj: &K,
    error: &Error,
    ctx: &Context,
) -> Action {
    ctx.health.metrics.failed(controller);
    let key = format!(
        "{controller}/{}/{}",
        obj.namespace().unwrap_or_default(),
        obj.name_any()
    );
    tracing::warn!(%error, object = %key, "reconcile failed");
    match error {
        Error::MissingNamespace(_) => Action::await_change(),
        _ => ctx.backoff(&key),
    }
}
