//! Tether KBS: a Trustee-compatible Key Broker Service that can call back into its guests.
//!
//! This crate is the top of the stack (`docs/architecture.md`): the configuration, the
//! core's HTTP endpoints, the dashboard, the accept loop, the composition root ([`app`])
//! that wires `kbs-core`, `kbs-web` and the plugins together, and the admin client that
//! `kbsctl` and the tests use.

pub mod admin_client;
pub mod app;
pub mod attestation;
pub mod cluster;
pub mod config;
pub mod dashboard;
pub mod evidence;
pub mod follow;
pub mod http;
pub mod serve;
pub mod tls;

#[cfg(test)]
mod layering_tests {
    #[test]
    fn modules_do_not_import_each_other_in_a_circle() {
        layering::assert_no_module_cycles(env!("CARGO_MANIFEST_DIR"));
    }

    #[test]
    fn nothing_imports_the_composition_root() {
        layering::assert_nobody_imports(env!("CARGO_MANIFEST_DIR"), "app");
    }
}
