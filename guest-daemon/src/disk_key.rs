//! The disk key of a provisioned VM (the KBS's `provisioner` plugin): the init-data the host
//! injected names the resource (`"trustee.kbs.resource" = "kbs+provisioner:///default/<uuid>/root"`
//! in its `[data]` table); after attestation the guest fetches
//! `GET /kbs/v0/provisioner/default/<uuid>/root`, opens the JWE with its TEE key and reads the
//! LUKS passphrase from the confdata TOML (`[data] "io.cryptsetup.key.text.root"`). The KBS
//! releases it only to a guest that attested exactly that init-data (docs/protocol.md,
//! "provisioner").

use zeroize::Zeroizing;

use crate::rcar::{KbsClient, RcarError};

/// The URI scheme of a provisioner resource in init-data.
const SCHEME: &str = "kbs+provisioner:///";
/// The confdata key holding the root disk's passphrase.
pub const ROOT_KEY: &str = "io.cryptsetup.key.text.root";

/// Why the disk key could not be had.
#[derive(Debug, thiserror::Error)]
pub enum DiskKeyError {
    /// The init-data names no provisioner resource.
    #[error("init-data: {0}")]
    InitData(String),
    /// Attestation or the fetch failed.
    #[error(transparent)]
    Rcar(#[from] RcarError),
    /// The answer did not open with the TEE key, or is not confdata.
    #[error("the KBS's answer: {0}")]
    Answer(String),
}

/// The KBS path (under `/kbs/v0/`) of the resource `initdata` names:
/// `provisioner/default/<uuid>/root`.
pub fn provisioner_path(initdata: &str) -> Result<String, DiskKeyError> {
    let table: toml::Table = toml::from_str(initdata)
        .map_err(|e| DiskKeyError::InitData(format!("not valid TOML: {}", e.message())))?;
    let uri = table
        .get("data")
        .and_then(|d| d.get("trustee.kbs.resource"))
        .and_then(|v| v.as_str())
        .ok_or_else(|| {
            DiskKeyError::InitData("no [data] \"trustee.kbs.resource\" string".into())
        })?;
    let rest = uri.strip_prefix(SCHEME).ok_or_else(|| {
        DiskKeyError::InitData(format!(
            "trustee.kbs.resource {uri:?} is not {SCHEME}<repo>/<uuid>/<tag>"
        ))
    })?;
    let parts: Vec<&str> = rest.split('/').collect();
    let segment_ok = |s: &str| {
        !s.is_empty()
            && s != "."
            && s != ".."
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    };
    if parts.len() != 3 || !parts.iter().all(|p| segment_ok(p)) {
        return Err(DiskKeyError::InitData(format!(
            "trustee.kbs.resource {uri:?} is not {SCHEME}<repo>/<uuid>/<tag>"
        )));
    }
    Ok(format!("provisioner/{rest}"))
}

/// A VM's confdata: the TOML as released, and the root disk's passphrase in it.
pub struct Confdata {
    /// The confdata TOML.
    pub toml: Zeroizing<String>,
    /// `[data] "io.cryptsetup.key.text.root"`.
    pub root_key: Zeroizing<String>,
}

/// Parse confdata TOML.
pub fn parse_confdata(text: String) -> Result<Confdata, DiskKeyError> {
    let text = Zeroizing::new(text);
    let table: toml::Table = toml::from_str(&text).map_err(|e| {
        DiskKeyError::Answer(format!("confdata is not valid TOML: {}", e.message()))
    })?;
    let key = table
        .get("data")
        .and_then(|d| d.get(ROOT_KEY))
        .and_then(|v| v.as_str())
        .ok_or_else(|| DiskKeyError::Answer(format!("confdata has no [data] {ROOT_KEY:?}")))?;
    let root_key = Zeroizing::new(key.to_owned());
    drop(table);
    Ok(Confdata {
        toml: text,
        root_key,
    })
}

/// Attest (when needed) and fetch the confdata at `path` (from [`provisioner_path`]).
pub async fn fetch(client: &mut KbsClient, path: &str) -> Result<Confdata, DiskKeyError> {
    let body = client.get_attested(path).await?;
    let plain = client
        .tee_key()
        .open_json(&body)
        .map_err(|e| DiskKeyError::Answer(e.to_string()))?;
    let text = String::from_utf8(plain.to_vec())
        .map_err(|_| DiskKeyError::Answer("confdata is not UTF-8".into()))?;
    parse_confdata(text)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const INITDATA: &str = "algorithm = \"sha384\"\nversion = \"0.1.0\"\n\n[data]\n\"trustee.kbs.url\" = \"http://127.0.0.1:8080\"\n\"trustee.kbs.resource\" = \"kbs+provisioner:///default/c007d2cc-5f14-41e5-a202-8d15f6f68607/root\"\n";

    #[test]
    fn the_path_comes_from_the_initdata() {
        assert_eq!(
            provisioner_path(INITDATA).unwrap(),
            "provisioner/default/c007d2cc-5f14-41e5-a202-8d15f6f68607/root"
        );
        for bad in [
            "",
            "[data]\n",
            "[data]\n\"trustee.kbs.resource\" = \"kbs:///default/x/root\"\n",
            "[data]\n\"trustee.kbs.resource\" = \"kbs+provisioner:///default/../root\"\n",
            "[data]\n\"trustee.kbs.resource\" = \"kbs+provisioner:///a/b\"\n",
        ] {
            assert!(provisioner_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn confdata_yields_the_root_key() {
        let c = parse_confdata(
            "version = \"0.1.0\"\n\n[data]\n\"io.cryptsetup.key.text.root\" = \"abc123\"\n".into(),
        )
        .unwrap();
        assert_eq!(c.root_key.as_str(), "abc123");
        assert!(parse_confdata("[data]\n".into()).is_err());
    }
}
