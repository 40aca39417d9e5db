//! [`KeyAlgorithm`]: the key type of certificates the KBS issues (splitapi, PKI).

use serde::{Deserialize, Serialize};

/// Key algorithm of generated certificates.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyAlgorithm {
    /// Ed25519 (default).
    #[default]
    Ed25519,
    /// ECDSA over P-256 with SHA-256.
    EcdsaP256,
}
