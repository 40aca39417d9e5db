//! What one external plugin may do through the Guests API: its `[plugins.external.guests]`
//! table (which calls, which guests by selector, which bundle ids, which resources),
//! checked once at start with errors naming the key.

use std::collections::{BTreeMap, BTreeSet};

use kbs_core::resource_path::{ResourcePath, check_segment};
use kbs_core::selector::Selector;
use serde::{Deserialize, Serialize};

use crate::Invalid;

/// Most bundle ids or resource patterns one grant may name.
const MAX_LISTED: usize = 256;

/// One call of the Guests API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Call {
    /// `ListGuests`.
    ListGuests,
    /// `Ping`.
    Ping,
    /// `Probe`.
    Probe,
    /// `ApplyResource`.
    ApplyResource,
    /// `InstallCredentials`.
    InstallCredentials,
}

impl Call {
    /// Config, audit and metrics spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ListGuests => "list_guests",
            Self::Ping => "ping",
            Self::Probe => "probe",
            Self::ApplyResource => "apply_resource",
            Self::InstallCredentials => "install_credentials",
        }
    }
}

/// `[plugins.external.guests]` as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantsConfig {
    /// The calls allowed.
    pub calls: Vec<Call>,
    /// The guests it may see and call (required; `""` is every guest).
    pub selector: String,
    /// Bundle ids `install_credentials` may install.
    #[serde(default)]
    pub bundles: Vec<String>,
    /// Resources `apply_resource` may push: `repo/type/tag`, any segment may be `*`.
    #[serde(default)]
    pub resources: Vec<String>,
    /// Calls in progress at once (default 8); more are refused (RESOURCE_EXHAUSTED).
    #[serde(default)]
    pub max_concurrent: Option<usize>,
}

/// Calls of one plugin in progress at once when `max_concurrent` is not set.
pub const DEFAULT_MAX_CONCURRENT_CALLS: usize = 8;

/// A grant, checked.
#[derive(Clone, Debug)]
pub struct Grants {
    calls: BTreeSet<Call>,
    selector: Selector,
    selector_text: String,
    bundles: BTreeSet<String>,
    resources: Vec<[String; 3]>,
    max_concurrent: usize,
}

/// Bundle ids the KBS's own plugins push: an external plugin installing one would fight
/// them over the guest's copy.
const RESERVED_BUNDLES: [&str; 2] = ["splitapi", "nebula"];

impl GrantsConfig {
    /// Check every key (names relative to the plugin's table: `guests.selector`).
    pub fn validate(&self) -> Result<Grants, Invalid> {
        if self.calls.is_empty() {
            return Err((
                "guests.calls",
                "grants no call; remove the table instead".into(),
            ));
        }
        let selector =
            Selector::parse(&self.selector).map_err(|e| ("guests.selector", e.to_string()))?;
        let calls: BTreeSet<Call> = self.calls.iter().copied().collect();
        if self.bundles.len() > MAX_LISTED || self.resources.len() > MAX_LISTED {
            return Err((
                "guests",
                format!("at most {MAX_LISTED} bundles and {MAX_LISTED} resources"),
            ));
        }
        let mut bundles = BTreeSet::new();
        for id in &self.bundles {
            check_bundle_id(id).map_err(|e| ("guests.bundles", e))?;
            if RESERVED_BUNDLES.contains(&id.as_str()) {
                return Err((
                    "guests.bundles",
                    format!("`{id}` is pushed by the KBS's own {id} plugin"),
                ));
            }
            bundles.insert(id.clone());
        }
        if calls.contains(&Call::InstallCredentials) && bundles.is_empty() {
            return Err((
                "guests.bundles",
                "install_credentials is granted but no bundle id is".into(),
            ));
        }
        let mut resources = Vec::with_capacity(self.resources.len());
        for pattern in &self.resources {
            resources.push(parse_pattern(pattern).map_err(|e| ("guests.resources", e))?);
        }
        if calls.contains(&Call::ApplyResource) && resources.is_empty() {
            return Err((
                "guests.resources",
                "apply_resource is granted but no resource is".into(),
            ));
        }
        let max_concurrent = self.max_concurrent.unwrap_or(DEFAULT_MAX_CONCURRENT_CALLS);
        if !(1..=1024).contains(&max_concurrent) {
            return Err(("guests.max_concurrent", "must be 1..=1024".into()));
        }
        Ok(Grants {
            max_concurrent,
            calls,
            selector,
            selector_text: self.selector.clone(),
            bundles,
            resources,
        })
    }
}

/// A bundle id as the guest daemon accepts it: `[a-z0-9-]{1,64}`.
pub fn check_bundle_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!("bundle id `{id}` must be [a-z0-9-]{{1,64}}"))
    }
}

fn parse_pattern(pattern: &str) -> Result<[String; 3], String> {
    let parts: Vec<&str> = pattern.split('/').collect();
    let [repo, kind, tag] = parts.as_slice() else {
        return Err(format!("`{pattern}` is not repo/type/tag"));
    };
    let mut out = [String::new(), String::new(), String::new()];
    for (i, (which, s)) in [("repo", repo), ("type", kind), ("tag", tag)]
        .into_iter()
        .enumerate()
    {
        if *s != "*" {
            check_segment(which, s).map_err(|e| format!("`{pattern}`: {e}"))?;
        }
        out[i] = (*s).to_string();
    }
    Ok(out)
}

impl Grants {
    /// Whether `call` is granted.
    pub fn allows_call(&self, call: Call) -> bool {
        self.calls.contains(&call)
    }

    /// Whether a guest with `labels` is within the granted selector.
    pub fn allows_guest(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector.matches(labels)
    }

    /// Whether bundle `id` may be installed.
    pub fn allows_bundle(&self, id: &str) -> bool {
        self.bundles.contains(id)
    }

    /// Whether `path` may be pushed.
    pub fn allows_resource(&self, path: &ResourcePath) -> bool {
        let segments = path.segments();
        self.resources.iter().any(|p| {
            p.iter()
                .zip(segments)
                .all(|(want, got)| want == "*" || want == got)
        })
    }

    /// Calls in progress at once.
    pub fn max_concurrent(&self) -> usize {
        self.max_concurrent
    }

    /// What `GET /kbs/v0/plugin` shows of it.
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "calls": self.calls.iter().map(|c| c.as_str()).collect::<Vec<_>>(),
            "selector": self.selector_text,
            "bundles": self.bundles,
            "resources": self.resources.iter().map(|r| r.join("/")).collect::<Vec<_>>(),
            "max_concurrent": self.max_concurrent,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn grants(text: &str) -> Result<Grants, Invalid> {
        toml::from_str::<GrantsConfig>(text).unwrap().validate()
    }

    #[test]
    fn grants_are_checked_and_answer_what_they_allow() {
        let g = grants(
            "calls = [\"list_guests\", \"install_credentials\", \"apply_resource\"]\nselector = \"app=db\"\nbundles = [\"db-creds\"]\nresources = [\"default/db/*\"]\n",
        )
        .unwrap();
        assert!(g.allows_call(Call::InstallCredentials));
        assert!(!g.allows_call(Call::Ping));
        let labels = |v: &str| BTreeMap::from([("app".to_string(), v.to_string())]);
        assert!(g.allows_guest(&labels("db")));
        assert!(!g.allows_guest(&labels("web")));
        assert!(!g.allows_guest(&BTreeMap::new()));
        assert!(g.allows_bundle("db-creds"));
        assert!(!g.allows_bundle("other"));
        assert!(g.allows_resource(&"default/db/password".parse().unwrap()));
        assert!(!g.allows_resource(&"default/web/password".parse().unwrap()));

        let key = |text: &str| grants(text).unwrap_err().0;
        assert_eq!(key("calls = []\nselector = \"\"\n"), "guests.calls");
        assert_eq!(
            key("calls = [\"ping\"]\nselector = \"app in (\"\n"),
            "guests.selector"
        );
        assert_eq!(
            key("calls = [\"install_credentials\"]\nselector = \"\"\n"),
            "guests.bundles"
        );
        assert_eq!(
            key("calls = [\"install_credentials\"]\nselector = \"\"\nbundles = [\"splitapi\"]\n"),
            "guests.bundles"
        );
        assert_eq!(
            key("calls = [\"apply_resource\"]\nselector = \"\"\nresources = [\"a/b\"]\n"),
            "guests.resources"
        );
        assert!(
            toml::from_str::<GrantsConfig>("calls = [\"ping\"]\n").is_err(),
            "selector is required"
        );
        assert!(toml::from_str::<GrantsConfig>("calls = [\"reboot\"]\nselector = \"\"\n").is_err());
    }
}
