//! TDX and SEV-SNP evidence through the Linux configfs TSM report interface
//! (`/sys/kernel/config/tsm/report`, kernel `Documentation/ABI/testing/configfs-tsm`).
//!
//! One report is one directory: `mkdir` an entry (the kernel fills it with attributes),
//! check `provider` (`tdx_guest` or `sev_guest`), note `generation`, write the 64-byte
//! `inblob`, read `outblob` (the TD quote, or the SNP attestation report) and, for SNP,
//! `auxblob` (the host's certificate table, with the VCEK or VLEK when the host provides
//! it), then read `generation` again: it counts writes to the entry, so any value other
//! than the first plus this provider's writes means another writer raced and the blob may
//! not be ours. The entry is removed (`rmdir`) in every case.
//!
//! The evidence JSON is what upstream's attesters send (guest-components
//! `attestation-agent/attester/src/{tdx,snp}/mod.rs`):
//! - TDX: `{"cc_eventlog": base64(CCEL ACPI table) | null, "quote": base64(quote)}`;
//! - SNP: `{"attestation_report": <the sev crate's serde form>, "cert_chain": [..] | null}`.
//!
//! The privilege level (`privlevel`) of an SNP report is left at the entry's default (0,
//! VMPL 0, what upstream asks for).

use std::fmt::Debug;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use kbs_types::Tee;
use sev::parser::ByteParser;

use super::{EvidenceError, EvidenceProvider};

/// Where configfs-tsm reports live.
pub const TSM_REPORT_ROOT: &str = "/sys/kernel/config/tsm/report";
/// Where the TDX CC event log (CCEL ACPI table data) is.
pub const CCEL_PATH: &str = "/sys/firmware/acpi/tables/data/CCEL";
/// Largest inblob (and TEE report data).
const INBLOB_LEN: usize = 64;

/// The file operations the provider makes; the real configfs, or a fixture in tests.
pub trait ConfigFs: Send + Sync + Debug {
    /// `mkdir` (configfs creates the report entry's attributes).
    fn create_dir(&self, path: &Path) -> io::Result<()>;
    /// `rmdir`.
    fn remove_dir(&self, path: &Path) -> io::Result<()>;
    /// Reads a whole attribute.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// Writes a whole attribute in one `write`.
    fn write(&self, path: &Path, data: &[u8]) -> io::Result<()>;
}

/// The kernel's configfs, through `std::fs`.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealFs;

impl ConfigFs for RealFs {
    fn create_dir(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir(path)
    }
    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_dir(path)
    }
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        std::fs::read(path)
    }
    fn write(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        std::fs::write(path, data)
    }
}

/// The TSM behind configfs-tsm, from its `provider` attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TsmProvider {
    /// `tdx_guest`: `outblob` is a TD quote.
    TdxGuest,
    /// `sev_guest`: `outblob` is an SNP attestation report, `auxblob` a certificate table.
    SevGuest,
}

impl TsmProvider {
    fn from_attribute(value: &[u8]) -> Option<Self> {
        match std::str::from_utf8(value).ok()?.trim_end() {
            "tdx_guest" => Some(TsmProvider::TdxGuest),
            "sev_guest" => Some(TsmProvider::SevGuest),
            _ => None,
        }
    }

    /// The TEE kind attested with this provider.
    pub fn tee(&self) -> Tee {
        match self {
            TsmProvider::TdxGuest => Tee::Tdx,
            TsmProvider::SevGuest => Tee::Snp,
        }
    }
}

static ENTRY_SEQ: AtomicU64 = AtomicU64::new(0);

fn entry_name() -> String {
    format!(
        "tether-{}-{}",
        std::process::id(),
        ENTRY_SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// A report entry, removed when dropped.
struct Entry<'a> {
    fs: &'a dyn ConfigFs,
    path: PathBuf,
}

impl<'a> Entry<'a> {
    fn create(fs: &'a dyn ConfigFs, root: &Path) -> io::Result<Self> {
        let path = root.join(entry_name());
        fs.create_dir(&path)?;
        Ok(Entry { fs, path })
    }
    fn read(&self, attr: &str) -> io::Result<Vec<u8>> {
        self.fs.read(&self.path.join(attr))
    }
    fn provider(&self) -> io::Result<Option<TsmProvider>> {
        Ok(TsmProvider::from_attribute(&self.read("provider")?))
    }
    fn generation(&self) -> io::Result<u64> {
        let raw = self.read("generation")?;
        std::str::from_utf8(&raw)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "generation is not a number"))
    }
}

impl Drop for Entry<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.fs.remove_dir(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "could not remove the configfs-tsm report entry");
        }
    }
}

/// The TSM provider of the configfs-tsm at `root`, if there is one (probes with a report
/// entry, removed again).
pub fn detect_tsm_provider(fs: &dyn ConfigFs, root: &Path) -> Option<TsmProvider> {
    let entry = Entry::create(fs, root).ok()?;
    entry.provider().ok().flatten()
}

/// TDX or SNP evidence collected through configfs-tsm.
#[derive(Debug, Clone)]
pub struct TsmEvidenceProvider {
    fs: Arc<dyn ConfigFs>,
    root: PathBuf,
    provider: TsmProvider,
    ccel_path: Option<PathBuf>,
}

/// What one report entry produced.
struct Blobs {
    outblob: Vec<u8>,
    auxblob: Option<Vec<u8>>,
}

impl TsmEvidenceProvider {
    /// A provider for `provider` reports under `root`, on the real configfs; TDX evidence
    /// carries the CC event log from [`CCEL_PATH`].
    pub fn new(root: impl Into<PathBuf>, provider: TsmProvider) -> Self {
        Self::with_fs(Arc::new(RealFs), root, provider)
    }

    /// The same over another [`ConfigFs`] (tests).
    pub fn with_fs(fs: Arc<dyn ConfigFs>, root: impl Into<PathBuf>, provider: TsmProvider) -> Self {
        TsmEvidenceProvider {
            fs,
            root: root.into(),
            provider,
            ccel_path: Some(PathBuf::from(CCEL_PATH)),
        }
    }

    /// Where the CC event log is read from (`None`: never sent).
    pub fn ccel_path(mut self, path: Option<PathBuf>) -> Self {
        self.ccel_path = path;
        self
    }

    /// The provider in use.
    pub fn provider(&self) -> TsmProvider {
        self.provider
    }

    fn fail(&self, reason: impl std::fmt::Display) -> EvidenceError {
        EvidenceError::Collect {
            tee: self.provider.tee(),
            reason: format!("configfs-tsm {}: {reason}", self.root.display()),
        }
    }

    /// One report: mkdir, provider check, inblob, outblob (and auxblob), generation check.
    fn collect(&self, inblob: &[u8; INBLOB_LEN]) -> Result<Blobs, EvidenceError> {
        let fs = self.fs.as_ref();
        let entry = Entry::create(fs, &self.root).map_err(|e| self.fail(format!("mkdir: {e}")))?;
        match entry.provider() {
            Ok(Some(p)) if p == self.provider => {}
            Ok(other) => {
                return Err(self.fail(format!(
                    "provider is {other:?}, expected {:?}",
                    self.provider
                )));
            }
            Err(e) => return Err(self.fail(format!("provider: {e}"))),
        }
        let before = entry
            .generation()
            .map_err(|e| self.fail(format!("generation: {e}")))?;
        fs.write(&entry.path.join("inblob"), inblob)
            .map_err(|e| self.fail(format!("inblob: {e}")))?;
        let writes = 1;
        let outblob = entry
            .read("outblob")
            .map_err(|e| self.fail(format!("outblob: {e}")))?;
        let auxblob = match self.provider {
            TsmProvider::SevGuest => match entry.read("auxblob") {
                Ok(b) if !b.is_empty() => Some(b),
                Ok(_) => None,
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err(self.fail(format!("auxblob: {e}"))),
            },
            TsmProvider::TdxGuest => None,
        };
        let after = entry
            .generation()
            .map_err(|e| self.fail(format!("generation: {e}")))?;
        if after != before + writes {
            return Err(self.fail(format!(
                "generation went from {before} to {after} for {writes} write(s): another writer raced, the report may not be ours"
            )));
        }
        if outblob.is_empty() {
            return Err(self.fail("outblob is empty"));
        }
        Ok(Blobs { outblob, auxblob })
    }

    fn evidence(&self, blobs: Blobs) -> Result<serde_json::Value, EvidenceError> {
        match self.provider {
            TsmProvider::TdxGuest => {
                let cc_eventlog = self.ccel_path.as_ref().and_then(|p| match self.fs.read(p) {
                    Ok(b) => Some(STANDARD.encode(b)),
                    Err(e) => {
                        tracing::warn!(path = %p.display(), error = %e, "no CC event log sent");
                        None
                    }
                });
                Ok(serde_json::json!({
                    "cc_eventlog": cc_eventlog,
                    "quote": STANDARD.encode(&blobs.outblob),
                }))
            }
            TsmProvider::SevGuest => {
                let report = sev::firmware::guest::AttestationReport::from_bytes(&blobs.outblob)
                    .map_err(|e| self.fail(format!("outblob is not an SNP report: {e}")))?;
                let cert_chain = match blobs.auxblob {
                    Some(mut table) => Some(
                        sev::firmware::host::CertTableEntry::vec_bytes_to_cert_table(&mut table)
                            .map_err(|e| {
                                self.fail(format!("auxblob is not a certificate table: {e}"))
                            })?,
                    ),
                    None => None,
                };
                let mut ev = serde_json::Map::new();
                for (name, value) in [
                    ("attestation_report", serde_json::to_value(report)),
                    ("cert_chain", serde_json::to_value(cert_chain)),
                ] {
                    ev.insert(
                        name.into(),
                        value.map_err(|e| self.fail(format!("serialize {name}: {e}")))?,
                    );
                }
                Ok(serde_json::Value::Object(ev))
            }
        }
    }
}

#[async_trait]
impl EvidenceProvider for TsmEvidenceProvider {
    fn tee(&self) -> Tee {
        self.provider.tee()
    }

    async fn primary_evidence(
        &self,
        report_data: Vec<u8>,
    ) -> Result<serde_json::Value, EvidenceError> {
        if report_data.len() > INBLOB_LEN {
            return Err(EvidenceError::ReportDataTooLong {
                tee: self.tee(),
                got: report_data.len(),
                max: INBLOB_LEN,
            });
        }
        // Zero-padded to 64 bytes, as upstream's attesters do.
        let mut inblob = [0u8; INBLOB_LEN];
        inblob[..report_data.len()].copy_from_slice(&report_data);
        let this = self.clone();
        let blobs = tokio::task::spawn_blocking(move || this.collect(&inblob))
            .await
            .map_err(|e| self.fail(format!("collector task: {e}")))??;
        self.evidence(blobs)
    }
}
