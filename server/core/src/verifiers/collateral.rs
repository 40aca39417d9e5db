//! Where TDX and SNP verification get their collateral: a PCCS / Intel PCS and AMD KDS over
//! HTTP, or files (air-gapped sites), cached in memory and in the KBS's store so that a
//! restart while the PCCS is down still verifies with the collateral cached before.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tee_verifiers::collateral::{
    CollateralStore, HttpFetcher, HttpFetcherConfig, OfflineFetcher, PersistentCache, StoreConfig,
};

use crate::storage::KvStore;

/// The store namespace cached collateral items live in (plugin namespaces have no dot).
pub const COLLATERAL_NAMESPACE: &str = "tether.collateral";

/// Where collateral comes from.
#[derive(Clone, Debug)]
pub enum CollateralSource {
    /// PCCS or Intel PCS (v4 API) and AMD KDS.
    Http(HttpFetcherConfig),
    /// Files (`<dir>/tdx/*.json`, `<dir>/snp/*.{der,pem}`), read at start and again when
    /// they change (checked every `offline_rescan`): no fetch ever.
    Offline(PathBuf),
}

/// The collateral store's settings (`[attestation.collateral]`).
#[derive(Clone, Debug)]
pub struct CollateralSettings {
    /// Where items come from.
    pub source: CollateralSource,
    /// An item is refetched this long before its nextUpdate.
    pub refresh_before: Duration,
    /// After a failed refresh with a still-valid copy, the next attempt waits this long
    /// (doubling with each further failure).
    pub retry_after: Duration,
    /// How often the offline directory is checked for changed files.
    pub offline_rescan: Duration,
}

impl Default for CollateralSettings {
    fn default() -> Self {
        let store = StoreConfig::default();
        Self {
            source: CollateralSource::Http(HttpFetcherConfig::default()),
            refresh_before: store.refresh_before,
            retry_after: store.retry_after,
            offline_rescan: store.source_poll,
        }
    }
}

/// Why the collateral store could not be built.
#[derive(Debug, thiserror::Error)]
pub enum CollateralSetupError {
    /// The offline directory holds a file that is not collateral.
    #[error("offline collateral in {dir}: {reason}")]
    Offline {
        /// The directory.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The HTTP client could not be built.
    #[error("collateral HTTP client: {0}")]
    Http(String),
}

/// Builds the collateral store; `persistent` (the KBS's store) keeps fetched items across
/// restarts.
pub fn collateral_store(
    settings: &CollateralSettings,
    persistent: Option<Arc<dyn KvStore>>,
) -> Result<CollateralStore, CollateralSetupError> {
    let config = StoreConfig {
        refresh_before: settings.refresh_before,
        retry_after: settings.retry_after,
        source_poll: settings.offline_rescan,
    };
    let store = match &settings.source {
        CollateralSource::Http(http) => {
            let fetcher = HttpFetcher::new(http.clone())
                .map_err(|e| CollateralSetupError::Http(e.to_string()))?;
            CollateralStore::new(Arc::new(fetcher), config)
        }
        CollateralSource::Offline(dir) => {
            let fetcher =
                OfflineFetcher::from_dir(dir).map_err(|e| CollateralSetupError::Offline {
                    dir: dir.clone(),
                    reason: e.to_string(),
                })?;
            CollateralStore::new(Arc::new(fetcher), config)
        }
    };
    Ok(match persistent {
        Some(kv) => store.with_persistent_cache(Arc::new(StoreCollateralCache::new(kv))),
        None => store,
    })
}

/// Collateral items in the KBS's key-value store (namespace [`COLLATERAL_NAMESPACE`]).
/// Collateral is public, signed data; a failed read or write is logged and costs a fetch.
pub struct StoreCollateralCache {
    kv: Arc<dyn KvStore>,
}

impl StoreCollateralCache {
    /// A cache over `kv`.
    pub fn new(kv: Arc<dyn KvStore>) -> Self {
        Self { kv }
    }
}

#[async_trait]
impl PersistentCache for StoreCollateralCache {
    async fn load(&self, name: &str) -> Option<Vec<u8>> {
        match self.kv.kv_get(COLLATERAL_NAMESPACE, name).await {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(item = name, error = %e, "reading cached collateral failed");
                None
            }
        }
    }

    async fn store(&self, name: &str, bytes: Vec<u8>) {
        if let Err(e) = self.kv.kv_put(COLLATERAL_NAMESPACE, name, &bytes).await {
            tracing::warn!(item = name, error = %e, "caching collateral in the store failed");
        }
    }
}
