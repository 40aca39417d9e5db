//! configfs-tsm provider against a fixture directory that behaves like configfs: `mkdir`
//! populates the entry, a write to `inblob` bumps `generation` and produces `outblob` (and
//! `auxblob` for SNP) from a recorded quote or report.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use kbs_types::Tee;

use super::tsm::{ConfigFs, TsmEvidenceProvider, TsmProvider, detect_tsm_provider};
use super::{EvidenceError, EvidenceProvider, EvidenceSource, select_provider_on};

const TDX_QUOTE: &[u8] = include_bytes!("../../testdata/tdx_quote");
const SNP_REPORT: &[u8] = include_bytes!("../../testdata/test-report.bin");
const SNP_VCEK: &[u8] = include_bytes!("../../testdata/test-vcek.der");
/// REPORTDATA offset in a v4 TD quote (header 48 + TD report 1.0 offset 520).
const TDX_REPORT_DATA: usize = 48 + 520;
const SNP_REPORT_DATA: usize = 0x50;

/// How the fixture answers a write to `inblob`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Outblob {
    /// The recorded blob with the written report data patched in (as a TEE would bind it;
    /// the signature then no longer verifies, which guest-side tests do not need).
    Patched,
    /// The recorded blob as is (its signature verifies; its report data is the recorded one).
    Recorded,
}

/// A directory behaving like configfs-tsm for one provider.
#[derive(Debug)]
struct FixtureFs {
    provider: &'static str,
    outblob: Outblob,
    /// Simulates another process writing to the same entry between our write and read.
    racing_writer: bool,
    writes: Mutex<u64>,
}

impl FixtureFs {
    fn new(provider: &'static str, outblob: Outblob) -> Self {
        FixtureFs {
            provider,
            outblob,
            racing_writer: false,
            writes: Mutex::new(0),
        }
    }

    fn recorded(&self) -> (&'static [u8], usize) {
        match self.provider {
            "sev_guest" => (SNP_REPORT, SNP_REPORT_DATA),
            _ => (TDX_QUOTE, TDX_REPORT_DATA),
        }
    }
}

impl ConfigFs for FixtureFs {
    fn create_dir(&self, path: &Path) -> std::io::Result<()> {
        std::fs::create_dir(path)?;
        std::fs::write(path.join("provider"), format!("{}\n", self.provider))?;
        std::fs::write(path.join("generation"), "0\n")?;
        Ok(())
    }

    fn remove_dir(&self, path: &Path) -> std::io::Result<()> {
        // configfs removes the attributes with the entry.
        std::fs::remove_dir_all(path)
    }

    fn read(&self, path: &Path) -> std::io::Result<Vec<u8>> {
        std::fs::read(path)
    }

    fn write(&self, path: &Path, data: &[u8]) -> std::io::Result<()> {
        let dir = path.parent().unwrap();
        std::fs::write(path, data)?;
        let gen_path = dir.join("generation");
        let generation: u64 = std::fs::read_to_string(&gen_path)?.trim().parse().unwrap();
        let bump = if self.racing_writer { 2 } else { 1 };
        std::fs::write(&gen_path, format!("{}\n", generation + bump))?;
        *self.writes.lock().unwrap() += 1;
        if path.file_name().unwrap() == "inblob" {
            let (recorded, offset) = self.recorded();
            let mut out = recorded.to_vec();
            if self.outblob == Outblob::Patched {
                out[offset..offset + 64].copy_from_slice(data);
            }
            std::fs::write(dir.join("outblob"), out)?;
            if self.provider == "sev_guest" {
                let table = sev::firmware::host::CertTableEntry::cert_table_to_vec_bytes(&[
                    sev::firmware::host::CertTableEntry::new(
                        sev::firmware::host::CertType::VCEK,
                        SNP_VCEK.to_vec(),
                    ),
                ])
                .unwrap();
                std::fs::write(dir.join("auxblob"), table)?;
            }
        }
        Ok(())
    }
}

fn root() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("tsm/report");
    std::fs::create_dir_all(&root).unwrap();
    (dir, root)
}

fn entries(root: &Path) -> usize {
    std::fs::read_dir(root).unwrap().count()
}

#[test]
fn detects_the_provider_and_leaves_no_entry() {
    let (_d, root) = root();
    for (name, want) in [
        ("tdx_guest", Some(TsmProvider::TdxGuest)),
        ("sev_guest", Some(TsmProvider::SevGuest)),
        ("arm_cca_guest", None),
    ] {
        let fs = FixtureFs::new(name, Outblob::Patched);
        assert_eq!(detect_tsm_provider(&fs, &root), want, "{name}");
        assert_eq!(entries(&root), 0);
    }
    // No configfs-tsm at all.
    let fs = FixtureFs::new("tdx_guest", Outblob::Patched);
    assert_eq!(detect_tsm_provider(&fs, &root.join("missing")), None);
}

#[tokio::test]
async fn tdx_evidence_through_configfs() {
    let (_d, root) = root();
    let ccel = root.parent().unwrap().join("CCEL");
    std::fs::write(&ccel, b"event log bytes").unwrap();
    let fs = Arc::new(FixtureFs::new("tdx_guest", Outblob::Patched));
    let provider = TsmEvidenceProvider::with_fs(fs.clone(), &root, TsmProvider::TdxGuest)
        .ccel_path(Some(ccel));
    assert_eq!(provider.tee(), Tee::Tdx);

    let digest: Vec<u8> = (1..=48).collect();
    let ev = provider.primary_evidence(digest.clone()).await.unwrap();
    let obj = ev.as_object().unwrap();
    assert_eq!(obj.len(), 2);
    assert_eq!(
        STANDARD
            .decode(ev["cc_eventlog"].as_str().unwrap())
            .unwrap(),
        b"event log bytes"
    );
    let quote = STANDARD.decode(ev["quote"].as_str().unwrap()).unwrap();
    let mut padded = digest.clone();
    padded.resize(64, 0);
    assert_eq!(
        &quote[TDX_REPORT_DATA..TDX_REPORT_DATA + 64],
        padded.as_slice()
    );
    assert_eq!(*fs.writes.lock().unwrap(), 1, "only inblob is written");
    assert_eq!(entries(&root), 0, "the report entry is removed");
}

#[tokio::test]
async fn racing_writer_is_detected_by_generation() {
    let (_d, root) = root();
    let mut fs = FixtureFs::new("tdx_guest", Outblob::Patched);
    fs.racing_writer = true;
    let provider = TsmEvidenceProvider::with_fs(Arc::new(fs), &root, TsmProvider::TdxGuest);
    let err = provider.primary_evidence(vec![7; 32]).await.unwrap_err();
    let EvidenceError::Collect { tee, reason } = err else {
        panic!("{err:?}")
    };
    assert_eq!(tee, Tee::Tdx);
    assert!(reason.contains("generation went from 0 to 2"), "{reason}");
    assert_eq!(entries(&root), 0);
}

#[tokio::test]
async fn provider_mismatch_and_oversized_report_data_are_refused() {
    let (_d, root) = root();
    let fs = Arc::new(FixtureFs::new("sev_guest", Outblob::Patched));
    let provider = TsmEvidenceProvider::with_fs(fs, &root, TsmProvider::TdxGuest);
    let err = provider.primary_evidence(vec![0; 32]).await.unwrap_err();
    assert!(matches!(err, EvidenceError::Collect { .. }), "{err:?}");
    let err = provider.primary_evidence(vec![0; 65]).await.unwrap_err();
    assert!(matches!(
        err,
        EvidenceError::ReportDataTooLong { got: 65, .. }
    ));
    assert_eq!(entries(&root), 0);
}

/// The TDX evidence the provider builds from a recorded quote verifies with the KBS-side
/// verifier: the wire shape is the one the verifier (and upstream) reads.
#[tokio::test]
async fn tdx_evidence_verifies_with_the_kbs_verifier() {
    let (_d, root) = root();
    let fs = Arc::new(FixtureFs::new("tdx_guest", Outblob::Recorded));
    let provider = TsmEvidenceProvider::with_fs(fs, &root, TsmProvider::TdxGuest).ccel_path(None);
    let report_data = TDX_QUOTE[TDX_REPORT_DATA..TDX_REPORT_DATA + 64].to_vec();
    let ev = provider
        .primary_evidence(report_data.clone())
        .await
        .unwrap();
    assert!(ev["cc_eventlog"].is_null());

    let collateral = tee_verifiers::collateral::TdxCollateral::from_json(include_bytes!(
        "../../../server/tee-verifiers/testdata/tdx/tdx_quote_collateral.json"
    ))
    .unwrap();
    let now = UNIX_EPOCH
        + Duration::from_secs(
            (collateral.not_before + (collateral.not_after - collateral.not_before) / 2) as u64,
        );
    let claims = tee_verifiers::verify(
        tee_verifiers::TeeKind::Tdx,
        &ev,
        &report_data,
        None,
        &tee_verifiers::Collateral::Tdx(Arc::new(collateral)),
        now,
    )
    .unwrap();
    assert_eq!(claims.0["tcb_status"], "UpToDate");
}

#[tokio::test]
async fn snp_evidence_with_auxblob_verifies_with_the_kbs_verifier() {
    let (_d, root) = root();
    let fs = Arc::new(FixtureFs::new("sev_guest", Outblob::Recorded));
    let provider = TsmEvidenceProvider::with_fs(fs, &root, TsmProvider::SevGuest);
    assert_eq!(provider.tee(), Tee::Snp);
    let report_data = SNP_REPORT[SNP_REPORT_DATA..SNP_REPORT_DATA + 64].to_vec();
    let ev = provider
        .primary_evidence(report_data.clone())
        .await
        .unwrap();
    // upstream's shape: the sev serde report and the certificate table.
    assert_eq!(ev["attestation_report"]["version"], 2);
    assert_eq!(ev["cert_chain"][0]["cert_type"], "VCEK");
    assert!(ev["cert_chain"][0]["data"].is_array());

    let now = UNIX_EPOCH + Duration::from_secs(1_748_736_000);
    // The shared report comes without AMD's CRL: verified under `if-published`.
    let anchors = tee_verifiers::TrustAnchors::clone(&tee_verifiers::TrustAnchors::vendor())
        .with_snp_crl_policy(tee_verifiers::snp::crl::CrlPolicy::IfPublished);
    let claims = tee_verifiers::Decoded::new(tee_verifiers::TeeKind::Snp, &ev)
        .unwrap()
        .verify_with(
            &anchors,
            &report_data,
            None,
            &tee_verifiers::Collateral::None,
            now,
        )
        .unwrap();
    assert_eq!(claims.0["signing_key"], "VCEK");
    assert_eq!(entries(&root), 0);
}

#[test]
fn auto_selects_the_tsm_provider_and_sample_only_when_asked() {
    let (_d, root) = root();
    let fs: Arc<dyn ConfigFs> = Arc::new(FixtureFs::new("sev_guest", Outblob::Patched));
    let p = select_provider_on(EvidenceSource::Auto, fs.clone(), &root).unwrap();
    assert_eq!(p.tee(), Tee::Snp);
    let p = select_provider_on(EvidenceSource::Sample, fs.clone(), &root).unwrap();
    assert_eq!(p.tee(), Tee::Sample);
    let err = select_provider_on(EvidenceSource::Auto, fs, &root.join("missing")).err();
    assert!(matches!(err, Some(EvidenceError::NoTee(_))), "{err:?}");
}
