//! The `probes` plugin: routes under `/kbs/v0/probes` and the periodic prober.

use std::time::Duration;

use async_trait::async_trait;
use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::routing::post;
use tokio_util::sync::CancellationToken;

use super::{
    BatchReport, BatchRequest, DEFAULT_CONCURRENCY, DEFAULT_DEADLINE, MAX_CONCURRENCY,
    MAX_DEADLINE, ProbeOutcome, Prober, ProbesConfig,
};
use crate::app::AppState;
use crate::error::ApiError;
use crate::fleet::Selector;
use crate::http::guests::ProbeRequest;
use crate::http::{AdminCaller, ApiBytes, ApiJson};
use crate::plugins::{Plugin, PluginContext, PluginKind};

/// Plugin name (URL segment).
pub const NAME: &str = "probes";

/// The probes plugin.
#[derive(Debug, Default)]
pub struct ProbesPlugin {
    config: ProbesConfig,
}

impl ProbesPlugin {
    /// A plugin probing periodically as `config` says.
    pub fn new(config: ProbesConfig) -> Self {
        Self { config }
    }
}

/// The prober of a KBS.
pub fn prober(state: &AppState) -> Prober {
    Prober {
        hub: state.hub.clone(),
        fleet: state.fleet.clone(),
        directory: state.guest_directory.clone(),
        metrics: state.metrics.observability.clone(),
    }
}

fn core(ctx: &PluginContext) -> &AppState {
    // Built in: the fleet view and the hub are core state.
    ctx.core()
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
            .with_state(ctx)
    }

    async fn start(&self, ctx: PluginContext, stop: CancellationToken) {
        prober(core(&ctx))
            .run_periodic(self.config.clone(), stop)
            .await;
    }
}

/// `POST /kbs/v0/probes/<guest_id>` with optional `{"kind": ...}`: the guest's outcome
/// (`ok` with its report, or `timeout`, `disconnected`, `not_connected`, ...); 404 only for a
/// guest the KBS has never known.
pub async fn one(
    State(ctx): State<PluginContext>,
    AdminCaller(admin): AdminCaller,
    Path(guest_id): Path<String>,
    ApiBytes(body): ApiBytes,
) -> Result<Json<ProbeOutcome>, ApiError> {
    let request = if body.iter().all(u8::is_ascii_whitespace) {
        ProbeRequest::default()
    } else {
        serde_json::from_slice::<ProbeRequest>(&body).map_err(|e| {
            ApiError::bad_request("MalformedRequest", format!("invalid probe request: {e}"))
        })?
    };
    let state = core(&ctx);
    if state.hub.get(&guest_id).is_none() && state.fleet.get(&guest_id).is_none() {
        return Err(ApiError::not_found(
            "GuestNotFound",
            format!("no guest {guest_id:?} is known to this KBS"),
        ));
    }
    state
        .fleet
        .ensure_live(&state.hub.list(), &state.guest_directory);
    let outcome = prober(state).probe_one(&guest_id, request.kind, None).await;
    ctx.audit(
        &admin,
        "probes.one",
        &guest_id,
        &outcome.outcome,
        format!("kind {:?}", request.kind).to_lowercase(),
    )
    .await;
    Ok(Json(outcome))
}

/// `POST /kbs/v0/probes` `{selector, kind, concurrency, deadline_ms, include_disconnected}`.
pub async fn batch(
    State(ctx): State<PluginContext>,
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
    let report = prober(core(&ctx))
        .probe_many(
            &selector,
            req.kind,
            concurrency,
            deadline,
            req.include_disconnected.unwrap_or(true),
        )
        .await;
    ctx.audit(
        &admin,
        "probes.batch",
        &req.selector,
        "ok",
        format!(
            "kind {:?}, {} selected in {} ms: {:?}",
            req.kind, report.selected, report.elapsed_ms, report.summary
        )
        .to_lowercase(),
    )
    .await;
    Ok(Json(report))
}
