//! What can go wrong in the state store. Messages name the path and never hold contents.

use std::io;
use std::path::PathBuf;

use crate::tee_key::KeyError;

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
