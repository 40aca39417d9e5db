//! `GET /kbs/v0/admin/events`: the event log, newest first, filtered and paged.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Query, State};
use kbs_core::events::{EventSink, KINDS};
use kbs_core::metrics::ObservabilityMetrics;
use kbs_core::storage::{EventQuery, EventStore};
use kbs_web::error::ApiError;
use kbs_web::extract::AdminCaller;
use serde_json::{Value, json};

/// What the event log endpoint uses.
#[derive(Clone)]
pub struct EventLog {
    /// The write side (flushed before reading, so a caller sees what it just caused).
    pub sink: EventSink,
    /// Where events are stored.
    pub store: Arc<dyn EventStore>,
    /// Storage latency.
    pub metrics: ObservabilityMetrics,
}

/// Query of `GET /kbs/v0/admin/events`.
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventParams {
    /// Comma-separated kinds (`connect,disconnect,admin,policy,rollout,probe`).
    pub kind: Option<String>,
    /// Only this guest.
    pub guest_id: Option<String>,
    /// Only this actor (`subject@key`).
    pub actor: Option<String>,
    /// Only events at or after this Unix ms.
    pub since: Option<u64>,
    /// Only events with a smaller id (the previous page's `next_before`).
    pub before: Option<i64>,
    /// Page size (default 100, at most 1000).
    pub limit: Option<u32>,
}

/// `GET /kbs/v0/admin/events?kind=&guest_id=&actor=&since=&before=&limit=`: newest first,
/// `{"events": [...], "next_before": id|null}`. Waits briefly for queued events first, so
/// a caller sees what it just caused.
pub async fn list(
    State(log): State<EventLog>,
    AdminCaller(_admin): AdminCaller,
    Query(p): Query<EventParams>,
) -> Result<Json<Value>, ApiError> {
    let kinds: Vec<String> = p
        .kind
        .as_deref()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(str::to_string)
        .collect();
    if let Some(bad) = kinds.iter().find(|k| !KINDS.contains(&k.as_str())) {
        return Err(ApiError::bad_request(
            "MalformedRequest",
            format!("unknown event kind {bad:?} (known: {})", KINDS.join(", ")),
        ));
    }
    let q = EventQuery {
        kinds,
        guest_id: p.guest_id,
        actor: p.actor,
        since: p.since,
        before: p.before,
        limit: p.limit.unwrap_or(100).clamp(1, 1000),
    };
    log.sink.flush(Duration::from_secs(2)).await;
    let started = Instant::now();
    let events = log.store.list_events(&q).await?;
    log.metrics.storage("list_events", started);
    let next = events
        .last()
        .map(|r| r.id)
        .filter(|_| events.len() == q.limit as usize);
    Ok(Json(json!({"events": events, "next_before": next})))
}
