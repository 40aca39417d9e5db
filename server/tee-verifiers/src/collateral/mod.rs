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
pub use store::{
    CollateralFetcher, CollateralStore, FetchError, MAX_BACKOFF_FACTOR, PersistentCache,
    RefreshClock, StoreConfig, SystemClock,
};

pub use crate::request::{
    Collateral, CollateralKey, CollateralRequest, PckCa, SnpCollateral, SnpTcb, TdxCollateral,
    VcekId,
};
