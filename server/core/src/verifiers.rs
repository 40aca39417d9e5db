//! The attestation verifiers this build knows, by TEE name.

use std::sync::Arc;

use crate::attest::{SampleVerifier, Verifier};

/// Names accepted in `attestation.verifiers`.
pub const KNOWN: &[&str] = &["sample"];

/// Instantiate the named verifiers (names were checked by config validation).
pub fn build(names: &[String]) -> Vec<Arc<dyn Verifier>> {
    names
        .iter()
        .filter_map(|n| match n.as_str() {
            "sample" => Some(Arc::new(SampleVerifier) as Arc<dyn Verifier>),
            _ => None,
        })
        .collect()
}
