//! Prometheus metrics (text exposition on `/metrics`) and the HTTP layer that records
//! request counts and latency by route and outcome.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::error::ErrorName;

/// Label set: ordered key/value pairs.
pub type Labels = Vec<(&'static str, String)>;

fn latency_histogram() -> Histogram {
    // 100 us .. ~13 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

/// All KBS metrics.
pub struct Metrics {
    registry: Registry,
    /// HTTP requests by route, method and status.
    pub http_requests: Family<Labels, Counter>,
    /// HTTP latency by route and outcome.
    pub http_duration: Family<Labels, Histogram, fn() -> Histogram>,
    /// API errors by name.
    pub errors: Family<Labels, Counter>,
    /// Attestations by TEE and outcome.
    pub attestations: Family<Labels, Counter>,
    /// Policy decisions by plugin and decision.
    pub policy_decisions: Family<Labels, Counter>,
    /// Admin actions by action and outcome.
    pub admin_actions: Family<Labels, Counter>,
    /// Live RCAR sessions.
    pub rcar_sessions: Gauge,
    /// Live tunnels.
    pub tunnels_connected: Gauge,
    /// Tunnel handshakes by outcome.
    pub tunnel_handshakes: Family<Labels, Counter>,
    /// Tunnel disconnects by close code.
    pub tunnel_disconnects: Family<Labels, Counter>,
    /// RPC calls by method and outcome.
    pub rpc_calls: Family<Labels, Counter>,
    /// RPC latency by method.
    pub rpc_duration: Family<Labels, Histogram, fn() -> Histogram>,
    /// Events, fleet, probes and storage latency (`crate::events`).
    pub observability: crate::events::ObservabilityMetrics,
    /// PKI plugin sign requests by outcome and key type (`crate::plugins::pki`).
    pub pki_sign: Family<Labels, Counter>,
    /// Rotation rollouts (`crate::rotation`).
    pub rotation: RotationMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Create and register every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kbs");
        let http_requests = Family::<Labels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route, method and status",
            http_requests.clone(),
        );
        let http_duration = Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency by route and outcome",
            http_duration.clone(),
        );
        let errors = Family::<Labels, Counter>::default();
        registry.register("api_errors", "API errors by error name", errors.clone());
        let attestations = Family::<Labels, Counter>::default();
        registry.register(
            "attestations",
            "RCAR attestations by TEE and outcome",
            attestations.clone(),
        );
        let policy_decisions = Family::<Labels, Counter>::default();
        registry.register(
            "policy_decisions",
            "Resource policy decisions by plugin and decision",
            policy_decisions.clone(),
        );
        let admin_actions = Family::<Labels, Counter>::default();
        registry.register(
            "admin_actions",
            "Admin actions by action and outcome",
            admin_actions.clone(),
        );
        let rcar_sessions = Gauge::default();
        registry.register("rcar_sessions", "Live RCAR sessions", rcar_sessions.clone());
        let tunnels_connected = Gauge::default();
        registry.register(
            "tunnels_connected",
            "Guest tunnels currently connected",
            tunnels_connected.clone(),
        );
        let tunnel_handshakes = Family::<Labels, Counter>::default();
        registry.register(
            "tunnel_handshakes",
            "Tunnel handshakes by outcome",
            tunnel_handshakes.clone(),
        );
        let tunnel_disconnects = Family::<Labels, Counter>::default();
        registry.register(
            "tunnel_disconnects",
            "Tunnel disconnects by close code",
            tunnel_disconnects.clone(),
        );
        let rpc_calls = Family::<Labels, Counter>::default();
        registry.register(
            "rpc_calls",
            "Server-to-guest RPC calls by method and outcome",
            rpc_calls.clone(),
        );
        let rpc_duration = Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "rpc_duration_seconds",
            "Server-to-guest RPC latency by method",
            rpc_duration.clone(),
        );
        let observability = crate::events::ObservabilityMetrics::register(&mut registry);
        let rotation = RotationMetrics::register(&mut registry);
        let pki_sign = Family::<Labels, Counter>::default();
        registry.register(
            "pki_sign",
            "PKI plugin sign requests by outcome and key type",
            pki_sign.clone(),
        );
        Self {
            rotation,
            pki_sign,
            observability,
            registry,
            http_requests,
            http_duration,
            errors,
            attestations,
            policy_decisions,
            admin_actions,
            rcar_sessions,
            tunnels_connected,
            tunnel_handshakes,
            tunnel_disconnects,
            rpc_calls,
            rpc_duration,
        }
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// Count one increment of a labelled counter.
    pub fn inc(family: &Family<Labels, Counter>, labels: &[(&'static str, &str)]) {
        let labels: Labels = labels.iter().map(|(k, v)| (*k, v.to_string())).collect();
        family.get_or_create(&labels).inc();
    }
}

/// Rotation metric families: rollouts by state, pushes by outcome, delivery latency.
#[derive(Clone, Debug)]
pub struct RotationMetrics {
    /// Rollouts in force by state (`running`, `completed`, `paused`).
    pub rollouts: Family<Labels, Gauge>,
    /// Rollout state changes by the state entered.
    pub rollout_transitions: Family<Labels, Counter>,
    /// Pushes by outcome (`acked`, `already_held`, `denied`, `failed`, `retry`, `disconnected`).
    pub pushes: Family<Labels, Counter>,
    /// Time from dispatching a push to its ack being stored, seconds.
    pub delivery: Histogram,
}

impl RotationMetrics {
    /// Create the families and register them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            rollouts: Family::default(),
            rollout_transitions: Family::default(),
            pushes: Family::default(),
            delivery: latency_histogram(),
        };
        registry.register(
            "rotation_rollouts",
            "Rotation rollouts in force, by state",
            m.rollouts.clone(),
        );
        registry.register(
            "rotation_rollout_transitions",
            "Rotation rollout state changes, by the state entered",
            m.rollout_transitions.clone(),
        );
        registry.register(
            "rotation_pushes",
            "Rotation pushes to guests, by outcome",
            m.pushes.clone(),
        );
        registry.register(
            "rotation_delivery_seconds",
            "Rotation delivery latency: push dispatched to ack stored",
            m.delivery.clone(),
        );
        m
    }
}

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
    State(metrics): State<Arc<Metrics>>,
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
            metrics.render(),
        )
    } else {
        (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            to_prometheus_text(&metrics.render()),
        )
    }
}

/// OpenMetrics text to the Prometheus 0.0.4 text format: counter families are named with
/// their `_total` suffix in `# HELP`/`# TYPE`, and `# UNIT`/`# EOF` lines go.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 1024);
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counters.contains(name) {
                    out.push_str(&format!("{prefix}{name}_total {tail}"));
                } else {
                    out.push_str(line);
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}
