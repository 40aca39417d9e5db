//! Tether tunnel: the authenticated WebSocket a guest daemon keeps open to the KBS, and
//! typed tarpc calls from the KBS into the guest over it (docs/protocol.md, Part II).
//!
//! - [`frame`] and [`handshake`]: the sans-IO protocol core (CBOR codec, proof of possession).
//! - [`server`]: the KBS end ([`serve_guest_tunnel`]) over axum's WebSocket, registering
//!   each tunnel in the [`Hub`] as a [`TunnelHandle`] with typed calls.
//! - [`guest`]: the guest end ([`connect`], [`GuestTunnel::serve`]) over tokio-tungstenite,
//!   with [`TunnelSession`] for in-band re-authentication and [`backoff`] for reconnects.
//!
//! Each tunnel is one task owning its socket (no thread per tunnel), with small WebSocket
//! buffers and bounded queues, so one process can hold thousands.

pub mod backoff;
mod calls;
mod dispatch;
pub mod frame;
pub mod guest;
mod handle;
pub mod handshake;
mod hub;
pub mod in_process;
pub mod labels;
mod link;
mod liveness;
mod observer;
mod push_key;
mod rpc;
pub mod server;
mod ws;

pub use backoff::{Backoff, ReconnectPolicy};
pub use guest::{
    Closed, ConnectError, GuestTunnel, GuestTunnelConfig, ReauthError, TunnelSession, connect,
    connect_and_serve,
};
pub use handle::{CallError, TunnelHandle, TunnelInfo, next_epoch};
pub use hub::{DEFAULT_EVENT_CAPACITY, Hub, TunnelEvent};
pub use labels::Labels;
pub use link::CloseInfo;
pub use observer::{NoopObserver, TunnelObserver};
pub use push_key::PushKey;
pub use rpc::{Method, TransportError};
pub use server::{
    AcceptParams, ProvenFn, ReauthFn, TunnelLimits, configure_upgrade, offers_push_key,
    offers_subprotocol, serve_guest_tunnel,
};

#[cfg(test)]
mod layering_tests {
    #[test]
    fn modules_do_not_import_each_other_in_a_circle() {
        layering::assert_no_module_cycles(env!("CARGO_MANIFEST_DIR"));
    }
}
