//! The RCAR session cookie, carried by the client instead of kept by the KBS.
//!
//! After `auth` the `kbs-session-id` cookie is the challenge itself (TEE, nonce, hash
//! algorithm, expiry), sealed with AES-256-GCM under a key every replica derives from the
//! key-encryption key: a challenge costs the server no memory, a flood of `auth` calls
//! cannot fill anything, and `auth`, `attest` and a resource GET may land on different
//! replicas. After `attest` the cookie is the attestation token (a signed JWT: it holds no
//! secret and is verified like a Bearer token).
//!
//! What this gives up, on purpose: a challenge is not single-use. A replayed `attest` (the
//! same evidence again before the challenge expires) yields another token bound to the same
//! TEE key, which is worth nothing without that key: everything released under a token is
//! sealed to the key, and a tunnel needs proof of possession of it.
//! See `docs/protocol.md`, "Session lifetime".

use std::time::{SystemTime, UNIX_EPOCH};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use kbs_types::{HashAlgorithm, Tee};
use rand::RngCore;
use serde::{Deserialize, Serialize};

/// Prefix of a sealed challenge (a token never starts with it: JWTs start `ey`).
const PREFIX: &str = "c1.";
/// Bound on a cookie value we try to open (a sealed challenge is ~150 bytes).
const MAX_SEALED: usize = 1024;
/// Associated data: binds the ciphertext to its use.
const AAD: &[u8] = b"tether/rcar-challenge/v1";
const NONCE_LEN: usize = 12;

/// What a challenge cookie carries.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Challenge {
    /// TEE the client named in `auth`.
    pub tee: Tee,
    /// The nonce sent, base64 as sent.
    pub nonce: String,
    /// Hash algorithm negotiated for the report data.
    pub hash: HashAlgorithm,
    /// Expiry, Unix milliseconds.
    pub exp_ms: u64,
}

/// Why a cookie was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum CookieError {
    /// Not one of ours (malformed, forged, sealed under another key).
    NotFound,
    /// Ours, past its expiry.
    Expired,
}

/// Seals and opens challenge cookies.
pub(crate) struct CookieSealer {
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for CookieSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CookieSealer([redacted])")
    }
}

impl CookieSealer {
    /// A sealer under `key` (the same on every replica).
    pub fn new(key: &[u8; 32]) -> Self {
        Self {
            cipher: Aes256Gcm::new(key.into()),
        }
    }

    /// The cookie value for `challenge`.
    pub fn seal(&self, challenge: &Challenge) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        // Serialising this struct cannot fail: strings, an enum and a number.
        let plain = serde_json::to_vec(challenge).unwrap_or_default();
        let sealed = self
            .cipher
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: &plain,
                    aad: AAD,
                },
            )
            .unwrap_or_default();
        let mut raw = Vec::with_capacity(NONCE_LEN + sealed.len());
        raw.extend_from_slice(&nonce);
        raw.extend_from_slice(&sealed);
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(raw))
    }

    /// The challenge in `cookie`, if it is ours and not expired at `now_ms`.
    pub fn open(&self, cookie: &str, now_ms: u64) -> Result<Challenge, CookieError> {
        let encoded = cookie
            .strip_prefix(PREFIX)
            .filter(|c| c.len() <= MAX_SEALED)
            .ok_or(CookieError::NotFound)?;
        let raw = URL_SAFE_NO_PAD
            .decode(encoded)
            .map_err(|_| CookieError::NotFound)?;
        if raw.len() <= NONCE_LEN {
            return Err(CookieError::NotFound);
        }
        let (nonce, sealed) = raw.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| CookieError::NotFound)?;
        let plain = self
            .cipher
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: sealed,
                    aad: AAD,
                },
            )
            .map_err(|_| CookieError::NotFound)?;
        let challenge: Challenge =
            serde_json::from_slice(&plain).map_err(|_| CookieError::NotFound)?;
        if challenge.exp_ms < now_ms {
            return Err(CookieError::Expired);
        }
        Ok(challenge)
    }
}

/// Whether a cookie value is a sealed challenge (rather than a token).
pub(crate) fn is_challenge(cookie: &str) -> bool {
    cookie.starts_with(PREFIX)
}

/// Unix milliseconds at `at`.
pub(crate) fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn challenge(exp_ms: u64) -> Challenge {
        Challenge {
            tee: Tee::Sample,
            nonce: "bm9uY2U=".into(),
            hash: HashAlgorithm::Sha384,
            exp_ms,
        }
    }

    #[test]
    fn a_sealed_challenge_opens_under_its_key_only_and_expires() {
        let sealer = CookieSealer::new(&[1u8; 32]);
        let cookie = sealer.seal(&challenge(100));
        assert!(is_challenge(&cookie));
        assert!(cookie.len() < 300, "{} bytes", cookie.len());
        assert!(
            cookie
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)),
            "cookie-safe: {cookie}"
        );
        assert_eq!(sealer.open(&cookie, 100), Ok(challenge(100)));
        assert_eq!(sealer.open(&cookie, 101), Err(CookieError::Expired));
        let other = CookieSealer::new(&[2u8; 32]);
        assert_eq!(other.open(&cookie, 0), Err(CookieError::NotFound));
        // Two seals of the same challenge differ (fresh nonce): nothing to correlate.
        assert_ne!(sealer.seal(&challenge(100)), cookie);
    }

    #[test]
    fn tampered_or_foreign_cookies_are_not_found() {
        let sealer = CookieSealer::new(&[1u8; 32]);
        let cookie = sealer.seal(&challenge(100));
        let mut bytes = cookie.clone().into_bytes();
        let last = bytes.len() - 1;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(bytes).unwrap();
        for bad in [
            tampered.as_str(),
            "c1.",
            "c1.!!!",
            "c1.AAAA",
            "ey.jwt.like",
            "",
            &format!("c1.{}", "A".repeat(5000)),
        ] {
            assert_eq!(sealer.open(bad, 0), Err(CookieError::NotFound), "{bad:.20}");
        }
    }
}
