//! The event log's write side: [`EventSink`] hands events to a bounded channel and never
//! waits (a full channel drops the event and counts it in `kbs_events_dropped_total`); one
//! writer task appends them to storage in batches. Sources: tunnel connects/disconnects (the
//! fleet tracker), and every audited admin action, policy change and rollout action
//! ([`crate::audit::Audit`] emits one event per audit record).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::metrics::ObservabilityMetrics;
use crate::storage::{EventStore, NewEvent, now_ms};

/// Events queued for the writer before new ones are dropped.
pub const EVENT_QUEUE: usize = 16 * 1024;
/// Most events appended in one transaction.
pub const EVENT_BATCH: usize = 512;
/// Events kept in the log; older ones are pruned as new ones arrive.
pub const EVENT_RETENTION: u64 = 1_000_000;
/// Prune after this many events written.
const PRUNE_EVERY: u64 = 10_000;

mod writer;

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

/// Kinds of events.
pub const KINDS: &[&str] = &[
    "connect",
    "disconnect",
    "admin",
    "policy",
    "rollout",
    "probe",
];

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
        store: Arc<dyn EventStore>,
        metrics: ObservabilityMetrics,
        stop: CancellationToken,
    ) -> Option<JoinHandle<()>> {
        let rx = self.rx.lock().ok()?.take()?;
        Some(tokio::spawn(writer::run(rx, store, metrics, stop)))
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
