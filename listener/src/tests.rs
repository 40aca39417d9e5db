//! The server on loopback (port 0): plain and TLS clients, the per-connection hook, the
//! handshake timeout, graceful drain, retirement and upgrades.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;

use super::*;

const WAIT: Duration = Duration::from_secs(10);

fn app() -> Router {
    Router::new().route("/hello", get(|| async { "hi" }))
}

/// A running server and the means to stop it.
struct Running {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Running {
    async fn start<A: Admit>(server: Server<A>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.serve(listener, shutdown.clone()));
        Self {
            addr,
            shutdown,
            task,
        }
    }

    async fn connect(&self) -> TcpStream {
        TcpStream::connect(self.addr).await.unwrap()
    }

    /// Cancel and wait for `serve` to return; how long that took.
    async fn stop(self) -> Duration {
        let started = Instant::now();
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .unwrap()
            .unwrap();
        started.elapsed()
    }
}

/// Send `GET path` (keep-alive unless `close`) and read one response: status and body.
async fn get_on<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    path: &str,
    close: bool,
) -> (u16, String) {
    let connection = if close { "close" } else { "keep-alive" };
    let request = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: {connection}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    read_response(stream).await
}

async fn read_response<S: AsyncRead + Unpin>(stream: &mut S) -> (u16, String) {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(WAIT, stream.read(&mut byte))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 1, "connection closed mid-head: {head:?}");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let status = head[9..12].parse().unwrap();
    let length = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse::<usize>().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.unwrap();
    (status, String::from_utf8(body).unwrap())
}

/// True once the peer has closed the connection (EOF or reset), within [`WAIT`].
async fn closed_by_server<S: AsyncRead + Unpin>(stream: &mut S) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(WAIT, stream.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// A CA, a server certificate for `localhost` and a client certificate, both issued by it.
struct Pki {
    ca: CertificateDer<'static>,
    server: (CertificateDer<'static>, PrivateKeyDer<'static>),
    client: (CertificateDer<'static>, PrivateKeyDer<'static>),
}

impl Pki {
    fn new() -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap().der().clone();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = |name: &str| {
            let key = KeyPair::generate().unwrap();
            let params = CertificateParams::new(vec![name.to_owned()]).unwrap();
            let cert = params.signed_by(&key, &issuer).unwrap().der().clone();
            let key = PrivateKeyDer::from(PrivatePkcs8KeyDer::from(key.serialize_der()));
            (cert, key)
        };
        Self {
            ca,
            server: leaf("localhost"),
            client: leaf("owner"),
        }
    }

    fn roots(&self) -> Arc<rustls::RootCertStore> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone()).unwrap();
        Arc::new(roots)
    }

    /// The server's TLS; with `client_auth`, a client certificate, if sent, must be of this CA.
    fn server_config(&self, client_auth: bool) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = if client_auth {
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(self.roots(), provider)
                    .allow_unauthenticated()
                    .build()
                    .unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let (cert, key) = &self.server;
        Arc::new(
            builder
                .with_single_cert(vec![cert.clone()], key.clone_key())
                .unwrap(),
        )
    }

    async fn connect(
        &self,
        addr: SocketAddr,
        with_client_cert: bool,
    ) -> std::io::Result<impl AsyncRead + AsyncWrite + Unpin> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(self.roots());
        let config = if with_client_cert {
            let (cert, key) = &self.client;
            builder
                .with_client_auth_cert(vec![cert.clone()], key.clone_key())
                .unwrap()
        } else {
            builder.with_no_client_auth()
        };
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::try_from("localhost").unwrap();
        TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
    }
}

#[tokio::test]
async fn plain_http_is_served_and_a_refusal_closes_the_connection() {
    let router = app();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    let admit = move |_peer| {
        // Every second connection is refused before a byte is read.
        let n = counter.fetch_add(1, Ordering::SeqCst);
        n.is_multiple_of(2)
            .then(|| Admission::serve(router.clone()))
    };
    let server = Running::start(Server::new(admit)).await;
    for n in 0..4_usize {
        let mut stream = server.connect().await;
        if n.is_multiple_of(2) {
            assert_eq!(
                get_on(&mut stream, "/hello", true).await,
                (200, "hi".into())
            );
        } else {
            assert!(closed_by_server(&mut stream).await);
        }
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 4);
    server.stop().await;
}

#[tokio::test]
async fn fixed_app_serves_over_tls() {
    let pki = Pki::new();
    let server = Running::start(Server::new(FixedApp::new(
        app(),
        Some(pki.server_config(false)),
    )))
    .await;
    let mut stream = pki.connect(server.addr, false).await.unwrap();
    assert_eq!(
        get_on(&mut stream, "/hello", false).await,
        (200, "hi".into())
    );
    // Keep-alive: a second request on the same connection.
    assert_eq!(
        get_on(&mut stream, "/hello", true).await,
        (200, "hi".into())
    );
    server.stop().await;
}

/// What the hook learnt of the client, as the handler sees it.
#[derive(Clone)]
struct Client(String);

#[tokio::test]
async fn the_route_hook_sees_the_client_certificate_and_may_refuse() {
    let pki = Pki::new();
    let acceptor = TlsAcceptor::from(pki.server_config(true));
    let expected_leaf = pki.client.0.clone();
    let router = Router::new().route(
        "/whoami",
        get(|Extension(Client(who)): Extension<Client>| async move { who }),
    );
    let admit = move |_peer| {
        let router = router.clone();
        let expected_leaf = expected_leaf.clone();
        let admission = Admission::route_with(move |peer: &Peer<'_>| {
            assert!(peer.addr.ip().is_loopback());
            let leaf = peer.certificates?.first()?;
            let who = if *leaf == expected_leaf {
                "owner"
            } else {
                "stranger"
            };
            Some(router.layer(Extension(Client(who.into()))))
        });
        Some(admission.over_tls(acceptor.clone()))
    };
    let server = Running::start(Server::new(admit)).await;

    let mut stream = pki.connect(server.addr, true).await.unwrap();
    assert_eq!(
        get_on(&mut stream, "/whoami", true).await,
        (200, "owner".into())
    );

    // Without a client certificate the handshake succeeds, and the hook closes the connection.
    let mut stream = pki.connect(server.addr, false).await.unwrap();
    let _ = stream
        .write_all(b"GET /whoami HTTP/1.1\r\nHost: t\r\n\r\n")
        .await;
    assert!(closed_by_server(&mut stream).await);
    server.stop().await;
}

#[tokio::test]
async fn a_silent_client_is_closed_after_the_handshake_timeout() {
    let pki = Pki::new();
    let limits = Limits {
        handshake_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let server = Server::new(FixedApp::new(app(), Some(pki.server_config(false)))).limits(limits);
    let server = Running::start(server).await;
    let started = Instant::now();
    let mut silent = server.connect().await;
    assert!(closed_by_server(&mut silent).await);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250),
        "closed after {waited:?}"
    );
    assert!(waited < Duration::from_secs(5), "closed after {waited:?}");
    server.stop().await;
}

/// A router whose `/slow` answers only when `release` is notified; `started` tells when a
/// request is in flight.
fn slow_app(started: Arc<Notify>, release: Arc<Notify>) -> Router {
    Router::new().route(
        "/slow",
        get(move || async move {
            started.notify_one();
            release.notified().await;
            "done"
        }),
    )
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish_and_refuses_new_clients() {
    let (started, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let server = Running::start(Server::new(FixedApp::new(
        slow_app(started.clone(), release.clone()),
        None,
    )))
    .await;
    let addr = server.addr;
    let mut stream = server.connect().await;
    let request = tokio::spawn(async move { get_on(&mut stream, "/slow", false).await });
    started.notified().await;

    let stopping = tokio::spawn(server.stop());
    // The listener closes at once; the in-flight request is still waited for.
    let mut refused = false;
    for _ in 0..100 {
        if TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "the listener still accepts during the drain");
    assert!(!stopping.is_finished());
    release.notify_one();
    assert_eq!(request.await.unwrap(), (200, "done".into()));
    stopping.await.unwrap();
}

#[tokio::test]
async fn the_drain_gives_up_after_its_grace() {
    let (started, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let server = Server::new(FixedApp::new(slow_app(started.clone(), release), None))
        .drain_grace(Duration::from_millis(200));
    let server = Running::start(server).await;
    let mut stream = server.connect().await;
    let _request = tokio::spawn(async move { get_on(&mut stream, "/slow", false).await });
    started.notified().await;
    let took = server.stop().await;
    assert!(took >= Duration::from_millis(150), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[tokio::test]
async fn a_retired_connection_closes_while_the_server_keeps_serving() {
    let generation = Arc::new(Mutex::new(CancellationToken::new()));
    let current = generation.clone();
    let router = app();
    let admit = move |_peer| {
        let retire = current.lock().unwrap().clone();
        Some(Admission::serve(router.clone()).retire_on(retire))
    };
    let server = Running::start(Server::new(admit)).await;
    let mut old = server.connect().await;
    assert_eq!(get_on(&mut old, "/hello", false).await, (200, "hi".into()));

    let retired = std::mem::take(&mut *generation.lock().unwrap());
    retired.cancel();
    assert!(
        closed_by_server(&mut old).await,
        "the idle keep-alive connection stays open"
    );

    let mut new = server.connect().await;
    assert_eq!(get_on(&mut new, "/hello", false).await, (200, "hi".into()));
    server.stop().await;
}

/// Answers `Upgrade: echo` with 101 and then echoes what the client sends.
async fn echo_upgrade(mut request: Request) -> Response {
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else {
            return;
        };
        let mut io = hyper_util::rt::TokioIo::new(upgraded);
        let mut buf = [0u8; 4];
        if io.read_exact(&mut buf).await.is_ok() {
            let _ = io.write_all(&buf).await;
        }
    });
    (
        StatusCode::SWITCHING_PROTOCOLS,
        [(header::CONNECTION, "upgrade"), (header::UPGRADE, "echo")],
    )
        .into_response()
}

#[tokio::test]
async fn upgrades_are_served_when_asked_for() {
    let router = Router::new().route("/echo", get(echo_upgrade));
    let server = Running::start(Server::new(FixedApp::new(router, None)).with_upgrades()).await;
    let mut stream = server.connect().await;
    stream
        .write_all(b"GET /echo HTTP/1.1\r\nHost: t\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut stream).await.0, 101);
    stream.write_all(b"ping").await.unwrap();
    let mut echoed = [0u8; 4];
    tokio::time::timeout(WAIT, stream.read_exact(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echoed, b"ping");
    // The upgraded connection is the handler's now: shutdown does not wait for it.
    let took = server.stop().await;
    assert!(took < Duration::from_secs(2), "{took:?}");
}
