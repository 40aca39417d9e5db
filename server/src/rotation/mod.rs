//! Key rotation (the `rotation` server-request plugin): an admin starts a rollout of a
//! resource version over a label selector; the reconciler ([`engine`]) pushes it, sealed to
//! each guest's TEE key and allowed by the resource policy on the guest's own claims, to
//! every matching guest (now, or when it reconnects), records each ack durably, retries with
//! backoff, and resumes after a restart. See [`api`] for the HTTP surface.

pub mod api;
pub mod deliver;
pub mod engine;
mod writer;

use std::sync::Arc;

use async_trait::async_trait;
use axum::routing::{get, post};
use tokio::sync::{Mutex, Semaphore, broadcast, mpsc};
use tokio_util::sync::CancellationToken;

pub use api::{RolloutDetail, RolloutList, RolloutView, StartRollout};
pub use engine::{Control, RolloutEvent};

use crate::app::AppState;
use crate::plugins::{Plugin, PluginContext, PluginKind};

/// Changes a slow events subscriber may fall behind before it gets a fresh snapshot.
const EVENT_CAPACITY: usize = 8192;
/// Commands queued for the reconciler before senders wait.
const COMMAND_QUEUE: usize = 1024;

/// What the HTTP side and the reconciler share.
pub(crate) struct Shared {
    commands: mpsc::Sender<Command>,
    receiver: Mutex<mpsc::Receiver<Command>>,
    events: broadcast::Sender<Arc<RolloutEvent>>,
    streams: Arc<Semaphore>,
}

use engine::Command;

/// The core state behind a plugin context (rotation keeps its own tables in the core store).
pub(crate) fn core(ctx: &PluginContext) -> &AppState {
    ctx.core()
}

/// The `rotation` plugin.
pub struct RotationPlugin {
    shared: Arc<Shared>,
}

impl Default for RotationPlugin {
    fn default() -> Self {
        Self::new()
    }
}

impl RotationPlugin {
    /// A plugin whose reconciler runs while it is enabled.
    pub fn new() -> Self {
        let (commands, receiver) = mpsc::channel(COMMAND_QUEUE);
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        Self {
            shared: Arc::new(Shared {
                commands,
                receiver: Mutex::new(receiver),
                events,
                streams: Arc::new(Semaphore::new(api::MAX_STREAMS)),
            }),
        }
    }
}

#[async_trait]
impl Plugin for RotationPlugin {
    fn name(&self) -> &'static str {
        "rotation"
    }

    fn kind(&self) -> PluginKind {
        PluginKind::ServerRequest
    }

    fn kinds(&self) -> Vec<PluginKind> {
        vec![PluginKind::ServerRequest, PluginKind::Admin]
    }

    fn routes(&self, ctx: PluginContext) -> axum::Router {
        let api = api::RotationApi {
            ctx,
            shared: self.shared.clone(),
        };
        axum::Router::new()
            .route("/rollouts", post(api::start).get(api::list))
            .route("/rollouts/{id}", get(api::get))
            .route("/rollouts/{id}/events", get(api::events))
            .route("/rollouts/{id}/pause", post(api::pause))
            .route("/rollouts/{id}/resume", post(api::resume))
            .route("/rollouts/{id}/cancel", post(api::cancel))
            .with_state(api)
    }

    async fn start(&self, ctx: PluginContext, stop: CancellationToken) {
        // One reconciler at a time: a re-enable waits for the previous one to let go.
        let mut commands = self.shared.receiver.lock().await;
        engine::run(
            core(&ctx).clone(),
            self.shared.events.clone(),
            &mut commands,
            stop,
        )
        .await;
    }

    async fn on_event(&self, _ctx: &PluginContext, event: &tunnel::TunnelEvent) {
        if let tunnel::TunnelEvent::Connected(handle) = event {
            // Never block the event loop: a dropped event is caught by the periodic pass.
            let _ = self
                .shared
                .commands
                .try_send(Command::Connected(handle.clone()));
        }
    }

    async fn resync(&self, _ctx: &PluginContext) {
        let _ = self.shared.commands.try_send(Command::Resync);
    }
}
