//! What the provisioner issues, without I/O: the VM identity of a request, its deterministic
//! UUID, the `initdata.toml` the host injects (and its digests), the confdata TOML the guest
//! gets back, and the record kept in the plugin's namespace. Formats are upstream Trustee's
//! provisioner plugin's, byte for byte (docs/protocol.md, "provisioner").

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use rand::Rng;
use serde::{Deserialize, Serialize};
use sha1::Digest as _;
use uuid::Uuid;
use zeroize::{Zeroize, Zeroizing};

/// Upstream's UUID v5 namespace: `Uuid::new_v5(&Uuid::NAMESPACE_URL, b"provisioner_plugin")`.
pub const UUID_NAMESPACE: Uuid = Uuid::from_u128(0xfeab5599_6854_52bc_95f0_0241c03e620a);
/// The repository of every provisioned resource path (`default/<uuid>/root`).
pub const REPOSITORY: &str = "default";
/// The tag of every provisioned resource path.
pub const TAG: &str = "root";
/// Longest `vm_name` and `namespace` accepted (a Kubernetes object name is at most 253).
pub const MAX_NAME_BYTES: usize = 253;
/// Largest provision request body (the two names and JSON around them fit easily).
pub const MAX_REQUEST_BYTES: usize = 4096;

/// Why a provision request was refused (400 unless said otherwise).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// Larger than [`MAX_REQUEST_BYTES`] (413).
    #[error("a provision request body is at most {MAX_REQUEST_BYTES} bytes, this one is {0}")]
    TooLarge(usize),
    /// Not UTF-8 JSON of the expected shape.
    #[error(
        "invalid provision request (expected {{\"vm_name\": \"..\", \"namespace\": \"..\"}}): {0}"
    )]
    Malformed(String),
    /// A field is out of range.
    #[error("invalid provision request: `{field}` {reason}")]
    Invalid {
        /// The field at fault.
        field: &'static str,
        /// Why.
        reason: String,
    },
}

impl RequestError {
    /// CamelCase name for the error body.
    pub fn name(&self) -> &'static str {
        match self {
            RequestError::TooLarge(_) => "PayloadTooLarge",
            RequestError::Malformed(_) | RequestError::Invalid { .. } => "InvalidProvisionRequest",
        }
    }
}

/// The VM a provision request names: upstream's body `{"vm_name": .., "namespace": ..}`
/// (`namespace` defaults to `"default"`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmIdentity {
    /// The VM's name.
    pub vm_name: String,
    /// Its namespace.
    #[serde(default = "default_namespace")]
    pub namespace: String,
}

fn default_namespace() -> String {
    "default".into()
}

impl VmIdentity {
    /// Parse and check a request body.
    pub fn parse(body: &[u8]) -> Result<Self, RequestError> {
        if body.len() > MAX_REQUEST_BYTES {
            return Err(RequestError::TooLarge(body.len()));
        }
        let text = std::str::from_utf8(body)
            .map_err(|e| RequestError::Malformed(format!("the body is not UTF-8: {e}")))?;
        let id: Self =
            serde_json::from_str(text).map_err(|e| RequestError::Malformed(e.to_string()))?;
        check_name("vm_name", &id.vm_name)?;
        check_name("namespace", &id.namespace)?;
        // `namespace/vm_name` is the UUID's input: a slash in the namespace would let
        // ("a/b", "c") and ("a", "b/c") name the same VM.
        if id.namespace.contains('/') {
            return Err(RequestError::Invalid {
                field: "namespace",
                reason: "must not contain '/'".into(),
            });
        }
        Ok(id)
    }

    /// The deterministic UUID of this VM (upstream's: v5 of `namespace/vm_name`).
    pub fn uuid(&self) -> Uuid {
        uuid_v5(
            &UUID_NAMESPACE,
            format!("{}/{}", self.namespace, self.vm_name).as_bytes(),
        )
    }
}

fn check_name(field: &'static str, value: &str) -> Result<(), RequestError> {
    if value.is_empty() || value.len() > MAX_NAME_BYTES {
        return Err(RequestError::Invalid {
            field,
            reason: format!("must be 1..={MAX_NAME_BYTES} bytes, is {}", value.len()),
        });
    }
    if value.chars().any(char::is_control) {
        return Err(RequestError::Invalid {
            field,
            reason: "must not contain control characters".into(),
        });
    }
    Ok(())
}

/// RFC 4122 name-based UUID, version 5 (SHA-1).
pub fn uuid_v5(namespace: &Uuid, name: &[u8]) -> Uuid {
    let mut hash = sha1::Sha1::new();
    hash.update(namespace.as_bytes());
    hash.update(name);
    let digest = hash.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_sha1_bytes(bytes).into_uuid()
}

/// `default/<uuid>/root`.
pub fn resource_path(uuid: &Uuid) -> String {
    format!("{REPOSITORY}/{uuid}/{TAG}")
}

/// The `initdata.toml` of a VM (upstream's text exactly; `kbs_url` is checked at start to
/// need no TOML escaping).
pub fn initdata_toml(kbs_url: &str, resource_path: &str) -> String {
    format!(
        "algorithm = \"sha384\"\nversion = \"0.1.0\"\n\n[data]\n\"trustee.kbs.url\" = \"{kbs_url}\"\n\"trustee.kbs.resource\" = \"kbs+provisioner:///{resource_path}\"\n"
    )
}

/// The confdata TOML the guest receives (cvminjector's format, as upstream).
pub fn confdata_toml(luks_key: &str) -> Zeroizing<String> {
    Zeroizing::new(format!(
        "version = \"0.1.0\"\n\n[data]\n\"io.cryptsetup.key.text.root\" = \"{luks_key}\"\n"
    ))
}

/// A random alphanumeric LUKS passphrase of `len` characters (upstream's alphabet:
/// ~5.95 bits each, so 32 characters hold ~190 bits).
pub fn generate_key(len: usize) -> Zeroizing<String> {
    let mut rng = rand::rngs::OsRng;
    Zeroizing::new(
        (0..len)
            .map(|_| char::from(rng.sample(rand::distributions::Alphanumeric)))
            .collect(),
    )
}

/// SHA-384 of the init-data: what TDX holds in MRCONFIGID and the token in `init_data`.
pub fn initdata_digest(initdata: &str) -> [u8; 48] {
    sha2::Sha384::digest(initdata.as_bytes()).into()
}

/// One provisioned VM, as stored (sealed under the KEK by the plugin's namespace).
#[derive(Clone, Serialize, Deserialize)]
pub struct ProvisionRecord {
    /// The deterministic UUID.
    pub uuid: String,
    /// The VM's namespace.
    pub namespace: String,
    /// The VM's name.
    pub vm_name: String,
    /// `default/<uuid>/root`.
    pub resource_path: String,
    /// The `initdata.toml` issued for it (kept: a later change of `kbs_url` must not change
    /// what a provisioned VM was given).
    pub initdata: String,
    /// Hex SHA-384 of `initdata`: the init-data digest the guest must attest.
    pub init_data_digest: String,
    /// The LUKS passphrase.
    pub luks_key: String,
    /// Unix seconds.
    pub created_at: u64,
    /// The admin who provisioned it.
    pub created_by: String,
}

impl Drop for ProvisionRecord {
    fn drop(&mut self) {
        self.luks_key.zeroize();
    }
}

impl std::fmt::Debug for ProvisionRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProvisionRecord")
            .field("uuid", &self.uuid)
            .field("namespace", &self.namespace)
            .field("vm_name", &self.vm_name)
            .finish_non_exhaustive()
    }
}

/// Upstream's provision answer (plus its `hostdata`, the SNP form of the same digest).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProvisionAnswer {
    /// The VM's UUID.
    pub uuid: String,
    /// Base64 of `initdata.toml` (the SMBIOS type 11 OEM string).
    pub oemstring: String,
    /// Base64 SHA-384 of `initdata.toml` (TDX MRCONFIGID, 48 bytes).
    pub mrconfigid: String,
    /// Base64 of the first 32 bytes of that digest (SNP HOST_DATA).
    pub hostdata: String,
    /// `default/<uuid>/root`.
    pub resource_path: String,
}

impl ProvisionRecord {
    /// A new record for `vm`: its UUID, a fresh key, the init-data pointing at `kbs_url`.
    pub fn new(vm: &VmIdentity, kbs_url: &str, key_length: usize, now: u64, by: &str) -> Self {
        let uuid = vm.uuid();
        let resource_path = resource_path(&uuid);
        let initdata = initdata_toml(kbs_url, &resource_path);
        let init_data_digest = hex::encode(initdata_digest(&initdata));
        let key = generate_key(key_length);
        Self {
            uuid: uuid.to_string(),
            namespace: vm.namespace.clone(),
            vm_name: vm.vm_name.clone(),
            resource_path,
            initdata,
            init_data_digest,
            luks_key: key.as_str().to_owned(),
            created_at: now,
            created_by: by.to_owned(),
        }
    }

    /// Whether this record is `vm`'s (not another VM's under a colliding UUID).
    pub fn is_for(&self, vm: &VmIdentity) -> bool {
        self.namespace == vm.namespace && self.vm_name == vm.vm_name
    }

    /// The answer to the provision request.
    pub fn answer(&self) -> ProvisionAnswer {
        let digest = initdata_digest(&self.initdata);
        ProvisionAnswer {
            uuid: self.uuid.clone(),
            oemstring: B64.encode(self.initdata.as_bytes()),
            mrconfigid: B64.encode(digest),
            hostdata: B64.encode(&digest[..32]),
            resource_path: self.resource_path.clone(),
        }
    }

    /// The confdata TOML released to the guest.
    pub fn confdata(&self) -> Zeroizing<String> {
        confdata_toml(&self.luks_key)
    }

    /// Whether `attested` (hex, as the token's `init_data` claim) is this VM's digest.
    pub fn digest_matches(&self, attested: &str) -> bool {
        // Both are public; a plain comparison leaks nothing.
        attested.eq_ignore_ascii_case(&self.init_data_digest)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_namespace_is_upstreams_derivation() {
        assert_eq!(
            uuid_v5(&Uuid::NAMESPACE_URL, b"provisioner_plugin"),
            UUID_NAMESPACE
        );
        // RFC 4122 / Python's uuid.uuid5(NAMESPACE_DNS, "python.org").
        assert_eq!(
            uuid_v5(&Uuid::NAMESPACE_DNS, b"python.org").to_string(),
            "886313e1-3b8a-5372-9b90-0c9aee199e5d"
        );
    }

    #[test]
    fn one_vm_one_uuid() {
        let a = VmIdentity::parse(br#"{"vm_name": "vm-1", "namespace": "team-a"}"#).unwrap();
        let again = VmIdentity::parse(br#"{"namespace": "team-a", "vm_name": "vm-1"}"#).unwrap();
        let other = VmIdentity::parse(br#"{"vm_name": "vm-1", "namespace": "team-b"}"#).unwrap();
        let default = VmIdentity::parse(br#"{"vm_name": "vm-1"}"#).unwrap();
        assert_eq!(default.namespace, "default");
        assert_eq!(a.uuid(), again.uuid());
        assert_ne!(a.uuid(), other.uuid());
        assert_eq!(a.uuid().get_version_num(), 5);
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let err = |body: &[u8]| VmIdentity::parse(body).unwrap_err().to_string();
        assert!(err(b"{}").contains("vm_name"), "{}", err(b"{}"));
        assert!(err(br#"{"vm_name": ""}"#).contains("1..=253"));
        assert!(err(br#"{"vm_name": 7}"#).contains("invalid type"));
        assert!(err(br#"{"vm_name": "a", "nmespace": "b"}"#).contains("nmespace"));
        assert!(err(br#"{"vm_name": "a", "namespace": "x/y"}"#).contains("'/'"));
        assert!(err(b"{\"vm_name\": \"a\\nb\"}").contains("control"));
        assert!(err(b"{\"vm_name\": \"\xff\"}").contains("UTF-8"));
        let huge = format!("{{\"vm_name\": \"{}\"}}", "v".repeat(300));
        assert!(err(huge.as_bytes()).contains("1..=253"));
        let larger = vec![b' '; MAX_REQUEST_BYTES + 1];
        assert_eq!(
            VmIdentity::parse(&larger).unwrap_err().name(),
            "PayloadTooLarge"
        );
    }

    #[test]
    fn initdata_and_digests_are_upstreams() {
        let vm = VmIdentity::parse(br#"{"vm_name": "vm-1"}"#).unwrap();
        let rec = ProvisionRecord::new(&vm, "https://kbs.example:8080", 32, 1, "ops");
        let uuid = vm.uuid();
        assert_eq!(rec.resource_path, format!("default/{uuid}/root"));
        assert_eq!(
            rec.initdata,
            format!(
                "algorithm = \"sha384\"\nversion = \"0.1.0\"\n\n[data]\n\"trustee.kbs.url\" = \"https://kbs.example:8080\"\n\"trustee.kbs.resource\" = \"kbs+provisioner:///default/{uuid}/root\"\n"
            )
        );
        let answer = rec.answer();
        let toml_text = String::from_utf8(B64.decode(&answer.oemstring).unwrap()).unwrap();
        assert_eq!(toml_text, rec.initdata);
        let digest = B64.decode(&answer.mrconfigid).unwrap();
        assert_eq!(digest.len(), 48);
        assert_eq!(hex::encode(&digest), rec.init_data_digest);
        assert_eq!(B64.decode(&answer.hostdata).unwrap(), digest[..32]);
        assert!(rec.digest_matches(&rec.init_data_digest.to_uppercase()));
        assert!(!rec.digest_matches(&"00".repeat(48)));
    }

    #[test]
    fn keys_are_random_alphanumeric_and_confdata_carries_them() {
        let a = generate_key(32);
        let b = generate_key(32);
        assert_eq!(a.len(), 32);
        assert_ne!(*a, *b);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric()));
        let confdata = confdata_toml(&a);
        assert_eq!(
            *confdata,
            format!(
                "version = \"0.1.0\"\n\n[data]\n\"io.cryptsetup.key.text.root\" = \"{}\"\n",
                *a
            )
        );
    }
}
