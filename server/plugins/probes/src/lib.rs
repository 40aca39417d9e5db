//! The `probes` plugin (server-request and admin): `POST /kbs/v0/probes` (many guests by
//! label selector) and `POST /kbs/v0/probes/<guest_id>` (one guest), and probe rounds at a
//! configurable interval with jitter (`[plugins.probes]`). The probing itself is the core's
//! [`Prober`]; this plugin serves and schedules it.

mod config;

use std::time::Duration;

use async_trait::async_trait;
use axum::Json;
use axum::Router;
use axum::extract::{FromRef, Path, State};
use axum::routing::post;
use kbs_core::probe::{
    BatchReport, BatchRequest, DEFAULT_CONCURRENCY, DEFAULT_DEADLINE, MAX_CONCURRENCY,
    MAX_DEADLINE, ProbeOutcome, ProbeRequest, Prober,
};
use kbs_core::selector::Selector;
use kbs_web::admin_gate::AdminGate;
use kbs_web::error::ApiError;
use kbs_web::extract::{AdminCaller, ApiBytes, ApiJson};
use kbs_web::plugin::{Plugin, PluginContext, PluginKind, PluginSetup, PluginSetupError};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

pub use config::ProbesConfig;

/// Plugin name (URL segment).
pub const NAME: &str = "probes";

/// The probes plugin.
#[derive(Debug)]
pub struct ProbesPlugin {
    config: ProbesConfig,
    prober: Prober,
}

impl ProbesPlugin {
    /// With its `[plugins.probes]` section, validated, probing through `prober`.
    pub fn build(setup: &mut PluginSetup<'_>, prober: Prober) -> Result<Self, PluginSetupError> {
        let config: ProbesConfig = setup.config()?;
        config
            .validate()
            .map_err(|(key, reason)| setup.invalid(key, reason))?;
        Ok(Self { config, prober })
    }
}

/// What the handlers share.
#[derive(Clone)]
struct ProbesApi {
    ctx: PluginContext,
    prober: Prober,
}

impl FromRef<ProbesApi> for Arc<AdminGate> {
    fn from_ref(api: &ProbesApi) -> Self {
        Self::from_ref(&api.ctx)
    }
}

#[async_trait]
impl Plugin for ProbesPlugin {
    fn name(&self) -> &'static str {
        NAME
    }

    fn kind(&self) -> PluginKind {
        PluginKind::ServerRequest
    }

    fn kinds(&self) -> Vec<PluginKind> {
        vec![PluginKind::ServerRequest, PluginKind::Admin]
    }

    fn routes(&self, ctx: PluginContext) -> Router {
        Router::new()
            .route("/", post(batch))
            .route("/{guest_id}", post(one))
            .with_state(ProbesApi {
                ctx,
                prober: self.prober.clone(),
            })
    }

    async fn start(&self, _ctx: PluginContext, stop: CancellationToken) {
        run_periodic(&self.prober, &self.config, stop).await;
    }
}

/// Probe rounds every `config.interval` (± jitter) until `stop`.
async fn run_periodic(prober: &Prober, config: &ProbesConfig, stop: CancellationToken) {
    if config.interval.is_zero() {
        return;
    }
    let selector = Selector::parse(&config.selector).unwrap_or_default();
    loop {
        let wait = config.next_wait(rand::random::<f64>());
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stop.cancelled() => return,
        }
        let round = prober.probe_many(
            &selector,
            config.kind,
            config.concurrency,
            config.deadline,
            false,
        );
        let report = tokio::select! {
            r = round => r,
            () = stop.cancelled() => return,
        };
        tracing::debug!(selected = report.selected, elapsed_ms = report.elapsed_ms, summary = ?report.summary, "periodic probe round");
    }
}

/// `POST /kbs/v0/probes/<guest_id>` (body optional: `{"kind": ...}`).
async fn one(
    State(api): State<ProbesApi>,
    AdminCaller(admin): AdminCaller,
    Path(guest_id): Path<String>,
    ApiBytes(body): ApiBytes,
) -> Result<Json<ProbeOutcome>, ApiError> {
    let request =
        ProbeRequest::from_body(&body).map_err(|e| ApiError::bad_request("MalformedRequest", e))?;
    let prober = &api.prober;
    if prober.hub.get(&guest_id).is_none() && prober.fleet.get(&guest_id).is_none() {
        return Err(ApiError::not_found(
            "GuestNotFound",
            format!("no guest {guest_id:?} is known to this KBS"),
        ));
    }
    prober
        .fleet
        .ensure_live(&prober.hub.list(), &prober.directory);
    let outcome = prober.probe_one(&guest_id, request.kind, None).await;
    api.ctx
        .audit(
            &admin,
            "probes.one",
            &guest_id,
            &outcome.outcome,
            format!("kind {}", request.kind),
        )
        .await;
    Ok(Json(outcome))
}

/// `POST /kbs/v0/probes`: probe every guest a selector picks.
async fn batch(
    State(api): State<ProbesApi>,
    AdminCaller(admin): AdminCaller,
    ApiJson(req): ApiJson<BatchRequest>,
) -> Result<Json<BatchReport>, ApiError> {
    let selector = Selector::parse(&req.selector)
        .map_err(|e| ApiError::bad_request("InvalidSelector", e.to_string()))?;
    let concurrency = req.concurrency.unwrap_or(DEFAULT_CONCURRENCY);
    if concurrency == 0 || concurrency > MAX_CONCURRENCY {
        return Err(ApiError::bad_request(
            "MalformedRequest",
            format!("concurrency must be within 1..={MAX_CONCURRENCY}"),
        ));
    }
    let deadline = req
        .deadline_ms
        .map(Duration::from_millis)
        .unwrap_or(DEFAULT_DEADLINE);
    if deadline.is_zero() || deadline > MAX_DEADLINE {
        return Err(ApiError::bad_request(
            "MalformedRequest",
            "deadline_ms must be within 1..=300000",
        ));
    }
    let report = api
        .prober
        .probe_many(
            &selector,
            req.kind,
            concurrency,
            deadline,
            req.include_disconnected.unwrap_or(true),
        )
        .await;
    api.ctx
        .audit(
            &admin,
            "probes.batch",
            &req.selector,
            "ok",
            format!(
                "kind {}, {} selected in {} ms: {:?}",
                req.kind, report.selected, report.elapsed_ms, report.summary
            )
            .to_lowercase(),
        )
        .await;
    Ok(Json(report))
}

#[cfg(test)]
mod layering_tests {
    #[test]
    fn modules_do_not_import_each_other_in_a_circle() {
        layering::assert_no_module_cycles(env!("CARGO_MANIFEST_DIR"));
    }
}
