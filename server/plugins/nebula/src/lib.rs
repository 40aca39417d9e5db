//! `nebula-ca` (client-request + server-request): Nebula overlay credentials for attested
//! guests, as upstream Trustee's `nebula_ca` plugin. One Nebula CA per KBS, generated when the
//! plugin first starts and kept in the plugin's namespace (its Ed25519 key sealed under the
//! KEK). `GET /kbs/v0/nebula-ca/credential?name=..&ip=..[&groups=..][&duration=..]` answers a
//! JWE sealed to the caller's TEE key whose plaintext is upstream's
//! `{"node_crt", "node_key", "ca_crt"}` (each the file's bytes, as upstream's `Vec<u8>`
//! fields serialise: JSON arrays of numbers). The name, address and groups must be what the
//! guest's attested init-data allows (`[nebula]` table), or what the policy allows when the
//! operator opts in (`names_from_policy`); see [`authz`].
//!
//! Guests that announce the `nebula` tunnel service get their credential pushed on connect
//! (`install_credentials`, bundle `nebula`: `ca.crt`, `node.crt`, `node.key`) and again before
//! it expires, like splitapi's bundles. Certificates are issued natively (the v1 format in
//! [`cert`]; no `nebula-cert` process on the request path) and never stored.
//! docs/protocol.md, "nebula-ca", has the wire formats.

pub mod authz;
pub mod cert;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use axum::Json;
use axum::Router;
use axum::extract::{Extension, Query, State};
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rpc_defs::{BUNDLE_BINDING_HEADER, BundleBinding, CredentialBundle, CredentialFile};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tunnel::{TunnelEvent, TunnelHandle};
use zeroize::Zeroizing;

use kbs_core::metrics::Labels;
use kbs_core::policy_gate::Decision;
use kbs_web::error::ApiError;
use kbs_web::extract::Attested;
use kbs_web::plugin::{
    CredentialPusher, Plugin, PluginContext, PluginKind, PluginSetup, PluginSetupError,
};

use self::authz::{Allowed, NodeRequest};
use self::cert::{Ca, Details, NodeCredential};

/// Plugin name and URL segment (upstream's).
pub const NAME: &str = "nebula-ca";
/// The tunnel service a guest announces to get pushes, and the bundle id.
pub const SERVICE: &str = "nebula";
/// KV key of the CA record.
const CA_KEY: &str = "ca";
/// Certificates start this long before issue (clock skew).
const BACKDATE_SECS: i64 = 300;
/// Most pushes in flight at once (connect storms).
const MAX_CONCURRENT_PUSHES: usize = 64;
/// The pushed bundle's files and modes.
const FILES: [(&str, u32); 3] = [("ca.crt", 0o644), ("node.crt", 0o644), ("node.key", 0o600)];

/// `[plugins.nebula-ca]` settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NebulaConfig {
    /// The CA's name.
    pub ca_name: String,
    /// Lifetime of the CA.
    #[serde(with = "humantime_serde")]
    pub ca_validity: Duration,
    /// Lifetime of node certificates (a request's `duration` may ask for less).
    #[serde(with = "humantime_serde")]
    pub validity: Duration,
    /// Push a renewed credential this long before the pushed one expires.
    #[serde(with = "humantime_serde")]
    pub renew_before: Duration,
    /// How often to look for pushed credentials due for renewal.
    #[serde(with = "humantime_serde")]
    pub renew_check_interval: Duration,
    /// Let the resource policy grant names, addresses and groups the attestation does not
    /// (it sees them in `data.query`, with `attested = "false"`). Off: the attestation must.
    pub names_from_policy: bool,
}

impl Default for NebulaConfig {
    fn default() -> Self {
        Self {
            ca_name: "Tether Nebula CA".into(),
            ca_validity: Duration::from_secs(365 * 24 * 3600),
            validity: Duration::from_secs(7 * 24 * 3600),
            renew_before: Duration::from_secs(24 * 3600),
            renew_check_interval: Duration::from_secs(60),
            names_from_policy: false,
        }
    }
}

impl NebulaConfig {
    /// Range checks: the key at fault (within `[plugins.nebula-ca]`) and why.
    pub fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        if self.ca_name.is_empty() || self.ca_name.len() > 128 {
            return Err(("ca_name", "must be 1..=128 bytes"));
        }
        if self.validity < Duration::from_secs(60) {
            return Err(("validity", "must be at least 1m"));
        }
        if self.ca_validity < self.validity {
            return Err(("ca_validity", "must be at least plugins.nebula-ca.validity"));
        }
        if self.ca_validity > Duration::from_secs(30 * 365 * 24 * 3600) {
            return Err(("ca_validity", "must be at most 30 years"));
        }
        if self.renew_before >= self.validity {
            return Err((
                "renew_before",
                "must be shorter than plugins.nebula-ca.validity",
            ));
        }
        if self.renew_check_interval < Duration::from_secs(1) {
            return Err(("renew_check_interval", "must be at least 1s"));
        }
        Ok(())
    }
}

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The CA as stored (sealed with the KEK by the namespace).
#[derive(Serialize, Deserialize)]
struct CaRecord {
    name: String,
    not_before: i64,
    not_after: i64,
    /// Base64 of the certificate's encoding.
    cert: String,
    /// Base64 of Nebula's 64-byte Ed25519 key.
    key: String,
}

impl Drop for CaRecord {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.key);
    }
}

impl CaRecord {
    fn of(ca: &Ca) -> Self {
        Self {
            name: ca.details.name.clone(),
            not_before: ca.details.not_before,
            not_after: ca.details.not_after,
            cert: B64.encode(&ca.cert),
            key: B64.encode(&*ca.key_bytes()),
        }
    }

    fn open(&self) -> Option<Ca> {
        let cert = B64.decode(&self.cert).ok()?;
        let key = Zeroizing::new(B64.decode(&self.key).ok()?);
        let public_key: [u8; 32] = key.get(32..64)?.try_into().ok()?;
        let details = Details {
            name: self.name.clone(),
            ips: Vec::new(),
            groups: Vec::new(),
            not_before: self.not_before,
            not_after: self.not_after,
            public_key,
            is_ca: true,
            issuer: Vec::new(),
        };
        // Ed25519 signs deterministically: the stored certificate must be exactly what these
        // details and this key make, or it is not this CA's.
        Ca::from_parts(cert, details, &key).filter(Ca::is_consistent)
    }
}

/// Shared state of the handlers and the push task.
struct Inner {
    config: NebulaConfig,
    ca: tokio::sync::Mutex<Option<Arc<Ca>>>,
    /// Pushes into `nebula` tunnels; what each acknowledged is the credential's not_after.
    pusher: Arc<CredentialPusher<i64>>,
    /// Bundle versions only grow (milliseconds, bumped past the last one).
    last_version: AtomicU64,
    /// `kbs_nebula_ca_credentials_total{via,outcome}`.
    issued: Family<Labels, Counter>,
}

impl Inner {
    fn count(&self, via: &str, outcome: &str) {
        self.issued
            .get_or_create(&vec![
                ("via", via.to_string()),
                ("outcome", outcome.to_string()),
            ])
            .inc();
    }

    /// The CA in force: cached, stored, or generated now (and stored) when there is none
    /// or it would expire within one node validity.
    async fn ca(&self, ctx: &PluginContext) -> Result<Arc<Ca>, ApiError> {
        let mut slot = self.ca.lock().await;
        let now = now_s();
        let usable = |ca: &Ca| ca.details.not_after > now + self.config.validity.as_secs() as i64;
        if let Some(ca) = slot.as_ref()
            && usable(ca)
        {
            return Ok(ca.clone());
        }
        if let Some(raw) = ctx.kv().get(CA_KEY).await? {
            let raw = Zeroizing::new(raw);
            let rec: CaRecord = serde_json::from_slice(&raw)
                .map_err(|e| ApiError::internal("nebula-ca: stored CA record", e))?;
            let ca = rec.open().ok_or_else(|| {
                ApiError::internal(
                    "nebula-ca: stored CA record",
                    "key and certificate do not match",
                )
            })?;
            if usable(&ca) {
                let ca = Arc::new(ca);
                *slot = Some(ca.clone());
                return Ok(ca);
            }
            tracing::warn!(
                not_after = ca.details.not_after,
                "nebula-ca: the CA expires within one node validity; generating a new CA (nodes must trust it)"
            );
        }
        let ca = Ca::generate(
            &self.config.ca_name,
            now - BACKDATE_SECS,
            now + self.config.ca_validity.as_secs() as i64,
        );
        let raw = Zeroizing::new(
            serde_json::to_vec(&CaRecord::of(&ca))
                .map_err(|e| ApiError::internal("nebula-ca: CA record", e))?,
        );
        ctx.kv().put(CA_KEY, &raw).await?;
        tracing::info!(
            name = %ca.details.name,
            not_after = ca.details.not_after,
            fingerprint = %hex::encode(cert::fingerprint(&ca.cert)),
            "nebula-ca: CA generated"
        );
        let ca = Arc::new(ca);
        *slot = Some(ca.clone());
        Ok(ca)
    }

    fn issue(&self, ca: &Ca, req: &NodeRequest) -> NodeCredential {
        let now = now_s();
        let life = req
            .duration
            .unwrap_or(self.config.validity)
            .min(self.config.validity);
        ca.issue(
            &req.name,
            req.ip,
            &req.groups,
            now - BACKDATE_SECS,
            now + life.as_secs() as i64,
        )
    }

    fn next_version(&self) -> u64 {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(1);
        let mut prev = self.last_version.load(Ordering::Relaxed);
        loop {
            let next = now_ms.max(prev + 1);
            match self.last_version.compare_exchange(
                prev,
                next,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return next,
                Err(p) => prev = p,
            }
        }
    }

    /// Issue and push a credential into `handle`'s guest, from its attested `[nebula]`
    /// table, when the policy allows it; the pushed credential's not_after once installed.
    async fn push(&self, ctx: &PluginContext, handle: &TunnelHandle) -> Option<i64> {
        let guest_id = handle.guest_id.as_str();
        let att = ctx.attested_guest(guest_id)?;
        let claims = att.claims.to_value();
        let Some(req) = Allowed::from_claims(&claims, &att.identity).push_request() else {
            tracing::info!(
                guest_id,
                "nebula-ca: this guest's init-data names no [nebula] ip; nothing to push"
            );
            self.count("push", "no_identity");
            return None;
        };
        match ctx.decide(&att.claims, None, &authz::policy_query(&req, true)) {
            Ok(Decision::Allow) => {}
            Ok(Decision::Deny(why)) => {
                tracing::info!(guest_id, detail = %why, "nebula-ca: policy refuses this guest; not pushing");
                self.count("push", "policy_deny");
                return None;
            }
            Err(e) => {
                tracing::warn!(guest_id, error = %e, "nebula-ca: policy evaluation failed; not pushing");
                return None;
            }
        }
        let ca = match self.ca(ctx).await {
            Ok(ca) => ca,
            Err(e) => {
                tracing::error!(guest_id, error = %e, "nebula-ca: no CA");
                return None;
            }
        };
        let cred = self.issue(&ca, &req);
        let version = self.next_version();
        let files: Vec<CredentialFile> = FILES
            .iter()
            .map(|(name, mode)| CredentialFile {
                name: (*name).to_string(),
                mode: *mode,
            })
            .collect();
        let not_after = cred.not_after.max(0) as u64;
        let ca_pem = ca.cert_pem();
        let plain = {
            let map: BTreeMap<&str, &serde_bytes::Bytes> = BTreeMap::from([
                ("ca.crt", serde_bytes::Bytes::new(ca_pem.as_bytes())),
                (
                    "node.crt",
                    serde_bytes::Bytes::new(cred.cert_pem.as_bytes()),
                ),
                ("node.key", serde_bytes::Bytes::new(cred.key_pem.as_bytes())),
            ]);
            let mut out = Zeroizing::new(Vec::with_capacity(2048));
            if let Err(e) = ciborium::into_writer(&map, &mut *out) {
                tracing::error!(guest_id, error = %e, "nebula-ca: encoding the bundle");
                return None;
            }
            out
        };
        let binding = BundleBinding::new(SERVICE, version, &files, not_after);
        let sealed = kbs_core::jwe::binding_header(BUNDLE_BINDING_HEADER, &binding)
            .and_then(|bound| kbs_core::jwe::seal_bound(&att.tee_pubkey, &plain, &bound))
            .map_err(|e| e.to_string())
            .and_then(|jwe| serde_json::to_vec(&jwe).map_err(|e| e.to_string()));
        let jwe = match sealed {
            Ok(j) => j,
            Err(e) => {
                tracing::error!(guest_id, error = %e, "nebula-ca: sealing the bundle");
                return None;
            }
        };
        let bundle = CredentialBundle {
            id: SERVICE.to_string(),
            version,
            files,
            jwe,
            not_after,
        };
        match handle.install_credentials(bundle, None).await {
            Ok(_) => {
                self.count("push", "issued");
                tracing::info!(
                    guest_id,
                    name = %req.name,
                    ip = %req.ip,
                    version,
                    not_after = cred.not_after,
                    fingerprint = %cred.fingerprint,
                    "nebula-ca: credential pushed"
                );
                Some(cred.not_after)
            }
            Err(e) => {
                self.count("push", "failed");
                tracing::warn!(guest_id, error = %e, "nebula-ca: push failed; retried at the next renewal check");
                None
            }
        }
    }

    /// Push into `handle`'s guest in a task, unless one is running for this tunnel (bounded
    /// concurrency; skipped once the plugin is disabled or the KBS shuts down).
    fn spawn_push(self: &Arc<Self>, ctx: &PluginContext, handle: Arc<TunnelHandle>) {
        let this = self.clone();
        let task_ctx = ctx.clone();
        self.pusher
            .spawn(handle, ctx.shutdown(), move |handle| async move {
                if !task_ctx.is_enabled() {
                    return None;
                }
                this.push(&task_ctx, &handle).await
            });
    }

    /// Push to every live `nebula` guest whose current tunnel holds no credential yet or
    /// whose credential is due for renewal.
    fn renew_pass(self: &Arc<Self>, ctx: &PluginContext) {
        let due_at = now_s() + self.config.renew_before.as_secs() as i64;
        for handle in ctx.hub().list() {
            let current = self
                .pusher
                .delivered(&handle)
                .is_some_and(|not_after| not_after > due_at);
            if !current {
                self.spawn_push(ctx, handle);
            }
        }
        self.pusher.retain_live(ctx.hub());
    }
}

/// The Nebula CA plugin.
pub struct NebulaPlugin {
    inner: Arc<Inner>,
}

impl NebulaPlugin {
    /// With its `[plugins.nebula-ca]` section, validated; registers `kbs_nebula_ca_credentials`.
    pub fn build(setup: &mut PluginSetup<'_>) -> Result<Self, PluginSetupError> {
        let config: NebulaConfig = setup.config()?;
        config
            .validate()
            .map_err(|(key, reason)| setup.invalid(key, reason))?;
        let issued = Family::<Labels, Counter>::default();
        setup.metrics().register(
            "credentials",
            "Nebula credentials by path (pull, push) and outcome",
            issued.clone(),
        );
        Ok(Self::new(config, issued))
    }

    /// With a configuration already validated.
    pub fn new(config: NebulaConfig, issued: Family<Labels, Counter>) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                ca: tokio::sync::Mutex::new(None),
                pusher: CredentialPusher::new(SERVICE, MAX_CONCURRENT_PUSHES),
                last_version: AtomicU64::new(0),
                issued,
            }),
        }
    }
}

#[async_trait]
impl Plugin for NebulaPlugin {
    fn name(&self) -> &'static str {
        NAME
    }

    fn kind(&self) -> PluginKind {
        PluginKind::ClientRequest
    }

    fn kinds(&self) -> Vec<PluginKind> {
        vec![PluginKind::ClientRequest, PluginKind::ServerRequest]
    }

    fn routes(&self, ctx: PluginContext) -> Router {
        Router::new()
            .route("/credential", get(credential))
            .route("/ca", get(ca_cert))
            .layer(Extension(self.inner.clone()))
            .with_state(ctx)
    }

    async fn start(&self, ctx: PluginContext, stop: CancellationToken) {
        // The CA exists from the first start on (its certificate is what nodes trust).
        if let Err(e) = self.inner.ca(&ctx).await {
            tracing::error!(error = %e, "nebula-ca: cannot load or generate the CA");
        }
        let mut tick = tokio::time::interval(self.inner.config.renew_check_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => self.inner.renew_pass(&ctx),
            }
        }
    }

    async fn on_event(&self, ctx: &PluginContext, event: &TunnelEvent) {
        match event {
            TunnelEvent::Connected(handle) => self.inner.spawn_push(ctx, handle.clone()),
            TunnelEvent::Disconnected {
                guest_id, epoch, ..
            } => self.inner.pusher.forget(guest_id, *epoch),
        }
    }

    async fn resync(&self, ctx: &PluginContext) {
        for handle in ctx.hub().list() {
            self.inner.spawn_push(ctx, handle);
        }
    }
}

/// Upstream's answer: each file's bytes (serde's `Vec<u8>`: an array of numbers).
#[derive(Serialize)]
struct CredentialOut<'a> {
    node_crt: &'a [u8],
    node_key: &'a [u8],
    ca_crt: &'a [u8],
}

/// `GET /kbs/v0/nebula-ca/credential?name=..&ip=..[&groups=..][&duration=..]` (attested).
async fn credential(
    State(ctx): State<PluginContext>,
    Extension(inner): Extension<Arc<Inner>>,
    Attested(token): Attested,
    Query(query): Query<BTreeMap<String, String>>,
) -> Result<Json<kbs_types::Response>, ApiError> {
    let guest_id = token.identity.guest_id.clone();
    let req = authz::parse_query(&query).map_err(|e| {
        inner.count("pull", "invalid");
        ApiError::bad_request("InvalidCredentialRequest", e.to_string())
    })?;
    let claims = token.claims.to_value();
    let refusal = Allowed::from_claims(&claims, &token.identity).refusal(&req);
    if let Some(why) = &refusal
        && !inner.config.names_from_policy
    {
        inner.count("pull", "identity_mismatch");
        tracing::info!(%guest_id, name = %req.name, ip = %req.ip, %why, "nebula-ca: refused");
        return Err(ApiError::forbidden(
            "IdentityMismatch",
            format!(
                "{why}; a Nebula name, address and groups come from the guest's attested init-data ([nebula] table)"
            ),
        ));
    }
    if let Err(e) = ctx.require_policy(
        &token.claims,
        None,
        &authz::policy_query(&req, refusal.is_none()),
    ) {
        inner.count("pull", "policy_deny");
        return Err(e);
    }
    let ca = inner.ca(&ctx).await?;
    let cred = inner.issue(&ca, &req);
    let ca_pem = ca.cert_pem();
    let plain = Zeroizing::new(
        serde_json::to_vec(&CredentialOut {
            node_crt: cred.cert_pem.as_bytes(),
            node_key: cred.key_pem.as_bytes(),
            ca_crt: ca_pem.as_bytes(),
        })
        .map_err(|e| ApiError::internal("nebula-ca: the answer", e))?,
    );
    let sealed = kbs_core::jwe::seal(&token.tee_pubkey, &plain)?;
    inner.count("pull", "issued");
    tracing::info!(
        %guest_id,
        name = %req.name,
        ip = %req.ip,
        groups = %req.groups.join(","),
        not_after = cred.not_after,
        fingerprint = %cred.fingerprint,
        "nebula-ca: credential issued, sealed to the token's TEE key"
    );
    Ok(Json(sealed))
}

/// `GET /kbs/v0/nebula-ca/ca` (attested): the CA certificate (PEM), for nodes and
/// lighthouses to trust.
async fn ca_cert(
    State(ctx): State<PluginContext>,
    Extension(inner): Extension<Arc<Inner>>,
    Attested(token): Attested,
) -> Result<Json<serde_json::Value>, ApiError> {
    ctx.require_policy(&token.claims, None, &BTreeMap::new())?;
    let ca = inner.ca(&ctx).await?;
    Ok(Json(serde_json::json!({
        "ca_crt": ca.cert_pem(),
        "not_after": ca.details.not_after,
        "fingerprint": hex::encode(cert::fingerprint(&ca.cert)),
    })))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn config_section_is_strict() {
        let build = |text: &str| {
            let section = toml::Value::Table(text.parse().unwrap());
            kbs_web::plugin::PluginSpec::new(NAME, NebulaPlugin::build).build(
                Some(section),
                &mut prometheus_client::registry::Registry::default(),
            )
        };
        assert_eq!(build("validity = \"2d\"").unwrap().name(), NAME);
        let err = build("validty = \"2d\"").err().unwrap();
        assert!(err.to_string().contains("validty"), "{err}");
        let err = build("renew_before = \"30d\"").err().unwrap();
        assert_eq!(err.key, "plugins.nebula-ca.renew_before");
    }

    #[test]
    fn the_stored_ca_opens_to_the_same_ca() {
        let ca = Ca::generate("x", 1, 1_000_000_000_000);
        let rec = CaRecord::of(&ca);
        let again = rec.open().unwrap();
        assert_eq!(again.cert, ca.cert);
        assert_eq!(again.details, ca.details);
        assert_eq!(*again.key_bytes(), *ca.key_bytes());
    }

    #[test]
    fn bundle_versions_only_grow() {
        let p = NebulaPlugin::new(NebulaConfig::default(), Family::default());
        let a = p.inner.next_version();
        let b = p.inner.next_version();
        assert!(b > a);
    }
}

#[cfg(test)]
mod layering_tests {
    #[test]
    fn modules_do_not_import_each_other_in_a_circle() {
        layering::assert_no_module_cycles(env!("CARGO_MANIFEST_DIR"));
    }
}
