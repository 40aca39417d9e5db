//! Intel TDX: quote (v4, v5) verification against Intel's SGX root CA with DCAP collateral,
//! TCB status with advisory ids, report-data and MRCONFIGID binding, CC event log replay.
//!
//! # Evidence on the wire
//!
//! What a real `kbs_protocol` client sends as `tee-evidence.primary_evidence` for `tdx`
//! (guest-components `attestation-agent/attester/src/tdx/mod.rs`, struct `TdxEvidence`;
//! trustee `deps/verifier/src/tdx/mod.rs` deserializes the same struct):
//!
//! ```json
//! {"cc_eventlog": "<standard base64 of the CCEL ACPI table data, or null>",
//!  "quote": "<standard base64 of the TD quote>"}
//! ```
//!
//! The attester zero-pads the 64-byte REPORTDATA and gets the quote from configfs-tsm
//! (`/sys/kernel/config/tsm/report`, provider `tdx_guest`) or the `/dev/tdx_guest` ioctl;
//! `cc_eventlog` is `/sys/firmware/acpi/tables/data/CCEL`, absent when unreadable. Unknown
//! fields are ignored here, as upstream's serde struct does.
//!
//! # Checks, in order
//!
//! 1. the quote parses (v4 or v5, TEE type 0x81);
//! 2. `now` lies in the collateral's validity window (else [`VerifyError::CollateralExpired`]);
//! 3. `dcap-qvl` (pure Rust, ring): CRLs and root CA, TCB info and QE identity signatures and
//!    dates, PCK chain to Intel's SGX root CA, QE report signature and hash, QE identity
//!    policy, the quote signature by the attestation key, TCB level matching (platform + TDX
//!    module + QE) into a TCB status with advisory ids; `Revoked` is refused
//!    ([`VerifyError::TcbRevoked`]); debug TDs are not refused here (upstream leaves that to
//!    the policy through `td_attributes.debug`);
//! 4. REPORTDATA and MRCONFIGID binding (see [`crate::binding`]);
//! 5. the event log, when sent, replays to RTMR 0..3 (upstream `replay_and_match`).

pub mod claims;
pub mod eventlog;
pub mod quote;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use dcap_qvl::configs::RingConfig;
use dcap_qvl::verify::QuoteVerifier;
use serde::Deserialize;
use serde_json::{Map, Value};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::request::{CollateralRequest, PckCa, TdxCollateral};
use crate::{VerifyError, binding, der};

use eventlog::EventLog;
use quote::Quote;

/// `tee-evidence.primary_evidence` for `tdx`.
#[derive(Debug, Deserialize)]
pub struct TdxEvidence {
    /// Base64 CC event log, if the attester could read it.
    #[serde(default)]
    pub cc_eventlog: Option<String>,
    /// Base64 TD quote.
    pub quote: String,
}

/// Decoded evidence: quote bytes and event log bytes.
#[derive(Debug, Clone)]
pub struct DecodedEvidence {
    /// The quote.
    pub quote: Vec<u8>,
    /// The CC event log, when sent and non-empty.
    pub cc_eventlog: Option<Vec<u8>>,
}

impl DecodedEvidence {
    /// Decodes the wire JSON.
    pub fn from_json(evidence: &Value) -> Result<Self, VerifyError> {
        let ev = TdxEvidence::deserialize(evidence)
            .map_err(|e| VerifyError::Malformed(format!("TDX evidence: {e}")))?;
        if ev.quote.is_empty() {
            return Err(VerifyError::Malformed("TDX quote is empty".into()));
        }
        let quote = STANDARD
            .decode(ev.quote.as_bytes())
            .map_err(|e| VerifyError::Malformed(format!("TDX quote is not base64: {e}")))?;
        let cc_eventlog = match ev.cc_eventlog.as_deref() {
            Some(s) if !s.is_empty() => Some(STANDARD.decode(s.as_bytes()).map_err(|e| {
                VerifyError::Malformed(format!("TDX cc_eventlog is not base64: {e}"))
            })?),
            _ => None,
        };
        Ok(DecodedEvidence { quote, cc_eventlog })
    }
}

/// What the PCK leaf certificate embedded in the quote says about the platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PckInfo {
    /// FMSPC (6 bytes).
    pub fmspc: [u8; 6],
    /// Issuing CA.
    pub ca: PckCa,
    /// platformInstanceId (multi-package platforms).
    pub platform_instance_id: Option<Vec<u8>>,
}

/// DER certificates of the PEM chain embedded in the quote's certification data
/// (PCK leaf first). The quote's signature does not cover them: `dcap-qvl` verifies the chain.
pub fn embedded_certs(quote_bytes: &[u8]) -> Vec<Vec<u8>> {
    const BEGIN: &[u8] = b"-----BEGIN CERTIFICATE-----";
    const END: &[u8] = b"-----END CERTIFICATE-----";
    let mut out = Vec::new();
    let mut rest = quote_bytes;
    while let Some(start) = find(rest, BEGIN) {
        let after = &rest[start + BEGIN.len()..];
        let Some(end) = find(after, END) else { break };
        let b64: Vec<u8> = after[..end]
            .iter()
            .copied()
            .filter(|c| !c.is_ascii_whitespace())
            .collect();
        if let Ok(der) = STANDARD.decode(&b64) {
            out.push(der);
        }
        rest = &after[end + END.len()..];
    }
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

// 1.2.840.113741.1.13.1 and its FMSPC (.4) and platformInstanceId (.6) members.
const SGX_EXT_OID: &str = "1.2.840.113741.1.13.1";
const OID_FMSPC: &[u8] = &[0x2A, 0x86, 0x48, 0x86, 0xF8, 0x4D, 0x01, 0x0D, 0x01, 0x04];
const OID_PLATFORM_INSTANCE_ID: &[u8] =
    &[0x2A, 0x86, 0x48, 0x86, 0xF8, 0x4D, 0x01, 0x0D, 0x01, 0x06];

/// Reads FMSPC, CA type and platformInstanceId from the quote's PCK certificate.
pub fn pck_info(quote_bytes: &[u8]) -> Result<PckInfo, VerifyError> {
    let certs = embedded_certs(quote_bytes);
    let leaf = certs.first().ok_or_else(|| {
        VerifyError::CertificateChain("quote carries no PCK certificate chain".into())
    })?;
    let (_, cert) = X509Certificate::from_der(leaf)
        .map_err(|e| VerifyError::CertificateChain(format!("PCK certificate: {e}")))?;
    let issuer_cn = cert
        .issuer()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default();
    let ca = if issuer_cn.contains("Platform") {
        PckCa::Platform
    } else if issuer_cn.contains("Processor") {
        PckCa::Processor
    } else {
        return Err(VerifyError::CertificateChain(format!(
            "PCK certificate issuer {issuer_cn:?} is not an Intel PCK CA"
        )));
    };
    let ext = cert
        .extensions()
        .iter()
        .find(|e| e.oid.to_id_string() == SGX_EXT_OID)
        .ok_or_else(|| {
            VerifyError::CertificateChain("PCK certificate has no SGX extension".into())
        })?;
    let bad = || VerifyError::CertificateChain("PCK certificate SGX extension is malformed".into());
    let seq = der::single(ext.value)
        .filter(|t| t.tag == 0x30)
        .ok_or_else(bad)?;
    let mut fmspc = None;
    let mut platform_instance_id = None;
    for item in der::elements(seq.value) {
        let item = item.filter(|t| t.tag == 0x30).ok_or_else(bad)?;
        let (oid, rest) = der::next(item.value).ok_or_else(bad)?;
        let value = der::single(rest);
        match (oid.value, value) {
            (OID_FMSPC, Some(v)) if v.tag == 0x04 => fmspc = v.value.try_into().ok(),
            (OID_PLATFORM_INSTANCE_ID, Some(v)) if v.tag == 0x04 => {
                platform_instance_id = Some(v.value.to_vec())
            }
            _ => {}
        }
    }
    Ok(PckInfo {
        fmspc: fmspc.ok_or_else(bad)?,
        ca,
        platform_instance_id,
    })
}

/// The collateral this quote needs.
pub fn collateral_request(ev: &DecodedEvidence) -> Result<CollateralRequest, VerifyError> {
    Quote::parse(&ev.quote)?;
    let pck = pck_info(&ev.quote)?;
    Ok(CollateralRequest::Tdx {
        fmspc: hex::encode(pck.fmspc),
        ca: pck.ca,
    })
}

/// Verifies decoded TDX evidence up to `root_ca` (DER; `None` is Intel's SGX root CA);
/// returns upstream's claims plus `tcb_status` and `advisory_ids`.
pub fn verify(
    root_ca: Option<&[u8]>,
    evidence: &DecodedEvidence,
    expected_report_data: &[u8],
    expected_init_data_digest: Option<&[u8]>,
    collateral: &TdxCollateral,
    now_unix: i64,
) -> Result<Map<String, Value>, VerifyError> {
    let quote = Quote::parse(&evidence.quote)?;
    if now_unix < collateral.not_before || now_unix > collateral.not_after {
        return Err(VerifyError::CollateralExpired(format!(
            "collateral is valid from {} to {} (unix seconds), now is {now_unix}",
            collateral.not_before, collateral.not_after
        )));
    }
    let now_secs = u64::try_from(now_unix)
        .map_err(|_| VerifyError::CollateralExpired("time before 1970".into()))?;
    let verifier = match root_ca {
        Some(der) => QuoteVerifier::new_with_config(der.to_vec()),
        None => QuoteVerifier::new_prod().with_config::<RingConfig>(),
    };
    let report = verifier
        .allow_debug(true)
        .allow_service_td(true)
        .verify(&evidence.quote, &collateral.collateral, now_secs)
        .map_err(|e| match classify(&format!("{e:#}")) {
            VerifyError::CertificateRevoked(d) => VerifyError::CertificateRevoked(
                match revoked_detail(&evidence.quote, &collateral.collateral) {
                    Some(which) => format!("{which} ({d})"),
                    None => d,
                },
            ),
            other => other,
        })?;

    binding::check_report_data(quote.body.report_data(), expected_report_data)?;
    binding::check_init_data(quote.body.mr_config_id(), expected_init_data_digest)?;

    let log = match &evidence.cc_eventlog {
        Some(bytes) => {
            let log = EventLog::parse(bytes)?;
            log.check_rtmrs([
                quote.body.rtmr(0),
                quote.body.rtmr(1),
                quote.body.rtmr(2),
                quote.body.rtmr(3),
            ])?;
            Some(log)
        }
        None => None,
    };
    let pck = pck_info(&evidence.quote).ok();
    let mut claims = claims::parsed_claims(
        &quote,
        log.as_ref(),
        pck.as_ref().and_then(|p| p.platform_instance_id.as_deref()),
    );
    claims.insert("tcb_status".into(), Value::String(report.status));
    claims.insert(
        "advisory_ids".into(),
        Value::Array(report.advisory_ids.into_iter().map(Value::String).collect()),
    );
    claims.insert(
        "collateral_expiration_status".into(),
        Value::String("0".into()),
    );
    claims.insert(
        "latest_issue_date".into(),
        Value::String(rfc3339(collateral.not_before)),
    );
    claims.insert(
        "earliest_expiration_date".into(),
        Value::String(rfc3339(collateral.not_after)),
    );
    if let Some(pck) = pck {
        claims.insert("fmspc".into(), Value::String(hex::encode(pck.fmspc)));
    }
    Ok(claims)
}

/// Which certificate a CRL of the collateral lists: the quote's PCK certificate or PCK CA,
/// or the TCB info / QE identity signer. `dcap-qvl` refuses a revoked certificate but says
/// only `CertRevoked`; an operator needs to know which one (and since when).
fn revoked_detail(quote: &[u8], c: &dcap_qvl::QuoteCollateralV3) -> Option<String> {
    let names = ["PCK certificate", "PCK CA certificate"];
    let mut certs: Vec<(&str, Vec<u8>)> = embedded_certs(quote)
        .into_iter()
        .zip(names)
        .map(|(der, name)| (name, der))
        .collect();
    for (name, pem) in [
        ("TCB info signing certificate", &c.tcb_info_issuer_chain),
        (
            "QE identity signing certificate",
            &c.qe_identity_issuer_chain,
        ),
    ] {
        if let Some(der) = embedded_certs(pem.as_bytes()).into_iter().next() {
            certs.push((name, der));
        }
    }
    for (name, der) in &certs {
        let Ok((_, cert)) = X509Certificate::from_der(der) else {
            continue;
        };
        for (crl_name, crl_der) in [("PCK CRL", &c.pck_crl), ("root CA CRL", &c.root_ca_crl)] {
            let Ok((_, crl)) = x509_parser::parse_x509_crl(crl_der) else {
                continue;
            };
            if crl.issuer() != cert.issuer() {
                continue;
            }
            if let Some(r) = crl
                .iter_revoked_certificates()
                .find(|r| r.raw_serial() == cert.raw_serial())
            {
                let reason = r
                    .reason_code()
                    .map(|(_, code)| format!(", reason {code}"))
                    .unwrap_or_default();
                return Some(format!(
                    "the {name} (serial {}) is listed on the {crl_name} as revoked since {}{reason}",
                    hex::encode(cert.raw_serial()),
                    r.revocation_date
                ));
            }
        }
    }
    None
}

fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// Maps a `dcap-qvl` error chain (anyhow text) to a typed refusal.
pub(crate) fn classify(msg: &str) -> VerifyError {
    let m = msg.to_ascii_lowercase();
    let detail = msg.to_owned();
    if m.contains("tcb status is invalid: revoked") {
        VerifyError::TcbRevoked
    } else if m.contains("no matching tcb level") || m.contains("below minimum required") {
        VerifyError::TcbNotSupported(detail)
    } else if m.contains("revoked") {
        VerifyError::CertificateRevoked(detail)
    } else if m.contains("isv enclave report signature")
        || m.contains("qe_report in quote")
        || m.contains("qe report hash mismatch")
    {
        VerifyError::SignatureInvalid(detail)
    } else if m.contains("expired")
        || m.contains("in the future")
        || m.contains("notvalidyet")
        || m.contains("not valid yet")
    {
        VerifyError::CollateralExpired(detail)
    } else if m.contains("pck") || m.contains("certificate") || m.contains("unknownissuer") {
        VerifyError::CertificateChain(detail)
    } else if m.contains("tcb_info")
        || m.contains("tcbinfo")
        || m.contains("qe_identity")
        || m.contains("qe identity")
        || m.contains("crl")
        || m.contains("root ca")
    {
        VerifyError::CollateralInvalid(detail)
    } else if m.contains("decode quote") || m.contains("unsupported") {
        VerifyError::Malformed(detail)
    } else {
        VerifyError::Rejected(detail)
    }
}
