//! Tether KBS: a Trustee-compatible Key Broker Service that can call back into its guests.

pub mod admin;
pub mod app;
pub mod attest;
pub mod claims;
pub mod config;
pub mod dashboard;
pub mod error;
pub mod events;
pub mod fleet;
pub mod fsutil;
pub mod guest_directory;
pub mod http;
pub mod jwe;
pub mod metrics;
pub mod plugins;
pub mod policy;
pub mod probes;
pub mod resource_path;
pub mod rotation;
pub mod selector;
pub mod serve;
pub mod storage;
pub mod tls;
pub mod token;
pub mod tunnel_observer;
pub mod verifiers;
