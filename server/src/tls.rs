//! rustls server configuration: certificate and key files, or a generated self-signed
//! pair for development (kept under the data dir so restarts reuse it).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsConfig;

/// Build the rustls server config (ring provider; TLS 1.2 and 1.3; ALPN h2 + http/1.1).
pub fn server_config(
    tls: &TlsConfig,
    data_dir: &Path,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let (cert_path, key_path) = if tls.self_signed {
        ensure_self_signed(data_dir, &tls.self_signed_names)?
    } else {
        match (&tls.cert_file, &tls.key_file) {
            (Some(c), Some(k)) => (c.clone(), k.clone()),
            _ => return Err("cert_file and key_file are required".into()),
        }
    };
    let certs = CertificateDer::pem_file_iter(&cert_path)
        .map_err(|e| format!("cert_file {}: {e}", cert_path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("cert_file {}: {e}", cert_path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "cert_file {}: no certificate found",
            cert_path.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .map_err(|e| format!("key_file {}: {e}", key_path.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| format!("certificate and key do not match or are unsupported: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Generate `tls/cert.pem` + `tls/key.pem` under `data_dir` once (localhost, 127.0.0.1, ::1 + extra names).
pub fn ensure_self_signed(
    data_dir: &Path,
    extra: &[String],
) -> Result<(std::path::PathBuf, std::path::PathBuf), String> {
    let dir = data_dir.join("tls");
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    if cert_path.is_file() && key_path.is_file() {
        return Ok((cert_path, key_path));
    }
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    names.extend(extra.iter().cloned());
    let key =
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
    let mut params = rcgen::CertificateParams::new(names).map_err(|e| e.to_string())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Tether KBS (development)");
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    kbs_core::fsutil::create_private_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    // A half pair left by an interrupted start is replaced whole: the key first (0600,
    // exclusive temp file, rename), then the certificate (0644).
    let key_pem = zeroize::Zeroizing::new(key.serialize_pem());
    kbs_core::fsutil::write_private_atomic(&key_path, key_pem.as_bytes())
        .map_err(|e| format!("{}: {e}", key_path.display()))?;
    kbs_core::fsutil::write_private_atomic(&cert_path, cert.pem().as_bytes())
        .and_then(|()| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&cert_path, std::fs::Permissions::from_mode(0o644))
        })
        .map_err(|e| format!("{}: {e}", cert_path.display()))?;
    Ok((cert_path, key_path))
}
