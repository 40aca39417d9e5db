//! [`PushKey`]: the per-tunnel key a `tether.v2` challenge carries (see
//! [`rpc_defs::SUBPROTOCOL_V2`]). The KBS generates it for one connection and seals it to the
//! guest's TEE key inside the challenge; pushes on that tunnel are then JWE `dir` + A256GCM
//! under it. Never logged; zeroized on drop.

use rpc_defs::PUSH_KEY_LEN;
use zeroize::Zeroizing;

/// A 32-byte symmetric key shared by the KBS and one guest for one tunnel.
#[derive(Clone)]
pub struct PushKey(Zeroizing<[u8; PUSH_KEY_LEN]>);

impl PushKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        let mut key = Zeroizing::new([0u8; PUSH_KEY_LEN]);
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, key.as_mut());
        Self(key)
    }

    /// The key from exactly [`PUSH_KEY_LEN`] bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let key: [u8; PUSH_KEY_LEN] = bytes.try_into().ok()?;
        Some(Self(Zeroizing::new(key)))
    }

    /// The key bytes.
    pub fn bytes(&self) -> &[u8; PUSH_KEY_LEN] {
        &self.0
    }
}

impl std::fmt::Debug for PushKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PushKey([redacted])")
    }
}

impl PartialEq for PushKey {
    fn eq(&self, other: &Self) -> bool {
        subtle::ConstantTimeEq::ct_eq(self.0.as_slice(), other.0.as_slice()).into()
    }
}

impl Eq for PushKey {}
