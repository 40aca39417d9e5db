//! The fleet view: every guest the KBS has known, connected or not, with its identity,
//! labels, TEE, attestation and token times, recent connections, last probe and the
//! resource versions it holds. Kept in an in-memory index (a `BTreeMap` by guest id, so a
//! page is a range scan from the cursor) fed by hub events and probes, written behind to
//! storage ([`crate::storage::FleetStore`]) by a flusher task, and loaded back at start.
//! Guests gone for longer than [`Retention::forget_after`] are forgotten (`retention`).

mod index;
mod record;
mod retention;
mod tracker;

pub use index::Fleet;
pub use record::{
    ConnectionRecord, FleetPage, FleetQuery, GuestRecord, HISTORY_LEN, HeldVersion, LastProbe,
    MAX_PAGE, close_reason,
};
pub use retention::{FORGET_PER_SWEEP, Retention, SCAN_PER_SWEEP, spawn_forgetter, sweep};
pub use tracker::{Observability, ObservabilityParts, spawn_flusher, spawn_tracker};
