//! Why the daemon could not start.

use crate::rcar::RcarError;
use crate::store::StoreError;
use crate::tls::TlsError;

/// Why the daemon could not start; once running, every failure is retried instead.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The state directory or the TEE key in it is unusable.
    #[error("state directory: {0}")]
    Store(#[from] StoreError),
    /// The KBS client cannot be built (URL, CA file, init-data).
    #[error(transparent)]
    Client(#[from] RcarError),
    /// The CA file cannot be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The TLS client configuration cannot be built.
    #[error("TLS client configuration: {0}")]
    TlsConfig(String),
    /// No tunnel URL follows from the KBS URL.
    #[error("cannot derive the tunnel URL from {url:?}: {reason}")]
    TunnelUrl {
        /// The KBS URL.
        url: String,
        /// Why.
        reason: &'static str,
    },
    /// A start-up task panicked or was cancelled.
    #[error("{what} task failed: {reason}")]
    Task {
        /// Which task.
        what: &'static str,
        /// The join error.
        reason: String,
    },
}
