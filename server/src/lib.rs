//! Tether KBS: a Trustee-compatible Key Broker Service that can call back into its guests.

pub mod admin;
pub mod app;
pub mod attest;
pub mod config;
pub mod error;
pub mod fsutil;
pub mod http;
pub mod jwe;
pub mod metrics;
pub mod policy;
pub mod resource_path;
pub mod serve;
pub mod storage;
pub mod tls;
pub mod token;
pub mod tunnel_observer;
pub mod verifiers;
