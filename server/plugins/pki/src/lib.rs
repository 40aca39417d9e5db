//! `pki` (client-request): a generic PKI for attested guests. `POST /kbs/v0/pki/sign` takes a
//! PKCS#10 CSR for a key generated in the guest (Ed25519 or P-256), verifies its
//! self-signature, checks that its subject CN and SANs name only the caller's attested
//! identity (guest id, `[tether] name`, `[tether] ip`), evaluates the resource policy with
//! `data.plugin = "pki"` and `data.query = {"cn": .., "key_type": "ed25519"|"p256"}`, and
//! returns a certificate from the plugin's CA, sealed to the token's TEE key like every other
//! secret: the body is a JWE (as the resource GET returns) whose plaintext is
//! `{"certificate": PEM, "ca": PEM, "not_after": unix_s}`.
//!
//! The seal is what stops a token thief: whoever holds only the token can have a key of their
//! own certified, but the certificate exists nowhere else than inside that JWE, which only the
//! TEE key opens (docs/protocol.md, "pki").
//!
//! Request body: JSON `{"csr": "<PEM or base64 DER>"}`, or the PEM / base64 DER text itself.
//!
//! One CA per KBS, generated on first use and kept in the plugin's KV namespace (key `ca`,
//! sealed with the KEK like every plugin value); replaced by a new one only once it would
//! expire within one certificate validity. Issued certificates are not stored: each issue is
//! logged (guest, serial, names, expiry; never a key) and counted in `kbs_pki_sign_total`.

pub mod csr;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use axum::Json;
use axum::Router;
use axum::extract::{Extension, Request, State};
use axum::http::{StatusCode, header};
use axum::routing::{get, post};
use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use time::OffsetDateTime;
use zeroize::Zeroize;

use kbs_core::key_algorithm::KeyAlgorithm;
use kbs_core::metrics::Labels;
use kbs_web::error::ApiError;
use kbs_web::extract::Attested;
use kbs_web::plugin::{Plugin, PluginContext, PluginKind, PluginSetup, PluginSetupError};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

pub use self::csr::{CheckedCsr, CsrError, CsrKeyType, RequestedSan};

/// Plugin name and URL segment.
pub const NAME: &str = "pki";
/// KV key of the CA record.
const CA_KEY: &str = "ca";
/// Certificates start this long before issue (clock skew).
const BACKDATE_SECS: u64 = 300;

/// `[plugins.pki]` settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PkiConfig {
    /// Lifetime of issued certificates.
    #[serde(with = "humantime_serde")]
    pub validity: Duration,
    /// Lifetime of the CA (at least `validity`).
    #[serde(with = "humantime_serde")]
    pub ca_validity: Duration,
    /// Key algorithm of the CA: `ed25519` or `ecdsa-p256`.
    pub ca_key_algorithm: KeyAlgorithm,
    /// Organization (O) of the CA's subject.
    pub organization: String,
    /// Largest accepted request body, bytes (413 past it).
    pub max_csr_bytes: usize,
}

impl Default for PkiConfig {
    fn default() -> Self {
        Self {
            validity: Duration::from_secs(7 * 24 * 3600),
            ca_validity: Duration::from_secs(5 * 365 * 24 * 3600),
            ca_key_algorithm: KeyAlgorithm::Ed25519,
            organization: "Tether PKI".to_string(),
            max_csr_bytes: 16 * 1024,
        }
    }
}

impl PkiConfig {
    /// Range checks: the key at fault (within `[plugins.pki]`) and why.
    pub fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        let bad = |key, reason| (key, reason);
        if self.validity < Duration::from_secs(60) {
            return Err(bad("validity", "must be at least 1m"));
        }
        if self.validity > Duration::from_secs(2 * 365 * 24 * 3600) {
            return Err(bad("validity", "must be at most 2 years"));
        }
        if self.ca_validity < self.validity {
            return Err(bad("ca_validity", "must be at least plugins.pki.validity"));
        }
        if self.ca_validity > Duration::from_secs(30 * 365 * 24 * 3600) {
            return Err(bad("ca_validity", "must be at most 30 years"));
        }
        if self.organization.is_empty() || self.organization.len() > 64 {
            return Err(bad("organization", "must be 1..=64 characters"));
        }
        if !(512..=1024 * 1024).contains(&self.max_csr_bytes) {
            return Err(bad("max_csr_bytes", "must be 512..=1048576"));
        }
        Ok(())
    }
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn time_of(unix: u64) -> Result<OffsetDateTime, String> {
    i64::try_from(unix)
        .map_err(|e| e.to_string())
        .and_then(|t| OffsetDateTime::from_unix_timestamp(t).map_err(|e| e.to_string()))
}

fn serial() -> (SerialNumber, String) {
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // and 16 bytes long
    let hex = bytes.iter().map(|b| format!("{b:02x}")).collect();
    (SerialNumber::from_slice(&bytes), hex)
}

/// The CA as stored (sealed with the KEK by the KV layer).
#[derive(Clone, Serialize, Deserialize)]
struct CaRecord {
    cert: String,
    key: String,
    not_after: u64,
    created_at: u64,
}

impl Drop for CaRecord {
    fn drop(&mut self) {
        self.key.zeroize();
    }
}

impl std::fmt::Debug for CaRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaRecord")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl CaRecord {
    fn generate(cfg: &PkiConfig, now: u64) -> Result<Self, String> {
        let alg = match cfg.ca_key_algorithm {
            KeyAlgorithm::Ed25519 => &rcgen::PKCS_ED25519,
            KeyAlgorithm::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        };
        let key = KeyPair::generate_for(alg).map_err(|e| e.to_string())?;
        let not_after = now.saturating_add(cfg.ca_validity.as_secs());
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, cfg.organization.as_str());
        dn.push(DnType::CommonName, "Tether PKI CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(serial().0);
        params.not_before = time_of(now.saturating_sub(BACKDATE_SECS))?;
        params.not_after = time_of(not_after)?;
        let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
        Ok(Self {
            cert: cert.pem(),
            key: key.serialize_pem(),
            not_after,
            created_at: now,
        })
    }

    /// A certificate for `csr` (already checked against the caller's identity).
    fn sign(&self, csr: &CheckedCsr, cfg: &PkiConfig, now: u64) -> Result<Issued, String> {
        let ca_key = KeyPair::from_pem(&self.key).map_err(|e| e.to_string())?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert, ca_key).map_err(|e| e.to_string())?;
        let not_after = now
            .saturating_add(cfg.validity.as_secs())
            .min(self.not_after);
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, csr.common_name.as_str());
        params.distinguished_name = dn;
        params.subject_alt_names = csr
            .sans
            .iter()
            .map(|s| match s {
                RequestedSan::Dns(d) => d
                    .clone()
                    .try_into()
                    .map(SanType::DnsName)
                    .map_err(|e: rcgen::Error| e.to_string()),
                RequestedSan::Ip(ip) => Ok(SanType::IpAddress(*ip)),
            })
            .collect::<Result<_, _>>()?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let (serial, serial_hex) = serial();
        params.serial_number = Some(serial);
        params.not_before = time_of(now.saturating_sub(BACKDATE_SECS))?;
        params.not_after = time_of(not_after)?;
        let cert = params.signed_by(csr, &issuer).map_err(|e| e.to_string())?;
        Ok(Issued {
            certificate: cert.pem(),
            not_after,
            serial: serial_hex,
        })
    }
}

struct Issued {
    certificate: String,
    not_after: u64,
    serial: String,
}

/// Shared state of the handlers.
struct Inner {
    config: PkiConfig,
    /// The CA, once loaded or generated (one generator at a time).
    ca: tokio::sync::Mutex<Option<Arc<CaRecord>>>,
    /// `kbs_pki_sign{outcome,key_type}`.
    signs: Family<Labels, Counter>,
}

impl Inner {
    /// The CA in force: cached, stored, or generated now (and stored) when there is none or
    /// it would expire within one certificate validity.
    async fn ca(&self, ctx: &PluginContext, now: u64) -> Result<Arc<CaRecord>, ApiError> {
        let mut slot = self.ca.lock().await;
        let usable =
            |ca: &CaRecord| ca.not_after > now.saturating_add(self.config.validity.as_secs());
        if let Some(ca) = slot.as_ref()
            && usable(ca)
        {
            return Ok(ca.clone());
        }
        if let Some(raw) = ctx.kv().get(CA_KEY).await? {
            let raw = zeroize::Zeroizing::new(raw);
            let ca: CaRecord = serde_json::from_slice(&raw)
                .map_err(|e| ApiError::internal("pki: stored CA record", e))?;
            if usable(&ca) {
                let ca = Arc::new(ca);
                *slot = Some(ca.clone());
                return Ok(ca);
            }
            tracing::warn!(
                not_after = ca.not_after,
                "pki: the CA expires within one certificate validity; generating a new CA"
            );
        }
        let cfg = self.config.clone();
        let ca = tokio::task::spawn_blocking(move || CaRecord::generate(&cfg, now))
            .await
            .map_err(|e| ApiError::internal("pki: CA generation task", e))?
            .map_err(|e| ApiError::internal("pki: CA generation", e))?;
        let raw = zeroize::Zeroizing::new(
            serde_json::to_vec(&ca).map_err(|e| ApiError::internal("pki: CA record", e))?,
        );
        ctx.kv().put(CA_KEY, &raw).await?;
        tracing::info!(not_after = ca.not_after, "pki: CA generated");
        let ca = Arc::new(ca);
        *slot = Some(ca.clone());
        Ok(ca)
    }
}

/// The generic PKI plugin.
pub struct PkiPlugin {
    inner: Arc<Inner>,
}

impl PkiPlugin {
    /// With its `[plugins.pki]` section, validated; registers `kbs_pki_sign`.
    pub fn build(setup: &mut PluginSetup<'_>) -> Result<Self, PluginSetupError> {
        let config: PkiConfig = setup.config()?;
        config
            .validate()
            .map_err(|(key, reason)| setup.invalid(key, reason))?;
        let signs = Family::<Labels, Counter>::default();
        setup.metrics().register(
            "sign",
            "PKI plugin sign requests by outcome and key type",
            signs.clone(),
        );
        Ok(Self::new(config, signs))
    }

    /// With a configuration already validated, counting sign requests into `signs`.
    pub fn new(config: PkiConfig, signs: Family<Labels, Counter>) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                ca: tokio::sync::Mutex::new(None),
                signs,
            }),
        }
    }
}

#[async_trait]
impl Plugin for PkiPlugin {
    fn name(&self) -> &'static str {
        NAME
    }

    fn kind(&self) -> PluginKind {
        PluginKind::ClientRequest
    }

    fn routes(&self, ctx: PluginContext) -> Router {
        Router::new()
            .route("/sign", post(sign))
            .route("/ca", get(ca_cert))
            .layer(Extension(self.inner.clone()))
            .with_state(ctx)
    }
}

fn count(inner: &Inner, outcome: &str, key_type: &str) {
    inner
        .signs
        .get_or_create(&vec![
            ("outcome", outcome.to_string()),
            ("key_type", key_type.to_string()),
        ])
        .inc();
}

/// The CSR text of a request body: JSON `{"csr": ".."}` or the text itself.
fn csr_text(body: &[u8]) -> Result<String, CsrError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| CsrError::Malformed("the body is not UTF-8 text".into()))?;
    if text.trim_start().starts_with('{') {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct SignRequest {
            csr: String,
        }
        let req: SignRequest = serde_json::from_str(text).map_err(|e| {
            CsrError::Malformed(format!(
                "invalid JSON body (expected {{\"csr\": \"...\"}}): {e}"
            ))
        })?;
        return Ok(req.csr);
    }
    Ok(text.to_string())
}

/// `POST /kbs/v0/pki/sign` (attested): certify a guest-generated key; the answer is sealed to
/// the token's TEE key.
async fn sign(
    State(ctx): State<PluginContext>,
    Extension(inner): Extension<Arc<Inner>>,
    Attested(token): Attested,
    req: Request,
) -> Result<Json<kbs_types::Response>, ApiError> {
    let started = Instant::now();
    let guest_id = token.identity.guest_id.clone();
    let limit = inner.config.max_csr_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PayloadTooLarge",
            format!("a CSR request body is at most {limit} bytes (plugins.pki.max_csr_bytes)"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let body = match declared {
        Some(n) if n > limit as u64 => None,
        _ => axum::body::to_bytes(req.into_body(), limit).await.ok(),
    };
    let Some(body) = body else {
        tracing::info!(%guest_id, limit, "pki: CSR body too large");
        count(&inner, "too_large", "unknown");
        return Err(too_large());
    };

    let checked = csr_text(&body)
        .and_then(|t| csr::decode(&t))
        .and_then(|der| csr::check(&der, &token.identity));
    let checked = match checked {
        Ok(c) => c,
        Err(e) => {
            tracing::info!(%guest_id, error = e.name(), detail = %e, "pki: CSR refused");
            count(&inner, e.name(), "unknown");
            let status = match e {
                CsrError::Mismatch(_) => StatusCode::FORBIDDEN,
                _ => StatusCode::BAD_REQUEST,
            };
            return Err(ApiError::new(status, e.name(), e.to_string()));
        }
    };
    let key_type = checked.key_type.as_str();
    let query = BTreeMap::from([
        ("cn".to_string(), checked.common_name.clone()),
        ("key_type".to_string(), key_type.to_string()),
    ]);
    if let Err(e) = ctx.require_policy(&token.claims, None, &query) {
        tracing::info!(%guest_id, key_type, "pki: the policy refuses this guest a certificate");
        count(&inner, "policy_deny", key_type);
        return Err(e);
    }

    let now = now_s();
    let ca = inner.ca(&ctx, now).await?;
    let cfg = inner.config.clone();
    let ca_for_task = ca.clone();
    let to_sign = checked.clone();
    let issued = tokio::task::spawn_blocking(move || ca_for_task.sign(&to_sign, &cfg, now))
        .await
        .map_err(|e| ApiError::internal("pki: signing task", e))?
        .map_err(|e| {
            count(&inner, "error", key_type);
            ApiError::internal("pki: signing", e)
        })?;
    let names: Vec<String> = checked
        .sans
        .iter()
        .map(|s| match s {
            RequestedSan::Dns(d) => format!("DNS:{d}"),
            RequestedSan::Ip(ip) => format!("IP:{ip}"),
        })
        .collect();
    let answer = zeroize::Zeroizing::new(
        serde_json::to_vec(&json!({
            "certificate": issued.certificate,
            "ca": ca.cert,
            "not_after": issued.not_after,
        }))
        .map_err(|e| ApiError::internal("pki: the answer", e))?,
    );
    let sealed = kbs_core::jwe::seal(&token.tee_pubkey, &answer).inspect_err(|_| {
        count(&inner, "error", key_type);
    })?;
    count(&inner, "issued", key_type);
    tracing::info!(
        %guest_id,
        serial = %issued.serial,
        cn = %checked.common_name,
        sans = %names.join(","),
        key_type,
        not_after = issued.not_after,
        micros = started.elapsed().as_micros() as u64,
        "pki: certificate issued, sealed to the token's TEE key"
    );
    Ok(Json(sealed))
}

/// `GET /kbs/v0/pki/ca` (attested): the CA certificate, to trust peers' certificates.
async fn ca_cert(
    State(ctx): State<PluginContext>,
    Extension(inner): Extension<Arc<Inner>>,
    Attested(token): Attested,
) -> Result<Json<Value>, ApiError> {
    ctx.require_policy(&token.claims, None, &BTreeMap::new())?;
    let ca = inner.ca(&ctx, now_s()).await?;
    Ok(Json(json!({ "ca": ca.cert, "not_after": ca.not_after })))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use rcgen::KeyPair;
    use x509_parser::prelude::{FromDer, X509Certificate};

    use super::*;
    use kbs_core::identity::GuestIdentity;

    #[test]
    fn issued_certificates_chain_to_the_ca_with_the_requested_names() {
        let cfg = PkiConfig::default();
        let now = now_s();
        let ca = CaRecord::generate(&cfg, now).unwrap();
        let id = GuestIdentity {
            guest_id: "web-1".into(),
            name: Some("web-1.pods.example".into()),
            ip: Some("10.0.0.7".parse().unwrap()),
            ..Default::default()
        };
        for alg in [&rcgen::PKCS_ED25519, &rcgen::PKCS_ECDSA_P256_SHA256] {
            let key = KeyPair::generate_for(alg).unwrap();
            let mut params = CertificateParams::default();
            params.distinguished_name.push(DnType::CommonName, "web-1");
            params.subject_alt_names = vec![
                SanType::DnsName("web-1.pods.example".try_into().unwrap()),
                SanType::IpAddress("10.0.0.7".parse().unwrap()),
            ];
            // Asking for CA powers is ignored.
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let pem = params.serialize_request(&key).unwrap().pem().unwrap();
            let checked = csr::check(&csr::decode(&pem).unwrap(), &id).unwrap();
            let issued = ca.sign(&checked, &cfg, now).unwrap();
            let (_, ca_pem) = x509_parser::pem::parse_x509_pem(ca.cert.as_bytes()).unwrap();
            let (_, ca_x) = X509Certificate::from_der(&ca_pem.contents).unwrap();
            let (_, leaf_pem) =
                x509_parser::pem::parse_x509_pem(issued.certificate.as_bytes()).unwrap();
            let (_, leaf) = X509Certificate::from_der(&leaf_pem.contents).unwrap();
            leaf.verify_signature(Some(ca_x.public_key())).unwrap();
            assert!(!leaf.is_ca());
            assert_eq!(
                leaf.public_key().subject_public_key.data,
                key.public_key_raw()
            );
            assert_eq!(
                leaf.validity().not_after.timestamp() as u64,
                now + cfg.validity.as_secs()
            );
            assert_eq!(issued.not_after, now + cfg.validity.as_secs());
        }
    }

    /// `cargo test -p server --lib pki_sign_time -- --ignored --nocapture`: server-side cost
    /// of one sign (CSR parse + signature check + identity check + certificate signed by the
    /// stored CA), per key type of the guest key, with an Ed25519 and a P-256 CA.
    #[test]
    #[ignore = "timing figure"]
    fn pki_sign_time() {
        let id = GuestIdentity {
            guest_id: "web-1".into(),
            name: Some("web-1.pods.example".into()),
            ip: Some("10.0.0.7".parse().unwrap()),
            ..Default::default()
        };
        for ca_alg in [KeyAlgorithm::Ed25519, KeyAlgorithm::EcdsaP256] {
            let cfg = PkiConfig {
                ca_key_algorithm: ca_alg,
                ..Default::default()
            };
            let ca = CaRecord::generate(&cfg, now_s()).unwrap();
            for alg in [&rcgen::PKCS_ED25519, &rcgen::PKCS_ECDSA_P256_SHA256] {
                let key = KeyPair::generate_for(alg).unwrap();
                let mut params = CertificateParams::default();
                params.distinguished_name.push(DnType::CommonName, "web-1");
                params.subject_alt_names = vec![
                    SanType::DnsName("web-1.pods.example".try_into().unwrap()),
                    SanType::IpAddress("10.0.0.7".parse().unwrap()),
                ];
                let pem = params.serialize_request(&key).unwrap().pem().unwrap();
                let n = 500;
                let t = Instant::now();
                for _ in 0..n {
                    let checked = csr::check(&csr::decode(&pem).unwrap(), &id).unwrap();
                    ca.sign(&checked, &cfg, now_s()).unwrap();
                }
                println!(
                    "CA {ca_alg:?}, guest key {:?}: {:?} per sign",
                    alg,
                    t.elapsed() / n
                );
            }
        }
    }

    #[test]
    fn config_section_is_strict() {
        let build = |text: &str| {
            let section = toml::Value::Table(text.parse().unwrap());
            kbs_web::plugin::PluginSpec::new(NAME, PkiPlugin::build).build(
                Some(section),
                &mut prometheus_client::registry::Registry::default(),
            )
        };
        let plugin = build("validity = \"2d\"").unwrap();
        assert_eq!(plugin.name(), NAME);
        let err = build("validty = \"2d\"").err().unwrap();
        assert!(err.to_string().contains("validty"), "{err}");
        let err = build("ca_validity = \"1h\"").err().unwrap();
        assert_eq!(err.key, "plugins.pki.ca_validity");
    }

    #[test]
    fn config_ranges() {
        PkiConfig::default().validate().unwrap();
        let c = PkiConfig {
            validity: Duration::from_secs(10),
            ..Default::default()
        };
        assert_eq!(c.validate().unwrap_err().0, "validity");
        let c = PkiConfig {
            max_csr_bytes: 10,
            ..Default::default()
        };
        assert!(c.validate().is_err());
    }
}

#[cfg(test)]
mod layering_tests {
    #[test]
    fn modules_do_not_import_each_other_in_a_circle() {
        layering::assert_no_module_cycles(env!("CARGO_MANIFEST_DIR"));
    }
}
