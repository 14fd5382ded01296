//! The operator's error type: what can go wrong while reconciling or leading.

use std::time::Duration;

/// Errors of the operator. Reconcile errors are transient (the object is
/// retried with backoff); a spec that can never succeed is not an error but a
/// `Failed` status written by the reconcile itself.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the Kubernetes API failed.
    #[error("Kubernetes API call failed: {context}")]
    Kube {
        /// What the operator was doing.
        context: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// A checkpoint or backup has no namespace (the resources are namespaced).
    #[error("object {0} has no namespace")]
    MissingNamespace(String),
    /// The metrics and health endpoint could not be served.
    #[error("serving metrics on {addr} failed")]
    Serve {
        /// The address asked for.
        addr: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Another replica took the lease, or it could not be renewed in time.
    #[error("lost the leader lease {lease} after {held:?}")]
    LeadershipLost {
        /// `namespace/name` of the lease.
        lease: String,
        /// How long this replica led.
        held: Duration,
    },
    /// A BackupRepository could not be used (unreachable, wrong key…) for a
    /// step that needs it, e.g. deleting a backup's snapshot.
    #[error("BackupRepository {name} is not usable: {message}")]
    Repository {
        /// Name of the BackupRepository.
        name: String,
        /// What went wrong (never credentials).
        message: String,
    },
    /// The controllers stopped although nobody asked them to.
    #[error("the controllers stopped unexpectedly")]
    ControllersStopped,
}

impl Error {
    /// Wraps a client error with what the operator was doing.
    pub fn kube(context: impl Into<String>) -> impl FnOnce(kube::Error) -> Self {
        let context = context.into();
        move |source| Self::Kube { context, source }
    }
}

/// Result with the operator's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
