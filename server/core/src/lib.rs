//! The KBS core: everything Tether knows and decides, with no HTTP in it.
//!
//! Identity and claims, resource paths, label selectors, JWE, attestation tokens, RCAR and
//! its verifiers (sample, TDX, SNP), the appraisal of evidence, passport tokens of external
//! attestation services, the policy gate, storage (traits and the SQLite store), the guest
//! directory, the fleet view, the event log, audit, probes of guests and the core metrics.
//! Nothing here names an HTTP framework type: the web layer (`kbs-web`) and the plugins sit
//! on top, and the composition root (`server`) wires them (see `docs/architecture.md`).

pub mod admin_key;
pub mod appraisal;
pub mod attest;
pub mod audit;
pub mod claims;
pub mod events;
pub mod fleet;
pub mod fsutil;
pub mod guest_directory;
pub mod guest_push;
pub mod identity;
pub mod init_data;
pub mod jwe;
pub mod key_algorithm;
pub mod metrics;
pub mod notices;
pub mod policy;
pub mod policy_gate;
pub mod probe;
pub mod resource_path;
pub mod selector;
pub mod storage;
pub mod token;
pub mod tunnel_metrics;
pub mod verifiers;

#[cfg(test)]
mod layering_tests {
    #[test]
    fn modules_do_not_import_each_other_in_a_circle() {
        layering::assert_no_module_cycles(env!("CARGO_MANIFEST_DIR"));
    }
}
