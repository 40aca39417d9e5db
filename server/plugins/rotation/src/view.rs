//! [`RolloutView`]: a rollout with its target counts, as the API answers it and as a follower
//! of its event stream keeps it up to date.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::engine::RolloutEvent;
use kbs_core::storage::{RolloutRecord, RolloutState, TargetState};

/// A rollout with its target counts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutView {
    /// The rollout.
    #[serde(flatten)]
    pub rollout: RolloutRecord,
    /// Targets by state.
    pub counts: BTreeMap<TargetState, u64>,
    /// Targets in all.
    pub total: u64,
    /// Nothing outstanding, or no longer in force.
    pub done: bool,
}

impl RolloutView {
    pub(crate) fn new(rollout: RolloutRecord, counts: BTreeMap<TargetState, u64>) -> Self {
        let mut view = Self {
            rollout,
            counts,
            total: 0,
            done: false,
        };
        view.recount();
        view
    }

    /// The view after `change` (a `change` event of its stream: counts are cumulative).
    pub fn apply(&mut self, change: &RolloutEvent) {
        if change.rollout_id == self.rollout.id {
            self.rollout.state = change.state;
            self.counts.clone_from(&change.counts);
            self.recount();
        }
    }

    /// Targets in `state`.
    pub fn count(&self, state: TargetState) -> u64 {
        self.counts.get(&state).copied().unwrap_or(0)
    }

    /// Targets not yet acked, failed or denied.
    pub fn outstanding(&self) -> u64 {
        self.count(TargetState::Pending) + self.count(TargetState::Delivering)
    }

    fn recount(&mut self) {
        self.total = self.counts.values().sum();
        self.done = !self.rollout.state.in_force()
            || (self.outstanding() == 0 && self.rollout.state != RolloutState::Paused);
    }
}
