//! Init-data: the TOML document the host injects into a guest and the guest
//! sends at attestation. Its digest is bound in the TEE report (checked by
//! real verifiers); its `[tether]` table names the guest.

use std::collections::BTreeMap;

use kbs_types::{HashAlgorithm, InitData};
use serde_json::Value;

use crate::identity::GuestIdentity;

/// The only init-data format accepted.
pub const INIT_DATA_FORMAT: &str = "toml";
const MAX_GUEST_ID_LEN: usize = 128;
const MAX_LABEL_LEN: usize = 63;
const MAX_LABELS: usize = 64;

/// Why init-data was refused.
#[derive(Debug, thiserror::Error)]
pub enum InitDataError {
    /// The body exceeds the configured limit.
    #[error("init-data is {size} bytes, the limit is {limit}")]
    TooLarge {
        /// Body size in bytes.
        size: usize,
        /// Configured limit.
        limit: usize,
    },
    /// Wrong format, bad TOML, or an invalid key.
    #[error("invalid init-data: {0}")]
    Invalid(String),
}

impl InitDataError {
    /// HTTP status this error maps to.
    pub fn status(&self) -> u16 {
        match self {
            InitDataError::TooLarge { .. } => 413,
            InitDataError::Invalid(_) => 400,
        }
    }

    /// CamelCase error name for the JSON error type URL.
    pub fn name(&self) -> &'static str {
        match self {
            InitDataError::TooLarge { .. } => "InitDataTooLarge",
            InitDataError::Invalid(_) => "InvalidInitData",
        }
    }
}

/// Init-data parsed and digested, ready for the verifier and the token.
#[derive(Clone, Debug)]
pub struct InitDataClaims {
    /// Hash named by the top-level `algorithm` key (default sha384).
    pub algorithm: HashAlgorithm,
    /// Digest of the raw body bytes with `algorithm`.
    pub digest: Vec<u8>,
    /// The whole TOML document as JSON.
    pub claims: Value,
    /// Identity from the `[tether]` table, when present.
    pub identity: Option<GuestIdentity>,
}

/// Parses, size-checks and digests init-data.
pub fn parse(init: &InitData, max_bytes: usize) -> Result<InitDataClaims, InitDataError> {
    if init.format != INIT_DATA_FORMAT {
        return Err(InitDataError::Invalid(format!(
            "format {:?} (only {INIT_DATA_FORMAT:?} is supported)",
            truncate(&init.format)
        )));
    }
    if init.body.len() > max_bytes {
        return Err(InitDataError::TooLarge {
            size: init.body.len(),
            limit: max_bytes,
        });
    }
    let table: toml::Table = toml::from_str(&init.body)
        .map_err(|e| InitDataError::Invalid(format!("not valid TOML: {}", e.message())))?;

    let algorithm = match table.get("algorithm") {
        None => HashAlgorithm::Sha384,
        Some(toml::Value::String(name)) => match name.to_ascii_lowercase().as_str() {
            "sha256" => HashAlgorithm::Sha256,
            "sha384" => HashAlgorithm::Sha384,
            "sha512" => HashAlgorithm::Sha512,
            _ => {
                return Err(InitDataError::Invalid(format!(
                    "algorithm {:?} (supported: sha256, sha384, sha512)",
                    truncate(name)
                )));
            }
        },
        Some(_) => return Err(InitDataError::Invalid("algorithm must be a string".into())),
    };
    let identity = match table.get("tether") {
        None => None,
        Some(toml::Value::Table(tether)) => Some(parse_tether(tether)?),
        Some(_) => return Err(InitDataError::Invalid("tether must be a table".into())),
    };
    let digest = algorithm.digest(init.body.as_bytes());
    let claims = table_to_json(&table);
    Ok(InitDataClaims {
        algorithm,
        digest,
        claims,
        identity,
    })
}

/// Identity from the `tether` member of init-data claims another attestation service
/// verified (its token's `init_data_claims`), checked like the `[tether]` table here.
pub fn identity_from_claims(tether: &Value) -> Result<GuestIdentity, InitDataError> {
    match toml::Value::try_from(tether) {
        Ok(toml::Value::Table(table)) => parse_tether(&table),
        _ => Err(InitDataError::Invalid("tether must be a table".into())),
    }
}

/// Identity from `[tether]`: `guest_id` and `[tether.labels]`. A missing
/// guest_id is left empty here and derived from the TEE key by the caller.
fn parse_tether(tether: &toml::Table) -> Result<GuestIdentity, InitDataError> {
    let mut guest_id = String::new();
    let mut labels = BTreeMap::new();
    let mut name = None;
    let mut ip = None;
    for (key, value) in tether {
        match key.as_str() {
            "name" => {
                let text = value
                    .as_str()
                    .ok_or_else(|| InitDataError::Invalid("tether.name must be a string".into()))?;
                if !is_dns_name(text) {
                    return Err(InitDataError::Invalid(format!(
                        "tether.name {:?} must be a DNS name: dot-separated labels of [A-Za-z0-9-], \
                         1..=63 characters each, not starting or ending with '-', at most {MAX_DNS_NAME_LEN} in all",
                        truncate(text)
                    )));
                }
                name = Some(text.to_ascii_lowercase());
            }
            "ip" => {
                let text = value
                    .as_str()
                    .ok_or_else(|| InitDataError::Invalid("tether.ip must be a string".into()))?;
                ip = Some(text.parse::<std::net::IpAddr>().map_err(|_| {
                    InitDataError::Invalid(format!(
                        "tether.ip {:?} must be an IPv4 or IPv6 address",
                        truncate(text)
                    ))
                })?);
            }
            "guest_id" => {
                let id = value.as_str().ok_or_else(|| {
                    InitDataError::Invalid("tether.guest_id must be a string".into())
                })?;
                if id.is_empty() || id.len() > MAX_GUEST_ID_LEN || !id.bytes().all(is_name_byte) {
                    return Err(InitDataError::Invalid(format!(
                        "tether.guest_id {:?} must be 1..={MAX_GUEST_ID_LEN} characters of [A-Za-z0-9._-]",
                        truncate(id)
                    )));
                }
                guest_id = id.to_owned();
            }
            "labels" => {
                let table = value.as_table().ok_or_else(|| {
                    InitDataError::Invalid("tether.labels must be a table".into())
                })?;
                if table.len() > MAX_LABELS {
                    return Err(InitDataError::Invalid(format!(
                        "tether.labels has {} entries, at most {MAX_LABELS} are allowed",
                        table.len()
                    )));
                }
                for (name, value) in table {
                    if name.is_empty()
                        || name.len() > MAX_LABEL_LEN
                        || !name.bytes().all(|b| is_name_byte(b) || b == b'/')
                    {
                        return Err(InitDataError::Invalid(format!(
                            "tether.labels key {:?} must be 1..={MAX_LABEL_LEN} characters of [A-Za-z0-9._/-]",
                            truncate(name)
                        )));
                    }
                    let text = value.as_str().ok_or_else(|| {
                        InitDataError::Invalid(format!("tether.labels.{name} must be a string"))
                    })?;
                    if text.len() > MAX_LABEL_LEN || !text.bytes().all(is_name_byte) {
                        return Err(InitDataError::Invalid(format!(
                            "tether.labels.{name} value {:?} must be at most {MAX_LABEL_LEN} characters of [A-Za-z0-9._-]",
                            truncate(text)
                        )));
                    }
                    labels.insert(name.clone(), text.to_owned());
                }
            }
            other => {
                return Err(InitDataError::Invalid(format!(
                    "unknown key tether.{}",
                    truncate(other)
                )));
            }
        }
    }
    Ok(GuestIdentity {
        guest_id,
        labels: tunnel::labels::intern(std::sync::Arc::new(labels)),
        name,
        ip,
    })
}

const MAX_DNS_NAME_LEN: usize = 253;

/// A hostname usable as a certificate DNS SAN (RFC 1123 labels, no wildcard).
pub fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_DNS_NAME_LEN
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}

/// Keeps peer-supplied text in error messages short.
fn truncate(text: &str) -> &str {
    match text.char_indices().nth(64) {
        Some((end, _)) => &text[..end],
        None => text,
    }
}

fn table_to_json(table: &toml::Table) -> Value {
    Value::Object(
        table
            .iter()
            .map(|(k, v)| (k.clone(), toml_to_json(v)))
            .collect(),
    )
}

fn toml_to_json(value: &toml::Value) -> Value {
    match value {
        toml::Value::String(s) => Value::String(s.clone()),
        toml::Value::Integer(i) => Value::from(*i),
        toml::Value::Float(f) => serde_json::Number::from_f64(*f)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(f.to_string())),
        toml::Value::Boolean(b) => Value::Bool(*b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(items) => Value::Array(items.iter().map(toml_to_json).collect()),
        toml::Value::Table(t) => table_to_json(t),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256, Sha384, Sha512};

    fn init(body: &str) -> InitData {
        InitData {
            format: "toml".into(),
            body: body.into(),
        }
    }

    const UPSTREAM_STYLE: &str = r#"
algorithm = "sha256"
version = "0.1.0"

[data]
"aa.toml" = '''
[token_configs.kbs]
url = "http://kbs:8080"
'''
"policy.rego" = "package agent_policy"

[tether]
guest_id = "web-01.prod"

[tether.labels]
app = "web"
"tier/zone" = "eu-1"
empty = ""
"#;

    #[test]
    fn parses_upstream_document_with_identity() {
        let parsed = parse(&init(UPSTREAM_STYLE), 65536).unwrap();
        assert_eq!(parsed.algorithm, HashAlgorithm::Sha256);
        assert_eq!(
            parsed.digest,
            Sha256::digest(UPSTREAM_STYLE.as_bytes()).to_vec()
        );
        assert_eq!(parsed.claims["version"], "0.1.0");
        assert!(
            parsed.claims["data"]["aa.toml"]
                .as_str()
                .unwrap()
                .contains("kbs:8080")
        );
        let identity = parsed.identity.unwrap();
        assert_eq!(identity.guest_id, "web-01.prod");
        assert_eq!(identity.labels["tier/zone"], "eu-1");
        assert_eq!(identity.labels["empty"], "");
    }

    #[test]
    fn algorithm_selects_the_digest() {
        let body = "version = \"0.1.0\"\n";
        assert_eq!(
            parse(&init(body), 1024).unwrap().digest,
            Sha384::digest(body.as_bytes()).to_vec(),
            "default is sha384"
        );
        let body = "algorithm = \"SHA512\"\n";
        assert_eq!(
            parse(&init(body), 1024).unwrap().digest,
            Sha512::digest(body.as_bytes()).to_vec()
        );
        let err = parse(&init("algorithm = \"md5\"\n"), 1024).unwrap_err();
        assert!(err.to_string().contains("md5"), "{err}");
        assert!(parse(&init("algorithm = 3\n"), 1024).is_err());
    }

    #[test]
    fn name_and_ip_are_parsed_and_checked() {
        let parsed = parse(
            &init("[tether]\nguest_id = \"g1\"\nname = \"Sandbox-1.example\"\nip = \"10.0.0.7\"\n"),
            1024,
        )
        .unwrap();
        let identity = parsed.identity.unwrap();
        assert_eq!(identity.name.as_deref(), Some("sandbox-1.example"));
        assert_eq!(identity.ip, Some("10.0.0.7".parse().unwrap()));
        let parsed = parse(&init("[tether]\nip = \"fd00::1\"\n"), 1024).unwrap();
        assert_eq!(
            parsed.identity.unwrap().ip,
            Some("fd00::1".parse().unwrap())
        );
        for (text, needle) in [
            ("[tether]\nname = \"bad_name\"\n", "tether.name"),
            ("[tether]\nname = \"-x.example\"\n", "tether.name"),
            ("[tether]\nname = \"a..b\"\n", "tether.name"),
            ("[tether]\nname = 3\n", "tether.name"),
            ("[tether]\nip = \"10.0.0.300\"\n", "tether.ip"),
            ("[tether]\nip = \"host\"\n", "tether.ip"),
        ] {
            let err = parse(&init(text), 1024).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
        assert!(is_dns_name("a"));
        assert!(!is_dns_name(&format!("{}.x", "a".repeat(64))));
    }

    #[test]
    fn no_tether_table_means_no_identity() {
        let parsed = parse(&init("[data]\nx = \"y\"\n"), 1024).unwrap();
        assert!(parsed.identity.is_none());
        let parsed = parse(&init("[tether.labels]\napp = \"x\"\n"), 1024).unwrap();
        let identity = parsed.identity.unwrap();
        assert_eq!(identity.guest_id, "", "caller derives the id");
        assert_eq!(identity.labels["app"], "x");
    }

    #[test]
    fn rejects_wrong_format_size_and_syntax() {
        let mut json = init("{}");
        json.format = "json".into();
        assert!(matches!(parse(&json, 1024), Err(InitDataError::Invalid(m)) if m.contains("json")));
        assert!(matches!(
            parse(&init(&"#".repeat(2000)), 1000),
            Err(InitDataError::TooLarge {
                size: 2000,
                limit: 1000
            })
        ));
        assert!(parse(&init("not = [valid"), 1024).is_err());
    }

    #[test]
    fn invalid_identity_keys_are_named() {
        let cases = [
            ("[tether]\nguest_id = \"\"\n", "guest_id"),
            ("[tether]\nguest_id = \"has space\"\n", "guest_id"),
            ("[tether]\nguest_id = 5\n", "guest_id"),
            (
                &format!("[tether]\nguest_id = \"{}\"\n", "a".repeat(129)),
                "guest_id",
            ),
            ("[tether]\nguestid = \"x\"\n", "tether.guestid"),
            ("tether = 1\n", "tether"),
            ("[tether]\nlabels = 1\n", "labels"),
            ("[tether.labels]\n\"bad key!\" = \"x\"\n", "bad key!"),
            (
                &format!("[tether.labels]\n{} = \"x\"\n", "k".repeat(64)),
                "labels key",
            ),
            ("[tether.labels]\napp = \"a/b\"\n", "tether.labels.app"),
            ("[tether.labels]\napp = 1\n", "tether.labels.app"),
            (
                &format!("[tether.labels]\napp = \"{}\"\n", "v".repeat(64)),
                "tether.labels.app",
            ),
        ];
        for (body, needle) in cases {
            let err = parse(&init(body), 65536).unwrap_err();
            assert!(err.to_string().contains(needle), "{body}: {err}");
        }
        let many: String = (0..65).map(|i| format!("l{i} = \"v\"\n")).collect();
        let err = parse(&init(&format!("[tether.labels]\n{many}")), 65536).unwrap_err();
        assert!(err.to_string().contains("at most 64"), "{err}");
    }

    #[test]
    fn toml_values_map_to_json() {
        let body = "i = 3\nf = 1.5\nb = true\nd = 1979-05-27T07:32:00Z\narr = [1, \"x\"]\n[t]\nk = \"v\"\n";
        let claims = parse(&init(body), 1024).unwrap().claims;
        assert_eq!(claims["i"], 3);
        assert_eq!(claims["f"], 1.5);
        assert_eq!(claims["b"], true);
        assert_eq!(claims["d"], "1979-05-27T07:32:00Z");
        assert_eq!(claims["arr"][1], "x");
        assert_eq!(claims["t"]["k"], "v");
    }
}
