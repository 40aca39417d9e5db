//! Small file-system helpers: private directories, private files written atomically
//! under unpredictable temporary names (never through a link someone planted), and an
//! exclusive lock file for what processes sharing a data directory must do one at a time.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of every private file this crate writes.
pub const PRIVATE_FILE_MODE: u32 = 0o600;
/// Mode of every directory this crate creates.
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// Create `dir` and its missing parents with mode 0700. A directory that exists keeps its
/// mode; the caller decides whether a wider one is worth a warning.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(dir)
}

/// Write `data` to `path` with mode 0600, replacing what is there: a fresh temp file in the
/// same directory (random name, `O_EXCL | O_NOFOLLOW`), fsync, rename, fsync of the
/// directory. A crash leaves either the old file or the new one, never half.
pub fn write_private_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let (dir, tmp) = write_temp(path, data)?;
    let result = fs::rename(&tmp, path);
    finish(&dir, &tmp, result)
}

/// Create `path` with `data` and mode 0600 only if nothing is there yet, atomically (a temp
/// file as above, then a hard link to the final name, which fails if the name exists).
/// `ErrorKind::AlreadyExists` when it does: someone else created it first (for a generated
/// key, load theirs instead of replacing a key that may already be in use).
pub fn create_private(path: &Path, data: &[u8]) -> io::Result<()> {
    let (dir, tmp) = write_temp(path, data)?;
    let result = fs::hard_link(&tmp, path).and_then(|()| fs::remove_file(&tmp));
    finish(&dir, &tmp, result)
}

/// An exclusive advisory lock (`flock`) on a file, released when dropped (or when the
/// process dies, however it dies: the kernel drops it with the descriptor).
#[derive(Debug)]
pub struct FileLock {
    _file: fs::File,
}

/// How often [`lock_exclusive`] tries again while another process holds the lock.
const LOCK_POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// Take the exclusive lock on `path` (created 0600 if missing, never through a link),
/// waiting at most `wait` for another process to release it (`ErrorKind::TimedOut` then).
/// Blocking: call it off the async runtime's worker threads.
pub fn lock_exclusive(path: &Path, wait: std::time::Duration) -> io::Result<FileLock> {
    use rustix::fs::{FlockOperation, flock};
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(PRIVATE_FILE_MODE)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)?;
    let deadline = std::time::Instant::now() + wait;
    loop {
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(FileLock { _file: file }),
            Err(e) if e == rustix::io::Errno::WOULDBLOCK || e == rustix::io::Errno::INTR => {
                if std::time::Instant::now() >= deadline {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "{} stayed locked by another process for {wait:?}",
                            path.display()
                        ),
                    ));
                }
                std::thread::sleep(LOCK_POLL);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The temp file holding `data`, beside `path`: its directory and its name.
fn write_temp(path: &Path, data: &[u8]) -> io::Result<(PathBuf, PathBuf)> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    create_private_dir(&dir)?;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp.{:016x}",
        name.to_string_lossy(),
        rand::random::<u64>()
    ));
    // O_EXCL refuses any existing name, links included; O_NOFOLLOW says so twice.
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(PRIVATE_FILE_MODE)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(&tmp)?;
    let written = f
        .set_permissions(fs::Permissions::from_mode(PRIVATE_FILE_MODE))
        .and_then(|()| f.write_all(data))
        .and_then(|()| f.sync_all());
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok((dir, tmp))
}

/// Clean up after publishing the temp file: remove it on failure, fsync the directory on
/// success.
fn finish(dir: &Path, tmp: &Path, result: io::Result<()>) -> io::Result<()> {
    match result {
        Ok(()) => {
            if let Ok(d) = fs::File::open(dir) {
                let _ = d.sync_all();
            }
            Ok(())
        }
        Err(e) => {
            let _ = fs::remove_file(tmp);
            Err(e)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().permissions().mode() & 0o777
    }

    /// issue 17 defect 14: the temp name was `.<name>.tmp.<pid>` and opened without
    /// `O_EXCL`, so a link planted there received the key (and was renamed into place).
    #[test]
    fn a_link_planted_at_a_predictable_temp_name_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        fs::write(&elsewhere, b"untouched").unwrap();
        let path = dir.path().join("kek.key");
        let planted = dir
            .path()
            .join(format!(".kek.key.tmp.{}", std::process::id()));
        symlink(&elsewhere, &planted).unwrap();

        write_private_atomic(&path, b"secret").unwrap();
        assert_eq!(fs::read(&elsewhere).unwrap(), b"untouched");
        assert!(fs::symlink_metadata(&path).unwrap().file_type().is_file());
        assert_eq!(fs::read(&path).unwrap(), b"secret");
        assert_eq!(mode(&path), PRIVATE_FILE_MODE);
        // Only the planted link and our two files: no temp file left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 3);
    }

    #[test]
    fn an_exclusive_lock_is_held_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("startup.lock");
        let held = lock_exclusive(&path, std::time::Duration::ZERO).unwrap();
        assert_eq!(mode(&path), PRIVATE_FILE_MODE);
        // flock locks belong to the open file description: a second open is another holder,
        // as another process would be.
        let err = lock_exclusive(&path, std::time::Duration::from_millis(60)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        let waiter = std::thread::spawn(move || {
            lock_exclusive(&path, std::time::Duration::from_secs(10)).map(|_| ())
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        drop(held);
        waiter.join().unwrap().unwrap();
    }

    #[test]
    fn create_private_never_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/token.key");
        create_private(&path, b"first").unwrap();
        assert_eq!(mode(&path), PRIVATE_FILE_MODE);
        assert_eq!(mode(&dir.path().join("sub")), PRIVATE_DIR_MODE);
        let err = create_private(&path, b"second").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&path).unwrap(), b"first");
        // A dangling link at the name is something there too.
        let link = dir.path().join("sub/admin.key");
        symlink(dir.path().join("nowhere"), &link).unwrap();
        assert_eq!(
            create_private(&link, b"x").unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        assert!(!dir.path().join("nowhere").exists());
        assert_eq!(fs::read_dir(dir.path().join("sub")).unwrap().count(), 2);
        // Replacing is write_private_atomic's job.
        write_private_atomic(&path, b"third").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"third");
    }
}
