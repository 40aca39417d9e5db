//! How to reach the tunnel: its URL follows from the KBS base URL, and a `wss://` tunnel
//! trusts the webpki roots plus those of the CA file.

use std::sync::Arc;

use tunnel::GuestTunnelConfig;

use super::RunError;
use crate::tls::CaBundle;

/// Path of the tunnel endpoint under the KBS base URL.
pub const TUNNEL_PATH: &str = "/kbs/v0/tunnel";
/// `ws://` or `wss://` URL of the tunnel for a KBS base URL (`http://` or `https://`).
pub fn tunnel_url(kbs_url: &str) -> Result<String, RunError> {
    let invalid = |reason| RunError::TunnelUrl {
        url: kbs_url.to_owned(),
        reason,
    };
    let (scheme, rest) = if let Some(rest) = strip_prefix_ignore_case(kbs_url, "https://") {
        ("wss", rest)
    } else if let Some(rest) = strip_prefix_ignore_case(kbs_url, "http://") {
        ("ws", rest)
    } else {
        return Err(invalid("scheme must be http or https"));
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.contains(['?', '#']) {
        return Err(invalid("no host, or a query or fragment"));
    }
    Ok(format!("{scheme}://{rest}{TUNNEL_PATH}"))
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// The tunnel client's settings for a KBS at `kbs_url`: the tunnel URL, whether to offer
/// the push key, and TLS for `wss`.
pub(super) fn tunnel_config(
    kbs_url: &str,
    push_key: bool,
    ca: Option<&CaBundle>,
) -> Result<GuestTunnelConfig, RunError> {
    let mut tunnel = GuestTunnelConfig::new(tunnel_url(kbs_url)?);
    tunnel.offer_push_key = push_key;
    if tunnel.url.starts_with("wss://") {
        tunnel = tunnel.with_tls(tls_config(ca)?);
    }
    Ok(tunnel)
}

/// rustls (ring) trusting the webpki roots and the CA file's.
fn tls_config(ca: Option<&CaBundle>) -> Result<Arc<rustls::ClientConfig>, RunError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(ca) = ca {
        ca.add_to_root_store(&mut roots)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| RunError::TlsConfig(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn tunnel_url_follows_the_kbs_url() {
        assert_eq!(
            tunnel_url("http://127.0.0.1:8080").unwrap(),
            "ws://127.0.0.1:8080/kbs/v0/tunnel"
        );
        assert_eq!(
            tunnel_url("HTTPS://kbs.example/prefix/").unwrap(),
            "wss://kbs.example/prefix/kbs/v0/tunnel"
        );
        assert!(tunnel_url("ftp://kbs.example").is_err());
        assert!(tunnel_url("http://").is_err());
        assert!(tunnel_url("http://h/?q").is_err());
    }
}
