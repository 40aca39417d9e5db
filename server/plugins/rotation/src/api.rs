//! The rotation admin API under `/kbs/v0/rotation`: start, list, inspect, control rollouts,
//! and a server-sent-events stream of their changes.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{FromRef, Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use kbs_core::resource_path::ResourcePath;
use kbs_core::selector::Selector;
use kbs_web::admin_auth::AdminIdentity;
use kbs_web::admin_gate::AdminGate;
use kbs_web::error::ApiError;
use kbs_web::extract::{AdminCaller, ApiJson};
use kbs_web::plugin::PluginContext;

use crate::engine::{Command, Control, ControlError};
use crate::follow::{self, Update};
pub use crate::view::RolloutView;
use crate::{Deps, Shared};
use kbs_core::storage::{NewRollout, RolloutQuery, TargetRecord, TargetState, now_ms};

/// Default pushes in flight per rollout.
pub const DEFAULT_MAX_CONCURRENT: u32 = 64;
/// Most pushes in flight per rollout.
pub const MAX_MAX_CONCURRENT: u32 = 10_000;
/// Default attempts per guest.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
/// Default deadline of one push, seconds.
pub const DEFAULT_GUEST_DEADLINE_S: u64 = 30;
/// Longest overall deadline, seconds (30 days).
pub const MAX_DEADLINE_S: u64 = 30 * 24 * 3600;
/// Default and largest page of targets.
pub const TARGET_PAGE: u32 = 100;
const MAX_TARGET_PAGE: u32 = 1000;

/// Body of `POST /kbs/v0/rotation/rollouts`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRollout {
    /// Resource path `repo/type/tag`.
    pub path: String,
    /// Version to deliver (default: the latest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// Label selector (`app=db,env in (prod,staging)`); empty selects every guest.
    pub selector: String,
    /// Pushes in flight at once (the batch size), 1..=10000, default 64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u32>,
    /// Pushes per guest before it is failed, 1..=100, default 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Deadline of one push, seconds, 1..=600, default 30.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_deadline_s: Option<u64>,
    /// Overall deadline, seconds from now (undelivered targets then fail), 1..=30 days;
    /// `[plugins.rotation] default_deadline` (7 days) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_s: Option<u64>,
}

/// Body of `GET /kbs/v0/rotation/rollouts/<id>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutDetail {
    /// The rollout and its counts.
    #[serde(flatten)]
    pub view: RolloutView,
    /// A page of targets, by guest id.
    pub targets: Vec<TargetRecord>,
    /// Pass as `after` for the next page; absent on the last.
    pub next_after: Option<String>,
}

/// Body of `GET /kbs/v0/rotation/rollouts`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutList {
    /// Rollouts, newest first.
    pub rollouts: Vec<RolloutView>,
}

/// Query of `GET /kbs/v0/rotation/rollouts/<id>`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetPage {
    /// Only targets in this state.
    pub state: Option<TargetState>,
    /// Targets after this guest id.
    pub after: Option<String>,
    /// Page size (default 100, at most 1000).
    pub limit: Option<u32>,
}

/// Query of `GET /kbs/v0/rotation/rollouts`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only this resource path.
    pub path: Option<String>,
    /// Only rollouts in force.
    #[serde(default)]
    pub in_force: bool,
    /// Ids below this (paging).
    pub before: Option<i64>,
    /// Page size (default 50, at most 500).
    pub limit: Option<u32>,
}

/// State of the rotation routes.
#[derive(Clone)]
pub struct RotationApi {
    pub(crate) ctx: PluginContext,
    pub(crate) deps: Deps,
    pub(crate) shared: Arc<Shared>,
    /// Deadline of a rollout started without `deadline_s` (`[plugins.rotation]`).
    pub(crate) default_deadline: Duration,
}

impl FromRef<RotationApi> for Arc<AdminGate> {
    fn from_ref(api: &RotationApi) -> Self {
        Self::from_ref(&api.ctx)
    }
}

fn invalid(detail: impl Into<String>) -> ApiError {
    ApiError::bad_request("InvalidRollout", detail)
}

fn range<T: PartialOrd + std::fmt::Display + Copy>(
    name: &str,
    value: Option<T>,
    default: T,
    min: T,
    max: T,
) -> Result<T, ApiError> {
    let v = value.unwrap_or(default);
    if v < min || v > max {
        return Err(invalid(format!(
            "{name} must be between {min} and {max}, got {v}"
        )));
    }
    Ok(v)
}

/// `POST /rollouts`: validate, store, hand to the reconciler.
pub async fn start(
    State(api): State<RotationApi>,
    AdminCaller(admin): AdminCaller,
    ApiJson(req): ApiJson<StartRollout>,
) -> Result<(StatusCode, Json<RolloutView>), ApiError> {
    let deps = &api.deps;
    let path: ResourcePath = req
        .path
        .parse()
        .map_err(|e| ApiError::bad_request("InvalidResourcePath", format!("{}: {e}", req.path)))?;
    let selector = Selector::parse(&req.selector)
        .map_err(|e| ApiError::bad_request("InvalidSelector", e.to_string()))?;
    let max_concurrent = range(
        "max_concurrent",
        req.max_concurrent,
        DEFAULT_MAX_CONCURRENT,
        1,
        MAX_MAX_CONCURRENT,
    )?;
    let max_attempts = range(
        "max_attempts",
        req.max_attempts,
        DEFAULT_MAX_ATTEMPTS,
        1,
        100,
    )?;
    let guest_deadline_s = range(
        "guest_deadline_s",
        req.guest_deadline_s,
        DEFAULT_GUEST_DEADLINE_S,
        1,
        600,
    )?;
    let deadline_s = match req.deadline_s {
        Some(d) => range("deadline_s", Some(d), d, 1, MAX_DEADLINE_S)?,
        None => api.default_deadline.as_secs(),
    };
    let deadline_at = Some(now_ms() + 1000 * deadline_s);
    let versions = deps.resources.list_versions(&path).await?;
    let live: Vec<_> = versions.iter().filter(|v| !v.deleted).collect();
    let chosen = match req.version {
        None => live.last().copied().ok_or_else(|| {
            ApiError::not_found("ResourceNotFound", format!("no resource at {path}"))
        })?,
        Some(n) => live
            .iter()
            .copied()
            .find(|v| v.version == n)
            .ok_or_else(|| {
                let have: Vec<String> = live.iter().map(|v| v.version.to_string()).collect();
                ApiError::not_found(
                    "VersionNotFound",
                    if have.is_empty() {
                        format!("no resource at {path}")
                    } else {
                        format!("{path} has no version {n} (versions: {})", have.join(", "))
                    },
                )
            })?,
    };

    // Matching guests: the connected ones and those seen recently (offline ones get the
    // version when they reconnect).
    let since = now_ms().saturating_sub(
        u64::try_from(crate::engine::KNOWN_GUEST_TTL.as_millis()).unwrap_or(u64::MAX),
    );
    let mut targets: BTreeMap<String, ()> = BTreeMap::new();
    for (id, labels) in deps.rollouts.rotation_guests(since).await? {
        if deps.hub.get(&id).is_none() && selector.matches(&labels) {
            targets.insert(id, ());
        }
    }
    for h in deps.hub.list() {
        if selector.matches(&h.labels) {
            targets.insert(h.guest_id.clone(), ());
        }
    }
    let targets: Vec<String> = targets.into_keys().collect();
    let new = NewRollout {
        path: path.to_string(),
        version: chosen.version,
        sha256: chosen.sha256.clone(),
        selector: selector.to_string(),
        max_concurrent,
        max_attempts,
        guest_deadline_ms: guest_deadline_s * 1000,
        deadline_at,
        created_by: admin.actor(),
    };
    let created = deps.rollouts.create_rollout(&new, &targets).await?;
    let id = created.rollout.id;
    let superseded = created.superseded.clone();
    api.ctx
        .audit(
            &admin,
            "rotation.start",
            &path.to_string(),
            "ok",
            format!(
                "rollout {id}: version {} to `{}` ({} targets, max_concurrent {max_concurrent}){}",
                chosen.version,
                new.selector,
                targets.len(),
                if superseded.is_empty() {
                    String::new()
                } else {
                    format!(", supersedes {superseded:?}")
                }
            ),
        )
        .await;
    if api
        .shared
        .commands
        .send(Command::Created { id, superseded })
        .await
        .is_err()
    {
        tracing::warn!(
            rollout = id,
            "rotation reconciler not running; the rollout starts with it"
        );
    }
    let counts = deps.rollouts.target_counts(id).await?;
    Ok((
        StatusCode::CREATED,
        Json(RolloutView::new(created.rollout, counts)),
    ))
}

async fn view(deps: &Deps, id: i64) -> Result<RolloutView, ApiError> {
    let rollout = deps
        .rollouts
        .get_rollout(id)
        .await?
        .ok_or_else(|| ApiError::not_found("RolloutNotFound", format!("no rollout {id}")))?;
    let counts = deps.rollouts.target_counts(id).await?;
    Ok(RolloutView::new(rollout, counts))
}

/// `GET /rollouts/<id>`: counts and a page of targets.
pub async fn get(
    State(api): State<RotationApi>,
    AdminCaller(_admin): AdminCaller,
    Path(id): Path<i64>,
    Query(page): Query<TargetPage>,
) -> Result<Json<RolloutDetail>, ApiError> {
    let view = view(&api.deps, id).await?;
    let limit = page.limit.unwrap_or(TARGET_PAGE).clamp(1, MAX_TARGET_PAGE);
    let targets = api
        .deps
        .rollouts
        .list_targets(id, page.state, page.after.as_deref(), limit)
        .await?;
    let next_after = (targets.len() == limit as usize)
        .then(|| targets.last().map(|t| t.guest_id.clone()))
        .flatten();
    Ok(Json(RolloutDetail {
        view,
        targets,
        next_after,
    }))
}

/// `GET /rollouts`: newest first.
pub async fn list(
    State(api): State<RotationApi>,
    AdminCaller(_admin): AdminCaller,
    Query(q): Query<ListQuery>,
) -> Result<Json<RolloutList>, ApiError> {
    let rollouts = api
        .deps
        .rollouts
        .list_rollouts(&RolloutQuery {
            path: q.path,
            in_force: q.in_force,
            before: q.before,
            limit: q.limit.unwrap_or(50).clamp(1, 500),
        })
        .await?;
    let mut out = Vec::with_capacity(rollouts.len());
    for r in rollouts {
        let counts = api.deps.rollouts.target_counts(r.id).await?;
        out.push(RolloutView::new(r, counts));
    }
    Ok(Json(RolloutList { rollouts: out }))
}

async fn control(
    api: RotationApi,
    admin: AdminIdentity,
    id: i64,
    action: Control,
) -> Result<Json<RolloutView>, ApiError> {
    let (reply, answer) = oneshot::channel();
    let unavailable = || {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "RotationUnavailable",
            "the rotation reconciler is not running",
        )
    };
    api.shared
        .commands
        .send(Command::Control {
            id,
            action,
            actor: admin.actor(),
            reply,
        })
        .await
        .map_err(|_| unavailable())?;
    let result = tokio::time::timeout(Duration::from_secs(30), answer)
        .await
        .map_err(|_| unavailable())?
        .map_err(|_| unavailable())?;
    let verb = format!("rotation.{}", action.as_str());
    match result {
        Ok(rec) => {
            api.ctx
                .audit(
                    &admin,
                    &verb,
                    &format!("rollout {id}"),
                    "ok",
                    format!("{} now {}", rec.path, rec.state),
                )
                .await;
            Ok(Json(view(&api.deps, id).await?))
        }
        Err(e) => {
            api.ctx
                .audit(
                    &admin,
                    &verb,
                    &format!("rollout {id}"),
                    "refused",
                    e.to_string(),
                )
                .await;
            Err(match e {
                ControlError::NotFound(_) => ApiError::not_found("RolloutNotFound", e.to_string()),
                ControlError::Finished(..) => {
                    ApiError::new(StatusCode::CONFLICT, "RolloutFinished", e.to_string())
                }
                ControlError::Store(s) => ApiError::internal("rotation storage", s),
                // Nothing wrong with the request: the database is out of reach, retry.
                ControlError::Unavailable(_) => ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "StorageUnavailable",
                    "storage is unavailable; retry later",
                ),
            })
        }
    }
}

/// `POST /rollouts/<id>/pause`.
pub async fn pause(
    State(api): State<RotationApi>,
    AdminCaller(admin): AdminCaller,
    Path(id): Path<i64>,
) -> Result<Json<RolloutView>, ApiError> {
    control(api, admin, id, Control::Pause).await
}

/// `POST /rollouts/<id>/resume`.
pub async fn resume(
    State(api): State<RotationApi>,
    AdminCaller(admin): AdminCaller,
    Path(id): Path<i64>,
) -> Result<Json<RolloutView>, ApiError> {
    control(api, admin, id, Control::Resume).await
}

/// `POST /rollouts/<id>/cancel`.
pub async fn cancel(
    State(api): State<RotationApi>,
    AdminCaller(admin): AdminCaller,
    Path(id): Path<i64>,
) -> Result<Json<RolloutView>, ApiError> {
    control(api, admin, id, Control::Cancel).await
}

/// Most concurrent event streams.
pub const MAX_STREAMS: usize = 64;

/// `GET /rollouts/<id>/events`: a `snapshot` event (the rollout and its counts), then
/// `change` events ([`RolloutEvent`](crate::engine::RolloutEvent)): one per change, except that changes queued while the
/// stream was writing are folded into the newest of them (counts are cumulative; its
/// `target` is the last target that changed); a fresh `snapshot` after the stream fell
/// behind the channel, or an `error` event (`ReadBackFailed`) when that read failed, after
/// which the stream goes on; it ends after the rollout leaves force, or with an `error`
/// event (`StreamClosed`) when the server shuts down (see [`follow`]).
pub async fn events(
    State(api): State<RotationApi>,
    AdminCaller(_admin): AdminCaller,
    Path(id): Path<i64>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let permit = api
        .shared
        .streams
        .clone()
        .try_acquire_owned()
        .map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "TooManyStreams",
                format!("at most {MAX_STREAMS} rollout event streams at once"),
            )
        })?;
    // Subscribe before the snapshot, so no change in between is lost.
    let rx = api.shared.events.subscribe();
    let first = view(&api.deps, id).await?;
    let deps = api.deps.clone();
    let read_back = move || {
        let deps = deps.clone();
        async move { view(&deps, id).await }
    };
    let stream = follow::follow(rx, id, first, read_back).map(move |update| {
        // The permit goes with the stream.
        let _held = &permit;
        Ok(update_event(&update))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// An update as a server-sent event: `snapshot`, `change`, or `error` (`{"type", "detail"}`
/// like an API error's body).
fn update_event(update: &Update) -> Event {
    let event = match update {
        Update::Snapshot(v) => Event::default().event("snapshot").json_data(v),
        Update::Change(ev) => Event::default().event("change").json_data(&**ev),
        Update::Error { name, detail } => Event::default()
            .event("error")
            .json_data(serde_json::json!({ "type": name, "detail": detail })),
    };
    event.unwrap_or_else(|_| Event::default().comment("unserialisable"))
}
