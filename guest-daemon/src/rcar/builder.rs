//! Settings for a [`KbsClient`], checked once when it is built.

use std::path::PathBuf;

use super::client::KbsClient;
use super::error::{RcarError, one_line};
use super::http;
use crate::evidence::EvidenceProvider;
use crate::tee_key::TeeKeyPair;
use crate::tls::CaBundle;

/// Settings for a [`KbsClient`].
pub struct KbsClientBuilder {
    /// Base URL of the KBS (`http://` or `https://`, without `/kbs/v0`).
    pub kbs_url: String,
    /// PEM file of extra root certificates for an `https` KBS.
    pub ca_file: Option<PathBuf>,
    /// Init-data TOML text, sent with the attestation as `{"format": "toml", "body": ...}`.
    pub init_data: Option<String>,
    /// The TEE key; a fresh EC P-256 key when `None`.
    pub key: Option<TeeKeyPair>,
    /// Where the evidence comes from.
    pub evidence: Box<dyn EvidenceProvider>,
}

impl KbsClientBuilder {
    /// A builder with no CA file, no init-data and a fresh EC key.
    pub fn new(kbs_url: impl Into<String>, evidence: Box<dyn EvidenceProvider>) -> Self {
        Self {
            kbs_url: kbs_url.into(),
            ca_file: None,
            init_data: None,
            key: None,
            evidence,
        }
    }

    /// Trust the roots in this PEM file too.
    pub fn ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    /// Send this init-data TOML with each attestation.
    pub fn init_data(mut self, toml: impl Into<String>) -> Self {
        self.init_data = Some(toml.into());
        self
    }

    /// Use this TEE key instead of a fresh one.
    pub fn key(mut self, key: TeeKeyPair) -> Self {
        self.key = Some(key);
        self
    }

    /// Validate the settings and build the client.
    pub fn build(self) -> Result<KbsClient, RcarError> {
        let base = normalise_base_url(&self.kbs_url)?;
        if let Some(init_data) = &self.init_data {
            toml::from_str::<toml::Table>(init_data)
                .map_err(|e| RcarError::InitData(toml_error(init_data, &e)))?;
        }
        let ca = self
            .ca_file
            .as_deref()
            .map(CaBundle::from_pem_file)
            .transpose()?;
        let key = self.key.unwrap_or_else(TeeKeyPair::new_ec);
        Ok(KbsClient::new(
            base,
            http::client(true, ca.as_ref())?,
            http::client(false, ca.as_ref())?,
            key,
            self.evidence,
            self.init_data,
        ))
    }
}

/// A TOML error on one line: "line L, column C: message".
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let Some(at) = e.span().map(|span| span.start.min(text.len())) else {
        return one_line(e.message());
    };
    let before = text.get(..at).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("line {line}, column {column}: {}", one_line(e.message()))
}

fn normalise_base_url(url: &str) -> Result<String, RcarError> {
    let invalid = |reason| RcarError::InvalidUrl {
        url: url.to_owned(),
        reason,
    };
    let parsed = reqwest::Url::parse(url).map_err(|_| invalid("not an absolute URL"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(invalid("scheme must be http or https"));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(invalid("no host"));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(invalid("must not have a query or fragment"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(invalid("must not carry credentials"));
    }
    Ok(parsed.as_str().trim_end_matches('/').to_owned())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::evidence::SampleAttester;

    #[test]
    fn base_url_is_checked_and_normalised() {
        assert_eq!(
            normalise_base_url("http://kbs:8080/").unwrap(),
            "http://kbs:8080"
        );
        assert_eq!(
            normalise_base_url("https://kbs.example/prefix/").unwrap(),
            "https://kbs.example/prefix"
        );
        for bad in [
            "kbs:8080",
            "ftp://kbs",
            "http://kbs/?q=1",
            "http://u:p@kbs",
            "",
            "http://",
        ] {
            assert!(normalise_base_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn builder_rejects_bad_init_data_and_ca_file() {
        let err = KbsClientBuilder::new("http://kbs", Box::new(SampleAttester))
            .init_data("not = [valid")
            .build()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "init-data is not valid TOML: line 1, column 13: unclosed array, expected `]`"
        );
        let err = KbsClientBuilder::new("http://kbs", Box::new(SampleAttester))
            .init_data("a = 1\nb = \"x\"\nc = = 2\n")
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("line 3, column"), "{err}");
        let err = KbsClientBuilder::new("https://kbs", Box::new(SampleAttester))
            .ca_file("/nonexistent/ca.pem")
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }
}
