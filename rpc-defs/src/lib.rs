//! The `GuestService` RPC contract between the KBS (tarpc client) and the guest daemon
//! (tarpc server), its argument and result types, and the tunnel control frames.
//!
//! No I/O lives here: the `tunnel` crate carries these types as CBOR over WebSocket.
//! Byte fields are CBOR byte strings (`serde_bytes`), never arrays of integers.

mod frames;
mod types;

pub use frames::{
    CloseCode, Frame, GuestInfo, PROTOCOL_VERSION, PUSH_KEY_LEN, SUBPROTOCOL, SUBPROTOCOL_V2,
};
pub use types::{
    Applied, BUNDLE_BINDING_HEADER, BundleBinding, CredentialBundle, CredentialFile, GuestError,
    HealthReport, HeldResource, Installed, ProbeKind, ProbeReport, RESOURCE_BINDING_HEADER,
    ResourceBinding, RuntimeReport, SealedResource, probe_kind_name,
};

/// Calls the KBS makes into a guest over the tunnel. Every call is idempotent by its key.
#[tarpc::service]
pub trait GuestService {
    /// Echo `payload` back: liveness and round-trip measurement.
    async fn ping(payload: serde_bytes::ByteBuf) -> serde_bytes::ByteBuf;
    /// Install a credential bundle (splitapi server identity and the like); key: bundle id + version.
    async fn install_credentials(bundle: CredentialBundle) -> Result<Installed, GuestError>;
    /// Apply a new version of a resource; key: uri + version; an older version never overwrites a newer one.
    async fn apply_resource(resource: SealedResource) -> Result<Applied, GuestError>;
    /// Report health, held resources or runtime figures.
    async fn probe(kind: ProbeKind) -> Result<ProbeReport, GuestError>;
}

#[cfg(test)]
mod layering_tests {
    #[test]
    fn modules_do_not_import_each_other_in_a_circle() {
        layering::assert_no_module_cycles(env!("CARGO_MANIFEST_DIR"));
    }
}
