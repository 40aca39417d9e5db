//! The core's HTTP endpoints (the plugins mount their own). Each handler declares the part
//! of the state it uses (`State<GuestsApi>`, `State<Arc<RcarService>>`, ...); the
//! composition root (`crate::app`) builds those parts and the router.

pub mod appraisal;
pub mod audit;
pub mod events;
pub mod guests;
pub mod health;
pub mod policy;
pub mod rcar;
pub mod resources;
pub mod tunnel;
