//! The HTTP side of metrics: a middleware that counts and times every request by matched
//! route, and the `/metrics` exposition.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use kbs_core::metrics::{Exposition, Metrics, to_prometheus_text};

use crate::error::ErrorName;

/// Middleware: count and time every request by matched route (never the raw path, which
/// an attacker controls and would explode label cardinality).
pub async fn track(State(metrics): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = req.method().as_str().to_string();
    let start = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status();
    let outcome = if status.is_success() || status.is_redirection() || status.as_u16() == 101 {
        "ok"
    } else if status.is_client_error() {
        "client_error"
    } else {
        "server_error"
    };
    metrics
        .http_requests
        .get_or_create(&vec![
            ("route", route.clone()),
            ("method", method),
            ("status", status.as_u16().to_string()),
        ])
        .inc();
    metrics
        .http_duration
        .get_or_create(&vec![("route", route), ("outcome", outcome.to_string())])
        .observe(start.elapsed().as_secs_f64());
    if let Some(ErrorName(name)) = resp.extensions().get::<ErrorName>() {
        metrics
            .errors
            .get_or_create(&vec![("name", name.to_string())])
            .inc();
    }
    resp
}

/// `GET /metrics`.
/// OpenMetrics for scrapers that ask for it (Prometheus does), the classic Prometheus text
/// format 0.0.4 for everyone else (curl, older parsers).
pub async fn expose(
    State(exposition): State<Arc<Exposition>>,
    headers: axum::http::HeaderMap,
) -> impl IntoResponse {
    let openmetrics = headers
        .get_all(axum::http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    if openmetrics {
        (
            [(
                axum::http::header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            exposition.render(),
        )
    } else {
        (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            to_prometheus_text(&exposition.render()),
        )
    }
}
