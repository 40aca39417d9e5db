//! The HTTP side of metrics: a middleware that counts and times every request by matched
//! route, and the `/metrics` exposition.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
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
    let method = method_label(req.method());
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

/// The `method` label: the standard methods by name, every other method (a peer can invent
/// any token) as `other`, so one label value stands for all of them.
fn method_label(method: &Method) -> String {
    const KNOWN: [Method; 9] = [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::HEAD,
        Method::OPTIONS,
        Method::PATCH,
        Method::CONNECT,
        Method::TRACE,
    ];
    if KNOWN.contains(method) {
        method.as_str().to_owned()
    } else {
        "other".to_owned()
    }
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use axum::Router;
    use axum::body::Body;
    use axum::routing::any;
    use prometheus_client::registry::Registry;
    use tower::ServiceExt;

    use super::*;

    /// issue 17 defect 4: 50 invented methods once made 50 series; they are one (`other`).
    #[tokio::test]
    async fn invented_methods_share_one_label_value() {
        let mut registry = Registry::default();
        let metrics = Arc::new(Metrics::register(&mut registry));
        let app = Router::new()
            .route("/x", any(|| async { "x" }))
            .layer(axum::middleware::from_fn_with_state(metrics.clone(), track));
        let send = |method: &str| {
            let request = Request::builder()
                .method(method)
                .uri("/x")
                .body(Body::empty())
                .unwrap();
            app.clone().oneshot(request)
        };
        for i in 0..50 {
            send(&format!("INVENTED{i}")).await.unwrap();
        }
        send("GET").await.unwrap();
        send("PATCH").await.unwrap();
        let count = |method: &str| {
            let labels = vec![
                ("route", "/x".to_string()),
                ("method", method.to_string()),
                ("status", "200".to_string()),
            ];
            metrics.http_requests.get(&labels).map(|c| c.get())
        };
        assert_eq!(count("other"), Some(50), "every invented method is `other`");
        assert_eq!((count("GET"), count("PATCH")), (Some(1), Some(1)));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let series = text
            .lines()
            .filter(|l| l.starts_with("http_requests_total{"))
            .count();
        assert_eq!(series, 3, "one series per method seen:\n{text}");
    }
}
