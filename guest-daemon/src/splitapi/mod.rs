//! splitapi: the sandbox's mutually authenticated HTTPS endpoint for its workload owner.
//!
//! The KBS issues each sandbox a CA, a server certificate and a client certificate for the
//! owner, and delivers the server side as the credential bundle `splitapi` (`ca.crt`,
//! `server.crt`, `server.key`), pushed over the tunnel (`install_credentials`) or pulled
//! (`guest-daemon splitapi-pull`, [`pull`]). Once a bundle is held, [`run`] binds
//! `--splitapi-listen` (default `0.0.0.0:8443`) and serves:
//!
//! - `GET /splitapi/v1/status`: guest identity, the credential bundle's version and expiry,
//!   the held resources and secrets with their versions (no contents, no digests);
//! - `PUT /splitapi/v1/secrets/<name>`: the body (at most [`MAX_SECRET_BYTES`]) becomes a
//!   new version of the secret, stored like a resource: `<state>/secrets/<name>` (0600,
//!   atomic, versioned), where the workload reads it.
//!
//! TLS is rustls (ring) and requires a client certificate that chains to the bundle's
//! `ca.crt`; anything else fails the handshake. A newer bundle is hot-reloaded: the
//! listener stays, new handshakes use the new credentials, and connections made under the
//! old ones are closed gracefully (their client certificates may no longer be trusted).

mod api;
mod credentials;
pub mod pull;
mod server;
pub mod tls;

pub use server::run;

use std::net::SocketAddr;

use serde::Serialize;

use crate::store::BundleInfo;

/// Id of the credential bundle that configures the endpoint.
pub const BUNDLE_ID: &str = "splitapi";
/// Service name announced in the tunnel handshake when the endpoint is on.
pub const SERVICE: &str = "splitapi";
/// Default listen address (all interfaces: the owner reaches the sandbox from outside).
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8443";
/// Largest secret accepted by `PUT /splitapi/v1/secrets/<name>`.
pub const MAX_SECRET_BYTES: usize = 1024 * 1024;

/// Who this guest is, as the status endpoint reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GuestIdentity {
    /// `tether.guest_id` of the last attestation token, once attested.
    pub guest_id: Option<String>,
    /// Random id of this daemon process.
    pub instance_id: String,
    /// Daemon version.
    pub daemon_version: String,
    /// The TEE the daemon attests as.
    pub tee: String,
}

/// Settings of the endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitApiConfig {
    /// Listen address (`--splitapi-listen`).
    pub listen: SocketAddr,
    /// Largest secret a PUT may carry.
    pub max_secret_bytes: usize,
}

impl SplitApiConfig {
    /// Listen on `listen`, accepting secrets up to [`MAX_SECRET_BYTES`].
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            max_secret_bytes: MAX_SECRET_BYTES,
        }
    }
}

/// What the endpoint is doing, published on a watch channel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SplitApiStatus {
    /// The bound address, once listening.
    pub addr: Option<SocketAddr>,
    /// The bundle whose credentials new handshakes use.
    pub bundle: Option<BundleInfo>,
    /// The last problem (a bundle that cannot be used, a failed bind); cleared by success.
    pub error: Option<String>,
}

#[cfg(test)]
mod tests;
