//! The generated gRPC code of upstream's `kbs.plugin.v1` (the KBS is its client; the server
//! side is for plugins written in Rust, such as the tests' upstream-style plugin).

/// Upstream Trustee's external plugin protocol (`proto/kbs/plugin/v1/plugin.proto`).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod kbs_plugin_v1 {
    tonic::include_proto!("kbs.plugin.v1");
}

/// Tether's Guests API for external plugins (`proto/tether/plugin/v1/guests.proto`): the KBS
/// serves it, plugins are its clients.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod tether_plugin_v1 {
    tonic::include_proto!("tether.plugin.v1");
}
