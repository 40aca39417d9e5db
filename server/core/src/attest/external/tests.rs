//! Passport tokens of external attestation services: which keys are trusted, which are not.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use serde_json::{Value, json};

use super::*;
use crate::attest::TokenVerifier;
use crate::token::TokenSigner;

const NOW: u64 = 1_750_000_000;

/// A P-256 signing key (PKCS#8 from rcgen, so it can also be put in a certificate).
struct Signer {
    rcgen: KeyPair,
    ring: EcdsaKeyPair,
}

impl Signer {
    fn new() -> Self {
        let rcgen = KeyPair::generate().unwrap();
        let ring = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &rcgen.serialize_der(),
            &SystemRandom::new(),
        )
        .unwrap();
        Self { rcgen, ring }
    }

    fn jwk(&self) -> Value {
        let point = self.ring.public_key().as_ref();
        json!({
            "kty": "EC", "crv": "P-256",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        })
    }

    fn sign(&self, header: Value, claims: &Value) -> String {
        let message = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = self
            .ring
            .sign(&SystemRandom::new(), message.as_bytes())
            .unwrap();
        format!("{message}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }
}

fn tee_pubkey() -> Value {
    json!({
        "kty": "EC", "crv": "P-256", "alg": "ECDH-ES+A256KW",
        "x": "WKn-ZIGevcwGIyyrzFoZNBdaq9_TsqzGl96oc0CWuis",
        "y": "y77t-RvAHRKTsSGdIYUfweuOvwrvDD-Q3Hv5J0fSKbE",
    })
}

/// Claims in the shape upstream's attestation service issues (EAR, `cpu0`).
fn ear_claims(exp: u64, status: &str) -> Value {
    json!({
        "eat_profile": "tag:github.com,2023:veraison/ear",
        "iat": NOW - 10, "exp": exp, "iss": "trustee-as",
        "submods": {"cpu0": {
            "ear.status": status,
            "ear.veraison.annotated-evidence": {
                "tdx": {"quote": {"body": {"mr_td": "ab"}}},
                "init_data_claims": {"tether": {"guest_id": "web-1", "labels": {"app": "web"}}},
                "runtime_data_claims": {"tee-pubkey": tee_pubkey(), "nonce": "n"},
            },
        }},
    })
}

fn issuer(keys: IssuerKeys, iss: Option<&str>) -> Arc<ExternalIssuer> {
    Arc::new(ExternalIssuer::new("trustee-as", iss.map(str::to_owned), keys, Vec::new()).unwrap())
}

fn jwks_issuer(signer: &Signer, kid: &str) -> Arc<ExternalIssuer> {
    let mut jwk = signer.jwk();
    jwk["kid"] = json!(kid);
    let keys = keys_from_jwks(&json!({"keys": [jwk, {"kty": "oct", "k": "c2VjcmV0"}]})).unwrap();
    assert_eq!(keys.len(), 1, "a symmetric key is never a verification key");
    issuer(
        IssuerKeys {
            jwks: keys,
            ..Default::default()
        },
        Some("trustee-as"),
    )
}

fn ca() -> (CertificateParams, KeyPair, Vec<u8>) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let der = params.self_signed(&key).unwrap().der().to_vec();
    (params, key, der)
}

fn leaf(ca_params: &CertificateParams, ca_key: &KeyPair, leaf: &Signer) -> Vec<u8> {
    let params = CertificateParams::new(vec!["as.example".to_owned()]).unwrap();
    let issuer = Issuer::from_params(ca_params, ca_key);
    params
        .signed_by(&leaf.rcgen, &issuer)
        .unwrap()
        .der()
        .to_vec()
}

#[test]
fn a_token_signed_by_a_configured_jwk_is_accepted_with_its_attested_identity() {
    let signer = Signer::new();
    let issuer = jwks_issuer(&signer, "k1");
    let token = signer.sign(
        json!({"alg": "ES256", "kid": "k1"}),
        &ear_claims(NOW + 300, "affirming"),
    );
    let verified = verify_external(&[issuer], &token, NOW).unwrap();
    assert_eq!(verified.tee, "tdx");
    assert_eq!(verified.identity.guest_id, "web-1");
    assert_eq!(verified.identity.labels["app"], "web");
    assert_eq!(verified.exp, NOW + 300);
    let claims = verified.claims.to_value();
    assert_eq!(claims["tether"]["issuer"], "trustee-as");
    assert_eq!(
        claims["submods"]["cpu0"]["ear.veraison.annotated-evidence"]["tdx"]["quote"]["body"]["mr_td"],
        "ab"
    );
}

#[test]
fn tokens_from_keys_not_configured_are_refused() {
    let trusted = Signer::new();
    let stranger = Signer::new();
    let issuer = jwks_issuer(&trusted, "k1");
    let claims = ear_claims(NOW + 300, "affirming");
    for token in [
        stranger.sign(json!({"alg": "ES256", "kid": "k1"}), &claims),
        stranger.sign(json!({"alg": "ES256"}), &claims),
        // The header's own key is never trusted by itself.
        stranger.sign(json!({"alg": "ES256", "jwk": stranger.jwk()}), &claims),
        trusted.sign(json!({"alg": "ES256", "kid": "other"}), &claims),
        trusted.sign(json!({"alg": "HS256"}), &claims),
    ] {
        let e = verify_external(std::slice::from_ref(&issuer), &token, NOW).unwrap_err();
        assert!(matches!(e, TokenError::Untrusted(_)), "{e}");
        assert_eq!(e.status(), 401);
        assert_eq!(e.name(), "InvalidToken");
    }
}

#[test]
fn x5c_chains_must_lead_to_a_configured_certificate() {
    let (ca_params, ca_key, ca_der) = ca();
    let signer = Signer::new();
    let leaf_der = leaf(&ca_params, &ca_key, &signer);
    let issuer = issuer(
        IssuerKeys {
            certificates: vec![ca_der],
            ..Default::default()
        },
        None,
    );
    let mut jwk = signer.jwk();
    jwk["x5c"] = json!([STANDARD.encode(&leaf_der)]);
    let claims = ear_claims(NOW + 300, "affirming");
    let token = signer.sign(json!({"alg": "ES256", "jwk": jwk}), &claims);
    // rcgen's certificates are valid from 1975 to 4096.
    verify_external(std::slice::from_ref(&issuer), &token, NOW).unwrap();

    // The same shape under another CA.
    let (other_params, other_key, _) = ca();
    let other_leaf = leaf(&other_params, &other_key, &signer);
    jwk["x5c"] = json!([STANDARD.encode(&other_leaf)]);
    let token = signer.sign(json!({"alg": "ES256", "jwk": jwk}), &claims);
    assert!(matches!(
        verify_external(std::slice::from_ref(&issuer), &token, NOW),
        Err(TokenError::Untrusted(_))
    ));

    // A header jwk that is not the x5c leaf's key.
    let impostor = Signer::new();
    let mut jwk = impostor.jwk();
    jwk["x5c"] = json!([STANDARD.encode(&leaf_der)]);
    let token = impostor.sign(json!({"alg": "ES256", "jwk": jwk}), &claims);
    assert!(verify_external(std::slice::from_ref(&issuer), &token, NOW).is_err());
}

#[test]
fn verified_but_unacceptable_tokens_are_refused_with_the_reason() {
    let signer = Signer::new();
    let issuer = jwks_issuer(&signer, "k1");
    let header = json!({"alg": "ES256", "kid": "k1"});
    let expired = signer.sign(header.clone(), &ear_claims(NOW - 60, "affirming"));
    assert!(matches!(
        verify_external(std::slice::from_ref(&issuer), &expired, NOW),
        Err(TokenError::Expired)
    ));
    let bad = signer.sign(header.clone(), &ear_claims(NOW + 60, "contraindicated"));
    assert!(matches!(
        verify_external(std::slice::from_ref(&issuer), &bad, NOW),
        Err(TokenError::Claims(_))
    ));
    let mut other_iss = ear_claims(NOW + 60, "affirming");
    other_iss["iss"] = json!("someone-else");
    let token = signer.sign(header.clone(), &other_iss);
    assert!(matches!(
        verify_external(std::slice::from_ref(&issuer), &token, NOW),
        Err(TokenError::Claims(_))
    ));
    let mut no_key = ear_claims(NOW + 60, "affirming");
    no_key["submods"]["cpu0"]["ear.veraison.annotated-evidence"]
        .as_object_mut()
        .unwrap()
        .remove("runtime_data_claims");
    let token = signer.sign(header, &no_key);
    assert!(matches!(
        verify_external(std::slice::from_ref(&issuer), &token, NOW),
        Err(TokenError::Claims(_))
    ));
}

#[test]
fn the_token_verifier_takes_this_kbss_tokens_first_then_trusted_issuers() {
    let kbs = Arc::new(TokenSigner::ephemeral().unwrap());
    let signer = Signer::new();
    let verifier = TokenVerifier::new(kbs.clone()).with_issuers(vec![jwks_issuer(&signer, "k1")]);
    let identity = crate::identity::GuestIdentity {
        guest_id: "own".into(),
        ..Default::default()
    };
    let key: kbs_types::TeePubKey = serde_json::from_value(tee_pubkey()).unwrap();
    let own = kbs
        .issue(
            crate::token::build_claims("tdx", json!({}), &key, "n", None, &identity),
            std::time::Duration::from_secs(60),
        )
        .unwrap();
    assert_eq!(verifier.verify(&own).unwrap().identity.guest_id, "own");

    let now = crate::token::unix_now();
    let external = signer.sign(
        json!({"alg": "ES256", "kid": "k1"}),
        &ear_claims(now + 300, "affirming"),
    );
    assert_eq!(
        verifier.verify(&external).unwrap().identity.guest_id,
        "web-1"
    );
    // Without the issuer configured the same token is refused.
    assert!(TokenVerifier::new(kbs).verify(&external).is_err());
}

#[test]
fn pem_files_hold_certificates_and_public_keys_only() {
    let (_, ca_key, ca_der) = ca();
    let pem = format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n{}",
        STANDARD.encode(&ca_der),
        ca_key.public_key_pem()
    );
    let read = read_pem(pem.as_bytes()).unwrap();
    assert_eq!(read.certificates.len(), 1);
    assert_eq!(read.public_keys.len(), 1);
    assert!(read_pem(ca_key.serialize_pem().as_bytes()).is_err());
}
