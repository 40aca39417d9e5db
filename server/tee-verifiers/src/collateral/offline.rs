//! Air-gapped collateral: items read once from a directory instead of fetched.
//!
//! Layout of the directory:
//! - `tdx/*.json`: DCAP collateral bundles in `QuoteCollateralV3` JSON (the shape of
//!   `dcap-qvl`'s `get_collateral` output and of `tdx_quote_collateral.json`), one per
//!   FMSPC; when several bundles hold the same item (QE identity, CRLs), the one with the
//!   latest nextUpdate wins;
//! - `snp/*.der` or `snp/*.pem`: VCEKs, indexed by their hwID, TCB extensions and product.
//!
//! Refresh the directory and build a new fetcher to roll collateral forward.

use std::collections::HashMap;
use std::path::Path;

use async_trait::async_trait;

use super::store::split;
use super::{
    CollateralFetcher, CollateralItem, CollateralKey, FetchError, ItemBody, TdxCollateral, VcekId,
};
use crate::VerifyError;
use crate::request::Generation;
use crate::snp::vek;

/// Serves collateral from files loaded at construction.
#[derive(Debug, Clone, Default)]
pub struct OfflineFetcher {
    items: HashMap<CollateralKey, CollateralItem>,
}

impl OfflineFetcher {
    /// Loads `dir/tdx/*.json` and `dir/snp/*.{der,pem}`; missing subdirectories are empty.
    pub fn from_dir(dir: &Path) -> Result<Self, VerifyError> {
        let mut f = OfflineFetcher::default();
        for path in files(&dir.join("tdx"))? {
            if path.extension().is_some_and(|e| e == "json") {
                let bytes = read(&path)?;
                f.add_tdx_bundle(&TdxCollateral::from_json(&bytes)?)?;
            }
        }
        for path in files(&dir.join("snp"))? {
            if path.extension().is_some_and(|e| e == "der" || e == "pem") {
                f.add_vcek(&read(&path)?)?;
            }
        }
        Ok(f)
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
        self.items
            .get(key)
            .cloned()
            .ok_or_else(|| FetchError::NotFound(key.name()))
    }
}
