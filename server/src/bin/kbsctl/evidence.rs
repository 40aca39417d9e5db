//! `kbsctl evidence verify`: check a TDX quote or SNP report offline, as the KBS would, and
//! print the verified claims (the names the token carries) or why it is refused.

use std::path::PathBuf;
use std::time::SystemTime;

use anyhow::{Context, bail};
use clap::{Subcommand, ValueEnum};
use server::evidence::{OfflineEvidence, parse_time, verify_offline};
use tee_verifiers::TeeKind;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Tee {
    Tdx,
    Snp,
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
    } = cmd;
    let evidence = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
    let collateral = collateral
        .map(|f| std::fs::read(&f).with_context(|| format!("reading {}", f.display())))
        .transpose()?;
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
    };
    match verify_offline(&request) {
        Ok(claims) => {
            println!("{}", serde_json::to_string_pretty(&claims)?);
            Ok(())
        }
        Err(reason) => bail!("refused: {reason}"),
    }
}
