//! Credential bundles: `credentials/<id>`, a versioned directory of files with their modes,
//! installed whole (every file written before the symlink switches).

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::versions::{
    ApplyOutcome, check_offer, meta_name, remove_version, to_json, versioned_name,
};
use super::{
    CREDENTIALS_DIR, CREDENTIALS_URI_PREFIX, FILE_MODE, MAX_BUNDLE_FILES, StateStore, StoreError,
    check_mode, check_name, fsio, unix_now,
};

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
pub(super) struct FileMeta {
    pub name: String,
    pub mode: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct BundleMeta {
    pub id: String,
    pub version: u64,
    pub sha256: String,
    pub applied_at: u64,
    pub not_after: u64,
    pub files: Vec<FileMeta>,
}

impl StateStore {
    /// The stable directory of bundle `id` (a symlink to the held version's directory).
    pub fn bundle_dir(&self, id: &str) -> PathBuf {
        self.root.join(CREDENTIALS_DIR).join(id)
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
pub(super) fn bundle_digest<'a>(
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn bundle_digest_is_the_sorted_cbor_map() {
        let files = [("b", &b"2"[..]), ("a", &b"1"[..])];
        let map: BTreeMap<String, serde_bytes::ByteBuf> = files
            .iter()
            .map(|(n, b)| (n.to_string(), serde_bytes::ByteBuf::from(b.to_vec())))
            .collect();
        let mut encoded = Vec::new();
        ciborium::into_writer(&map, &mut encoded).unwrap();
        assert_eq!(
            bundle_digest(files.into_iter()).unwrap(),
            hex::encode(Sha256::digest(&encoded))
        );
    }
}
