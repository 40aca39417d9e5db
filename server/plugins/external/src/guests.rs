//! The Guests service (`tether.plugin.v1.Guests`): what an external plugin may do to
//! guests through the KBS, and who it is.

use std::path::PathBuf;

use serde::Deserialize;

use crate::Invalid;

/// The RPCs of the Guests service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuestRpc {
    /// `List`.
    List,
    /// `Ping`.
    Ping,
    /// `Probe`.
    Probe,
    /// `ApplyResource`.
    ApplyResource,
    /// `InstallCredentials`.
    InstallCredentials,
}

/// One rule: these RPCs on guests this selector picks.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestsRule {
    /// The RPCs allowed.
    pub rpcs: Vec<GuestRpc>,
    /// Label selector of the guests they may touch (`""`: every guest).
    #[serde(default)]
    pub selector: String,
}

/// `[plugins.external.guests]`: the plugin's token and its rules.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestsGrant {
    /// File holding the bearer token the plugin presents (at least 32 characters).
    pub token_file: PathBuf,
    /// What it may call; nothing else is allowed.
    #[serde(default)]
    pub allow: Vec<GuestsRule>,
}

impl GuestsGrant {
    /// Check the rules and that the token file holds a token.
    pub fn validate(&self) -> Result<(), Invalid> {
        for rule in &self.allow {
            kbs_core::selector::Selector::parse(&rule.selector)
                .map_err(|e| ("guests.allow.selector", e.to_string()))?;
            if rule.rpcs.is_empty() {
                return Err(("guests.allow.rpcs", "names no RPC".into()));
            }
        }
        read_token(&self.token_file).map(|_| ())
    }
}

/// The token in `path` (trimmed), at least 32 characters.
pub fn read_token(path: &std::path::Path) -> Result<zeroize::Zeroizing<String>, Invalid> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        (
            "guests.token_file",
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    let token = zeroize::Zeroizing::new(text.trim().to_string());
    if token.len() < 32 {
        return Err((
            "guests.token_file",
            "the token must be at least 32 characters".into(),
        ));
    }
    Ok(token)
}
