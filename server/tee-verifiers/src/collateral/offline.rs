//! Air-gapped collateral: items read from a directory instead of fetched.
//!
//! Layout of the directory:
//! - `tdx/*.json`: DCAP collateral bundles in `QuoteCollateralV3` JSON (the shape of
//!   `dcap-qvl`'s `get_collateral` output and of `tdx_quote_collateral.json`), one per
//!   FMSPC; when several bundles hold the same item (QE identity, CRLs), the one with the
//!   latest nextUpdate wins;
//! - `snp/*.der` or `snp/*.pem`: VCEKs, indexed by their hwID, TCB extensions and product;
//! - `snp/*.crl` (DER or PEM): AMD's CRL of a generation (KDS `/vcek/v1/{product}/crl`),
//!   indexed by its issuer (`ARK-Milan`, ...); without one, SNP reports of that generation
//!   are refused (`required`, the default CRL policy) or their keys not checked for
//!   revocation (`if-published`).
//!
//! To roll collateral forward, replace the files: [`CollateralFetcher::source_changed`]
//! notices a changed listing (names, sizes, modification times) and re-reads the directory,
//! and the store's refresher then replaces every cached item by the file's (the directory is
//! the source of truth). A directory that no longer reads cleanly (a file half-written) is
//! logged and the previous items stay until it does.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::SystemTime;

use async_trait::async_trait;

use super::store::split;
use super::{
    CollateralFetcher, CollateralItem, CollateralKey, FetchError, ItemBody, TdxCollateral, VcekId,
};
use crate::VerifyError;
use crate::request::Generation;
use crate::snp::vek;

/// Name, size and modification time of every collateral file: a changed stamp means the
/// directory must be read again.
type Stamp = Vec<(PathBuf, u64, Option<SystemTime>)>;

/// Serves collateral from the files of a directory (see the module documentation).
#[derive(Debug, Default)]
pub struct OfflineFetcher {
    dir: Option<PathBuf>,
    loaded: RwLock<(Stamp, OfflineItems)>,
}

/// Collateral items by key (one directory's worth).
#[derive(Debug, Clone, Default)]
pub struct OfflineItems {
    items: HashMap<CollateralKey, CollateralItem>,
}

impl OfflineFetcher {
    /// Loads `dir/tdx/*.json` and `dir/snp/*.{der,pem}`; missing subdirectories are empty.
    pub fn from_dir(dir: &Path) -> Result<Self, VerifyError> {
        let stamp = stamp(dir)?;
        let items = OfflineItems::from_dir(dir)?;
        Ok(OfflineFetcher {
            dir: Some(dir.to_owned()),
            loaded: RwLock::new((stamp, items)),
        })
    }

    /// A fetcher serving `items` (no directory behind it).
    pub fn from_items(items: OfflineItems) -> Self {
        OfflineFetcher {
            dir: None,
            loaded: RwLock::new((Vec::new(), items)),
        }
    }
}

fn stamp(dir: &Path) -> Result<Stamp, VerifyError> {
    let mut out = Vec::new();
    for sub in ["tdx", "snp"] {
        for path in files(&dir.join(sub))? {
            let meta = std::fs::metadata(&path).map_err(|e| {
                VerifyError::CollateralUnavailable(format!("{}: {e}", path.display()))
            })?;
            out.push((path, meta.len(), meta.modified().ok()));
        }
    }
    Ok(out)
}

impl OfflineItems {
    /// Reads `dir/tdx/*.json` and `dir/snp/*.{der,pem}`; missing subdirectories are empty.
    pub fn from_dir(dir: &Path) -> Result<Self, VerifyError> {
        let mut f = OfflineItems::default();
        for path in files(&dir.join("tdx"))? {
            if path.extension().is_some_and(|e| e == "json") {
                let bytes = read(&path)?;
                f.add_tdx_bundle(&TdxCollateral::from_json(&bytes)?)?;
            }
        }
        for path in files(&dir.join("snp"))? {
            if path.extension().is_some_and(|e| e == "der" || e == "pem") {
                f.add_vcek(&read(&path)?)?;
            } else if path.extension().is_some_and(|e| e == "crl") {
                f.add_snp_crl(&read(&path)?).map_err(|e| {
                    VerifyError::CollateralInvalid(format!("{}: {e}", path.display()))
                })?;
            }
        }
        Ok(f)
    }

    /// Adds AMD's CRL of a generation (DER or PEM), keyed by its issuer (`ARK-Milan`, ...).
    /// Its signature is checked at verification, against the ARK in force.
    pub fn add_snp_crl(&mut self, bytes: &[u8]) -> Result<(), VerifyError> {
        let der = super::pccs::crl_bytes(bytes)
            .map_err(|e| VerifyError::CollateralInvalid(e.to_string()))?;
        let (_, crl) = x509_parser::parse_x509_crl(&der)
            .map_err(|e| VerifyError::CollateralInvalid(format!("AMD CRL: {e}")))?;
        let issuer = crl
            .issuer()
            .iter_common_name()
            .next()
            .and_then(|c| c.as_str().ok())
            .unwrap_or_default()
            .to_owned();
        let generation = issuer
            .strip_prefix("ARK-")
            .and_then(Generation::from_product_name)
            .ok_or_else(|| {
                VerifyError::CollateralInvalid(format!(
                    "AMD CRL issuer {issuer:?} names no generation (ARK-Milan, ARK-Genoa, ARK-Turin)"
                ))
            })?;
        let item = CollateralItem::new(ItemBody::SnpCrl { crl: der })?;
        self.insert(CollateralKey::SnpCrl(generation), item);
        Ok(())
    }

    /// Adds the items of a DCAP collateral bundle.
    pub fn add_tdx_bundle(&mut self, c: &TdxCollateral) -> Result<(), VerifyError> {
        for (key, item) in split(&c.collateral)? {
            self.insert(key, item);
        }
        Ok(())
    }

    /// Adds a VCEK (DER or PEM), keyed by what its extensions say.
    pub fn add_vcek(&mut self, cert: &[u8]) -> Result<(), VerifyError> {
        let der = vek::decode_cert(cert)?;
        let generation = vek::product_generation(&der)?.ok_or_else(|| {
            VerifyError::CollateralInvalid("VCEK has no productName extension".into())
        })?;
        let info = vcek_extensions(&der, generation)?;
        let hw_id = match generation {
            Generation::Turin => info.1[..8.min(info.1.len())].to_vec(),
            _ => info.1,
        };
        let item = CollateralItem::new(ItemBody::Vcek { der })?;
        // Version 2 reports do not name their generation; index those keys too.
        for generation in [Some(generation), None] {
            let key = CollateralKey::Vcek(VcekId {
                generation,
                hw_id: hw_id.clone(),
                tcb: info.0,
            });
            self.insert(key, item.clone());
        }
        Ok(())
    }

    fn insert(&mut self, key: CollateralKey, item: CollateralItem) {
        match self.items.get(&key) {
            Some(old) if old.next_update >= item.next_update => {}
            _ => {
                self.items.insert(key, item);
            }
        }
    }
}

/// TCB and hwID of a VCEK, read without checking its chain (that happens at verification).
fn vcek_extensions(
    der: &[u8],
    generation: Generation,
) -> Result<(crate::request::SnpTcb, Vec<u8>), VerifyError> {
    // verify_vek checks the chain too; reading the extensions needs no trust.
    let v = vek::read_extensions(der, vek::VekKind::Vcek, generation)?;
    Ok((v.tcb, v.hw_id.unwrap_or_default()))
}

fn files(dir: &Path) -> Result<Vec<std::path::PathBuf>, VerifyError> {
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            let mut v: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
            v.sort();
            Ok(v)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(VerifyError::CollateralUnavailable(format!(
            "{}: {e}",
            dir.display()
        ))),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, VerifyError> {
    std::fs::read(path)
        .map_err(|e| VerifyError::CollateralUnavailable(format!("{}: {e}", path.display())))
}

#[async_trait]
impl CollateralFetcher for OfflineFetcher {
    async fn fetch(&self, key: &CollateralKey) -> Result<CollateralItem, FetchError> {
        let loaded = self
            .loaded
            .read()
            .map_err(|_| FetchError::Unreachable("offline collateral lock poisoned".into()))?;
        match (loaded.1.items.get(key), key) {
            (Some(item), _) => Ok(item.clone()),
            // No CRL file for that generation: the verifier's CRL policy decides (refused, or
            // verified without a revocation check); a file added later is read at the next
            // rescan.
            (None, CollateralKey::SnpCrl(_)) => CollateralItem::new(ItemBody::SnpCrlAbsent)
                .map_err(|e| FetchError::Invalid(e.to_string())),
            (None, _) => Err(FetchError::NotFound(key.name())),
        }
    }

    async fn source_changed(&self) -> bool {
        let Some(dir) = &self.dir else {
            return false;
        };
        let now = match stamp(dir) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "offline collateral directory unreadable");
                return false;
            }
        };
        if self.loaded.read().is_ok_and(|l| l.0 == now) {
            return false;
        }
        match OfflineItems::from_dir(dir) {
            Ok(items) => {
                tracing::info!(dir = %dir.display(), "offline collateral changed, re-read");
                if let Ok(mut l) = self.loaded.write() {
                    *l = (now, items);
                }
                true
            }
            Err(e) => {
                // Not recorded: tried again at the next poll (a file may be half-written).
                tracing::warn!(dir = %dir.display(), error = %e,
                    "offline collateral changed but does not read cleanly; keeping the previous files' items");
                false
            }
        }
    }
}
