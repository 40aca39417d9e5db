//! AMD SEV-SNP: attestation report verification against the VCEK or VLEK, that key against
//! AMD's ARK/ASK (ASVK for a VLEK) of the report's processor generation, the report's
//! REPORTED_TCB against the key's TCB extensions, report-data and HOST_DATA binding.
//!
//! # Evidence on the wire
//!
//! What a real `kbs_protocol` client sends as `primary_evidence` for `snp`
//! (guest-components `attestation-agent/attester/src/snp/mod.rs`, struct `SnpEvidence`;
//! trustee `deps/verifier/src/snp/mod.rs` deserializes the same struct):
//!
//! ```json
//! {"attestation_report": { <the `sev` crate's serde form of AttestationReport> },
//!  "cert_chain": [{"cert_type": "VCEK", "data": [48, 130, ...]}, ...] | null}
//! ```
//!
//! The report object has the fields of `sev` 7's `AttestationReport` (`version`, `guest_svn`,
//! `policy` as a number, byte arrays as arrays of numbers, `current_tcb`/`reported_tcb`/...
//! as `{fmc, bootloader, tee, snp, microcode}`, `signature: {r, s}`...); `cert_chain` is the
//! extended-report certificate table (`cert_type` one of `ARK`, `ASK`, `VCEK`, `VLEK`,
//! `CRL`, `Empty` or `{"OTHER": uuid}`), or null when the host supplies none, in which case
//! the verifier fetches the VCEK from AMD KDS (upstream does the same). Newer attesters add
//! `svsm_manifest` (SVSM vTPM), which is not supported here and ignored.
//!
//! Also accepted, for clients that carry the raw report: `attestation_report` as a standard
//! base64 string or an array of the 1184 report bytes, and certificate `data` as base64,
//! DER or PEM.
//!
//! # Checks, in order
//!
//! 1. report version 2..=5, SIGNATURE_ALGO 1 (ECDSA P-384 SHA-384);
//! 2. generation: from CPUID family/model (version 3+; upstream's table), else from the
//!    key's productName extension; both present and different is refused;
//! 3. the VCEK chains to the generation's ASK and ARK, a VLEK to its ASVK and ARK
//!    (RSASSA-PSS SHA-384); ARK/ASK sent in `cert_chain` are ignored, the configured
//!    [`TrustAnchors`] rule (AMD's embedded roots unless an operator set others);
//!    The key and its ASK/ASVK must not be on AMD's CRL of the generation (signed by the
//!    ARK, see [`crl`]); with no CRL at hand the anchors' [`crl::CrlPolicy`] refuses
//!    (`required`, the default) or skips the check (`if-published`);
//! 4. the report signature by the key;
//! 5. REPORTED_TCB (bootloader, tee, snp, microcode, and fmc on Turin) equals the key's
//!    extensions, and for a VCEK the chip id equals its hwID (upstream `verify_report_tcb`);
//! 6. VMPL 0 (upstream);
//! 7. REPORT_DATA and HOST_DATA binding (see [`crate::binding`]).

pub mod crl;
pub mod report;
pub mod vek;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::signature::{ECDSA_P384_SHA384_FIXED, UnparsedPublicKey};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use sev::parser::ByteParser;

use crate::anchors::TrustAnchors;
pub use crate::request::Generation;
use crate::request::{CollateralRequest, SnpTcb, VcekId};
use crate::{VerifyError, binding};

use report::Report;
use vek::{Vek, VekKind};

/// Decoded SNP evidence: raw report and the VCEK/VLEK it carries, if any.
#[derive(Debug, Clone)]
pub struct DecodedEvidence {
    /// The 1184 raw report bytes.
    pub report: Vec<u8>,
    /// The VEK sent in `cert_chain` (DER) and its kind.
    pub vek: Option<(VekKind, Vec<u8>)>,
}

fn bytes_field(v: &Value, what: &str) -> Result<Vec<u8>, VerifyError> {
    match v {
        Value::String(s) => STANDARD
            .decode(s.trim().as_bytes())
            .map_err(|e| VerifyError::Malformed(format!("{what} is not base64: {e}"))),
        Value::Array(items) => items
            .iter()
            .map(|i| i.as_u64().and_then(|n| u8::try_from(n).ok()))
            .collect::<Option<Vec<u8>>>()
            .ok_or_else(|| VerifyError::Malformed(format!("{what} is not an array of bytes"))),
        _ => Err(VerifyError::Malformed(format!(
            "{what} has an unexpected type"
        ))),
    }
}

impl DecodedEvidence {
    /// Decodes the wire JSON.
    pub fn from_json(evidence: &Value) -> Result<Self, VerifyError> {
        let report_v = evidence.get("attestation_report").ok_or_else(|| {
            VerifyError::Malformed("SNP evidence has no attestation_report".into())
        })?;
        let report = match report_v {
            Value::Object(_) => {
                let r = sev::firmware::guest::AttestationReport::deserialize(report_v)
                    .map_err(|e| VerifyError::Malformed(format!("SNP attestation_report: {e}")))?;
                r.to_bytes()
                    .map_err(|e| VerifyError::Malformed(format!("SNP attestation_report: {e}")))?
                    .to_vec()
            }
            other => bytes_field(other, "SNP attestation_report")?,
        };
        Report::new(&report)?;
        let mut vek = None;
        if let Some(Value::Array(entries)) = evidence.get("cert_chain") {
            for entry in entries {
                let kind = match entry.get("cert_type").and_then(Value::as_str) {
                    Some("VCEK") => VekKind::Vcek,
                    Some("VLEK") => VekKind::Vlek,
                    _ => continue,
                };
                if vek.is_some() {
                    return Err(VerifyError::Malformed(
                        "SNP cert_chain holds more than one VCEK/VLEK".into(),
                    ));
                }
                let data = entry
                    .get("data")
                    .ok_or_else(|| VerifyError::Malformed("cert_chain entry has no data".into()))?;
                vek = Some((
                    kind,
                    vek::decode_cert(&bytes_field(data, "cert_chain data")?)?,
                ));
            }
        }
        Ok(DecodedEvidence { report, vek })
    }
}

/// The generation of a report: from CPUID when the report has it, else from the key.
fn generation(report: &Report<'_>, vek_der: Option<&[u8]>) -> Result<Generation, VerifyError> {
    let from_cpuid = match report.cpuid() {
        Some((fam, model, _)) => Some(Generation::from_cpuid(fam, model).ok_or_else(|| {
            VerifyError::Rejected(format!(
                "processor family {fam:#x} model {model:#x} is not Milan, Genoa or Turin"
            ))
        })?),
        None => None,
    };
    let from_cert = match vek_der {
        Some(der) => vek::product_generation(der)?,
        None => None,
    };
    match (from_cpuid, from_cert) {
        (Some(a), Some(b)) if a != b => Err(VerifyError::CertificateChain(format!(
            "report is from a {a:?} processor, the key is for {b:?}"
        ))),
        (Some(g), _) | (None, Some(g)) => Ok(g),
        (None, None) => Err(VerifyError::Malformed(
            "report version 2 without a VCEK/VLEK product name: generation unknown".into(),
        )),
    }
}

/// Turin chip ids are 8 bytes, zero-extended (the `sev` crate's test for version 2 reports).
fn chip_id_is_turin_like(chip_id: &[u8]) -> bool {
    chip_id[8..].iter().all(|&b| b == 0) && chip_id[..8].iter().any(|&b| b != 0)
}

/// The collateral this evidence needs: the VCEK from KDS when `cert_chain` carries no key.
pub fn collateral_request(ev: &DecodedEvidence) -> Result<CollateralRequest, VerifyError> {
    let report = Report::new(&ev.report)?;
    if let Some((_, der)) = &ev.vek {
        // Only AMD's CRL is needed; a generation that cannot be told is refused by `verify`.
        return Ok(match generation(&report, Some(der)) {
            Ok(g) => CollateralRequest::SnpCrl(g),
            Err(_) => CollateralRequest::None,
        });
    }
    // Version 2 reports carry no CPUID: the generation is learnt from the fetched VCEK.
    let generation = match report.cpuid() {
        Some(_) => Some(generation(&report, None)?),
        None if chip_id_is_turin_like(report.chip_id()) => Some(Generation::Turin),
        None => None,
    };
    if report.chip_id().iter().all(|&b| b == 0) {
        return Err(VerifyError::Rejected(
            "report masks its chip id and carries no VCEK/VLEK: nothing to fetch".into(),
        ));
    }
    let hw_id = match generation {
        Some(Generation::Turin) => report.chip_id()[..8].to_vec(),
        _ => report.chip_id().to_vec(),
    };
    Ok(CollateralRequest::SnpVcek(VcekId {
        generation,
        hw_id,
        tcb: report.reported_tcb(generation.unwrap_or(Generation::Milan)),
    }))
}

/// Verifies decoded SNP evidence with the key it carries or `fetched_vcek` (DER), up to
/// the roots `anchors` hold for the report's generation.
pub fn verify(
    anchors: &TrustAnchors,
    evidence: &DecodedEvidence,
    expected_report_data: &[u8],
    expected_init_data_digest: Option<&[u8]>,
    fetched_vcek: Option<&[u8]>,
    crl: Option<&[u8]>,
    now_unix: i64,
) -> Result<Map<String, Value>, VerifyError> {
    let report = Report::new(&evidence.report)?;
    if !(2..=5).contains(&report.version()) {
        return Err(VerifyError::Rejected(format!(
            "SNP report version {} is not supported (2..=5)",
            report.version()
        )));
    }
    if report.sig_algo() != 1 {
        return Err(VerifyError::Rejected(format!(
            "SNP report signature algorithm {} is not ECDSA P-384 SHA-384",
            report.sig_algo()
        )));
    }
    let (kind, vek_der) = match (&evidence.vek, fetched_vcek) {
        (Some((kind, der)), _) => (*kind, der.as_slice()),
        (None, Some(der)) => (VekKind::Vcek, der),
        (None, None) => {
            return Err(VerifyError::CollateralUnavailable(
                "no VCEK/VLEK in the evidence and none fetched".into(),
            ));
        }
    };
    let expected_kind = match report.signing_key() {
        0 => VekKind::Vcek,
        1 => VekKind::Vlek,
        other => {
            return Err(VerifyError::Rejected(format!(
                "SNP report SIGNING_KEY {other} is neither VCEK nor VLEK"
            )));
        }
    };
    if kind != expected_kind {
        return Err(VerifyError::CertificateChain(format!(
            "report is signed by a {}, the evidence carries a {}",
            expected_kind.as_str(),
            kind.as_str()
        )));
    }
    let generation = generation(&report, Some(vek_der))?;
    let roots = anchors.amd_roots(generation)?;
    let vek = vek::verify_vek(vek_der, kind, generation, roots, now_unix)?;
    match crl {
        Some(crl) => crl::check(crl, roots, generation, kind, vek_der, now_unix)?,
        None => crl::missing(anchors.snp_crl_policy(), generation, kind)?,
    }
    verify_report_signature(&report, &vek)?;
    check_tcb(&report, &vek)?;
    if report.vmpl() != 0 {
        return Err(VerifyError::Rejected(format!(
            "SNP report VMPL is {}, expected 0",
            report.vmpl()
        )));
    }
    binding::check_report_data(report.report_data(), expected_report_data)?;
    binding::check_init_data(report.host_data(), expected_init_data_digest)?;
    Ok(claims(&report, &vek))
}

/// Checks the report signature with the verified key.
pub fn verify_report_signature(report: &Report<'_>, vek: &Vek) -> Result<(), VerifyError> {
    let sig = report
        .signature_fixed()
        .ok_or_else(|| VerifyError::SignatureInvalid("signature components too large".into()))?;
    UnparsedPublicKey::new(&ECDSA_P384_SHA384_FIXED, &vek.public_key)
        .verify(report.signed(), &sig)
        .map_err(|_| {
            VerifyError::SignatureInvalid(format!(
                "SNP report signature does not verify with the {}",
                vek.kind.as_str()
            ))
        })
}

/// REPORTED_TCB against the key's extensions; chip id against a VCEK's hwID.
pub fn check_tcb(report: &Report<'_>, vek: &Vek) -> Result<(), VerifyError> {
    let reported = report.reported_tcb(vek.generation);
    let cert = vek.tcb;
    for (name, r, c) in [
        ("bootloader", reported.bootloader, cert.bootloader),
        ("tee", reported.tee, cert.tee),
        ("snp", reported.snp, cert.snp),
        ("microcode", reported.microcode, cert.microcode),
    ] {
        if r != c {
            return Err(VerifyError::TcbMismatch(format!(
                "{name}: report {r}, certificate {c}"
            )));
        }
    }
    if vek.generation == Generation::Turin && reported.fmc != cert.fmc {
        return Err(VerifyError::TcbMismatch(format!(
            "fmc: report {:?}, certificate {:?}",
            reported.fmc, cert.fmc
        )));
    }
    if let (VekKind::Vcek, Some(hw_id)) = (vek.kind, &vek.hw_id)
        && hw_id.as_slice() != report.chip_id()
    {
        return Err(VerifyError::TcbMismatch(
            "chip id differs from the VCEK's hwID".into(),
        ));
    }
    Ok(())
}

fn tcb_json(t: SnpTcb) -> Value {
    json!({"fmc": t.fmc, "bootloader": t.bootloader, "tee": t.tee, "snp": t.snp,
           "microcode": t.microcode})
}

/// Upstream's SNP claims (trustee `deps/verifier/src/snp/mod.rs`, `parse_tee_evidence`),
/// same names and string values, plus what this verifier adds for policies.
pub fn claims(report: &Report<'_>, vek: &Vek) -> Map<String, Value> {
    let policy = report.policy();
    let plat = report.plat_info();
    let bit = |v: u64, b: u32| (v >> b) & 1 == 1;
    let g = vek.generation;
    let reported = report.reported_tcb(g);
    let s = |v: String| Value::String(v);
    let mut m = Map::new();
    // Upstream names and formats.
    m.insert(
        "policy_abi_major".into(),
        s(((policy >> 8) & 0xff).to_string()),
    );
    m.insert("policy_abi_minor".into(), s((policy & 0xff).to_string()));
    m.insert("policy_smt_allowed".into(), s(bit(policy, 16).to_string()));
    m.insert("policy_migrate_ma".into(), s(bit(policy, 18).to_string()));
    m.insert(
        "policy_debug_allowed".into(),
        s(bit(policy, 19).to_string()),
    );
    m.insert(
        "policy_single_socket".into(),
        s(bit(policy, 20).to_string()),
    );
    m.insert(
        "reported_tcb_bootloader".into(),
        s(reported.bootloader.to_string()),
    );
    m.insert("reported_tcb_tee".into(), s(reported.tee.to_string()));
    m.insert("reported_tcb_snp".into(), s(reported.snp.to_string()));
    m.insert(
        "reported_tcb_microcode".into(),
        s(reported.microcode.to_string()),
    );
    m.insert("platform_tsme_enabled".into(), s(bit(plat, 1).to_string()));
    m.insert("platform_smt_enabled".into(), s(bit(plat, 0).to_string()));
    m.insert(
        "measurement".into(),
        s(STANDARD.encode(report.measurement())),
    );
    m.insert(
        "report_data".into(),
        s(STANDARD.encode(report.report_data())),
    );
    m.insert("init_data".into(), s(STANDARD.encode(report.host_data())));
    // Additions (not in upstream's flat claims).
    if let Some(fmc) = reported.fmc {
        m.insert("reported_tcb_fmc".into(), s(fmc.to_string()));
    }
    m.insert(
        "generation".into(),
        s(g.product_name().to_ascii_lowercase()),
    );
    m.insert("signing_key".into(), s(vek.kind.as_str().into()));
    // The report's REPORTED_TCB equals the key's TCB extensions (checked above); AMD
    // publishes no status list, so policies compare reported_tcb_* against minimums.
    m.insert("tcb_status".into(), s("ReportedTcbVerified".into()));
    m.insert("version".into(), json!(report.version()));
    m.insert("vmpl".into(), json!(report.vmpl()));
    m.insert("guest_svn".into(), json!(report.guest_svn()));
    m.insert("family_id".into(), s(hex::encode(report.family_id())));
    m.insert("image_id".into(), s(hex::encode(report.image_id())));
    m.insert(
        "id_key_digest".into(),
        s(hex::encode(report.id_key_digest())),
    );
    m.insert(
        "author_key_digest".into(),
        s(hex::encode(report.author_key_digest())),
    );
    m.insert("report_id".into(), s(hex::encode(report.report_id())));
    m.insert("report_id_ma".into(), s(hex::encode(report.report_id_ma())));
    m.insert("chip_id".into(), s(hex::encode(report.chip_id())));
    m.insert("current_tcb".into(), tcb_json(report.current_tcb(g)));
    m.insert("reported_tcb".into(), tcb_json(reported));
    m.insert("committed_tcb".into(), tcb_json(report.committed_tcb(g)));
    m.insert("launch_tcb".into(), tcb_json(report.launch_tcb(g)));
    m
}
