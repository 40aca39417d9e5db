//! Answering the tunnel's challenge: for real with a TEE key, or with the fake crypto of the
//! tunnel-only KBS (the challenge is the nonce XOR [`FAKE_XOR`], the token names the guest).

use guest_daemon::tee_key::TeeKeyPair;
use rpc_defs::SealedResource;
use sha2::{Digest, Sha256};

/// The fake challenge's key: challenge = nonce XOR this byte.
pub(crate) const FAKE_XOR: u8 = 0x5a;

/// A fake token is this prefix followed by the guest id.
pub const FAKE_TOKEN_PREFIX: &str = "fake:";

/// The unseal callback of a guest holding `key`: opens the challenge JWE with the TEE key.
pub fn unseal_with(
    key: &TeeKeyPair,
) -> impl FnOnce(&[u8]) -> Result<Vec<u8>, String> + Send + 'static + use<> {
    let key = key.clone();
    move |jwe: &[u8]| {
        key.open_json(jwe)
            .map(|plain| plain.to_vec())
            .map_err(|e| e.to_string())
    }
}

/// The unseal callback for a [`FakeTunnelKbs`](crate::FakeTunnelKbs) challenge.
pub fn fake_unseal(challenge: &[u8]) -> Result<Vec<u8>, String> {
    Ok(fake_xor(challenge))
}

/// The token a [`FakeTunnelKbs`](crate::FakeTunnelKbs) accepts for `guest_id`.
pub fn fake_token(guest_id: &str) -> String {
    format!("{FAKE_TOKEN_PREFIX}{guest_id}")
}

/// Both directions of the fake challenge.
pub(crate) fn fake_xor(bytes: &[u8]) -> Vec<u8> {
    bytes.iter().map(|b| b ^ FAKE_XOR).collect()
}

/// A resource version sealed to `key` as the KBS seals a push: its path, version and digest
/// bound in the JWE's protected header (the guest refuses a push without them).
pub fn sealed_resource(
    key: &TeeKeyPair,
    uri: &str,
    version: u64,
    plaintext: &[u8],
) -> SealedResource {
    let sha256 = format!("{:x}", Sha256::digest(plaintext));
    let binding = rpc_defs::ResourceBinding {
        sha256: sha256.clone(),
        uri: uri.to_owned(),
        version,
    };
    let bound = kbs_core::jwe::binding_header(rpc_defs::RESOURCE_BINDING_HEADER, &binding)
        .expect("binding header");
    let jwe = kbs_core::jwe::seal_bound(&key.export_pubkey(), plaintext, &bound).expect("seal");
    SealedResource {
        uri: uri.to_owned(),
        version,
        jwe: serde_json::to_vec(&jwe).expect("JWE JSON"),
        sha256,
    }
}
