//! What the reconciler is told (commands, admin controls) and what it tells (rollout events).

use std::collections::BTreeMap;
use std::sync::Arc;

use kbs_core::storage::{RolloutRecord, RolloutState, TargetRecord, TargetState};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tunnel::TunnelHandle;

/// A change to a rollout, as the events stream sends it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutEvent {
    /// Rollout id.
    pub rollout_id: i64,
    /// Rollout state after the change.
    pub state: RolloutState,
    /// Target counts by state after the change.
    pub counts: BTreeMap<TargetState, u64>,
    /// The target that changed, if the change is a target's.
    pub target: Option<TargetRecord>,
}

/// An admin control.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// Stop starting pushes.
    Pause,
    /// Start pushing again.
    Resume,
    /// Stop for good.
    Cancel,
}

impl Control {
    /// Verb for audit and URLs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Cancel => "cancel",
        }
    }
}

/// Why a control was refused.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ControlError {
    /// No such rollout.
    #[error("no rollout {0}")]
    NotFound(i64),
    /// The rollout is no longer in force.
    #[error("rollout {0} is {1}; only running, completed or paused rollouts can be controlled")]
    Finished(i64, RolloutState),
    /// Storage failed.
    #[error("storage: {0}")]
    Store(String),
    /// The database is out of reach (the control may succeed later, unchanged).
    #[error("storage unavailable: {0}")]
    Unavailable(String),
}

impl From<kbs_core::storage::StoreError> for ControlError {
    fn from(e: kbs_core::storage::StoreError) -> Self {
        if e.is_unavailable() {
            Self::Unavailable(e.to_string())
        } else {
            Self::Store(e.to_string())
        }
    }
}

/// What the reconciler is told.
pub enum Command {
    /// A rollout was stored (and older ones of its path superseded).
    Created {
        /// The new rollout.
        id: i64,
        /// The rollouts it superseded.
        superseded: Vec<i64>,
    },
    /// Pause, resume or cancel.
    Control {
        /// Rollout id.
        id: i64,
        /// What to do.
        action: Control,
        /// Who (recorded in the rollout's detail).
        actor: String,
        /// The rollout after the change.
        reply: oneshot::Sender<Result<RolloutRecord, ControlError>>,
    },
    /// Every version of `path` was erased: cancel its rollouts.
    ResourceDeleted {
        /// `repo/type/tag`.
        path: String,
        /// Recorded in each cancelled rollout's detail.
        detail: String,
        /// The rollouts cancelled.
        reply: oneshot::Sender<Vec<i64>>,
    },
    /// A guest's tunnel came up.
    Connected(Arc<TunnelHandle>),
    /// Events may have been missed: compare with the hub now.
    Resync,
}
