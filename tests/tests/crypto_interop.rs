//! The KBS's hot-path crypto (ring ES256 tokens, ring ECDH-ES JWE) against independent
//! implementations: JWEs sealed by the server open with panva/jose (Node.js, tests/jose) and
//! with the guest's unseal code, JWEs jose seals open in the guest, and tokens verify with
//! `jsonwebtoken` given only the JWK from the token header, as a relying party would.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
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
    let err = mine.open(&sealed).unwrap_err();
    assert!(
        matches!(err, guest_daemon::tee_key::UnsealError::KeyUnwrap),
        "{err}"
    );

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

/// tests/jose, with its npm dependency installed (.ci/run installs it), or `None` after
/// [`tests::skip`]ping `test`.
fn jose_dir(test: &str) -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("jose");
    let node = std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !node {
        tests::skip(test, "no `node` (Node.js) on PATH");
        return None;
    }
    if !dir.join("node_modules/jose").is_dir() {
        tests::skip(
            test,
            "tests/jose has no node_modules (run: npm ci --prefix tests/jose)",
        );
        return None;
    }
    Some(dir)
}

/// Runs `node tests/jose/interop.mjs <command>` with `request` on stdin: its answer, or its
/// error output when jose refused.
fn jose(dir: &Path, command: &str, request: &Value) -> Result<Value, String> {
    use std::io::Write;
    let mut child = std::process::Command::new("node")
        .arg(dir.join("interop.mjs"))
        .arg(command)
        .current_dir(dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(&serde_json::to_vec(request).unwrap())
        .unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 256) as u8).collect()
}

fn jwk_alg(key: &TeeKeyPair) -> String {
    serde_json::to_value(key.export_pubkey()).unwrap()["alg"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn jose_opens_what_the_kbs_seals_and_nothing_sealed_to_another_key() {
    let Some(dir) = jose_dir("jose_opens_what_the_kbs_seals_and_nothing_sealed_to_another_key")
    else {
        return;
    };
    for key in [TeeKeyPair::new_ec(), TeeKeyPair::new_rsa().unwrap()] {
        let other = TeeKeyPair::generate(key.algorithm()).unwrap();
        let pkcs8 = key.to_pkcs8_pem().unwrap().to_string();
        for len in [0, 1, 4096, 100_000] {
            let plaintext = payload(len);
            let sealed = kbs_core::jwe::seal(&key.export_pubkey(), &plaintext).unwrap();
            let request = json!({"pkcs8": pkcs8, "alg": jwk_alg(&key), "jwe": sealed});
            let opened = jose(&dir, "open", &request).unwrap();
            assert_eq!(
                URL_SAFE_NO_PAD
                    .decode(opened["plaintext"].as_str().unwrap())
                    .unwrap(),
                plaintext,
                "{key:?} {len}"
            );
            assert_eq!(opened["header"]["enc"], "A256GCM");
            let misdirected = kbs_core::jwe::seal(&other.export_pubkey(), &plaintext).unwrap();
            let request = json!({"pkcs8": pkcs8, "alg": jwk_alg(&key), "jwe": misdirected});
            let err = jose(&dir, "open", &request).unwrap_err();
            assert!(err.contains("JWEDecryptionFailed"), "{key:?}: {err}");
        }
    }
    // A push sealed to a tunnel's key (`dir`), and not to another.
    let key = tunnel::PushKey::generate();
    let other = tunnel::PushKey::generate();
    let mut sealed =
        serde_json::to_value(kbs_core::jwe::seal_dir(key.bytes(), b"pushed").unwrap()).unwrap();
    // The KBS writes `"encrypted_key": ""` (kbs-types' Response always has the member);
    // RFC 7516 section 7.2.1 wants it absent when empty, and jose refuses the empty string
    // ("JWE Encrypted Key incorrect type"). Tether's guest takes both forms.
    let request = json!({"dir": URL_SAFE_NO_PAD.encode(key.bytes()), "jwe": sealed});
    let err = jose(&dir, "open", &request).unwrap_err();
    assert!(err.contains("JWE Encrypted Key incorrect type"), "{err}");
    assert_eq!(
        sealed.as_object_mut().unwrap().remove("encrypted_key"),
        Some(json!(""))
    );
    let request = json!({"dir": URL_SAFE_NO_PAD.encode(key.bytes()), "jwe": sealed});
    let opened = jose(&dir, "open", &request).unwrap();
    assert_eq!(opened["plaintext"], URL_SAFE_NO_PAD.encode(b"pushed"));
    assert_eq!(opened["header"]["alg"], "dir");
    let request = json!({"dir": URL_SAFE_NO_PAD.encode(other.bytes()), "jwe": sealed});
    let err = jose(&dir, "open", &request).unwrap_err();
    assert!(err.contains("JWEDecryptionFailed"), "{err}");
}

#[test]
fn the_guest_opens_what_jose_seals_and_nothing_sealed_to_another_key() {
    let Some(dir) = jose_dir("the_guest_opens_what_jose_seals_and_nothing_sealed_to_another_key")
    else {
        return;
    };
    for key in [TeeKeyPair::new_ec(), TeeKeyPair::new_rsa().unwrap()] {
        let other = TeeKeyPair::generate(key.algorithm()).unwrap();
        for len in [0, 1, 4096, 100_000] {
            let plaintext = payload(len);
            let request = json!({
                "key": key.export_pubkey(),
                "plaintext": URL_SAFE_NO_PAD.encode(&plaintext),
            });
            let sealed = jose(&dir, "seal", &request).unwrap();
            let wire = serde_json::to_vec(&sealed).unwrap();
            let opened = key.open_json(&wire).unwrap();
            assert_eq!(opened.as_slice(), plaintext.as_slice(), "{key:?} {len}");
            assert!(other.open_json(&wire).is_err(), "{key:?} {len}");
        }
    }
    // `dir` as jose writes it: no `encrypted_key` member at all.
    let guest = TeeKeyPair::new_ec();
    let key = tunnel::PushKey::generate();
    let other = tunnel::PushKey::generate();
    let request = json!({
        "dir": URL_SAFE_NO_PAD.encode(key.bytes()),
        "plaintext": URL_SAFE_NO_PAD.encode(b"pushed"),
    });
    let sealed = jose(&dir, "seal", &request).unwrap();
    assert!(sealed.get("encrypted_key").is_none(), "{sealed}");
    let wire = serde_json::to_vec(&sealed).unwrap();
    let opened = guest.open_json_with(&wire, Some(key.bytes())).unwrap();
    assert_eq!(opened.as_slice(), b"pushed");
    let err = guest
        .open_json_with(&wire, Some(other.bytes()))
        .unwrap_err();
    assert!(
        matches!(err, guest_daemon::tee_key::UnsealError::Decrypt),
        "{err}"
    );
}
