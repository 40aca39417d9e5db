//! [`Token`]: the bearer credential an external plugin presents on the Guests API. Read
//! from the plugin's `token_file`, or generated there (32 random bytes, hex, mode 0600)
//! when the file does not exist yet; the operator hands the file to the plugin. Never
//! logged ([`Debug`] prints `[redacted]`), zeroized on drop, compared in constant time.

use std::path::Path;

use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// Shortest token accepted from a file, bytes (a guessable token is refused at start).
pub const MIN_TOKEN_LEN: usize = 32;
/// Longest token accepted from a file or a caller, bytes.
pub const MAX_TOKEN_LEN: usize = 512;

/// A plugin's bearer token.
pub struct Token(Zeroizing<Vec<u8>>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Token {
    /// A fresh random token.
    pub fn generate() -> Self {
        let bytes: [u8; 32] = rand::random();
        Self(Zeroizing::new(hex::encode(bytes).into_bytes()))
    }

    /// Whether `presented` is this token, in time independent of where they differ.
    pub fn matches(&self, presented: &[u8]) -> bool {
        self.0.len() == presented.len() && bool::from(self.0.as_slice().ct_eq(presented))
    }

    /// The token's bytes (to compare two tokens; never to print).
    pub(super) fn expose(&self) -> &[u8] {
        &self.0
    }

    /// Read the token in `path` (surrounding whitespace trimmed), or generate one and create
    /// the file when there is none. Errors say what is wrong, never the token.
    pub fn load_or_generate(path: &Path) -> Result<Self, String> {
        match std::fs::read(path) {
            Ok(bytes) => {
                Self::parse(&Zeroizing::new(bytes)).map_err(|e| format!("{}: {e}", path.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let token = Self::generate();
                match kbs_core::fsutil::create_private(path, &token.0) {
                    Ok(()) => {
                        tracing::info!(file = %path.display(), "generated an external plugin's Guests API token");
                        Ok(token)
                    }
                    // Created meanwhile (another KBS on the same file): use theirs.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        Self::load_or_generate(path)
                    }
                    Err(e) => Err(format!("cannot create {}: {e}", path.display())),
                }
            }
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    /// Replace the token in `path` with a fresh one (atomically, mode 0600).
    pub fn rotate(path: &Path) -> Result<Self, String> {
        let token = Self::generate();
        kbs_core::fsutil::write_private_atomic(path, &token.0)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(token)
    }

    fn parse(bytes: &[u8]) -> Result<Self, String> {
        let text = bytes.trim_ascii();
        if text.len() < MIN_TOKEN_LEN || text.len() > MAX_TOKEN_LEN {
            return Err(format!(
                "the token must be {MIN_TOKEN_LEN}..={MAX_TOKEN_LEN} bytes, it is {}",
                text.len()
            ));
        }
        if !text.iter().all(|b| b.is_ascii_graphic()) {
            return Err("the token must be printable ASCII without spaces".into());
        }
        Ok(Self(Zeroizing::new(text.to_vec())))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_token_is_generated_once_read_back_and_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.token");
        let first = Token::load_or_generate(&path).unwrap();
        let text = std::fs::read(&path).unwrap();
        assert!(first.matches(&text));
        assert!(!first.matches(&text[1..]));
        assert_eq!(format!("{first:?}"), "[redacted]");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let again = Token::load_or_generate(&path).unwrap();
        assert!(again.matches(&text));
        let rotated = Token::rotate(&path).unwrap();
        assert!(!rotated.matches(&text));
        std::fs::write(&path, "short\n").unwrap();
        let e = Token::load_or_generate(&path).unwrap_err();
        assert!(e.contains("32..=512") && !e.contains("short"), "{e}");
    }
}
