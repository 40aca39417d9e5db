//! The KBS web layer: what every HTTP endpoint shares, and the plugin framework.
//!
//! The API error type (status + Trustee's error JSON), the extractors (bodies, admin
//! callers, attested callers) generic over the router state through `FromRef`, admin
//! authentication and the dashboard's sessions, the HTTP metrics middleware, and the
//! plugin framework: [`plugin::Plugin`], the [`plugin::PluginContext`] a plugin is given,
//! the registry and the plugin admin routes. Built on `kbs-core`; the plugins and the
//! composition root (`server`) sit on top (see `docs/architecture.md`).

pub mod admin_auth;
pub mod admin_gate;
pub mod dashboard_session;
pub mod error;
pub mod extract;
pub mod http_metrics;
pub mod plugin;

#[cfg(test)]
mod layering_tests {
    #[test]
    fn modules_do_not_import_each_other_in_a_circle() {
        layering::assert_no_module_cycles(env!("CARGO_MANIFEST_DIR"));
    }
}
