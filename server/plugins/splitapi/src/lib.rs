//! splitapi (server-request + client-request + admin): a per-sandbox PKI. For each guest a CA,
//! a server certificate naming the sandbox (SANs from its attested identity only) and a
//! client certificate for the workload owner. The server bundle is pushed into the guest over
//! its tunnel when it connects announcing the `splitapi` service and again on renewal; guests
//! without a tunnel pull it from `GET /kbs/v0/splitapi/credentials`; the owner fetches the
//! client bundle from `GET /kbs/v0/splitapi/owner/<guest_id>/credentials`.
//!
//! Records live in the plugin's own KV namespace, key `cred/<guest_id>`, sealed with the KEK.

mod config;
mod http;
pub mod pki;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use axum::Router;
use axum::routing::get;
use dashmap::DashMap;
use rpc_defs::{BUNDLE_BINDING_HEADER, BundleBinding, CredentialBundle, CredentialFile, Installed};
use tokio_util::sync::CancellationToken;
use tunnel::{TunnelEvent, TunnelHandle};

use kbs_core::policy_gate::Decision;
use kbs_core::storage::StoreError;
use kbs_web::error::ApiError;
use kbs_web::plugin::{
    CredentialPusher, Plugin, PluginContext, PluginKind, PluginSetup, PluginSetupError,
};

pub use self::config::SplitApiConfig;
use self::pki::{CredentialRecord, SandboxIdentity};

/// Plugin name, URL segment and the tunnel service a guest announces to get pushes.
pub const NAME: &str = "splitapi";
/// Most pushes in flight at once (connect storms).
const MAX_CONCURRENT_PUSHES: usize = 64;

/// splitapi failures.
#[derive(Debug, thiserror::Error)]
pub enum SplitApiError {
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Certificate generation failed.
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    /// A stored record did not decode.
    #[error("stored splitapi record for {0} is corrupt: {1}")]
    Corrupt(String, String),
    /// Sealing to the TEE key failed.
    #[error("sealing the bundle: {0}")]
    Seal(String),
    /// A pull whose attested name or address differs from the sandbox's record.
    #[error(
        "the splitapi credentials of guest {0:?} name another attested identity than this token's; \
         a pull does not change them (a guest whose name or address changed gets its new server \
         certificate over its tunnel, after the proof of possession)"
    )]
    IdentityConflict(String),
}

impl From<SplitApiError> for ApiError {
    fn from(e: SplitApiError) -> Self {
        match e {
            SplitApiError::Store(s) => s.into(),
            e @ SplitApiError::IdentityConflict(_) => ApiError::new(
                axum::http::StatusCode::CONFLICT,
                "IdentityConflict",
                e.to_string(),
            ),
            other => ApiError::internal("splitapi", other),
        }
    }
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn record_key(guest_id: &str) -> String {
    format!("cred/{guest_id}")
}

/// Shared state of the plugin's handlers and tasks.
pub(crate) struct Inner {
    config: SplitApiConfig,
    /// One issuer at a time per guest (push, pull and renewal may race).
    locks: DashMap<String, Arc<tokio::sync::Mutex<()>>>,
    /// Pushes into splitapi tunnels; what each acknowledged is the bundle version.
    pusher: Arc<CredentialPusher<u64>>,
}

/// The splitapi plugin.
pub struct SplitApiPlugin {
    inner: Arc<Inner>,
}

impl SplitApiPlugin {
    /// With its `[plugins.splitapi]` section, validated.
    pub fn build(setup: &mut PluginSetup<'_>) -> Result<Self, PluginSetupError> {
        let config: SplitApiConfig = setup.config()?;
        config
            .validate()
            .map_err(|(key, reason)| setup.invalid(key, reason))?;
        Ok(Self::new(config))
    }

    /// With a configuration already validated.
    pub fn new(config: SplitApiConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                locks: DashMap::new(),
                pusher: CredentialPusher::new(NAME, MAX_CONCURRENT_PUSHES),
            }),
        }
    }
}

impl Inner {
    /// The stored record of `guest_id`.
    pub(crate) async fn load(
        &self,
        ctx: &PluginContext,
        guest_id: &str,
    ) -> Result<Option<CredentialRecord>, SplitApiError> {
        let Some(raw) = ctx.kv().get(&record_key(guest_id)).await? else {
            return Ok(None);
        };
        let raw = zeroize::Zeroizing::new(raw);
        serde_json::from_slice(&raw)
            .map(Some)
            .map_err(|e| SplitApiError::Corrupt(guest_id.to_string(), e.to_string()))
    }

    /// The current record for this attested identity, issuing or renewing it when needed.
    ///
    /// Who may change what: the first caller creates the record; a renewal re-issues all of
    /// it under the same CA; a changed name or address re-issues only the server certificate,
    /// and only when `proven` (the identity comes from the guest directory, written after the
    /// tunnel's proof of possession). A pull carries a token only, which someone else may hold
    /// or have attested with other init-data: its differing identity is `IdentityConflict`,
    /// and the record stays as it is.
    pub(crate) async fn ensure(
        &self,
        ctx: &PluginContext,
        identity: &SandboxIdentity,
        proven: bool,
    ) -> Result<CredentialRecord, SplitApiError> {
        let lock = self
            .locks
            .entry(identity.guest_id.clone())
            .or_default()
            .clone();
        let _guard = lock.lock().await;
        let prev = self.load(ctx, &identity.guest_id).await?;
        let now = now_s();
        if let Some(p) = &prev {
            if p.identity != *identity && !proven {
                tracing::warn!(
                    guest_id = %identity.guest_id,
                    recorded = ?p.identity,
                    pulled = ?identity,
                    "splitapi: a pull names another identity than the record; refused"
                );
                return Err(SplitApiError::IdentityConflict(identity.guest_id.clone()));
            }
            if !CredentialRecord::needs_issue(Some(p), identity, &self.config, now) {
                return Ok(p.clone());
            }
        }
        let reason = match &prev {
            None => "new",
            Some(p) if p.needs_renewal(&self.config, now) => "renewal",
            Some(_) => "identity-changed",
        };
        let started = Instant::now();
        let config = self.config.clone();
        let id = identity.clone();
        let prev_for_issue = prev.clone();
        let rec = tokio::task::spawn_blocking(move || {
            pki::issue(prev_for_issue.as_ref(), &id, &config, now)
        })
        .await
        .map_err(|e| SplitApiError::Pki(pki::PkiError::new(format!("issuer task: {e}"))))??;
        let raw = zeroize::Zeroizing::new(
            serde_json::to_vec(&rec)
                .map_err(|e| SplitApiError::Corrupt(identity.guest_id.clone(), e.to_string()))?,
        );
        ctx.kv().put(&record_key(&identity.guest_id), &raw).await?;
        tracing::info!(
            guest_id = %identity.guest_id,
            version = rec.version,
            not_after = rec.not_after,
            reason,
            new_ca = prev.as_ref().is_none_or(|p| p.ca_cert != rec.ca_cert),
            algorithm = ?rec.algorithm,
            micros = started.elapsed().as_micros() as u64,
            "splitapi credentials issued"
        );
        Ok(rec)
    }

    /// Push the server bundle into `handle`'s guest when it offers the splitapi service and
    /// the policy allows it.
    async fn push(&self, ctx: &PluginContext, handle: &TunnelHandle) -> Option<Installed> {
        if !self.pusher.offers(handle) || handle.is_closed() {
            return None;
        }
        let guest_id = handle.guest_id.as_str();
        let Some(att) = ctx.attested_guest(guest_id) else {
            tracing::warn!(
                guest_id,
                "splitapi: no attestation recorded for this tunnel; not pushing"
            );
            return None;
        };
        match ctx.decide(&att.claims, None, &BTreeMap::new()) {
            Ok(Decision::Allow) => {}
            Ok(Decision::Deny(why)) => {
                tracing::info!(guest_id, detail = %why, "splitapi: policy refuses this guest; not pushing");
                return None;
            }
            Err(e) => {
                tracing::warn!(guest_id, error = %e, "splitapi: policy evaluation failed; not pushing");
                return None;
            }
        }
        let identity = SandboxIdentity::from(&att.identity);
        let started = Instant::now();
        let result = async {
            let rec = self.ensure(ctx, &identity, true).await?;
            let bundle = server_bundle(&rec, &att.tee_pubkey)?;
            Ok::<_, SplitApiError>(bundle)
        }
        .await;
        let bundle = match result {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(guest_id, error = %e, "splitapi: cannot prepare the bundle");
                return None;
            }
        };
        let version = bundle.version;
        match handle.install_credentials(bundle, None).await {
            Ok(installed) => {
                tracing::info!(
                    guest_id,
                    version,
                    already_held = installed.already_held,
                    ms = started.elapsed().as_millis() as u64,
                    "splitapi bundle installed"
                );
                Some(installed)
            }
            Err(e) => {
                tracing::warn!(guest_id, version, error = %e, "splitapi bundle push failed; retried at the next renewal check");
                None
            }
        }
    }

    /// Spawn a push unless one is running for this tunnel (bounded concurrency; skipped once
    /// the plugin is disabled or the KBS shuts down).
    fn spawn_push(self: &Arc<Self>, ctx: &PluginContext, handle: Arc<TunnelHandle>) {
        let this = self.clone();
        let task_ctx = ctx.clone();
        self.pusher
            .spawn(handle, ctx.shutdown(), move |handle| async move {
                if !task_ctx.is_enabled() {
                    return None;
                }
                this.push(&task_ctx, &handle)
                    .await
                    .map(|installed| installed.version)
            });
    }

    /// Push to every live splitapi guest whose credentials are due for renewal or whose
    /// current tunnel has not acknowledged the current version.
    async fn renew_pass(self: &Arc<Self>, ctx: &PluginContext) {
        let now = now_s();
        for handle in ctx.hub().list() {
            if !self.pusher.offers(&handle) {
                continue;
            }
            let rec = match self.load(ctx, &handle.guest_id).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(guest_id = %handle.guest_id, error = %e, "splitapi: reading the record");
                    continue;
                }
            };
            let due = rec.as_ref().is_none_or(|r| {
                now.saturating_add(self.config.renew_before.as_secs()) >= r.not_after
            });
            let acked = self
                .pusher
                .delivered(&handle)
                .zip(rec.as_ref())
                .is_some_and(|(version, r)| version == r.version);
            if due || !acked {
                self.spawn_push(ctx, handle);
            }
        }
        self.pusher.retain_live(ctx.hub());
        self.locks.retain(|_, l| Arc::strong_count(l) > 1);
    }
}

/// The server bundle of `rec`, sealed to `tee_pubkey`.
pub fn server_bundle(
    rec: &CredentialRecord,
    tee_pubkey: &kbs_types::TeePubKey,
) -> Result<CredentialBundle, SplitApiError> {
    let sealed = seal_server_files(rec, tee_pubkey)?;
    let jwe = serde_json::to_vec(&sealed).map_err(|e| SplitApiError::Seal(e.to_string()))?;
    Ok(CredentialBundle {
        id: pki::BUNDLE_ID.to_string(),
        version: rec.version,
        files: server_files(),
        jwe,
        not_after: rec.not_after,
    })
}

/// The JWE of `rec`'s server files, sealed to `tee_pubkey`, binding the bundle's id,
/// version, file modes and expiry in its protected header (the guest checks them against
/// the fields that travel beside it).
pub fn seal_server_files(
    rec: &CredentialRecord,
    tee_pubkey: &kbs_types::TeePubKey,
) -> Result<kbs_types::Response, SplitApiError> {
    let plain = rec.server_plaintext()?;
    let binding = BundleBinding::new(pki::BUNDLE_ID, rec.version, &server_files(), rec.not_after);
    kbs_core::jwe::binding_header(BUNDLE_BINDING_HEADER, &binding)
        .and_then(|bound| kbs_core::jwe::seal_bound(tee_pubkey, &plain, &bound))
        .map_err(|e| SplitApiError::Seal(e.to_string()))
}

/// The server bundle's files and modes.
pub fn server_files() -> Vec<CredentialFile> {
    pki::SERVER_FILES
        .iter()
        .map(|(name, mode)| CredentialFile {
            name: (*name).to_string(),
            mode: *mode,
        })
        .collect()
}

#[async_trait]
impl Plugin for SplitApiPlugin {
    fn name(&self) -> &'static str {
        NAME
    }

    fn kind(&self) -> PluginKind {
        PluginKind::ServerRequest
    }

    fn kinds(&self) -> Vec<PluginKind> {
        vec![
            PluginKind::ServerRequest,
            PluginKind::ClientRequest,
            PluginKind::Admin,
        ]
    }

    fn routes(&self, ctx: PluginContext) -> Router {
        Router::new()
            .route("/credentials", get(http::pull))
            .route("/owner/{guest_id}/credentials", get(http::owner))
            .layer(axum::Extension(self.inner.clone()))
            .with_state(ctx)
    }

    async fn start(&self, ctx: PluginContext, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.inner.config.renew_check_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate; resync covers start
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => self.inner.renew_pass(&ctx).await,
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

#[cfg(test)]
mod layering_tests {
    #[test]
    fn modules_do_not_import_each_other_in_a_circle() {
        layering::assert_no_module_cycles(env!("CARGO_MANIFEST_DIR"));
    }
}
