//! Resources the KBS pushes: `resources/<repo>/<type>/<tag>`, one versioned file each.

use std::path::PathBuf;

use sha2::{Digest, Sha256};

use super::versions::{
    self, ApplyOutcome, HeldPlaintext, ResourceMeta, check_offer, versioned_name,
};
use super::{RESOURCES_DIR, StateStore, StoreError, check_name, fsio, unix_now};
use crate::resource_path::ResourcePath;

impl StateStore {
    /// The stable path a workload reads for `path` (a symlink to the held version).
    pub fn resource_file(&self, path: &ResourcePath) -> PathBuf {
        self.root
            .join(RESOURCES_DIR)
            .join(path.repo())
            .join(path.kind())
            .join(path.tag())
    }

    /// Store `plaintext` as `version` of `path`. Idempotent: the same version and
    /// digest again is `already_held`; the same version with another digest is
    /// [`StoreError::VersionConflict`]; a lower version is [`StoreError::Downgrade`].
    pub fn apply_resource(
        &self,
        path: &ResourcePath,
        version: u64,
        plaintext: &[u8],
    ) -> Result<ApplyOutcome, StoreError> {
        check_name("resource tag", path.tag())?;
        let sha256 = hex::encode(Sha256::digest(plaintext));
        let mut index = self.lock();
        let held = index
            .resources
            .get(path)
            .map(|m| (m.version, m.sha256.clone()));
        if let Some(outcome) = check_offer(&path.to_string(), held.as_ref(), version, &sha256)? {
            return Ok(outcome);
        }
        let previous = held.map(|(v, _)| v);
        let dir = fsio::ensure_dir(&self.root, &[RESOURCES_DIR, path.repo(), path.kind()])?;
        let meta = ResourceMeta {
            uri: path.to_string(),
            version,
            sha256: sha256.clone(),
            applied_at: unix_now(),
        };
        versions::commit(&dir, path.tag(), plaintext, &meta)?;
        index.resources.insert(path.clone(), meta);
        drop(index);
        if let Some(old) = previous {
            versions::remove_version(&dir, &versioned_name(path.tag(), old));
        }
        Ok(ApplyOutcome {
            already_held: false,
            version,
            sha256,
        })
    }

    /// The held version of `path` and its plaintext (digest re-checked), if any.
    pub fn get_resource(&self, path: &ResourcePath) -> Result<Option<HeldPlaintext>, StoreError> {
        let index = self.lock();
        let Some(meta) = index.resources.get(path) else {
            return Ok(None);
        };
        let file = self
            .resource_file(path)
            .with_file_name(versioned_name(path.tag(), meta.version));
        versions::read_verified(file, meta).map(Some)
    }
}
