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

/// Limits with short deadlines, for the tests of what a peer may not hold.
fn quick_limits() -> Limits {
    Limits {
        first_byte_timeout: Duration::from_millis(300),
        header_read_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_millis(300),
        body_timeout: Duration::from_millis(300),
        ..Limits::default()
    }
}

/// Time until the server closes `stream`, which sends nothing more; panics past [`WAIT`].
async fn time_to_close<S: AsyncRead + Unpin>(stream: &mut S) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((started + WAIT).into(), stream.read(&mut buf)).await {
            Err(_) => panic!("still open after {WAIT:?}"),
            Ok(Ok(0) | Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => {}
        }
    }
}

/// issue 17 defect 2: hyper-util's protocol detection had no deadline, so a connection that
/// sent nothing, or one byte of what could be the HTTP/2 preface, stayed open for ever.
#[tokio::test]
async fn silent_and_one_byte_clients_are_closed_after_the_first_byte_timeout() {
    let server = Server::new(FixedApp::new(app(), None)).limits(quick_limits());
    let stats = server.stats();
    let server = Running::start(server).await;
    for sent in [&b""[..], b"P", b"PRI * HTTP/2.0\r\n", b"G"] {
        let mut stream = server.connect().await;
        stream.write_all(sent).await.unwrap();
        let took = time_to_close(&mut stream).await;
        assert!(took >= Duration::from_millis(250), "{sent:?}: {took:?}");
        assert!(took < Duration::from_secs(3), "{sent:?}: {took:?}");
    }
    assert!(stats.timed_out() >= 3, "{}", stats.timed_out());
    // A client that speaks at once is served.
    let mut stream = server.connect().await;
    assert_eq!(
        get_on(&mut stream, "/hello", true).await,
        (200, "hi".into())
    );
    server.stop().await;
}

#[tokio::test]
async fn the_first_byte_timeout_applies_after_tls_too() {
    let pki = Pki::new();
    let server =
        Server::new(FixedApp::new(app(), Some(pki.server_config(false)))).limits(quick_limits());
    let server = Running::start(server).await;
    let mut stream = pki.connect(server.addr, false).await.unwrap();
    let took = time_to_close(&mut stream).await;
    assert!(took < Duration::from_secs(3), "{took:?}");
    server.stop().await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let limits = Limits {
        // hyper's own header timer also closes an idle HTTP/1 connection; keep it out of
        // the way to see the idle timer.
        header_read_timeout: Duration::from_secs(30),
        ..quick_limits()
    };
    let server = Running::start(Server::new(FixedApp::new(app(), None)).limits(limits)).await;
    let mut stream = server.connect().await;
    assert_eq!(
        get_on(&mut stream, "/hello", false).await,
        (200, "hi".into())
    );
    let took = time_to_close(&mut stream).await;
    assert!(took >= Duration::from_millis(250), "{took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    server.stop().await;
}

/// An HTTP/2 client that sends its preface and settings, then nothing: closed when idle
/// (hyper's pings alone would keep a live but silent peer).
#[tokio::test]
async fn an_idle_http2_connection_is_closed_after_the_idle_timeout() {
    let limits = Limits {
        http2_keep_alive: Duration::from_secs(60),
        ..quick_limits()
    };
    let server = Running::start(Server::new(FixedApp::new(app(), None)).limits(limits)).await;
    let mut stream = server.connect().await;
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let took = time_to_close(&mut stream).await;
    assert!(took >= Duration::from_millis(250), "{took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    server.stop().await;
}

/// Reads the whole body; 408 when the listener's body deadline passed.
async fn read_body(request: Request) -> StatusCode {
    match axum::body::to_bytes(request.into_body(), 1 << 20).await {
        Ok(_) => StatusCode::OK,
        Err(e) => {
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(err) = source {
                if err
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
                {
                    return StatusCode::REQUEST_TIMEOUT;
                }
                source = err.source();
            }
            StatusCode::BAD_REQUEST
        }
    }
}

#[tokio::test]
async fn a_body_that_stalls_fails_with_a_timeout() {
    let router = Router::new().route("/upload", axum::routing::post(read_body));
    let server =
        Running::start(Server::new(FixedApp::new(router, None)).limits(quick_limits())).await;
    let mut stream = server.connect().await;
    stream
        .write_all(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    let started = Instant::now();
    assert_eq!(read_response(&mut stream).await.0, 408);
    assert!(started.elapsed() < Duration::from_secs(3));
    // A body that arrives in time is read.
    let mut stream = server.connect().await;
    stream
        .write_all(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nConnection: close\r\n\r\nabcd")
        .await
        .unwrap();
    assert_eq!(read_response(&mut stream).await.0, 200);
    server.stop().await;
}

/// At the cap on connections not upgraded, a newcomer closes the oldest idle connection;
/// one with a request in flight keeps its place.
#[tokio::test]
async fn at_the_cap_the_oldest_idle_connection_makes_room() {
    let (started, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let router = slow_app(started.clone(), release.clone()).merge(app());
    let limits = Limits {
        first_byte_timeout: Duration::from_secs(30),
        max_http_connections: 3,
        ..Limits::default()
    };
    let server = Server::new(FixedApp::new(router, None)).limits(limits);
    let stats = server.stats();
    let server = Running::start(server).await;

    // The oldest connection is busy: a request in flight.
    let mut busy = server.connect().await;
    let request = tokio::spawn(async move { get_on(&mut busy, "/slow", false).await });
    started.notified().await;
    let mut idle_a = server.connect().await;
    let mut idle_b = server.connect().await;
    eventually(|| stats.http() == 3).await;

    let mut newcomer = server.connect().await;
    assert_eq!(
        get_on(&mut newcomer, "/hello", true).await,
        (200, "hi".into())
    );
    assert!(
        closed_by_server(&mut idle_a).await,
        "the oldest idle one made room"
    );
    assert_eq!(stats.evicted(), 1);
    // The busy one finishes its request.
    release.notify_one();
    assert_eq!(request.await.unwrap(), (200, "done".into()));
    // The younger idle one is still served.
    assert_eq!(
        get_on(&mut idle_b, "/hello", true).await,
        (200, "hi".into())
    );
    server.stop().await;
}

/// Upgraded connections keep their socket's place but leave the HTTP budget, and are never
/// closed to make room. At the socket cap a newcomer closes the oldest idle connection not
/// upgraded; while every one has a request in flight, it waits.
#[tokio::test]
async fn upgraded_connections_keep_their_place_outside_the_http_budget() {
    let (started, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let router = Router::new()
        .route("/echo", get(echo_upgrade))
        .merge(slow_app(started.clone(), release.clone()))
        .merge(app());
    let limits = Limits {
        first_byte_timeout: Duration::from_secs(30),
        max_connections: 3,
        max_http_connections: 1,
        ..Limits::default()
    };
    let server = Server::new(FixedApp::new(router, None))
        .with_upgrades()
        .limits(limits);
    let stats = server.stats();
    let server = Running::start(server).await;
    let mut tunnel_1 = upgrade(server.connect().await).await;
    let mut tunnel_2 = upgrade(server.connect().await).await;
    eventually(|| stats.open() == 2 && stats.http() == 0).await;

    // The third socket is the last place: a plain connection holds it, busy.
    let mut plain = server.connect().await;
    let busy = tokio::spawn(async move {
        let answer = get_on(&mut plain, "/slow", false).await;
        (answer, plain)
    });
    started.notified().await;
    // A fourth is not served while the three others are a request and two tunnels...
    let mut waiting = server.connect().await;
    waiting
        .write_all(b"GET /hello HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut byte = [0u8; 1];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), waiting.peek(&mut byte))
            .await
            .is_err(),
        "served beyond the socket cap"
    );
    assert_eq!(stats.open(), 3);
    // ...and is once the request ends: the now idle plain connection makes room.
    release.notify_one();
    let (answer, mut plain) = busy.await.unwrap();
    assert_eq!(answer, (200, "done".into()));
    assert_eq!(read_response(&mut waiting).await, (200, "hi".into()));
    assert!(closed_by_server(&mut plain).await);
    assert_eq!(stats.evicted(), 1);
    // The tunnels were not touched.
    for tunnel in [&mut tunnel_1, &mut tunnel_2] {
        tunnel.write_all(b"ping").await.unwrap();
        let mut echoed = [0u8; 4];
        tunnel.read_exact(&mut echoed).await.unwrap();
        assert_eq!(&echoed, b"ping");
    }
    server.stop().await;
}

/// issue 17 defect 2: a flood of sockets that send nothing cannot keep a client from being
/// served or a tunnel from being opened: each newcomer closes the oldest idle socket, and
/// the places beyond `max_http_connections` stay kept for tunnels.
#[tokio::test]
async fn a_flood_of_silent_sockets_neither_starves_clients_nor_takes_the_tunnels_places() {
    let router = Router::new().route("/echo", get(echo_upgrade)).merge(app());
    let limits = Limits {
        first_byte_timeout: Duration::from_secs(30),
        max_connections: 12,
        max_http_connections: 4,
        ..Limits::default()
    };
    let server = Server::new(FixedApp::new(router, None))
        .with_upgrades()
        .limits(limits);
    let stats = server.stats();
    let server = Running::start(server).await;
    let mut tunnels = vec![upgrade(server.connect().await).await];
    let mut flood = Vec::new();
    for _ in 0..100 {
        flood.push(server.connect().await);
    }
    // Served at once, though 100 silent sockets came first.
    let mut client = server.connect().await;
    let answer = tokio::time::timeout(WAIT, get_on(&mut client, "/hello", true)).await;
    assert_eq!(answer.unwrap(), (200, "hi".into()));
    eventually(|| stats.evicted() >= 97).await;
    // The flood holds at most the HTTP budget, and tunnels still open: up to the whole cap.
    for _ in 0..100 {
        flood.push(server.connect().await);
    }
    for _ in 0..7 {
        tunnels.push(upgrade(server.connect().await).await);
    }
    assert!(stats.http() <= 4, "{}", stats.http());
    assert_eq!(stats.open() - stats.http(), 8);
    for tunnel in &mut tunnels {
        tunnel.write_all(b"ping").await.unwrap();
        let mut echoed = [0u8; 4];
        tunnel.read_exact(&mut echoed).await.unwrap();
    }
    server.stop().await;
}

/// Asks for the echo upgrade on `stream`; returns it once upgraded.
async fn upgrade(mut stream: TcpStream) -> TcpStream {
    stream
        .write_all(b"GET /echo HTTP/1.1\r\nHost: t\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut stream).await.0, 101);
    stream
}

/// Polls `done` every 10 ms until it holds; panics after [`WAIT`].
async fn eventually(done: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "condition never held");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
