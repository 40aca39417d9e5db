//! listener: how every Tether HTTP endpoint meets its peers.
//!
//! A [`Server`] takes an already bound `TcpListener` and, until its shutdown token is
//! cancelled, accepts TCP connections within its [`Limits`] (a cap on sockets, and a
//! smaller one on sockets not upgraded; at either the oldest idle connection not upgraded
//! makes room for a new one), asks its [`Admit`] what to do with each one, runs the TLS handshake under
//! [`Limits::handshake_timeout`] when the [`Admission`] says so, reads the first bytes
//! under [`Limits::first_byte_timeout`], and serves an axum `Router` over HTTP/1.1
//! (header-read timeout, keep-alive) or HTTP/2 (keep-alive pings), with request bodies
//! bounded in time, idle connections closed, and upgrades (WebSocket) when asked. At
//! shutdown it stops accepting, asks every connection to finish gracefully, and waits for
//! them at most the drain grace.
//!
//! The KBS serves one router with one TLS configuration ([`FixedApp`]). The guest's splitapi
//! endpoint decides per connection: the credentials of the moment secure the handshake, the
//! client certificate the handshake revealed shapes the router ([`Admission::route_with`]),
//! and a newer CA retires the connections made under the old one
//! ([`Admission::retire_on`]).
//!
//! The guest daemon links this crate, so it stays inside the guest's dependency tree: tokio,
//! hyper-util, axum and rustls (ring) only.

mod admission;
mod connection;
mod io;
mod limits;
mod pool;
mod server;
mod service;

pub use admission::{Admission, Admit, FixedApp, Peer};
pub use limits::Limits;
pub use pool::ConnectionStats;
pub use server::Server;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod layering_tests {
    #[test]
    fn modules_do_not_import_each_other_in_a_circle() {
        layering::assert_no_module_cycles(env!("CARGO_MANIFEST_DIR"));
    }
}
