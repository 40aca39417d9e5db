//! The KBS's hot-path crypto (ring ES256 tokens, ring ECDH-ES JWE) against independent
//! implementations: JWEs sealed by the server open with the guest's own unseal code, and
//! tokens verify with `jsonwebtoken` given only the JWK from the token header, as a relying
//! party would.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use guest_daemon::tee_key::TeeKeyPair;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use kbs_core::{
    identity::GuestIdentity,
    token::{TokenSigner, build_claims},
};
use kbs_types::TeePubKey;
use serde_json::{Value, json};

#[test]
fn server_jwe_opens_with_the_guest_key() {
    for key in [TeeKeyPair::new_ec(), TeeKeyPair::new_rsa().unwrap()] {
        for len in [0usize, 1, 32, 4096, 100_000] {
            let plaintext: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let sealed = kbs_core::jwe::seal(&key.export_pubkey(), &plaintext).unwrap();
            // Over the wire as JSON, as the guest receives it.
            let wire = serde_json::to_vec(&sealed).unwrap();
            let opened = key.open_json(&wire).unwrap();
            assert_eq!(opened.as_slice(), plaintext.as_slice(), "{key:?} {len}");
        }
    }
}

#[test]
fn server_jwe_for_another_key_does_not_open() {
    let mine = TeeKeyPair::new_ec();
    let other = TeeKeyPair::new_ec();
    let sealed = kbs_core::jwe::seal(&other.export_pubkey(), b"not for you").unwrap();
    assert!(mine.open(&sealed).is_err());

    // A key whose point is not on the curve is refused before any agreement.
    let TeePubKey::EC { crv, alg, x, .. } = mine.export_pubkey() else {
        unreachable!()
    };
    let bad = TeePubKey::EC {
        crv,
        alg,
        x: x.clone(),
        y: x,
    };
    assert_eq!(kbs_core::jwe::seal(&bad, b"x").unwrap_err().status(), 400);
}

#[test]
fn a_push_sealed_to_the_tunnel_key_opens_only_with_that_key() {
    let guest = TeeKeyPair::new_ec();
    let key = tunnel::PushKey::generate();
    let other = tunnel::PushKey::generate();
    for len in [0usize, 1, 4096, 100_000] {
        let plaintext: Vec<u8> = (0..len).map(|i| (i * 13 % 251) as u8).collect();
        let sealed = kbs_core::jwe::seal_dir(key.bytes(), &plaintext).unwrap();
        assert_eq!(sealed.protected.alg, "dir");
        assert!(sealed.encrypted_key.is_empty());
        let wire = serde_json::to_vec(&sealed).unwrap();
        let opened = guest.open_json_with(&wire, Some(key.bytes())).unwrap();
        assert_eq!(opened.as_slice(), plaintext.as_slice(), "{len}");
        assert!(guest.open_json_with(&wire, Some(other.bytes())).is_err());
        // Without the tunnel's key (a `tether.v1` tunnel) a `dir` JWE is refused clearly.
        let err = guest.open_json(&wire).unwrap_err();
        assert!(err.to_string().contains("push key"), "{err}");
    }
    // A tampered header (the AAD) is refused.
    let mut sealed = kbs_core::jwe::seal_dir(key.bytes(), b"x").unwrap();
    sealed
        .protected
        .other_fields
        .insert("kid".into(), json!("evil"));
    let wire = serde_json::to_vec(&sealed).unwrap();
    assert!(guest.open_json_with(&wire, Some(key.bytes())).is_err());
}

#[test]
fn tokens_verify_with_jsonwebtoken_using_the_header_jwk() {
    let signer = TokenSigner::ephemeral().unwrap();
    let key = TeeKeyPair::new_ec();
    let identity = GuestIdentity {
        guest_id: "interop".into(),
        ..Default::default()
    };
    let claims = build_claims(
        "sample",
        json!({"svn": "1"}),
        &key.export_pubkey(),
        "bm9uY2U=",
        None,
        &identity,
    );
    let token = signer.issue(claims, Duration::from_secs(60)).unwrap();

    let header = jsonwebtoken::decode_header(&token).unwrap();
    assert_eq!(header.alg, Algorithm::ES256);
    let jwk: Jwk = header.jwk.unwrap();
    let AlgorithmParameters::EllipticCurve(ec) = &jwk.algorithm else {
        panic!("not an EC JWK")
    };
    let decoding = DecodingKey::from_ec_components(&ec.x, &ec.y).unwrap();
    let mut validation = Validation::new(Algorithm::ES256);
    validation.validate_aud = false;
    let data = jsonwebtoken::decode::<Value>(&token, &decoding, &validation).unwrap();
    assert_eq!(data.claims["tether"]["guest_id"], "interop");
    assert_eq!(serde_json::to_value(&jwk).unwrap(), signer.public_jwk());

    // And the signer accepts its own token, twice (the second from its cache).
    let first = signer.verify(&token).unwrap().claims;
    assert_eq!(first, signer.verify(&token).unwrap().claims);
    assert_eq!(
        first.to_value(),
        data.claims,
        "the claims the token carries"
    );
}
