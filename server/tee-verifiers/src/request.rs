//! What verifying a piece of evidence needs from outside it: the collateral data model
//! (which items, keyed how, with which validity), below both the verifiers (`tdx`, `snp`)
//! that ask for it and the store (`collateral`) that fetches and caches it.

use std::sync::Arc;

use dcap_qvl::QuoteCollateralV3;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::VerifyError;

/// AMD EPYC processor generations whose roots are embedded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Generation {
    /// 3rd Gen EPYC.
    Milan,
    /// 4th Gen EPYC.
    Genoa,
    /// 5th Gen EPYC.
    Turin,
}

impl Generation {
    /// The KDS product name.
    pub fn product_name(&self) -> &'static str {
        match self {
            Generation::Milan => "Milan",
            Generation::Genoa => "Genoa",
            Generation::Turin => "Turin",
        }
    }

    /// From CPUID family and model (upstream `get_processor_generation`).
    pub fn from_cpuid(family: u8, model: u8) -> Option<Self> {
        match (family, model) {
            (0x19, 0x00..=0x0F) => Some(Generation::Milan),
            (0x19, 0x10..=0x1F) | (0x19, 0xA0..=0xAF) => Some(Generation::Genoa),
            (0x1A, 0x00..=0x11) => Some(Generation::Turin),
            _ => None,
        }
    }

    /// From a VCEK/VLEK productName ("Milan-B0", "Genoa", ...).
    pub fn from_product_name(name: &str) -> Option<Self> {
        [Generation::Milan, Generation::Genoa, Generation::Turin]
            .into_iter()
            .find(|g| name.starts_with(g.product_name()))
    }
}

/// Which PCK CA issued the PCK certificate (selects the PCK CRL).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PckCa {
    /// "Intel SGX PCK Processor CA".
    Processor,
    /// "Intel SGX PCK Platform CA".
    Platform,
}

impl PckCa {
    /// The `ca=` query value of the PCCS pckcrl API.
    pub fn as_str(&self) -> &'static str {
        match self {
            PckCa::Processor => "processor",
            PckCa::Platform => "platform",
        }
    }
}

/// One cacheable piece of collateral.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CollateralKey {
    /// The PCK CRL of one PCK CA, with its issuer chain.
    PckCrl(PckCa),
    /// Intel's root CA CRL.
    RootCaCrl,
    /// The TDX TCB info for an FMSPC (hex, lower case), with signature and issuer chain.
    TdxTcbInfo(String),
    /// The TDX QE identity, with signature and issuer chain.
    TdxQeIdentity,
    /// An SNP VCEK for a chip at a reported TCB.
    Vcek(VcekId),
    /// AMD's CRL of a processor generation (signed by its ARK).
    SnpCrl(Generation),
}

impl CollateralKey {
    /// A file-name-safe name for the key (persistent caches, logs).
    pub fn name(&self) -> String {
        match self {
            CollateralKey::PckCrl(ca) => format!("tdx-pckcrl-{}", ca.as_str()),
            CollateralKey::RootCaCrl => "tdx-rootcacrl".into(),
            CollateralKey::TdxTcbInfo(fmspc) => format!("tdx-tcb-{fmspc}"),
            CollateralKey::TdxQeIdentity => "tdx-qe-identity".into(),
            CollateralKey::Vcek(id) => format!(
                "snp-vcek-{}-{}-{}",
                id.generation.map_or("any", |g| g.product_name()),
                hex::encode(&id.hw_id),
                id.tcb.url_query().replace(['&', '='], "_")
            ),
            CollateralKey::SnpCrl(g) => format!("snp-crl-{}", g.product_name()),
        }
    }
}

/// The TCB SPLs a VCEK is issued for (the report's REPORTED_TCB).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SnpTcb {
    /// FMC SPL (Turin only).
    pub fmc: Option<u8>,
    /// PSP bootloader SPL.
    pub bootloader: u8,
    /// PSP OS SPL.
    pub tee: u8,
    /// SNP firmware SPL.
    pub snp: u8,
    /// Microcode SPL.
    pub microcode: u8,
}

impl SnpTcb {
    /// The KDS query string (`[fmcSPL=..&]blSPL=..&teeSPL=..&snpSPL=..&ucodeSPL=..`).
    pub fn url_query(&self) -> String {
        let fmc = self
            .fmc
            .map(|f| format!("fmcSPL={f:02}&"))
            .unwrap_or_default();
        format!(
            "{fmc}blSPL={:02}&teeSPL={:02}&snpSPL={:02}&ucodeSPL={:02}",
            self.bootloader, self.tee, self.snp, self.microcode
        )
    }
}

/// Identifies a VCEK: generation, chip id (hwID as KDS wants it) and TCB.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VcekId {
    /// Processor generation (KDS product name); `None` for a version 2 report, which has no
    /// CPUID: fetchers then try Milan, then Genoa (same TCB layout), as KDS answers 404 for
    /// a chip under the wrong product.
    pub generation: Option<Generation>,
    /// Hardware id: the 64-byte chip id (first 8 bytes on Turin).
    pub hw_id: Vec<u8>,
    /// Reported TCB.
    pub tcb: SnpTcb,
}

/// What a piece of evidence needs to be verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CollateralRequest {
    /// DCAP collateral for this FMSPC and PCK CA.
    Tdx {
        /// FMSPC from the PCK certificate (hex, lower case).
        fmspc: String,
        /// The CA that issued the PCK certificate.
        ca: PckCa,
    },
    /// The VCEK for this chip and TCB (the evidence carries no VCEK/VLEK), and AMD's CRL of
    /// its generation (known from the report, else from the VCEK once fetched).
    SnpVcek(VcekId),
    /// AMD's CRL of this generation (the evidence carries its VCEK/VLEK).
    SnpCrl(Generation),
    /// Nothing beyond the evidence and the built-in roots.
    None,
}

impl CollateralRequest {
    /// The cache keys that make up this request.
    pub fn keys(&self) -> Vec<CollateralKey> {
        match self {
            CollateralRequest::Tdx { fmspc, ca } => vec![
                CollateralKey::PckCrl(*ca),
                CollateralKey::RootCaCrl,
                CollateralKey::TdxTcbInfo(fmspc.clone()),
                CollateralKey::TdxQeIdentity,
            ],
            CollateralRequest::SnpVcek(id) => std::iter::once(CollateralKey::Vcek(id.clone()))
                .chain(id.generation.map(CollateralKey::SnpCrl))
                .collect(),
            CollateralRequest::SnpCrl(g) => vec![CollateralKey::SnpCrl(*g)],
            CollateralRequest::None => Vec::new(),
        }
    }
}

/// DCAP collateral for one quote, as `dcap-qvl`'s `QuoteCollateralV3` (the JSON shape of
/// `tdx_quote_collateral.json`), with its validity window.
#[derive(Debug, Clone)]
pub struct TdxCollateral {
    /// The collateral itself.
    pub collateral: QuoteCollateralV3,
    /// Latest issueDate/thisUpdate of TCB info, QE identity and both CRLs (unix seconds).
    pub not_before: i64,
    /// Earliest nextUpdate of the same four (unix seconds).
    pub not_after: i64,
}

impl TdxCollateral {
    /// Wraps collateral, computing its validity window; malformed dates or CRLs are refused.
    pub fn new(collateral: QuoteCollateralV3) -> Result<Self, VerifyError> {
        let mut dates = Vec::new();
        for (name, json) in [
            ("TCB info", collateral.tcb_info.as_str()),
            ("QE identity", collateral.qe_identity.as_str()),
        ] {
            let v: serde_json::Value = serde_json::from_str(json)
                .map_err(|e| VerifyError::CollateralInvalid(format!("{name} is not JSON: {e}")))?;
            dates.push((
                rfc3339(&v["issueDate"], name)?,
                rfc3339(&v["nextUpdate"], name)?,
            ));
        }
        for (name, der) in [
            ("root CA CRL", &collateral.root_ca_crl),
            ("PCK CRL", &collateral.pck_crl),
        ] {
            dates.push(crl_dates(der, name)?);
        }
        let not_before = dates.iter().map(|d| d.0).max().unwrap_or(i64::MAX);
        let not_after = dates.iter().map(|d| d.1).min().unwrap_or(i64::MIN);
        Ok(TdxCollateral {
            collateral,
            not_before,
            not_after,
        })
    }

    /// Parses the `QuoteCollateralV3` JSON shape.
    pub fn from_json(json: &[u8]) -> Result<Self, VerifyError> {
        let c: QuoteCollateralV3 = serde_json::from_slice(json)
            .map_err(|e| VerifyError::CollateralInvalid(format!("collateral JSON: {e}")))?;
        Self::new(c)
    }
}

fn rfc3339(v: &serde_json::Value, name: &str) -> Result<i64, VerifyError> {
    let s = v
        .as_str()
        .ok_or_else(|| VerifyError::CollateralInvalid(format!("{name} has no date")))?;
    OffsetDateTime::parse(s, &Rfc3339)
        .map(|t| t.unix_timestamp())
        .map_err(|e| VerifyError::CollateralInvalid(format!("{name} date {s:?}: {e}")))
}

/// thisUpdate and nextUpdate of a DER CRL (unix seconds).
pub(crate) fn crl_dates(der: &[u8], name: &str) -> Result<(i64, i64), VerifyError> {
    let (_, crl) = x509_parser::parse_x509_crl(der)
        .map_err(|e| VerifyError::CollateralInvalid(format!("{name}: {e}")))?;
    let next = crl
        .next_update()
        .ok_or_else(|| VerifyError::CollateralInvalid(format!("{name} has no nextUpdate")))?;
    Ok((crl.last_update().timestamp(), next.timestamp()))
}

/// What an SNP verification gets besides the evidence.
#[derive(Debug, Clone, Default)]
pub struct SnpCollateral {
    /// A VCEK (DER) fetched for a report whose evidence carries none.
    pub vcek: Option<Arc<Vec<u8>>>,
    /// AMD's CRL (DER) of the report's generation; `None` when none is published (KDS
    /// answers 404, or an offline directory holds none): no revocation check then.
    pub crl: Option<Arc<Vec<u8>>>,
}

/// Collateral for one verification.
#[derive(Debug, Clone)]
pub enum Collateral {
    /// DCAP collateral for a TDX quote.
    Tdx(Arc<TdxCollateral>),
    /// SNP: the VCEK fetched for a report whose evidence carries none, and AMD's CRL.
    Snp(SnpCollateral),
    /// Nothing (SNP evidence that carries its VCEK/VLEK).
    None,
}
