//! Leader election with a `coordination.k8s.io/v1` Lease.
//!
//! Every replica tries to take the lease; the holder renews it every
//! `renew_interval`. A lease counts as expired when its record (holder and
//! renew time) has not changed for `lease_duration` as seen by *this*
//! replica's clock (as client-go does), so clock skew between nodes does not
//! matter. Updates use the lease's `resourceVersion`, so two replicas can never
//! both win the same round.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::time::Instant;

use crate::error::{Error, Result};

/// Settings of the election.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    /// Name of the Lease object.
    pub name: String,
    /// Namespace of the Lease object.
    pub namespace: String,
    /// This replica's identity (pod name).
    pub identity: String,
    /// How long a lease stays valid without renewal.
    pub lease_duration: Duration,
    /// How often the holder renews (and others retry).
    pub renew_interval: Duration,
}

/// One replica's side of the election.
pub struct LeaderElector {
    api: Api<Lease>,
    settings: LeaseSettings,
    /// The last lease record seen and when it was first seen.
    observed: Option<(Option<String>, Option<MicroTime>, Instant)>,
}

impl LeaderElector {
    /// An elector for `settings`.
    pub fn new(client: Client, settings: LeaseSettings) -> Self {
        Self {
            api: Api::namespaced(client, &settings.namespace),
            settings,
            observed: None,
        }
    }

    fn lease_ref(&self) -> String {
        format!("{}/{}", self.settings.namespace, self.settings.name)
    }

    /// Waits until this replica holds the lease.
    pub async fn acquire(&mut self) -> Result<()> {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    tracing::info!(lease = %self.lease_ref(), identity = %self.settings.identity, "became leader");
                    return Ok(());
                }
                Ok(false) => {}
                Err(error) => tracing::warn!(%error, "leader election attempt failed"),
            }
            tokio::time::sleep(self.settings.renew_interval).await;
        }
    }

    /// Renews the lease until it is lost; returns the reason.
    pub async fn hold(&mut self) -> Error {
        let started = Instant::now();
        let mut last_renewed = Instant::now();
        loop {
            tokio::time::sleep(self.settings.renew_interval).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_renewed = Instant::now(),
                Ok(false) => {
                    tracing::error!(lease = %self.lease_ref(), "another replica took the lease");
                    break;
                }
                Err(error) => {
                    tracing::warn!(%error, "renewing the lease failed");
                    // Stop leading before the lease can expire for the others.
                    if last_renewed.elapsed() + self.settings.renew_interval
                        >= self.settings.lease_duration
                    {
                        break;
                    }
                }
            }
        }
        Error::LeadershipLost {
            lease: self.lease_ref(),
            held: started.elapsed(),
        }
    }

    /// Gives the lease up (graceful shutdown), so another replica takes over at once.
    pub async fn release(&mut self) {
        if let Ok(Some(mut lease)) = self.api.get_opt(&self.settings.name).await {
            let spec = lease.spec.get_or_insert_with(Default::default);
            if spec.holder_identity.as_deref() == Some(self.settings.identity.as_str()) {
                spec.holder_identity = None;
                spec.lease_duration_seconds = Some(1);
                let _ = self
                    .api
                    .replace(&self.settings.name, &PostParams::default(), &lease)
                    .await;
            }
        }
    }

    /// One round: takes or renews the lease when allowed. Returns whether this replica holds it.
    async fn try_acquire_or_renew(&mut self) -> Result<bool> {
        let now = MicroTime(Timestamp::now());
        let duration_secs = self.settings.lease_duration.as_secs().max(1) as i32;
        let me = self.settings.identity.clone();
        let Some(mut lease) = self
            .api
            .get_opt(&self.settings.name)
            .await
            .map_err(Error::kube("reading the leader lease"))?
        else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.settings.name.clone()),
                    namespace: Some(self.settings.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me),
                    lease_duration_seconds: Some(duration_secs),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(Error::kube("creating the leader lease")(e)),
            };
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let record = (holder.clone(), spec.renew_time.clone());
        let changed = self
            .observed
            .as_ref()
            .is_none_or(|(h, r, _)| (h, r) != (&record.0, &record.1));
        if changed {
            self.observed = Some((record.0, record.1, Instant::now()));
        }
        let held_by_me = holder.as_deref() == Some(me.as_str());
        let observed_at = self
            .observed
            .as_ref()
            .map(|o| o.2)
            .unwrap_or_else(Instant::now);
        let lease_secs = spec.lease_duration_seconds.unwrap_or(duration_secs).max(1) as u64;
        let expired = holder.is_none() || observed_at.elapsed() >= Duration::from_secs(lease_secs);
        if !held_by_me && !expired {
            return Ok(false);
        }
        if !held_by_me {
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.holder_identity = Some(me.clone());
        spec.lease_duration_seconds = Some(duration_secs);
        spec.renew_time = Some(now);
        match self
            .api
            .replace(&self.settings.name, &PostParams::default(), &lease)
            .await
        {
            Ok(updated) => {
                let spec = updated.spec.unwrap_or_default();
                self.observed = Some((Some(me), spec.renew_time, Instant::now()));
                Ok(true)
            }
            // Someone else updated the lease first.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(Error::kube("updating the leader lease")(e)),
        }
    }
}
