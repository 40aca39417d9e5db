//! Client unit tests: the RCAR client against a tiny in-process mock KBS
//! (axum on loopback). They exercise what needs a real HTTP peer (the session
//! cookie, 401 re-attestation, error bodies, passport mode). The mock is NOT
//! the Tether server; the integration tests against the real KBS live in `tests/`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode as AxumStatus, header};
use axum::response::{IntoResponse, Response as AxumResponse};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use kbs_types::{Attestation, HashAlgorithm, Request, Tee, TeePubKey};
use serde_json::{Value, json};

use super::token::{jwt_claims, now_secs};
use super::{KbsClient, KbsClientBuilder, RcarError};
use crate::evidence::SampleAttester;
use crate::resource_path::ResourcePath;
use crate::tee_key::TeeKeyPair;
use crate::tee_key::seal::seal;

const SECRET: &[u8] = b"s3cr3t resource bytes";
const INIT_DATA: &str =
    "version = \"0.1.0\"\nalgorithm = \"sha384\"\n[data]\n\"tether.toml\" = \"guest_id = 'g1'\"\n";

#[derive(Default)]
struct Session {
    nonce: String,
    hash: Option<HashAlgorithm>,
    attested_key: Option<TeePubKey>,
}

#[derive(Default)]
struct MockState {
    next_session: u64,
    sessions: HashMap<String, Session>,
    auth_calls: u32,
    attest_calls: u32,
    get_calls: u32,
    /// Answer 401 to this many resource GETs (dropping the session), then serve.
    fail_gets: u32,
    /// Reject every attestation with 401.
    reject_attest: bool,
    /// `selected-hash-algorithm` to put in the challenge (none: omitted).
    select_hash: Option<&'static str>,
    last_attestation: Option<Value>,
    last_get_had_cookie: Option<bool>,
    last_get_bearer: Option<String>,
}

type Shared = Arc<Mutex<MockState>>;

fn kbs_error(status: AxumStatus, name: &str, detail: &str) -> AxumResponse {
    let body = json!({
        "type": format!("https://github.com/confidential-containers/kbs/errors/{name}"),
        "detail": detail,
    });
    (status, Json(body)).into_response()
}

fn session_id(headers: &HeaderMap) -> Option<String> {
    let cookies = headers.get(header::COOKIE)?.to_str().ok()?;
    cookies
        .split(';')
        .filter_map(|c| c.trim().strip_prefix("kbs-session-id="))
        .map(str::to_owned)
        .next()
}

async fn auth(State(state): State<Shared>, Json(req): Json<Request>) -> AxumResponse {
    let mut st = state.lock().unwrap();
    st.auth_calls += 1;
    assert_eq!(req.version, "0.4.0");
    assert_eq!(req.tee, Tee::Sample);
    assert_eq!(
        req.extra_params["supported-hash-algorithms"],
        json!(["sha256", "sha384", "sha512", "sm3"])
    );
    st.next_session += 1;
    let id = format!("session-{}", st.next_session);
    let nonce = STANDARD.encode(format!("nonce-{}", st.next_session));
    let hash = st.select_hash.and_then(|h| h.parse().ok());
    st.sessions.insert(
        id.clone(),
        Session {
            nonce: nonce.clone(),
            hash,
            attested_key: None,
        },
    );
    let extra = match st.select_hash {
        Some(h) => json!({"selected-hash-algorithm": h}),
        None => json!(""),
    };
    (
        // No Path attribute, as trustee: the default path is /kbs/v0.
        [(header::SET_COOKIE, format!("kbs-session-id={id}"))],
        Json(json!({"nonce": nonce, "extra-params": extra})),
    )
        .into_response()
}

fn fake_jwt(tee_pubkey: &TeePubKey) -> String {
    let claims = json!({"exp": now_secs() + 300, "tee-pubkey": tee_pubkey});
    format!(
        "{}.{}.c2ln",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"ES256","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

async fn attest(State(state): State<Shared>, headers: HeaderMap, body: String) -> AxumResponse {
    let mut st = state.lock().unwrap();
    st.attest_calls += 1;
    st.last_attestation = Some(serde_json::from_str(&body).unwrap());
    if st.reject_attest {
        return kbs_error(
            AxumStatus::UNAUTHORIZED,
            "AttestationFailed",
            "evidence rejected by policy",
        );
    }
    let Some(id) = session_id(&headers) else {
        return kbs_error(
            AxumStatus::UNAUTHORIZED,
            "MissingCookie",
            "no kbs-session-id",
        );
    };
    let att: Attestation = serde_json::from_str(&body).unwrap();
    let Some(session) = st.sessions.get_mut(&id) else {
        return kbs_error(
            AxumStatus::UNAUTHORIZED,
            "InvalidSession",
            "unknown session",
        );
    };
    assert_eq!(
        att.runtime_data.nonce, session.nonce,
        "nonce of this session"
    );
    // Recompute the binding the way a verifier does.
    let canonical = serde_json_canonicalizer::to_vec(&json!({
        "tee-pubkey": att.runtime_data.tee_pubkey,
        "nonce": att.runtime_data.nonce,
        "additional-evidence": att.tee_evidence.additional_evidence,
    }))
    .unwrap();
    let expected = session
        .hash
        .unwrap_or(HashAlgorithm::Sha384)
        .digest(&canonical);
    let report_data = att.tee_evidence.primary_evidence["report_data"]
        .as_str()
        .unwrap();
    if STANDARD.decode(report_data).unwrap() != expected {
        return kbs_error(
            AxumStatus::UNAUTHORIZED,
            "EvidenceMismatch",
            "report_data does not bind runtime data",
        );
    }
    session.attested_key = Some(att.runtime_data.tee_pubkey.clone());
    Json(json!({"token": fake_jwt(&att.runtime_data.tee_pubkey)})).into_response()
}

async fn resource(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path((repo, kind, tag)): Path<(String, String, String)>,
) -> AxumResponse {
    let mut st = state.lock().unwrap();
    st.get_calls += 1;
    st.last_get_had_cookie = Some(headers.contains_key(header::COOKIE));
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    st.last_get_bearer = bearer.clone();

    let key = if let Some(token) = bearer {
        let Some(claims) = jwt_claims(&token) else {
            return kbs_error(AxumStatus::UNAUTHORIZED, "TokenInvalid", "bad bearer token");
        };
        serde_json::from_value::<TeePubKey>(claims["tee-pubkey"].clone()).unwrap()
    } else {
        let id = session_id(&headers).unwrap_or_default();
        if st.fail_gets > 0 {
            st.fail_gets -= 1;
            st.sessions.remove(&id);
            return kbs_error(
                AxumStatus::UNAUTHORIZED,
                "SessionExpired",
                "session expired",
            );
        }
        match st.sessions.get(&id).and_then(|s| s.attested_key.clone()) {
            Some(key) => key,
            None => return kbs_error(AxumStatus::UNAUTHORIZED, "Unauthenticated", "attest first"),
        }
    };
    match (repo.as_str(), kind.as_str(), tag.as_str()) {
        ("default", "key", "1") => Json(seal(&key, SECRET)).into_response(),
        ("default", "denied", "1") => kbs_error(
            AxumStatus::FORBIDDEN,
            "PolicyDeny",
            "resource policy denied default/denied/1",
        ),
        ("default", "garbage", "1") => (AxumStatus::OK, "not json").into_response(),
        ("default", "teapot", "1") => (AxumStatus::IM_A_TEAPOT, "short and stout").into_response(),
        _ => kbs_error(
            AxumStatus::NOT_FOUND,
            "ResourceNotFound",
            "no such resource",
        ),
    }
}

struct MockKbs {
    url: String,
    state: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MockKbs {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MockKbs {
    async fn start() -> Self {
        let state = Shared::default();
        let app = axum::Router::new()
            .route("/kbs/v0/auth", post(auth))
            .route("/kbs/v0/attest", post(attest))
            .route("/kbs/v0/resource/{repo}/{kind}/{tag}", get(resource))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { url, state, task }
    }

    fn with<R>(&self, f: impl FnOnce(&mut MockState) -> R) -> R {
        f(&mut self.state.lock().unwrap())
    }

    fn client(&self) -> KbsClient {
        KbsClientBuilder::new(format!("{}/", self.url), Box::new(SampleAttester))
            .init_data(INIT_DATA)
            .build()
            .unwrap()
    }
}

fn path(s: &str) -> ResourcePath {
    s.parse().unwrap()
}

#[tokio::test]
async fn attest_then_get_resource_rides_the_session_cookie() {
    let kbs = MockKbs::start().await;
    let mut client = kbs.client();

    let token = client.attest().await.unwrap();
    assert_eq!(client.token(), Some(token.as_str()));
    let exp = client.token_expiry().unwrap();
    assert!(exp > now_secs() && exp <= now_secs() + 300);

    let plain = client.get_resource(&path("default/key/1")).await.unwrap();
    assert_eq!(plain.as_slice(), SECRET);
    kbs.with(|st| {
        assert_eq!((st.auth_calls, st.attest_calls, st.get_calls), (1, 1, 1));
        assert_eq!(st.last_get_had_cookie, Some(true));
        assert_eq!(st.last_get_bearer, None);

        // The attestation has upstream's shape.
        let att = st.last_attestation.as_ref().unwrap();
        assert_eq!(
            att["init-data"],
            json!({"format": "toml", "body": INIT_DATA})
        );
        assert_eq!(att["tee-evidence"]["additional_evidence"], "");
        assert_eq!(att["tee-evidence"]["primary_evidence"]["svn"], "1");
        assert_eq!(att["runtime-data"]["tee-pubkey"]["kty"], "EC");
        assert_eq!(att["runtime-data"]["tee-pubkey"]["alg"], "ECDH-ES+A256KW");
    });
}

#[tokio::test]
async fn get_resource_attests_first_when_there_is_no_token() {
    let kbs = MockKbs::start().await;
    let mut client = kbs.client();
    let plain = client.get_resource(&path("default/key/1")).await.unwrap();
    assert_eq!(plain.as_slice(), SECRET);
    assert!(client.token().is_some());
    kbs.with(|st| assert_eq!((st.auth_calls, st.attest_calls, st.get_calls), (1, 1, 1)));

    // A second fetch reuses the session.
    client.get_resource(&path("default/key/1")).await.unwrap();
    kbs.with(|st| assert_eq!((st.auth_calls, st.attest_calls, st.get_calls), (1, 1, 2)));
}

#[tokio::test]
async fn get_resource_reattests_on_401_and_retries() {
    let kbs = MockKbs::start().await;
    let mut client = kbs.client();
    client.attest().await.unwrap();
    kbs.with(|st| st.fail_gets = 2);

    let plain = client.get_resource(&path("default/key/1")).await.unwrap();
    assert_eq!(plain.as_slice(), SECRET);
    kbs.with(|st| assert_eq!((st.auth_calls, st.attest_calls, st.get_calls), (3, 3, 3)));
}

#[tokio::test]
async fn get_resource_gives_up_after_three_401s() {
    let kbs = MockKbs::start().await;
    let mut client = kbs.client();
    kbs.with(|st| st.fail_gets = 100);

    let err = client
        .get_resource(&path("default/key/1"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, RcarError::Unauthorized { attempts: 3, .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("401") && msg.contains("SessionExpired: session expired"),
        "{msg}"
    );
    kbs.with(|st| assert_eq!((st.attest_calls, st.get_calls), (3, 3)));
}

#[tokio::test]
async fn not_found_and_denial_carry_the_server_detail() {
    let kbs = MockKbs::start().await;
    let mut client = kbs.client();

    let err = client
        .get_resource(&path("default/nope/1"))
        .await
        .unwrap_err();
    assert!(matches!(err, RcarError::NotFound { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "resource default/nope/1 not found at the KBS: ResourceNotFound: no such resource"
    );

    let err = client
        .get_resource(&path("default/denied/1"))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "GET /kbs/v0/resource/default/denied/1: KBS answered HTTP 403 Forbidden: \
         PolicyDeny: resource policy denied default/denied/1"
    );

    let err = client
        .get_resource(&path("default/teapot/1"))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("418") && err.to_string().contains("short and stout"),
        "{err}"
    );

    let err = client
        .get_resource(&path("default/garbage/1"))
        .await
        .unwrap_err();
    assert!(matches!(err, RcarError::BadResponse { .. }), "{err}");
    // None of these were 401s: no extra attestation.
    kbs.with(|st| assert_eq!(st.attest_calls, 1));
}

#[tokio::test]
async fn attestation_rejection_names_step_status_and_detail() {
    let kbs = MockKbs::start().await;
    let mut client = kbs.client();
    kbs.with(|st| st.reject_attest = true);
    let err = client.attest().await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "POST /kbs/v0/attest: KBS answered HTTP 401 Unauthorized: \
         AttestationFailed: evidence rejected by policy"
    );
    assert!(client.token().is_none());
}

#[tokio::test]
async fn selected_hash_algorithm_is_used_for_report_data() {
    let kbs = MockKbs::start().await;
    for hash in ["sha256", "sha512", "SHA384"] {
        kbs.with(|st| st.select_hash = Some(hash));
        let mut client = kbs.client();
        // The mock rejects evidence whose report_data is not the selected hash.
        client.attest().await.unwrap();
    }
    kbs.with(|st| st.select_hash = Some("md5"));
    let err = kbs.client().attest().await.unwrap_err();
    assert!(matches!(err, RcarError::HashAlgorithm(_)), "{err}");
}

#[tokio::test]
async fn passport_mode_sends_bearer_and_no_cookie() {
    let kbs = MockKbs::start().await;
    let mut client = kbs.client();
    let token = client.attest().await.unwrap();

    let plain = client
        .get_resource_with_token(&token, &path("default/key/1"))
        .await
        .unwrap();
    assert_eq!(plain.as_slice(), SECRET);
    kbs.with(|st| {
        assert_eq!(st.last_get_had_cookie, Some(false));
        assert_eq!(st.last_get_bearer.as_deref(), Some(token.as_str()));
    });

    let err = client
        .get_resource_with_token("garbage", &path("default/key/1"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, RcarError::Unauthorized { attempts: 1, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn rsa_key_round_trips_through_the_mock() {
    let kbs = MockKbs::start().await;
    let mut client = KbsClientBuilder::new(&kbs.url, Box::new(SampleAttester))
        .key(TeeKeyPair::new_rsa().unwrap())
        .build()
        .unwrap();
    let plain = client.get_resource(&path("default/key/1")).await.unwrap();
    assert_eq!(plain.as_slice(), SECRET);
    kbs.with(|st| {
        let att = st.last_attestation.as_ref().unwrap();
        assert_eq!(att["runtime-data"]["tee-pubkey"]["alg"], "RSA-OAEP-256");
        assert_eq!(att["init-data"], Value::Null);
    });
}

#[tokio::test]
async fn unreachable_kbs_is_a_transport_error_naming_the_step() {
    // Bind then drop a listener to get a port nobody listens on.
    let addr = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let mut client = KbsClientBuilder::new(format!("http://{addr}"), Box::new(SampleAttester))
        .build()
        .unwrap();
    let err = client.attest().await.unwrap_err();
    assert!(matches!(err, RcarError::Transport { .. }), "{err}");
    assert!(err.to_string().starts_with("POST /kbs/v0/auth: "), "{err}");
}

/// TLS in front of the same mock router, for the `--ca-file` path.
struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                continue;
            };
            // A client that rejects our certificate fails the handshake: skip it.
            if let Ok(tls) = self.acceptor.accept(tcp).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// A private CA and a `localhost` server certificate it signed.
fn private_pki() -> (String, rustls::ServerConfig) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let key_der = rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![leaf.der().clone()], key_der)
    .unwrap();
    (ca.pem(), config)
}

async fn start_tls_mock() -> (MockKbs, tempfile::NamedTempFile) {
    use std::io::Write;
    let (ca_pem, config) = private_pki();
    let mut ca_file = tempfile::NamedTempFile::new().unwrap();
    ca_file.write_all(ca_pem.as_bytes()).unwrap();

    let state = Shared::default();
    let app = axum::Router::new()
        .route("/kbs/v0/auth", post(auth))
        .route("/kbs/v0/attest", post(attest))
        .route("/kbs/v0/resource/{repo}/{kind}/{tag}", get(resource))
        .with_state(state.clone());
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://localhost:{}", tcp.local_addr().unwrap().port());
    let listener = TlsListener {
        tcp,
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
    };
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (MockKbs { url, state, task }, ca_file)
}

#[tokio::test]
async fn https_kbs_with_private_ca_needs_the_ca_file() {
    let (kbs, ca_file) = start_tls_mock().await;

    let mut client = KbsClientBuilder::new(&kbs.url, Box::new(SampleAttester))
        .ca_file(ca_file.path())
        .build()
        .unwrap();
    let plain = client.get_resource(&path("default/key/1")).await.unwrap();
    assert_eq!(plain.as_slice(), SECRET);

    // Without it the webpki roots do not know the CA.
    let mut client = KbsClientBuilder::new(&kbs.url, Box::new(SampleAttester))
        .build()
        .unwrap();
    let err = client.attest().await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, RcarError::Transport { .. }), "{msg}");
    assert!(msg.contains("certificate"), "{msg}");
}
