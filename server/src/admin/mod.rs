//! Admin side: EdDSA-JWT authentication with roles, the admin token format, and a client.

pub mod auth;
pub mod client;
pub mod token;
