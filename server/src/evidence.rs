//! Offline evidence verification for operators (`kbsctl evidence verify`): a raw TDX quote
//! with its DCAP collateral, or a raw SNP report with its VCEK/VLEK, checked at a given time
//! exactly as the KBS checks it, with the claims under the names the token carries. For SNP,
//! AMD's CRL of the report's generation (a file from KDS `/vcek/v1/{product}/crl`) is checked
//! as the KBS checks it, and its absence is treated per the CRL policy (`required` unless
//! the operator says `if-published`, as `[attestation.snp] crl`).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};
use tee_verifiers::collateral::{SnpCollateral, TdxCollateral};
use tee_verifiers::request::Generation;
use tee_verifiers::snp::crl::CrlPolicy;
use tee_verifiers::{Collateral, Decoded, TeeKind, TrustAnchors};

/// What to verify.
pub struct OfflineEvidence<'a> {
    /// The TEE.
    pub tee: TeeKind,
    /// The raw quote (TDX) or attestation report (SNP).
    pub evidence: &'a [u8],
    /// DCAP collateral JSON (TDX), or the VCEK/VLEK in DER or PEM (SNP).
    pub collateral: Option<&'a [u8]>,
    /// The time validity is checked at.
    pub at: SystemTime,
    /// Expected REPORTDATA; the evidence's own when absent (binding not checked).
    pub report_data: Option<Vec<u8>>,
    /// Expected init-data digest (MRCONFIGID / HOST_DATA); not checked when absent.
    pub init_data_digest: Option<Vec<u8>>,
    /// SNP: AMD's CRL of the report's generation (DER or PEM).
    pub crl: Option<&'a [u8]>,
    /// SNP: what to do without `crl` (`Required`: refuse, as the KBS by default).
    pub crl_policy: CrlPolicy,
    /// Roots instead of the vendor's: TDX, one root CA certificate (PEM or DER); SNP, the
    /// ARK, ASK and ASVK (PEM, the shape of AMD's `ask_ark_asvk.pem`), for any generation.
    pub roots: Option<&'a [u8]>,
}

/// The vendor's roots, or `e.roots`, with `e.crl_policy`.
fn anchors(e: &OfflineEvidence<'_>) -> Result<TrustAnchors, String> {
    let mut anchors = (*TrustAnchors::vendor())
        .clone()
        .with_snp_crl_policy(e.crl_policy);
    let Some(roots) = e.roots else {
        return Ok(anchors);
    };
    let bad = |err: tee_verifiers::VerifyError| format!("--roots: {err}");
    match e.tee {
        TeeKind::Tdx => {
            let mut certs = tee_verifiers::anchors::certificates(roots);
            if certs.len() != 1 {
                return Err(format!(
                    "--roots: expected one root CA certificate for TDX, found {}",
                    certs.len()
                ));
            }
            anchors = anchors.with_intel_root_ca(certs.remove(0)).map_err(bad)?;
        }
        TeeKind::Snp => {
            for g in [Generation::Milan, Generation::Genoa, Generation::Turin] {
                anchors = anchors.with_amd_roots_pem(g, roots).map_err(bad)?;
            }
        }
    }
    Ok(anchors)
}

/// The verified claims, or why the evidence is refused (`Name: reason`).
pub fn verify_offline(e: &OfflineEvidence<'_>) -> Result<Value, String> {
    let refused = |err: tee_verifiers::VerifyError| format!("{}: {err}", err.name());
    let (evidence, own_report_data, collateral) = match e.tee {
        TeeKind::Tdx => {
            let quote = tee_verifiers::tdx::quote::Quote::parse(e.evidence).map_err(refused)?;
            let rd = quote.body.report_data().to_vec();
            let json = e.collateral.ok_or(
                "TDX needs --collateral: the DCAP collateral JSON (PCK CRL, TCB info, QE identity, root CA CRL)",
            )?;
            if e.crl.is_some() {
                return Err(
                    "--crl is for SNP: TDX's CRLs are part of its DCAP collateral".to_owned(),
                );
            }
            let c = TdxCollateral::from_json(json).map_err(refused)?;
            (
                json!({"cc_eventlog": null, "quote": STANDARD.encode(e.evidence)}),
                rd,
                Collateral::Tdx(Arc::new(c)),
            )
        }
        TeeKind::Snp => {
            let report = tee_verifiers::snp::report::Report::new(e.evidence).map_err(refused)?;
            let rd = report.report_data().to_vec();
            let key = e.collateral.ok_or(
                "SNP needs --collateral: the VCEK or VLEK (DER or PEM) the report is signed with",
            )?;
            let kind = if report.signing_key() == 1 {
                "VLEK"
            } else {
                "VCEK"
            };
            let cert = match std::str::from_utf8(key) {
                Ok(pem) if pem.contains("-----BEGIN") => json!(pem),
                _ => json!(STANDARD.encode(key)),
            };
            (
                json!({
                    "attestation_report": STANDARD.encode(e.evidence),
                    "cert_chain": [{"cert_type": kind, "data": cert}],
                }),
                rd,
                match e.crl {
                    Some(bytes) => Collateral::Snp(SnpCollateral {
                        vcek: None,
                        crl: Some(Arc::new(
                            tee_verifiers::collateral::crl_der(bytes).map_err(refused)?,
                        )),
                    }),
                    None => Collateral::None,
                },
            )
        }
    };
    let report_data = e.report_data.clone().unwrap_or(own_report_data);
    let anchors = anchors(e)?;
    Decoded::new(e.tee, &evidence)
        .and_then(|d| {
            d.verify_with(
                &anchors,
                &report_data,
                e.init_data_digest.as_deref(),
                &collateral,
                e.at,
            )
        })
        .map(tee_verifiers::Claims::into_value)
        .map_err(refused)
}

/// `--at`: RFC 3339 (`2025-06-01T00:00:00Z`) or Unix seconds.
pub fn parse_time(text: &str) -> Result<SystemTime, String> {
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(UNIX_EPOCH + Duration::from_secs(secs));
    }
    let t = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("{text:?} is neither RFC 3339 nor Unix seconds: {e}"))?;
    u64::try_from(t.unix_timestamp())
        .map(|s| UNIX_EPOCH + Duration::from_secs(s))
        .map_err(|_| format!("{text:?} is before 1970"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const TDX_QUOTE: &[u8] = include_bytes!("../tee-verifiers/testdata/tdx/tdx_quote");
    const TDX_COLLATERAL: &[u8] =
        include_bytes!("../tee-verifiers/testdata/tdx/tdx_quote_collateral.json");
    const SNP_REPORT: &[u8] = include_bytes!("../tee-verifiers/testdata/snp/test-report.bin");
    const SNP_VCEK: &[u8] = include_bytes!("../tee-verifiers/testdata/snp/test-vcek.der");
    const SNP_VLEK_REPORT: &[u8] =
        include_bytes!("../tee-verifiers/testdata/snp/test-vlek-report.bin");
    const SNP_VLEK: &[u8] = include_bytes!("../tee-verifiers/testdata/snp/test-vlek.der");

    fn tdx_at() -> SystemTime {
        let c = TdxCollateral::from_json(TDX_COLLATERAL).unwrap();
        UNIX_EPOCH + Duration::from_secs((c.not_before + (c.not_after - c.not_before) / 2) as u64)
    }

    fn tdx(quote: &[u8], at: SystemTime) -> Result<Value, String> {
        verify_offline(&OfflineEvidence {
            tee: TeeKind::Tdx,
            evidence: quote,
            collateral: Some(TDX_COLLATERAL),
            at,
            report_data: None,
            init_data_digest: None,
            crl: None,
            crl_policy: CrlPolicy::Required,
            roots: None,
        })
    }

    #[test]
    fn tdx_quote_with_collateral_verifies_and_refusals_are_named() {
        let claims = tdx(TDX_QUOTE, tdx_at()).unwrap();
        assert_eq!(claims["tcb_status"], "UpToDate");
        let mut flipped = TDX_QUOTE.to_vec();
        flipped[200] ^= 1;
        assert!(
            tdx(&flipped, tdx_at())
                .unwrap_err()
                .starts_with("SignatureInvalid")
        );
        let late = parse_time("2100-01-01T00:00:00Z").unwrap();
        assert!(tdx(TDX_QUOTE, late).unwrap_err().starts_with("Collateral"));
        let no_collateral = verify_offline(&OfflineEvidence {
            tee: TeeKind::Tdx,
            evidence: TDX_QUOTE,
            collateral: None,
            at: tdx_at(),
            report_data: None,
            init_data_digest: None,
            crl: None,
            crl_policy: CrlPolicy::Required,
            roots: None,
        });
        assert!(no_collateral.unwrap_err().contains("--collateral"));
    }

    #[test]
    fn snp_reports_with_vcek_or_vlek() {
        let at = parse_time("1748736000").unwrap();
        // The real reports come without AMD's CRL: `if-published`, but for the first check.
        let required = verify_offline(&OfflineEvidence {
            tee: TeeKind::Snp,
            evidence: SNP_REPORT,
            collateral: Some(SNP_VCEK),
            at,
            report_data: None,
            init_data_digest: None,
            crl: None,
            crl_policy: CrlPolicy::Required,
            roots: None,
        })
        .unwrap_err();
        assert!(
            required.starts_with("CollateralUnavailable") && required.contains("no AMD Milan CRL"),
            "{required}"
        );
        let snp = |report, key| {
            verify_offline(&OfflineEvidence {
                tee: TeeKind::Snp,
                evidence: report,
                collateral: Some(key),
                at,
                report_data: None,
                init_data_digest: None,
                crl: None,
                crl_policy: CrlPolicy::IfPublished,
                roots: None,
            })
        };
        assert!(snp(SNP_REPORT, SNP_VCEK).unwrap()["measurement"].is_string());
        // The VLEK path is taken (a VCEK is the wrong kind), and the test VLEK report is then
        // refused for its VMPL 1, as upstream refuses it.
        assert!(
            snp(SNP_VLEK_REPORT, SNP_VCEK)
                .unwrap_err()
                .starts_with("CertificateChainInvalid")
        );
        assert_eq!(
            snp(SNP_VLEK_REPORT, SNP_VLEK).unwrap_err(),
            "EvidenceRejected: evidence rejected: SNP report VMPL is 1, expected 0"
        );
        let wrong = verify_offline(&OfflineEvidence {
            tee: TeeKind::Snp,
            evidence: SNP_REPORT,
            collateral: Some(SNP_VCEK),
            at,
            report_data: Some(vec![0; 64]),
            init_data_digest: None,
            crl: None,
            crl_policy: CrlPolicy::IfPublished,
            roots: None,
        });
        assert!(wrong.unwrap_err().starts_with("ReportDataMismatch"));
    }

    #[test]
    fn times_are_rfc3339_or_unix_seconds() {
        assert_eq!(
            parse_time("2025-06-01T02:00:00+02:00").unwrap(),
            parse_time("1748736000").unwrap()
        );
        assert!(parse_time("yesterday").is_err());
    }
}
