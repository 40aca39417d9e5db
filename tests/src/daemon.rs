//! A real guest daemon's `run` loop on a task, driven by a test through its state channel.

use std::path::PathBuf;
use std::time::Duration;

use guest_daemon::run::{DaemonState, RunConfig, RunError};
use guest_daemon::tee_key::TeeKeyPair;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::WAIT;

/// How long a daemon may take to stop once cancelled.
const STOP: Duration = Duration::from_secs(10);

/// A daemon `run` loop in a task.
pub struct DaemonRun {
    /// What the daemon says it is doing.
    pub state: watch::Receiver<DaemonState>,
    /// Its state directory (TEE key, resources, credentials).
    pub state_dir: PathBuf,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), RunError>>,
}

impl DaemonRun {
    /// Starts `guest_daemon::run::run(config)` on a task.
    pub fn spawn(config: RunConfig) -> Self {
        let state = config.subscribe();
        let state_dir = config.state_dir.clone();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(guest_daemon::run::run(config, shutdown.clone()));
        Self {
            state,
            state_dir,
            shutdown,
            task,
        }
    }

    /// Waits (bounded by [`WAIT`]) until a tunnel is up whose session passes `accept`;
    /// returns (session_id, guest_id).
    pub async fn connected_where(&mut self, accept: impl Fn(&str) -> bool) -> (String, String) {
        let state = tokio::time::timeout(
            WAIT,
            self.state.wait_for(
                |s| matches!(s, DaemonState::Connected { session_id, .. } if accept(session_id)),
            ),
        )
        .await
        .expect("daemon connects in time")
        .expect("daemon state channel open")
        .clone();
        match state {
            DaemonState::Connected {
                session_id,
                guest_id,
                ..
            } => (session_id, guest_id),
            other => unreachable!("{other:?}"),
        }
    }

    /// Waits until a tunnel is up; returns (session_id, guest_id).
    pub async fn connected(&mut self) -> (String, String) {
        self.connected_where(|_| true).await
    }

    /// Whether `run` is still running.
    pub fn is_running(&self) -> bool {
        !self.task.is_finished()
    }

    /// What the daemon says it is doing now.
    pub fn current(&self) -> DaemonState {
        self.state.borrow().clone()
    }

    /// Cancels and waits for `run` to return; it must return `Ok` promptly. Returns the last
    /// state.
    pub async fn stop(self) -> DaemonState {
        self.shutdown.cancel();
        tokio::time::timeout(STOP, self.task)
            .await
            .expect("daemon stops in time")
            .expect("daemon task does not panic")
            .expect("daemon ends without error");
        self.state.borrow().clone()
    }

    /// The TEE key the daemon persisted.
    pub fn tee_key(&self) -> TeeKeyPair {
        let pem = std::fs::read_to_string(self.state_dir.join("tee_key.pem")).expect("TEE key");
        TeeKeyPair::from_pem(&pem).expect("TEE key PEM")
    }

    /// The plaintext the daemon holds for resource `path`, if any.
    pub fn held(&self, path: &str) -> Option<Vec<u8>> {
        std::fs::read(self.state_dir.join("resources").join(path)).ok()
    }
}
