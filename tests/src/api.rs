//! Reading the KBS's errors: the admin client's `ClientError` and raw JSON error bodies.

use reqwest::StatusCode;
use serde_json::Value;
use server::admin_client::ClientError;

/// Where every KBS error type lives (the Trustee error namespace).
const ERROR_TYPE_PREFIX: &str = "https://github.com/confidential-containers/kbs/errors/";

/// The status and error name of an API error; panics on any other client error.
pub fn api_err(e: ClientError) -> (StatusCode, String) {
    let (status, name, _) = api_err_detail(e);
    (status, name)
}

/// The status, error name and detail of an API error; panics on any other client error.
pub fn api_err_detail(e: ClientError) -> (StatusCode, String, String) {
    match e {
        ClientError::Api {
            status,
            name,
            detail,
        } => (status, name, detail),
        other => panic!("expected an API error, got {other}"),
    }
}

/// The status and error name of a raw error response; see [`error_detail`].
pub async fn error_name(resp: reqwest::Response) -> (StatusCode, String) {
    let (status, name, _) = error_detail(resp).await;
    (status, name)
}

/// The status, error name and detail of a raw error response; asserts the body is the KBS's
/// JSON error shape (a Trustee error type and a detail that names the problem).
pub async fn error_detail(resp: reqwest::Response) -> (StatusCode, String, String) {
    let status = resp.status();
    let body: Value = resp.json().await.expect("error body is JSON");
    let detail = body["detail"].as_str().unwrap_or("").to_string();
    assert!(!detail.is_empty(), "detail names the problem: {body}");
    let name = body["type"]
        .as_str()
        .and_then(|t| t.strip_prefix(ERROR_TYPE_PREFIX))
        .unwrap_or_else(|| panic!("a Trustee error type: {body}"))
        .to_string();
    (status, name, detail)
}
