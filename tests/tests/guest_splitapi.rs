#![allow(clippy::unwrap_used)]
//! The guest daemon's splitapi endpoint and CDH-compatible endpoint over real sockets: a
//! real KBS, a real daemon `run` loop holding the tunnel, bundles pushed through it
//! (`install_credentials`) or pulled (`GET /kbs/v0/splitapi/credentials`), and owner
//! clients doing real mutual-TLS handshakes.
//!
//! Most tests build their bundles here with rcgen (Ed25519 and P-256 CAs) and run the KBS
//! with its splitapi plugin disabled, so only the test pushes; the last ones use the KBS's
//! own plugin end to end.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use guest_daemon::run::RunConfig;
use guest_daemon::splitapi::{SplitApiConfig, SplitApiStatus};
use guest_daemon::tee_key::TeeKeyPair;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SignatureAlgorithm,
};
use rpc_defs::{CredentialBundle, CredentialFile, GuestError, SealedResource};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_bytes::ByteBuf;
use sha2::{Digest, Sha256};
use tests::{DaemonRun, TestKbs};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tunnel::CallError;

const WAIT: Duration = Duration::from_secs(15);

fn init_data(guest_id: &str) -> String {
    format!("[tether]\nguest_id = \"{guest_id}\"\n\n[tether.labels]\nrole = \"db\"\n")
}

/// A KBS whose splitapi plugin is off: only the test pushes bundles.
async fn kbs_without_splitapi_plugin() -> TestKbs {
    TestKbs::start_with(false, |c| {
        tests::allow_sample(c);
        c.plugins.disabled.push("splitapi".into());
    })
    .await
}

fn loopback0() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A daemon `run` loop with the splitapi and CDH endpoints on loopback port 0.
struct Daemon {
    run: DaemonRun,
    state_dir: PathBuf,
    splitapi: watch::Receiver<SplitApiStatus>,
    cdh: watch::Receiver<Option<SocketAddr>>,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn spawn(kbs: &TestKbs, guest_id: &str, tweak: impl FnOnce(&mut RunConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("state");
        let mut config = kbs.daemon_config(&state_dir, Some(init_data(guest_id)));
        config.splitapi = Some(SplitApiConfig::new(loopback0()));
        config.cdh_listen = Some(loopback0());
        tweak(&mut config);
        let splitapi = config.subscribe_splitapi();
        let cdh = config.subscribe_cdh();
        Self {
            run: DaemonRun::spawn(config),
            state_dir,
            splitapi,
            cdh,
            _dir: dir,
        }
    }

    async fn connected(&mut self) {
        self.run.connected().await;
    }

    /// Waits until the endpoint serves bundle `version`; returns its address.
    async fn serving(&mut self, version: u64) -> SocketAddr {
        tokio::time::timeout(
            WAIT,
            self.splitapi.wait_for(|s| {
                s.addr.is_some() && s.bundle.as_ref().is_some_and(|b| b.version == version)
            }),
        )
        .await
        .unwrap_or_else(|_| panic!("splitapi serves version {version} in time"))
        .unwrap()
        .addr
        .unwrap()
    }

    async fn cdh_addr(&mut self) -> SocketAddr {
        tokio::time::timeout(WAIT, self.cdh.wait_for(Option::is_some))
            .await
            .unwrap()
            .unwrap()
            .unwrap()
    }

    fn tee_key(&self) -> TeeKeyPair {
        self.run.tee_key()
    }

    async fn stop(self) {
        self.run.stop().await;
    }
}

/// A sandbox CA issuing server and client certificates, as the KBS's plugin does.
struct Pki {
    alg: &'static SignatureAlgorithm,
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new(alg: &'static SignatureAlgorithm) -> Self {
        let key = KeyPair::generate_for(alg).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "test splitapi CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        Self {
            alg,
            ca_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    fn leaf(&self, sans: &[&str], server: bool) -> (String, String) {
        self.leaf_valid(sans, server, None)
    }

    /// A leaf valid only from 1 January of `years.0` to 1 January of `years.1`, when given.
    fn leaf_valid(
        &self,
        sans: &[&str],
        server: bool,
        years: Option<(i32, i32)>,
    ) -> (String, String) {
        let key = KeyPair::generate_for(self.alg).unwrap();
        let mut params =
            CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, if server { sans[0] } else { "owner" });
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        params.use_authority_key_identifier_extension = true;
        if let Some((from, to)) = years {
            params.not_before = rcgen::date_time_ymd(from, 1, 1);
            params.not_after = rcgen::date_time_ymd(to, 1, 1);
        }
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// The bundle for `guest_id`, sealed to `key` as the KBS seals it.
    fn bundle(&self, key: &TeeKeyPair, guest_id: &str, version: u64) -> CredentialBundle {
        let (crt, server_key) = self.leaf(&[guest_id, "127.0.0.1"], true);
        let files = [
            ("ca.crt", 0o644, self.ca_pem.clone()),
            ("server.crt", 0o644, crt),
            ("server.key", 0o600, server_key),
        ];
        let map: BTreeMap<String, ByteBuf> = files
            .iter()
            .map(|(n, _, pem)| ((*n).to_owned(), ByteBuf::from(pem.as_bytes().to_vec())))
            .collect();
        let mut cbor = Vec::new();
        ciborium::into_writer(&map, &mut cbor).unwrap();
        let listed: Vec<CredentialFile> = files
            .iter()
            .map(|(n, m, _)| CredentialFile {
                name: (*n).to_owned(),
                mode: *m,
            })
            .collect();
        let not_after = 4_000_000_000;
        let binding = rpc_defs::BundleBinding::new("splitapi", version, &listed, not_after);
        let bound =
            kbs_core::jwe::binding_header(rpc_defs::BUNDLE_BINDING_HEADER, &binding).unwrap();
        let jwe = kbs_core::jwe::seal_bound(&key.export_pubkey(), &cbor, &bound).unwrap();
        CredentialBundle {
            id: "splitapi".into(),
            version,
            files: listed,
            jwe: serde_json::to_vec(&jwe).unwrap(),
            not_after,
        }
    }

    fn owner(&self) -> Arc<rustls::ClientConfig> {
        client_config(&self.ca_pem, Some(self.leaf(&[], false)))
    }
}

/// A rustls client (ring) trusting `ca_pem`, presenting `client` (cert PEM, key PEM) if any.
fn client_config(ca_pem: &str, client: Option<(String, String)>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(ca.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    Arc::new(match client {
        Some((crt, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(crt.as_bytes())
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    })
}

/// One HTTP/1.1 request over TLS to `addr`, verifying the server as `server_name`. A
/// refused client certificate is an `Err` (TLS 1.3 delivers the server's alert after the
/// client's side of the handshake).
async fn request(
    addr: SocketAddr,
    server_name: &str,
    config: Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    body: &[u8],
) -> std::io::Result<(u16, serde_json::Value)> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = ServerName::try_from(server_name.to_owned()).unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {server_name}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).await?;
    tls.write_all(body).await?;
    tls.flush().await?;
    let mut response = Vec::new();
    tls.read_to_end(&mut response).await?;
    let text = String::from_utf8(response).unwrap();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("HTTP response: {text:?}"));
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    Ok((status, serde_json::from_str(body).unwrap_or_default()))
}

/// True when `e` is the TLS alert a server sends when it refuses the client's certificate.
fn refused_by_tls(e: &std::io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|e| matches!(e, rustls::Error::AlertReceived(_)))
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn sealed(key: &TeeKeyPair, uri: &str, version: u64, plaintext: &[u8]) -> SealedResource {
    let sha256 = format!("{:x}", Sha256::digest(plaintext));
    let binding = rpc_defs::ResourceBinding {
        sha256: sha256.clone(),
        uri: uri.to_owned(),
        version,
    };
    let bound = kbs_core::jwe::binding_header(rpc_defs::RESOURCE_BINDING_HEADER, &binding).unwrap();
    let jwe = kbs_core::jwe::seal_bound(&key.export_pubkey(), plaintext, &bound).unwrap();
    SealedResource {
        uri: uri.to_owned(),
        version,
        jwe: serde_json::to_vec(&jwe).unwrap(),
        sha256,
    }
}

#[tokio::test]
async fn a_pushed_bundle_starts_mutual_tls_and_a_new_ca_is_hot_reloaded() {
    let kbs = kbs_without_splitapi_plugin().await;
    // A port of our choosing (free now), so that "nothing listens" is a connection attempt.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut daemon = Daemon::spawn(&kbs, "sa-mtls", |c| {
        c.splitapi = Some(SplitApiConfig::new(port));
    });
    daemon.connected().await;
    let handle = kbs.tunnel("sa-mtls").await;
    assert!(
        handle.services.iter().any(|s| s == "splitapi"),
        "the daemon announces splitapi: {:?}",
        handle.services
    );
    let refused = tokio::net::TcpStream::connect(port).await.unwrap_err();
    assert_eq!(
        refused.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "no listener before a bundle"
    );

    // Version 1: an Ed25519 CA, pushed over the tunnel.
    let first = Pki::new(&rcgen::PKCS_ED25519);
    let installed = handle
        .install_credentials(first.bundle(&daemon.tee_key(), "sa-mtls", 1), None)
        .await
        .unwrap();
    assert!(!installed.already_held);
    let addr = daemon.serving(1).await;
    assert_eq!(addr, port, "the endpoint listens where it was told to");

    // The owner's certificate from this sandbox's CA gets through; the server is verified
    // as the guest_id (DNS SAN) and as its IP (IP SAN).
    for name in ["sa-mtls", "127.0.0.1"] {
        let (status, body) = request(addr, name, first.owner(), "GET", "/splitapi/v1/status", b"")
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["guest"]["guest_id"], "sa-mtls",
            "identity from attestation"
        );
        assert_eq!(body["credentials"]["version"], 1);
        assert_eq!(body["credentials"]["not_after"], 4_000_000_000u64);
    }
    // No client certificate, or one from another CA: refused in the TLS handshake.
    let err = request(
        addr,
        "sa-mtls",
        client_config(&first.ca_pem, None),
        "GET",
        "/splitapi/v1/status",
        b"",
    )
    .await
    .unwrap_err();
    assert!(refused_by_tls(&err), "no client certificate: {err}");
    let other = Pki::new(&rcgen::PKCS_ED25519);
    let foreign = client_config(&first.ca_pem, Some(other.leaf(&[], false)));
    let err = request(addr, "sa-mtls", foreign, "GET", "/splitapi/v1/status", b"")
        .await
        .unwrap_err();
    assert!(
        refused_by_tls(&err),
        "client certificate of another CA: {err}"
    );
    // A self-signed client certificate is no better.
    let selfsigned = rcgen::generate_simple_self_signed(vec!["owner".to_owned()]).unwrap();
    let config = client_config(
        &first.ca_pem,
        Some((
            selfsigned.cert.pem(),
            selfsigned.signing_key.serialize_pem(),
        )),
    );
    let err = request(addr, "sa-mtls", config, "GET", "/splitapi/v1/status", b"")
        .await
        .unwrap_err();
    assert!(
        refused_by_tls(&err),
        "self-signed client certificate: {err}"
    );
    // An expired certificate from the right CA too.
    let expired = first.leaf_valid(&[], false, Some((2020, 2021)));
    let config = client_config(&first.ca_pem, Some(expired));
    let err = request(addr, "sa-mtls", config, "GET", "/splitapi/v1/status", b"")
        .await
        .unwrap_err();
    assert!(refused_by_tls(&err), "expired client certificate: {err}");

    // Version 2: a new (P-256) CA. Same listener; the old owner certificate is refused.
    let second = Pki::new(&rcgen::PKCS_ECDSA_P256_SHA256);
    handle
        .install_credentials(second.bundle(&daemon.tee_key(), "sa-mtls", 2), None)
        .await
        .unwrap();
    assert_eq!(daemon.serving(2).await, addr, "the listener is kept");
    let old_owner = client_config(&second.ca_pem, Some(first.leaf(&[], false)));
    let err = request(
        addr,
        "sa-mtls",
        old_owner,
        "GET",
        "/splitapi/v1/status",
        b"",
    )
    .await
    .unwrap_err();
    assert!(
        refused_by_tls(&err),
        "old client certificate after the reload: {err}"
    );
    let (status, body) = request(
        addr,
        "sa-mtls",
        second.owner(),
        "GET",
        "/splitapi/v1/status",
        b"",
    )
    .await
    .unwrap();
    assert_eq!(
        (status, &body["credentials"]["version"]),
        (200, &serde_json::json!(2))
    );
    // The client trusting only the old CA no longer accepts the server either.
    let err = request(
        addr,
        "sa-mtls",
        first.owner(),
        "GET",
        "/splitapi/v1/status",
        b"",
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("certificate"), "{err}");
    // Replaying version 1 is a downgrade, refused by the guest.
    let err = handle
        .install_credentials(first.bundle(&daemon.tee_key(), "sa-mtls", 1), None)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            CallError::Guest(GuestError::Downgrade {
                held: 2,
                offered: 1
            })
        ),
        "{err}"
    );
    daemon.stop().await;
}

#[tokio::test]
async fn the_owner_puts_secrets_that_land_0600_atomically_and_versioned() {
    let kbs = kbs_without_splitapi_plugin().await;
    let mut daemon = Daemon::spawn(&kbs, "sa-secrets", |_| {});
    daemon.connected().await;
    let handle = kbs.tunnel("sa-secrets").await;
    let pki = Pki::new(&rcgen::PKCS_ECDSA_P256_SHA256);
    handle
        .install_credentials(pki.bundle(&daemon.tee_key(), "sa-secrets", 1), None)
        .await
        .unwrap();
    let addr = daemon.serving(1).await;
    let owner = pki.owner();

    let (status, body) = request(
        addr,
        "sa-secrets",
        owner.clone(),
        "PUT",
        "/splitapi/v1/secrets/db-password",
        b"hunter2",
    )
    .await
    .unwrap();
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["version"], 1);
    assert_eq!(body["sha256"], format!("{:x}", Sha256::digest(b"hunter2")));
    let secrets = daemon.state_dir.join("secrets");
    let file = secrets.join("db-password");
    assert_eq!(body["path"], file.display().to_string());
    assert_eq!(std::fs::read(&file).unwrap(), b"hunter2");
    assert_eq!(mode(&file), 0o600);
    assert_eq!(mode(&secrets), 0o700);

    let (status, body) = request(
        addr,
        "sa-secrets",
        owner.clone(),
        "PUT",
        "/splitapi/v1/secrets/db-password",
        b"correct horse",
    )
    .await
    .unwrap();
    assert_eq!((status, &body["version"]), (200, &serde_json::json!(2)));
    assert_eq!(std::fs::read(&file).unwrap(), b"correct horse");
    assert_eq!(mode(&file), 0o600);
    // Only the stable link, the held version and its metadata: no temp file, no old version.
    let mut names: Vec<String> = std::fs::read_dir(&secrets)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["db-password", "db-password@v2", "db-password@v2.json"]
    );

    let (status, body) = request(
        addr,
        "sa-secrets",
        owner.clone(),
        "GET",
        "/splitapi/v1/status",
        b"",
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    assert_eq!(body["secrets"][0]["name"], "db-password");
    assert_eq!(body["secrets"][0]["version"], 2);
    assert_eq!(body["secrets_dir"], secrets.display().to_string());
    assert!(!body.to_string().contains("correct horse"));

    // Bad names and oversize bodies: JSON errors, nothing stored.
    let (status, body) = request(
        addr,
        "sa-secrets",
        owner.clone(),
        "PUT",
        "/splitapi/v1/secrets/..",
        b"x",
    )
    .await
    .unwrap();
    assert_eq!(status, 400, "{body}");
    let big = vec![b'x'; guest_daemon::splitapi::MAX_SECRET_BYTES + 1];
    let (status, body) = request(
        addr,
        "sa-secrets",
        owner.clone(),
        "PUT",
        "/splitapi/v1/secrets/big",
        &big,
    )
    .await
    .unwrap();
    assert_eq!(
        (status, &body["error"]),
        (413, &serde_json::json!("too_large"))
    );
    assert!(!secrets.join("big").exists());
    // Secrets are the owner's: the KBS's probe does not list them.
    let held = handle
        .probe(rpc_defs::ProbeKind::Resources, None)
        .await
        .unwrap()
        .resources
        .unwrap();
    assert!(
        held.iter().all(|h| !h.uri.contains("db-password")),
        "{held:?}"
    );
    daemon.stop().await;
}

#[tokio::test]
async fn cdh_serves_the_latest_version_and_the_hook_status_reaches_the_kbs() {
    let kbs = kbs_without_splitapi_plugin().await;
    let hook_log = tempfile::NamedTempFile::new().unwrap();
    let hook = format!(
        "echo \"$TETHER_RESOURCE $TETHER_VERSION\" >> '{}'; exit 3",
        hook_log.path().display()
    );
    let mut daemon = Daemon::spawn(&kbs, "sa-cdh", |c| {
        c.hook = Some(guest_daemon::hook::PostApplyHook::new(hook));
    });
    daemon.connected().await;
    let cdh = daemon.cdh_addr().await;
    assert!(cdh.ip().is_loopback());
    let handle = kbs.tunnel("sa-cdh").await;
    let key = daemon.tee_key();
    let http = tests::http_client(None);
    let url = format!("http://{cdh}/cdh/resource/default/db/password");

    let resp = http.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "not_found");

    let applied = handle
        .apply_resource(sealed(&key, "default/db/password", 1, b"pw-1"), None)
        .await
        .unwrap();
    assert_eq!(
        applied.hook_status,
        Some(3),
        "the hook's exit status is in the ack"
    );
    let resp = http.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(&resp.bytes().await.unwrap()[..], b"pw-1");

    let applied = handle
        .apply_resource(sealed(&key, "default/db/password", 2, b"pw-2"), None)
        .await
        .unwrap();
    assert_eq!((applied.version, applied.hook_status), (2, Some(3)));
    let resp = http.get(&url).send().await.unwrap();
    assert_eq!(resp.headers()["x-tether-version"], "2");
    assert_eq!(&resp.bytes().await.unwrap()[..], b"pw-2");
    assert_eq!(
        std::fs::read(daemon.state_dir.join("resources/default/db/password")).unwrap(),
        b"pw-2"
    );

    // A replay runs no hook; a downgrade is refused and changes nothing.
    let replay = handle
        .apply_resource(sealed(&key, "default/db/password", 2, b"pw-2"), None)
        .await
        .unwrap();
    assert_eq!((replay.already_held, replay.hook_status), (true, None));
    let err = handle
        .apply_resource(sealed(&key, "default/db/password", 1, b"pw-1"), None)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            CallError::Guest(GuestError::Downgrade {
                held: 2,
                offered: 1
            })
        ),
        "{err}"
    );
    let resp = http.get(&url).send().await.unwrap();
    assert_eq!(&resp.bytes().await.unwrap()[..], b"pw-2");
    assert_eq!(
        std::fs::read_to_string(hook_log.path()).unwrap(),
        "default/db/password 1\ndefault/db/password 2\n"
    );
    daemon.stop().await;
}

#[tokio::test]
async fn without_splitapi_the_daemon_does_not_announce_it_or_listen() {
    let kbs = kbs_without_splitapi_plugin().await;
    let mut daemon = Daemon::spawn(&kbs, "sa-off", |c| {
        c.splitapi = None;
        c.cdh_listen = None;
    });
    daemon.connected().await;
    let handle = kbs.tunnel("sa-off").await;
    assert!(
        handle.services.iter().all(|s| s != "splitapi"),
        "{:?}",
        handle.services
    );
    // A bundle is still stored, but nothing listens.
    let pki = Pki::new(&rcgen::PKCS_ED25519);
    handle
        .install_credentials(pki.bundle(&daemon.tee_key(), "sa-off", 1), None)
        .await
        .unwrap();
    assert!(
        daemon
            .state_dir
            .join("credentials/splitapi/server.key")
            .exists()
    );
    assert_eq!(*daemon.splitapi.borrow(), SplitApiStatus::default());
    assert_eq!(*daemon.cdh.borrow(), None);
    daemon.stop().await;
}

/// The owner example itself, driven by the end-to-end tests below.
#[allow(dead_code)]
#[path = "../../examples/splitapi_owner.rs"]
mod owner;

/// A KBS with its splitapi plugin on and a policy that lets the sample TEE through.
async fn kbs_with_splitapi_plugin() -> TestKbs {
    let kbs = TestKbs::start().await;
    kbs.admin().set_policy(tests::ALLOW_SAMPLE).await.unwrap();
    kbs
}

/// Waits until the endpoint serves some bundle; returns its address and version.
async fn serving_any(daemon: &mut Daemon) -> (SocketAddr, u64) {
    let status = tokio::time::timeout(
        WAIT,
        daemon
            .splitapi
            .wait_for(|s| s.addr.is_some() && s.bundle.is_some()),
    )
    .await
    .expect("the KBS pushes a bundle and the endpoint starts")
    .unwrap()
    .clone();
    (status.addr.unwrap(), status.bundle.unwrap().version)
}

#[tokio::test]
async fn end_to_end_the_kbs_pushes_on_connect_and_the_owner_example_delivers_a_secret() {
    let kbs = kbs_with_splitapi_plugin().await;
    let mut daemon = Daemon::spawn(&kbs, "sa-e2e", |_| {});
    daemon.connected().await;
    let (addr, version) = serving_any(&mut daemon).await;

    // The owner's files, as `kbsctl splitapi client-creds sa-e2e --out DIR` writes them.
    let creds = tempfile::tempdir().unwrap();
    let bundle = kbs.admin().splitapi_client_creds("sa-e2e").await.unwrap();
    assert_eq!(bundle.version, version);
    bundle.write_to(creds.path()).unwrap();

    let client = owner::OwnerClient::from_dir(creds.path(), "sa-e2e", addr).unwrap();
    let stored = client
        .put_secret("api-token", b"tok-123".to_vec())
        .await
        .unwrap();
    assert_eq!(stored["version"], 1);
    let file = daemon.state_dir.join("secrets/api-token");
    assert_eq!(std::fs::read(&file).unwrap(), b"tok-123");
    assert_eq!(mode(&file), 0o600);
    let status = client.status().await.unwrap();
    assert_eq!(status["guest"]["guest_id"], "sa-e2e");
    assert_eq!(status["credentials"]["version"], version);
    assert_eq!(status["secrets"][0]["name"], "api-token");

    // The server certificate names this sandbox only: verifying it as another name fails.
    let wrong = owner::OwnerClient::from_dir(creds.path(), "sa-other", addr).unwrap();
    assert!(wrong.status().await.is_err());

    // Another sandbox's owner credentials are refused by this one.
    let mut other = Daemon::spawn(&kbs, "sa-e2e-other", |_| {});
    other.connected().await;
    serving_any(&mut other).await;
    let other_creds = tempfile::tempdir().unwrap();
    let other_bundle = kbs
        .admin()
        .splitapi_client_creds("sa-e2e-other")
        .await
        .unwrap();
    other_bundle.write_to(other_creds.path()).unwrap();
    let foreign = client_config(
        &bundle.ca_crt,
        Some((
            other_bundle.client_crt.clone(),
            other_bundle.client_key.clone(),
        )),
    );
    let err = request(addr, "sa-e2e", foreign, "GET", "/splitapi/v1/status", b"")
        .await
        .unwrap_err();
    assert!(refused_by_tls(&err), "{err}");
    other.stop().await;
    daemon.stop().await;
}

#[tokio::test]
async fn a_guest_without_a_tunnel_pulls_its_bundle_and_serves_it() {
    use guest_daemon::evidence::SampleAttester;
    use guest_daemon::rcar::KbsClientBuilder;
    use guest_daemon::service::GuestDaemonService;
    use guest_daemon::store::StateStore;

    let kbs = kbs_with_splitapi_plugin().await;
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path()).unwrap();
    let key = store.load_or_create_tee_key(TeeKeyPair::new_ec).unwrap();
    let mut client = KbsClientBuilder::new(&kbs.url, Box::new(SampleAttester))
        .key(key.clone())
        .init_data(init_data("sa-pull"))
        .build()
        .unwrap();
    let service = GuestDaemonService::new(Arc::new(store), key, None);

    let installed = guest_daemon::splitapi::pull::pull(&mut client, &service)
        .await
        .unwrap();
    assert_eq!(installed.id, "splitapi");
    assert!(!installed.already_held);
    let bundle_dir = dir.path().join("credentials/splitapi");
    assert_eq!(mode(&bundle_dir.join("server.key")), 0o600);
    assert_eq!(mode(&bundle_dir.join("ca.crt")), 0o644);
    // Pulling again is a replay.
    let again = guest_daemon::splitapi::pull::pull(&mut client, &service)
        .await
        .unwrap();
    assert!(again.already_held);
    assert_eq!(again.version, installed.version);

    // The pulled bundle serves the endpoint exactly as a pushed one.
    let (status_tx, mut status) = watch::channel(SplitApiStatus::default());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(guest_daemon::splitapi::run(
        SplitApiConfig::new(loopback0()),
        service.clone(),
        watch::channel(guest_daemon::splitapi::GuestIdentity::default()).1,
        status_tx,
        shutdown.clone(),
    ));
    let addr = tokio::time::timeout(WAIT, status.wait_for(|s| s.addr.is_some()))
        .await
        .unwrap()
        .unwrap()
        .addr
        .unwrap();
    let creds = tempfile::tempdir().unwrap();
    kbs.admin()
        .splitapi_client_creds("sa-pull")
        .await
        .unwrap()
        .write_to(creds.path())
        .unwrap();
    let owner = owner::OwnerClient::from_dir(creds.path(), "sa-pull", addr).unwrap();
    let status_body = owner.status().await.unwrap();
    assert_eq!(status_body["credentials"]["version"], installed.version);
    shutdown.cancel();
    tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
}

/// `dir` (and everything under it) read-only for this process until dropped: modes 0500
/// when that stops writes; as root (which ignores modes) a read-only bind mount of `dir`
/// onto itself. `None` when neither works here.
struct ReadOnly {
    dir: PathBuf,
    mounted: bool,
}

impl ReadOnly {
    fn new(dir: &Path) -> Option<Self> {
        fn chmod_tree(dir: &Path, mode: u32) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let entry = entry.unwrap();
                if entry.file_type().unwrap().is_dir() {
                    chmod_tree(&entry.path(), mode);
                }
            }
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        chmod_tree(dir, 0o500);
        if std::fs::File::create(dir.join("probe")).is_err() {
            return Some(Self {
                dir: dir.to_owned(),
                mounted: false,
            });
        }
        let _ = std::fs::remove_file(dir.join("probe"));
        chmod_tree(dir, 0o700);
        let mount = |args: &[&str]| {
            std::process::Command::new("mount")
                .args(args)
                .arg(dir)
                .arg(dir)
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !mount(&["--bind"]) {
            return None;
        }
        let guard = Self {
            dir: dir.to_owned(),
            mounted: true,
        };
        mount(&["-o", "remount,bind,ro"]).then_some(guard)
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        if self.mounted {
            let _ = std::process::Command::new("umount").arg(&self.dir).status();
        } else {
            let _ = std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700));
            for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
                let _ =
                    std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o700));
            }
        }
    }
}

#[tokio::test]
async fn an_apply_into_a_read_only_state_dir_reports_the_reason_to_the_kbs() {
    let kbs = kbs_without_splitapi_plugin().await;
    let mut daemon = Daemon::spawn(&kbs, "sa-ro", |c| {
        c.splitapi = None;
    });
    daemon.connected().await;
    let cdh = daemon.cdh_addr().await;
    let handle = kbs.tunnel("sa-ro").await;
    let key = daemon.tee_key();
    handle
        .apply_resource(sealed(&key, "default/app/cfg", 1, b"v1"), None)
        .await
        .unwrap();
    let resources = daemon.state_dir.join("resources");
    let Some(read_only) = ReadOnly::new(&resources) else {
        tests::skip(
            "an_apply_into_a_read_only_state_dir_reports_the_reason_to_the_kbs",
            "cannot make a directory read-only (not root, or no mount)",
        );
        daemon.stop().await;
        return;
    };
    let err = handle
        .apply_resource(sealed(&key, "default/app/cfg", 2, b"v2"), None)
        .await
        .unwrap_err();
    let CallError::Guest(GuestError::Storage(reason)) = &err else {
        panic!("expected a storage error, got {err:?}");
    };
    assert!(
        reason.contains(&resources.display().to_string())
            && (reason.contains("Read-only file system") || reason.contains("ermission denied")),
        "{reason}"
    );
    // Version 1 is still what the workload reads, from the file and from the CDH endpoint.
    assert_eq!(
        std::fs::read(resources.join("default/app/cfg")).unwrap(),
        b"v1"
    );
    let body = tests::http_client(None)
        .get(format!("http://{cdh}/cdh/resource/default/app/cfg"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(&body[..], b"v1");
    drop(read_only);
    let applied = handle
        .apply_resource(sealed(&key, "default/app/cfg", 2, b"v2"), None)
        .await
        .unwrap();
    assert_eq!(applied.version, 2);
    daemon.stop().await;
}

/// Figures for the README: push-to-installed latency over a real tunnel (the KBS's
/// `install_credentials` round trip: unseal, write, fsync, commit) and push-to-serving (until
/// the endpoint's TLS uses the new bundle). `cargo nextest run -p tests --test guest_splitapi
/// --run-ignored only --no-capture push_latency`
#[tokio::test]
#[ignore = "benchmark"]
async fn push_latency() {
    const PUSHES: u64 = 200;
    let kbs = kbs_without_splitapi_plugin().await;
    let mut daemon = Daemon::spawn(&kbs, "sa-bench", |_| {});
    daemon.connected().await;
    let handle = kbs.tunnel("sa-bench").await;
    let key = daemon.tee_key();
    for alg in [&rcgen::PKCS_ED25519, &rcgen::PKCS_ECDSA_P256_SHA256] {
        let pki = Pki::new(alg);
        let first = daemon
            .splitapi
            .borrow()
            .bundle
            .as_ref()
            .map_or(0, |b| b.version)
            + 1;
        let bundles: Vec<_> = (first..first + PUSHES)
            .map(|v| pki.bundle(&key, "sa-bench", v))
            .collect();
        let (mut installed, mut serving) = (Vec::new(), Vec::new());
        for bundle in bundles {
            let version = bundle.version;
            let started = std::time::Instant::now();
            handle.install_credentials(bundle, None).await.unwrap();
            installed.push(started.elapsed());
            daemon.serving(version).await;
            serving.push(started.elapsed());
        }
        let pct = |v: &mut Vec<Duration>, p: f64| {
            v.sort();
            v[((v.len() as f64 - 1.0) * p).round() as usize]
        };
        println!(
            "{alg:?}: {PUSHES} pushes: installed p50 {:?} p99 {:?}; serving p50 {:?} p99 {:?}",
            pct(&mut installed, 0.5),
            pct(&mut installed, 0.99),
            pct(&mut serving, 0.5),
            pct(&mut serving, 0.99),
        );
    }
    daemon.stop().await;
}
