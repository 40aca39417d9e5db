//! Tunnel events as KBS metrics and log lines: the [`tunnel::TunnelObserver`] the tunnel
//! endpoint hands to every tunnel.

use std::sync::Arc;
use std::time::Duration;

use rpc_defs::CloseCode;
use tunnel::TunnelObserver;

use crate::metrics::Metrics;

/// Feeds `kbs_tunnels_connected`, `kbs_tunnel_handshakes{outcome}`,
/// `kbs_tunnel_disconnects{code}`, `kbs_rpc_calls{method,outcome}` and
/// `kbs_rpc_duration_seconds{method}`, and logs each connect and disconnect.
#[derive(Clone)]
pub struct TunnelMetrics {
    metrics: Arc<Metrics>,
}

impl TunnelMetrics {
    /// An observer recording into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl std::fmt::Debug for TunnelMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelMetrics").finish_non_exhaustive()
    }
}

/// Metrics label for a close code. The peer chooses its close code, so only the codes the
/// protocol and RFC 6455 define get their own label; anything else is `other`, which keeps
/// the label set small whatever a guest sends.
pub fn close_code_label(code: u16) -> String {
    let known = CloseCode::from_code(code).is_some() || (1000..=1015).contains(&code);
    if known {
        code.to_string()
    } else {
        "other".to_string()
    }
}

impl TunnelObserver for TunnelMetrics {
    fn handshake(&self, outcome: &'static str) {
        Metrics::inc(&self.metrics.tunnel_handshakes, &[("outcome", outcome)]);
    }

    fn connected(&self, guest_id: &str) {
        self.metrics.tunnels_connected.inc();
        tracing::info!(guest_id, "guest tunnel connected");
    }

    fn disconnected(&self, guest_id: &str, close_code: u16, reason: &str) {
        self.metrics.tunnels_connected.dec();
        let code = close_code_label(close_code);
        Metrics::inc(&self.metrics.tunnel_disconnects, &[("code", &code)]);
        tracing::info!(guest_id, close_code, reason, "guest tunnel disconnected");
    }

    fn rpc(&self, method: &'static str, outcome: &'static str, elapsed: Duration) {
        Metrics::inc(
            &self.metrics.rpc_calls,
            &[("method", method), ("outcome", outcome)],
        );
        self.metrics
            .rpc_duration
            .get_or_create(&vec![("method", method.to_string())])
            .observe(elapsed.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_code_labels_are_bounded() {
        assert_eq!(close_code_label(4409), "4409");
        assert_eq!(close_code_label(4503), "4503");
        assert_eq!(close_code_label(1006), "1006");
        assert_eq!(close_code_label(4999), "other");
        assert_eq!(close_code_label(0), "other");
    }

    #[test]
    fn events_move_the_metrics() {
        let mut registry = prometheus_client::registry::Registry::with_prefix("kbs");
        let metrics = Arc::new(Metrics::register(&mut registry));
        let exposition = crate::metrics::Exposition::new(registry);
        let observer = TunnelMetrics::new(metrics.clone());
        observer.handshake("ok");
        observer.connected("g1");
        observer.connected("g2");
        observer.disconnected("g1", 4409, "superseded");
        observer.rpc("ping", "ok", Duration::from_millis(2));
        let text = exposition.render();
        assert_eq!(metrics.tunnels_connected.get(), 1);
        assert!(
            text.contains("kbs_tunnel_handshakes_total{outcome=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("kbs_tunnel_disconnects_total{code=\"4409\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("kbs_rpc_calls_total{method=\"ping\",outcome=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("kbs_rpc_duration_seconds_count{method=\"ping\"} 1"),
            "{text}"
        );
    }
}
