//! One `[[plugins.external]]` table: upstream's backend fields (`name`, `endpoint`,
//! `tls_mode`, `ca_cert_path`, `timeout_ms`) plus Tether's `max_concurrent` and the Guests
//! API grant (`token_file`, `[plugins.external.guests]`), validated once at start (errors
//! name the key), and the same checks for a run-time change of endpoint.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::Invalid;
use crate::guests::{Grants, GrantsConfig};

/// Deadline of one call to the plugin when `timeout_ms` is not set.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Upper bound of `timeout_ms`.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(600);
/// Requests forwarded to one plugin at once when `max_concurrent` is not set.
pub const DEFAULT_MAX_CONCURRENT: usize = 32;

/// How the KBS reaches the plugin (upstream's `tls_mode`; optional here as in upstream's
/// later releases, where the endpoint's scheme decides).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Plaintext `http://` (development only; logged as a warning).
    Insecure,
    /// TLS `https://`, the plugin's certificate checked against `ca_cert_path`.
    Tls,
}

/// One `[[plugins.external]]` table.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalConfig {
    /// Routes: `/kbs/v0/external/<name>/...`; plugin name `external/<name>`.
    pub name: String,
    /// `http://host:port` or `https://host:port`.
    pub endpoint: String,
    /// Must agree with the endpoint's scheme when set.
    #[serde(default)]
    pub tls_mode: Option<TlsMode>,
    /// PEM CA for an `https://` endpoint (required there, refused for `http://`).
    #[serde(default)]
    pub ca_cert_path: Option<PathBuf>,
    /// Deadline of each call to the plugin, in milliseconds (default 5000).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Requests forwarded at once; more wait for a slot up to the deadline, then 503.
    #[serde(default)]
    pub max_concurrent: Option<usize>,
    /// The plugin's bearer token for the Guests API (read, or generated there when the file
    /// does not exist); required with `guests`.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// What the plugin may do through the Guests API; absent: nothing.
    #[serde(default)]
    pub guests: Option<GrantsConfig>,
}

/// Where and how to reach a plugin, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The endpoint URL.
    pub endpoint: String,
    /// TLS or not (from the scheme).
    pub tls_mode: TlsMode,
    /// The CA file, for TLS.
    pub ca_cert_path: Option<PathBuf>,
    /// The CA's PEM, read when the target was checked.
    pub ca_pem: Option<Vec<u8>>,
    /// Deadline of each call.
    pub timeout: Duration,
}

impl Target {
    /// What `GET /kbs/v0/plugin` shows of it.
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "endpoint": self.endpoint,
            "tls_mode": self.tls_mode,
            "ca_cert_path": self.ca_cert_path,
            "timeout_ms": self.timeout.as_millis() as u64,
        })
    }
}

/// `[a-z0-9-]{1,48}`: one URL segment.
pub fn check_name(name: &str) -> Result<(), Invalid> {
    let ok = !name.is_empty()
        && name.len() <= 48
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err((
            "name",
            "must be [a-z0-9-]{1,48} (it is a URL segment)".into(),
        ))
    }
}

/// Check an endpoint and its TLS settings as upstream does (the scheme decides; a
/// `tls_mode` that disagrees, an `https://` without a CA, a CA with `http://` are refused),
/// reading the CA now so a missing file fails at start.
pub fn check_target(
    endpoint: &str,
    tls_mode: Option<TlsMode>,
    ca_cert_path: Option<PathBuf>,
    timeout_ms: Option<u64>,
) -> Result<Target, Invalid> {
    let scheme = if endpoint.starts_with("https://") {
        TlsMode::Tls
    } else if endpoint.starts_with("http://") {
        TlsMode::Insecure
    } else {
        return Err(("endpoint", "must start with http:// or https://".into()));
    };
    if endpoint.parse::<axum::http::Uri>().ok().and_then(|u| {
        u.authority()
            .map(|a| a.port_u16().is_some() || !a.host().is_empty())
    }) != Some(true)
    {
        return Err(("endpoint", format!("`{endpoint}` is not a valid URL")));
    }
    if let Some(mode) = tls_mode
        && mode != scheme
    {
        let want = match mode {
            TlsMode::Tls => "tls_mode `tls` needs an https:// endpoint",
            TlsMode::Insecure => "tls_mode `insecure` needs an http:// endpoint",
        };
        return Err(("tls_mode", want.into()));
    }
    let ca_pem = match (scheme, &ca_cert_path) {
        (TlsMode::Tls, None) => {
            return Err((
                "ca_cert_path",
                "an https:// endpoint needs the PEM CA that signed the plugin's certificate".into(),
            ));
        }
        (TlsMode::Insecure, Some(_)) => {
            return Err((
                "ca_cert_path",
                "an http:// endpoint is plaintext; use https:// for TLS".into(),
            ));
        }
        (TlsMode::Tls, Some(path)) => Some(std::fs::read(path).map_err(|e| {
            (
                "ca_cert_path",
                format!("cannot read {}: {e}", path.display()),
            )
        })?),
        (TlsMode::Insecure, None) => None,
    };
    let timeout = match timeout_ms {
        None => DEFAULT_TIMEOUT,
        Some(0) => return Err(("timeout_ms", "must be at least 1".into())),
        Some(ms) if Duration::from_millis(ms) > MAX_TIMEOUT => {
            return Err((
                "timeout_ms",
                format!("must be at most {}", MAX_TIMEOUT.as_millis()),
            ));
        }
        Some(ms) => Duration::from_millis(ms),
    };
    Ok(Target {
        endpoint: endpoint.to_string(),
        tls_mode: scheme,
        ca_cert_path,
        ca_pem,
        timeout,
    })
}

impl ExternalConfig {
    /// Check every key; returns the target and the concurrency bound.
    pub fn validate(&self) -> Result<(Target, usize), Invalid> {
        check_name(&self.name)?;
        let target = check_target(
            &self.endpoint,
            self.tls_mode,
            self.ca_cert_path.clone(),
            self.timeout_ms,
        )?;
        let max = self.max_concurrent.unwrap_or(DEFAULT_MAX_CONCURRENT);
        if !(1..=4096).contains(&max) {
            return Err(("max_concurrent", "must be 1..=4096".into()));
        }
        Ok((target, max))
    }

    /// The Guests API grant and the token file, checked; `None` without a grant.
    pub fn grants(&self) -> Result<Option<(Grants, PathBuf)>, Invalid> {
        match (&self.guests, &self.token_file) {
            (None, None) => Ok(None),
            (None, Some(_)) => Err((
                "token_file",
                "is only used with a [plugins.external.guests] grant".into(),
            )),
            (Some(_), None) => Err((
                "token_file",
                "a [plugins.external.guests] grant needs the file of the plugin's token".into(),
            )),
            (Some(g), Some(path)) => {
                if !path.is_absolute() {
                    return Err(("token_file", "must be an absolute path".into()));
                }
                Ok(Some((g.validate()?, path.clone())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse(text: &str) -> ExternalConfig {
        toml::from_str(text).unwrap()
    }

    fn key(text: &str) -> &'static str {
        parse(text).validate().unwrap_err().0
    }

    #[test]
    fn upstream_fields_are_accepted_and_checked_like_upstream() {
        let (t, max) = parse(
            "name = \"echo\"\nendpoint = \"http://127.0.0.1:50051\"\ntls_mode = \"insecure\"\ntimeout_ms = 250\n",
        )
        .validate()
        .unwrap();
        assert_eq!(t.tls_mode, TlsMode::Insecure);
        assert_eq!(t.timeout, Duration::from_millis(250));
        assert_eq!(max, DEFAULT_MAX_CONCURRENT);
        // No tls_mode: the scheme decides (upstream's later releases).
        let (t, _) = parse("name = \"e\"\nendpoint = \"http://[::1]:1\"\n")
            .validate()
            .unwrap();
        assert_eq!(t.timeout, DEFAULT_TIMEOUT);

        assert_eq!(key("name = \"Echo\"\nendpoint = \"http://a:1\"\n"), "name");
        assert_eq!(key("name = \"e\"\nendpoint = \"grpc://a:1\"\n"), "endpoint");
        assert_eq!(
            key("name = \"e\"\nendpoint = \"http://a:1\"\ntls_mode = \"tls\"\n"),
            "tls_mode"
        );
        assert_eq!(
            key("name = \"e\"\nendpoint = \"https://a:1\"\n"),
            "ca_cert_path"
        );
        assert_eq!(
            key("name = \"e\"\nendpoint = \"http://a:1\"\nca_cert_path = \"/x\"\n"),
            "ca_cert_path"
        );
        assert_eq!(
            key(
                "name = \"e\"\nendpoint = \"https://a:1\"\nca_cert_path = \"/nonexistent/ca.pem\"\n"
            ),
            "ca_cert_path"
        );
        assert_eq!(
            key("name = \"e\"\nendpoint = \"http://a:1\"\ntimeout_ms = 0\n"),
            "timeout_ms"
        );
        assert_eq!(
            key("name = \"e\"\nendpoint = \"http://a:1\"\nmax_concurrent = 0\n"),
            "max_concurrent"
        );
        let unknown = toml::from_str::<ExternalConfig>(
            "name = \"e\"\nendpoint = \"http://a:1\"\nbackends = []\n",
        );
        assert!(unknown.is_err());
    }
}
