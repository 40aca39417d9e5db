//! Loading the state directory at start: find what each stable symlink points
//! at, re-check its metadata and digest, and sweep what a crash left behind.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs;
use std::io;
use std::path::Path;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::bundles::{BundleMeta, bundle_digest};
use super::versions::{ResourceMeta, meta_name, parse_target};
use super::{
    CREDENTIALS_DIR, RESOURCES_DIR, SECRETS_DIR, StoreError, TEMP_MARK, VERSION_MARK, check_name,
    fsio,
};
use crate::resource_path::ResourcePath;

/// One directory entry with a UTF-8 name.
struct Entry {
    name: String,
    kind: fs::FileType,
}

/// The entries of `dir` (none if it does not exist); non-UTF-8 names are skipped.
fn list_dir(dir: &Path) -> Result<Vec<Entry>, StoreError> {
    let read = match fs::read_dir(dir) {
        Ok(read) => read,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(fsio::io_err("list", dir)(e)),
    };
    let mut entries = Vec::new();
    for entry in read {
        let entry = entry.map_err(fsio::io_err("list", dir))?;
        let kind = entry
            .file_type()
            .map_err(fsio::io_err("stat", &entry.path()))?;
        match entry.file_name().into_string() {
            Ok(name) => entries.push(Entry { name, kind }),
            Err(_) => tracing::warn!(path = %entry.path().display(), "ignoring non-UTF-8 name"),
        }
    }
    Ok(entries)
}

/// Sweep temp and unreferenced versioned entries of `dir`, and return the
/// symlinks (name, target, version) that name a version.
fn scan_versions(dir: &Path) -> Result<Vec<(String, String, u64)>, StoreError> {
    let entries = list_dir(dir)?;
    let mut links = Vec::new();
    let mut referenced = HashSet::new();
    let mut versioned = Vec::new();
    for entry in entries {
        let path = dir.join(&entry.name);
        if entry.name.starts_with(TEMP_MARK) {
            tracing::info!(path = %path.display(), "removing temp file left by a crash");
            fsio::remove_quietly(&path);
        } else if entry.name.contains(VERSION_MARK) {
            versioned.push(entry.name);
        } else if entry.kind.is_symlink() {
            let target = fs::read_link(&path).map_err(fsio::io_err("read symlink", &path))?;
            let target = target.to_str().unwrap_or_default().to_owned();
            match parse_target(&entry.name, &target) {
                Some(version) => {
                    referenced.insert(meta_name(&target));
                    referenced.insert(target.clone());
                    links.push((entry.name, target, version));
                }
                None => {
                    tracing::warn!(path = %path.display(), target, "symlink not written by the store; ignored");
                }
            }
        } else {
            tracing::warn!(path = %path.display(), "entry not written by the store; ignored");
        }
    }
    for name in versioned {
        if !referenced.contains(&name) {
            tracing::info!(path = %dir.join(&name).display(), "removing version no symlink points at");
            fsio::remove_quietly(&dir.join(&name));
        }
    }
    Ok(links)
}

fn read_meta<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, StoreError> {
    let bytes = fs::read(path).map_err(fsio::io_err("read", path))?;
    serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
        path: path.to_path_buf(),
        reason: format!("bad metadata: {e}"),
    })
}

pub(super) fn resources(root: &Path) -> Result<BTreeMap<ResourcePath, ResourceMeta>, StoreError> {
    let base = root.join(RESOURCES_DIR);
    let mut held = BTreeMap::new();
    for repo in list_dir(&base)? {
        if !repo.kind.is_dir() {
            continue;
        }
        for kind in list_dir(&base.join(&repo.name))? {
            if !kind.kind.is_dir() {
                continue;
            }
            let dir = base.join(&repo.name).join(&kind.name);
            for (tag, target, version) in scan_versions(&dir)? {
                let Ok(path) = ResourcePath::new(repo.name.as_str(), kind.name.as_str(), tag)
                else {
                    tracing::warn!(dir = %dir.display(), "skipping entry that is no resource path");
                    continue;
                };
                match verify_version(&dir, &path.to_string(), &target, version) {
                    Ok(meta) => {
                        held.insert(path, meta);
                    }
                    Err(e) => {
                        tracing::warn!(uri = %path, version, error = %e, "held version failed its check; forgetting it");
                    }
                }
            }
        }
    }
    Ok(held)
}

/// Local secrets (`secrets/<name>` symlinks), checked like resources.
pub(super) fn secrets(root: &Path) -> Result<BTreeMap<String, ResourceMeta>, StoreError> {
    let dir = root.join(SECRETS_DIR);
    let mut held = BTreeMap::new();
    for (name, target, version) in scan_versions(&dir)? {
        if check_name("secret name", &name).is_err() {
            continue;
        }
        match verify_version(&dir, &name, &target, version) {
            Ok(meta) => {
                held.insert(name, meta);
            }
            Err(e) => {
                tracing::warn!(name, version, error = %e, "held secret failed its check; forgetting it");
            }
        }
    }
    Ok(held)
}

/// Check one held version of a single-file entry: its metadata names `uri` and
/// `version`, and its data matches the recorded digest.
fn verify_version(
    dir: &Path,
    uri: &str,
    target: &str,
    version: u64,
) -> Result<ResourceMeta, StoreError> {
    let meta_path = dir.join(meta_name(target));
    let meta: ResourceMeta = read_meta(&meta_path)?;
    if meta.version != version || meta.uri != uri {
        return Err(StoreError::Corrupt {
            path: meta_path,
            reason: format!("metadata names {} v{}", meta.uri, meta.version),
        });
    }
    let data_path = dir.join(target);
    let data = fsio::read_secret_file(&data_path)?;
    let actual = hex::encode(Sha256::digest(&data));
    if actual != meta.sha256 {
        return Err(StoreError::Corrupt {
            path: data_path,
            reason: format!("sha256 is {actual}, metadata says {}", meta.sha256),
        });
    }
    Ok(meta)
}

pub(super) fn bundles(root: &Path) -> Result<BTreeMap<String, BundleMeta>, StoreError> {
    let dir = root.join(CREDENTIALS_DIR);
    let mut held = BTreeMap::new();
    for (id, target, version) in scan_versions(&dir)? {
        if check_name("bundle id", &id).is_err() {
            continue;
        }
        match verify_bundle(&dir, &id, &target, version) {
            Ok(meta) => {
                held.insert(id, meta);
            }
            Err(e) => {
                tracing::warn!(id, version, error = %e, "held bundle failed its check; forgetting it");
            }
        }
    }
    Ok(held)
}

fn verify_bundle(
    dir: &Path,
    id: &str,
    target: &str,
    version: u64,
) -> Result<BundleMeta, StoreError> {
    let meta_path = dir.join(meta_name(target));
    let meta: BundleMeta = read_meta(&meta_path)?;
    let names: BTreeSet<&str> = meta.files.iter().map(|f| f.name.as_str()).collect();
    if meta.version != version || meta.id != id || names.len() != meta.files.len() {
        return Err(StoreError::Corrupt {
            path: meta_path,
            reason: format!("metadata names bundle {} v{}", meta.id, meta.version),
        });
    }
    let mut contents = Vec::with_capacity(meta.files.len());
    for file in &meta.files {
        check_name("credential file name", &file.name)?;
        contents.push(fsio::read_secret_file(&dir.join(target).join(&file.name))?);
    }
    let actual = bundle_digest(
        meta.files
            .iter()
            .zip(&contents)
            .map(|(f, c)| (f.name.as_str(), &c[..])),
    )?;
    if actual != meta.sha256 {
        return Err(StoreError::Corrupt {
            path: dir.join(target),
            reason: format!("bundle sha256 is {actual}, metadata says {}", meta.sha256),
        });
    }
    Ok(meta)
}
