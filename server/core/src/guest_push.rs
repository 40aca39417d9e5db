//! What the KBS pushes into a guest over its tunnel, sealed: a resource version
//! (`apply_resource`) and a credential bundle (`install_credentials`). One way to seal each,
//! for every pusher (the rotation plugin, the external plugins' Guests API): under the
//! tunnel's push key when it has one (`tether.v2`, no ECDH on either side), otherwise to the
//! guest's TEE key as the resource GET does; the metadata that travels beside the JWE is
//! bound in its protected header, so the guest refuses an old ciphertext replayed as a newer
//! version, under another path or with other file modes (see `docs/protocol.md`).

use kbs_types::TeePubKey;
use rpc_defs::{
    BUNDLE_BINDING_HEADER, BundleBinding, CredentialBundle, CredentialFile,
    RESOURCE_BINDING_HEADER, ResourceBinding, SealedResource,
};
use tunnel::PushKey;

use crate::jwe::{self, JweError};

fn seal(
    push_key: Option<&PushKey>,
    tee_pubkey: &TeePubKey,
    plaintext: &[u8],
    header: &str,
    binding: &impl serde::Serialize,
) -> Result<Vec<u8>, JweError> {
    let bound = jwe::binding_header(header, binding)?;
    let sealed = match push_key {
        Some(key) => jwe::seal_dir_bound(key.bytes(), plaintext, &bound)?,
        None => jwe::seal_bound(tee_pubkey, plaintext, &bound)?,
    };
    serde_json::to_vec(&sealed).map_err(|_| JweError::Seal("JWE serialisation"))
}

/// Version `version` of resource `uri` (`plaintext`, whose hex SHA-256 is `sha256`), sealed
/// for the guest behind a tunnel with `push_key` and TEE key `tee_pubkey`.
pub fn sealed_resource(
    push_key: Option<&PushKey>,
    tee_pubkey: &TeePubKey,
    uri: &str,
    version: u64,
    sha256: &str,
    plaintext: &[u8],
) -> Result<SealedResource, JweError> {
    let binding = ResourceBinding {
        sha256: sha256.to_ascii_lowercase(),
        uri: uri.to_owned(),
        version,
    };
    let jwe = seal(
        push_key,
        tee_pubkey,
        plaintext,
        RESOURCE_BINDING_HEADER,
        &binding,
    )?;
    Ok(SealedResource {
        uri: uri.to_owned(),
        version,
        jwe,
        sha256: sha256.to_owned(),
    })
}

/// Credential bundle `id` at `version` listing `files`, whose sealed plaintext is
/// `plaintext` (the CBOR map file name -> contents the guest daemon expects).
pub fn credential_bundle(
    push_key: Option<&PushKey>,
    tee_pubkey: &TeePubKey,
    id: &str,
    version: u64,
    files: Vec<CredentialFile>,
    plaintext: &[u8],
    not_after: u64,
) -> Result<CredentialBundle, JweError> {
    let binding = BundleBinding::new(id, version, &files, not_after);
    let jwe = seal(
        push_key,
        tee_pubkey,
        plaintext,
        BUNDLE_BINDING_HEADER,
        &binding,
    )?;
    Ok(CredentialBundle {
        id: id.to_owned(),
        version,
        files,
        jwe,
        not_after,
    })
}
