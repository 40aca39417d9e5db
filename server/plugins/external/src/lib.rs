//! External plugins (upstream Trustee's `kbs.plugin.v1.KbsPlugin` gRPC protocol): each
//! `[[plugins.external]]` table is a plugin process the KBS forwards
//! `/kbs/v0/external/<name>/...` to, admin-authenticated or attested and policy-gated as the
//! plugin's `ValidateAuth` asks, the answer JWE-sealed when its `NeedsEncryption` asks. Each
//! is a plugin of the registry named `external/<name>` (enable, disable, change endpoint at
//! run time); a plugin that crashes, hangs or answers garbage costs its own routes only
//! (503). Wire details: `docs/protocol.md` section 9.4.
//!
//! Beyond upstream, [`guests`]: a plugin granted it calls back into the KBS over gRPC to
//! list guests and call them through their tunnels (`docs/protocol.md` section 9.5).

mod backend;
mod config;
pub mod guests;
mod handler;
mod plugin;
pub mod proto;

use kbs_web::plugin::{PluginSetupError, PluginSpec};

use crate::guests::{Callers, GuestsApiPlugin, GuestsGrants};

pub use backend::{Backend, CallError};
pub use config::{DEFAULT_MAX_CONCURRENT, DEFAULT_TIMEOUT, ExternalConfig, TlsMode};
pub use plugin::ExternalPlugin;

/// The config section (`[[plugins.external]]`) and the first segment of every external
/// plugin's name and routes.
pub const FAMILY: &str = "external";

/// A bad key (relative to the plugin's table) and why.
pub type Invalid = (&'static str, String);

fn invalid(key: String, reason: impl Into<String>) -> PluginSetupError {
    PluginSetupError {
        key,
        reason: reason.into(),
    }
}

/// The `[[plugins.external]]` tables, parsed and checked (errors name the key,
/// `plugins.external[1].endpoint`).
pub fn parse(section: Option<toml::Value>) -> Result<Vec<ExternalConfig>, PluginSetupError> {
    let items = match section {
        None => return Ok(Vec::new()),
        Some(toml::Value::Array(items)) => items,
        Some(_) => {
            return Err(invalid(
                format!("plugins.{FAMILY}"),
                "must be an array of tables: one [[plugins.external]] per plugin",
            ));
        }
    };
    let mut configs: Vec<ExternalConfig> = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let config: ExternalConfig = item
            .try_into()
            .map_err(|e: toml::de::Error| invalid(format!("plugins.{FAMILY}[{i}]"), e.message()))?;
        if configs.iter().any(|c| c.name == config.name) {
            return Err(invalid(
                format!("plugins.{FAMILY}[{i}].name"),
                format!("`{}` is used twice", config.name),
            ));
        }
        configs.push(config);
    }
    Ok(configs)
}

/// One plugin spec per `[[plugins.external]]` table, named `external/<name>`, then the
/// Guests API's (`guests-api`, serving the plugins granted it with what `grants` holds).
pub fn specs(
    section: Option<toml::Value>,
    grants: GuestsGrants,
) -> Result<Vec<PluginSpec>, PluginSetupError> {
    let mut specs = Vec::new();
    let callers = Callers::default();
    for (i, config) in parse(section)?.into_iter().enumerate() {
        let key = |(key, reason): Invalid| invalid(format!("plugins.{FAMILY}[{i}].{key}"), reason);
        let (target, max) = config.validate().map_err(key)?;
        let guests = config.grants().map_err(key)?;
        // Names live as long as the process: one per configured plugin, made once at start.
        let name: &'static str = Box::leak(format!("{FAMILY}/{}", config.name).into_boxed_str());
        let callers = callers.clone();
        specs.push(PluginSpec::new(name, move |setup| {
            let caller = match guests {
                None => None,
                Some((grants, token_file)) => {
                    let max = grants.max_concurrent();
                    Some(
                        callers
                            .add(name, grants, max, token_file)
                            .map_err(|e| setup.invalid("token_file", e))?,
                    )
                }
            };
            ExternalPlugin::build(setup, target, max, caller)
        }));
    }
    specs.push(PluginSpec::new(guests::NAME, move |setup| {
        GuestsApiPlugin::build(setup, callers, grants)
    }));
    Ok(specs)
}

#[cfg(test)]
mod layering_tests {
    #[test]
    fn modules_do_not_import_each_other_in_a_circle() {
        layering::assert_no_module_cycles(env!("CARGO_MANIFEST_DIR"));
    }
}
