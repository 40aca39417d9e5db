//! The guest end of a tunnel: dial the KBS, prove possession of the TEE key, then serve
//! `GuestService` on the connection until it ends.
//!
//! The pieces compose into the daemon's run loop (attest, connect, serve, back off, re-attest
//! when the token nears expiry):
//!
//! ```ignore
//! let config = GuestTunnelConfig::new("wss://kbs.example/kbs/v0/tunnel").with_tls(tls);
//! let mut backoff = Backoff::new(ReconnectPolicy::default());
//! loop {
//!     let token = attester.token().await?;                       // RCAR, cached until near expiry
//!     let unseal = |jwe: &[u8]| tee_key.unseal(jwe).map_err(|e| e.to_string());
//!     match connect(&config, &token, info.clone(), unseal).await {
//!         Ok(tunnel) => {
//!             let session = tunnel.session();
//!             tokio::spawn(refresh_token(session.clone(), attester.clone())); // session.reauth(new_token)
//!             let closed = tunnel.serve(service.clone()).await;
//!             tokio::time::sleep(backoff.after_close(&closed, &mut rand::thread_rng())).await;
//!         }
//!         Err(e) => {
//!             if e.needs_reattest() { attester.invalidate(); }
//!             tokio::time::sleep(backoff.next_delay(&mut rand::thread_rng())).await;
//!         }
//!     }
//! }
//! ```
//!
//! The parts: `config` ([`GuestTunnelConfig`]); `dial` (TCP, TLS, the upgrade) and `handshake`
//! (Hello, Proof, Welcome), which `connect` composes; `session` ([`TunnelSession`], [`Closed`]);
//! `serve` ([`GuestTunnel::serve`]).

mod config;
mod connect;
mod connect_error;
mod dial;
mod handshake;
mod serve;
mod session;

pub use config::GuestTunnelConfig;
pub use connect::{connect, connect_and_serve};
pub use connect_error::ConnectError;
pub use serve::GuestTunnel;
pub use session::{Closed, ReauthError, TunnelSession};

use tokio::net::TcpStream;
use tokio_tungstenite::MaybeTlsStream;

use crate::ws::TungsteniteWs;

/// The guest's WebSocket: tungstenite over TCP, with TLS for `wss://`.
type GuestWs = TungsteniteWs<MaybeTlsStream<TcpStream>>;
