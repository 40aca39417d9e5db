//! Opening a tunnel: dial, then the handshake, then a [`GuestTunnel`] ready to serve.

use std::future::Future;

use rpc_defs::{CloseCode, GuestInfo, GuestService};
use tokio::time::timeout;

use super::{
    config::GuestTunnelConfig,
    connect_error::ConnectError,
    dial::dial,
    handshake::run_handshake,
    serve::GuestTunnel,
    session::{Closed, TunnelSession},
};
use crate::handshake::GuestHandshake;

/// Dials the tunnel with `token` as Bearer, answers the challenge with `unseal`, and returns
/// the tunnel once the server welcomed it.
pub async fn connect<U>(
    config: &GuestTunnelConfig,
    token: &str,
    info: GuestInfo,
    unseal: U,
) -> Result<GuestTunnel, ConnectError>
where
    U: FnOnce(&[u8]) -> Result<Vec<u8>, String>,
{
    let mut link = dial(config, token).await?;
    let mut handshake = GuestHandshake::new(info, unseal);
    let welcome = match timeout(
        config.handshake_timeout,
        run_handshake(&mut link, &mut handshake, config.max_frame),
    )
    .await
    {
        Ok(Ok(welcome)) => welcome,
        Ok(Err((err, close))) => {
            if let Some((code, reason)) = close {
                link.close(code, &reason, config.close_timeout).await;
            }
            return Err(err);
        }
        Err(_) => {
            link.close(
                CloseCode::Heartbeat.code(),
                "handshake timed out",
                config.close_timeout,
            )
            .await;
            return Err(ConnectError::HandshakeTimeout);
        }
    };
    Ok(GuestTunnel::new(link, config, welcome))
}

/// Connects, and returns the session with the future that serves `service` until the tunnel
/// ends (drive it, e.g. `tokio::spawn` it when `S`'s futures are `Send`).
pub async fn connect_and_serve<S, U>(
    config: &GuestTunnelConfig,
    token: &str,
    info: GuestInfo,
    unseal: U,
    service: S,
) -> Result<(TunnelSession, impl Future<Output = Closed> + use<S, U>), ConnectError>
where
    S: GuestService + Clone + Send + 'static,
    U: FnOnce(&[u8]) -> Result<Vec<u8>, String>,
{
    let tunnel = connect(config, token, info, unseal).await?;
    let session = tunnel.session();
    Ok((session, tunnel.serve(service)))
}
