//! Which names and file modes the store accepts: plain `[A-Za-z0-9._-]+` names (so the `@`
//! of a versioned name and the `~` of a temp name never collide with one), and credential
//! modes that never open a file to group or other writers.

use super::{MAX_NAME_LEN, StoreError};

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
