//! One versioned item on disk, as resources and secrets are stored: the data under
//! `<name>@v<N>`, its metadata under `<name>@v<N>.json`, the stable `<name>` symlink switched
//! to it once both are durable; and the rule for offering a new version.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::{FILE_MODE, META_SUFFIX, StoreError, VERSION_MARK, fsio};

/// Result of [`StateStore::apply_resource`] and [`StateStore::install_bundle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyOutcome {
    /// True when this exact version was already held (nothing was written).
    pub already_held: bool,
    /// The version now held.
    pub version: u64,
    /// Hex SHA-256 of what is held.
    pub sha256: String,
}

/// The held version of a resource and its plaintext. `Debug` hides the plaintext.
#[derive(Clone, PartialEq, Eq)]
pub struct HeldPlaintext {
    /// Held version.
    pub version: u64,
    /// The plaintext.
    pub plaintext: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for HeldPlaintext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeldPlaintext")
            .field("version", &self.version)
            .field(
                "plaintext",
                &format_args!("[redacted {} bytes]", self.plaintext.len()),
            )
            .finish()
    }
}

/// The metadata of one version of a resource or secret (for a secret, `uri` is its name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct ResourceMeta {
    pub uri: String,
    pub version: u64,
    pub sha256: String,
    pub applied_at: u64,
}

/// Compare an offer with what is held (version, sha256): `Some(outcome)` for an
/// idempotent replay, `None` to go ahead and write, or the refusal.
pub(super) fn check_offer(
    what: &str,
    held: Option<&(u64, String)>,
    offered: u64,
    offered_sha256: &str,
) -> Result<Option<ApplyOutcome>, StoreError> {
    let Some(&(held, ref held_sha256)) = held else {
        return Ok(None);
    };
    if offered < held {
        return Err(StoreError::Downgrade {
            what: what.to_owned(),
            held,
            offered,
        });
    }
    if offered > held {
        return Ok(None);
    }
    if held_sha256 != offered_sha256 {
        return Err(StoreError::VersionConflict {
            what: what.to_owned(),
            version: held,
            held_sha256: held_sha256.clone(),
            offered_sha256: offered_sha256.to_owned(),
        });
    }
    Ok(Some(ApplyOutcome {
        already_held: true,
        version: held,
        sha256: offered_sha256.to_owned(),
    }))
}

pub(super) fn versioned_name(name: &str, version: u64) -> String {
    format!("{name}{VERSION_MARK}{version}")
}

pub(super) fn meta_name(vname: &str) -> String {
    format!("{vname}{META_SUFFIX}")
}

/// The version in a symlink target `<name>@v<N>` (digits only), if it is one.
pub(super) fn parse_target(name: &str, target: &str) -> Option<u64> {
    let digits = target.strip_prefix(name)?.strip_prefix(VERSION_MARK)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

pub(super) fn to_json<T: Serialize>(value: &T, path: &Path) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec_pretty(value).map_err(|e| fsio::io_err("encode", path)(io::Error::other(e)))
}

pub(super) fn write_version_files(
    dir: &Path,
    vname: &str,
    plaintext: &[u8],
    meta: &ResourceMeta,
) -> Result<(), StoreError> {
    fsio::write_replace(dir, vname, plaintext, FILE_MODE)?;
    let json = to_json(meta, &dir.join(meta_name(vname)))?;
    fsio::write_replace(dir, &meta_name(vname), &json, FILE_MODE)?;
    fsio::sync_dir(dir)
}

/// Delete a version's data (file or directory) and metadata; best effort.
pub(super) fn remove_version(dir: &Path, vname: &str) {
    fsio::remove_quietly(&dir.join(vname));
    fsio::remove_quietly(&dir.join(meta_name(vname)));
}

/// Write `bytes` as version `meta.version` of `name` in `dir` and switch `dir/name` to it;
/// on failure the half-written version is removed and the held one stays.
pub(super) fn commit(
    dir: &Path,
    name: &str,
    bytes: &[u8],
    meta: &ResourceMeta,
) -> Result<(), StoreError> {
    let vname = versioned_name(name, meta.version);
    let written = write_version_files(dir, &vname, bytes, meta)
        .and_then(|()| fsio::swap_symlink(dir, name, &vname));
    if let Err(e) = written {
        remove_version(dir, &vname);
        return Err(e);
    }
    Ok(())
}

/// Read version file `file` of `meta`, re-checking its digest.
pub(super) fn read_verified(
    file: PathBuf,
    meta: &ResourceMeta,
) -> Result<HeldPlaintext, StoreError> {
    let data = fsio::read_secret_file(&file)?;
    let actual = hex::encode(Sha256::digest(&data));
    if actual != meta.sha256 {
        return Err(StoreError::Corrupt {
            path: file,
            reason: format!("sha256 is {actual}, metadata says {}", meta.sha256),
        });
    }
    Ok(HeldPlaintext {
        version: meta.version,
        plaintext: data,
    })
}
