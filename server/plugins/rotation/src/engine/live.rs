//! [`Live`]: the reconciler's in-memory view of one rollout in force: its targets, their
//! counts by state, the queue of targets ready for a push, and the version (its plaintext
//! and existence check) while pushes need it.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use crate::deliver::LoadedVersion;
use kbs_core::selector::Selector;
use kbs_core::storage::{RolloutRecord, TargetRecord, TargetState};

use super::RolloutEvent;

pub(super) struct Live {
    pub(super) rec: RolloutRecord,
    pub(super) selector: Selector,
    pub(super) targets: HashMap<String, TargetRecord>,
    pub(super) counts: BTreeMap<TargetState, u64>,
    pub(super) ready: VecDeque<String>,
    pub(super) queued: HashSet<String>,
    /// Guests this process is pushing to now, one push each (a `delivering` row of another
    /// replica, or one left by a replica that died, is not in it and may be pushed again).
    pub(super) flying: HashSet<String>,
    /// With a shared store: the counts of every replica's targets, as last read from it.
    pub(super) fleet: Option<BTreeMap<TargetState, u64>>,
    pub(super) loaded: Option<Arc<LoadedVersion>>,
}

impl Live {
    pub(super) fn new(rec: RolloutRecord, selector: Selector) -> Self {
        Self {
            rec,
            selector,
            targets: HashMap::new(),
            counts: TargetState::ALL.iter().map(|s| (*s, 0)).collect(),
            ready: VecDeque::new(),
            queued: HashSet::new(),
            flying: HashSet::new(),
            fleet: None,
            loaded: None,
        }
    }

    /// Pushes this process has in flight.
    pub(super) fn in_flight(&self) -> usize {
        self.flying.len()
    }

    /// Targets not yet acked, failed or denied: fleet-wide where known, else this process's.
    pub(super) fn outstanding(&self) -> u64 {
        let counts = self.fleet.as_ref().unwrap_or(&self.counts);
        counts.get(&TargetState::Pending).copied().unwrap_or(0)
            + counts.get(&TargetState::Delivering).copied().unwrap_or(0)
    }

    /// Whether `guest_id`'s target may be pushed now: pending (or left `delivering` by a
    /// push that is not this process's) and due.
    pub(super) fn due(&self, guest_id: &str, now: u64) -> bool {
        self.targets.get(guest_id).is_some_and(|t| {
            let open = t.state == TargetState::Pending
                || (t.state == TargetState::Delivering && !self.flying.contains(guest_id));
            open && t.next_attempt_at <= now
        })
    }

    pub(super) fn count(&mut self, from: Option<TargetState>, to: TargetState) {
        if let Some(from) = from
            && let Some(c) = self.counts.get_mut(&from)
        {
            *c = c.saturating_sub(1);
        }
        *self.counts.entry(to).or_insert(0) += 1;
    }

    /// Queues a pending, due target for dispatch (once).
    pub(super) fn queue(&mut self, guest_id: &str, now: u64) {
        if self.due(guest_id, now) && self.queued.insert(guest_id.to_string()) {
            self.ready.push_back(guest_id.to_string());
        }
    }

    pub(super) fn event(&self, target: Option<TargetRecord>) -> Arc<RolloutEvent> {
        Arc::new(RolloutEvent {
            rollout_id: self.rec.id,
            state: self.rec.state,
            counts: self.fleet.as_ref().unwrap_or(&self.counts).clone(),
            target,
        })
    }
}
