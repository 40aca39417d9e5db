//! RCAR service tests: a simulated upstream client against the sample verifier.

use super::*;
use async_trait::async_trait;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use kbs_types::{CompositeEvidence, HashAlgorithm, InitData, RuntimeData, TeePubKey};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use std::sync::Mutex;

const COOKIE_KEY: [u8; 32] = [9u8; 32];

fn service(config: RcarConfig) -> RcarService {
    RcarService::new(
        config,
        Arc::new(TokenSigner::ephemeral().unwrap()),
        vec![Arc::new(SampleVerifier)],
        &COOKIE_KEY,
    )
}

fn ec_key() -> TeePubKey {
    let secret = p256::SecretKey::random(&mut rand::thread_rng());
    let point = secret.public_key().to_encoded_point(false);
    TeePubKey::EC {
        crv: "P-256".into(),
        alg: "ECDH-ES+A256KW".into(),
        x: URL_SAFE_NO_PAD.encode(point.x().unwrap()),
        y: URL_SAFE_NO_PAD.encode(point.y().unwrap()),
    }
}

fn request(tee: Tee, extra: Value) -> Request {
    Request {
        version: "0.4.0".into(),
        tee,
        extra_params: extra,
    }
}

fn upstream_request() -> Request {
    request(
        Tee::Sample,
        json!({"supported-hash-algorithms": ["sha256", "sha384", "sha512", "sm3"]}),
    )
}

/// Builds the Attestation the way guest-components' rcar_client + sample attester do.
fn client_attestation(challenge: &Challenge, key: &TeePubKey, init: Option<&str>) -> Attestation {
    let alg = match challenge.extra_params.get("selected-hash-algorithm") {
        Some(Value::String(name)) => name.parse::<HashAlgorithm>().unwrap(),
        _ => HashAlgorithm::Sha384,
    };
    let runtime = json!({
        "tee-pubkey": key,
        "nonce": challenge.nonce,
        "additional-evidence": "",
    });
    let digest = alg.digest(&serde_json_canonicalizer::to_vec(&runtime).unwrap());
    Attestation {
        init_data: init.map(|body| InitData {
            format: "toml".into(),
            body: body.into(),
        }),
        runtime_data: RuntimeData {
            nonce: challenge.nonce.clone(),
            tee_pubkey: key.clone(),
        },
        tee_evidence: CompositeEvidence {
            primary_evidence: json!({"svn": "1", "report_data": STANDARD.encode(digest)}),
            additional_evidence: String::new(),
        },
    }
}

#[tokio::test]
async fn full_handshake_with_sample_tee() {
    let rcar = service(RcarConfig::default());
    let reply = rcar.auth(upstream_request()).unwrap();
    assert_eq!(
        reply.challenge.extra_params,
        json!({"selected-hash-algorithm": "sha384"})
    );
    assert_eq!(STANDARD.decode(&reply.challenge.nonce).unwrap().len(), 32);
    assert!(reply.session_id.starts_with("c1."), "a sealed challenge");
    assert!(reply.expires > SystemTime::now() + Duration::from_secs(290));
    assert!(matches!(
        rcar.session_token(&reply.session_id),
        Err(RcarError::NotAttested)
    ));

    let key = ec_key();
    let att = client_attestation(&reply.challenge, &key, None);
    let attested = rcar.attest(&reply.session_id, att).await.unwrap();

    let verified = rcar.signer().verify(&attested.token).unwrap();
    assert_eq!(verified.tee, "sample");
    assert_eq!(verified.identity.guest_id, derived_guest_id(&key).unwrap());
    assert!(verified.identity.labels.is_empty());
    let claims = verified.claims.to_value();
    let ev = &claims["submods"]["cpu0"]["ear.veraison.annotated-evidence"];
    assert_eq!(ev["sample"]["svn"], "1");
    assert_eq!(
        ev["runtime_data_claims"]["nonce"],
        reply.challenge.nonce.as_str()
    );
    assert_eq!(ev["runtime_data_claims"]["tee-pubkey"], json!(key));
    assert!(ev.get("init_data").is_none());
    assert_eq!(attested.verified.claims, verified.claims);

    // Background-check mode: the attest reply's cookie is the token itself; the challenge
    // cookie stays a challenge.
    let by_cookie = rcar.session_token(&attested.token).unwrap();
    assert_eq!(by_cookie.claims, verified.claims);
    assert!(matches!(
        rcar.session_token(&reply.session_id),
        Err(RcarError::NotAttested)
    ));

    // The token's key is one resources can be sealed to.
    assert!(crate::jwe::seal(&verified.tee_pubkey, b"secret").is_ok());
}

/// The session lives in the cookie, so a challenge is not single-use: a replayed
/// attestation yields a token bound to the very TEE key of the evidence, worth nothing to
/// whoever lacks it (docs/protocol.md, "Session lifetime").
#[tokio::test]
async fn a_replayed_attestation_is_bound_to_the_same_tee_key() {
    let rcar = service(RcarConfig::default());
    let reply = rcar.auth(upstream_request()).unwrap();
    let key = ec_key();
    let att = client_attestation(&reply.challenge, &key, None);
    let first = rcar.attest(&reply.session_id, att.clone()).await.unwrap();
    let again = rcar.attest(&reply.session_id, att).await.unwrap();
    assert_eq!(json!(again.verified.tee_pubkey), json!(key));
    assert_eq!(
        json!(first.verified.tee_pubkey),
        json!(again.verified.tee_pubkey)
    );
    assert_eq!(first.verified.identity, again.verified.identity);
}

#[tokio::test]
async fn a_failed_verification_can_be_retried_within_the_challenge() {
    let rcar = service(RcarConfig::default());
    let reply = rcar.auth(upstream_request()).unwrap();
    let key = ec_key();
    let mut att = client_attestation(&reply.challenge, &key, None);
    att.tee_evidence.primary_evidence["report_data"] = json!(STANDARD.encode([0u8; 48]));
    let err = rcar.attest(&reply.session_id, att).await.unwrap_err();
    assert_eq!(
        (err.status(), err.name()),
        (401, "EvidenceVerificationFailed")
    );
    assert!(err.to_string().contains("report data"), "{err}");

    let good = client_attestation(&reply.challenge, &key, None);
    assert!(rcar.attest(&reply.session_id, good).await.is_ok());
}

#[tokio::test]
async fn report_data_binds_key_and_additional_evidence() {
    let rcar = service(RcarConfig::default());
    // Evidence computed for one key, presented with another.
    let reply = rcar.auth(upstream_request()).unwrap();
    let mut att = client_attestation(&reply.challenge, &ec_key(), None);
    att.runtime_data.tee_pubkey = ec_key();
    let err = rcar.attest(&reply.session_id, att).await.unwrap_err();
    assert!(matches!(
        err,
        RcarError::EvidenceVerificationFailed(VerifyError::ReportDataMismatch)
    ));

    let reply = rcar.auth(upstream_request()).unwrap();
    let mut att = client_attestation(&reply.challenge, &ec_key(), None);
    att.tee_evidence.additional_evidence = "{}".into();
    let err = rcar.attest(&reply.session_id, att).await.unwrap_err();
    assert!(
        matches!(
            err,
            RcarError::EvidenceVerificationFailed(VerifyError::ReportDataMismatch)
        ),
        "additional evidence is bound too: {err:?}"
    );
}

#[tokio::test]
async fn nonce_mismatch_leaves_session_usable() {
    let rcar = service(RcarConfig::default());
    let reply = rcar.auth(upstream_request()).unwrap();
    let key = ec_key();
    let mut wrong = reply.challenge.clone();
    wrong.nonce = STANDARD.encode([9u8; 32]);
    let err = rcar
        .attest(&reply.session_id, client_attestation(&wrong, &key, None))
        .await
        .unwrap_err();
    assert_eq!((err.status(), err.name()), (401, "NonceMismatch"));
    let ok = client_attestation(&reply.challenge, &key, None);
    assert!(rcar.attest(&reply.session_id, ok).await.is_ok());
}

#[tokio::test]
async fn hash_negotiation_is_honoured() {
    let rcar = service(RcarConfig::default());
    for (offered, selected) in [
        (json!({"supported-hash-algorithms": ["sha256"]}), "sha256"),
        (
            json!({"supported-hash-algorithms": ["sha512", "sm3"]}),
            "sha512",
        ),
        (json!(""), "sha384"),
    ] {
        let reply = rcar.auth(request(Tee::Sample, offered)).unwrap();
        assert_eq!(
            reply.challenge.extra_params["selected-hash-algorithm"],
            selected
        );
        let att = client_attestation(&reply.challenge, &ec_key(), None);
        rcar.attest(&reply.session_id, att).await.unwrap();
    }
    let err = rcar
        .auth(request(
            Tee::Sample,
            json!({"supported-hash-algorithms": ["sm3"]}),
        ))
        .unwrap_err();
    assert_eq!(
        (err.status(), err.name()),
        (400, "UnsupportedHashAlgorithm")
    );
    let err = rcar.auth(request(Tee::Sample, json!(7))).unwrap_err();
    assert_eq!(err.status(), 400);
}

#[test]
fn version_and_tee_are_checked() {
    let rcar = service(RcarConfig::default());
    for good in ["0.4.0", "0.4.7"] {
        let mut req = upstream_request();
        req.version = good.into();
        assert!(rcar.auth(req).is_ok(), "{good}");
    }
    for bad in ["0.3.0", "1.4.0", "0.5.0", "0.4.0-rc1", "0.4", "", "garbage"] {
        let mut req = upstream_request();
        req.version = bad.into();
        let err = rcar.auth(req).unwrap_err();
        assert_eq!(
            (err.status(), err.name()),
            (400, "InvalidRequestVersion"),
            "{bad}"
        );
    }
    let err = rcar.auth(request(Tee::Tdx, json!(""))).unwrap_err();
    assert_eq!((err.status(), err.name()), (400, "UnknownTee"));
    assert!(err.to_string().contains("tdx"));
}

#[tokio::test]
async fn a_challenge_is_honoured_only_by_a_kbs_holding_the_same_key() {
    let rcar = service(RcarConfig::default());
    let reply = rcar.auth(upstream_request()).unwrap();
    let att = client_attestation(&reply.challenge, &ec_key(), None);
    // Another replica with the same cookie key (derived from the same KEK) accepts it...
    let replica = service(RcarConfig::default());
    assert!(replica.attest(&reply.session_id, att.clone()).await.is_ok());
    // ...a KBS with another key does not.
    let stranger = RcarService::new(
        RcarConfig::default(),
        Arc::new(TokenSigner::ephemeral().unwrap()),
        vec![Arc::new(SampleVerifier)],
        &[1u8; 32],
    );
    let err = stranger.attest(&reply.session_id, att).await.unwrap_err();
    assert_eq!((err.status(), err.name()), (401, "SessionNotFound"));
}

#[tokio::test]
async fn expired_and_unknown_sessions() {
    let rcar = service(RcarConfig {
        session_ttl: Duration::from_millis(20),
        ..RcarConfig::default()
    });
    let reply = rcar.auth(upstream_request()).unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    let att = client_attestation(&reply.challenge, &ec_key(), None);
    let err = rcar
        .attest(&reply.session_id, att.clone())
        .await
        .unwrap_err();
    assert_eq!((err.status(), err.name()), (401, "SessionExpired"));

    for id in [
        "8d1a6f3e-2a7c-4d1b-9b61-3c2f5e4d7a90".to_string(),
        "c1.not-sealed-by-us".into(),
        "not-a-cookie".into(),
        String::new(),
    ] {
        let err = rcar.attest(&id, att.clone()).await.unwrap_err();
        assert_eq!((err.status(), err.name()), (401, "SessionNotFound"));
        assert!(matches!(
            rcar.session_token(&id),
            Err(RcarError::SessionNotFound)
        ));
    }
}

#[tokio::test]
async fn the_attested_cookie_is_the_token_and_ends_with_it() {
    let rcar = service(RcarConfig::default());
    let reply = rcar.auth(upstream_request()).unwrap();
    let att = client_attestation(&reply.challenge, &ec_key(), None);
    let attested = rcar.attest(&reply.session_id, att).await.unwrap();
    assert_eq!(
        rcar.session_token(&attested.token).unwrap().exp,
        attested.verified.exp
    );
    // A token of another signer is no session here.
    let other = service(RcarConfig::default());
    assert!(matches!(
        other.session_token(&attested.token),
        Err(RcarError::SessionNotFound)
    ));
    // An expired token is an expired session (what the client sees: 401, attest again).
    let expired = session_error(TokenError::Expired);
    assert_eq!((expired.status(), expired.name()), (401, "SessionExpired"));
}

const INIT_DATA: &str = r#"algorithm = "sha256"
version = "0.1.0"

[data]
"cdh.toml" = "socket = 'unix:///run/cdh.sock'"

[tether]
guest_id = "db-primary"

[tether.labels]
role = "db"
"#;

#[tokio::test]
async fn init_data_sets_identity_and_claims() {
    let rcar = service(RcarConfig::default());
    let reply = rcar.auth(upstream_request()).unwrap();
    let att = client_attestation(&reply.challenge, &ec_key(), Some(INIT_DATA));
    let attested = rcar.attest(&reply.session_id, att).await.unwrap();
    let v = &attested.verified;
    assert_eq!(v.identity.guest_id, "db-primary");
    assert_eq!(v.identity.labels["role"], "db");
    let claims = v.claims.to_value();
    let ev = &claims["submods"]["cpu0"]["ear.veraison.annotated-evidence"];
    assert_eq!(
        ev["init_data"],
        hex::encode(HashAlgorithm::Sha256.digest(INIT_DATA.as_bytes()))
    );
    assert_eq!(ev["init_data_claims"]["tether"]["guest_id"], "db-primary");
    assert_eq!(claims["tether"]["guest_id"], "db-primary");
}

#[tokio::test]
async fn bad_init_data_and_keys_are_refused_before_spending_the_nonce() {
    let rcar = service(RcarConfig {
        max_init_data_bytes: 512,
        ..RcarConfig::default()
    });
    let reply = rcar.auth(upstream_request()).unwrap();
    let key = ec_key();

    let att = client_attestation(
        &reply.challenge,
        &key,
        Some("[tether]\nguest_id = \"a b\"\n"),
    );
    let err = rcar.attest(&reply.session_id, att).await.unwrap_err();
    assert_eq!((err.status(), err.name()), (400, "InvalidInitData"));
    assert!(err.to_string().contains("guest_id"));

    let big = format!("x = \"{}\"\n", "a".repeat(600));
    let att = client_attestation(&reply.challenge, &key, Some(&big));
    let err = rcar.attest(&reply.session_id, att).await.unwrap_err();
    assert_eq!((err.status(), err.name()), (413, "InitDataTooLarge"));

    let mut att = client_attestation(&reply.challenge, &key, Some("a = 1"));
    att.init_data.as_mut().unwrap().format = "json".into();
    let err = rcar.attest(&reply.session_id, att).await.unwrap_err();
    assert_eq!((err.status(), err.name()), (400, "InvalidInitData"));

    let TeePubKey::EC { x, y, .. } = key.clone() else {
        unreachable!()
    };
    let p521 = TeePubKey::EC {
        crv: "P-521".into(),
        alg: "ECDH-ES+A256KW".into(),
        x,
        y,
    };
    let att = client_attestation(&reply.challenge, &p521, None);
    let err = rcar.attest(&reply.session_id, att).await.unwrap_err();
    assert_eq!((err.status(), err.name()), (400, "UnsupportedTeePubKey"));
    assert!(err.to_string().contains("P-521"));

    // None of the above spent the nonce.
    let att = client_attestation(&reply.challenge, &key, None);
    assert!(rcar.attest(&reply.session_id, att).await.is_ok());
}

#[tokio::test]
async fn rsa_tee_key_is_accepted() {
    use rsa::traits::PublicKeyParts;
    let private = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).unwrap();
    let key = TeePubKey::RSA {
        alg: "RSA-OAEP-256".into(),
        k_mod: URL_SAFE_NO_PAD.encode(private.n().to_bytes_be()),
        k_exp: URL_SAFE_NO_PAD.encode(private.e().to_bytes_be()),
    };
    let rcar = service(RcarConfig::default());
    let reply = rcar.auth(upstream_request()).unwrap();
    let att = client_attestation(&reply.challenge, &key, None);
    let attested = rcar.attest(&reply.session_id, att).await.unwrap();
    assert!(matches!(
        attested.verified.tee_pubkey,
        TeePubKey::RSA { .. }
    ));
}

/// Report data and init-data digest one verification was given.
type Seen = (Vec<u8>, Option<Vec<u8>>);

/// A verifier for another TEE that records what it was given and can stall.
struct RecordingVerifier {
    delay: Duration,
    seen: Mutex<Vec<Seen>>,
}

#[async_trait]
impl Verifier for RecordingVerifier {
    fn tee(&self) -> Tee {
        Tee::Tdx
    }

    async fn verify(
        &self,
        _evidence: &Value,
        report_data: &[u8],
        init_data_digest: Option<&[u8]>,
    ) -> Result<Value, VerifyError> {
        self.seen
            .lock()
            .unwrap()
            .push((report_data.to_vec(), init_data_digest.map(<[u8]>::to_vec)));
        tokio::time::sleep(self.delay).await;
        Ok(json!({"tcb": "up-to-date"}))
    }
}

fn tdx_service(delay: Duration) -> (RcarService, Arc<RecordingVerifier>) {
    let verifier = Arc::new(RecordingVerifier {
        delay,
        seen: Mutex::new(Vec::new()),
    });
    let rcar = RcarService::new(
        RcarConfig::default(),
        Arc::new(TokenSigner::ephemeral().unwrap()),
        vec![Arc::new(SampleVerifier), verifier.clone()],
        &COOKIE_KEY,
    )
    // The recording verifier's claims are not a real quote's: the default appraisal policy
    // would (rightly) refuse them, so these tests appraise with one that accepts anything.
    .with_appraiser(Arc::new(
        Appraiser::new("package policy\nhardware := 2\n", Default::default()).unwrap(),
    ));
    (rcar, verifier)
}

#[tokio::test]
async fn the_default_appraisal_refuses_claims_that_are_not_a_genuine_quotes() {
    let (rcar, _) = tdx_service(Duration::ZERO);
    let rcar = rcar.with_appraiser(Arc::default());
    let reply = rcar.auth(request(Tee::Tdx, json!(""))).unwrap();
    let att = client_attestation(&reply.challenge, &ec_key(), None);
    let e = rcar.attest(&reply.session_id, att).await.err().unwrap();
    assert_eq!(e.name(), "EvidenceVerificationFailed");
    assert_eq!(e.status(), 401);
    let text = e.to_string();
    assert!(text.contains("contraindicated"), "{text}");
    assert!(text.contains("not a TDX quote signed by Intel"), "{text}");
}

#[tokio::test]
async fn pluggable_verifier_gets_report_and_init_data_digests() {
    let (rcar, verifier) = tdx_service(Duration::ZERO);
    let reply = rcar.auth(request(Tee::Tdx, json!(""))).unwrap();
    let key = ec_key();
    let att = client_attestation(&reply.challenge, &key, Some(INIT_DATA));
    let attested = rcar.attest(&reply.session_id, att).await.unwrap();
    let seen = verifier.seen.lock().unwrap().clone();
    // The digest the client must bind, written out by hand (JCS of the three members, keys
    // sorted, no whitespace) rather than by the canonicalizer under test.
    let TeePubKey::EC { x, y, .. } = &key else {
        unreachable!()
    };
    let canonical = format!(
        r#"{{"additional-evidence":"","nonce":"{}","tee-pubkey":{{"alg":"ECDH-ES+A256KW","crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}}}"#,
        reply.challenge.nonce
    );
    let expected_rd = HashAlgorithm::Sha384.digest(canonical.as_bytes());
    assert_eq!(
        seen,
        vec![(
            expected_rd,
            Some(HashAlgorithm::Sha256.digest(INIT_DATA.as_bytes()))
        )]
    );
    assert_eq!(attested.verified.tee, "tdx");
    assert_eq!(
        attested.verified.claims.to_value()["submods"]["cpu0"]["ear.veraison.annotated-evidence"]["tdx"]
            ["tcb"],
        "up-to-date"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_attests_on_one_challenge_are_independent() {
    let (rcar, _) = tdx_service(Duration::from_millis(50));
    let rcar = Arc::new(rcar);
    let reply = rcar.auth(request(Tee::Tdx, json!(""))).unwrap();
    let att = client_attestation(&reply.challenge, &ec_key(), None);
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let rcar = rcar.clone();
            let id = reply.session_id.clone();
            let att = att.clone();
            tokio::spawn(async move { rcar.attest(&id, att).await })
        })
        .collect();
    for task in tasks {
        let attested = task.await.unwrap().unwrap();
        assert_eq!(
            json!(attested.verified.tee_pubkey),
            json!(att.runtime_data.tee_pubkey)
        );
    }
}

#[tokio::test]
async fn slow_verifier_times_out() {
    let (rcar, _) = tdx_service(Duration::from_secs(5));
    let rcar = rcar.with_verify_timeout(Duration::from_millis(20));
    let reply = rcar.auth(request(Tee::Tdx, json!(""))).unwrap();
    let att = client_attestation(&reply.challenge, &ec_key(), None);
    let err = rcar.attest(&reply.session_id, att).await.unwrap_err();
    assert_eq!((err.status(), err.name()), (500, "VerifierUnavailable"));
}

/// docs/protocol.md section 3.3: its key and nonce, no additional evidence.
fn documented_key() -> TeePubKey {
    TeePubKey::EC {
        crv: "P-256".into(),
        alg: "ECDH-ES+A256KW".into(),
        x: "WKn-ZIGevcwGIyyrzFoZNBdaq9_TsqzGl96oc0CWuis".into(),
        y: "y77t-RvAHRKTsSGdIYUfweuOvwrvDD-Q3Hv5J0fSKbE".into(),
    }
}
const DOCUMENTED_NONCE: &str = "q1w2e3r4t5y6u7i8o9p0q1w2e3r4t5y6u7i8o9p0q1w=";

#[test]
fn report_data_of_the_documented_example_is_the_documented_digest() {
    let digest = binding::expected_report_data(
        HashAlgorithm::Sha384,
        &documented_key(),
        DOCUMENTED_NONCE,
        "",
    )
    .unwrap();
    assert_eq!(
        hex::encode(digest),
        "a4df05fa930e5f63e290f8331ae9befe87f93a3eedcf81fd779161fa1fdc764ef1a663ecdacdd43f2a00f7af23573a07"
    );
}

#[test]
fn report_data_escapes_additional_evidence_as_rfc8785_does() {
    // RFC 8785 section 3.2.2.2's string: its canonical form is
    // "€$\u000f\nA'B\"\\\\\"/"; the digests were computed apart (Python's hashlib over
    // the canonical document written by hand).
    let additional = "\u{20ac}$\u{f}\nA'B\"\\\\\"/";
    let digest = |alg| {
        hex::encode(
            binding::expected_report_data(alg, &documented_key(), DOCUMENTED_NONCE, additional)
                .unwrap(),
        )
    };
    assert_eq!(
        digest(HashAlgorithm::Sha256),
        "ccf8c6be3bfaf025ae2fb9b635c63e9c5f7d141ed04c729d7d6277977ee38f9f"
    );
    assert_eq!(
        digest(HashAlgorithm::Sha512),
        "1337a8a1e917aa0a7831aeda3b0a3fb7ebcb3552924b9f3bfc4bde20e1176912822e3bc5a7ede66e1808333844bfd047cee98fb5022971f7d8277abad6885b56"
    );
}

#[test]
fn the_derived_guest_id_of_the_documented_key() {
    assert_eq!(
        binding::derived_guest_id(&documented_key()).unwrap(),
        "tee-1da106d81dc375e4"
    );
}

/// RFC 8785's examples through the canonicalizer the binding uses (serde_json_canonicalizer).
#[test]
fn the_canonicalizer_gives_rfc8785s_outputs() {
    let jcs = |input: &str| {
        let value: Value = serde_json::from_str(input).unwrap();
        String::from_utf8(serde_json_canonicalizer::to_vec(&value).unwrap()).unwrap()
    };
    // Section 3.2.2: numbers, string escapes and literals.
    assert_eq!(
        jcs(r#"{
            "numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],
            "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
            "literals": [null, true, false]
        }"#),
        r#"{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],"string":"€$\u000f\nA'B\"\\\\\"/"}"#
    );
    // Section 3.2.3: properties sorted by their UTF-16 code units (the emoji, a surrogate
    // pair, before U+FB33).
    assert_eq!(
        jcs(r#"{
            "\u20ac": "Euro Sign",
            "\r": "Carriage Return",
            "\ufb33": "Hebrew Letter Dalet With Dagesh",
            "1": "One",
            "\ud83d\ude00": "Emoji: Grinning Face",
            "\u0080": "Control",
            "\u00f6": "Latin Small Letter O With Diaeresis"
        }"#),
        "{\"\\r\":\"Carriage Return\",\"1\":\"One\",\"\u{80}\":\"Control\",\"\u{f6}\":\"Latin Small Letter O With Diaeresis\",\"\u{20ac}\":\"Euro Sign\",\"\u{1f600}\":\"Emoji: Grinning Face\",\"\u{fb33}\":\"Hebrew Letter Dalet With Dagesh\"}"
    );
}

/// issue 17 defect 3: the token carries the whole init-data. At the default limit a
/// typical document (a policy in `[data]`) gives a token a client can send back; one whose
/// JSON form would make a larger token (quotes double in JSON) is refused with 413
/// `TokenTooLarge` instead of becoming a cookie nobody can return.
#[tokio::test]
async fn init_data_at_the_limit_gives_a_token_a_client_can_send_back() {
    let rcar = service(RcarConfig::default());
    let limit = RcarConfig::default().max_init_data_bytes;
    let line = "allow if { input.request.path == \"/kbs/v0/resource/default/key/1\" }\n";
    let mut policy = String::new();
    while policy.len() + line.len() < limit - 64 {
        policy.push_str(line);
    }
    let typical = format!("[data]\n\"policy.rego\" = '''\n{policy}'''\n");
    assert!(typical.len() <= limit && typical.len() > limit - 100);
    let reply = rcar.auth(upstream_request()).unwrap();
    let att = client_attestation(&reply.challenge, &ec_key(), Some(&typical));
    let attested = rcar.attest(&reply.session_id, att).await.unwrap();
    assert!(attested.token.len() <= crate::token::MAX_TOKEN_BYTES);
    rcar.session_token(&attested.token).unwrap();

    let quotes = format!("x = '{}'\n", "\"".repeat(limit - 16));
    assert!(quotes.len() <= limit);
    let reply = rcar.auth(upstream_request()).unwrap();
    let att = client_attestation(&reply.challenge, &ec_key(), Some(&quotes));
    let Err(err) = rcar.attest(&reply.session_id, att).await else {
        panic!("a token too large to send back was issued");
    };
    assert_eq!((err.status(), err.name()), (413, "TokenTooLarge"), "{err}");
    assert!(err.to_string().contains("init-data"), "{err}");
}
