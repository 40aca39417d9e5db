//! The event log's write side: [`EventSink`] hands events to a bounded channel and never
//! waits (a full channel drops the event and counts it in `kbs_events_dropped_total`); one
//! writer task appends them to storage in batches. Sources: tunnel connects/disconnects (the
//! fleet tracker), and every audited admin action, policy change and rollout action
//! ([`crate::app::AppState::audit`] emits one event per audit record).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::metrics::Labels;
use crate::storage::{NewEvent, Store, now_ms};

/// Events queued for the writer before new ones are dropped.
pub const EVENT_QUEUE: usize = 16 * 1024;
/// Most events appended in one transaction.
pub const EVENT_BATCH: usize = 512;
/// Events kept in the log; older ones are pruned as new ones arrive.
pub const EVENT_RETENTION: u64 = 1_000_000;
/// Prune after this many events written.
const PRUNE_EVERY: u64 = 10_000;

fn storage_histogram() -> Histogram {
    // 50 us .. ~1.6 s
    Histogram::new(exponential_buckets(0.00005, 2.0, 16))
}

fn probe_histogram() -> Histogram {
    // 1 ms .. ~65 s
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// Observability metrics (events, fleet, probes, storage latency), registered in the KBS
/// registry by [`crate::metrics::Metrics::new`].
#[derive(Clone)]
pub struct ObservabilityMetrics {
    /// Events appended to the log, by kind.
    pub events_written: Family<Labels, Counter>,
    /// Events dropped because the writer fell behind (or storage failed).
    pub events_dropped: Counter,
    /// Guests the fleet view knows (connected or not).
    pub fleet_guests: Gauge,
    /// Probes by kind and outcome.
    pub probes: Family<Labels, Counter>,
    /// Probe latency by kind.
    pub probe_duration: Family<Labels, Histogram, fn() -> Histogram>,
    /// Storage call latency by operation.
    pub storage_duration: Family<Labels, Histogram, fn() -> Histogram>,
}

impl ObservabilityMetrics {
    /// Create and register in `registry` (prefix `kbs_` comes from the registry).
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            events_written: Family::default(),
            events_dropped: Counter::default(),
            fleet_guests: Gauge::default(),
            probes: Family::default(),
            probe_duration: Family::new_with_constructor(probe_histogram as fn() -> Histogram),
            storage_duration: Family::new_with_constructor(storage_histogram as fn() -> Histogram),
        };
        registry.register(
            "events_written",
            "Events appended to the event log, by kind",
            m.events_written.clone(),
        );
        registry.register(
            "events_dropped",
            "Events dropped because the event writer fell behind or storage failed",
            m.events_dropped.clone(),
        );
        registry.register(
            "fleet_guests_known",
            "Guests the fleet view knows, connected or not",
            m.fleet_guests.clone(),
        );
        registry.register(
            "probes",
            "Guest probes by kind and outcome",
            m.probes.clone(),
        );
        registry.register(
            "probe_duration_seconds",
            "Guest probe latency by kind",
            m.probe_duration.clone(),
        );
        registry.register(
            "storage_operation_duration_seconds",
            "Storage call latency by operation",
            m.storage_duration.clone(),
        );
        m
    }

    /// Record how long a storage operation took.
    pub fn storage(&self, op: &'static str, started: Instant) {
        self.storage_duration
            .get_or_create(&vec![("op", op.to_string())])
            .observe(started.elapsed().as_secs_f64());
    }
}

enum Msg {
    Event(NewEvent),
    Flush(oneshot::Sender<()>),
}

/// Cheap to clone; all clones feed one writer.
#[derive(Clone)]
pub struct EventSink {
    tx: mpsc::Sender<Msg>,
    rx: Arc<Mutex<Option<mpsc::Receiver<Msg>>>>,
    dropped: Counter,
}

impl std::fmt::Debug for EventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSink").finish_non_exhaustive()
    }
}

/// The event kind an audited action belongs to.
pub fn kind_of_action(action: &str) -> &'static str {
    let head = action.split('.').next().unwrap_or(action);
    match head {
        "policy" => "policy",
        "rollout" | "rotation" => "rollout",
        "probe" | "probes" => "probe",
        _ => "admin",
    }
}

impl EventSink {
    /// A sink with room for `capacity` queued events; drops count into `dropped`.
    pub fn new(capacity: usize, dropped: Counter) -> Self {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        Self {
            tx,
            rx: Arc::new(Mutex::new(Some(rx))),
            dropped,
        }
    }

    /// Queue an event; never waits. Returns false (and counts a drop) when the queue is full.
    pub fn emit(&self, event: NewEvent) -> bool {
        let ok = self.tx.try_send(Msg::Event(event)).is_ok();
        if !ok {
            self.dropped.inc();
        }
        ok
    }

    /// Count events lost upstream (a lagging hub subscription).
    pub fn count_dropped(&self, n: u64) {
        self.dropped.inc_by(n);
    }

    /// Queue an event built from parts, stamped now.
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        kind: &str,
        action: &str,
        guest_id: Option<&str>,
        actor: Option<&str>,
        target: &str,
        outcome: &str,
        detail: String,
    ) -> bool {
        self.emit(NewEvent {
            at: now_ms(),
            kind: kind.to_string(),
            action: action.to_string(),
            guest_id: guest_id.map(str::to_string),
            actor: actor.map(str::to_string),
            target: target.to_string(),
            outcome: outcome.to_string(),
            detail,
        })
    }

    /// Waits (at most `timeout`) until every event queued before this call is stored, so a
    /// reader sees its own writes. False on timeout or when no writer runs.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let (done, wait) = oneshot::channel();
        let sent = tokio::time::timeout(timeout, self.tx.send(Msg::Flush(done))).await;
        if !matches!(sent, Ok(Ok(()))) {
            return false;
        }
        matches!(tokio::time::timeout(timeout, wait).await, Ok(Ok(())))
    }

    /// Start the writer (once; later calls return `None`). It stops after `stop` is
    /// cancelled and what was queued by then is written.
    pub fn spawn_writer(
        &self,
        store: Arc<dyn Store>,
        metrics: ObservabilityMetrics,
        stop: CancellationToken,
    ) -> Option<JoinHandle<()>> {
        let rx = self.rx.lock().ok()?.take()?;
        Some(tokio::spawn(writer(rx, store, metrics, stop)))
    }
}

async fn writer(
    mut rx: mpsc::Receiver<Msg>,
    store: Arc<dyn Store>,
    metrics: ObservabilityMetrics,
    stop: CancellationToken,
) {
    let mut msgs = Vec::with_capacity(EVENT_BATCH);
    let mut since_prune = 0u64;
    loop {
        if since_prune >= PRUNE_EVERY {
            since_prune = 0;
            let started = Instant::now();
            match store.prune_events(EVENT_RETENTION).await {
                Ok(n) if n > 0 => tracing::debug!(pruned = n, "old events pruned"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "event pruning failed"),
            }
            metrics.storage("prune_events", started);
        }
        let n = tokio::select! {
            n = rx.recv_many(&mut msgs, EVENT_BATCH) => n,
            () = stop.cancelled() => {
                while msgs.len() < EVENT_BATCH * 8 {
                    match rx.try_recv() {
                        Ok(m) => msgs.push(m),
                        Err(_) => break,
                    }
                }
                write_batch(&mut msgs, store.as_ref(), &metrics).await;
                return;
            }
        };
        if n == 0 {
            return;
        }
        since_prune += n as u64;
        write_batch(&mut msgs, store.as_ref(), &metrics).await;
    }
}

async fn write_batch(msgs: &mut Vec<Msg>, store: &dyn Store, metrics: &ObservabilityMetrics) {
    let mut events = Vec::with_capacity(msgs.len());
    let mut flushes = Vec::new();
    for m in msgs.drain(..) {
        match m {
            Msg::Event(e) => events.push(e),
            Msg::Flush(done) => flushes.push(done),
        }
    }
    if !events.is_empty() {
        let started = Instant::now();
        match store.append_events(&events).await {
            Ok(()) => {
                for e in &events {
                    metrics
                        .events_written
                        .get_or_create(&vec![("kind", e.kind.clone())])
                        .inc();
                }
            }
            Err(e) => {
                metrics.events_dropped.inc_by(events.len() as u64);
                tracing::error!(error = %e, lost = events.len(), "event log write failed");
            }
        }
        metrics.storage("append_events", started);
    }
    for done in flushes {
        let _ = done.send(());
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn actions_map_to_kinds() {
        assert_eq!(kind_of_action("policy.set"), "policy");
        assert_eq!(kind_of_action("rollout.start"), "rollout");
        assert_eq!(kind_of_action("rotation.pause"), "rollout");
        assert_eq!(kind_of_action("resource.put"), "admin");
        assert_eq!(kind_of_action("guest.ping"), "admin");
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_without_waiting() {
        let dropped = Counter::default();
        let sink = EventSink::new(2, dropped.clone());
        for _ in 0..5 {
            sink.record("admin", "x", None, None, "t", "ok", String::new());
        }
        assert_eq!(dropped.get(), 3);
        // No writer: a flush cannot complete.
        assert!(!sink.flush(Duration::from_millis(20)).await);
    }
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

/// Kinds of events.
pub const KINDS: &[&str] = &[
    "connect",
    "disconnect",
    "admin",
    "policy",
    "rollout",
    "probe",
];

/// `GET /kbs/v0/admin/events?kind=&guest_id=&actor=&since=&before=&limit=`: newest first,
/// `{"events": [...], "next_before": id|null}`. Waits briefly for queued events first, so
/// a caller sees what it just caused.
pub async fn list(
    axum::extract::State(state): axum::extract::State<crate::app::AppState>,
    crate::http::AdminCaller(_admin): crate::http::AdminCaller,
    axum::extract::Query(p): axum::extract::Query<EventParams>,
) -> Result<axum::Json<serde_json::Value>, crate::error::ApiError> {
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
        return Err(crate::error::ApiError::bad_request(
            "MalformedRequest",
            format!("unknown event kind {bad:?} (known: {})", KINDS.join(", ")),
        ));
    }
    let q = crate::storage::EventQuery {
        kinds,
        guest_id: p.guest_id,
        actor: p.actor,
        since: p.since,
        before: p.before,
        limit: p.limit.unwrap_or(100).clamp(1, 1000),
    };
    state.events.flush(Duration::from_secs(2)).await;
    let started = Instant::now();
    let events = state.store.list_events(&q).await?;
    state.metrics.observability.storage("list_events", started);
    let next = events
        .last()
        .map(|r| r.id)
        .filter(|_| events.len() == q.limit as usize);
    Ok(axum::Json(
        serde_json::json!({"events": events, "next_before": next}),
    ))
}
