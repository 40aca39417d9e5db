//! The splitapi endpoint's rustls configuration, built from the credential bundle's
//! `ca.crt`, `server.crt` and `server.key`: the server presents `server.crt` and requires a
//! client certificate that chains to `ca.crt` (the bundle's CA is the only root).

use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::store::BundleFile;

/// File of the sandbox's CA certificate in the bundle.
pub const CA_FILE: &str = "ca.crt";
/// File of the server certificate (chain, leaf first).
pub const CERT_FILE: &str = "server.crt";
/// File of the server's private key (PKCS#8, SEC1 or PKCS#1 PEM).
pub const KEY_FILE: &str = "server.key";

/// Why a splitapi bundle cannot be turned into a TLS configuration. Messages never hold
/// key material.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// A required file is missing from the bundle.
    #[error("the splitapi bundle lacks {0}")]
    Missing(&'static str),
    /// A file is not the PEM it should be.
    #[error("{file}: {reason}")]
    Pem {
        /// Which file.
        file: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the certificates or the key (unsupported algorithm, key and
    /// certificate do not match, CA unusable as a trust anchor).
    #[error("{what}: {reason}")]
    Tls {
        /// Which step.
        what: &'static str,
        /// rustls's reason.
        reason: String,
    },
}

/// The crypto provider of the endpoint: ring, whose verification algorithms cover the
/// bundle's key types (Ed25519, ECDSA P-256/P-384, RSA).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn file<'a>(files: &'a [BundleFile], name: &'static str) -> Result<&'a [u8], BundleError> {
    files
        .iter()
        .find(|f| f.name == name)
        .map(|f| &f.contents[..])
        .ok_or(BundleError::Missing(name))
}

fn certificates(
    name: &'static str,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, BundleError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| BundleError::Pem {
            file: name,
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(BundleError::Pem {
            file: name,
            reason: "no PEM CERTIFICATE in it".into(),
        });
    }
    Ok(certs)
}

/// The server configuration for a splitapi bundle: mutual TLS (TLS 1.2 and 1.3), client
/// certificates verified against the bundle's CA only, ALPN h2 and http/1.1.
pub fn server_config(files: &[BundleFile]) -> Result<Arc<rustls::ServerConfig>, BundleError> {
    let provider = provider();
    let mut roots = rustls::RootCertStore::empty();
    for ca in certificates(CA_FILE, file(files, CA_FILE)?)? {
        roots.add(ca).map_err(|e| BundleError::Tls {
            what: "ca.crt is not a usable trust anchor",
            reason: e.to_string(),
        })?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| BundleError::Tls {
            what: "client certificate verifier",
            reason: e.to_string(),
        })?;
    let chain = certificates(CERT_FILE, file(files, CERT_FILE)?)?;
    let key = PrivateKeyDer::from_pem_slice(file(files, KEY_FILE)?).map_err(|e| {
        BundleError::Pem {
            file: KEY_FILE,
            // The PEM error names the section kind, never its contents.
            reason: e.to_string(),
        }
    })?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| BundleError::Tls {
            what: "protocol versions",
            reason: e.to_string(),
        })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| BundleError::Tls {
            what: "server.crt and server.key",
            reason: e.to_string(),
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
