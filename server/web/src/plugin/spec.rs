//! [`PluginSpec`]: one entry of the plugin list. Its constructor gets a [`PluginSetup`]: the
//! plugin's own config section (`[plugins.<name>]`), parsed and validated by the plugin, and
//! its own metrics scope (families registered there are named `kbs_<name>_...`).

use std::sync::Arc;

use prometheus_client::registry::Registry;
use serde::de::DeserializeOwned;

use super::Plugin;

/// Why a plugin could not be built; names the config key at fault.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration key `{key}`: {reason}")]
pub struct PluginSetupError {
    /// Dotted key path (`plugins.splitapi.validity`).
    pub key: String,
    /// What is wrong with it.
    pub reason: String,
}

type Build = Box<dyn FnOnce(&mut PluginSetup<'_>) -> Result<Arc<dyn Plugin>, PluginSetupError>>;

/// A plugin's name and how to build it.
pub struct PluginSpec {
    name: &'static str,
    build: Build,
}

impl std::fmt::Debug for PluginSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginSpec")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl PluginSpec {
    /// The plugin `name`, built by `build` (which must return a plugin of that name).
    pub fn new<P, F>(name: &'static str, build: F) -> Self
    where
        P: Plugin,
        F: FnOnce(&mut PluginSetup<'_>) -> Result<P, PluginSetupError> + 'static,
    {
        Self {
            name,
            build: Box::new(move |setup| Ok(Arc::new(build(setup)?) as Arc<dyn Plugin>)),
        }
    }

    /// The plugin's name (URL segment, storage namespace, config section).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Build the plugin with its config `section` (absent: defaults), registering its
    /// metrics in `metrics`.
    pub fn build(
        self,
        section: Option<toml::Value>,
        metrics: &mut Registry,
    ) -> Result<Arc<dyn Plugin>, PluginSetupError> {
        let name = self.name;
        let mut setup = PluginSetup {
            name,
            section,
            // A metric name has neither '-' nor '/': `nebula-ca`'s families are
            // `kbs_nebula_ca_*`, `external/echo`'s `kbs_external_echo_*`.
            metrics: metrics.sub_registry_with_prefix(name.replace(['-', '/'], "_")),
        };
        let plugin = (self.build)(&mut setup)?;
        if plugin.name() != name {
            return Err(PluginSetupError {
                key: format!("plugins.{name}"),
                reason: format!("the plugin built calls itself `{}`", plugin.name()),
            });
        }
        Ok(plugin)
    }
}

/// What a plugin's constructor is given.
pub struct PluginSetup<'a> {
    name: &'static str,
    section: Option<toml::Value>,
    metrics: &'a mut Registry,
}

impl PluginSetup<'_> {
    /// The plugin's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The plugin's config section (`[plugins.<name>]`) parsed as `T` (its defaults when
    /// the section is absent). Unknown keys and wrong types are refused with the key named.
    pub fn config<T: DeserializeOwned + Default>(&mut self) -> Result<T, PluginSetupError> {
        match self.section.take() {
            None => Ok(T::default()),
            Some(section) => section
                .try_into()
                .map_err(|e: toml::de::Error| PluginSetupError {
                    key: format!("plugins.{}", self.name),
                    reason: e.message().to_string(),
                }),
        }
    }

    /// An error naming `key` of this plugin's section (`plugins.<name>.<key>`).
    pub fn invalid(&self, key: &str, reason: impl Into<String>) -> PluginSetupError {
        PluginSetupError {
            key: format!("plugins.{}.{key}", self.name),
            reason: reason.into(),
        }
    }

    /// The plugin's metrics scope: families registered here are exposed as
    /// `kbs_<name>_<family>`.
    pub fn metrics(&mut self) -> &mut Registry {
        self.metrics
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::plugin::PluginKind;

    #[derive(Debug, Default, serde::Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Cfg {
        greeting: String,
    }

    struct Named(&'static str);

    impl Plugin for Named {
        fn name(&self) -> &'static str {
            self.0
        }
        fn kind(&self) -> PluginKind {
            PluginKind::Admin
        }
    }

    fn section(text: &str) -> Option<toml::Value> {
        Some(toml::Value::Table(text.parse().unwrap()))
    }

    #[test]
    fn a_section_is_parsed_by_its_plugin_and_unknown_keys_are_named() {
        let mut registry = Registry::default();
        let spec = PluginSpec::new("hello", |s| {
            let cfg: Cfg = s.config()?;
            if cfg.greeting == "boom" {
                return Err(s.invalid("greeting", "must not explode"));
            }
            Ok(Named("hello"))
        });
        assert_eq!(spec.name(), "hello");
        spec.build(section("greeting = \"hi\""), &mut registry)
            .unwrap();
        let err = PluginSpec::new("hello", |s| {
            s.config::<Cfg>()?;
            Ok(Named("hello"))
        })
        .build(section("greting = \"hi\""), &mut registry)
        .err()
        .unwrap();
        assert_eq!(err.key, "plugins.hello");
        assert!(err.reason.contains("greting"), "{err}");
        let err = PluginSpec::new("hello", |s| {
            let cfg: Cfg = s.config()?;
            if cfg.greeting == "boom" {
                return Err(s.invalid("greeting", "must not explode"));
            }
            Ok(Named("hello"))
        })
        .build(section("greeting = \"boom\""), &mut registry)
        .err()
        .unwrap();
        assert_eq!(err.key, "plugins.hello.greeting");
    }

    #[test]
    fn a_plugin_must_carry_the_name_it_is_listed_under() {
        let err = PluginSpec::new("hello", |_| Ok(Named("other")))
            .build(None, &mut Registry::default())
            .err()
            .unwrap();
        assert!(err.reason.contains("`other`"), "{err}");
    }
}
