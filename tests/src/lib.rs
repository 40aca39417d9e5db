//! The test kit shared by the whole-system tests (`tests/tests/*.rs`) and the load tools
//! (`examples/`): an in-process KBS ([`TestKbs`]), attestation and unseal helpers, a
//! configurable [`GuestService`](rpc_defs::GuestService) stub ([`StubGuest`]), simulated
//! guests on real tunnels ([`TunnelGuest`]), bounded waits ([`eventually`], hub events), a
//! tunnel-only KBS with fake crypto ([`FakeTunnelKbs`]), a fault-injecting relay
//! ([`FaultProxy`]), the real `kbs` binary as a child that can be killed ([`KbsChild`]), the
//! kill -9 fault loop ([`run_fault_loop`]), a wall clock ([`unix_secs`]), and real processes:
//! the `kbs` binary and the upstream-style external plugin ([`spawn_kbs`],
//! [`spawn_upstream_plugin`]), a throwaway PostgreSQL cluster ([`pg_database`]), several
//! `kbs` replicas sharing keys and database ([`Replicas`], [`rcar_across`]) and HAProxy in
//! front of them ([`Haproxy`]).

mod api;
mod attest;
mod clock;
mod crypto;
mod daemon;
mod fake_kbs;
mod fault_loop;
mod fault_proxy;
mod guest;
mod guest_stub;
mod haproxy;
mod kbs;
mod kbs_child;
mod metrics;
mod postgres;
mod process;
mod replicas;
mod rollouts;
mod sim_fleet;
mod skip;
mod wait;
mod x509;

pub use api::{api_err, api_err_detail, error_detail, error_name};
pub use attest::{attest, init_data, rcar_client};
pub use clock::{unix_ms, unix_secs};
pub use crypto::{FAKE_TOKEN_PREFIX, fake_token, fake_unseal, sealed_resource, unseal_with};
pub use daemon::DaemonRun;
pub use fake_kbs::{FakeKbsOptions, FakeTunnelKbs, self_signed_tls};
pub use fault_loop::{FAULT_PATH, FaultLoopConfig, FaultLoopReport, Iteration, run_fault_loop};
pub use fault_proxy::FaultProxy;
pub use guest::{TunnelGuest, guest_info};
pub use guest_stub::{StubGuest, acknowledge, healthy, installed};
pub use haproxy::{HAPROXY_BACKENDS, Haproxy, haproxy_binary, haproxy_cfg};
pub use kbs::{
    ALLOW_SAMPLE, PluginFactory, TestKbs, allow_sample, http_client, init_logging,
    tls_client_config, tunnel_url,
};
pub use kbs_child::KbsChild;
pub use metrics::metric_value;
pub use postgres::{PgCluster, PgDatabase, PgKbsSetup, pg_database, pg_kbs_setup, pg_own_cluster};
pub use process::{
    Spawned, built_binary, credpush_binary, kbs_binary, spawn_credpush, spawn_kbs, spawn_kbs_on,
    spawn_kbs_with, spawn_upstream_plugin, upstream_plugin_binary,
};
pub use replicas::{Replicas, admin_client, rcar_across};
pub use rollouts::{target_count, watch_rollout_until};
pub use sim_fleet::{SimFleet, SimOptions};
pub use skip::skip;
pub use wait::{WAIT, eventually, eventually_within, hub_until, tunnel_of};
pub use x509::{der, sans};

/// Runs a test body (an `async` closure taking a [`TestKbs`]) against a plain-HTTP KBS and a
/// TLS KBS: two tests, `$name::http` and `$name::tls`. With `dev` first, both start with
/// [`allow_sample`] as their policy.
#[macro_export]
macro_rules! http_and_tls {
    (dev $name:ident, $body:expr) => {
        mod $name {
            use super::*;
            #[tokio::test]
            async fn http() {
                ($body)($crate::TestKbs::start_dev().await).await
            }
            #[tokio::test]
            async fn tls() {
                ($body)($crate::TestKbs::start_dev_tls().await).await
            }
        }
    };
    ($name:ident, $body:expr) => {
        mod $name {
            use super::*;
            #[tokio::test]
            async fn http() {
                let kbs = $crate::TestKbs::start().await;
                assert!(kbs.url.starts_with("http://"), "{}", kbs.url);
                ($body)(kbs).await
            }
            #[tokio::test]
            async fn tls() {
                let kbs = $crate::TestKbs::start_tls().await;
                // The variant is TLS only if clients really speak https to it.
                assert!(kbs.url.starts_with("https://"), "{}", kbs.url);
                assert!(
                    kbs.ca_file.as_ref().is_some_and(|f| f.is_file()),
                    "{:?}",
                    kbs.ca_file
                );
                let plain = reqwest::Client::new()
                    .get(format!("http://{}/healthz", kbs.addr))
                    .send()
                    .await;
                assert!(
                    plain.as_ref().map_or(true, |r| !r.status().is_success()),
                    "the TLS KBS answered plain HTTP: {plain:?}"
                );
                ($body)(kbs).await
            }
        }
    };
}

#[cfg(test)]
mod layering_tests {
    #[test]
    fn modules_do_not_import_each_other_in_a_circle() {
        layering::assert_no_module_cycles(env!("CARGO_MANIFEST_DIR"));
    }
}
