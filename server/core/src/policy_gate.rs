//! [`PolicyGate`]: the resource policy asked one question for one plugin, answered with a
//! [`Decision`] (not an HTTP error: the web layer maps a denial to 403, the rotation engine
//! to a `denied` target). Every decision is counted by plugin and outcome.

use std::collections::BTreeMap;
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde_json::json;

use crate::claims::Claims;
use crate::metrics::Labels;
use crate::policy::{PolicyEngine, PolicyError};
use crate::resource_path::ResourcePath;

/// What the policy said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The request may proceed.
    Allow,
    /// Refused; the text says what was refused (never why in policy terms: that is secret).
    Deny(String),
}

impl Decision {
    /// True for [`Decision::Allow`].
    pub fn is_allow(&self) -> bool {
        matches!(self, Decision::Allow)
    }
}

/// What a plugin asks the policy about: `data.plugin`, `data["resource-path"]` (segments,
/// empty for other plugins) and `data.query` (the request's query parameters).
#[derive(Clone, Copy, Debug)]
pub struct PolicyQuestion<'a> {
    /// The asking plugin (`resource`, `splitapi`, `tunnel`, ...).
    pub plugin: &'a str,
    /// The resource path, for the resource plugin and rollouts.
    pub path: Option<&'a ResourcePath>,
    /// Query parameters of the request.
    pub query: &'a BTreeMap<String, String>,
}

/// The resource policy in force, with decision metrics. Cheap to clone.
#[derive(Clone)]
pub struct PolicyGate {
    engine: Arc<PolicyEngine>,
    decisions: Family<Labels, Counter>,
}

impl std::fmt::Debug for PolicyGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyGate")
            .field("engine", &self.engine)
            .finish_non_exhaustive()
    }
}

impl PolicyGate {
    /// A gate over `engine`, counting into `decisions` (`kbs_policy_decisions`).
    pub fn new(engine: Arc<PolicyEngine>, decisions: Family<Labels, Counter>) -> Self {
        Self { engine, decisions }
    }

    /// The engine (the admin API replaces its policy).
    pub fn engine(&self) -> &Arc<PolicyEngine> {
        &self.engine
    }

    /// Evaluates `data.policy.allow` for `claims` and `question`.
    pub fn decide(
        &self,
        claims: &Claims,
        question: PolicyQuestion<'_>,
    ) -> Result<Decision, PolicyError> {
        let segments: Vec<String> = question
            .path
            .map(|p| p.segments().iter().map(|s| s.to_string()).collect())
            .unwrap_or_default();
        let what = match question.path {
            Some(path) => format!("{} {path}", question.plugin),
            None => question.plugin.to_string(),
        };
        self.evaluate(claims, question.plugin, &segments, question.query, what)
    }

    /// Evaluates `data.policy.allow` for a request to `plugin` whose path is any list of
    /// `segments` (an external plugin's: upstream's policy input for them is the plugin
    /// `external` and the path after it, the backend's name first).
    pub fn decide_segments(
        &self,
        claims: &Claims,
        plugin: &str,
        segments: &[String],
        query: &BTreeMap<String, String>,
    ) -> Result<Decision, PolicyError> {
        let what = format!("{plugin} /{}", segments.join("/"));
        self.evaluate(claims, plugin, segments, query, what)
    }

    fn evaluate(
        &self,
        claims: &Claims,
        plugin: &str,
        segments: &[String],
        query: &BTreeMap<String, String>,
        what: String,
    ) -> Result<Decision, PolicyError> {
        let data = json!({
            "plugin": plugin,
            "resource-path": segments,
            "query": query,
        });
        let allowed = self.engine.evaluate_json(claims.json(), &data)?;
        let outcome = if allowed { "allow" } else { "deny" };
        self.decisions
            .get_or_create(&vec![
                ("plugin", plugin.to_string()),
                ("decision", outcome.to_string()),
            ])
            .inc();
        Ok(if allowed {
            Decision::Allow
        } else {
            Decision::Deny(format!("the resource policy denies {what} to this guest"))
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const ALLOW_DB: &str = "package policy\nimport rego.v1\ndefault allow := false\n\
        allow if { data[\"resource-path\"][0] == \"db\" }\n";

    #[test]
    fn decisions_follow_the_policy_and_are_counted() {
        let decisions = Family::<Labels, Counter>::default();
        let gate = PolicyGate::new(
            Arc::new(PolicyEngine::new(ALLOW_DB).unwrap()),
            decisions.clone(),
        );
        let claims = Claims::from_value(&json!({}));
        let query = BTreeMap::new();
        let allowed: ResourcePath = "db/key/a".parse().unwrap();
        let denied: ResourcePath = "web/key/a".parse().unwrap();
        let ask = |path| PolicyQuestion {
            plugin: "resource",
            path: Some(path),
            query: &query,
        };
        assert_eq!(
            gate.decide(&claims, ask(&allowed)).unwrap(),
            Decision::Allow
        );
        let Decision::Deny(why) = gate.decide(&claims, ask(&denied)).unwrap() else {
            panic!("web/key/a must be denied");
        };
        assert_eq!(
            why,
            "the resource policy denies resource web/key/a to this guest"
        );
        let count = |d: &str| {
            decisions
                .get_or_create(&vec![
                    ("plugin", "resource".to_string()),
                    ("decision", d.to_string()),
                ])
                .get()
        };
        assert_eq!((count("allow"), count("deny")), (1, 1));
    }

    #[test]
    fn any_path_can_be_asked_about() {
        let gate = PolicyGate::new(
            Arc::new(PolicyEngine::new(ALLOW_DB).unwrap()),
            Family::default(),
        );
        let claims = Claims::from_value(&json!({}));
        let query = BTreeMap::new();
        let ask = |segments: &[&str]| {
            let segments: Vec<String> = segments.iter().map(|s| s.to_string()).collect();
            gate.decide_segments(&claims, "external", &segments, &query)
                .unwrap()
        };
        assert_eq!(ask(&["db", "a", "b", "c"]), Decision::Allow);
        assert_eq!(
            ask(&["web", "x"]),
            Decision::Deny("the resource policy denies external /web/x to this guest".into())
        );
    }
}
