//! The credentials the endpoint serves under: each usable `splitapi` bundle version becomes
//! a [`Generation`] (its TLS acceptor and the signal that retires the connections made
//! under it), published on a watch channel that the accept loop reads per connection.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::{BUNDLE_ID, SplitApiStatus, tls};
use crate::service::GuestDaemonService;
use crate::store::BundleInfo;

/// The credentials of one bundle version, and the signal that retires its connections.
pub(super) struct Generation {
    pub acceptor: TlsAcceptor,
    pub version: u64,
    /// SHA-256 of `ca.crt`: connections survive a reload that keeps the CA (a renewal).
    pub ca_digest: [u8; 32],
    pub retired: CancellationToken,
}

/// The generation new connections use (`None` until a bundle could be loaded).
pub(super) type Current = watch::Sender<Option<Arc<Generation>>>;

/// Load the held bundle (announced as `version`) and make it the current generation. The
/// previous generation's connections are retired unless the CA is the same; a bundle that
/// cannot be used leaves the previous credentials in place. Both outcomes are logged and
/// published on `status`.
pub(super) async fn reload(
    service: &GuestDaemonService,
    current: &Current,
    status: &watch::Sender<SplitApiStatus>,
    version: u64,
) {
    let Loaded {
        config,
        info,
        ca_digest,
    } = match load(service).await {
        Ok(loaded) => loaded,
        Err(reason) => {
            tracing::error!(version, %reason, "cannot use the splitapi bundle; keeping the previous credentials");
            status.send_modify(|s| s.error = Some(reason));
            return;
        }
    };
    if info.not_after <= unix_now() {
        tracing::warn!(
            version = info.version,
            not_after = info.not_after,
            "the splitapi credentials have expired; owners will refuse the server certificate"
        );
    }
    // A renewal under the same CA keeps the open connections (their client certificates
    // are still trusted) by handing them the same retire signal.
    let previous = current.borrow().clone();
    let retired = match &previous {
        Some(old) if old.ca_digest == ca_digest => old.retired.clone(),
        _ => CancellationToken::new(),
    };
    current.send_replace(Some(Arc::new(Generation {
        acceptor: TlsAcceptor::from(config),
        version: info.version,
        ca_digest,
        retired,
    })));
    if let Some(old) = previous {
        let same_ca = old.ca_digest == ca_digest;
        tracing::info!(
            from = old.version,
            to = info.version,
            not_after = info.not_after,
            same_ca,
            "splitapi credentials reloaded"
        );
        if !same_ca {
            // New CA: close the connections made under the old one.
            old.retired.cancel();
        }
    } else {
        tracing::info!(
            version = info.version,
            not_after = info.not_after,
            "splitapi credentials loaded"
        );
    }
    status.send_modify(|s| {
        s.bundle = Some(info);
        s.error = None;
    });
}

/// A bundle turned into a TLS configuration.
struct Loaded {
    config: Arc<rustls::ServerConfig>,
    info: BundleInfo,
    ca_digest: [u8; 32],
}

/// Read the held `splitapi` bundle and build its TLS configuration.
async fn load(service: &GuestDaemonService) -> Result<Loaded, String> {
    let store = Arc::clone(service.store());
    tokio::task::spawn_blocking(move || {
        let bundle = store
            .read_bundle(BUNDLE_ID)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "the splitapi bundle is no longer held".to_owned())?;
        let config = tls::server_config(&bundle.files).map_err(|e| e.to_string())?;
        let ca_digest: [u8; 32] = bundle
            .files
            .iter()
            .find(|f| f.name == tls::CA_FILE)
            .map(|f| Sha256::digest(&f.contents[..]).into())
            .unwrap_or_default();
        let info = store
            .bundle_info(BUNDLE_ID)
            .filter(|i| i.version == bundle.version)
            .unwrap_or(BundleInfo {
                id: bundle.id.clone(),
                version: bundle.version,
                not_after: bundle.not_after,
                applied_at: 0,
            });
        Ok(Loaded {
            config,
            info,
            ca_digest,
        })
    })
    .await
    .map_err(|e| format!("bundle load task failed: {e}"))?
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
