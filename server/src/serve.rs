//! The KBS's accept loop: the shared `listener` crate with the KBS's settings: upgrades on
//! (the tunnel is a WebSocket), the default limits (10 s for the TLS handshake and for
//! request headers, 256 HTTP/2 streams), the configured drain grace.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use listener::{FixedApp, Server};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Serve `app` on `listener` until `shutdown` is cancelled; then stop accepting, let
/// in-flight requests finish for up to `grace`, and return.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: CancellationToken,
    grace: Duration,
) -> std::io::Result<()> {
    Server::new(FixedApp::new(app, tls))
        .name("kbs")
        .with_upgrades()
        .drain_grace(grace)
        .serve(listener, shutdown)
        .await;
    Ok(())
}
