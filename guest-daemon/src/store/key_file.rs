//! The TEE key's file, `tee_key.pem` (PKCS#8 PEM, 0600): loaded at start, created once.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::{FILE_MODE, StateStore, StoreError, TEE_KEY_FILE, fsio};
use crate::tee_key::{KeyError, TeeKeyPair};

impl StateStore {
    /// Load the TEE key from `tee_key.pem`, or make one with `generate` and
    /// save it (0600), so a restarted daemon keeps its key.
    pub fn load_or_create_tee_key(
        &self,
        generate: impl FnOnce() -> TeeKeyPair,
    ) -> Result<TeeKeyPair, StoreError> {
        self.try_load_or_create_tee_key(|| Ok(generate()))
    }

    /// [`Self::load_or_create_tee_key`] with a fallible generator (RSA keys).
    pub fn try_load_or_create_tee_key(
        &self,
        generate: impl FnOnce() -> Result<TeeKeyPair, KeyError>,
    ) -> Result<TeeKeyPair, StoreError> {
        let _index = self.lock();
        let path = self.root.join(TEE_KEY_FILE);
        let key_err = |source| StoreError::Key {
            path: path.clone(),
            source,
        };
        if let Some(pem) = fsio::read_if_exists(&path)? {
            let pem = std::str::from_utf8(&pem).map_err(|_| key_err(KeyError::UnrecognisedPem))?;
            let key = TeeKeyPair::from_pem(pem).map_err(key_err)?;
            tighten_mode(&path);
            tracing::info!(path = %path.display(), "loaded TEE key");
            return Ok(key);
        }
        let key = generate().map_err(key_err)?;
        let pem = key.to_pkcs8_pem().map_err(key_err)?;
        fsio::write_replace(&self.root, TEE_KEY_FILE, pem.as_bytes(), FILE_MODE)?;
        fsio::sync_dir(&self.root)?;
        tracing::info!(path = %path.display(), "created TEE key");
        Ok(key)
    }
}

/// Make an existing key file 0600 if it is more open than that.
fn tighten_mode(path: &Path) {
    let mode = fs::metadata(path).map_or(0, |m| m.permissions().mode());
    if mode & 0o077 != 0 {
        tracing::warn!(path = %path.display(), "TEE key file was readable by others; making it 0600");
        if let Err(e) = fs::set_permissions(path, fs::Permissions::from_mode(FILE_MODE)) {
            tracing::warn!(path = %path.display(), error = %e, "cannot chmod TEE key file");
        }
    }
}
