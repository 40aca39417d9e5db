//! The event log's single writer: appends queued events in batches, answers flushes, prunes
//! the log to its retention.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{EVENT_BATCH, EVENT_RETENTION, Msg, PRUNE_EVERY};
use crate::metrics::ObservabilityMetrics;
use crate::storage::EventStore;

pub(super) async fn run(
    mut rx: mpsc::Receiver<Msg>,
    store: Arc<dyn EventStore>,
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

async fn write_batch(msgs: &mut Vec<Msg>, store: &dyn EventStore, metrics: &ObservabilityMetrics) {
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
