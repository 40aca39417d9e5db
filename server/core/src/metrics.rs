//! The core metric families (HTTP, attestation, policy, admin, tunnels, RPCs, events,
//! fleet, probes, storage) and the registry they and every plugin's own families are
//! registered in. Exposition (`/metrics`) and the HTTP middleware are the web layer's.

use std::time::Instant;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label set: ordered key/value pairs.
pub type Labels = Vec<(&'static str, String)>;

/// Latency buckets for request and RPC durations.
pub fn latency_histogram() -> Histogram {
    // 100 us .. ~13 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

/// The core's metric families (plugins register their own beside them). Cheap handles:
/// every family is reference-counted inside.
#[derive(Clone)]
pub struct Metrics {
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
    /// Live tunnels.
    pub tunnels_connected: Gauge,
    /// Tunnel handshakes by outcome.
    pub tunnel_handshakes: Family<Labels, Counter>,
    /// Tunnel disconnects by close code.
    pub tunnel_disconnects: Family<Labels, Counter>,
    /// Proven tunnels whose TEE key differs from the one last proven for the same guest id,
    /// by whether that previous tunnel was still up (`previous`: `connected`, `offline`).
    pub tunnel_key_changes: Family<Labels, Counter>,
    /// RPC calls by method and outcome.
    pub rpc_calls: Family<Labels, Counter>,
    /// RPC latency by method.
    pub rpc_duration: Family<Labels, Histogram, fn() -> Histogram>,
    /// Events, fleet, probes and storage latency.
    pub observability: ObservabilityMetrics,
}

impl Default for Metrics {
    /// Families registered nowhere (unit tests of the parts that record into them).
    fn default() -> Self {
        Self::register(&mut Registry::default())
    }
}

impl Metrics {
    /// Create every core family and register it in `registry` (whose prefix, `kbs`, the
    /// names get).
    pub fn register(registry: &mut Registry) -> Self {
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
        let tunnel_key_changes = Family::<Labels, Counter>::default();
        registry.register(
            "tunnel_tee_key_changes",
            "Tunnels proving a TEE key other than the one last proven for their guest id, by \
             whether the previous tunnel was still connected",
            tunnel_key_changes.clone(),
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
        let observability = ObservabilityMetrics::register(registry);
        Self {
            observability,
            http_requests,
            http_duration,
            errors,
            attestations,
            policy_decisions,
            admin_actions,
            tunnels_connected,
            tunnel_handshakes,
            tunnel_disconnects,
            tunnel_key_changes,
            rpc_calls,
            rpc_duration,
        }
    }

    /// Count one increment of a labelled counter.
    pub fn inc(family: &Family<Labels, Counter>, labels: &[(&'static str, &str)]) {
        let labels: Labels = labels.iter().map(|(k, v)| (*k, v.to_string())).collect();
        family.get_or_create(&labels).inc();
    }
}

fn storage_histogram() -> Histogram {
    // 50 us .. ~1.6 s
    Histogram::new(exponential_buckets(0.00005, 2.0, 16))
}

fn probe_histogram() -> Histogram {
    // 1 ms .. ~65 s
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// Observability metrics (events, fleet, probes, storage latency), registered with the core
/// families by [`Metrics::register`].
#[derive(Clone)]
pub struct ObservabilityMetrics {
    /// Events appended to the log, by kind.
    pub events_written: Family<Labels, Counter>,
    /// Events dropped because the writer fell behind (or storage failed).
    pub events_dropped: Counter,
    /// Audit entries that could not be written (storage failed or out of reach).
    pub audit_lost: Counter,
    /// Guests the fleet view knows (connected or not).
    pub fleet_guests: Gauge,
    /// Guests forgotten after `fleet.forget_after` without a tunnel.
    pub fleet_forgotten: Counter,
    /// Probes by kind and outcome.
    pub probes: Family<Labels, Counter>,
    /// Probe latency by kind.
    pub probe_duration: Family<Labels, Histogram, fn() -> Histogram>,
    /// Storage call latency by operation.
    pub storage_duration: Family<Labels, Histogram, fn() -> Histogram>,
}

impl ObservabilityMetrics {
    /// Create and register in `registry` (prefix `kbs_` comes from the registry).
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            events_written: Family::default(),
            events_dropped: Counter::default(),
            audit_lost: Counter::default(),
            fleet_guests: Gauge::default(),
            fleet_forgotten: Counter::default(),
            probes: Family::default(),
            probe_duration: Family::new_with_constructor(probe_histogram as fn() -> Histogram),
            storage_duration: Family::new_with_constructor(storage_histogram as fn() -> Histogram),
        };
        registry.register(
            "events_written",
            "Events appended to the event log, by kind",
            m.events_written.clone(),
        );
        registry.register(
            "events_dropped",
            "Events dropped because the event writer fell behind or storage failed",
            m.events_dropped.clone(),
        );
        registry.register(
            "audit_writes_lost",
            "Audit entries that could not be written to the audit log (storage failed or out of reach); each is in the log and the event log",
            m.audit_lost.clone(),
        );
        registry.register(
            "fleet_guests_known",
            "Guests the fleet view knows, connected or not",
            m.fleet_guests.clone(),
        );
        registry.register(
            "fleet_guests_forgotten",
            "Guests forgotten (fleet record and rotation sighting removed) after fleet.forget_after without a tunnel",
            m.fleet_forgotten.clone(),
        );
        registry.register(
            "probes",
            "Guest probes by kind and outcome",
            m.probes.clone(),
        );
        registry.register(
            "probe_duration_seconds",
            "Guest probe latency by kind",
            m.probe_duration.clone(),
        );
        registry.register(
            "storage_operation_duration_seconds",
            "Storage call latency by operation",
            m.storage_duration.clone(),
        );
        m
    }

    /// Record how long a storage operation took.
    pub fn storage(&self, op: &'static str, started: Instant) {
        self.storage_duration
            .get_or_create(&vec![("op", op.to_string())])
            .observe(started.elapsed().as_secs_f64());
    }
}

/// Every registered family, frozen once the KBS is built: what `/metrics` renders.
pub struct Exposition {
    registry: Registry,
}

impl std::fmt::Debug for Exposition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exposition").finish_non_exhaustive()
    }
}

impl Exposition {
    /// Freeze `registry`.
    pub fn new(registry: Registry) -> Self {
        Self { registry }
    }

    /// OpenMetrics text of every family.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
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
