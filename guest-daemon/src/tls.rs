//! Extra trust anchors for reaching the KBS over TLS (`--ca-file`).
//!
//! The HTTP client always trusts the bundled webpki (Mozilla) roots; a CA
//! bundle adds the operator's own roots on top, e.g. for a KBS with a private CA.

use std::io::Read;
use std::path::{Path, PathBuf};

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// Largest CA file read, so a wrong path (a device, a huge log) fails fast.
const MAX_CA_FILE_BYTES: u64 = 1024 * 1024;

/// Errors loading a CA bundle.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read.
    #[error("read CA file {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// The file is larger than the limit.
    #[error("CA file {path} is larger than {MAX_CA_FILE_BYTES} bytes")]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// The PEM is malformed.
    #[error("CA file {path}: bad PEM: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The file holds no CERTIFICATE block.
    #[error("CA file {path} contains no PEM CERTIFICATE")]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// A certificate is not a usable trust anchor.
    #[error("CA file {path}: certificate #{index} is not a valid X.509 trust anchor: {reason}")]
    BadCertificate {
        /// The file.
        path: PathBuf,
        /// 1-based position of the certificate in the file.
        index: usize,
        /// What is wrong.
        reason: String,
    },
}

/// PEM certificates to trust as roots in addition to the webpki roots.
#[derive(Debug, Clone)]
pub struct CaBundle {
    path: PathBuf,
    certs: Vec<CertificateDer<'static>>,
}

impl CaBundle {
    /// Read every `CERTIFICATE` block of a PEM file, and check each parses as a trust anchor.
    pub fn from_pem_file(path: &Path) -> Result<Self, TlsError> {
        let read_err = |error| TlsError::Read {
            path: path.to_owned(),
            error,
        };
        let file = std::fs::File::open(path).map_err(read_err)?;
        let mut pem = Vec::new();
        file.take(MAX_CA_FILE_BYTES + 1)
            .read_to_end(&mut pem)
            .map_err(read_err)?;
        if pem.len() as u64 > MAX_CA_FILE_BYTES {
            return Err(TlsError::TooLarge {
                path: path.to_owned(),
            });
        }
        Self::from_pem(path, &pem)
    }

    /// Parse a PEM bundle; `path` only names it in errors.
    pub fn from_pem(path: &Path, pem: &[u8]) -> Result<Self, TlsError> {
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Pem {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
        if certs.is_empty() {
            return Err(TlsError::Empty {
                path: path.to_owned(),
            });
        }
        let bundle = Self {
            path: path.to_owned(),
            certs,
        };
        bundle.add_to_root_store(&mut rustls::RootCertStore::empty())?;
        Ok(bundle)
    }

    /// The certificates, DER encoded.
    pub fn certs(&self) -> &[CertificateDer<'static>] {
        &self.certs
    }

    /// Add the certificates to a rustls root store (for non-reqwest TLS clients).
    pub fn add_to_root_store(&self, store: &mut rustls::RootCertStore) -> Result<(), TlsError> {
        for (i, cert) in self.certs.iter().enumerate() {
            store
                .add(cert.clone())
                .map_err(|e| TlsError::BadCertificate {
                    path: self.path.clone(),
                    index: i + 1,
                    reason: e.to_string(),
                })?;
        }
        Ok(())
    }

    /// Add the certificates as extra roots of a reqwest client.
    pub fn add_to_reqwest(
        &self,
        mut builder: reqwest::ClientBuilder,
    ) -> Result<reqwest::ClientBuilder, TlsError> {
        for (i, cert) in self.certs.iter().enumerate() {
            let cert =
                reqwest::Certificate::from_der(cert).map_err(|e| TlsError::BadCertificate {
                    path: self.path.clone(),
                    index: i + 1,
                    reason: e.to_string(),
                })?;
            builder = builder.add_root_certificate(cert);
        }
        Ok(builder)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn bundle_of_two_certificates_loads() {
        let a = rcgen::generate_simple_self_signed(vec!["a.example".to_owned()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["b.example".to_owned()]).unwrap();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        write!(f, "# comment\n{}\n{}", a.cert.pem(), b.cert.pem()).unwrap();
        let bundle = CaBundle::from_pem_file(f.path()).unwrap();
        assert_eq!(bundle.certs().len(), 2);
        assert_eq!(&bundle.certs()[0], a.cert.der());
        let mut store = rustls::RootCertStore::empty();
        bundle.add_to_root_store(&mut store).unwrap();
        assert_eq!(store.len(), 2);
        let builder = bundle.add_to_reqwest(reqwest::Client::builder()).unwrap();
        builder.build().unwrap();
    }

    #[test]
    fn oversized_file_is_rejected() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&vec![b'a'; MAX_CA_FILE_BYTES as usize + 1])
            .unwrap();
        assert!(matches!(
            CaBundle::from_pem_file(f.path()),
            Err(TlsError::TooLarge { .. })
        ));
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = CaBundle::from_pem_file(Path::new("/nonexistent/ca.pem")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }

    #[test]
    fn file_without_certificates_is_rejected() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"hello\n").unwrap();
        assert!(matches!(
            CaBundle::from_pem_file(f.path()),
            Err(TlsError::Empty { .. })
        ));
    }

    #[test]
    fn garbage_certificate_is_rejected() {
        let pem = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(matches!(
            CaBundle::from_pem(Path::new("x.pem"), pem),
            Err(TlsError::BadCertificate { index: 1, .. })
        ));
        let pem = b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
        assert!(CaBundle::from_pem(Path::new("x.pem"), pem).is_err());
    }
}
