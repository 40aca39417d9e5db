//! The HTTP side: every request under `/kbs/v0/external/<name>/` is forwarded as upstream's
//! external plugin does it: `ValidateAuth` picks admin authentication or an attestation
//! token plus the resource policy; then `Handle`; on the attested path `NeedsEncryption`
//! decides whether the answer is JWE-sealed to the caller's TEE key.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{FromRef, FromRequest, FromRequestParts, Query, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use kbs_core::attest::RcarService;
use kbs_web::admin_gate::AdminGate;
use kbs_web::error::ApiError;
use kbs_web::extract::{ApiBytes, Attested, original_path};
use kbs_web::plugin::PluginContext;

use crate::backend::{Answer, Backend, CallError, Forwarded};

/// What the handler shares.
#[derive(Clone)]
pub struct ExternalApi {
    /// The plugin's context (`external/<name>`).
    pub ctx: PluginContext,
    /// The plugin process.
    pub backend: Arc<Backend>,
}

impl FromRef<ExternalApi> for Arc<AdminGate> {
    fn from_ref(api: &ExternalApi) -> Self {
        Self::from_ref(&api.ctx)
    }
}

impl FromRef<ExternalApi> for Arc<RcarService> {
    fn from_ref(api: &ExternalApi) -> Self {
        Self::from_ref(&api.ctx)
    }
}

impl From<CallError> for ApiError {
    fn from(e: CallError) -> Self {
        let detail = e.to_string();
        match e {
            CallError::Busy(..) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "PluginBusy", detail)
            }
            CallError::Unavailable(..) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "PluginUnavailable", detail)
            }
            CallError::NotFound(..) => ApiError::not_found("PluginNotFound", detail),
            // Upstream's `PluginInternalError`: 401.
            CallError::Refused(..) => ApiError::unauthorized("PluginInternalError", detail),
        }
    }
}

/// Any method, any path below the plugin's mount point.
pub async fn forward(State(api): State<ExternalApi>, req: Request) -> Response {
    match forward_checked(api, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// The path after the mount point, split and percent-decoded, as upstream forwards it:
/// `/a/b` -> `["a", "b"]`, `/` -> `[]`.
pub fn segments(path: &str) -> Result<Vec<String>, ApiError> {
    let rest = path.strip_prefix('/').unwrap_or(path);
    if rest.is_empty() {
        return Ok(Vec::new());
    }
    rest.split('/')
        .map(|s| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .map(|s| s.into_owned())
                .map_err(|_| {
                    ApiError::bad_request("InvalidRequestPath", "path is not UTF-8 once decoded")
                })
        })
        .collect()
}

async fn forward_checked(api: ExternalApi, req: Request) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let path = segments(parts.uri.path())?;
    let Query(query) = Query::<BTreeMap<String, String>>::try_from_uri(&parts.uri)
        .map_err(|e| ApiError::bad_request("MalformedRequest", e.body_text()))?;
    let ApiBytes(body) =
        ApiBytes::from_request(Request::from_parts(parts.clone(), body), &()).await?;
    let mut parts = parts;
    let forwarded = Forwarded {
        body,
        query: query.clone().into_iter().collect(),
        path,
        method: parts.method.to_string(),
    };
    let backend = &api.backend;
    // One slot for the whole exchange (up to three calls).
    let _permit = backend.permit().await?;
    let conn = backend.connection();

    if backend.validate_auth(&conn, &forwarded).await? {
        let gate = Arc::<AdminGate>::from_ref(&api);
        let admin = gate.authorize(&parts.headers, &parts.method, &original_path(&parts))?;
        let target = format!(
            "{} {} /{}",
            api.ctx.name(),
            forwarded.method,
            forwarded.path.join("/")
        );
        let result = backend.handle(&conn, &forwarded).await;
        let (outcome, detail) = match &result {
            Ok(a) => ("ok", format!("{} bytes", a.body.len())),
            Err(e) => ("error", e.to_string()),
        };
        api.ctx
            .audit(&admin, "external.handle", &target, outcome, detail)
            .await;
        return Ok(raw(result?));
    }

    let Attested(token) = Attested::from_request_parts(&mut parts, &api).await?;
    api.ctx
        .require_policy_path(&token.claims, &forwarded.path, &query)?;
    let answer = backend.handle(&conn, &forwarded).await?;
    if backend.needs_encryption(&conn, &forwarded).await? {
        let sealed = kbs_core::jwe::seal(&token.tee_pubkey, &answer.body)?;
        tracing::info!(
            plugin = api.ctx.name(),
            guest_id = %token.identity.guest_id,
            "external plugin answer sealed to the caller"
        );
        return Ok(Json(sealed).into_response());
    }
    Ok(raw(answer))
}

/// The plugin's body as is, with its content type when it gave a valid one (upstream
/// ignores the hint; honouring it changes nothing for a client that ignores it too).
fn raw(answer: Answer) -> Response {
    let content_type = HeaderValue::from_str(&answer.content_type)
        .ok()
        .filter(|_| !answer.content_type.is_empty())
        .unwrap_or(HeaderValue::from_static("application/octet-stream"));
    ([(CONTENT_TYPE, content_type)], answer.body).into_response()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_path_is_split_and_decoded_like_upstream() {
        assert_eq!(segments("/").unwrap(), Vec::<String>::new());
        assert_eq!(segments("").unwrap(), Vec::<String>::new());
        assert_eq!(segments("/a/b").unwrap(), ["a", "b"]);
        assert_eq!(segments("/a%20b/c/").unwrap(), ["a b", "c", ""]);
        assert!(segments("/%FF").is_err());
    }
}
