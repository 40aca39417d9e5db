//! One cached piece of collateral with the date after which it must not be used.

use serde::{Deserialize, Serialize};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::VerifyError;
use crate::request::crl_dates;

/// What was fetched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum ItemBody {
    /// A PCK CRL (DER) and its issuer chain (PEM).
    PckCrl {
        /// DER CRL.
        #[serde(with = "hex_bytes")]
        crl: Vec<u8>,
        /// PEM issuer chain.
        issuer_chain: String,
    },
    /// Intel's root CA CRL (DER).
    RootCaCrl {
        /// DER CRL.
        #[serde(with = "hex_bytes")]
        crl: Vec<u8>,
    },
    /// TDX TCB info: the exact signed JSON text of `tcbInfo`.
    TcbInfo {
        /// The `tcbInfo` JSON text, byte for byte as signed.
        tcb_info: String,
        /// Raw ECDSA signature.
        #[serde(with = "hex_bytes")]
        signature: Vec<u8>,
        /// PEM issuer chain.
        issuer_chain: String,
    },
    /// TDX QE identity: the exact signed JSON text of `enclaveIdentity`.
    QeIdentity {
        /// The `enclaveIdentity` JSON text.
        qe_identity: String,
        /// Raw ECDSA signature.
        #[serde(with = "hex_bytes")]
        signature: Vec<u8>,
        /// PEM issuer chain.
        issuer_chain: String,
    },
    /// An SNP VCEK (DER).
    Vcek {
        /// DER certificate.
        #[serde(with = "hex_bytes")]
        der: Vec<u8>,
    },
    /// AMD's CRL of one generation (DER).
    SnpCrl {
        /// DER CRL.
        #[serde(with = "hex_bytes")]
        crl: Vec<u8>,
    },
    /// The source publishes no AMD CRL for that generation (KDS 404, no file): remembered
    /// like an item so the source is asked again only when it is due.
    SnpCrlAbsent,
}

/// A fetched item and its validity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollateralItem {
    /// The collateral.
    pub body: ItemBody,
    /// Unix seconds after which the item is stale (nextUpdate, or a VCEK's notAfter).
    pub next_update: i64,
}

impl CollateralItem {
    /// Wraps a body, reading its nextUpdate; malformed bodies are refused.
    pub fn new(body: ItemBody) -> Result<Self, VerifyError> {
        let next_update = match &body {
            ItemBody::PckCrl { crl, .. } => crl_dates(crl, "PCK CRL")?.1,
            ItemBody::RootCaCrl { crl } => crl_dates(crl, "root CA CRL")?.1,
            ItemBody::TcbInfo { tcb_info: json, .. }
            | ItemBody::QeIdentity {
                qe_identity: json, ..
            } => {
                let v: serde_json::Value = serde_json::from_str(json)
                    .map_err(|e| VerifyError::CollateralInvalid(format!("not JSON: {e}")))?;
                let s = v["nextUpdate"].as_str().ok_or_else(|| {
                    VerifyError::CollateralInvalid("collateral has no nextUpdate".into())
                })?;
                time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                    .map_err(|e| VerifyError::CollateralInvalid(format!("nextUpdate: {e}")))?
                    .unix_timestamp()
            }
            ItemBody::SnpCrl { crl } => crl_dates(crl, "AMD CRL")?.1,
            ItemBody::SnpCrlAbsent => i64::MAX,
            ItemBody::Vcek { der } => {
                let (_, cert) = X509Certificate::from_der(der)
                    .map_err(|e| VerifyError::CollateralInvalid(format!("VCEK: {e}")))?;
                cert.validity().not_after.timestamp()
            }
        };
        Ok(CollateralItem { body, next_update })
    }
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(s).map_err(serde::de::Error::custom)
    }
}
