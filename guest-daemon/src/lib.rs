//! Tether guest daemon library: RCAR client, TEE key, evidence providers, the
//! `GuestService` implementation and its state store, and the `run` supervisor loop.

pub mod cdh;
pub mod disk_key;
pub mod evidence;
pub mod hook;
pub mod pki;
pub mod rcar;
pub mod resource_path;
pub mod run;
pub mod service;
pub mod splitapi;
pub mod store;
pub mod tee_key;
pub mod tls;

#[cfg(test)]
mod layering_tests {
    #[test]
    fn modules_do_not_import_each_other_in_a_circle() {
        layering::assert_no_module_cycles(env!("CARGO_MANIFEST_DIR"));
    }
}
