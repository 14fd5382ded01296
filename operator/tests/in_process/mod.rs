//! What the operator's API-server tests share: an operator replica run in
//! process, polling with a deadline, and QemuInstances as an agent would
//! publish them.

#![allow(dead_code)] // each test binary uses its own part

use std::time::Duration;

use anyhow::{Result, bail};
use cairn_api::QemuInstance;
use cairn_e2e::harness::TestEnv;
use cairn_operator::{Operator, OperatorStatus, Settings};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::oneshot;

/// A running in-process operator; [`Running::stop`] shuts it down.
pub struct Running {
    pub status: OperatorStatus,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<cairn_operator::Result<()>>,
}

impl Running {
    /// Asks the replica to shut down (giving the lease up) and waits for it.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

/// Settings of a replica `identity` watching only the env's namespace, with
/// a short lease (4 s, renewed every second).
pub fn settings(env: &TestEnv, identity: &str) -> Settings {
    let mut settings = Settings::new("127.0.0.1:0", &env.namespace, identity);
    settings.watch_namespace = Some(env.namespace.clone());
    settings.lease.lease_duration = Duration::from_secs(4);
    settings.lease.renew_interval = Duration::from_secs(1);
    settings
}

/// Starts a replica with `settings`.
pub fn start_with(env: &TestEnv, settings: Settings) -> Running {
    // The operator's warnings (failed reconciles) in the test output.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,kube=error".into()),
        )
        .with_test_writer()
        .try_init();
    let operator = Operator::new(env.client.clone(), settings);
    let status = operator.status();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(operator.run(async move {
        let _ = rx.await;
    }));
    Running {
        status,
        stop: Some(tx),
        task,
    }
}

/// Starts a replica `identity` with [`settings`].
pub fn start(env: &TestEnv, identity: &str) -> Running {
    start_with(env, settings(env, identity))
}

/// Polls `f` until it returns `Some` (errors count as not yet), for at most 100 s.
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(100);
    let mut last_err = None;
    loop {
        match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out waiting for {what} (last error: {last_err:?})");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Creates QemuInstance `name` running on `node`, as its agent would.
pub async fn create_vm(client: &Client, ns: &str, name: &str, node: &str) -> Result<()> {
    let api: Api<QemuInstance> = Api::namespaced(client.clone(), ns);
    api.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "apiVersion": "cairn.dev/v1alpha1", "kind": "QemuInstance",
            "metadata": {"name": name}
        }))?,
    )
    .await?;
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"nodeName": node, "runState": "running"}})),
    )
    .await?;
    Ok(())
}
