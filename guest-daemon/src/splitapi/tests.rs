#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SignatureAlgorithm,
};
use rpc_defs::{CredentialBundle, CredentialFile, GuestError};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_bytes::ByteBuf;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

use super::*;
use crate::service::GuestDaemonService;
use crate::store::{BundleFile, StateStore};
use crate::tee_key::TeeKeyPair;
use crate::tee_key::seal::seal_bound;

const WAIT: Duration = Duration::from_secs(15);

/// A CA that issues server and client certificates, as the KBS's splitapi plugin does.
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
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        Self {
            alg,
            ca_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// (certificate PEM, key PEM) of a leaf for `sans`.
    fn leaf(&self, sans: &[&str], server: bool) -> (String, String) {
        let key = KeyPair::generate_for(self.alg).unwrap();
        let mut params =
            CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, if server { "guest" } else { "owner" });
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn server_files(&self) -> Vec<(String, u32, Vec<u8>)> {
        let (crt, key) = self.leaf(&["guest-1", "127.0.0.1"], true);
        vec![
            ("ca.crt".into(), 0o644, self.ca_pem.clone().into_bytes()),
            ("server.crt".into(), 0o644, crt.into_bytes()),
            ("server.key".into(), 0o600, key.into_bytes()),
        ]
    }

    /// A client TLS configuration trusting this CA and presenting `client` (if any).
    fn client_config(&self, client: Option<(String, String)>) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.ca_pem.as_bytes()).unwrap())
            .unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let config = match client {
            Some((crt, key)) => builder
                .with_client_auth_cert(
                    vec![CertificateDer::from_pem_slice(crt.as_bytes()).unwrap()],
                    PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        Arc::new(config)
    }

    fn owner(&self) -> Arc<rustls::ClientConfig> {
        self.client_config(Some(self.leaf(&[], false)))
    }
}

fn bundle_files(files: &[(String, u32, Vec<u8>)]) -> Vec<BundleFile> {
    files
        .iter()
        .map(|(n, m, c)| BundleFile {
            name: n.clone(),
            mode: *m,
            contents: Zeroizing::new(c.clone()),
        })
        .collect()
}

fn sealed_bundle(
    key: &TeeKeyPair,
    version: u64,
    files: &[(String, u32, Vec<u8>)],
) -> CredentialBundle {
    let map: BTreeMap<String, ByteBuf> = files
        .iter()
        .map(|(n, _, b)| (n.clone(), ByteBuf::from(b.clone())))
        .collect();
    let mut cbor = Vec::new();
    ciborium::into_writer(&map, &mut cbor).unwrap();
    let listed: Vec<CredentialFile> = files
        .iter()
        .map(|(n, m, _)| CredentialFile {
            name: n.clone(),
            mode: *m,
        })
        .collect();
    let binding = rpc_defs::BundleBinding::new(BUNDLE_ID, version, &listed, 4_000_000_000);
    let bound = serde_json::Map::from_iter([(
        rpc_defs::BUNDLE_BINDING_HEADER.to_owned(),
        serde_json::to_value(binding).unwrap(),
    )]);
    CredentialBundle {
        id: BUNDLE_ID.into(),
        version,
        files: listed,
        jwe: serde_json::to_vec(&seal_bound(&key.export_pubkey(), &cbor, &bound)).unwrap(),
        not_after: 4_000_000_000,
    }
}

#[test]
fn bundles_of_both_key_types_make_a_server_config() {
    for alg in [&rcgen::PKCS_ED25519, &rcgen::PKCS_ECDSA_P256_SHA256] {
        let pki = Pki::new(alg);
        let config = tls::server_config(&bundle_files(&pki.server_files())).unwrap();
        assert_eq!(
            config.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
    }
}

#[test]
fn unusable_bundles_are_refused_with_the_reason() {
    let pki = Pki::new(&rcgen::PKCS_ED25519);
    let files = pki.server_files();
    // A key that does not belong to the certificate.
    let mut other_key = files.clone();
    other_key[2].2 = KeyPair::generate_for(&rcgen::PKCS_ED25519)
        .unwrap()
        .serialize_pem()
        .into_bytes();
    let err = tls::server_config(&bundle_files(&other_key)).unwrap_err();
    assert!(
        err.to_string().contains("server.crt and server.key"),
        "{err}"
    );
    // Missing file, garbage certificate, garbage key.
    let err = tls::server_config(&bundle_files(&files[..2])).unwrap_err();
    assert!(
        matches!(err, tls::BundleError::Missing("server.key")),
        "{err}"
    );
    let mut garbage = files.clone();
    garbage[0].2 = b"not a certificate".to_vec();
    let err = tls::server_config(&bundle_files(&garbage)).unwrap_err();
    assert!(err.to_string().starts_with("ca.crt"), "{err}");
    let mut garbage = files.clone();
    garbage[2].2 = b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".to_vec();
    let err = tls::server_config(&bundle_files(&garbage)).unwrap_err();
    assert!(!err.to_string().contains("AAAA"), "{err}");
}

struct Guest {
    _dir: tempfile::TempDir,
    key: TeeKeyPair,
    svc: GuestDaemonService,
    status: watch::Receiver<SplitApiStatus>,
    identity: watch::Sender<GuestIdentity>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn guest(max_secret_bytes: usize) -> Guest {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(StateStore::open(dir.path().join("state")).unwrap());
    let key = store.load_or_create_tee_key(TeeKeyPair::new_ec).unwrap();
    let svc = GuestDaemonService::new(store, key.clone(), None);
    let (identity, identity_rx) = watch::channel(GuestIdentity {
        guest_id: Some("guest-1".into()),
        instance_id: "i-1".into(),
        daemon_version: "test".into(),
        tee: "sample".into(),
    });
    let (status_tx, status) = watch::channel(SplitApiStatus::default());
    let shutdown = CancellationToken::new();
    let config = SplitApiConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        max_secret_bytes,
    };
    let task = tokio::spawn(run(
        config,
        svc.clone(),
        identity_rx,
        status_tx,
        shutdown.clone(),
    ));
    Guest {
        _dir: dir,
        key,
        svc,
        status,
        identity,
        shutdown,
        task,
    }
}

impl Guest {
    /// Waits until the endpoint serves bundle `version`; returns its address.
    async fn serving(&mut self, version: u64) -> SocketAddr {
        let status = tokio::time::timeout(
            WAIT,
            self.status.wait_for(|s| {
                s.addr.is_some() && s.bundle.as_ref().is_some_and(|b| b.version == version)
            }),
        )
        .await
        .expect("endpoint serves in time")
        .unwrap()
        .clone();
        status.addr.unwrap()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .unwrap()
            .unwrap();
    }
}

/// One HTTP/1.1 request over mutual TLS; (status, body) or the I/O error (a refused
/// handshake shows up here: in TLS 1.3 the server's alert arrives after the client's
/// handshake has finished).
async fn request(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    body: &[u8],
) -> std::io::Result<(u16, serde_json::Value)> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let name = ServerName::try_from("guest-1").unwrap();
    let mut tls = connector.connect(name, tcp).await?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: guest-1\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).await?;
    tls.write_all(body).await?;
    tls.flush().await?;
    let mut response = Vec::new();
    tls.read_to_end(&mut response).await?;
    let text = String::from_utf8(response).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let json = serde_json::from_str(body).unwrap_or(serde_json::Value::Null);
    Ok((status, json))
}

fn is_tls_alert(e: &std::io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|e| matches!(e, rustls::Error::AlertReceived(_)))
}

#[tokio::test]
async fn the_endpoint_starts_on_install_and_serves_the_owner_api() {
    let mut g = guest(64);
    let pki = Pki::new(&rcgen::PKCS_ED25519);
    // Nothing listens before a bundle is held.
    assert_eq!(g.status.borrow().addr, None);
    let installed = g
        .svc
        .install(sealed_bundle(&g.key, 1, &pki.server_files()))
        .await
        .unwrap();
    assert!(!installed.already_held);
    let addr = g.serving(1).await;

    let owner = pki.owner();
    let (status, body) = request(addr, owner.clone(), "GET", "/splitapi/v1/status", b"")
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["guest"]["guest_id"], "guest-1");
    assert_eq!(body["guest"]["tee"], "sample");
    assert_eq!(body["credentials"]["id"], "splitapi");
    assert_eq!(body["credentials"]["version"], 1);
    assert_eq!(body["credentials"]["serving_version"], 1);
    assert_eq!(body["credentials"]["not_after"], 4_000_000_000u64);
    assert_eq!(body["credentials"]["expired"], false);
    assert_eq!(body["secrets"], serde_json::json!([]));

    // The identity follows the daemon's attestation.
    g.identity
        .send_modify(|i| i.guest_id = Some("guest-2".into()));
    let (_, body) = request(addr, owner.clone(), "GET", "/splitapi/v1/status", b"")
        .await
        .unwrap();
    assert_eq!(body["guest"]["guest_id"], "guest-2");

    // PUT stores a 0600 file, versioned; a re-put is a new version.
    let (status, body) = request(
        addr,
        owner.clone(),
        "PUT",
        "/splitapi/v1/secrets/db-password",
        b"s3cret",
    )
    .await
    .unwrap();
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["version"], 1);
    assert_eq!(body["size"], 6);
    let file = g.svc.store().secret_file("db-password");
    assert_eq!(body["path"], file.display().to_string());
    assert_eq!(std::fs::read(&file).unwrap(), b"s3cret");
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let (status, body) = request(
        addr,
        owner.clone(),
        "PUT",
        "/splitapi/v1/secrets/db-password",
        b"n3w",
    )
    .await
    .unwrap();
    assert_eq!((status, &body["version"]), (200, &serde_json::json!(2)));
    assert_eq!(std::fs::read(&file).unwrap(), b"n3w");
    let (_, body) = request(addr, owner.clone(), "GET", "/splitapi/v1/status", b"")
        .await
        .unwrap();
    assert_eq!(body["secrets"][0]["name"], "db-password");
    assert_eq!(body["secrets"][0]["version"], 2);
    assert!(
        !body.to_string().contains("n3w"),
        "status never shows a secret"
    );

    // Bad input: clear JSON errors, nothing stored.
    let (status, body) = request(
        addr,
        owner.clone(),
        "PUT",
        "/splitapi/v1/secrets/a%20b",
        b"x",
    )
    .await
    .unwrap();
    assert_eq!(
        (status, &body["error"]),
        (400, &serde_json::json!("invalid_name"))
    );
    let (status, body) = request(addr, owner.clone(), "PUT", "/splitapi/v1/secrets/..", b"x")
        .await
        .unwrap();
    assert_eq!(status, 400, "{body}");
    let (status, body) = request(
        addr,
        owner.clone(),
        "PUT",
        "/splitapi/v1/secrets/big",
        &[b'x'; 65],
    )
    .await
    .unwrap();
    assert_eq!(
        (status, &body["error"]),
        (413, &serde_json::json!("too_large"))
    );
    assert!(g.svc.store().get_secret("big").unwrap().is_none());
    let (status, body) = request(addr, owner.clone(), "GET", "/splitapi/v1/nope", b"")
        .await
        .unwrap();
    assert_eq!(
        (status, &body["error"]),
        (404, &serde_json::json!("not_found"))
    );
    let (status, body) = request(addr, owner.clone(), "DELETE", "/splitapi/v1/status", b"")
        .await
        .unwrap();
    assert_eq!(
        (status, &body["error"]),
        (405, &serde_json::json!("method_not_allowed"))
    );
    assert_eq!(g.svc.store().held_secrets().len(), 1);
    g.stop().await;
}

#[tokio::test]
async fn only_clients_of_the_sandbox_ca_get_through_and_reload_swaps_the_ca() {
    let mut g = guest(1024);
    let first = Pki::new(&rcgen::PKCS_ECDSA_P256_SHA256);
    g.svc
        .install(sealed_bundle(&g.key, 1, &first.server_files()))
        .await
        .unwrap();
    let addr = g.serving(1).await;

    let (status, _) = request(addr, first.owner(), "GET", "/splitapi/v1/status", b"")
        .await
        .unwrap();
    assert_eq!(status, 200);
    // No client certificate, or one from another CA: refused in the handshake.
    let err = request(
        addr,
        first.client_config(None),
        "GET",
        "/splitapi/v1/status",
        b"",
    )
    .await
    .unwrap_err();
    assert!(is_tls_alert(&err), "{err}");
    let stranger = Pki::new(&rcgen::PKCS_ECDSA_P256_SHA256);
    let foreign = first.client_config(Some(stranger.leaf(&[], false)));
    let err = request(addr, foreign, "GET", "/splitapi/v1/status", b"")
        .await
        .unwrap_err();
    assert!(is_tls_alert(&err), "{err}");

    // A connection made under the old credentials stays usable until the reload...
    let old_owner = first.owner();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut kept = tokio_rustls::TlsConnector::from(old_owner.clone())
        .connect(ServerName::try_from("guest-1").unwrap(), tcp)
        .await
        .unwrap();
    kept.write_all(b"GET /splitapi/v1/status HTTP/1.1\r\nhost: guest-1\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 12];
    kept.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"HTTP/1.1 200");

    // Hot reload with a new CA (Ed25519 this time), on the same address.
    let second = Pki::new(&rcgen::PKCS_ED25519);
    g.svc
        .install(sealed_bundle(&g.key, 2, &second.server_files()))
        .await
        .unwrap();
    assert_eq!(g.serving(2).await, addr, "the listener is kept");
    let err = request(
        addr,
        second.client_config(Some(first.leaf(&[], false))),
        "GET",
        "/splitapi/v1/status",
        b"",
    )
    .await
    .unwrap_err();
    assert!(is_tls_alert(&err), "old client certificate refused: {err}");
    let (status, body) = request(addr, second.owner(), "GET", "/splitapi/v1/status", b"")
        .await
        .unwrap();
    assert_eq!(
        (status, &body["credentials"]["version"]),
        (200, &serde_json::json!(2))
    );
    // ...and is closed by it.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(WAIT, kept.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "the old connection is closed after the reload"
    );
    g.stop().await;
}

#[tokio::test]
async fn a_bundle_the_endpoint_cannot_use_is_refused_at_install() {
    let mut g = guest(1024);
    let pki = Pki::new(&rcgen::PKCS_ED25519);
    g.svc
        .install(sealed_bundle(&g.key, 1, &pki.server_files()))
        .await
        .unwrap();
    g.serving(1).await;
    let mut files = pki.server_files();
    files[1].2 = b"junk".to_vec();
    let err = g
        .svc
        .install(sealed_bundle(&g.key, 2, &files))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, GuestError::Invalid(m) if m.starts_with("splitapi bundle: server.crt")),
        "{err}"
    );
    // Version 1 stays held and served.
    assert_eq!(g.svc.store().bundle_info(BUNDLE_ID).unwrap().version, 1);
    let (status, _) = request(
        g.serving(1).await,
        pki.owner(),
        "GET",
        "/splitapi/v1/status",
        b"",
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    g.stop().await;
}

#[tokio::test]
async fn a_bundle_held_at_start_is_served_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&rcgen::PKCS_ED25519);
    {
        let store = StateStore::open(dir.path()).unwrap();
        store
            .install_bundle(
                BUNDLE_ID,
                3,
                bundle_files(&pki.server_files()),
                4_000_000_000,
            )
            .unwrap();
    }
    let store = Arc::new(StateStore::open(dir.path()).unwrap());
    let key = store.load_or_create_tee_key(TeeKeyPair::new_ec).unwrap();
    let svc = GuestDaemonService::new(store, key, None);
    let (status_tx, mut status) = watch::channel(SplitApiStatus::default());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(
        SplitApiConfig::new(SocketAddr::from(([127, 0, 0, 1], 0))),
        svc,
        watch::channel(GuestIdentity::default()).1,
        status_tx,
        shutdown.clone(),
    ));
    let addr = tokio::time::timeout(WAIT, status.wait_for(|s| s.addr.is_some()))
        .await
        .unwrap()
        .unwrap()
        .addr
        .unwrap();
    let (code, body) = request(addr, pki.owner(), "GET", "/splitapi/v1/status", b"")
        .await
        .unwrap();
    assert_eq!(
        (code, &body["credentials"]["version"]),
        (200, &serde_json::json!(3))
    );
    shutdown.cancel();
    tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
    assert_eq!(status.borrow().addr, None, "stopped");
}

/// Reads one HTTP/1.1 response (with content-length) from a kept-alive stream; its status.
async fn read_response<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> u16 {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(stream.read_u8().await.unwrap());
    }
    let head = String::from_utf8(head).unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .unwrap()
        .parse()
        .unwrap();
    let mut body = vec![0; length];
    stream.read_exact(&mut body).await.unwrap();
    head.split(' ').nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn a_renewal_under_the_same_ca_keeps_open_connections() {
    let mut g = guest(1024);
    let pki = Pki::new(&rcgen::PKCS_ED25519);
    g.svc
        .install(sealed_bundle(&g.key, 1, &pki.server_files()))
        .await
        .unwrap();
    let addr = g.serving(1).await;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut kept = tokio_rustls::TlsConnector::from(pki.owner())
        .connect(ServerName::try_from("guest-1").unwrap(), tcp)
        .await
        .unwrap();
    let ask = b"GET /splitapi/v1/status HTTP/1.1\r\nhost: guest-1\r\n\r\n";
    kept.write_all(ask).await.unwrap();
    assert_eq!(read_response(&mut kept).await, 200);

    // Version 2: a new server certificate from the same CA.
    g.svc
        .install(sealed_bundle(&g.key, 2, &pki.server_files()))
        .await
        .unwrap();
    assert_eq!(g.serving(2).await, addr);
    kept.write_all(ask).await.unwrap();
    assert_eq!(
        read_response(&mut kept).await,
        200,
        "still open after a renewal"
    );
    let (status, body) = request(addr, pki.owner(), "GET", "/splitapi/v1/status", b"")
        .await
        .unwrap();
    assert_eq!(
        (status, &body["credentials"]["version"]),
        (200, &serde_json::json!(2))
    );

    // Version 3 under a new CA closes it.
    let other = Pki::new(&rcgen::PKCS_ED25519);
    g.svc
        .install(sealed_bundle(&g.key, 3, &other.server_files()))
        .await
        .unwrap();
    g.serving(3).await;
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(WAIT, kept.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "closed after the CA changed");
    g.stop().await;
}

/// Sockets this process holds that were accepted on `port` (server ends): ESTABLISHED
/// entries of /proc/net/tcp with that local port whose inode is one of this process's
/// descriptors. Connections still in the kernel's backlog hold none.
fn held_server_sockets(port: u16) -> usize {
    let mut ours = std::collections::HashSet::new();
    for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        if let Ok(target) = std::fs::read_link(entry.path())
            && let Some(inode) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
        {
            ours.insert(inode.to_owned());
        }
    }
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields[1].rsplit(':').next().unwrap();
            u16::from_str_radix(local_port, 16).unwrap() == port
                && fields[3] == "01"
                && ours.contains(fields[9])
        })
        .count()
}

/// issue 17 defect 11: the endpoint (0.0.0.0:8443 in a guest) accepted every connection,
/// so a network peer could take all the daemon's descriptors, and state writes and the
/// CDH endpoint then failed. A flood of idle connections now holds at most the cap, and
/// the owner is served (and can write a secret) while it lasts.
#[tokio::test]
async fn a_flood_of_idle_connections_holds_at_most_the_cap() {
    let mut g = guest(64);
    let pki = Pki::new(&rcgen::PKCS_ED25519);
    g.svc
        .install(sealed_bundle(&g.key, 1, &pki.server_files()))
        .await
        .unwrap();
    let addr = g.serving(1).await;
    let mut flood = Vec::new();
    for _ in 0..300 {
        flood.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // Let the accept loop take what it will.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held = held_server_sockets(addr.port());
    assert!(
        held <= server::MAX_CONNECTIONS,
        "the endpoint holds {held} sockets for 300 idle peers"
    );

    let owner = pki.owner();
    let (status, body) = request(
        addr,
        owner.clone(),
        "PUT",
        "/splitapi/v1/secrets/db-password",
        b"hunter2",
    )
    .await
    .unwrap();
    assert_eq!(status, 201, "{body}");
    let (status, _) = request(addr, owner, "GET", "/splitapi/v1/status", b"")
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(held_server_sockets(addr.port()) <= server::MAX_CONNECTIONS);
    drop(flood);
    g.stop().await;
}
