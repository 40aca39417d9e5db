//! The RCAR messages, built and checked without I/O: the `Request`, the hash the
//! `Challenge` selects, the runtime data bound into the evidence, the token reply.

use kbs_types::{HashAlgorithm, Request, RuntimeData, Tee};
use serde_json::json;

use super::error::RcarError;
use super::{DEFAULT_HASH_ALGORITHM, KBS_PROTOCOL_VERSION};

const SUPPORTED_HASH_ALGORITHMS_KEY: &str = "supported-hash-algorithms";
const SELECTED_HASH_ALGORITHM_KEY: &str = "selected-hash-algorithm";
/// The init-data format sent with each attestation.
pub(super) const INIT_DATA_FORMAT: &str = "toml";

/// The RCAR `Request`: protocol version, TEE, and the hash algorithms we can use.
pub fn build_request(tee: Tee) -> Request {
    Request {
        version: KBS_PROTOCOL_VERSION.to_owned(),
        tee,
        extra_params: json!({ SUPPORTED_HASH_ALGORITHMS_KEY: HashAlgorithm::list_all() }),
    }
}

/// The hash the KBS picked in the `Challenge` (`selected-hash-algorithm`), SHA-384 if absent.
pub fn select_hash_algorithm(extra_params: &serde_json::Value) -> Result<HashAlgorithm, RcarError> {
    match extra_params.get(SELECTED_HASH_ALGORITHM_KEY) {
        None => Ok(DEFAULT_HASH_ALGORITHM),
        Some(serde_json::Value::String(name)) => name
            .to_lowercase()
            .parse()
            .map_err(|_| RcarError::HashAlgorithm(name.clone())),
        Some(other) => Err(RcarError::HashAlgorithm(other.to_string())),
    }
}

/// The report data bound into the evidence: the hash of the JCS-canonical JSON
/// of `{"tee-pubkey", "nonce", "additional-evidence"}`.
pub fn runtime_data_digest(
    runtime_data: &RuntimeData,
    additional_evidence: &str,
    hash: HashAlgorithm,
) -> Result<Vec<u8>, RcarError> {
    let value = json!({
        "tee-pubkey": runtime_data.tee_pubkey,
        "nonce": runtime_data.nonce,
        "additional-evidence": additional_evidence,
    });
    let canonical = serde_json_canonicalizer::to_vec(&value).map_err(RcarError::Canonical)?;
    Ok(hash.digest(&canonical))
}

/// The reply to `POST /kbs/v0/attest`.
#[derive(serde::Deserialize)]
pub(super) struct TokenReply {
    pub token: String,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use kbs_types::TeePubKey;
    use sha2::{Digest, Sha256, Sha384};

    fn fixed_runtime_data() -> RuntimeData {
        RuntimeData {
            nonce: "bm9uY2U=".into(),
            tee_pubkey: TeePubKey::EC {
                crv: "P-256".into(),
                alg: "ECDH-ES+A256KW".into(),
                x: "WA".into(),
                y: "WQ".into(),
            },
        }
    }

    /// The canonical form written out by hand: keys sorted by UTF-16 code
    /// units at every level, no whitespace.
    const CANONICAL: &str = r#"{"additional-evidence":"","nonce":"bm9uY2U=","tee-pubkey":{"alg":"ECDH-ES+A256KW","crv":"P-256","kty":"EC","x":"WA","y":"WQ"}}"#;

    #[test]
    fn runtime_data_digest_matches_hand_computed_value() {
        let rd = fixed_runtime_data();
        let digest = runtime_data_digest(&rd, "", HashAlgorithm::Sha384).unwrap();
        assert_eq!(digest, Sha384::digest(CANONICAL.as_bytes()).to_vec());
        // The same value, computed outside Rust (Python hashlib.sha384 of CANONICAL).
        assert_eq!(
            hex::encode(&digest),
            "5e0b540e0f66af8eb96e249ff864c37e0b42c86c00cae6bd\
             4f4b0ab3b5b8b343a6fe0d59699f8526e937038b22d91a5a"
        );
        let digest = runtime_data_digest(&rd, "", HashAlgorithm::Sha256).unwrap();
        assert_eq!(digest, Sha256::digest(CANONICAL.as_bytes()).to_vec());
    }

    #[test]
    fn runtime_data_digest_of_rsa_key() {
        let rd = RuntimeData {
            nonce: "n".into(),
            tee_pubkey: TeePubKey::RSA {
                alg: "RSA-OAEP-256".into(),
                k_mod: "AQ".into(),
                k_exp: "AQAB".into(),
            },
        };
        let expected = r#"{"additional-evidence":"","nonce":"n","tee-pubkey":{"alg":"RSA-OAEP-256","e":"AQAB","kty":"RSA","n":"AQ"}}"#;
        assert_eq!(
            runtime_data_digest(&rd, "", HashAlgorithm::Sha384).unwrap(),
            Sha384::digest(expected.as_bytes()).to_vec()
        );
    }

    #[test]
    fn request_carries_version_tee_and_hash_list() {
        let req = serde_json::to_value(build_request(Tee::Sample)).unwrap();
        assert_eq!(
            req,
            json!({
                "version": "0.4.0",
                "tee": "sample",
                "extra-params": {"supported-hash-algorithms": ["sha256", "sha384", "sha512", "sm3"]},
            })
        );
    }

    #[test]
    fn hash_selection_follows_challenge() {
        assert_eq!(
            select_hash_algorithm(&json!("")).unwrap(),
            HashAlgorithm::Sha384
        );
        assert_eq!(
            select_hash_algorithm(&json!({})).unwrap(),
            HashAlgorithm::Sha384
        );
        assert_eq!(
            select_hash_algorithm(&json!({"selected-hash-algorithm": "SHA512"})).unwrap(),
            HashAlgorithm::Sha512
        );
        assert_eq!(
            select_hash_algorithm(&json!({"selected-hash-algorithm": "sha256"})).unwrap(),
            HashAlgorithm::Sha256
        );
        assert!(select_hash_algorithm(&json!({"selected-hash-algorithm": "md5"})).is_err());
        assert!(select_hash_algorithm(&json!({"selected-hash-algorithm": 384})).is_err());
    }
}
