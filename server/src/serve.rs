//! The KBS's accept loop: the shared `listener` crate with the KBS's settings: upgrades on
//! (the tunnel is a WebSocket), the `[http]` timeouts and connection caps (the caps lowered
//! to what the open-file limit allows), request heads large enough for any token the KBS
//! issues, the configured drain grace, and the connection counters as metrics.

use std::sync::Arc;

use axum::Router;
use listener::{ConnectionStats, FixedApp, Limits, Server};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::HttpConfig;

/// Descriptors the process keeps for itself (database pool, key files, logs, the runtime)
/// when the connection cap is fitted under the open-file limit.
const FD_RESERVE: usize = 256;
/// Room in a request head beside the largest token (cookie or `Authorization`): the other
/// headers.
const HEAD_ROOM: usize = 32 * 1024;

/// Serve `app` on `listener` until `shutdown` is cancelled; then stop accepting, let
/// in-flight requests finish for up to `http.shutdown_grace`, and return.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: CancellationToken,
    http: &HttpConfig,
    stats: ConnectionStats,
) -> std::io::Result<()> {
    let limits = limits(http, raise_open_file_limit());
    tracing::info!(
        max_connections = limits.max_connections,
        max_http_connections = limits.max_http_connections,
        "connection caps"
    );
    Server::new(FixedApp::new(app, tls))
        .name("kbs")
        .with_upgrades()
        .limits(limits)
        .count_into(stats)
        .drain_grace(http.shutdown_grace)
        .serve(listener, shutdown)
        .await;
    Ok(())
}

/// The listener's limits for `[http]`, the caps fitted under `open_files` (the process's
/// open-file limit, when known) minus a reserve, keeping the tunnels' share. With
/// `max_connections` unset the cap is that bound itself ([`UNKNOWN_LIMIT_CAP`] when the
/// limit is unknown), and HTTP sockets get at most a sixteenth of it.
pub fn limits(http: &HttpConfig, open_files: Option<usize>) -> Limits {
    let mut limits = Limits::default();
    limits.handshake_timeout = http.tls_handshake_timeout;
    limits.first_byte_timeout = http.first_byte_timeout;
    limits.header_read_timeout = http.header_timeout;
    limits.body_timeout = http.body_timeout;
    limits.idle_timeout = http.idle_timeout;
    limits.max_header_bytes = kbs_core::token::MAX_TOKEN_BYTES + HEAD_ROOM;
    let room = open_files.map(|n| n.saturating_sub(FD_RESERVE).max(2));
    let Some(configured) = http.max_connections else {
        let cap = room.unwrap_or(UNKNOWN_LIMIT_CAP);
        limits.max_connections = cap;
        limits.max_http_connections = http.max_http_connections.min(cap / 16).max(1);
        return limits;
    };
    limits.max_connections = configured;
    limits.max_http_connections = http.max_http_connections;
    let Some(room) = room else {
        return limits;
    };
    if configured > room {
        // Keep the configured share of HTTP connections (at least one, and one place left
        // for a tunnel).
        let share = http.max_http_connections as f64 / configured as f64;
        let http_cap = ((room as f64 * share) as usize).clamp(1, room - 1);
        tracing::warn!(
            configured,
            open_file_limit = open_files,
            max_connections = room,
            max_http_connections = http_cap,
            "http.max_connections is above the open-file limit: lowered (raise LimitNOFILE or ulimit -n)"
        );
        limits.max_connections = room;
        limits.max_http_connections = http_cap;
    }
    limits
}

/// `max_connections` unset and the open-file limit unknown.
pub const UNKNOWN_LIMIT_CAP: usize = 16384;

/// Raises the process's soft limit on open files to the hard limit, and answers the soft
/// limit then in force: each tunnel is a socket, and the soft limit many systems start
/// services with (1,024) would cap a KBS at about 750 guests although the hard limit allows
/// far more.
fn raise_open_file_limit() -> Option<usize> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit
        .maximum
        .is_some_and(|hard| limit.current.is_some_and(|soft| soft < hard))
    {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => tracing::info!(
                from = limit.current,
                to = limit.maximum,
                "raised the open-file soft limit to the hard limit"
            ),
            Err(e) => tracing::warn!(error = %e, "could not raise the open-file soft limit"),
        }
    }
    let limit = getrlimit(Resource::Nofile);
    limit.current.and_then(|n| usize::try_from(n).ok())
}

/// The listener's counters as `kbs_connections_open{kind}`, `kbs_connections_evicted_total`
/// and `kbs_connections_timed_out_total`, read at each scrape.
pub fn register_metrics(registry: &mut Registry, stats: ConnectionStats) {
    registry.register_collector(Box::new(ConnectionMetrics(stats)));
}

#[derive(Debug)]
struct ConnectionMetrics(ConnectionStats);

impl Collector for ConnectionMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = &self.0;
        let http = stats.http();
        let upgraded = stats.open().saturating_sub(http);
        let open = ConstGauge::new(0i64);
        let mut family = encoder.encode_descriptor(
            "connections_open",
            "Sockets open: kind=http (TLS handshake, requests, idle) or upgraded (tunnels)",
            None,
            open.metric_type(),
        )?;
        for (kind, value) in [("http", http), ("upgraded", upgraded)] {
            let labels = [("kind", kind)];
            let gauge = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
            gauge.encode(family.encode_family(&labels)?)?;
        }
        for (name, help, value) in [
            (
                "connections_evicted",
                "Idle connections closed to make room for a new one at http.max_http_connections",
                stats.evicted(),
            ),
            (
                "connections_timed_out",
                "Connections closed because the peer let a deadline pass (TLS handshake, first bytes, idle)",
                stats.timed_out(),
            ),
        ] {
            let counter = ConstCounter::new(value);
            let metric = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default takes what the open-file limit allows: on this project's machines
    /// (20,000) that is 19,744 sockets, not the 16,384 of a fixed default.
    #[test]
    fn by_default_the_cap_is_what_the_open_file_limit_allows() {
        let http = HttpConfig::default();
        let at = |n| {
            let l = limits(&http, n);
            (l.max_connections, l.max_http_connections)
        };
        assert_eq!(at(Some(20_000)), (19_744, 1024));
        assert_eq!(at(Some(1_000_000)), (999_744, 1024));
        assert_eq!(at(Some(1024)), (768, 48));
        assert_eq!(at(Some(100)), (2, 1));
        assert_eq!(at(None), (UNKNOWN_LIMIT_CAP, 1024));
    }

    #[test]
    fn set_caps_fit_under_the_open_file_limit_keeping_the_tunnels_share() {
        let http = HttpConfig {
            max_connections: Some(16384),
            ..HttpConfig::default()
        };
        let roomy = limits(&http, Some(1_000_000));
        assert_eq!(
            (roomy.max_connections, roomy.max_http_connections),
            (16384, 1024)
        );
        assert_eq!(limits(&http, Some(20_000)).max_connections, 16384);
        assert_eq!(limits(&http, None).max_connections, 16384);
        let tight = limits(&http, Some(1024));
        assert_eq!(
            (tight.max_connections, tight.max_http_connections),
            (768, 48)
        );
        assert!(roomy.max_header_bytes > kbs_core::token::MAX_TOKEN_BYTES);
        assert_eq!(roomy.body_timeout, http.body_timeout);
    }
}
