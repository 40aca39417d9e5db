//! [`Audit`]: every admin action is counted, logged, appended to the event log and written
//! to the durable audit log. A failed audit write is logged loudly and counted in
//! `kbs_audit_writes_lost_total` (the action itself has already happened and is not undone);
//! while the database is out of reach the entry is dropped at once rather than holding the
//! request for the pool's timeout (the log line remains; the event log's copy is queued like
//! every event, and dropped and counted if storage stays away).

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::events::{EventSink, kind_of_action};
use crate::metrics::Labels;
use crate::storage::{AuditEntry, AuditStore};

/// Who did it: the admin (`subject@key`) and the role their token carried.
#[derive(Clone, Copy, Debug)]
pub struct Actor<'a> {
    /// `subject@key name`.
    pub name: &'a str,
    /// Role name.
    pub role: &'a str,
}

/// What was done, to what, and how it ended.
#[derive(Clone, Debug)]
pub struct AuditRecord<'a> {
    /// `<area>.<verb>`, e.g. `resource.put`, `rollout.start`.
    pub action: &'a str,
    /// What it was done to (a resource path, a guest id, a plugin name).
    pub target: &'a str,
    /// `ok`, `denied`, `error`, or a more specific outcome.
    pub outcome: &'a str,
    /// Free text; never secret material.
    pub detail: String,
}

/// The audit trail. Cheap to clone.
#[derive(Clone)]
pub struct Audit {
    store: Arc<dyn AuditStore>,
    events: EventSink,
    actions: Family<Labels, Counter>,
    lost: Counter,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit").finish_non_exhaustive()
    }
}

impl Audit {
    /// Writes to `store`, mirrors into `events`, counts into `actions`
    /// (`kbs_admin_actions{action,outcome}`).
    pub fn new(
        store: Arc<dyn AuditStore>,
        events: EventSink,
        actions: Family<Labels, Counter>,
    ) -> Self {
        Self {
            store,
            events,
            actions,
            lost: Counter::default(),
        }
    }

    /// Counts audit entries that could not be written into `lost`.
    pub fn counting_lost(mut self, lost: Counter) -> Self {
        self.lost = lost;
        self
    }

    /// Record one action.
    pub async fn record(&self, actor: Actor<'_>, record: AuditRecord<'_>) {
        let AuditRecord {
            action,
            target,
            outcome,
            detail,
        } = record;
        self.actions
            .get_or_create(&vec![
                ("action", action.to_string()),
                ("outcome", outcome.to_string()),
            ])
            .inc();
        tracing::info!(actor = %actor.name, role = %actor.role, action, target, outcome, "admin action");
        self.events.record(
            kind_of_action(action),
            action,
            action.starts_with("guest.").then_some(target),
            Some(actor.name),
            target,
            outcome,
            detail.clone(),
        );
        let entry = AuditEntry {
            actor: actor.name.to_string(),
            role: actor.role.to_string(),
            action: action.to_string(),
            target: target.to_string(),
            outcome: outcome.to_string(),
            detail,
        };
        if let Err(e) = self.store.audit(entry).await {
            self.lost.inc();
            if e.is_unavailable() {
                tracing::warn!(error = %e, action, target, actor = %actor.name, outcome, "audit entry lost: storage out of reach (counted in kbs_audit_writes_lost_total)");
            } else {
                tracing::error!(error = %e, action, target, "AUDIT WRITE FAILED");
            }
        }
    }
}
