//! Collateral: what a verification needs besides the evidence (Intel DCAP collateral for TDX,
//! the VCEK for SNP when the evidence does not carry it), how it is keyed, cached and fetched.
//!
//! The verification core only ever sees a [`Collateral`] value; [`CollateralStore`] (async)
//! assembles one from cached items, fetching through a [`CollateralFetcher`] (PCCS/Intel PCS
//! and AMD KDS over HTTP, or files for air-gapped use) when an item is missing or due for
//! refresh.

mod item;
mod offline;
mod pccs;
mod store;

pub use item::{CollateralItem, ItemBody};
pub use offline::{OfflineFetcher, OfflineItems};
pub use pccs::{HttpFetcher, HttpFetcherConfig};

/// A CRL file (DER, PEM or hex text, as KDS and PCCS serve them) as DER.
pub fn crl_der(bytes: &[u8]) -> Result<Vec<u8>, crate::VerifyError> {
    pccs::crl_bytes(bytes).map_err(|e| crate::VerifyError::CollateralInvalid(format!("CRL: {e}")))
}
pub use store::{
    CollateralFetcher, CollateralStore, FetchError, MAX_BACKOFF_FACTOR, PersistentCache,
    RefreshClock, StoreConfig, SystemClock,
};

pub use crate::request::{
    Collateral, CollateralKey, CollateralRequest, PckCa, SnpCollateral, SnpTcb, TdxCollateral,
    VcekId,
};
