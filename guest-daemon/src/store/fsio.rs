//! Durable file-system steps the state store is built from: write to a temp
//! name, fsync, rename, fsync the directory. Every error names its path.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::{DIR_MODE, StoreError, TEMP_MARK};

/// Builds the `map_err` closure for an I/O step on `path`.
pub(super) fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { op, path, source }
}

/// A fresh temp name for `name`; the mark keeps it apart from every valid name.
pub(super) fn temp_name(name: &str) -> String {
    format!("{TEMP_MARK}{name}.{:016x}", rand::random::<u64>())
}

/// Create `path` (which must not exist) with exactly `mode`, write `bytes`, fsync.
pub(super) fn create_synced(path: &Path, bytes: &[u8], mode: u32) -> Result<(), StoreError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io_err("create", path))?;
    // The umask may have cleared bits the caller asked for (0644 certificates).
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_err("chmod", path))?;
    file.write_all(bytes).map_err(io_err("write", path))?;
    file.sync_all().map_err(io_err("fsync", path))
}

/// Atomically replace `dir/name` with `bytes` (mode `mode`): temp file, fsync,
/// rename. The caller fsyncs `dir` (once, after its last rename).
pub(super) fn write_replace(
    dir: &Path,
    name: &str,
    bytes: &[u8],
    mode: u32,
) -> Result<PathBuf, StoreError> {
    let tmp = dir.join(temp_name(name));
    let target = dir.join(name);
    let result = create_synced(&tmp, bytes, mode)
        .and_then(|()| fs::rename(&tmp, &target).map_err(io_err("rename into", &target)));
    if result.is_err() {
        remove_quietly(&tmp);
    }
    result.map(|()| target)
}

/// Make the renames in `dir` durable.
pub(super) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

/// Atomically point the symlink `dir/link` at `target` (relative), then fsync `dir`.
pub(super) fn swap_symlink(dir: &Path, link: &str, target: &str) -> Result<(), StoreError> {
    let tmp = dir.join(temp_name(link));
    let path = dir.join(link);
    let result = symlink(target, &tmp)
        .map_err(io_err("create symlink", &tmp))
        .and_then(|()| fs::rename(&tmp, &path).map_err(io_err("rename symlink into", &path)));
    if result.is_err() {
        remove_quietly(&tmp);
    }
    result?;
    sync_dir(dir)
}

/// Create a directory with mode 0700 (exactly, whatever the umask).
pub(super) fn create_dir(path: &Path) -> Result<(), StoreError> {
    DirBuilder::new()
        .mode(DIR_MODE)
        .create(path)
        .map_err(io_err("create directory", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(DIR_MODE)).map_err(io_err("chmod", path))
}

/// `root/c1/c2/...`, creating missing directories (0700) and fsyncing each new
/// directory's parent so the directory entry survives a crash.
pub(super) fn ensure_dir(root: &Path, components: &[&str]) -> Result<PathBuf, StoreError> {
    let mut dir = root.to_path_buf();
    for component in components {
        let parent = dir.clone();
        dir.push(component);
        match fs::symlink_metadata(&dir) {
            Ok(meta) if meta.is_dir() => continue,
            Ok(_) => {
                return Err(StoreError::Corrupt {
                    path: dir,
                    reason: "expected a directory".into(),
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("stat", &dir)(e)),
        }
        create_dir(&dir)?;
        sync_dir(&parent)?;
    }
    Ok(dir)
}

/// Read a whole file into zeroizing memory.
pub(super) fn read_secret_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, StoreError> {
    let mut file = File::open(path).map_err(io_err("open", path))?;
    let len = file.metadata().map_err(io_err("stat", path))?.len();
    // Size the buffer up front so no reallocation leaves plaintext behind.
    let mut buf = Zeroizing::new(Vec::with_capacity(
        usize::try_from(len).unwrap_or(0).saturating_add(1),
    ));
    file.read_to_end(&mut buf).map_err(io_err("read", path))?;
    Ok(buf)
}

/// Like [`read_secret_file`], but a missing file is `None`.
pub(super) fn read_if_exists(path: &Path) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError> {
    match read_secret_file(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(StoreError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Remove a file, symlink or directory tree, logging (not failing) on error:
/// used for garbage that is safe to leave behind.
pub(super) fn remove_quietly(path: &Path) {
    let result = match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove stale state file");
    }
}

/// Try to create and delete a file in `dir`: the cheapest honest writability test
/// (it also catches read-only mounts, which mode bits do not show).
pub(super) fn probe_writable(dir: &Path) -> Result<(), StoreError> {
    let path = dir.join(temp_name("health"));
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(io_err("create probe file in", dir))?;
    fs::remove_file(&path).map_err(io_err("remove probe file", &path))
}
