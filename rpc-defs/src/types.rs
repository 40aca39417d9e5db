//! Argument and result types of `GuestService`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The member of a pushed resource's JWE protected header that binds its metadata
/// ([`ResourceBinding`]): authenticated by AES-GCM as the header is the AAD.
pub const RESOURCE_BINDING_HEADER: &str = "tether_resource";
/// The member of a credential bundle's JWE protected header that binds its metadata
/// ([`BundleBinding`]).
pub const BUNDLE_BINDING_HEADER: &str = "tether_bundle";

/// What a [`SealedResource`]'s JWE binds of the fields that travel beside it. Fields are in
/// alphabetical order so the header re-serialises byte-identically on either side.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceBinding {
    /// Lower-case hex SHA-256 of the plaintext.
    pub sha256: String,
    /// Resource URI path `repo/type/tag`.
    pub uri: String,
    /// Version.
    pub version: u64,
}

/// What a [`CredentialBundle`]'s JWE binds of the fields that travel beside it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleBinding {
    /// File name -> mode.
    pub files: BTreeMap<String, u32>,
    /// Bundle id.
    pub id: String,
    /// Expiry, Unix seconds.
    pub not_after: u64,
    /// Version.
    pub version: u64,
}

impl BundleBinding {
    /// The binding of a bundle with these fields.
    pub fn new(id: &str, version: u64, files: &[CredentialFile], not_after: u64) -> Self {
        Self {
            files: files.iter().map(|f| (f.name.clone(), f.mode)).collect(),
            id: id.to_owned(),
            not_after,
            version,
        }
    }
}

/// A resource version sealed to the guest's TEE key (JWE JSON serialization, as the
/// Trustee resource endpoint returns it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedResource {
    /// Resource URI path `repo/type/tag`.
    pub uri: String,
    /// Monotonic version number assigned by the KBS (1, 2, ...).
    pub version: u64,
    /// The JWE (JSON serialization, UTF-8 bytes) holding the plaintext.
    #[serde(with = "serde_bytes")]
    pub jwe: Vec<u8>,
    /// Hex SHA-256 of the plaintext, so the guest can check what it unsealed.
    pub sha256: String,
}

/// What the guest reports after applying a resource.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// Resource URI path `repo/type/tag`.
    pub uri: String,
    /// The version the guest now holds (equal to the pushed one, or newer).
    pub version: u64,
    /// Hex SHA-256 of the plaintext the guest holds.
    pub sha256: String,
    /// True when the guest already held this exact version (idempotent replay).
    pub already_held: bool,
    /// Exit status of the post-rotation hook, when one is configured and ran.
    pub hook_status: Option<i32>,
}

/// One file of a credential bundle; the contents are inside the bundle's JWE.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialFile {
    /// File name (no directories): `ca.crt`, `server.crt`, `server.key`.
    pub name: String,
    /// Unix mode for the file (0o600 for keys, 0o644 for certificates).
    pub mode: u32,
}

/// A set of credential files, sealed as one JWE whose plaintext is a CBOR map name -> bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialBundle {
    /// Bundle id, e.g. `splitapi`.
    pub id: String,
    /// Monotonic version of the bundle.
    pub version: u64,
    /// The files the bundle holds, with their modes.
    pub files: Vec<CredentialFile>,
    /// JWE (JSON serialization, UTF-8 bytes) of the CBOR map file name -> contents.
    #[serde(with = "serde_bytes")]
    pub jwe: Vec<u8>,
    /// Unix time (seconds) after which the credentials expire.
    pub not_after: u64,
}

/// What the guest reports after installing a bundle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Installed {
    /// Bundle id.
    pub id: String,
    /// The version the guest now holds.
    pub version: u64,
    /// True when the guest already held this exact version.
    pub already_held: bool,
}

/// What to probe. On the tunnel it travels by its variant name (`Health`); the KBS's admin
/// API spells it in lower case (`health`, see [`ProbeKind::as_str`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProbeKind {
    /// Liveness and basic health.
    Health,
    /// Held resources with versions and digests.
    Resources,
    /// Uptime, memory, daemon version.
    Runtime,
    /// All of the above.
    #[default]
    All,
}

impl ProbeKind {
    /// Every kind, in the order the admin API lists them.
    pub const ALL: [ProbeKind; 4] = [
        ProbeKind::Health,
        ProbeKind::Resources,
        ProbeKind::Runtime,
        ProbeKind::All,
    ];

    /// The admin API's (and the metrics') name: `health`, `resources`, `runtime`, `all`.
    pub fn as_str(self) -> &'static str {
        match self {
            ProbeKind::Health => "health",
            ProbeKind::Resources => "resources",
            ProbeKind::Runtime => "runtime",
            ProbeKind::All => "all",
        }
    }
}

impl std::fmt::Display for ProbeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ProbeKind {
    type Err = String;

    /// Parses the admin API's lower-case name.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown probe kind {s:?} (health, resources, runtime, all)"))
    }
}

/// Serde for a [`ProbeKind`] in the admin API's lower-case spelling
/// (`#[serde(with = "rpc_defs::probe_kind_name")]`).
pub mod probe_kind_name {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::ProbeKind;

    /// Writes `health`, `resources`, ...
    pub fn serialize<S: Serializer>(kind: &ProbeKind, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(kind.as_str())
    }

    /// Reads `health`, `resources`, ...
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ProbeKind, D::Error> {
        let name = String::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

/// Health of the guest daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    /// True when the daemon considers itself healthy.
    pub healthy: bool,
    /// Human-readable problems, empty when healthy.
    pub problems: Vec<String>,
}

/// One resource the guest holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldResource {
    /// Resource URI path `repo/type/tag` (or `credentials/<id>` for bundles).
    pub uri: String,
    /// Held version.
    pub version: u64,
    /// Hex SHA-256 of the held plaintext.
    pub sha256: String,
    /// Unix time (seconds) when it was written.
    pub applied_at: u64,
}

/// Runtime figures of the guest daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeReport {
    /// Seconds since the daemon started.
    pub uptime_s: u64,
    /// Resident set size in bytes.
    pub rss_bytes: u64,
    /// Daemon version string.
    pub daemon_version: String,
    /// Number of tunnels the daemon has open (0 or 1).
    pub open_tunnels: u32,
}

/// Answer to `probe`: the parts asked for are filled in.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeReport {
    /// Health, for `Health` and `All`.
    pub health: Option<HealthReport>,
    /// Held resources, for `Resources` and `All`.
    pub resources: Option<Vec<HeldResource>>,
    /// Runtime figures, for `Runtime` and `All`.
    pub runtime: Option<RuntimeReport>,
}

/// Errors a guest returns from `GuestService` calls.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum GuestError {
    /// The JWE could not be opened with the guest's TEE key.
    #[error("cannot unseal: {0}")]
    Unseal(String),
    /// The unsealed plaintext does not match the announced digest.
    #[error("digest mismatch: announced {announced}, got {actual}")]
    DigestMismatch {
        /// Digest the KBS announced.
        announced: String,
        /// Digest of what the guest unsealed.
        actual: String,
    },
    /// The guest holds a newer version; the push is refused.
    #[error("downgrade refused: holds version {held}, offered {offered}")]
    Downgrade {
        /// Version the guest holds.
        held: u64,
        /// Version that was offered.
        offered: u64,
    },
    /// The argument is malformed (bad URI, bad file name, ...).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// Writing to the state directory failed.
    #[error("storage failed: {0}")]
    Storage(String),
    /// The guest does not offer this service.
    #[error("unsupported: {0}")]
    Unsupported(String),
}
