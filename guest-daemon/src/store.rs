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

mod fsio;
mod load;

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use rpc_defs::HeldResource;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::resource_path::ResourcePath;
use crate::tee_key::{KeyError, TeeKeyPair};

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

/// Errors of the state store. Messages name the path and never hold contents.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file-system operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A newer version is held; the offered one is refused.
    #[error("downgrade refused for {what}: holds version {held}, offered {offered}")]
    Downgrade {
        /// Resource URI or `credentials/<id>`.
        what: String,
        /// Held version.
        held: u64,
        /// Offered version.
        offered: u64,
    },
    /// The same version is held with other contents.
    #[error(
        "{what} version {version} is already held with other contents (sha256 {held_sha256}, offered {offered_sha256})"
    )]
    VersionConflict {
        /// Resource URI or `credentials/<id>`.
        what: String,
        /// The version both claim.
        version: u64,
        /// Digest held.
        held_sha256: String,
        /// Digest offered.
        offered_sha256: String,
    },
    /// A name is not a plain `[A-Za-z0-9._-]+` file name.
    #[error("invalid {what} {name:?}: {reason}")]
    InvalidName {
        /// Which kind of name.
        what: &'static str,
        /// The name (cut to 64 characters).
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// A credential bundle is malformed (mode, duplicates, size).
    #[error("invalid credential bundle: {0}")]
    InvalidBundle(String),
    /// Something in the state directory is not what the store wrote.
    #[error("unexpected state at {}: {reason}", path.display())]
    Corrupt {
        /// Where.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The TEE key file cannot be parsed, or a key cannot be made or encoded.
    #[error("TEE key {}: {source}", path.display())]
    Key {
        /// The key file.
        path: PathBuf,
        /// Why.
        #[source]
        source: KeyError,
    },
}

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

/// One file of a credential bundle. `Debug` hides the contents.
#[derive(Clone, PartialEq, Eq)]
pub struct BundleFile {
    /// Plain file name.
    pub name: String,
    /// Unix permission bits (no group/other write).
    pub mode: u32,
    /// File contents.
    pub contents: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for BundleFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BundleFile")
            .field("name", &self.name)
            .field("mode", &format_args!("{:#o}", self.mode))
            .field(
                "contents",
                &format_args!("[redacted {} bytes]", self.contents.len()),
            )
            .finish()
    }
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

/// What is known of a held bundle without reading its files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BundleInfo {
    /// Bundle id.
    pub id: String,
    /// Held version.
    pub version: u64,
    /// Unix time after which the credentials expire.
    pub not_after: u64,
    /// Unix time when this version was installed.
    pub applied_at: u64,
}

/// A held credential bundle, as [`StateStore::read_bundle`] returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldBundle {
    /// Bundle id.
    pub id: String,
    /// Held version.
    pub version: u64,
    /// Unix time after which the credentials expire.
    pub not_after: u64,
    /// The directory holding exactly this version's files.
    pub dir: PathBuf,
    /// The files, sorted by name.
    pub files: Vec<BundleFile>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ResourceMeta {
    uri: String,
    version: u64,
    sha256: String,
    applied_at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct FileMeta {
    name: String,
    mode: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct BundleMeta {
    id: String,
    version: u64,
    sha256: String,
    applied_at: u64,
    not_after: u64,
    files: Vec<FileMeta>,
}

#[derive(Debug, Default)]
struct Index {
    resources: BTreeMap<ResourcePath, ResourceMeta>,
    bundles: BTreeMap<String, BundleMeta>,
    /// Secret name -> metadata (`uri` holds the name).
    secrets: BTreeMap<String, ResourceMeta>,
}

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

    /// The stable path a workload reads for `path` (a symlink to the held version).
    pub fn resource_file(&self, path: &ResourcePath) -> PathBuf {
        self.root
            .join(RESOURCES_DIR)
            .join(path.repo())
            .join(path.kind())
            .join(path.tag())
    }

    /// The stable directory of bundle `id` (a symlink to the held version's directory).
    pub fn bundle_dir(&self, id: &str) -> PathBuf {
        self.root.join(CREDENTIALS_DIR).join(id)
    }

    fn lock(&self) -> MutexGuard<'_, Index> {
        // The index is only changed after a commit, so it is consistent even
        // if a holder panicked.
        self.index.lock().unwrap_or_else(|e| e.into_inner())
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
        let vname = versioned_name(path.tag(), version);
        let meta = ResourceMeta {
            uri: path.to_string(),
            version,
            sha256: sha256.clone(),
            applied_at: unix_now(),
        };
        let written = write_version_files(&dir, &vname, plaintext, &meta)
            .and_then(|()| fsio::swap_symlink(&dir, path.tag(), &vname));
        if let Err(e) = written {
            remove_version(&dir, &vname);
            return Err(e);
        }
        index.resources.insert(path.clone(), meta);
        drop(index);
        if let Some(old) = previous {
            remove_version(&dir, &versioned_name(path.tag(), old));
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
        let data = fsio::read_secret_file(&file)?;
        let actual = hex::encode(Sha256::digest(&data));
        if actual != meta.sha256 {
            return Err(StoreError::Corrupt {
                path: file,
                reason: format!("sha256 is {actual}, metadata says {}", meta.sha256),
            });
        }
        Ok(Some(HeldPlaintext {
            version: meta.version,
            plaintext: data,
        }))
    }

    /// Install `version` of bundle `id`: all files of the new version are written
    /// into `credentials/<id>@v<N>/` before the `credentials/<id>` symlink is
    /// switched. Idempotent and never downgrading, like [`Self::apply_resource`].
    pub fn install_bundle(
        &self,
        id: &str,
        version: u64,
        files: Vec<BundleFile>,
        not_after: u64,
    ) -> Result<ApplyOutcome, StoreError> {
        check_name("bundle id", id)?;
        let files = check_bundle_files(files)?;
        let sha256 = bundle_digest(files.iter().map(|f| (f.name.as_str(), &f.contents[..])))?;
        let file_metas: Vec<FileMeta> = files
            .iter()
            .map(|f| FileMeta {
                name: f.name.clone(),
                mode: f.mode,
            })
            .collect();
        let what = format!("{CREDENTIALS_URI_PREFIX}{id}");
        let mut index = self.lock();
        // Modes are part of what a version means: fold them into the comparison.
        let held = index.bundles.get(id).map(|b| {
            let sha = if b.files == file_metas {
                b.sha256.clone()
            } else {
                format!("{} (other file list)", b.sha256)
            };
            (b.version, sha)
        });
        if let Some(outcome) = check_offer(&what, held.as_ref(), version, &sha256)? {
            return Ok(outcome);
        }
        let previous = held.map(|(v, _)| v);
        let dir = fsio::ensure_dir(&self.root, &[CREDENTIALS_DIR])?;
        let vname = versioned_name(id, version);
        let meta = BundleMeta {
            id: id.to_owned(),
            version,
            sha256: sha256.clone(),
            applied_at: unix_now(),
            not_after,
            files: file_metas,
        };
        let written = write_bundle_dir(&dir, &vname, &files, &meta)
            .and_then(|()| fsio::swap_symlink(&dir, id, &vname));
        if let Err(e) = written {
            remove_version(&dir, &vname);
            return Err(e);
        }
        index.bundles.insert(id.to_owned(), meta);
        drop(index);
        if let Some(old) = previous {
            remove_version(&dir, &versioned_name(id, old));
        }
        Ok(ApplyOutcome {
            already_held: false,
            version,
            sha256,
        })
    }

    /// The held version of bundle `id` with its files, if any.
    pub fn read_bundle(&self, id: &str) -> Result<Option<HeldBundle>, StoreError> {
        let index = self.lock();
        let Some(meta) = index.bundles.get(id) else {
            return Ok(None);
        };
        let dir = self
            .root
            .join(CREDENTIALS_DIR)
            .join(versioned_name(id, meta.version));
        let mut files = Vec::with_capacity(meta.files.len());
        for file in &meta.files {
            files.push(BundleFile {
                name: file.name.clone(),
                mode: file.mode,
                contents: fsio::read_secret_file(&dir.join(&file.name))?,
            });
        }
        Ok(Some(HeldBundle {
            id: meta.id.clone(),
            version: meta.version,
            not_after: meta.not_after,
            dir,
            files,
        }))
    }

    /// Version, expiry and install time of bundle `id`, if held (no file is read).
    pub fn bundle_info(&self, id: &str) -> Option<BundleInfo> {
        self.lock().bundles.get(id).map(|b| BundleInfo {
            id: b.id.clone(),
            version: b.version,
            not_after: b.not_after,
            applied_at: b.applied_at,
        })
    }

    /// Held bundle ids and their versions.
    pub fn bundle_versions(&self) -> BTreeMap<String, u64> {
        self.lock()
            .bundles
            .iter()
            .map(|(id, b)| (id.clone(), b.version))
            .collect()
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
        let vname = versioned_name(name, version);
        let meta = ResourceMeta {
            uri: name.to_owned(),
            version,
            sha256: sha256.clone(),
            applied_at: unix_now(),
        };
        let written = write_version_files(&dir, &vname, bytes, &meta)
            .and_then(|()| fsio::swap_symlink(&dir, name, &vname));
        if let Err(e) = written {
            remove_version(&dir, &vname);
            return Err(e);
        }
        index.secrets.insert(name.to_owned(), meta);
        drop(index);
        if let Some(old) = previous {
            remove_version(&dir, &versioned_name(name, old));
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
        let data = fsio::read_secret_file(&file)?;
        let actual = hex::encode(Sha256::digest(&data));
        if actual != meta.sha256 {
            return Err(StoreError::Corrupt {
                path: file,
                reason: format!("sha256 is {actual}, metadata says {}", meta.sha256),
            });
        }
        Ok(Some(HeldPlaintext {
            version: meta.version,
            plaintext: data,
        }))
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

/// Check a plain name: `[A-Za-z0-9._-]+`, not `.` or `..`, at most [`MAX_NAME_LEN`] bytes.
pub fn check_name(what: &'static str, name: &str) -> Result<(), StoreError> {
    let reason = if name.is_empty() {
        "is empty"
    } else if name.len() > MAX_NAME_LEN {
        "is longer than 200 bytes"
    } else if name == "." || name == ".." {
        "may not be \".\" or \"..\""
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        "may only hold A-Z a-z 0-9 . _ -"
    } else {
        return Ok(());
    };
    Err(StoreError::InvalidName {
        what,
        name: name.chars().take(64).collect(),
        reason,
    })
}

/// Check a credential file mode: permission bits only, owner-readable, no group/other write.
pub fn check_mode(name: &str, mode: u32) -> Result<(), StoreError> {
    if mode & !0o777 != 0 || mode & 0o022 != 0 || mode & 0o400 == 0 {
        return Err(StoreError::InvalidBundle(format!(
            "file {name:?} has mode {mode:#o}; allowed are permission bits with owner read and no group/other write (e.g. 0600, 0644)"
        )));
    }
    Ok(())
}

/// Check names, modes, count and uniqueness; return the files sorted by name.
fn check_bundle_files(mut files: Vec<BundleFile>) -> Result<Vec<BundleFile>, StoreError> {
    if files.is_empty() {
        return Err(StoreError::InvalidBundle("bundle holds no files".into()));
    }
    if files.len() > MAX_BUNDLE_FILES {
        return Err(StoreError::InvalidBundle(format!(
            "bundle holds {} files, at most {MAX_BUNDLE_FILES} allowed",
            files.len()
        )));
    }
    for file in &files {
        check_name("credential file name", &file.name)?;
        check_mode(&file.name, file.mode)?;
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(pair) = files.windows(2).find(|w| w[0].name == w[1].name) {
        return Err(StoreError::InvalidBundle(format!(
            "file {:?} is listed twice",
            pair[0].name
        )));
    }
    Ok(files)
}

/// SHA-256 (hex) of the bundle as a CBOR map name -> byte string, keys sorted:
/// the same bytes the KBS seals when it encodes a `BTreeMap<String, ByteBuf>`.
fn bundle_digest<'a>(
    files: impl Iterator<Item = (&'a str, &'a [u8])>,
) -> Result<String, StoreError> {
    let map: BTreeMap<&str, &serde_bytes::Bytes> = files
        .map(|(name, bytes)| (name, serde_bytes::Bytes::new(bytes)))
        .collect();
    let size: usize = map.iter().map(|(n, b)| n.len() + b.len() + 18).sum();
    let mut encoded = Zeroizing::new(Vec::with_capacity(size + 9));
    ciborium::into_writer(&map, &mut *encoded)
        .map_err(|e| StoreError::InvalidBundle(e.to_string()))?;
    Ok(hex::encode(Sha256::digest(&encoded[..])))
}

/// Compare an offer with what is held (version, sha256): `Some(outcome)` for an
/// idempotent replay, `None` to go ahead and write, or the refusal.
fn check_offer(
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

fn versioned_name(name: &str, version: u64) -> String {
    format!("{name}{VERSION_MARK}{version}")
}

fn meta_name(vname: &str) -> String {
    format!("{vname}{META_SUFFIX}")
}

/// The version in a symlink target `<name>@v<N>` (digits only), if it is one.
fn parse_target(name: &str, target: &str) -> Option<u64> {
    let digits = target.strip_prefix(name)?.strip_prefix(VERSION_MARK)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn to_json<T: Serialize>(value: &T, path: &Path) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec_pretty(value).map_err(|e| fsio::io_err("encode", path)(io::Error::other(e)))
}

fn write_version_files(
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

fn write_bundle_dir(
    dir: &Path,
    vname: &str,
    files: &[BundleFile],
    meta: &BundleMeta,
) -> Result<(), StoreError> {
    let target = dir.join(vname);
    // Left over from an earlier failed attempt at this version (no symlink
    // points at it: that version is not held).
    fsio::remove_quietly(&target);
    let tmp = dir.join(fsio::temp_name(vname));
    let filled = fsio::create_dir(&tmp).and_then(|()| {
        for file in files {
            fsio::create_synced(&tmp.join(&file.name), &file.contents, file.mode)?;
        }
        fsio::sync_dir(&tmp)?;
        fs::rename(&tmp, &target).map_err(fsio::io_err("rename into", &target))
    });
    if let Err(e) = filled {
        fsio::remove_quietly(&tmp);
        return Err(e);
    }
    let json = to_json(meta, &dir.join(meta_name(vname)))?;
    fsio::write_replace(dir, &meta_name(vname), &json, FILE_MODE)?;
    fsio::sync_dir(dir)
}

/// Delete a version's data (file or directory) and metadata; best effort.
fn remove_version(dir: &Path, vname: &str) {
    fsio::remove_quietly(&dir.join(vname));
    fsio::remove_quietly(&dir.join(meta_name(vname)));
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

#[cfg(test)]
pub(crate) mod tests;
