//! Reading X.509 certificates issued by the KBS's plugins.

use x509_parser::extensions::GeneralName;
use x509_parser::pem::parse_x509_pem;
use x509_parser::prelude::*;

/// The DER of the first certificate (or other PEM block) in `pem`.
pub fn der(pem: &str) -> Vec<u8> {
    parse_x509_pem(pem.as_bytes()).expect("PEM").1.contents
}

/// The subject alternative names of a certificate as `dns:x` / `ip:a.b.c.d`.
pub fn sans(cert: &X509Certificate<'_>) -> Vec<String> {
    cert.subject_alternative_name()
        .expect("a well-formed SAN extension")
        .map(|s| {
            s.value
                .general_names
                .iter()
                .map(|g| match g {
                    GeneralName::DNSName(d) => format!("dns:{d}"),
                    GeneralName::IPAddress(b) if b.len() == 4 => {
                        format!("ip:{}.{}.{}.{}", b[0], b[1], b[2], b[3])
                    }
                    other => format!("{other:?}"),
                })
                .collect()
        })
        .unwrap_or_default()
}
