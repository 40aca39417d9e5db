//! The generated gRPC code: upstream's `kbs.plugin.v1` (the KBS is its client) and our
//! `tether.plugin.v1` (the KBS serves it to external plugins).

/// Upstream Trustee's external plugin protocol (`proto/kbs/plugin/v1/plugin.proto`).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod kbs_plugin_v1 {
    tonic::include_proto!("kbs.plugin.v1");
}

/// Tether's Guests service for external plugins (`proto/tether/plugin/v1/guests.proto`).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod tether_plugin_v1 {
    tonic::include_proto!("tether.plugin.v1");
}
