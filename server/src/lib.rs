//! Tether KBS: a Trustee-compatible Key Broker Service that can call back into its guests.
//!
//! This crate is the top of the stack (`docs/architecture.md`): the configuration, the
//! core's HTTP endpoints, the dashboard, the accept loop, the composition root ([`app`])
//! that wires `kbs-core`, `kbs-web` and the plugins together, and the admin client that
//! `kbsctl` and the tests use.

pub mod admin_client;
pub mod app;
pub mod config;
pub mod dashboard;
pub mod http;
pub mod serve;
pub mod tls;
