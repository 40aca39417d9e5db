//! How evidence binds a session: hash negotiation, the report-data digest
//! (exactly as guest-components' `rcar_client.rs::get_composite_evidence`
//! computes it) and the default guest id derived from the TEE key.

use kbs_types::{HashAlgorithm, TeePubKey};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Request `extra-params` key listing the client's hash algorithms.
pub const SUPPORTED_HASH_ALGORITHMS: &str = "supported-hash-algorithms";
/// Challenge `extra-params` key naming the algorithm the server picked.
pub const SELECTED_HASH_ALGORITHM: &str = "selected-hash-algorithm";

/// Preference order when the client offers several algorithms.
const PREFERENCE: [HashAlgorithm; 3] = [
    HashAlgorithm::Sha384,
    HashAlgorithm::Sha256,
    HashAlgorithm::Sha512,
];

/// Why `extra-params` could not be used.
#[derive(Debug, PartialEq, Eq)]
pub enum NegotiationError {
    /// `extra-params` is neither a string nor an object, or the list is malformed.
    Malformed(&'static str),
    /// The client offered only algorithms Tether does not use.
    NoCommonAlgorithm(String),
}

/// Picks the report-data hash from the Request's `extra-params`.
///
/// `""` (older clients) or an object without the list means sha384, the
/// algorithm upstream clients fall back to.
pub fn select_hash(extra_params: &Value) -> Result<HashAlgorithm, NegotiationError> {
    let list = match extra_params {
        Value::Null | Value::String(_) => return Ok(HashAlgorithm::Sha384),
        Value::Object(map) => match map.get(SUPPORTED_HASH_ALGORITHMS) {
            None => return Ok(HashAlgorithm::Sha384),
            Some(Value::Array(list)) => list,
            Some(_) => {
                return Err(NegotiationError::Malformed(
                    "supported-hash-algorithms must be a list",
                ));
            }
        },
        _ => {
            return Err(NegotiationError::Malformed(
                "extra-params must be a string or an object",
            ));
        }
    };
    let mut offered = Vec::with_capacity(list.len());
    for item in list {
        let name = item.as_str().ok_or(NegotiationError::Malformed(
            "supported-hash-algorithms entries must be strings",
        ))?;
        offered.push(name);
    }
    PREFERENCE
        .into_iter()
        .find(|alg| {
            offered
                .iter()
                .any(|name| name.eq_ignore_ascii_case(hash_name(*alg)))
        })
        .ok_or_else(|| NegotiationError::NoCommonAlgorithm(echo(&offered)))
}

/// Most bytes of the offered names echoed back in an error.
const MAX_ECHOED: usize = 200;

/// The offered names, comma-separated, cut to [`MAX_ECHOED`] bytes on a character boundary
/// (the peer chose the characters: a byte cut could fall inside one).
fn echo(offered: &[&str]) -> String {
    let mut names = String::new();
    for name in offered {
        if !names.is_empty() {
            names.push_str(", ");
        }
        names.push_str(name);
        if names.len() >= MAX_ECHOED {
            break;
        }
    }
    let mut end = names.len().min(MAX_ECHOED);
    while !names.is_char_boundary(end) {
        end -= 1;
    }
    names.truncate(end);
    names
}

/// Wire name of a hash algorithm (`sha384`...).
pub fn hash_name(alg: HashAlgorithm) -> &'static str {
    match alg {
        HashAlgorithm::Sha256 => "sha256",
        HashAlgorithm::Sha384 => "sha384",
        HashAlgorithm::Sha512 => "sha512",
        HashAlgorithm::Sm3 => "sm3",
    }
}

/// The primary attester's runtime data. JCS sorts the keys, so field order is irrelevant.
#[derive(Serialize)]
struct RuntimeBinding<'a> {
    #[serde(rename = "tee-pubkey")]
    tee_pubkey: &'a TeePubKey,
    nonce: &'a str,
    #[serde(rename = "additional-evidence")]
    additional_evidence: &'a str,
}

/// Digest the primary evidence's report data must carry:
/// `hash(JCS({"tee-pubkey", "nonce", "additional-evidence"}))`.
pub fn expected_report_data(
    alg: HashAlgorithm,
    tee_pubkey: &TeePubKey,
    nonce: &str,
    additional_evidence: &str,
) -> Result<Vec<u8>, serde_json::Error> {
    let canonical = serde_json_canonicalizer::to_vec(&RuntimeBinding {
        tee_pubkey,
        nonce,
        additional_evidence,
    })?;
    Ok(alg.digest(&canonical))
}

/// Default guest id: `tee-` + the first 16 hex digits of SHA-256(JCS(tee-pubkey)).
pub fn derived_guest_id(tee_pubkey: &TeePubKey) -> Result<String, serde_json::Error> {
    let canonical = serde_json_canonicalizer::to_vec(tee_pubkey)?;
    let digest = Sha256::digest(&canonical);
    let mut id = String::with_capacity(20);
    id.push_str("tee-");
    id.push_str(&hex::encode(&digest[..8]));
    Ok(id)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;
    use sha2::Sha384;

    #[test]
    fn hash_selection() {
        let pick = |v: Value| select_hash(&v);
        assert_eq!(pick(json!("")), Ok(HashAlgorithm::Sha384));
        assert_eq!(pick(json!(null)), Ok(HashAlgorithm::Sha384));
        assert_eq!(pick(json!({})), Ok(HashAlgorithm::Sha384));
        // What current guest-components sends: HashAlgorithm::list_all().
        assert_eq!(
            pick(json!({"supported-hash-algorithms": ["sha256", "sha384", "sha512", "sm3"]})),
            Ok(HashAlgorithm::Sha384)
        );
        assert_eq!(
            pick(json!({"supported-hash-algorithms": ["SHA512", "sha256"]})),
            Ok(HashAlgorithm::Sha256)
        );
        assert_eq!(
            pick(json!({"supported-hash-algorithms": ["sha512"]})),
            Ok(HashAlgorithm::Sha512)
        );
        assert!(matches!(
            pick(json!({"supported-hash-algorithms": ["sm3", "md5"]})),
            Err(NegotiationError::NoCommonAlgorithm(names)) if names == "sm3, md5"
        ));
        assert!(matches!(
            pick(json!({"supported-hash-algorithms": []})),
            Err(NegotiationError::NoCommonAlgorithm(_))
        ));
        assert!(pick(json!({"supported-hash-algorithms": "sha384"})).is_err());
        assert!(pick(json!({"supported-hash-algorithms": [1]})).is_err());
        assert!(pick(json!(42)).is_err());
    }

    /// The offered names are echoed in the error, cut to a bound: on a character boundary,
    /// whatever the peer sent (199 ASCII characters then `é` once cut inside the `é`).
    #[test]
    fn offered_names_are_cut_on_a_character_boundary() {
        let name = format!("{}é", "a".repeat(199));
        // On a thread of its own, so that a cut which never ends (a step back that does not
        // move the end) fails here within the minute, not at the test runner's timeout; a
        // panic there drops the sender.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(select_hash(
                &json!({"supported-hash-algorithms": [name, "md5"]}),
            ));
        });
        let result = rx.recv_timeout(std::time::Duration::from_secs(60));
        let Ok(Err(NegotiationError::NoCommonAlgorithm(echoed))) = result else {
            panic!("a multi-byte character at the cut must neither panic nor loop: {result:?}");
        };
        assert_eq!(echoed, "a".repeat(199));
        let many: Vec<String> = (0..100).map(|i| format!("ü{i}")).collect();
        let Err(NegotiationError::NoCommonAlgorithm(echoed)) =
            select_hash(&json!({"supported-hash-algorithms": many}))
        else {
            panic!("expected NoCommonAlgorithm");
        };
        assert!(echoed.len() <= 200, "{}", echoed.len());
    }

    /// Recomputes the digest the way rcar_client.rs does: `json!` then JCS.
    #[test]
    fn report_data_matches_upstream_client() {
        let key = TeePubKey::EC {
            crv: "P-256".into(),
            alg: "ECDH-ES+A256KW".into(),
            x: "WKn-ZIGevcwGIyyrzFoZNBdaq9_TsqzGl96oc0CWuis".into(),
            y: "y77t-RvAHRKTsSGdIYUfweuOvwrvDD-Q3Hv5J0fSKbE".into(),
        };
        let nonce = "q1w2e3r4t5y6u7i8o9p0q1w2e3r4t5y6u7i8o9p0q1w=";
        let client_json = json!({
            "tee-pubkey": key,
            "nonce": nonce,
            "additional-evidence": "",
        });
        let canonical = serde_json_canonicalizer::to_vec(&client_json).unwrap();
        let text = String::from_utf8(canonical.clone()).unwrap();
        assert!(
            text.starts_with(r#"{"additional-evidence":"","nonce":"#),
            "{text}"
        );
        assert!(
            text.contains(r#""tee-pubkey":{"alg":"ECDH-ES+A256KW","crv":"P-256","kty":"EC","x":"#)
        );
        let expected = Sha384::digest(&canonical).to_vec();
        assert_eq!(
            expected_report_data(HashAlgorithm::Sha384, &key, nonce, "").unwrap(),
            expected
        );
        // The additional evidence string is part of the binding.
        assert_ne!(
            expected_report_data(HashAlgorithm::Sha384, &key, nonce, "{}").unwrap(),
            expected
        );
    }

    #[test]
    fn guest_id_is_stable_and_key_specific() {
        let a = TeePubKey::RSA {
            alg: "RSA-OAEP-256".into(),
            k_mod: "abc".into(),
            k_exp: "AQAB".into(),
        };
        let b = TeePubKey::RSA {
            alg: "RSA-OAEP-256".into(),
            k_mod: "abd".into(),
            k_exp: "AQAB".into(),
        };
        let id = derived_guest_id(&a).unwrap();
        assert_eq!(id.len(), 20);
        assert!(id.starts_with("tee-"));
        assert_eq!(id, derived_guest_id(&a).unwrap());
        assert_ne!(id, derived_guest_id(&b).unwrap());
    }
}
