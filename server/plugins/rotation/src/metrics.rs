//! The rotation plugin's metric families, registered in its own scope
//! (`kbs_rotation_...`).

use kbs_core::metrics::{Labels, latency_histogram};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Rollouts by state, pushes by outcome, delivery latency.
#[derive(Clone, Debug)]
pub struct RotationMetrics {
    /// Rollouts in force by state (`running`, `completed`, `paused`).
    pub rollouts: Family<Labels, Gauge>,
    /// Rollout state changes by the state entered.
    pub rollout_transitions: Family<Labels, Counter>,
    /// Pushes by outcome (`acked`, `already_held`, `denied`, `failed`, `retry`, `disconnected`).
    pub pushes: Family<Labels, Counter>,
    /// Time from dispatching a push to its ack being stored, seconds.
    pub delivery: Histogram,
    /// Guests whose sighting the reconciler remembers having stored (bounded by the live
    /// tunnels: a guest that disconnected is forgotten at the next reconcile pass).
    pub noted_guests: Gauge,
}

impl Default for RotationMetrics {
    /// Families registered nowhere (unit tests).
    fn default() -> Self {
        Self::register(&mut Registry::default())
    }
}

impl RotationMetrics {
    /// Create the families and register them in `registry` (the plugin's scope).
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            rollouts: Family::default(),
            rollout_transitions: Family::default(),
            pushes: Family::default(),
            delivery: latency_histogram(),
            noted_guests: Gauge::default(),
        };
        registry.register(
            "rollouts",
            "Rotation rollouts in force, by state",
            m.rollouts.clone(),
        );
        registry.register(
            "rollout_transitions",
            "Rotation rollout state changes, by the state entered",
            m.rollout_transitions.clone(),
        );
        registry.register(
            "pushes",
            "Rotation pushes to guests, by outcome",
            m.pushes.clone(),
        );
        registry.register(
            "delivery_seconds",
            "Rotation delivery latency: push dispatched to ack stored",
            m.delivery.clone(),
        );
        registry.register(
            "noted_guests",
            "Connected guests whose sighting the rotation reconciler has stored",
            m.noted_guests.clone(),
        );
        m
    }

    /// Count one push outcome.
    pub fn push(&self, outcome: &str) {
        self.pushes
            .get_or_create(&vec![("outcome", outcome.to_string())])
            .inc();
    }

    /// Count one state change.
    pub fn transition(&self, state: &str) {
        self.rollout_transitions
            .get_or_create(&vec![("state", state.to_string())])
            .inc();
    }
}
