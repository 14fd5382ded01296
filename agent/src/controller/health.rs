//! The agent's `/healthz`, `/readyz` and `/metrics` endpoints (axum,
//! prometheus-client), served on `--metrics-addr` for the DaemonSet's probes.

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

/// Label naming a controller (`checkpoint` or `backup`) and an outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// Controller name.
    pub controller: &'static str,
    /// `ok` or `error`.
    pub outcome: &'static str,
}

/// The agent's metrics and readiness.
pub struct Health {
    registry: Registry,
    /// VMs with a QMP session on this node.
    pub vms: Gauge,
    /// Reconciles by controller and outcome.
    pub reconciles: Family<OutcomeLabel, Counter>,
    /// Backups finished, by outcome (`ok`/`error`).
    pub backups_finished: Family<OutcomeLabel, Counter>,
    ready: AtomicBool,
}

impl Default for Health {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("cairn_agent");
        let vms = Gauge::default();
        let reconciles = Family::<OutcomeLabel, Counter>::default();
        let backups_finished = Family::<OutcomeLabel, Counter>::default();
        registry.register("vms", "VMs with a QMP session on this node", vms.clone());
        registry.register(
            "reconciles",
            "Reconciles by controller and outcome",
            reconciles.clone(),
        );
        registry.register(
            "backups_finished",
            "Backups finished by outcome",
            backups_finished.clone(),
        );
        Self {
            registry,
            vms,
            reconciles,
            backups_finished,
            ready: AtomicBool::new(false),
        }
    }
}

impl Health {
    /// Marks the agent ready (discovery runs and the API server answered).
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// The metrics in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Binds `addr` and serves until the process stops; returns the bound address.
pub async fn serve(addr: &str, health: Arc<Health>) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(health);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(bound)
}

async fn readyz(State(h): State<Arc<Health>>) -> impl IntoResponse {
    if h.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting")
    }
}

async fn metrics(State(h): State<Arc<Health>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        h.encode(),
    )
}
