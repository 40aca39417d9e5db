//! `kbsctl evidence verify`: check a TDX quote or SNP report offline, as the KBS would, and
//! print the verified claims (the names the token carries) or why it is refused. SNP reports
//! are checked against AMD's CRL given with `--crl`, and without one refused unless
//! `--crl-policy if-published`, as the KBS does by default.

use std::path::PathBuf;
use std::time::SystemTime;

use anyhow::{Context, bail};
use clap::{Subcommand, ValueEnum};
use server::evidence::{OfflineEvidence, parse_time, verify_offline};
use tee_verifiers::TeeKind;
use tee_verifiers::snp::crl::CrlPolicy;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Tee {
    Tdx,
    Snp,
}

/// `--crl-policy`, the values of `[attestation.snp] crl`.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum CrlPolicyArg {
    /// Without `--crl` the report is refused (the KBS's default).
    Required,
    /// Without `--crl` the key is not checked for revocation.
    IfPublished,
}

#[derive(Subcommand, Debug)]
pub enum EvidenceCmd {
    /// Verify FILE (the raw quote or report) and print its claims as JSON; exit 1 if refused.
    Verify {
        /// The TEE the evidence comes from.
        #[arg(long, value_enum)]
        tee: Tee,
        /// The raw TDX quote or SNP attestation report.
        file: PathBuf,
        /// TDX: the DCAP collateral JSON; SNP: the VCEK or VLEK (DER or PEM).
        #[arg(long)]
        collateral: Option<PathBuf>,
        /// When to check validity at: RFC 3339 or Unix seconds (default: now).
        #[arg(long)]
        at: Option<String>,
        /// Expected REPORTDATA (hex); by default the evidence's own (binding not checked).
        #[arg(long)]
        report_data: Option<String>,
        /// Expected init-data digest (hex), checked against MRCONFIGID / HOST_DATA.
        #[arg(long)]
        init_data_digest: Option<String>,
        /// SNP: AMD's CRL of the report's generation (DER or PEM, from KDS
        /// `/vcek/v1/{Milan|Genoa|Turin}/crl`); the key and its ASK/ASVK must not be on it.
        #[arg(long)]
        crl: Option<PathBuf>,
        /// SNP without `--crl`: refuse (`required`, as the KBS by default) or verify without
        /// a revocation check (`if-published`).
        #[arg(long, value_enum, default_value = "required")]
        crl_policy: CrlPolicyArg,
        /// Roots instead of the vendor's: TDX, a root CA certificate (PEM or DER); SNP, an
        /// ARK, ASK and ASVK PEM (the shape of AMD's `ask_ark_asvk.pem`), as
        /// `[attestation.tdx] root_ca_file` and `[attestation.snp.roots]` in the KBS.
        #[arg(long)]
        roots: Option<PathBuf>,
    },
}

pub fn run(cmd: EvidenceCmd) -> anyhow::Result<()> {
    let EvidenceCmd::Verify {
        tee,
        file,
        collateral,
        at,
        report_data,
        init_data_digest,
        crl,
        crl_policy,
        roots,
    } = cmd;
    let evidence = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
    let read = |file: Option<PathBuf>| {
        file.map(|f| std::fs::read(&f).with_context(|| format!("reading {}", f.display())))
            .transpose()
    };
    let (collateral, crl, roots) = (read(collateral)?, read(crl)?, read(roots)?);
    let at = match at {
        Some(text) => parse_time(&text).map_err(anyhow::Error::msg)?,
        None => SystemTime::now(),
    };
    let hex_arg = |name: &str, v: Option<String>| -> anyhow::Result<Option<Vec<u8>>> {
        v.map(|h| hex::decode(h.trim()).with_context(|| format!("--{name} is not hex")))
            .transpose()
    };
    let request = OfflineEvidence {
        tee: match tee {
            Tee::Tdx => TeeKind::Tdx,
            Tee::Snp => TeeKind::Snp,
        },
        evidence: &evidence,
        collateral: collateral.as_deref(),
        at,
        report_data: hex_arg("report-data", report_data)?,
        init_data_digest: hex_arg("init-data-digest", init_data_digest)?,
        crl: crl.as_deref(),
        crl_policy: match crl_policy {
            CrlPolicyArg::Required => CrlPolicy::Required,
            CrlPolicyArg::IfPublished => CrlPolicy::IfPublished,
        },
        roots: roots.as_deref(),
    };
    match verify_offline(&request) {
        Ok(claims) => {
            println!("{}", serde_json::to_string_pretty(&claims)?);
            Ok(())
        }
        Err(reason) => bail!("refused: {reason}"),
    }
}
