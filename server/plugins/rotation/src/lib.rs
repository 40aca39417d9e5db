//! Key rotation (the `rotation` server-request plugin): an admin starts a rollout of a
//! resource version over a label selector; the reconciler ([`engine`]) pushes it, sealed to
//! each guest's TEE key and allowed by the resource policy on the guest's own claims, to
//! every matching guest (now, or when it reconnects), records each ack durably, retries with
//! backoff, and resumes after a restart. See [`api`] for the HTTP surface.

pub mod api;
mod config;
pub mod deliver;
pub mod engine;
mod follow;
mod metrics;
mod version_check;
mod view;
mod writer;

use std::sync::Arc;

use async_trait::async_trait;
use axum::routing::{get, post};
use kbs_core::fleet::Fleet;
use kbs_core::guest_directory::GuestDirectory;
use kbs_core::policy_gate::PolicyGate;
use kbs_core::storage::{ChangeFeed, ResourceStore, RolloutStore};
use kbs_web::plugin::{Plugin, PluginContext, PluginKind, PluginSetup, PluginSetupError};
use tokio::sync::{Mutex, Semaphore, broadcast, mpsc};
use tokio_util::sync::CancellationToken;

pub use api::{RolloutDetail, RolloutList, RolloutView, StartRollout};
pub use config::RotationConfig;
pub use engine::{Control, RolloutEvent};
pub use metrics::RotationMetrics;

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

/// Plugin name (URL segment).
pub const NAME: &str = "rotation";

/// What the rotation plugin is granted beyond its context.
#[derive(Clone)]
pub struct Grants {
    /// Rollouts and their targets.
    pub rollouts: Arc<dyn RolloutStore>,
    /// The versions it delivers.
    pub resources: Arc<dyn ResourceStore>,
    /// The fleet view, told which version each guest acknowledged.
    pub fleet: Arc<Fleet>,
    /// The resource policy: a push is allowed exactly when the guest could fetch the
    /// resource itself (asked as the `resource` plugin).
    pub policy: PolicyGate,
    /// Rollouts other replicas created or changed (a shared database announces them).
    pub changes: ChangeFeed,
}

/// Everything the reconciler and a delivery work with: the grants, the hub and the guest
/// directory of the plugin's context, and the plugin's metrics. Narrow on purpose: the
/// engine's unit tests build it from an in-memory store and a hub of their own.
#[derive(Clone)]
pub struct Deps {
    /// Rollouts and their targets.
    pub rollouts: Arc<dyn RolloutStore>,
    /// The versions delivered.
    pub resources: Arc<dyn ResourceStore>,
    /// The fleet view.
    pub fleet: Arc<Fleet>,
    /// The resource policy.
    pub policy: PolicyGate,
    /// Live tunnels.
    pub hub: tunnel::Hub,
    /// Claims and TEE keys of connected guests.
    pub directory: Arc<GuestDirectory>,
    /// The plugin's metrics.
    pub metrics: RotationMetrics,
    /// Rollouts other replicas created or changed.
    pub changes: ChangeFeed,
    /// Whether other replicas share the rollouts (`RolloutStore::shared`): counts and
    /// completion then come from the store, see `engine`.
    pub shared: bool,
}

/// The `rotation` plugin.
pub struct RotationPlugin {
    shared: Arc<Shared>,
    grants: Grants,
    metrics: RotationMetrics,
    config: RotationConfig,
}

impl RotationPlugin {
    /// A plugin whose reconciler runs while it is enabled; registers its metrics.
    pub fn build(setup: &mut PluginSetup<'_>, grants: Grants) -> Result<Self, PluginSetupError> {
        let config: RotationConfig = setup.config()?;
        config
            .validate()
            .map_err(|(key, reason)| setup.invalid(key, reason))?;
        let metrics = RotationMetrics::register(setup.metrics());
        Ok(Self::new(grants, metrics).with_config(config))
    }

    /// With `config` (validated) instead of the defaults.
    pub fn with_config(mut self, config: RotationConfig) -> Self {
        self.config = config;
        self
    }

    /// A plugin over `grants`, counting into `metrics`.
    pub fn new(grants: Grants, metrics: RotationMetrics) -> Self {
        let (commands, receiver) = mpsc::channel(COMMAND_QUEUE);
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        Self {
            shared: Arc::new(Shared {
                commands,
                receiver: Mutex::new(receiver),
                events,
                streams: Arc::new(Semaphore::new(api::MAX_STREAMS)),
            }),
            grants,
            metrics,
            config: RotationConfig::default(),
        }
    }

    fn deps(&self, ctx: &PluginContext) -> Deps {
        Deps {
            rollouts: self.grants.rollouts.clone(),
            resources: self.grants.resources.clone(),
            fleet: self.grants.fleet.clone(),
            policy: self.grants.policy.clone(),
            hub: ctx.hub().clone(),
            directory: ctx.guest_directory().clone(),
            metrics: self.metrics.clone(),
            changes: self.grants.changes.clone(),
            shared: self.grants.rollouts.shared(),
        }
    }
}

#[async_trait]
impl Plugin for RotationPlugin {
    fn name(&self) -> &'static str {
        NAME
    }

    fn kind(&self) -> PluginKind {
        PluginKind::ServerRequest
    }

    fn kinds(&self) -> Vec<PluginKind> {
        vec![PluginKind::ServerRequest, PluginKind::Admin]
    }

    fn routes(&self, ctx: PluginContext) -> axum::Router {
        let api = api::RotationApi {
            deps: self.deps(&ctx),
            ctx,
            shared: self.shared.clone(),
            default_deadline: self.config.default_deadline,
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
        let notices = tokio::spawn(follow_resource_notices(
            ctx.clone(),
            self.shared.commands.clone(),
            stop.clone(),
        ));
        engine::run(
            self.deps(&ctx),
            self.shared.events.clone(),
            &mut commands,
            stop,
        )
        .await;
        notices.abort();
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

/// A deleted resource cancels its rollouts: the reconciler is told, and each rollout it
/// cancels is audited under the name of the admin who deleted the resource. A lagging
/// subscriber misses notices; the delivery-time check (`deliver`) still refuses to push an
/// erased version.
async fn follow_resource_notices(
    ctx: PluginContext,
    commands: mpsc::Sender<Command>,
    stop: CancellationToken,
) {
    use kbs_core::notices::ResourceNotice;
    use tokio::sync::broadcast::error::RecvError;

    let mut notices = ctx.resource_notices();
    loop {
        let notice = tokio::select! {
            () = stop.cancelled() => return,
            n = notices.recv() => n,
        };
        let (path, by) = match notice {
            Ok(ResourceNotice::Deleted { path, by }) => (path, by),
            Err(RecvError::Lagged(n)) => {
                tracing::warn!(
                    missed = n,
                    "rotation: resource notices missed; deliveries still check each version"
                );
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        let (reply, cancelled) = tokio::sync::oneshot::channel();
        let detail = format!("resource {path} deleted by {}", by.name);
        let cmd = Command::ResourceDeleted {
            path: path.clone(),
            detail: detail.clone(),
            reply,
        };
        if commands.send(cmd).await.is_err() {
            return;
        }
        let Ok(cancelled) = cancelled.await else {
            continue;
        };
        for id in cancelled {
            ctx.audit_for(
                &by,
                "rotation.cancel",
                &format!("rollout {id}"),
                "ok",
                detail.clone(),
            )
            .await;
        }
    }
}

#[cfg(test)]
mod layering_tests {
    #[test]
    fn modules_do_not_import_each_other_in_a_circle() {
        layering::assert_no_module_cycles(env!("CARGO_MANIFEST_DIR"));
    }
}
