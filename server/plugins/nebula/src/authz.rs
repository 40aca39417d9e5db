//! Who may have which Nebula name, address and groups. A request names them
//! (`?name=..&ip=..&groups=..`, upstream's parameters); they are granted only when the
//! guest's attested init-data allows them (its `[nebula]` table), or, when the operator has
//! said so (`names_from_policy`), when the resource policy allows them: never on the caller's
//! word alone.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;

use kbs_core::identity::GuestIdentity;

use super::cert::Ipv4Net;

/// Most groups in one certificate.
pub const MAX_GROUPS: usize = 32;
/// Longest name and group.
const MAX_NAME: usize = 253;
const MAX_GROUP: usize = 64;

/// A refused request (400).
#[derive(Debug, thiserror::Error)]
#[error("invalid Nebula credential request: {0}")]
pub struct RequestError(pub String);

/// What a credential request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRequest {
    /// The certificate's name.
    pub name: String,
    /// Its overlay address and prefix.
    pub ip: Ipv4Net,
    /// Its groups, sorted, without duplicates.
    pub groups: Vec<String>,
    /// Requested lifetime (at most the configured validity).
    pub duration: Option<Duration>,
}

fn name_ok(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Groups from a comma-separated list (or a list in claims), checked, sorted, deduplicated.
pub fn parse_groups<'a>(items: impl IntoIterator<Item = &'a str>) -> Result<Vec<String>, String> {
    let mut groups: Vec<String> = Vec::new();
    for g in items {
        let g = g.trim();
        if g.is_empty() {
            continue;
        }
        if !name_ok(g, MAX_GROUP) {
            return Err(format!(
                "group {:?} must be 1..={MAX_GROUP} characters of [A-Za-z0-9._-]",
                g.chars().take(64).collect::<String>()
            ));
        }
        groups.push(g.to_owned());
    }
    groups.sort();
    groups.dedup();
    if groups.len() > MAX_GROUPS {
        return Err(format!("at most {MAX_GROUPS} groups"));
    }
    Ok(groups)
}

/// Parse upstream's query parameters: `name` and `ip` (CIDR) required, `groups` (comma
/// separated) and `duration` (`24h`, `30m`) optional; `subnets` is not supported.
pub fn parse_query(query: &BTreeMap<String, String>) -> Result<NodeRequest, RequestError> {
    let bad = |m: String| RequestError(m);
    if let Some(unknown) = query.keys().find(|k| {
        !matches!(
            k.as_str(),
            "name" | "ip" | "groups" | "duration" | "subnets"
        )
    }) {
        return Err(bad(format!(
            "unknown parameter {:?} (name, ip, groups, duration)",
            unknown.chars().take(64).collect::<String>()
        )));
    }
    if query.contains_key("subnets") {
        return Err(bad(
            "`subnets` (unsafe routes) are not issued by this KBS".into()
        ));
    }
    let name = query
        .get("name")
        .ok_or_else(|| bad("`name` is required".into()))?;
    if !name_ok(name, MAX_NAME) {
        return Err(bad(format!(
            "`name` must be 1..={MAX_NAME} characters of [A-Za-z0-9._-]"
        )));
    }
    let ip_text = query
        .get("ip")
        .ok_or_else(|| bad("`ip` is required (IPv4 CIDR, e.g. 10.42.0.7/16)".into()))?;
    let ip = Ipv4Net::parse(ip_text).ok_or_else(|| {
        bad(format!(
            "`ip` {:?} is not an IPv4 address with a prefix length, e.g. 10.42.0.7/16",
            ip_text.chars().take(64).collect::<String>()
        ))
    })?;
    let groups = match query.get("groups") {
        None => Vec::new(),
        Some(text) => parse_groups(text.split(',')).map_err(|e| bad(format!("`groups`: {e}")))?,
    };
    let duration = match query.get("duration") {
        None => None,
        Some(text) => Some(
            humantime::parse_duration(text)
                .ok()
                .filter(|d| *d >= Duration::from_secs(60))
                .ok_or_else(|| {
                    bad("`duration` must be a duration of at least 1m, e.g. 24h".into())
                })?,
        ),
    };
    Ok(NodeRequest {
        name: name.clone(),
        ip,
        groups,
        duration,
    })
}

/// What a guest's attestation allows: its init-data's `[nebula]` table (`name`, `ip`,
/// `groups`); without a `name` there, its attested guest id or `[tether] name`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Allowed {
    /// Names it may have.
    pub names: Vec<String>,
    /// The one address it may have.
    pub ip: Option<Ipv4Net>,
    /// Groups it may have.
    pub groups: Vec<String>,
}

/// The `[nebula]` table of a token's init-data claims (upstream's EAR layout: `submods.cpu0`
/// or `cpu`).
fn nebula_claims(claims: &Value) -> Option<&Value> {
    ["cpu0", "cpu"].iter().find_map(|submod| {
        claims.pointer(&format!(
            "/submods/{submod}/ear.veraison.annotated-evidence/init_data_claims/nebula"
        ))
    })
}

impl Allowed {
    /// From a verified token's claims and identity.
    pub fn from_claims(claims: &Value, identity: &GuestIdentity) -> Self {
        let table = nebula_claims(claims);
        let field = |k: &str| table.and_then(|t| t.get(k));
        let names = match field("name").and_then(Value::as_str) {
            Some(n) => vec![n.to_owned()],
            None => std::iter::once(identity.guest_id.clone())
                .chain(identity.name.clone())
                .filter(|n| !n.is_empty())
                .collect(),
        };
        let ip = field("ip").and_then(Value::as_str).and_then(Ipv4Net::parse);
        let groups = field("groups")
            .and_then(Value::as_array)
            .map(|a| parse_groups(a.iter().filter_map(Value::as_str)).unwrap_or_default())
            .unwrap_or_default();
        Self { names, ip, groups }
    }

    /// What `req` asks beyond this, if anything.
    pub fn refusal(&self, req: &NodeRequest) -> Option<String> {
        if !self.names.contains(&req.name) {
            return Some(format!(
                "name {:?} is not this guest's attested Nebula name ({})",
                req.name,
                if self.names.is_empty() {
                    "none".to_string()
                } else {
                    self.names.join(", ")
                }
            ));
        }
        match self.ip {
            Some(ip) if ip == req.ip => {}
            Some(ip) => {
                return Some(format!(
                    "ip {} is not this guest's attested Nebula address ({ip})",
                    req.ip
                ));
            }
            None => {
                return Some(format!(
                    "ip {}: this guest's init-data names no Nebula address ([nebula] ip)",
                    req.ip
                ));
            }
        }
        if let Some(g) = req.groups.iter().find(|g| !self.groups.contains(g)) {
            return Some(format!(
                "group {g:?} is not among this guest's attested Nebula groups"
            ));
        }
        None
    }

    /// The credential a push issues: everything attested, when an address is.
    pub fn push_request(&self) -> Option<NodeRequest> {
        Some(NodeRequest {
            name: self.names.first()?.clone(),
            ip: self.ip?,
            groups: self.groups.clone(),
            duration: None,
        })
    }
}

/// `data.query` for the policy: what is asked, and whether the attestation allows it.
pub fn policy_query(req: &NodeRequest, attested: bool) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("name".to_string(), req.name.clone()),
        ("ip".to_string(), req.ip.to_string()),
        ("groups".to_string(), req.groups.join(",")),
        ("attested".to_string(), attested.to_string()),
    ])
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use serde_json::json;

    use super::*;

    fn q(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn queries_are_checked() {
        let r = parse_query(&q(&[
            ("name", "web-1"),
            ("ip", "10.42.0.7/16"),
            ("groups", "b,a,,a"),
        ]))
        .unwrap();
        assert_eq!(r.groups, ["a", "b"]);
        assert_eq!(r.ip.to_string(), "10.42.0.7/16");
        for (query, what) in [
            (q(&[("ip", "10.0.0.1/8")]), "`name` is required"),
            (q(&[("name", "a")]), "`ip` is required"),
            (q(&[("name", "a"), ("ip", "10.0.0.1")]), "prefix length"),
            (
                q(&[("name", "a b"), ("ip", "10.0.0.1/8")]),
                "`name` must be",
            ),
            (
                q(&[("name", &"n".repeat(300)), ("ip", "10.0.0.1/8")]),
                "`name` must be",
            ),
            (
                q(&[("name", "a"), ("ip", "10.0.0.1/8"), ("groups", "x y")]),
                "group",
            ),
            (
                q(&[
                    ("name", "a"),
                    ("ip", "10.0.0.1/8"),
                    ("subnets", "10.1.0.0/16"),
                ]),
                "subnets",
            ),
            (
                q(&[("name", "a"), ("ip", "10.0.0.1/8"), ("duration", "soon")]),
                "duration",
            ),
            (
                q(&[("name", "a"), ("ip", "10.0.0.1/8"), ("nmae", "a")]),
                "unknown parameter",
            ),
        ] {
            let e = parse_query(&query).unwrap_err().to_string();
            assert!(e.contains(what), "{query:?}: {e}");
        }
    }

    fn claims(nebula: Value) -> Value {
        json!({"submods": {"cpu0": {"ear.veraison.annotated-evidence": {"init_data_claims": {"nebula": nebula}}}}})
    }

    #[test]
    fn only_what_the_init_data_names_is_allowed() {
        let id = GuestIdentity {
            guest_id: "g1".into(),
            ..Default::default()
        };
        let allowed = Allowed::from_claims(
            &claims(json!({"name": "web-1", "ip": "10.42.0.7/16", "groups": ["web", "eu"]})),
            &id,
        );
        let req = |name: &str, ip: &str, groups: &str| {
            parse_query(&q(&[("name", name), ("ip", ip), ("groups", groups)])).unwrap()
        };
        assert_eq!(allowed.refusal(&req("web-1", "10.42.0.7/16", "web")), None);
        assert_eq!(
            allowed.refusal(&req("web-1", "10.42.0.7/16", "eu,web")),
            None
        );
        assert!(
            allowed
                .refusal(&req("g1", "10.42.0.7/16", ""))
                .unwrap()
                .contains("name")
        );
        assert!(
            allowed
                .refusal(&req("web-1", "10.42.0.8/16", ""))
                .unwrap()
                .contains("ip")
        );
        assert!(
            allowed
                .refusal(&req("web-1", "10.42.0.7/24", ""))
                .unwrap()
                .contains("ip")
        );
        assert!(
            allowed
                .refusal(&req("web-1", "10.42.0.7/16", "admin"))
                .unwrap()
                .contains("admin")
        );
        assert_eq!(allowed.push_request().unwrap().groups, ["eu", "web"]);

        // No [nebula] table: the guest id is its name, and no address is allowed.
        let bare = Allowed::from_claims(&json!({}), &id);
        assert_eq!(bare.names, ["g1"]);
        assert!(
            bare.refusal(&req("g1", "10.42.0.7/16", ""))
                .unwrap()
                .contains("no Nebula address")
        );
        assert!(bare.push_request().is_none());
    }
}
