//! Following other replicas. When several KBS replicas share one database, an admin write
//! lands on one of them; the others learn of it from the store's change feed
//! ([`kbs_core::storage::Change`]) and put the stored state in force here: the resource
//! policy, the appraisal policy and reference values, and which plugins are enabled. Each
//! reload reads the database, so a change announced twice, or one this replica made itself,
//! costs a read and changes nothing. See `docs/architecture.md`, "Several replicas".

use std::sync::Arc;

use kbs_core::storage::{Change, ChangeFeed};
use kbs_web::plugin::PluginRegistry;
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::attestation::{APPRAISAL_POLICY, reference_map};
use crate::http::appraisal::AppraisalAdmin;
use crate::http::policy::{PolicyAdmin, RESOURCE_POLICY};

/// The in-memory state a change can touch.
#[derive(Clone)]
pub struct Followers {
    /// The resource policy in force.
    pub policy: PolicyAdmin,
    /// The appraisal policy and reference values in force.
    pub appraisal: AppraisalAdmin,
    /// Which plugins run.
    pub plugins: Arc<PluginRegistry>,
}

/// Follows `feed` until `shutdown`.
pub fn spawn(
    feed: &ChangeFeed,
    followers: Followers,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    let mut changes = feed.subscribe();
    tokio::spawn(async move {
        loop {
            let change = tokio::select! {
                _ = shutdown.cancelled() => return,
                next = changes.recv() => match next {
                    Ok(c) => c,
                    Err(RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "change feed: fell behind; reloading everything");
                        Change::Lost
                    }
                    Err(RecvError::Closed) => return,
                },
            };
            followers.apply(&change).await;
        }
    })
}

impl Followers {
    /// Puts in force what `change` names, as stored now.
    pub async fn apply(&self, change: &Change) {
        match change {
            Change::Policy(name) if name == RESOURCE_POLICY => self.resource_policy().await,
            Change::Policy(name) if name == APPRAISAL_POLICY => self.appraisal_policy().await,
            Change::ReferenceValues => self.reference_values().await,
            Change::PluginState(_) => self.plugin_states().await,
            Change::Lost => {
                self.resource_policy().await;
                self.appraisal_policy().await;
                self.reference_values().await;
                self.plugin_states().await;
            }
            // Resources are read from the database on every GET (no cache on a shared
            // store); rollouts are the rotation plugin's to follow.
            Change::Policy(_) | Change::Resource(_) | Change::Rollout(_) => {}
        }
    }

    async fn resource_policy(&self) {
        // The admin API's lock: a reload never interleaves with a local update.
        let _guard = self.policy.write.lock().await;
        match self.policy.store.get_policy(RESOURCE_POLICY).await {
            Ok(Some(stored)) => {
                let engine = self.policy.gate.engine();
                if engine.source().1 == stored.body {
                    return;
                }
                match engine.set(&stored.body) {
                    Ok(_) => tracing::info!(
                        version = stored.version,
                        by = %stored.created_by,
                        "resource policy: a version stored by another replica is in force"
                    ),
                    Err(e) => tracing::error!(
                        version = stored.version,
                        error = %e,
                        "resource policy: the stored version does not compile here; the previous one stays in force"
                    ),
                }
            }
            // Nothing stored: the initial or built-in policy stays.
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "resource policy: cannot read the stored version")
            }
        }
    }

    async fn appraisal_policy(&self) {
        let _guard = self.appraisal.write.lock().await;
        match self.appraisal.policies.get_policy(APPRAISAL_POLICY).await {
            Ok(Some(stored)) => {
                if self.appraisal.appraiser.source().1 == stored.body {
                    return;
                }
                match self.appraisal.appraiser.set_policy(&stored.body) {
                    Ok(_) => tracing::info!(
                        version = stored.version,
                        by = %stored.created_by,
                        "appraisal policy: a version stored by another replica is in force"
                    ),
                    Err(e) => tracing::error!(
                        version = stored.version,
                        error = %e,
                        "appraisal policy: the stored version does not compile here; the previous one stays in force"
                    ),
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "appraisal policy: cannot read the stored version")
            }
        }
    }

    async fn reference_values(&self) {
        let _guard = self.appraisal.write.lock().await;
        let values = match reference_map(self.appraisal.reference.as_ref()).await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "reference values: cannot read the stored ones");
                return;
            }
        };
        if let Err(e) = self.appraisal.appraiser.set_reference_values(values) {
            tracing::error!(error = %e, "reference values: the stored ones were refused; the previous ones stay in force");
        }
    }

    async fn plugin_states(&self) {
        if let Err(e) = self.plugins.follow_stored().await {
            tracing::warn!(error = %e, "plugins: cannot read the stored states");
        }
    }
}
