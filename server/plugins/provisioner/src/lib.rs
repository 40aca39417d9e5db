//! `provisioner` (admin + client-request): per-VM LUKS keys for confidential VMs, as upstream
//! Trustee's provisioner plugin. The host's operator (a provisioning hook) calls
//! `POST /kbs/v0/provisioner/provision` `{"vm_name", "namespace"}` with an admin token before
//! the VM boots and gets `{uuid, resource_path, oemstring, mrconfigid, hostdata}`: the UUID is
//! derived from the VM identity, a random key is stored in the plugin's own namespace, and the
//! `initdata.toml` in `oemstring` points the guest at `default/<uuid>/root`. The guest, once
//! attested, fetches `GET /kbs/v0/provisioner/default/<uuid>/root`: the confdata TOML holding
//! the key, sealed to its TEE key, and only when the init-data digest it attested is the one
//! issued for that UUID. `DELETE /kbs/v0/provisioner/provision/<uuid>` erases the key.
//!
//! Records live under `vm/<uuid>` in the plugin's namespace (sealed with the KEK; a delete
//! erases the ciphertext from the database and its WAL). A second provision of the same VM
//! returns the record already issued (as upstream): its key is never replaced.
//! docs/protocol.md, "provisioner", has the wire formats.

mod http;
pub mod record;

use std::sync::Arc;

use async_trait::async_trait;
use axum::Router;
use axum::routing::{delete, get, post};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::Deserialize;

use kbs_core::metrics::Labels;
use kbs_web::plugin::{Plugin, PluginContext, PluginKind, PluginSetup, PluginSetupError};

pub use self::record::{ProvisionAnswer, ProvisionRecord, VmIdentity};

/// Plugin name and URL segment.
pub const NAME: &str = "provisioner";

/// `[plugins.provisioner]` settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProvisionerConfig {
    /// The KBS URL written into each VM's `initdata.toml` (`trustee.kbs.url`). Without it
    /// provisioning answers 503 `ProvisionerNotConfigured`; fetching keys still works.
    pub kbs_url: Option<String>,
    /// Length of the generated LUKS passphrase, in alphanumeric characters.
    pub key_length: usize,
}

impl Default for ProvisionerConfig {
    fn default() -> Self {
        Self {
            kbs_url: None,
            key_length: 32,
        }
    }
}

impl ProvisionerConfig {
    /// Range checks: the key at fault (within `[plugins.provisioner]`) and why.
    pub fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        if let Some(url) = &self.kbs_url {
            let scheme_ok = url.starts_with("http://") || url.starts_with("https://");
            // It is written into TOML between quotes, as upstream does: nothing that would
            // need escaping.
            let text_ok = url.len() <= 2048
                && url
                    .chars()
                    .all(|c| c.is_ascii_graphic() && c != '"' && c != '\\');
            if !scheme_ok || !text_ok {
                return Err((
                    "kbs_url",
                    "must be an http:// or https:// URL of at most 2048 printable ASCII characters without quotes or backslashes",
                ));
            }
        }
        if !(16..=512).contains(&self.key_length) {
            return Err(("key_length", "must be 16..=512"));
        }
        Ok(())
    }
}

/// Shared state of the handlers.
pub(crate) struct Inner {
    config: ProvisionerConfig,
    /// Provisions check-then-write under this lock, so two requests for one VM cannot both
    /// write a key (one KBS process owns its store).
    provision_lock: tokio::sync::Mutex<()>,
    /// `kbs_provisioner_requests_total{op,outcome}`.
    requests: Family<Labels, Counter>,
}

impl Inner {
    pub(crate) fn count(&self, op: &str, outcome: &str) {
        self.requests
            .get_or_create(&vec![
                ("op", op.to_string()),
                ("outcome", outcome.to_string()),
            ])
            .inc();
    }
}

/// The provisioner plugin.
pub struct ProvisionerPlugin {
    inner: Arc<Inner>,
}

impl ProvisionerPlugin {
    /// With its `[plugins.provisioner]` section, validated; registers `kbs_provisioner_requests`.
    pub fn build(setup: &mut PluginSetup<'_>) -> Result<Self, PluginSetupError> {
        let config: ProvisionerConfig = setup.config()?;
        config
            .validate()
            .map_err(|(key, reason)| setup.invalid(key, reason))?;
        let requests = Family::<Labels, Counter>::default();
        setup.metrics().register(
            "requests",
            "Provisioner requests by operation and outcome",
            requests.clone(),
        );
        Ok(Self::new(config, requests))
    }

    /// With a configuration already validated.
    pub fn new(config: ProvisionerConfig, requests: Family<Labels, Counter>) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                provision_lock: tokio::sync::Mutex::new(()),
                requests,
            }),
        }
    }
}

#[async_trait]
impl Plugin for ProvisionerPlugin {
    fn name(&self) -> &'static str {
        NAME
    }

    fn kind(&self) -> PluginKind {
        PluginKind::Admin
    }

    fn kinds(&self) -> Vec<PluginKind> {
        vec![PluginKind::Admin, PluginKind::ClientRequest]
    }

    fn routes(&self, ctx: PluginContext) -> Router {
        Router::new()
            .route("/provision", post(http::provision).get(http::list))
            .route("/provision/{uuid}", delete(http::deprovision))
            .route("/{repo}/{uuid}/{tag}", get(http::fetch))
            .layer(axum::Extension(self.inner.clone()))
            .with_state(ctx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn config_section_is_strict() {
        let build = |text: &str| {
            let section = toml::Value::Table(text.parse().unwrap());
            kbs_web::plugin::PluginSpec::new(NAME, ProvisionerPlugin::build).build(
                Some(section),
                &mut prometheus_client::registry::Registry::default(),
            )
        };
        let plugin = build("kbs_url = \"https://kbs.example\"").unwrap();
        assert_eq!(plugin.name(), NAME);
        let err = build("kbs_ur = \"x\"").err().unwrap();
        assert!(err.to_string().contains("kbs_ur"), "{err}");
        let err = build("kbs_url = \"ftp://x\"").err().unwrap();
        assert_eq!(err.key, "plugins.provisioner.kbs_url");
        let err = build("kbs_url = \"https://x/\\\"a\"").err().unwrap();
        assert_eq!(err.key, "plugins.provisioner.kbs_url");
        let err = build("key_length = 4").err().unwrap();
        assert_eq!(err.key, "plugins.provisioner.key_length");
    }
}

#[cfg(test)]
mod layering_tests {
    #[test]
    fn modules_do_not_import_each_other_in_a_circle() {
        layering::assert_no_module_cycles(env!("CARGO_MANIFEST_DIR"));
    }
}
