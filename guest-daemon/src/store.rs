//! The daemon's state directory: resources, credential bundles, local secrets
//! and the TEE key, written so that a crash at any instant leaves either the
//! old or the new version in place, never a mix.
//!
//! Layout (directories 0700, files 0600 unless a bundle says otherwise):
//!
//! ```text
//! <state>/tee_key.pem                              PKCS#8 PEM of the TEE key
//! <state>/resources/<repo>/<type>/<tag>            symlink -> <tag>@v<N>
//! <state>/resources/<repo>/<type>/<tag>@v<N>       plaintext of version N
//! <state>/resources/<repo>/<type>/<tag>@v<N>.json  {uri, version, sha256, applied_at}
//! <state>/credentials/<id>                         symlink -> <id>@v<N>
//! <state>/credentials/<id>@v<N>/<file>             the bundle's files, with their modes
//! <state>/credentials/<id>@v<N>.json               {id, version, sha256, applied_at, not_after, files}
//! <state>/secrets/<name>                           symlink -> <name>@v<N>: a secret the
//!                                                  workload owner put over splitapi
//! <state>/secrets/<name>@v<N>                      its bytes; <name>@v<N>.json as for resources
//! ```
//!
//! Names (tags, bundle ids, file names) are `[A-Za-z0-9._-]+`, so the `@` of a
//! versioned name and the `~` that starts every temp name never collide with one.
//!
//! Crash safety: a new version is written under its own versioned names (data,
//! then metadata; each temp file + write + fsync + rename, then fsync of the
//! directory), and only then committed by atomically renaming a fresh symlink
//! over the stable name, followed by another directory fsync. The symlink's
//! target names the version, and that version's data and metadata were durable
//! before the symlink could point at them, so (plaintext, version) is always
//! consistent and the previous version stays readable until the switch. A
//! workload just reads the stable path. Old versions are deleted after the
//! switch; temp files and versions no symlink points at (a crash before the
//! switch) are swept on [`StateStore::open`], which also re-checks each held
//! version's SHA-256 and forgets (so the KBS re-pushes) any that do not match.
//!
//! All methods do blocking `std::fs` I/O and fsyncs: async callers wrap them in
//! `tokio::task::spawn_blocking`. One mutex serialises every change, so two
//! writers in one process never interleave; two daemons must not share a dir.
//!
//! Inside: `resources`, `bundles` and `secrets` each store one kind of item; `versions` is
//! the versioned-file protocol the resources and secrets share; `key_file` holds the TEE
//! key; `names` says which names and modes are valid; `load` re-reads the directory at
//! start; `fsio` is the durable file-system steps everything is built from.

mod bundles;
mod error;
mod fsio;
mod key_file;
mod load;
mod names;
mod resources;
mod secrets;
mod versions;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use rpc_defs::HeldResource;

use crate::resource_path::ResourcePath;

pub use bundles::{BundleFile, BundleInfo, HeldBundle};
pub use error::StoreError;
pub use names::{check_mode, check_name};
pub use secrets::{HeldSecret, StoredSecret};
pub use versions::{ApplyOutcome, HeldPlaintext};

use bundles::BundleMeta;
use versions::ResourceMeta;

/// Mode of every directory the store creates.
pub const DIR_MODE: u32 = 0o700;
/// Mode of plaintext, metadata, secret and key files.
pub const FILE_MODE: u32 = 0o600;
/// Longest tag, bundle id, file or secret name: leaves room in the 255-byte
/// file-name limit for the `@v<N>.json` and temp suffixes.
pub const MAX_NAME_LEN: usize = 200;
/// Most files one credential bundle may hold.
pub const MAX_BUNDLE_FILES: usize = 64;
/// `held()` reports a bundle `id` under this URI prefix.
pub const CREDENTIALS_URI_PREFIX: &str = "credentials/";

const RESOURCES_DIR: &str = "resources";
const CREDENTIALS_DIR: &str = "credentials";
const SECRETS_DIR: &str = "secrets";
const TEE_KEY_FILE: &str = "tee_key.pem";
const VERSION_MARK: &str = "@v";
const META_SUFFIX: &str = ".json";
/// First character of every temp name; not valid in any name.
const TEMP_MARK: char = '~';

#[derive(Debug, Default)]
struct Index {
    resources: BTreeMap<ResourcePath, ResourceMeta>,
    bundles: BTreeMap<String, BundleMeta>,
    /// Secret name -> metadata (`uri` holds the name).
    secrets: BTreeMap<String, ResourceMeta>,
}

/// The daemon's state directory (see the module docs). Blocking I/O throughout.
#[derive(Debug)]
pub struct StateStore {
    root: PathBuf,
    index: Mutex<Index>,
}

impl StateStore {
    /// Open (creating, 0700) the state directory and load what it holds.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(&root)
            .map_err(fsio::io_err("create state directory", &root))?;
        let meta = fs::metadata(&root).map_err(fsio::io_err("stat", &root))?;
        if !meta.is_dir() {
            return Err(StoreError::Corrupt {
                path: root,
                reason: "state path is not a directory".into(),
            });
        }
        if meta.permissions().mode() & 0o077 != 0 {
            // Tighten, never loosen: a 0500 (read-only) dir stays as it is.
            if let Err(e) = fs::set_permissions(&root, fs::Permissions::from_mode(DIR_MODE)) {
                tracing::warn!(path = %root.display(), error = %e, "cannot make state directory 0700");
            }
        }
        let index = Index {
            resources: load::resources(&root)?,
            bundles: load::bundles(&root)?,
            secrets: load::secrets(&root)?,
        };
        tracing::info!(
            path = %root.display(),
            resources = index.resources.len(),
            bundles = index.bundles.len(),
            secrets = index.secrets.len(),
            "state loaded"
        );
        Ok(Self {
            root,
            index: Mutex::new(index),
        })
    }

    /// The state directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn lock(&self) -> MutexGuard<'_, Index> {
        // The index is only changed after a commit, so it is consistent even
        // if a holder panicked.
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Everything held: resources, then bundles as `credentials/<id>` (whose
    /// sha256 is over the bundle's CBOR map name -> bytes, keys sorted).
    pub fn held(&self) -> Vec<HeldResource> {
        let index = self.lock();
        let resources = index.resources.values().map(|m| HeldResource {
            uri: m.uri.clone(),
            version: m.version,
            sha256: m.sha256.clone(),
            applied_at: m.applied_at,
        });
        let bundles = index.bundles.values().map(|b| HeldResource {
            uri: format!("{CREDENTIALS_URI_PREFIX}{}", b.id),
            version: b.version,
            sha256: b.sha256.clone(),
            applied_at: b.applied_at,
        });
        resources.chain(bundles).collect()
    }

    /// Problems that would stop the store from writing (empty when healthy):
    /// one create + delete of a probe file per state directory.
    pub fn check_writable(&self) -> Vec<String> {
        let mut dirs = vec![self.root.clone()];
        for sub in [RESOURCES_DIR, CREDENTIALS_DIR, SECRETS_DIR] {
            let dir = self.root.join(sub);
            if dir.is_dir() {
                dirs.push(dir);
            }
        }
        dirs.iter()
            .filter_map(|dir| fsio::probe_writable(dir).err())
            .map(|e| format!("state directory not writable: {e}"))
            .collect()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
pub(crate) mod tests;
