//! RCAR against a KBS with the sample TEE: a guest client, a token, and the init-data that
//! names a guest.

use std::path::Path;

use guest_daemon::evidence::SampleAttester;
use guest_daemon::rcar::{KbsClient, KbsClientBuilder};
use guest_daemon::tee_key::TeeKeyPair;

/// A guest's RCAR client for the KBS at `url` (trusting `ca_file` when it serves TLS),
/// holding `key` and attesting `init_data` when given.
pub fn rcar_client(
    url: &str,
    ca_file: Option<&Path>,
    key: &TeeKeyPair,
    init_data: Option<&str>,
) -> anyhow::Result<KbsClient> {
    let mut builder = KbsClientBuilder::new(url, Box::new(SampleAttester)).key(key.clone());
    if let Some(ca) = ca_file {
        builder = builder.ca_file(ca);
    }
    if let Some(init) = init_data {
        builder = builder.init_data(init);
    }
    Ok(builder.build()?)
}

/// Runs RCAR against the KBS at `url` and returns the attestation token for `key`.
pub async fn attest(
    url: &str,
    ca_file: Option<&Path>,
    key: &TeeKeyPair,
    init_data: Option<&str>,
) -> anyhow::Result<String> {
    Ok(rcar_client(url, ca_file, key, init_data)?.attest().await?)
}

/// Init-data naming the guest `guest_id`, with `labels` (none: no labels table).
pub fn init_data(guest_id: &str, labels: &[(&str, &str)]) -> String {
    let mut toml = format!("[tether]\nguest_id = \"{guest_id}\"\n");
    if !labels.is_empty() {
        toml.push_str("\n[tether.labels]\n");
        for (k, v) in labels {
            toml.push_str(&format!("{k} = \"{v}\"\n"));
        }
    }
    toml
}
