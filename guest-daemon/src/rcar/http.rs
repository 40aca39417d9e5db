//! The client's HTTP transport: reqwest settings (timeouts, idle pool), body reads bounded
//! by size, and errors that name the request and every cause.

use std::time::Duration;

use super::error::{ErrorBody, RcarError};
use crate::tls::CaBundle;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The KBS keeps idle connections 5 s (as upstream notes): drop ours sooner
/// so a request never lands on a connection the server is closing.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// Largest error body read; the rest is dropped.
const MAX_ERROR_BODY: usize = 16 * 1024;

/// A client for the KBS: the timeouts above, the CA bundle's roots on top of the webpki
/// ones, and a cookie store for the RCAR session when `cookies`.
pub(super) fn client(cookies: bool, ca: Option<&CaBundle>) -> Result<reqwest::Client, RcarError> {
    let mut builder = reqwest::Client::builder()
        .cookie_store(cookies)
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .user_agent(concat!("tether-guest-daemon/", env!("CARGO_PKG_VERSION")));
    if let Some(ca) = ca {
        builder = ca.add_to_reqwest(builder)?;
    }
    builder
        .build()
        .map_err(|e| RcarError::Client(error_chain(&e)))
}

/// Read a body of at most `limit` bytes.
pub(super) async fn read_body(
    resp: &mut reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, String> {
    if let Some(len) = resp.content_length().filter(|len| *len > limit as u64) {
        return Err(format!(
            "body of {len} bytes exceeds the {limit}-byte limit"
        ));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| error_chain(&e))? {
        if body.len() + chunk.len() > limit {
            return Err(format!("body exceeds the {limit}-byte limit"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The error body of a non-200 reply; a body that cannot be read is reported as such.
pub(super) async fn read_error_body(resp: &mut reqwest::Response) -> ErrorBody {
    let mut body = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                let room = MAX_ERROR_BODY.saturating_sub(body.len());
                body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                if body.len() >= MAX_ERROR_BODY {
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                return ErrorBody {
                    error_type: None,
                    detail: format!("(error body unreadable: {})", error_chain(&e)),
                };
            }
        }
    }
    ErrorBody::parse(&body)
}

/// A reqwest error and its causes on one line ("timed out" spelled out).
pub(super) fn error_chain(e: &reqwest::Error) -> String {
    let mut msg = if e.is_timeout() {
        format!("timed out (connect {CONNECT_TIMEOUT:?}, request {REQUEST_TIMEOUT:?}): {e}")
    } else {
        e.to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let s_msg = s.to_string();
        if !msg.contains(&s_msg) {
            msg.push_str(": ");
            msg.push_str(&s_msg);
        }
        source = s.source();
    }
    msg
}

/// A request that did not complete.
pub(super) fn transport(step: &str, e: &reqwest::Error) -> RcarError {
    RcarError::Transport {
        step: step.to_owned(),
        reason: error_chain(e),
    }
}

/// A 200 reply that is not what the protocol says.
pub(super) fn bad_response(step: &str, reason: String) -> RcarError {
    RcarError::BadResponse {
        step: step.to_owned(),
        reason,
    }
}
