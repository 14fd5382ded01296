//! Prometheus metrics and the `/metrics`, `/healthz`, `/readyz` endpoints (axum).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::error::{Error, Result};

/// Label set naming a controller (`checkpoint` or `backup`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabel {
    /// Controller name.
    pub controller: &'static str,
}

/// Label set naming a backup schedule.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScheduleLabel {
    /// Namespace of the schedule.
    pub namespace: String,
    /// Name of the schedule.
    pub schedule: String,
}

/// The operator's metrics.
pub struct Metrics {
    registry: Registry,
    /// Reconciles run, per controller.
    pub reconciles: Family<ControllerLabel, Counter>,
    /// Reconciles that returned an error, per controller.
    pub reconcile_errors: Family<ControllerLabel, Counter>,
    /// 1 while this replica holds the leader lease.
    pub leader: Gauge,
    /// Scheduled time (unix seconds) of the newest successful run, per schedule.
    pub schedule_last_success: Family<ScheduleLabel, Gauge>,
    /// The schedules [`Self::schedule_last_success`] has a series of.
    schedules: std::sync::Mutex<std::collections::HashSet<ScheduleLabel>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("cairn_operator");
        let reconciles = Family::<ControllerLabel, Counter>::default();
        let reconcile_errors = Family::<ControllerLabel, Counter>::default();
        let leader = Gauge::default();
        let schedule_last_success = Family::<ScheduleLabel, Gauge>::default();
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconciles that failed and were retried",
            reconcile_errors.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader lease",
            leader.clone(),
        );
        registry.register(
            "schedule_last_success_timestamp_seconds",
            "Scheduled time (unix seconds) of the newest successful run of a VirtualMachineBackupSchedule",
            schedule_last_success.clone(),
        );
        Self {
            registry,
            reconciles,
            reconcile_errors,
            leader,
            schedule_last_success,
            schedules: Default::default(),
        }
    }
}

impl Metrics {
    /// Counts one reconcile of `controller`.
    pub fn reconciled(&self, controller: &'static str) {
        self.reconciles
            .get_or_create(&ControllerLabel { controller })
            .inc();
    }

    /// Counts one failed reconcile of `controller`.
    pub fn failed(&self, controller: &'static str) {
        self.reconcile_errors
            .get_or_create(&ControllerLabel { controller })
            .inc();
    }

    /// Records the newest successful run of a schedule (unix seconds).
    pub fn schedule_succeeded(&self, namespace: &str, schedule: &str, unix_seconds: i64) {
        let label = ScheduleLabel {
            namespace: namespace.into(),
            schedule: schedule.into(),
        };
        self.schedule_last_success
            .get_or_create(&label)
            .set(unix_seconds);
        if let Ok(mut s) = self.schedules.lock() {
            s.insert(label);
        }
    }

    /// Drops the series of schedules for which `exists` says no (deleted
    /// ones: a stale series would fire a "no recent backup" alert forever).
    pub fn retain_schedules(&self, exists: impl Fn(&str, &str) -> bool) {
        let Ok(mut known) = self.schedules.lock() else {
            return;
        };
        known.retain(|l| {
            let keep = exists(&l.namespace, &l.schedule);
            if !keep {
                self.schedule_last_success.remove(l);
            }
            keep
        });
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// What the HTTP endpoints report on.
pub struct Health {
    /// The metrics.
    pub metrics: Metrics,
    /// Set once the client reached the API server (both replicas become ready).
    pub ready: AtomicBool,
}

/// Binds `addr` and returns the bound address and the server future.
pub async fn serve(
    addr: &str,
    health: Arc<Health>,
) -> Result<(SocketAddr, impl Future<Output = ()> + Send + 'static)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Serve {
            addr: addr.to_string(),
            source,
        })?;
    let bound = listener.local_addr().map_err(|source| Error::Serve {
        addr: addr.to_string(),
        source,
    })?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(health);
    let server = async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "metrics server stopped");
        }
    };
    Ok((bound, server))
}

async fn readyz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    if health.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not connected to the API server yet",
        )
    }
}

async fn metrics(State(health): State<Arc<Health>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        health.metrics.encode(),
    )
}
