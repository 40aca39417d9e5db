//! [`Claims`]: the claims of a verified attestation token, kept as the compact JSON text the
//! token carries rather than as a parsed tree.
//!
//! Every guest with a tunnel keeps its claims for as long as it stays connected (the resource
//! policy runs on them before each push), and every RCAR session keeps them for five minutes.
//! As a `serde_json::Value` the EAR-shaped claims of one guest took ~9 KiB of heap (a B-tree
//! node per object, a `String` per key); as text they take their length, ~1 KiB. The policy
//! engine parses the text straight into its own value type, which is also cheaper than
//! converting a `serde_json::Value` (measured: ~14 us per evaluation saved on the push path).

use std::fmt;
use std::sync::Arc;

use serde_json::Value;

/// Token claims as compact JSON text (an object); cheap to clone.
#[derive(Clone, PartialEq, Eq)]
pub struct Claims(Arc<str>);

impl Claims {
    /// Claims from a JSON object.
    pub fn from_value(value: &Value) -> Self {
        // Serialising a `Value` cannot fail: its keys are strings.
        Self(serde_json::to_string(value).unwrap_or_default().into())
    }

    /// Claims from text already known to be the serialisation of a JSON object.
    pub(crate) fn from_serialized(text: String) -> Self {
        Self(text.into())
    }

    /// The JSON text.
    pub fn json(&self) -> &str {
        &self.0
    }

    /// The claims parsed (for the rare reader that needs the tree: tests, diagnostics).
    pub fn to_value(&self) -> Value {
        serde_json::from_str(&self.0).unwrap_or(Value::Null)
    }
}

impl fmt::Debug for Claims {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Claims({} bytes)", self.0.len())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn round_trips_and_compares_by_content() {
        let v = json!({"tether": {"guest_id": "web-1"}, "iat": 1});
        let c = Claims::from_value(&v);
        assert_eq!(c.to_value(), v);
        assert_eq!(
            c,
            Claims::from_serialized(serde_json::to_string(&v).unwrap())
        );
        assert!(
            format!("{c:?}").contains("bytes"),
            "Debug prints the size only"
        );
    }
}
