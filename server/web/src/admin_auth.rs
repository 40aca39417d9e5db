//! Admin authentication: `Authorization: Bearer <JWT>` signed EdDSA (Ed25519) by a
//! configured key, with a `role` claim that maps to allowed method + path patterns.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use axum::http::{HeaderMap, Method};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use kbs_core::audit::{Actor, Audit, AuditRecord};
use regex::Regex;
use serde::Deserialize;

use crate::error::ApiError;

/// Admin authentication: trusted Ed25519 public keys and roles (`[admin]`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Trusted admin token signers.
    pub keys: Vec<AdminKeyConfig>,
    /// Role name -> rules `"<METHODS> <path regex> [resources=<regex>]"`, METHODS `*` or a
    /// comma list (`GET,POST`); regexes match whole strings.
    pub roles: BTreeMap<String, Vec<String>>,
    /// Generate a development admin key under the data dir and trust it (no keys configured).
    pub dev_key: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            keys: Vec::new(),
            roles: BTreeMap::from([("admin".to_string(), vec!["* ^/kbs/.+$".to_string()])]),
            dev_key: true,
        }
    }
}

/// One trusted admin token signer.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminKeyConfig {
    /// Name used in logs and audit.
    pub name: String,
    /// Ed25519 public key, PEM (SPKI), as `openssl pkey -pubout` writes it.
    pub public_key_file: PathBuf,
    /// Required `iss`; any issuer when absent.
    pub issuer: Option<String>,
    /// Required `aud` member.
    #[serde(default = "default_audience")]
    pub audience: String,
}

fn default_audience() -> String {
    "KBS".to_string()
}

/// One rule of a role: `<METHODS> <path regex> [resources=<regex>]`, METHODS `*` or a
/// comma list. Both regexes match whole strings: `web-1` never matches `web-10`.
#[derive(Clone, Debug)]
pub struct RoleRule {
    methods: Option<Vec<Method>>,
    path: Regex,
    resources: Option<Regex>,
}

/// What a rule's `resources=` constraint starts with.
const RESOURCES_KEY: &str = "resources=";

impl RoleRule {
    /// Parse `"GET,POST ^/kbs/v0/resource/.+$"`, `"* /kbs/.+"` or
    /// `"POST /kbs/v0/rotation/rollouts resources=web/.+"`.
    pub fn parse(rule: &str) -> Result<Self, String> {
        let shape =
            || format!("rule `{rule}` must be `<METHODS> <path regex> [resources=<regex>]`");
        let mut words = rule.split_whitespace();
        let (Some(methods), Some(path)) = (words.next(), words.next()) else {
            return Err(shape());
        };
        let resources = match words.next() {
            None => None,
            Some(word) => {
                let pattern = word.strip_prefix(RESOURCES_KEY).ok_or_else(shape)?;
                Some(whole(pattern).map_err(|e| format!("bad resources regex: {e}"))?)
            }
        };
        if words.next().is_some() {
            return Err(shape());
        }
        let methods = if methods == "*" {
            None
        } else {
            Some(
                methods
                    .split(',')
                    .map(|m| {
                        Method::from_bytes(m.trim().to_ascii_uppercase().as_bytes())
                            .map_err(|_| format!("`{m}` is not an HTTP method"))
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            )
        };
        let path = whole(path).map_err(|e| format!("bad path regex: {e}"))?;
        Ok(Self {
            methods,
            path,
            resources,
        })
    }

    fn allows(&self, method: &Method, path: &str) -> bool {
        self.methods.as_ref().is_none_or(|m| m.contains(method)) && self.path.is_match(path)
    }
}

/// `pattern` anchored at both ends (`^...$` in the pattern itself stays valid).
fn whole(pattern: &str) -> Result<Regex, regex::Error> {
    Regex::new(&format!("^(?:{pattern})$"))
}

/// The resources a request's role rules let the caller act on: the union over the rules that
/// allowed the request (any rule without `resources=` lifts the limit).
#[derive(Clone, Debug, Default)]
pub enum ResourceScope {
    /// No rule that allowed the request limits resources.
    #[default]
    Any,
    /// Only resource paths (`repo/type/tag`) one of these matches.
    Only(Vec<Regex>),
}

impl ResourceScope {
    fn of(rules: &[&RoleRule]) -> Self {
        let mut only = Vec::with_capacity(rules.len());
        for rule in rules {
            match &rule.resources {
                None => return Self::Any,
                Some(re) => only.push(re.clone()),
            }
        }
        Self::Only(only)
    }

    /// Whether the resource at `path` (`repo/type/tag`) is within the scope.
    pub fn allows(&self, path: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Only(res) => res.iter().any(|re| re.is_match(path)),
        }
    }
}

/// Who is calling an admin endpoint, once authenticated and authorised.
#[derive(Clone, Debug)]
pub struct AdminIdentity {
    /// Token `sub`.
    pub subject: String,
    /// Token `role`.
    pub role: String,
    /// Name of the key that signed it.
    pub key: String,
    /// The resources this request may act on (its role rules' `resources=` constraints).
    resources: ResourceScope,
    /// The replica that forwarded this request here, if another one did.
    via: Option<String>,
}

/// Request extension set by the replica forwarding layer on a request another replica
/// forwarded (its hop checked): the forwarding replica's id, named in the audit trail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForwardedBy(pub String);

impl AdminIdentity {
    /// An identity whose scope is not limited to any resources (tests, tools); the gate
    /// builds the real ones, scoped by the rules that allowed each request.
    pub fn new(subject: &str, role: &str, key: &str) -> Self {
        Self {
            subject: subject.to_owned(),
            role: role.to_owned(),
            key: key.to_owned(),
            resources: ResourceScope::Any,
            via: None,
        }
    }

    /// This identity on a request that replica `replica_id` forwarded here.
    pub fn forwarded_by(mut self, replica_id: &str) -> Self {
        self.via = Some(replica_id.to_owned());
        self
    }

    /// `subject@key` (and ` via replica <id>` on a forwarded request), as written in the
    /// audit log.
    pub fn actor(&self) -> String {
        match &self.via {
            Some(replica) => format!("{}@{} via replica {replica}", self.subject, self.key),
            None => format!("{}@{}", self.subject, self.key),
        }
    }

    /// The resources the rules that allowed this request let it act on.
    pub fn resources(&self) -> &ResourceScope {
        &self.resources
    }

    /// `403 AdminRoleDenied` unless this request's role rules let it act on the resource at
    /// `path` (`repo/type/tag`). Endpoints that name a resource in the body (a rollout's
    /// `path`) or act on a stored object that has one (a rollout's) call it; resource URLs
    /// (`/kbs/v0/resource/...`, `/kbs/v0/admin/resources/...`) are checked by the gate.
    pub fn require_resource(&self, path: &str) -> Result<(), ApiError> {
        if self.resources.allows(path) {
            Ok(())
        } else {
            Err(ApiError::forbidden(
                "AdminRoleDenied",
                format!("role `{}` may not act on resource {path}", self.role),
            ))
        }
    }

    /// Record an action by this admin in the audit trail.
    pub async fn audit(
        &self,
        audit: &Audit,
        action: &str,
        target: &str,
        outcome: &str,
        detail: String,
    ) {
        let name = self.actor();
        let actor = Actor {
            name: &name,
            role: &self.role,
        };
        let record = AuditRecord {
            action,
            target,
            outcome,
            detail,
        };
        audit.record(actor, record).await;
    }
}

/// The resource a request URL names, percent-decoded (`repo/type/tag`): the resource
/// endpoints `/kbs/v0/resource/<repo>/<type>/<tag>` and
/// `/kbs/v0/admin/resources/<repo>/<type>/<tag>/versions`. `Some("")` for a URL under those
/// prefixes that names no valid resource, which no `resources=` constraint allows.
fn resource_in_url(path: &str) -> Option<String> {
    let (rest, suffix) = if let Some(rest) = path.strip_prefix("/kbs/v0/resource/") {
        (rest, None)
    } else {
        let rest = path.strip_prefix("/kbs/v0/admin/resources/")?;
        (rest, Some("/versions"))
    };
    let rest = match suffix {
        Some(suffix) => rest.strip_suffix(suffix).unwrap_or(""),
        None => rest,
    };
    let segments: Vec<String> = rest
        .split('/')
        .map(percent_decode)
        .collect::<Option<_>>()
        .unwrap_or_default();
    let valid = segments.len() == 3 && segments.iter().all(|s| !s.is_empty() && !s.contains('/'));
    Some(if valid {
        segments.join("/")
    } else {
        String::new()
    })
}

/// `%XX`-decoded UTF-8, or `None` for a bad escape or bytes that are not UTF-8.
fn percent_decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = segment.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

struct TrustedKey {
    name: String,
    key: DecodingKey,
    issuer: Option<String>,
    audience: String,
}

/// Verifies admin tokens and applies role rules.
pub struct AdminAuth {
    keys: Vec<TrustedKey>,
    roles: HashMap<String, Vec<RoleRule>>,
}

#[derive(Deserialize)]
struct AdminClaims {
    sub: Option<String>,
    role: Option<String>,
}

/// Admin auth set-up errors.
#[derive(Debug, thiserror::Error)]
pub enum AdminSetupError {
    /// A key file could not be read or parsed.
    #[error("admin key `{name}` ({path}): {reason}")]
    Key {
        /// Key name.
        name: String,
        /// File.
        path: String,
        /// Why.
        reason: String,
    },
    /// A role rule is malformed.
    #[error("admin.roles.{role}: {reason}")]
    Rule {
        /// Role name.
        role: String,
        /// Why.
        reason: String,
    },
}

impl AdminAuth {
    /// Build from config plus an optional development key (name, SPKI PEM) trusted for any issuer.
    pub fn new(cfg: &AdminConfig, dev_key: Option<(&str, &[u8])>) -> Result<Self, AdminSetupError> {
        let mut keys = Vec::new();
        for k in &cfg.keys {
            let pem = std::fs::read(&k.public_key_file).map_err(|e| AdminSetupError::Key {
                name: k.name.clone(),
                path: k.public_key_file.display().to_string(),
                reason: e.to_string(),
            })?;
            let key = DecodingKey::from_ed_pem(&pem).map_err(|e| AdminSetupError::Key {
                name: k.name.clone(),
                path: k.public_key_file.display().to_string(),
                reason: format!("not an Ed25519 public key PEM: {e}"),
            })?;
            keys.push(TrustedKey {
                name: k.name.clone(),
                key,
                issuer: k.issuer.clone(),
                audience: k.audience.clone(),
            });
        }
        if let Some((name, pem)) = dev_key {
            let key = DecodingKey::from_ed_pem(pem).map_err(|e| AdminSetupError::Key {
                name: name.to_string(),
                path: "(development key)".into(),
                reason: e.to_string(),
            })?;
            keys.push(TrustedKey {
                name: name.to_string(),
                key,
                issuer: None,
                audience: "KBS".into(),
            });
        }
        let mut roles = HashMap::new();
        for (role, rules) in &cfg.roles {
            let parsed = rules
                .iter()
                .map(|r| RoleRule::parse(r))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|reason| AdminSetupError::Rule {
                    role: role.clone(),
                    reason,
                })?;
            roles.insert(role.clone(), parsed);
        }
        Ok(Self { keys, roles })
    }

    /// Check an already authenticated identity's role allows `method path` (the dashboard
    /// session, which holds the identity of the admin token it was opened with); the
    /// identity comes back scoped to this request.
    pub fn authorize_identity(
        &self,
        identity: &AdminIdentity,
        method: &Method,
        path: &str,
    ) -> Result<AdminIdentity, ApiError> {
        let resources = self.grant(&identity.role, method, path)?;
        Ok(AdminIdentity {
            resources,
            ..identity.clone()
        })
    }

    /// What `role` may do on `method path`: the resource scope of the rules that allow it,
    /// checked against the resource the URL names if any; 403 when no rule allows it.
    fn grant(&self, role: &str, method: &Method, path: &str) -> Result<ResourceScope, ApiError> {
        let denied = || {
            ApiError::forbidden(
                "AdminRoleDenied",
                format!("role `{role}` may not {method} {path}"),
            )
        };
        let matching: Vec<&RoleRule> = self
            .roles
            .get(role)
            .map(|rules| rules.iter().filter(|r| r.allows(method, path)).collect())
            .unwrap_or_default();
        if matching.is_empty() {
            return Err(denied());
        }
        let scope = ResourceScope::of(&matching);
        if let Some(resource) = resource_in_url(path)
            && !scope.allows(&resource)
        {
            return Err(denied());
        }
        Ok(scope)
    }

    /// Authenticate the bearer token and check the role allows `method path`.
    pub fn authorize(
        &self,
        headers: &HeaderMap,
        method: &Method,
        path: &str,
    ) -> Result<AdminIdentity, ApiError> {
        let token = bearer(headers).ok_or_else(|| {
            ApiError::unauthorized(
                "AdminAuthRequired",
                "admin endpoint: missing `Authorization: Bearer <admin JWT>`",
            )
        })?;
        let header = jsonwebtoken::decode_header(token).map_err(|e| {
            ApiError::unauthorized(
                "AdminTokenInvalid",
                format!("admin token is not a JWT: {e}"),
            )
        })?;
        if header.alg != Algorithm::EdDSA {
            return Err(ApiError::unauthorized(
                "AdminTokenInvalid",
                format!("admin token must be signed EdDSA, not {:?}", header.alg),
            ));
        }
        let mut last = ApiError::unauthorized(
            "AdminTokenInvalid",
            "admin token is not signed by a trusted admin key",
        );
        for k in self
            .keys
            .iter()
            .filter(|k| header.kid.as_deref().is_none_or(|kid| kid == k.name))
        {
            let mut v = Validation::new(Algorithm::EdDSA);
            v.set_audience(&[&k.audience]);
            v.set_required_spec_claims(&["exp", "aud"]);
            // A token minted for later (`nbf`) is not valid yet (RFC 7519, 4.1.5).
            v.validate_nbf = true;
            v.leeway = 5;
            if let Some(iss) = &k.issuer {
                v.set_issuer(&[iss]);
            }
            match jsonwebtoken::decode::<AdminClaims>(token, &k.key, &v) {
                Ok(data) => {
                    let role = data.claims.role.ok_or_else(|| {
                        ApiError::forbidden("AdminRoleMissing", "admin token has no `role` claim")
                    })?;
                    let resources = self.grant(&role, method, path)?;
                    return Ok(AdminIdentity {
                        subject: data.claims.sub.unwrap_or_else(|| "unknown".into()),
                        role,
                        key: k.name.clone(),
                        resources,
                        via: None,
                    });
                }
                Err(e) => {
                    last = match e.kind() {
                        ErrorKind::ExpiredSignature => {
                            ApiError::unauthorized("AdminTokenExpired", "admin token has expired")
                        }
                        ErrorKind::InvalidAudience => ApiError::unauthorized(
                            "AdminTokenInvalid",
                            format!("admin token audience does not include `{}`", k.audience),
                        ),
                        ErrorKind::ImmatureSignature => ApiError::unauthorized(
                            "AdminTokenInvalid",
                            "admin token is not valid yet (nbf is in the future)",
                        ),
                        ErrorKind::InvalidIssuer => ApiError::unauthorized(
                            "AdminTokenInvalid",
                            "admin token issuer is not trusted",
                        ),
                        ErrorKind::MissingRequiredClaim(c) => ApiError::unauthorized(
                            "AdminTokenInvalid",
                            format!("admin token lacks the `{c}` claim"),
                        ),
                        _ => continue,
                    };
                }
            }
        }
        Err(last)
    }
}

/// The token of an `Authorization: Bearer` header, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kbs_core::admin_key::{AdminKeyPair, AdminTokenRequest};
    use std::time::Duration;

    fn auth_with(roles: &[(&str, &[&str])]) -> (AdminAuth, AdminKeyPair) {
        let kp = AdminKeyPair::generate();
        let cfg = AdminConfig {
            keys: vec![],
            roles: roles
                .iter()
                .map(|(r, rules)| (r.to_string(), rules.iter().map(|s| s.to_string()).collect()))
                .collect::<BTreeMap<_, _>>(),
            dev_key: true,
        };
        let pem = kp.public_pem();
        (
            AdminAuth::new(&cfg, Some(("dev", pem.as_bytes()))).unwrap(),
            kp,
        )
    }

    fn headers(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("authorization", format!("Bearer {token}").parse().unwrap());
        h
    }

    #[test]
    fn roles_gate_method_and_path() {
        let (auth, kp) = auth_with(&[
            ("admin", &["* ^/kbs/.+$"]),
            ("reader", &["GET ^/kbs/v0/resource-policy$"]),
        ]);
        let admin = kp
            .sign(&AdminTokenRequest::new(
                "alice",
                "admin",
                Duration::from_secs(60),
            ))
            .unwrap();
        let id = auth
            .authorize(&headers(&admin), &Method::POST, "/kbs/v0/resource/a/b/c")
            .unwrap();
        assert_eq!(id.actor(), "alice@dev");
        let reader = kp
            .sign(&AdminTokenRequest::new(
                "bob",
                "reader",
                Duration::from_secs(60),
            ))
            .unwrap();
        assert!(
            auth.authorize(&headers(&reader), &Method::GET, "/kbs/v0/resource-policy")
                .is_ok()
        );
        let e = auth
            .authorize(&headers(&reader), &Method::POST, "/kbs/v0/resource-policy")
            .unwrap_err();
        assert_eq!(e.status.as_u16(), 403);
        let ghost = kp
            .sign(&AdminTokenRequest::new(
                "eve",
                "ghost",
                Duration::from_secs(60),
            ))
            .unwrap();
        assert_eq!(
            auth.authorize(&headers(&ghost), &Method::GET, "/kbs/v0/x")
                .unwrap_err()
                .status
                .as_u16(),
            403
        );
    }

    #[test]
    fn a_token_not_valid_yet_is_refused() {
        let (auth, kp) = auth_with(&[("admin", &["* ^/kbs/.+$"])]);
        let now = jsonwebtoken::get_current_timestamp();
        let key = jsonwebtoken::EncodingKey::from_ed_pem(kp.private_pem().as_bytes()).unwrap();
        let sign = |nbf: u64| {
            let claims = serde_json::json!({
                "sub": "x", "role": "admin", "aud": ["KBS"], "exp": now + 7200, "nbf": nbf
            });
            jsonwebtoken::encode(&jsonwebtoken::Header::new(Algorithm::EdDSA), &claims, &key)
                .unwrap()
        };
        let e = auth
            .authorize(&headers(&sign(now + 3600)), &Method::GET, "/kbs/x")
            .unwrap_err();
        assert_eq!((e.status.as_u16(), e.name), (401, "AdminTokenInvalid"));
        assert!(e.detail.contains("not valid yet"), "{}", e.detail);
        // Within the leeway, and from the past: valid.
        for nbf in [now + 2, now - 60] {
            auth.authorize(&headers(&sign(nbf)), &Method::GET, "/kbs/x")
                .unwrap();
        }
    }

    #[test]
    fn refuses_unknown_key_expired_alg_none_and_missing() {
        let (auth, _kp) = auth_with(&[("admin", &["* ^/kbs/.+$"])]);
        let stranger = AdminKeyPair::generate();
        let t = stranger
            .sign(&AdminTokenRequest::new(
                "x",
                "admin",
                Duration::from_secs(60),
            ))
            .unwrap();
        assert_eq!(
            auth.authorize(&headers(&t), &Method::GET, "/kbs/x")
                .unwrap_err()
                .status
                .as_u16(),
            401
        );
        let (auth, kp) = auth_with(&[("admin", &["* ^/kbs/.+$"])]);
        let mut req = AdminTokenRequest::new("x", "admin", Duration::from_secs(60));
        req.expires_at = Some(1_000);
        let t = kp.sign(&req).unwrap();
        let e = auth
            .authorize(&headers(&t), &Method::GET, "/kbs/x")
            .unwrap_err();
        assert_eq!(e.name, "AdminTokenExpired");
        // alg none: header {"alg":"none"} with the same claims and no signature.
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let none = format!(
            "{}.{}.",
            b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
            b64.encode(br#"{"sub":"x","role":"admin","aud":["KBS"],"exp":9999999999}"#)
        );
        assert_eq!(
            auth.authorize(&headers(&none), &Method::GET, "/kbs/x")
                .unwrap_err()
                .status
                .as_u16(),
            401
        );
        assert_eq!(
            auth.authorize(&HeaderMap::new(), &Method::GET, "/kbs/x")
                .unwrap_err()
                .name,
            "AdminAuthRequired"
        );
    }

    #[test]
    fn rule_parsing() {
        assert!(RoleRule::parse("GET,post ^/a$").is_ok());
        assert!(RoleRule::parse("^/a$").is_err());
        assert!(RoleRule::parse("G@T ^/a$").is_err());
        assert!(RoleRule::parse("* ([").is_err());
        assert!(RoleRule::parse("POST /a resources=web/.+").is_ok());
        assert!(RoleRule::parse("POST /a resources=([").is_err());
        assert!(
            RoleRule::parse("POST /a web/.+").is_err(),
            "third word is resources="
        );
        assert!(RoleRule::parse("POST /a resources=x extra").is_err());
    }

    fn token(kp: &AdminKeyPair, role: &str) -> HeaderMap {
        let t = kp
            .sign(&AdminTokenRequest::new("t", role, Duration::from_secs(60)))
            .unwrap();
        headers(&t)
    }

    /// issue 17 defect 13: a rule without `^...$` matched substrings, so `web-1` granted
    /// `web-10` (and `/x/kbs/v0/...`). Rules match the whole path; anchored rules still work.
    #[test]
    fn rules_match_the_whole_path() {
        let (auth, kp) = auth_with(&[
            ("web1", &["POST /kbs/v0/admin/guests/web-1/ping"]),
            ("anchored", &["GET ^/kbs/v0/admin/guests/web-1/.+$"]),
            ("prefix", &["GET ^/kbs/v0/splitapi/owner/web-1"]),
        ]);
        let prefix = token(&kp, "prefix");
        let may = |h: &HeaderMap, m: Method, p: &str| auth.authorize(h, &m, p).is_ok();
        assert!(
            !may(
                &prefix,
                Method::GET,
                "/kbs/v0/splitapi/owner/web-10/credentials"
            ),
            "`web-1` grants `web-10`"
        );
        assert!(may(&prefix, Method::GET, "/kbs/v0/splitapi/owner/web-1"));
        let web1 = token(&kp, "web1");
        assert!(may(&web1, Method::POST, "/kbs/v0/admin/guests/web-1/ping"));
        for denied in [
            "/kbs/v0/admin/guests/web-10/ping",
            "/kbs/v0/admin/guests/web-1/ping/x",
            "/evil/kbs/v0/admin/guests/web-1/ping",
        ] {
            assert!(!may(&web1, Method::POST, denied), "{denied}");
        }
        let anchored = token(&kp, "anchored");
        assert!(may(&anchored, Method::GET, "/kbs/v0/admin/guests/web-1/x"));
        assert!(!may(
            &anchored,
            Method::GET,
            "/kbs/v0/admin/guests/web-10/x"
        ));
    }

    /// A rule can be limited to resources: the gate checks resource URLs itself, and hands
    /// the scope to endpoints that name the resource in their body (rollouts).
    #[test]
    fn a_resource_constraint_limits_what_a_rule_grants() {
        let (auth, kp) = auth_with(&[
            (
                "web-ops",
                &[
                    "POST /kbs/v0/rotation/rollouts resources=web/.+",
                    "POST,DELETE /kbs/v0/resource/.+ resources=web/key/.+",
                ],
            ),
            (
                "mixed",
                &[
                    "POST /kbs/v0/rotation/rollouts resources=web/.+",
                    "* /kbs/.+",
                ],
            ),
        ]);
        let ops = token(&kp, "web-ops");
        let id = auth
            .authorize(&ops, &Method::POST, "/kbs/v0/rotation/rollouts")
            .unwrap();
        assert!(id.require_resource("web/key/tls").is_ok());
        let e = id.require_resource("db/key/tls").unwrap_err();
        assert_eq!((e.status.as_u16(), e.name), (403, "AdminRoleDenied"));
        assert!(
            id.require_resource("xweb/key/tls").is_err(),
            "the resources regex matches the whole path too"
        );
        let may = |m: Method, p: &str| auth.authorize(&ops, &m, p).is_ok();
        assert!(may(Method::POST, "/kbs/v0/resource/web/key/tls"));
        assert!(may(Method::DELETE, "/kbs/v0/resource/web/key/tls"));
        assert!(!may(Method::POST, "/kbs/v0/resource/db/key/tls"));
        assert!(!may(Method::POST, "/kbs/v0/resource/web/cert/tls"));
        // Percent-encoding names the same resource: decoded before the check.
        assert!(may(Method::POST, "/kbs/v0/resource/%77eb/key/tls"));
        assert!(!may(Method::POST, "/kbs/v0/resource/%64b/key/tls"));
        assert!(!may(Method::POST, "/kbs/v0/resource/web/key/%ff"));
        // A rule without a constraint lifts it.
        let mixed = token(&kp, "mixed");
        let id = auth
            .authorize(&mixed, &Method::POST, "/kbs/v0/rotation/rollouts")
            .unwrap();
        assert!(id.require_resource("db/key/tls").is_ok());
    }

    #[test]
    fn resource_urls_are_recognised() {
        assert_eq!(
            resource_in_url("/kbs/v0/resource/a/b/c").as_deref(),
            Some("a/b/c")
        );
        assert_eq!(
            resource_in_url("/kbs/v0/admin/resources/a/b/c/versions").as_deref(),
            Some("a/b/c")
        );
        assert_eq!(resource_in_url("/kbs/v0/resource/a/b").as_deref(), Some(""));
        assert_eq!(
            resource_in_url("/kbs/v0/resource/a/b/c/d").as_deref(),
            Some("")
        );
        assert_eq!(
            resource_in_url("/kbs/v0/resource/a/b%2fc/d").as_deref(),
            Some("")
        );
        assert_eq!(resource_in_url("/kbs/v0/rotation/rollouts"), None);
    }
}
