//! Collateral over HTTP: a PCCS or Intel PCS (v4 API) for TDX, AMD KDS for VCEKs.
//!
//! PCCS/PCS v4 paths and what they answer:
//! - `GET /sgx/certification/v4/pckcrl?ca={processor|platform}&encoding=der`: the CRL
//!   (DER; PEM and hex are also accepted), issuer chain in `SGX-PCK-CRL-Issuer-Chain`;
//! - `GET /tdx/certification/v4/tcb?fmspc={fmspc}`: `{"tcbInfo": {...}, "signature": hex}`,
//!   issuer chain in `TCB-Info-Issuer-Chain` (or `SGX-TCB-Info-Issuer-Chain`);
//! - `GET /tdx/certification/v4/qe/identity`: `{"enclaveIdentity": {...}, "signature": hex}`,
//!   issuer chain in `SGX-Enclave-Identity-Issuer-Chain`;
//! - `GET /sgx/certification/v4/rootcacrl` (PCCS only; hex or DER), or Intel's
//!   `IntelSGXRootCA.der` distribution point for the PCS (configurable URL).
//!
//! Issuer chains are URL-encoded PEM. The signed JSON (`tcbInfo`, `enclaveIdentity`) is kept
//! byte for byte as received: re-serializing it would break its signature.
//!
//! AMD KDS: `GET /vcek/v1/{Milan|Genoa|Turin}/{hwid}?[fmcSPL=..&]blSPL=..&teeSPL=..&snpSPL=..
//! &ucodeSPL=..` answers the VCEK in DER (hwid: the 64-byte chip id in hex, its first 8 bytes
//! on Turin). `GET /vcek/v1/{Milan|Genoa|Turin}/crl` answers AMD's CRL of the generation
//! (DER), signed by its ARK. The ASK/ARK/ASVK are not fetched: the public AMD roots are
//! embedded.

use std::time::Duration;

use async_trait::async_trait;
use percent_encoding::percent_decode_str;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{CollateralFetcher, CollateralItem, CollateralKey, FetchError, ItemBody};
use crate::request::Generation;

/// Where the HTTP fetcher goes.
#[derive(Debug, Clone)]
pub struct HttpFetcherConfig {
    /// PCCS or Intel PCS base URL (`https://pccs.example:8081`,
    /// `https://api.trustedservices.intel.com`).
    pub pccs_url: String,
    /// Where the root CA CRL is, when the PCCS does not serve `rootcacrl` (Intel PCS).
    pub root_ca_crl_url: Option<String>,
    /// AMD KDS base URL (`https://kdsintf.amd.com`).
    pub kds_url: String,
    /// Timeout of one request.
    pub timeout: Duration,
}

impl Default for HttpFetcherConfig {
    fn default() -> Self {
        HttpFetcherConfig {
            pccs_url: "https://api.trustedservices.intel.com".into(),
            root_ca_crl_url: Some(
                "https://certificates.trustedservices.intel.com/IntelSGXRootCA.der".into(),
            ),
            kds_url: "https://kdsintf.amd.com".into(),
            timeout: Duration::from_secs(10),
        }
    }
}

/// Fetches collateral from PCCS/PCS and KDS.
#[derive(Debug, Clone)]
pub struct HttpFetcher {
    config: HttpFetcherConfig,
    client: reqwest::Client,
}

struct Answer {
    body: Vec<u8>,
    headers: reqwest::header::HeaderMap,
}

#[derive(Deserialize)]
struct TcbInfoAnswer<'a> {
    #[serde(rename = "tcbInfo", borrow)]
    tcb_info: &'a RawValue,
    signature: String,
}

#[derive(Deserialize)]
struct QeIdentityAnswer<'a> {
    #[serde(rename = "enclaveIdentity", borrow)]
    enclave_identity: &'a RawValue,
    signature: String,
}

fn invalid(e: impl std::fmt::Display) -> FetchError {
    FetchError::Invalid(e.to_string())
}

impl HttpFetcher {
    /// A fetcher with its own HTTP client (rustls).
    pub fn new(config: HttpFetcherConfig) -> Result<Self, FetchError> {
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .build()
            .map_err(|e| FetchError::Unreachable(e.to_string()))?;
        Ok(HttpFetcher { config, client })
    }

    async fn get(&self, url: &str) -> Result<Answer, FetchError> {
        let resp = self
            .client
            .get(url)
            .send()
            .await
            .map_err(|e| FetchError::Unreachable(format!("{url}: {e}")))?;
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Err(FetchError::NotFound(url.to_owned()));
        }
        if !status.is_success() {
            return Err(FetchError::Unreachable(format!("{url}: HTTP {status}")));
        }
        let headers = resp.headers().clone();
        let body = resp
            .bytes()
            .await
            .map_err(|e| FetchError::Unreachable(format!("{url}: {e}")))?
            .to_vec();
        Ok(Answer { body, headers })
    }

    fn pccs(&self, tee: &str, path: &str) -> String {
        format!(
            "{}/{tee}/certification/v4/{path}",
            self.config.pccs_url.trim_end_matches('/')
        )
    }
}

fn header(a: &Answer, names: &[&str]) -> Result<String, FetchError> {
    for name in names {
        if let Some(v) = a.headers.get(*name).and_then(|v| v.to_str().ok()) {
            return percent_decode_str(v)
                .decode_utf8()
                .map(|s| s.into_owned())
                .map_err(invalid);
        }
    }
    Err(FetchError::Invalid(format!("missing header {}", names[0])))
}

/// A CRL answered as DER, PEM or hex text.
pub(super) fn crl_bytes(body: &[u8]) -> Result<Vec<u8>, FetchError> {
    let text = std::str::from_utf8(body).ok().map(str::trim);
    match text {
        Some(t) if t.starts_with("-----BEGIN") => {
            let b64: String = t
                .lines()
                .filter(|l| !l.starts_with("-----"))
                .collect::<Vec<_>>()
                .concat();
            base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64).map_err(invalid)
        }
        Some(t) if !t.is_empty() && t.bytes().all(|b| b.is_ascii_hexdigit()) => {
            hex::decode(t).map_err(invalid)
        }
        _ => Ok(body.to_vec()),
    }
}

#[async_trait]
impl CollateralFetcher for HttpFetcher {
    async fn fetch(&self, key: &CollateralKey) -> Result<CollateralItem, FetchError> {
        let body = match key {
            CollateralKey::PckCrl(ca) => {
                let a = self
                    .get(&self.pccs("sgx", &format!("pckcrl?ca={}&encoding=der", ca.as_str())))
                    .await?;
                ItemBody::PckCrl {
                    issuer_chain: header(&a, &["SGX-PCK-CRL-Issuer-Chain"])?,
                    crl: crl_bytes(&a.body)?,
                }
            }
            CollateralKey::RootCaCrl => {
                let a = match self.get(&self.pccs("sgx", "rootcacrl")).await {
                    Ok(a) => a,
                    Err(e) => match &self.config.root_ca_crl_url {
                        Some(url) => self.get(url).await?,
                        None => return Err(e),
                    },
                };
                ItemBody::RootCaCrl {
                    crl: crl_bytes(&a.body)?,
                }
            }
            CollateralKey::TdxTcbInfo(fmspc) => {
                let a = self
                    .get(&self.pccs("tdx", &format!("tcb?fmspc={fmspc}")))
                    .await?;
                let parsed: TcbInfoAnswer<'_> = serde_json::from_slice(&a.body).map_err(invalid)?;
                ItemBody::TcbInfo {
                    tcb_info: parsed.tcb_info.get().to_owned(),
                    signature: hex::decode(&parsed.signature).map_err(invalid)?,
                    issuer_chain: header(
                        &a,
                        &["TCB-Info-Issuer-Chain", "SGX-TCB-Info-Issuer-Chain"],
                    )?,
                }
            }
            CollateralKey::TdxQeIdentity => {
                let a = self.get(&self.pccs("tdx", "qe/identity")).await?;
                let parsed: QeIdentityAnswer<'_> =
                    serde_json::from_slice(&a.body).map_err(invalid)?;
                ItemBody::QeIdentity {
                    qe_identity: parsed.enclave_identity.get().to_owned(),
                    signature: hex::decode(&parsed.signature).map_err(invalid)?,
                    issuer_chain: header(&a, &["SGX-Enclave-Identity-Issuer-Chain"])?,
                }
            }
            CollateralKey::Vcek(id) => {
                let products = match id.generation {
                    Some(g) => vec![g],
                    None => vec![Generation::Milan, Generation::Genoa],
                };
                let mut last = FetchError::NotFound("no product to ask KDS for".into());
                let mut der = None;
                for g in products {
                    let url = format!(
                        "{}/vcek/v1/{}/{}?{}",
                        self.config.kds_url.trim_end_matches('/'),
                        g.product_name(),
                        hex::encode(&id.hw_id),
                        id.tcb.url_query()
                    );
                    match self.get(&url).await {
                        Ok(a) => {
                            der = Some(a.body);
                            break;
                        }
                        Err(e @ FetchError::NotFound(_)) => last = e,
                        Err(e) => return Err(e),
                    }
                }
                ItemBody::Vcek {
                    der: der.ok_or(last)?,
                }
            }
            CollateralKey::SnpCrl(g) => {
                let url = format!(
                    "{}/vcek/v1/{}/crl",
                    self.config.kds_url.trim_end_matches('/'),
                    g.product_name()
                );
                match self.get(&url).await {
                    Ok(a) => ItemBody::SnpCrl {
                        crl: crl_bytes(&a.body)?,
                    },
                    Err(FetchError::NotFound(_)) => {
                        tracing::warn!(%url, "KDS publishes no AMD CRL here: until it does, SNP reports of this generation are refused (crl = \"required\") or their keys not checked for revocation (crl = \"if-published\")");
                        ItemBody::SnpCrlAbsent
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        CollateralItem::new(body).map_err(invalid)
    }
}
