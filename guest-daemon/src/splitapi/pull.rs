//! The pull path for guests that cannot keep a tunnel: attest, `GET
//! /kbs/v0/splitapi/credentials`, and install the reply exactly like a pushed bundle.
//!
//! Reply body (JSON): `{"id": "splitapi", "version": N, "not_after": <unix s>,
//! "files": [{"name": "ca.crt", "mode": 420}, ...], "jwe": <JWE JSON object, as the resource
//! endpoint returns it>}`; the JWE is sealed to the TEE key of the attestation and its
//! plaintext is the CBOR map file name -> bytes, the same as in `install_credentials`.

use rpc_defs::{CredentialBundle, CredentialFile, GuestError, Installed};
use serde::{Deserialize, Serialize};

use super::BUNDLE_ID;
use crate::rcar::{KbsClient, RcarError};
use crate::service::GuestDaemonService;

/// Path of the pull endpoint under `/kbs/v0/`.
pub const CREDENTIALS_PATH: &str = "splitapi/credentials";

/// The reply of `GET /kbs/v0/splitapi/credentials`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PulledCredentials {
    /// Bundle id; must be `splitapi`.
    pub id: String,
    /// Bundle version.
    pub version: u64,
    /// Unix time after which the credentials expire.
    pub not_after: u64,
    /// The files and their modes.
    pub files: Vec<CredentialFile>,
    /// The JWE (JSON serialization) of the CBOR map file name -> bytes.
    pub jwe: serde_json::Value,
}

impl PulledCredentials {
    /// The same bundle as the tunnel's `install_credentials` carries.
    pub fn into_bundle(self) -> Result<CredentialBundle, PullError> {
        if self.id != BUNDLE_ID {
            return Err(PullError::BadReply(format!(
                "bundle id is {:?}, expected {BUNDLE_ID:?}",
                self.id
            )));
        }
        if !self.jwe.is_object() {
            return Err(PullError::BadReply(
                "jwe is not a JWE JSON object".to_owned(),
            ));
        }
        let jwe = serde_json::to_vec(&self.jwe).map_err(|e| PullError::BadReply(e.to_string()))?;
        Ok(CredentialBundle {
            id: self.id,
            version: self.version,
            files: self.files,
            jwe,
            not_after: self.not_after,
        })
    }
}

/// Why a pull failed.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// Attestation or the request failed (status and KBS detail included).
    #[error(transparent)]
    Kbs(#[from] RcarError),
    /// The KBS answered 200 with something else than the documented body.
    #[error("GET /kbs/v0/{CREDENTIALS_PATH}: malformed reply: {0}")]
    BadReply(String),
    /// The bundle was refused by the guest (cannot unseal, bad files, downgrade, storage).
    #[error("install the splitapi bundle: {0}")]
    Install(#[from] GuestError),
}

/// Attest with `client` (whose TEE key must be `service`'s), fetch the splitapi bundle and
/// install it through `service`, which also hot-reloads a running endpoint.
pub async fn pull(
    client: &mut KbsClient,
    service: &GuestDaemonService,
) -> Result<Installed, PullError> {
    let body = client.get_attested(CREDENTIALS_PATH).await?;
    let reply: PulledCredentials =
        serde_json::from_slice(&body).map_err(|e| PullError::BadReply(e.to_string()))?;
    let bundle = reply.into_bundle()?;
    tracing::info!(
        version = bundle.version,
        not_after = bundle.not_after,
        "pulled the splitapi bundle"
    );
    Ok(service.install(bundle).await?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn reply() -> serde_json::Value {
        serde_json::json!({
            "id": "splitapi",
            "version": 3,
            "not_after": 1_900_000_000u64,
            "files": [
                {"name": "ca.crt", "mode": 0o644},
                {"name": "server.crt", "mode": 0o644},
                {"name": "server.key", "mode": 0o600},
            ],
            "jwe": {"protected": "p", "encrypted_key": "k", "iv": "i", "ciphertext": "c", "tag": "t"},
        })
    }

    #[test]
    fn the_documented_reply_becomes_the_pushed_bundle_shape() {
        let pulled: PulledCredentials = serde_json::from_value(reply()).unwrap();
        let bundle = pulled.into_bundle().unwrap();
        assert_eq!((bundle.id.as_str(), bundle.version), ("splitapi", 3));
        assert_eq!(bundle.not_after, 1_900_000_000);
        assert_eq!(bundle.files[2].name, "server.key");
        assert_eq!(bundle.files[2].mode, 0o600);
        let jwe: serde_json::Value = serde_json::from_slice(&bundle.jwe).unwrap();
        assert_eq!(jwe, reply()["jwe"]);
    }

    #[test]
    fn other_ids_and_non_object_jwes_are_refused() {
        let mut other = reply();
        other["id"] = "other".into();
        let pulled: PulledCredentials = serde_json::from_value(other).unwrap();
        assert!(matches!(pulled.into_bundle(), Err(PullError::BadReply(m)) if m.contains("other")));
        let mut text = reply();
        text["jwe"] = "a.b.c.d.e".into();
        let pulled: PulledCredentials = serde_json::from_value(text).unwrap();
        assert!(matches!(pulled.into_bundle(), Err(PullError::BadReply(_))));
        let mut missing = reply();
        missing.as_object_mut().unwrap().remove("files");
        assert!(serde_json::from_value::<PulledCredentials>(missing).is_err());
    }
}
