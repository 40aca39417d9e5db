//! [`KbsClient`]: RCAR attestation and resource fetches against one KBS for one TEE key.

use std::fmt;
use std::time::Duration;

use kbs_types::{Attestation, Challenge, CompositeEvidence, InitData, Response, RuntimeData};
use reqwest::StatusCode;
use zeroize::Zeroizing;

use super::error::RcarError;
use super::http::{bad_response, read_body, read_error_body, transport};
use super::protocol::{
    INIT_DATA_FORMAT, TokenReply, build_request, runtime_data_digest, select_hash_algorithm,
};
use super::token::{Token, jwt_claims, jwt_expiry};
use super::{GET_RESOURCE_MAX_ATTEMPTS, KBS_PREFIX};
use crate::evidence::EvidenceProvider;
use crate::resource_path::ResourcePath;
use crate::tee_key::TeeKeyPair;

const EVIDENCE_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest challenge or token reply read.
const MAX_HANDSHAKE_BODY: usize = 1024 * 1024;
/// Largest sealed resource read.
const MAX_RESOURCE_BODY: usize = 32 * 1024 * 1024;

/// A client of one KBS for one TEE key: RCAR attestation and resource fetches.
pub struct KbsClient {
    base: String,
    http: reqwest::Client,
    passport_http: reqwest::Client,
    key: TeeKeyPair,
    evidence: Box<dyn EvidenceProvider>,
    init_data: Option<String>,
    token: Option<Token>,
}

impl fmt::Debug for KbsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KbsClient")
            .field("kbs_url", &self.base)
            .field("tee", &self.evidence.tee())
            .field("key", &self.key)
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

impl KbsClient {
    /// A client with no token yet (the builder has checked the settings).
    pub(super) fn new(
        base: String,
        http: reqwest::Client,
        passport_http: reqwest::Client,
        key: TeeKeyPair,
        evidence: Box<dyn EvidenceProvider>,
        init_data: Option<String>,
    ) -> Self {
        Self {
            base,
            http,
            passport_http,
            key,
            evidence,
            init_data,
            token: None,
        }
    }

    /// The token of the last successful attestation.
    pub fn token(&self) -> Option<&str> {
        self.token.as_ref().map(|t| t.jwt.as_str())
    }

    /// `exp` of the current token (seconds since the epoch), read without verifying it.
    pub fn token_expiry(&self) -> Option<u64> {
        self.token.as_ref().and_then(|t| t.exp)
    }

    /// The TEE key bound into the attestations.
    pub fn tee_key(&self) -> &TeeKeyPair {
        &self.key
    }

    /// The KBS base URL, without a trailing slash.
    pub fn kbs_url(&self) -> &str {
        &self.base
    }

    fn endpoint(&self, path: &str) -> String {
        format!("{}/{KBS_PREFIX}/{path}", self.base)
    }

    /// Run the RCAR handshake; on success the session cookie is stored and the token returned.
    pub async fn attest(&mut self) -> Result<String, RcarError> {
        let tee = self.evidence.tee();

        // Request -> Challenge.
        let step = format!("POST /{KBS_PREFIX}/auth");
        let challenge: Challenge = self
            .post_json(&step, &self.endpoint("auth"), &build_request(tee))
            .await?;
        let hash = select_hash_algorithm(&challenge.extra_params)?;
        tracing::debug!(%tee, hash = %hash, "KBS challenge received");

        // Bind the nonce and our key into the evidence. No device attesters:
        // additional evidence is empty, as upstream's without devices.
        let runtime_data = RuntimeData {
            nonce: challenge.nonce,
            tee_pubkey: self.key.export_pubkey(),
        };
        let additional_evidence = String::new();
        let report_data = runtime_data_digest(&runtime_data, &additional_evidence, hash)?;
        let primary_evidence = tokio::time::timeout(
            EVIDENCE_TIMEOUT,
            self.evidence.primary_evidence(report_data),
        )
        .await
        .map_err(|_| RcarError::EvidenceTimeout(EVIDENCE_TIMEOUT))??;

        // Attestation -> token.
        let attestation = Attestation {
            init_data: self.init_data.as_ref().map(|body| InitData {
                format: INIT_DATA_FORMAT.to_owned(),
                body: body.clone(),
            }),
            runtime_data,
            tee_evidence: CompositeEvidence {
                primary_evidence,
                additional_evidence,
            },
        };
        let step = format!("POST /{KBS_PREFIX}/attest");
        let reply: TokenReply = self
            .post_json(&step, &self.endpoint("attest"), &attestation)
            .await?;
        let jwt = reply.token;
        if jwt_claims(&jwt).is_none() {
            return Err(RcarError::BadResponse {
                step,
                reason: "token is not a JWT with a JSON claims object".into(),
            });
        }
        let exp = jwt_expiry(&jwt);
        tracing::info!(%tee, exp, "attested to the KBS");
        self.token = Some(Token {
            jwt: jwt.clone(),
            exp,
        });
        Ok(jwt)
    }

    async fn post_json<B: serde::Serialize, R: serde::de::DeserializeOwned>(
        &self,
        step: &str,
        url: &str,
        body: &B,
    ) -> Result<R, RcarError> {
        let mut resp = self
            .http
            .post(url)
            .json(body)
            .send()
            .await
            .map_err(|e| transport(step, &e))?;
        if resp.status() != StatusCode::OK {
            return Err(RcarError::Status {
                step: step.to_owned(),
                status: resp.status(),
                error: read_error_body(&mut resp).await,
            });
        }
        let bytes = read_body(&mut resp, MAX_HANDSHAKE_BODY)
            .await
            .map_err(|reason| bad_response(step, reason))?;
        serde_json::from_slice(&bytes).map_err(|e| bad_response(step, e.to_string()))
    }

    /// Fetch and open a resource with the session cookie, attesting first when
    /// there is no live token and again (up to [`GET_RESOURCE_MAX_ATTEMPTS`]
    /// GETs in all) when the KBS answers 401.
    pub async fn get_resource(
        &mut self,
        path: &ResourcePath,
    ) -> Result<Zeroizing<Vec<u8>>, RcarError> {
        if !self.token.as_ref().is_some_and(Token::is_live) {
            self.attest().await?;
        }
        let url = self.endpoint(&format!("resource/{path}"));
        let step = format!("GET /{KBS_PREFIX}/resource/{path}");
        let mut attempt = 1;
        loop {
            tracing::debug!(%path, attempt, "requesting resource");
            let resp = self
                .http
                .get(&url)
                .send()
                .await
                .map_err(|e| transport(&step, &e))?;
            match self.resource_reply(&step, path, resp).await {
                Err(RcarError::Status {
                    status: StatusCode::UNAUTHORIZED,
                    error,
                    ..
                }) => {
                    if attempt >= GET_RESOURCE_MAX_ATTEMPTS {
                        return Err(RcarError::Unauthorized {
                            path: path.clone(),
                            attempts: attempt,
                            error,
                        });
                    }
                    tracing::warn!(%path, attempt, %error, "KBS answered 401: attesting again");
                    self.attest().await?;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// GET `/kbs/v0/<path>` (a client-request plugin such as `splitapi/credentials`) with
    /// the session cookie and return the 200 body (at most 32 MiB). Attests first when
    /// there is no live token, and once more when the KBS answers 401; any other status is
    /// [`RcarError::Status`] with the KBS's error body.
    pub async fn get_attested(&mut self, path: &str) -> Result<Vec<u8>, RcarError> {
        self.call_attested(reqwest::Method::GET, path, None).await
    }

    /// `POST /kbs/v0/<path>` with `body` (`content_type`) in this client's attested session
    /// (attesting first when there is no live token, and once more after a 401); the
    /// reply's body on 200. The POST twin of [`get_attested`](Self::get_attested).
    pub async fn post_attested(
        &mut self,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<Vec<u8>, RcarError> {
        self.call_attested(reqwest::Method::POST, path, Some((content_type, body)))
            .await
    }

    async fn call_attested(
        &mut self,
        method: reqwest::Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<Vec<u8>, RcarError> {
        if !self.token.as_ref().is_some_and(Token::is_live) {
            self.attest().await?;
        }
        let path = path.trim_start_matches('/');
        let url = self.endpoint(path);
        let step = format!("{method} /{KBS_PREFIX}/{path}");
        let mut attempt = 1;
        loop {
            let mut request = self.http.request(method.clone(), &url);
            if let Some((content_type, body)) = &body {
                request = request
                    .header(reqwest::header::CONTENT_TYPE, *content_type)
                    .body(body.clone());
            }
            let mut resp = request.send().await.map_err(|e| transport(&step, &e))?;
            let status = resp.status();
            if status == StatusCode::OK {
                return read_body(&mut resp, MAX_RESOURCE_BODY)
                    .await
                    .map_err(|reason| bad_response(&step, reason));
            }
            let error = read_error_body(&mut resp).await;
            if status == StatusCode::UNAUTHORIZED && attempt < 2 {
                tracing::warn!(%step, %error, "KBS answered 401: attesting again");
                self.attest().await?;
                attempt += 1;
                continue;
            }
            return Err(RcarError::Status {
                step,
                status,
                error,
            });
        }
    }

    /// Fetch and open a resource in passport mode: `Authorization: Bearer
    /// <token>`, no cookie, no retry. The token must bind this client's TEE key.
    pub async fn get_resource_with_token(
        &self,
        token: &str,
        path: &ResourcePath,
    ) -> Result<Zeroizing<Vec<u8>>, RcarError> {
        let url = self.endpoint(&format!("resource/{path}"));
        let step = format!("GET /{KBS_PREFIX}/resource/{path}");
        let resp = self
            .passport_http
            .get(&url)
            .bearer_auth(token)
            .send()
            .await
            .map_err(|e| transport(&step, &e))?;
        match self.resource_reply(&step, path, resp).await {
            Err(RcarError::Status {
                status: StatusCode::UNAUTHORIZED,
                error,
                ..
            }) => Err(RcarError::Unauthorized {
                path: path.clone(),
                attempts: 1,
                error,
            }),
            other => other,
        }
    }

    /// Turn a resource reply into plaintext or the error its status says.
    async fn resource_reply(
        &self,
        step: &str,
        path: &ResourcePath,
        mut resp: reqwest::Response,
    ) -> Result<Zeroizing<Vec<u8>>, RcarError> {
        match resp.status() {
            StatusCode::OK => {
                let body = read_body(&mut resp, MAX_RESOURCE_BODY)
                    .await
                    .map_err(|reason| bad_response(step, reason))?;
                let jwe: Response = serde_json::from_slice(&body)
                    .map_err(|e| bad_response(step, format!("not a JWE: {e}")))?;
                self.key.open(&jwe).map_err(|error| RcarError::Unseal {
                    path: path.clone(),
                    error,
                })
            }
            StatusCode::NOT_FOUND => Err(RcarError::NotFound {
                path: path.clone(),
                error: read_error_body(&mut resp).await,
            }),
            status => Err(RcarError::Status {
                step: step.to_owned(),
                status,
                error: read_error_body(&mut resp).await,
            }),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::evidence::SampleAttester;
    use crate::rcar::KbsClientBuilder;

    #[test]
    fn client_is_send_and_sync_and_futures_are_send() {
        fn assert_send_sync<T: Send + Sync>(_: &T) {}
        fn assert_send<T: Send>(_: T) {}
        let mut client = KbsClientBuilder::new("http://127.0.0.1:1", Box::new(SampleAttester))
            .build()
            .unwrap();
        assert_send_sync(&client);
        let path: ResourcePath = "a/b/c".parse().unwrap();
        assert_send(client.get_resource(&path));
        assert_send(client.attest());
    }

    #[test]
    fn debug_does_not_leak_the_token() {
        let mut client = KbsClientBuilder::new("http://kbs", Box::new(SampleAttester))
            .build()
            .unwrap();
        client.token = Some(Token {
            jwt: "secret.token.value".into(),
            exp: Some(5),
        });
        let dbg = format!("{client:?}");
        assert!(!dbg.contains("secret.token.value"), "{dbg}");
        assert_eq!(client.token(), Some("secret.token.value"));
        assert_eq!(client.token_expiry(), Some(5));
    }
}
