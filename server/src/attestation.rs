//! Real attestation's configuration and what is built from it: where TDX and SNP collateral
//! comes from (`[attestation.collateral]`), the appraisal policy and reference values
//! (`[attestation.appraisal]`, the store) and the external attestation services whose tokens
//! are trusted (`[[attestation.external]]`), with their JWK sets refreshed from URLs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kbs_core::appraisal::Appraiser;
use kbs_core::attest::external::{ExternalIssuer, IssuerKeys, keys_from_jwks, read_pem};
use kbs_core::storage::{KvStore, PolicyStore, ReferenceValueStore, StoreError};
use kbs_core::verifiers::{CollateralSettings, CollateralSource};
use serde::Deserialize;
use tee_verifiers::anchors::{self, TrustAnchors};
use tee_verifiers::collateral::HttpFetcherConfig;
use tee_verifiers::request::Generation;
use tee_verifiers::snp::crl::CrlPolicy;
use tokio_util::sync::CancellationToken;

/// Name under which the appraisal policy is stored (`policies` table).
pub const APPRAISAL_POLICY: &str = "appraisal";

/// Largest JWK set read from a file or URL.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// `[attestation.collateral]`: Intel DCAP collateral and AMD VCEKs.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CollateralConfig {
    /// PCCS or Intel PCS base URL (v4 API).
    pub pccs_url: String,
    /// Intel's root CA CRL, when the PCCS does not serve `rootcacrl` (Intel PCS); empty to
    /// ask the PCCS.
    pub root_ca_crl_url: String,
    /// AMD KDS base URL.
    pub kds_url: String,
    /// Air-gapped sites: read collateral from `<dir>/tdx/*.json` and `<dir>/snp/*.{der,pem}`
    /// (at start, and again when the files change) and never fetch.
    pub offline_dir: Option<PathBuf>,
    /// How often `offline_dir` is checked for changed files.
    #[serde(with = "humantime_serde")]
    pub offline_rescan: Duration,
    /// Timeout of one fetch.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// An item is refetched this long before its nextUpdate.
    #[serde(with = "humantime_serde")]
    pub refresh_before: Duration,
    /// After a failed refresh while a valid copy is cached, wait this long before trying again
    /// (doubling with each further failure, up to 32 times this).
    #[serde(with = "humantime_serde")]
    pub retry_after: Duration,
}

impl Default for CollateralConfig {
    fn default() -> Self {
        let http = HttpFetcherConfig::default();
        let settings = CollateralSettings::default();
        Self {
            pccs_url: http.pccs_url,
            root_ca_crl_url: http.root_ca_crl_url.unwrap_or_default(),
            kds_url: http.kds_url,
            offline_dir: None,
            offline_rescan: settings.offline_rescan,
            timeout: http.timeout,
            refresh_before: settings.refresh_before,
            retry_after: settings.retry_after,
        }
    }
}

impl CollateralConfig {
    /// The collateral store's settings.
    pub fn settings(&self) -> CollateralSettings {
        let source = match &self.offline_dir {
            Some(dir) => CollateralSource::Offline(dir.clone()),
            None => CollateralSource::Http(HttpFetcherConfig {
                pccs_url: self.pccs_url.trim_end_matches('/').to_owned(),
                root_ca_crl_url: Some(self.root_ca_crl_url.clone()).filter(|u| !u.is_empty()),
                kds_url: self.kds_url.trim_end_matches('/').to_owned(),
                timeout: self.timeout,
            }),
        };
        CollateralSettings {
            source,
            refresh_before: self.refresh_before,
            retry_after: self.retry_after,
            offline_rescan: self.offline_rescan,
        }
    }

    /// Checks URLs, durations and the offline directory; the error names the key.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let key = |k: &str| format!("attestation.collateral.{k}");
        for (name, url) in [("pccs_url", &self.pccs_url), ("kds_url", &self.kds_url)] {
            check_url(url).map_err(|r| (key(name), r))?;
        }
        if !self.root_ca_crl_url.is_empty() {
            check_url(&self.root_ca_crl_url).map_err(|r| (key("root_ca_crl_url"), r))?;
        }
        if let Some(dir) = &self.offline_dir
            && !dir.is_dir()
        {
            return Err((
                key("offline_dir"),
                format!("{} is not a directory", dir.display()),
            ));
        }
        if self.timeout < Duration::from_millis(100) {
            return Err((key("timeout"), "must be at least 100ms".into()));
        }
        if self.retry_after < Duration::from_secs(1) {
            return Err((key("retry_after"), "must be at least 1s".into()));
        }
        if self.offline_rescan < Duration::from_secs(1) {
            return Err((key("offline_rescan"), "must be at least 1s".into()));
        }
        Ok(())
    }
}

/// `[attestation.tdx]`: the TDX verifier's trust anchor.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TdxConfig {
    /// Root CA certificate (PEM or DER) that PCK chains, the TCB info and QE identity
    /// signers and both CRLs must chain to, instead of Intel's SGX root CA (a lab PKI).
    pub root_ca_file: Option<PathBuf>,
}

/// `[attestation.snp]`: the SNP verifier's trust anchors and revocation rule.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnpConfig {
    /// Per processor generation (`milan`, `genoa`, `turin`): a PEM file holding the ARK and
    /// the ASK and ASVK it signed (the shape of AMD's `ask_ark_asvk.pem`), replacing AMD's
    /// roots of that generation. Generations not named keep AMD's.
    pub roots: BTreeMap<String, PathBuf>,
    /// `required` (the default): a report whose generation has no AMD CRL at hand (KDS
    /// answers 404, no `snp/*.crl` offline) is refused; `if-published`: it is verified
    /// without a revocation check.
    pub crl: CrlPolicy,
}

/// Largest certificate file read as a trust anchor.
const MAX_ANCHOR_BYTES: usize = 256 * 1024;

/// The roots TDX and SNP evidence must chain to: the vendors' unless `[attestation.tdx]` or
/// `[attestation.snp]` name others; with `[attestation.snp] crl` as the SNP revocation rule. A file that is not a CA certificate (or, for AMD, not an
/// ARK with the ASK and ASVK it signed) is refused, naming the key.
pub fn trust_anchors(
    tdx: &TdxConfig,
    snp: &SnpConfig,
) -> Result<Arc<TrustAnchors>, (String, String)> {
    let vendor = TrustAnchors::vendor();
    if tdx.root_ca_file.is_none() && snp.roots.is_empty() && snp.crl == vendor.snp_crl_policy() {
        return Ok(vendor);
    }
    let mut anchors = (*vendor).clone().with_snp_crl_policy(snp.crl);
    if let Some(file) = &tdx.root_ca_file {
        let key = "attestation.tdx.root_ca_file".to_owned();
        let fail = |reason: String| (key.clone(), format!("{}: {reason}", file.display()));
        let bytes = read_anchor(file).map_err(fail)?;
        let mut certs = anchors::certificates(&bytes);
        if certs.len() != 1 {
            return Err(fail(format!(
                "expected one certificate, found {}",
                certs.len()
            )));
        }
        anchors = anchors
            .with_intel_root_ca(certs.remove(0))
            .map_err(|e| fail(e.to_string()))?;
    }
    for (name, file) in &snp.roots {
        let key = format!("attestation.snp.roots.{name}");
        let fail = |reason: String| (key.clone(), format!("{}: {reason}", file.display()));
        let generation = match name.as_str() {
            "milan" => Generation::Milan,
            "genoa" => Generation::Genoa,
            "turin" => Generation::Turin,
            _ => {
                return Err((
                    key.clone(),
                    "unknown processor generation (milan, genoa or turin)".into(),
                ));
            }
        };
        let bytes = read_anchor(file).map_err(fail)?;
        anchors = anchors
            .with_amd_roots_pem(generation, &bytes)
            .map_err(|e| fail(e.to_string()))?;
    }
    Ok(Arc::new(anchors))
}

fn read_anchor(file: &std::path::Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(file)
        .and_then(|f| f.take(MAX_ANCHOR_BYTES as u64 + 1).read_to_end(&mut bytes))
        .map_err(|e| e.to_string())?;
    if bytes.len() > MAX_ANCHOR_BYTES {
        return Err(format!("larger than {MAX_ANCHOR_BYTES} bytes"));
    }
    Ok(bytes)
}

/// `[attestation.appraisal]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AppraisalConfig {
    /// Rego file used while the store holds no appraisal policy (set with
    /// `kbsctl appraisal-policy set`); the built-in default otherwise.
    pub initial_policy_file: Option<PathBuf>,
}

/// One `[[attestation.external]]`: an attestation service whose tokens are trusted.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalConfig {
    /// Name in logs and in the `tether.issuer` claim.
    pub name: String,
    /// When set, tokens must carry this `iss`.
    #[serde(default)]
    pub issuer: Option<String>,
    /// A JWK set (or one JWK) file.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// A JWK set URL, fetched at start and every `jwks_refresh`.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// How often `jwks_url` is fetched again.
    #[serde(default = "default_jwks_refresh", with = "humantime_serde")]
    pub jwks_refresh: Duration,
    /// PEM files of certificates (trust anchors for `x5c` chains, and keys themselves) or
    /// public keys.
    #[serde(default)]
    pub pem_files: Vec<PathBuf>,
    /// JSON pointers tried first for the TEE public key in the token's claims.
    #[serde(default)]
    pub tee_pubkey_paths: Vec<String>,
}

fn default_jwks_refresh() -> Duration {
    Duration::from_secs(3600)
}

impl ExternalConfig {
    /// Checks the entry at index `i`; the error names the key.
    pub fn validate(&self, i: usize) -> Result<(), (String, String)> {
        let key = |k: &str| format!("attestation.external[{i}].{k}");
        if self.name.trim().is_empty() {
            return Err((key("name"), "must not be empty".into()));
        }
        if self.jwks_file.is_none() && self.jwks_url.is_none() && self.pem_files.is_empty() {
            return Err((
                key("jwks_file"),
                "set jwks_file, jwks_url or pem_files: an issuer needs keys".into(),
            ));
        }
        if let Some(url) = &self.jwks_url {
            check_url(url).map_err(|r| (key("jwks_url"), r))?;
        }
        if self.jwks_refresh < Duration::from_secs(10) {
            return Err((key("jwks_refresh"), "must be at least 10s".into()));
        }
        let files = self.jwks_file.iter().map(|f| ("jwks_file".to_owned(), f));
        let pems = self
            .pem_files
            .iter()
            .enumerate()
            .map(|(j, f)| (format!("pem_files[{j}]"), f));
        for (name, file) in files.chain(pems) {
            if !file.is_file() {
                return Err((
                    key(&name),
                    format!("{} is not a readable file", file.display()),
                ));
            }
        }
        for (j, path) in self.tee_pubkey_paths.iter().enumerate() {
            if !path.starts_with('/') {
                return Err((
                    key(&format!("tee_pubkey_paths[{j}]")),
                    "a JSON pointer starts with `/`".into(),
                ));
            }
        }
        Ok(())
    }

    /// The issuer, with the keys of its files (a URL's set arrives with [`refresh_jwks`]).
    pub fn build(&self, i: usize) -> Result<Arc<ExternalIssuer>, (String, String)> {
        let key = |k: &str| format!("attestation.external[{i}].{k}");
        let mut keys = IssuerKeys::default();
        if let Some(file) = &self.jwks_file {
            let text = read_limited(file).map_err(|r| (key("jwks_file"), r))?;
            let doc: serde_json::Value = serde_json::from_slice(&text)
                .map_err(|e| (key("jwks_file"), format!("not JSON: {e}")))?;
            keys.jwks = keys_from_jwks(&doc).map_err(|r| (key("jwks_file"), r))?;
            if keys.jwks.is_empty() {
                return Err((key("jwks_file"), "no usable public key in the set".into()));
            }
        }
        for (j, file) in self.pem_files.iter().enumerate() {
            let k = key(&format!("pem_files[{j}]"));
            let text = read_limited(file).map_err(|r| (k.clone(), r))?;
            let pem = read_pem(&text).map_err(|r| (k, r))?;
            keys.certificates.extend(pem.certificates);
            keys.public_keys.extend(pem.public_keys);
        }
        let issuer = ExternalIssuer::new(
            &self.name,
            self.issuer.clone(),
            keys,
            self.tee_pubkey_paths.clone(),
        )
        .map_err(|r| (key("pem_files"), r))?;
        Ok(Arc::new(issuer))
    }
}

fn check_url(url: &str) -> Result<(), String> {
    match reqwest::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(()),
        Ok(_) => Err(format!("{url:?} is not an http(s) URL")),
        Err(e) => Err(format!("{url:?}: {e}")),
    }
}

fn read_limited(file: &std::path::Path) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
    if bytes.len() > MAX_JWKS_BYTES {
        return Err(format!("{} is larger than 1 MiB", file.display()));
    }
    Ok(bytes)
}

/// The appraisal policy in force (stored, else the initial file, else the built-in
/// default) with the stored reference values.
pub async fn load_appraiser<S>(
    config: &AppraisalConfig,
    store: &S,
) -> Result<Appraiser, (String, String)>
where
    S: PolicyStore + ReferenceValueStore + ?Sized,
{
    let key = "attestation.appraisal.initial_policy_file".to_owned();
    let rego = match store
        .get_policy(APPRAISAL_POLICY)
        .await
        .map_err(|e| ("storage".to_owned(), e.to_string()))?
    {
        Some(p) => p.body,
        None => match &config.initial_policy_file {
            Some(f) => std::fs::read_to_string(f)
                .map_err(|e| (key.clone(), format!("{}: {e}", f.display())))?,
            None => kbs_core::appraisal::DEFAULT_APPRAISAL_POLICY.to_owned(),
        },
    };
    let reference = reference_map(store)
        .await
        .map_err(|e| ("storage".to_owned(), e.to_string()))?;
    Appraiser::new(&rego, reference).map_err(|e| (key, e.to_string()))
}

/// The stored reference values as the appraisal policy reads them.
pub async fn reference_map<S>(
    store: &S,
) -> Result<std::collections::BTreeMap<String, Vec<String>>, StoreError>
where
    S: ReferenceValueStore + ?Sized,
{
    Ok(store
        .reference_values()
        .await?
        .into_iter()
        .map(|r| (r.name, r.values))
        .collect())
}

/// Fetches each URL-configured issuer's JWK set now and every `jwks_refresh` until
/// `shutdown`; a failed fetch keeps the keys in force and is retried after a minute.
pub async fn refresh_jwks(
    issuers: Vec<(Arc<ExternalIssuer>, String, Duration)>,
    shutdown: CancellationToken,
) {
    if issuers.is_empty() {
        return;
    }
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "JWK set client");
            return;
        }
    };
    let tasks = issuers.into_iter().map(|(issuer, url, every)| {
        let (client, shutdown) = (client.clone(), shutdown.clone());
        async move {
            loop {
                let wait = match fetch_jwks(&client, &url).await {
                    Ok(keys) => {
                        tracing::info!(issuer = issuer.name(), keys = keys.len(), "JWK set fetched");
                        issuer.set_jwks(keys);
                        every
                    }
                    Err(e) => {
                        tracing::warn!(issuer = issuer.name(), url, error = %e, "JWK set fetch failed; the keys in force stay");
                        Duration::from_secs(60).min(every)
                    }
                };
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    });
    futures::future::join_all(tasks).await;
}

async fn fetch_jwks(
    client: &reqwest::Client,
    url: &str,
) -> Result<Vec<kbs_core::attest::external::TrustedKey>, String> {
    let response = client
        .get(url)
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(|e| e.to_string())?;
    let bytes = response.bytes().await.map_err(|e| e.to_string())?;
    if bytes.len() > MAX_JWKS_BYTES {
        return Err("the JWK set is larger than 1 MiB".into());
    }
    let doc: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| format!("not JSON: {e}"))?;
    let keys = keys_from_jwks(&doc)?;
    if keys.is_empty() {
        return Err("no usable public key in the set".into());
    }
    Ok(keys)
}

/// The collateral store over the KBS's store (`persistent`), per `[attestation.collateral]`.
pub fn collateral_store(
    config: &CollateralConfig,
    persistent: Arc<dyn KvStore>,
) -> Result<tee_verifiers::CollateralStore, (String, String)> {
    kbs_core::verifiers::collateral_store(&config.settings(), Some(persistent)).map_err(|e| {
        let key = if config.offline_dir.is_some() {
            "attestation.collateral.offline_dir"
        } else {
            "attestation.collateral"
        };
        (key.to_owned(), e.to_string())
    })
}
