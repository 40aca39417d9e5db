//! [`TargetWriter`]: group commit of target rows. Every delivery hands its row here; rows
//! queued together are written in one transaction, and a caller that waits is answered only
//! once its row is stored (an ack is durable before the engine moves on).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::storage::{Store, TargetRecord};

/// Rows written per transaction at most.
const BATCH: usize = 2048;
/// Rows waiting to be written before writers wait.
const QUEUE: usize = 16 * 1024;

struct Write {
    row: TargetRecord,
    done: Option<oneshot::Sender<Result<(), String>>>,
}

/// The sending side; cheap to clone.
#[derive(Clone)]
pub struct TargetWriter {
    tx: mpsc::Sender<Write>,
}

impl TargetWriter {
    /// Starts the writer task over `store`; it ends when every sender is dropped.
    pub fn spawn(store: Arc<dyn Store>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(store, rx));
        Self { tx }
    }

    /// Queues `row` and waits until it is stored.
    pub async fn write(&self, row: TargetRecord) -> Result<(), String> {
        let (done, stored) = oneshot::channel();
        self.tx
            .send(Write {
                row,
                done: Some(done),
            })
            .await
            .map_err(|_| "target writer stopped".to_string())?;
        stored
            .await
            .map_err(|_| "target writer stopped".to_string())?
    }

    /// Queues `row` without waiting for it to be stored (intermediate states).
    pub async fn write_behind(&self, row: TargetRecord) {
        let _ = self.tx.send(Write { row, done: None }).await;
    }
}

async fn run(store: Arc<dyn Store>, mut rx: mpsc::Receiver<Write>) {
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        let rows: Vec<TargetRecord> = batch.iter().map(|w| w.row.clone()).collect();
        let mut result = store.write_targets(&rows).await;
        if let Err(e) = &result {
            tracing::warn!(error = %e, rows = rows.len(), "writing rollout targets failed; retrying once");
            tokio::time::sleep(Duration::from_millis(200)).await;
            result = store.write_targets(&rows).await;
        }
        let result = result.map_err(|e| {
            tracing::error!(error = %e, rows = rows.len(), "ROLLOUT TARGET WRITE FAILED");
            e.to_string()
        });
        for w in batch.drain(..) {
            if let Some(done) = w.done {
                let _ = done.send(result.clone());
            }
        }
    }
}
