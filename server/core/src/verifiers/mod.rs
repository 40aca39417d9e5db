//! The attestation verifiers this build knows, by TEE name, and the collateral store the
//! real ones (TDX, SNP) share.

mod collateral;
mod tee;

use std::sync::Arc;

use tee_verifiers::{CollateralStore, TrustAnchors};

use crate::attest::{SampleVerifier, Verifier};

pub use collateral::{
    COLLATERAL_NAMESPACE, CollateralSettings, CollateralSetupError, CollateralSource,
    StoreCollateralCache, collateral_store,
};
pub use tee::{Clock, TeeVerifier, map_error};

/// Names accepted in `attestation.verifiers`.
pub const KNOWN: &[&str] = &["sample", "tdx", "snp"];

/// What the verifiers are built with.
#[derive(Clone, Debug)]
pub struct VerifierSetup {
    /// Where TDX and SNP verification get their collateral.
    pub collateral: Arc<CollateralStore>,
    /// The roots evidence must chain to ([`TrustAnchors::vendor`] in production unless the
    /// operator configured others).
    pub anchors: Arc<TrustAnchors>,
    /// The clock collateral validity is checked against (fixed in tests).
    pub clock: Clock,
}

/// Instantiate the named verifiers (names were checked by config validation; an unknown
/// name is skipped).
pub fn build(names: &[String], setup: &VerifierSetup) -> Vec<Arc<dyn Verifier>> {
    names
        .iter()
        .filter_map(|n| match n.as_str() {
            "sample" => Some(Arc::new(SampleVerifier) as Arc<dyn Verifier>),
            "tdx" => Some(Arc::new(
                TeeVerifier::tdx(setup.collateral.clone(), setup.clock)
                    .with_trust_anchors(setup.anchors.clone()),
            ) as _),
            "snp" => Some(Arc::new(
                TeeVerifier::snp(setup.collateral.clone(), setup.clock)
                    .with_trust_anchors(setup.anchors.clone()),
            ) as _),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
