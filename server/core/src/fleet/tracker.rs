//! The fleet's background tasks: the tracker that follows the hub, the flusher that writes
//! changed records, the forgetter that drops guests gone too long, and the event writer,
//! started and stopped together.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tunnel::{Hub, TunnelEvent};

use super::index::Fleet;
use super::record::close_reason;
use super::retention::{Retention, spawn_forgetter};
use crate::events::EventSink;
use crate::guest_directory::GuestDirectory;
use crate::metrics::ObservabilityMetrics;
use crate::storage::{EventStore, FleetStore};

/// Follow the hub: connects and disconnects update the index and go to the event log.
/// Subscribes before returning, so nothing registered afterwards is missed.
pub fn spawn_tracker(
    fleet: Arc<Fleet>,
    hub: Hub,
    directory: Arc<GuestDirectory>,
    events: EventSink,
    stop: CancellationToken,
) -> JoinHandle<()> {
    let mut rx = hub.subscribe();
    tokio::spawn(async move {
        loop {
            let ev = tokio::select! {
                ev = rx.recv() => ev,
                () = stop.cancelled() => {
                    // Record what the hub said before the stop (drain disconnects).
                    while let Ok(ev) = rx.try_recv() {
                        track(&fleet, &hub, &directory, &events, Ok(ev));
                    }
                    break;
                }
            };
            if !track(&fleet, &hub, &directory, &events, ev) {
                break;
            }
        }
    })
}

/// Apply one hub event; false once the hub is gone.
fn track(
    fleet: &Fleet,
    hub: &Hub,
    directory: &GuestDirectory,
    events: &EventSink,
    ev: Result<TunnelEvent, RecvError>,
) -> bool {
    {
        {
            match ev {
                Ok(TunnelEvent::Connected(h)) => {
                    fleet.on_connect(&h, directory.get(&h.guest_id).as_deref());
                    events.record(
                        "connect",
                        "tunnel.connect",
                        Some(&h.guest_id),
                        None,
                        &h.guest_id,
                        "ok",
                        format!("session {} daemon {}", h.session_id, h.daemon_version),
                    );
                }
                Ok(TunnelEvent::Disconnected {
                    guest_id,
                    epoch,
                    code,
                }) => {
                    let live = hub.get(&guest_id).is_some_and(|h| h.epoch != epoch);
                    fleet.on_disconnect(&guest_id, epoch, code, live);
                    events.record(
                        "disconnect",
                        "tunnel.disconnect",
                        Some(&guest_id),
                        None,
                        &guest_id,
                        &close_reason(code),
                        format!("close code {code}"),
                    );
                }
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(lost = n, "fleet tracker fell behind the hub; resyncing");
                    events.count_dropped(n);
                    fleet.ensure_live(&hub.list(), directory);
                }
                Err(RecvError::Closed) => return false,
            }
        }
    }
    true
}

/// The observability background tasks of a running KBS.
pub struct Observability {
    stop_tracker: CancellationToken,
    stop_rest: CancellationToken,
    tracker: JoinHandle<()>,
    rest: Vec<JoinHandle<()>>,
}

/// What the observability tasks work on.
pub struct ObservabilityParts {
    /// The fleet index.
    pub fleet: Arc<Fleet>,
    /// Live tunnels.
    pub hub: Hub,
    /// Token facts of connected guests.
    pub directory: Arc<GuestDirectory>,
    /// The event log's write side.
    pub events: EventSink,
    /// Where events go.
    pub event_store: Arc<dyn EventStore>,
    /// Where fleet records go.
    pub fleet_store: Arc<dyn FleetStore>,
    /// Their metrics.
    pub metrics: ObservabilityMetrics,
    /// How long guests that are gone are kept.
    pub retention: Retention,
}

impl Observability {
    /// Start the event writer, the fleet tracker, the fleet flusher and the forgetter.
    pub fn spawn(parts: ObservabilityParts) -> Self {
        let stop_tracker = CancellationToken::new();
        let stop_rest = CancellationToken::new();
        let tracker = spawn_tracker(
            parts.fleet.clone(),
            parts.hub.clone(),
            parts.directory,
            parts.events.clone(),
            stop_tracker.clone(),
        );
        let mut rest = Vec::new();
        if let Some(w) =
            parts
                .events
                .spawn_writer(parts.event_store, parts.metrics.clone(), stop_rest.clone())
        {
            rest.push(w);
        }
        rest.push(spawn_forgetter(
            parts.fleet.clone(),
            parts.fleet_store.clone(),
            parts.hub,
            parts.retention,
            parts.metrics.clone(),
            stop_rest.clone(),
        ));
        rest.push(spawn_flusher(
            parts.fleet,
            parts.fleet_store,
            parts.metrics,
            Duration::from_secs(1),
            stop_rest.clone(),
        ));
        Self {
            stop_tracker,
            stop_rest,
            tracker,
            rest,
        }
    }

    /// Stop: the tracker records what the hub reported, then events and fleet records are
    /// written one last time.
    pub async fn finish(self) {
        self.stop_tracker.cancel();
        let _ = self.tracker.await;
        self.stop_rest.cancel();
        for t in self.rest {
            let _ = t.await;
        }
    }
}

/// Write changed fleet records every `every`, and once more on `stop`.
pub fn spawn_flusher(
    fleet: Arc<Fleet>,
    store: Arc<dyn FleetStore>,
    metrics: ObservabilityMetrics,
    every: Duration,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => fleet.flush(store.as_ref(), &metrics).await,
                () = stop.cancelled() => {
                    fleet.flush(store.as_ref(), &metrics).await;
                    break;
                }
            }
        }
    })
}
