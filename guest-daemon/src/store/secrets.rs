//! Secrets the workload owner puts over splitapi: `secrets/<name>`, one versioned file each,
//! numbered by the store (each put is the next version).

use std::path::PathBuf;

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::versions::{self, HeldPlaintext, ResourceMeta, versioned_name};
use super::{SECRETS_DIR, StateStore, StoreError, check_name, fsio, unix_now};

/// A secret stored with [`StateStore::store_secret`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSecret {
    /// The new version (1 for the first put, then one more than the held one).
    pub version: u64,
    /// Hex SHA-256 of the bytes.
    pub sha256: String,
    /// The stable path a workload reads (a symlink to this version).
    pub path: PathBuf,
}

/// One held secret, as [`StateStore::held_secrets`] lists it (no contents, no digest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HeldSecret {
    /// Secret name.
    pub name: String,
    /// Held version.
    pub version: u64,
    /// Unix time (seconds) when it was written.
    pub applied_at: u64,
}

impl StateStore {
    /// The directory of the owner's secrets: `<state>/secrets`.
    pub fn secrets_dir(&self) -> PathBuf {
        self.root.join(SECRETS_DIR)
    }

    /// The stable path a workload reads for secret `name` (a symlink to the held version).
    pub fn secret_file(&self, name: &str) -> PathBuf {
        self.root.join(SECRETS_DIR).join(name)
    }

    /// Store `bytes` as a new version of secret `name` (version 1, or one more than the
    /// held one), written like a resource version: data and metadata to temp names, fsync,
    /// rename, then the `secrets/<name>` symlink switched atomically; 0600 throughout. The
    /// previous version stays readable until the switch and is removed after it.
    pub fn store_secret(&self, name: &str, bytes: &[u8]) -> Result<StoredSecret, StoreError> {
        check_name("secret name", name)?;
        let sha256 = hex::encode(Sha256::digest(bytes));
        let mut index = self.lock();
        let previous = index.secrets.get(name).map(|m| m.version);
        let version = previous.unwrap_or(0).checked_add(1).ok_or_else(|| {
            StoreError::InvalidBundle(format!("secret {name:?} has run out of versions"))
        })?;
        let dir = fsio::ensure_dir(&self.root, &[SECRETS_DIR])?;
        let meta = ResourceMeta {
            uri: name.to_owned(),
            version,
            sha256: sha256.clone(),
            applied_at: unix_now(),
        };
        versions::commit(&dir, name, bytes, &meta)?;
        index.secrets.insert(name.to_owned(), meta);
        drop(index);
        if let Some(old) = previous {
            versions::remove_version(&dir, &versioned_name(name, old));
        }
        Ok(StoredSecret {
            version,
            sha256,
            path: dir.join(name),
        })
    }

    /// The held version of secret `name` and its bytes (digest re-checked), if any.
    pub fn get_secret(&self, name: &str) -> Result<Option<HeldPlaintext>, StoreError> {
        check_name("secret name", name)?;
        let index = self.lock();
        let Some(meta) = index.secrets.get(name) else {
            return Ok(None);
        };
        let file = self
            .root
            .join(SECRETS_DIR)
            .join(versioned_name(name, meta.version));
        versions::read_verified(file, meta).map(Some)
    }

    /// The held secrets (names and versions only), sorted by name.
    pub fn held_secrets(&self) -> Vec<HeldSecret> {
        self.lock()
            .secrets
            .values()
            .map(|m| HeldSecret {
                name: m.uri.clone(),
                version: m.version,
                applied_at: m.applied_at,
            })
            .collect()
    }
}
