//! [`GuestIdentity`]: who a guest is, as its attested init-data (or its TEE key) says.
//! Below both the init-data parser and the token, which carry it.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tunnel::Labels;

/// Who a guest is: taken from attested init-data, or derived from its TEE key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestIdentity {
    /// Stable guest name (`[tether] guest_id`, or `tee-<hash of TEE key>`).
    pub guest_id: String,
    /// Operator-chosen labels (`[tether.labels]`), one shared copy per distinct set.
    #[serde(default, deserialize_with = "interned_labels")]
    pub labels: Labels,
    /// Sandbox DNS name (`[tether] name`), for certificates naming the sandbox (splitapi).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Sandbox IP address (`[tether] ip`), for certificates naming the sandbox (splitapi).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<std::net::IpAddr>,
}

fn interned_labels<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Labels, D::Error> {
    let map = BTreeMap::<String, String>::deserialize(d)?;
    Ok(tunnel::labels::intern(Arc::new(map)))
}

impl GuestIdentity {
    /// The identity in a token's claims (`tether` object), if it has one.
    pub fn from_claims(claims: &Value) -> Option<Self> {
        Self::deserialize(claims.get("tether")?).ok()
    }
}
