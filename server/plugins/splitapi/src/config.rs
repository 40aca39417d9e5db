//! `[plugins.splitapi]`: key algorithm, lifetimes and renewal of the issued certificates.

use std::time::Duration;

use kbs_core::key_algorithm::KeyAlgorithm;
use serde::Deserialize;

/// splitapi settings (`[plugins.splitapi]`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SplitApiConfig {
    /// Key algorithm of the CA, server and client keys: `ed25519` or `ecdsa-p256`.
    pub key_algorithm: KeyAlgorithm,
    /// Lifetime of issued server and client certificates.
    #[serde(with = "humantime_serde")]
    pub validity: Duration,
    /// Lifetime of a sandbox CA (at least `validity`).
    #[serde(with = "humantime_serde")]
    pub ca_validity: Duration,
    /// Renew (and push) credentials this long before they expire.
    #[serde(with = "humantime_serde")]
    pub renew_before: Duration,
    /// How often to look for credentials due for renewal.
    #[serde(with = "humantime_serde")]
    pub renew_check_interval: Duration,
    /// Organization (O) in issued certificate subjects.
    pub organization: String,
}

impl Default for SplitApiConfig {
    fn default() -> Self {
        Self {
            key_algorithm: KeyAlgorithm::Ed25519,
            validity: Duration::from_secs(30 * 24 * 3600),
            ca_validity: Duration::from_secs(365 * 24 * 3600),
            renew_before: Duration::from_secs(7 * 24 * 3600),
            renew_check_interval: Duration::from_secs(60),
            organization: "Tether splitapi".to_string(),
        }
    }
}

impl SplitApiConfig {
    /// Range and consistency checks: the key at fault (within `[plugins.splitapi]`) and why.
    pub fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        if self.validity < Duration::from_secs(60) {
            return Err(("validity", "must be at least 1m"));
        }
        if self.validity > Duration::from_secs(10 * 365 * 24 * 3600) {
            return Err(("validity", "must be at most 10 years"));
        }
        if self.ca_validity < self.validity {
            return Err(("ca_validity", "must be at least plugins.splitapi.validity"));
        }
        if self.ca_validity > Duration::from_secs(30 * 365 * 24 * 3600) {
            return Err(("ca_validity", "must be at most 30 years"));
        }
        if self.renew_before >= self.validity {
            return Err((
                "renew_before",
                "must be shorter than plugins.splitapi.validity",
            ));
        }
        if self.renew_check_interval < Duration::from_secs(1) {
            return Err(("renew_check_interval", "must be at least 1s"));
        }
        if self.organization.is_empty() || self.organization.len() > 64 {
            return Err(("organization", "must be 1..=64 characters"));
        }
        Ok(())
    }
}
