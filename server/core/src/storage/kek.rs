//! The key-encryption key: secrets at rest are AES-256-GCM sealed under it.

use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;
use zeroize::Zeroizing;

use super::StoreError;

/// A 32-byte key-encryption key. Its `Debug` never shows the key.
pub struct KeyEncryptionKey {
    cipher: Aes256Gcm,
    raw: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for KeyEncryptionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyEncryptionKey([redacted])")
    }
}

impl KeyEncryptionKey {
    /// Build from raw key bytes.
    pub fn from_bytes(key: &[u8; 32]) -> Self {
        Self {
            cipher: Aes256Gcm::new(key.into()),
            raw: Zeroizing::new(*key),
        }
    }

    /// A key for another purpose, derived from this one (HKDF-SHA256, `purpose` as info):
    /// every replica holding the same KEK derives the same key, and no derived key reveals
    /// the KEK or another derived key.
    pub fn derive(&self, purpose: &str) -> Zeroizing<[u8; 32]> {
        let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"tether/kek-derive/v1");
        let prk = salt.extract(self.raw.as_ref());
        let mut out = Zeroizing::new([0u8; 32]);
        let info = [purpose.as_bytes()];
        // A 32-byte output is within HKDF-SHA256's limit, so neither step can fail.
        if let Ok(okm) = prk.expand(&info, ring::hkdf::HKDF_SHA256) {
            let _ = okm.fill(out.as_mut());
        }
        out
    }

    /// Read a hex key from `path`, creating it (mode 0600, atomically, never replacing a
    /// file another process created meanwhile) when missing.
    pub fn load_or_generate(path: &Path) -> Result<Self, StoreError> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let raw =
                    Zeroizing::new(hex::decode(text.trim()).map_err(|_| {
                        StoreError::Crypto(format!("{} is not hex", path.display()))
                    })?);
                if raw.len() != 32 {
                    return Err(StoreError::Crypto(format!(
                        "{} must hold 32 bytes (64 hex chars)",
                        path.display()
                    )));
                }
                let mut key = Zeroizing::new([0u8; 32]);
                key.copy_from_slice(&raw);
                Ok(Self::from_bytes(&key))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = Zeroizing::new([0u8; 32]);
                rand::rngs::OsRng.fill_bytes(key.as_mut());
                let text = Zeroizing::new(hex::encode(key.as_ref()));
                match crate::fsutil::create_private(path, text.as_bytes()) {
                    Ok(()) => Ok(Self::from_bytes(&key)),
                    // Another process created it first: use theirs, which may seal data already.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        Self::load_or_generate(path)
                    }
                    Err(e) => Err(e.into()),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Seal `plaintext`, bound to `context` (e.g. the resource path). Returns (nonce, ciphertext).
    pub fn seal(&self, context: &[u8], plaintext: &[u8]) -> Result<(Vec<u8>, Vec<u8>), StoreError> {
        let mut nonce = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let ct = self
            .cipher
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: plaintext,
                    aad: context,
                },
            )
            .map_err(|_| StoreError::Crypto("seal failed".into()))?;
        Ok((nonce.to_vec(), ct))
    }

    /// Open what [`seal`](Self::seal) produced with the same context.
    pub fn open(
        &self,
        context: &[u8],
        nonce: &[u8],
        ciphertext: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, StoreError> {
        let nonce: [u8; 12] = nonce
            .try_into()
            .map_err(|_| StoreError::Crypto("bad nonce length".into()))?;
        self.cipher
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: ciphertext,
                    aad: context,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| {
                StoreError::Crypto("cannot open: wrong key-encryption key or corrupt row".into())
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_context_binding() {
        let kek = KeyEncryptionKey::from_bytes(&[7u8; 32]);
        let (n, c) = kek.seal(b"a/b/c", b"secret").unwrap();
        assert_eq!(kek.open(b"a/b/c", &n, &c).unwrap().as_slice(), b"secret");
        assert!(kek.open(b"a/b/d", &n, &c).is_err());
        let other = KeyEncryptionKey::from_bytes(&[8u8; 32]);
        assert!(other.open(b"a/b/c", &n, &c).is_err());
        assert!(format!("{kek:?}").contains("redacted"));
    }

    #[test]
    fn generated_file_is_private_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek.key");
        let a = KeyEncryptionKey::load_or_generate(&path).unwrap();
        let (n, c) = a.seal(b"x", b"y").unwrap();
        let b = KeyEncryptionKey::load_or_generate(&path).unwrap();
        assert_eq!(b.open(b"x", &n, &c).unwrap().as_slice(), b"y");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn derived_keys_depend_on_the_kek_and_the_purpose() {
        let a = KeyEncryptionKey::from_bytes(&[1u8; 32]);
        let b = KeyEncryptionKey::from_bytes(&[2u8; 32]);
        assert_eq!(
            *a.derive("x"),
            *KeyEncryptionKey::from_bytes(&[1u8; 32]).derive("x")
        );
        assert_ne!(*a.derive("x"), *a.derive("y"));
        assert_ne!(*a.derive("x"), *b.derive("x"));
        assert_ne!(*a.derive("x"), [1u8; 32]);
        assert_ne!(*a.derive("x"), [0u8; 32]);
    }
}
