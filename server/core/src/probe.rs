//! [`Prober`]: ask guests through their tunnels for health, held resources and runtime
//! figures, one guest or many by label selector with bounded concurrency and a deadline.
//! Every outcome becomes the guest's last known state in the fleet view, and held versions
//! feed the drift query. The `probes` plugin serves it over HTTP and runs it periodically;
//! the admin guest API probes one guest with it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use rpc_defs::{ProbeKind, ProbeReport};
use serde::{Deserialize, Serialize};
use tunnel::{CallError, Hub};

use crate::fleet::{Fleet, LastProbe};
use crate::guest_directory::GuestDirectory;
use crate::metrics::ObservabilityMetrics;
use crate::selector::Selector;
use crate::storage::now_ms;

/// Default and largest concurrency of a selector probe.
pub const DEFAULT_CONCURRENCY: usize = 64;
/// Largest concurrency of a selector probe.
pub const MAX_CONCURRENCY: usize = 4096;
/// Default deadline of a selector probe.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(10);
/// Largest deadline of a selector probe.
pub const MAX_DEADLINE: Duration = Duration::from_secs(300);

/// Probes guests and records what they answer. Cheap to clone.
#[derive(Clone)]
pub struct Prober {
    /// Live tunnels.
    pub hub: Hub,
    /// The fleet view (results go there).
    pub fleet: Arc<Fleet>,
    /// Token facts of connected guests.
    pub directory: Arc<GuestDirectory>,
    /// Probe metrics.
    pub metrics: ObservabilityMetrics,
}

impl std::fmt::Debug for Prober {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prober").finish_non_exhaustive()
    }
}

/// Optional body of a one-guest probe (`POST /kbs/v0/admin/guests/{guest_id}/probe`,
/// `POST /kbs/v0/probes/{guest_id}`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeRequest {
    /// What to probe (`all` when absent).
    #[serde(default, with = "rpc_defs::probe_kind_name")]
    pub kind: ProbeKind,
}

impl ProbeRequest {
    /// The request an optional body asks for: empty (or blank) means `all`.
    pub fn from_body(body: &[u8]) -> Result<Self, String> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self::default());
        }
        serde_json::from_slice(body).map_err(|e| format!("invalid probe request: {e}"))
    }
}

/// One guest's probe result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeOutcome {
    /// Guest id.
    pub guest_id: String,
    /// `ok`, `timeout`, `disconnected` (left during the probe), `not_connected`, `busy`,
    /// `guest_error`, `transport_error`, `skipped` (the deadline passed before its turn).
    pub outcome: String,
    /// Error detail when not ok.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Round trip, microseconds (0 when no call was made).
    pub rtt_us: u64,
    /// The guest's report when ok.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<ProbeReport>,
}

/// Body of `POST /kbs/v0/probes`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// Label selector (empty: every known guest).
    #[serde(default)]
    pub selector: String,
    /// What to probe (`all` when absent).
    #[serde(default, with = "rpc_defs::probe_kind_name")]
    pub kind: ProbeKind,
    /// Guests probed at once (default 64, at most 4096).
    #[serde(default)]
    pub concurrency: Option<usize>,
    /// Deadline of the whole call, ms (default 10,000, at most 300,000).
    #[serde(default)]
    pub deadline_ms: Option<u64>,
    /// Also report known guests without a tunnel (as `not_connected`); default true.
    #[serde(default)]
    pub include_disconnected: Option<bool>,
}

/// Answer of `POST /kbs/v0/probes`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BatchReport {
    /// What was probed.
    #[serde(with = "rpc_defs::probe_kind_name")]
    pub kind: ProbeKind,
    /// Guests selected.
    pub selected: usize,
    /// Wall time of the whole call, ms.
    pub elapsed_ms: u64,
    /// Count of each outcome.
    pub summary: BTreeMap<String, usize>,
    /// Per-guest results, by guest id.
    pub results: Vec<ProbeOutcome>,
}

fn outcome_of(e: &CallError) -> &'static str {
    match e {
        CallError::DeadlineExceeded => "timeout",
        CallError::Disconnected => "disconnected",
        CallError::TooManyInFlight => "busy",
        CallError::Guest(_) => "guest_error",
        CallError::Transport(_) => "transport_error",
    }
}

impl Prober {
    /// Probe one guest with `deadline` (the tunnel's default when `None`), and record the
    /// outcome as its last known state.
    pub async fn probe_one(
        &self,
        guest_id: &str,
        kind: ProbeKind,
        deadline: Option<Duration>,
    ) -> ProbeOutcome {
        let started = Instant::now();
        let result = match self.hub.get(guest_id) {
            None => Err(("not_connected", "no tunnel from this guest".to_string())),
            Some(h) => h
                .probe(kind, deadline)
                .await
                .map_err(|e| (outcome_of(&e), e.to_string())),
        };
        let rtt_us = match &result {
            Err(("not_connected", _)) => 0,
            _ => u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
        };
        self.finish(guest_id, kind, result, rtt_us, started)
    }

    /// Record a probe made elsewhere (the admin guests API) as the guest's last probe.
    pub fn record(
        &self,
        guest_id: &str,
        kind: ProbeKind,
        result: Result<ProbeReport, (&'static str, String)>,
        started: Instant,
    ) {
        let rtt_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.finish(guest_id, kind, result, rtt_us, started);
    }

    fn finish(
        &self,
        guest_id: &str,
        kind: ProbeKind,
        result: Result<ProbeReport, (&'static str, String)>,
        rtt_us: u64,
        started: Instant,
    ) -> ProbeOutcome {
        let label = kind.as_str();
        let (outcome, error, report) = match result {
            Ok(r) => ("ok", None, Some(r)),
            Err((o, e)) => (o, Some(e), None),
        };
        self.metrics
            .probes
            .get_or_create(&vec![
                ("kind", label.to_string()),
                ("outcome", outcome.to_string()),
            ])
            .inc();
        if rtt_us > 0 {
            self.metrics
                .probe_duration
                .get_or_create(&vec![("kind", label.to_string())])
                .observe(started.elapsed().as_secs_f64());
        }
        let last = LastProbe {
            at: now_ms(),
            kind: label.to_string(),
            outcome: outcome.to_string(),
            error: error.clone(),
            rtt_us,
            health: report.as_ref().and_then(|r| r.health.clone()),
            runtime: report.as_ref().and_then(|r| r.runtime.clone()),
        };
        let held = report.as_ref().and_then(|r| r.resources.as_deref());
        self.fleet.on_probe(guest_id, last, held);
        ProbeOutcome {
            guest_id: guest_id.to_string(),
            outcome: outcome.to_string(),
            error,
            rtt_us,
            report,
        }
    }

    /// Probe every guest matching `selector`, `concurrency` at a time, all within
    /// `deadline`: calls get the time left as their deadline, and guests whose turn comes
    /// after it are `skipped`. Known guests without a tunnel are `not_connected` (unless
    /// `include_disconnected` is false, then they are left out).
    pub async fn probe_many(
        &self,
        selector: &Selector,
        kind: ProbeKind,
        concurrency: usize,
        deadline: Duration,
        include_disconnected: bool,
    ) -> BatchReport {
        let started = Instant::now();
        let end = started + deadline;
        self.fleet.ensure_live(&self.hub.list(), &self.directory);
        let hub = &self.hub;
        let connected = (!include_disconnected).then_some(true);
        let ids = self
            .fleet
            .select_ids(selector, connected, |id| hub.get(id).is_some());
        let selected = ids.len();
        let mut results: Vec<ProbeOutcome> = futures::stream::iter(ids)
            .map(|id| async move {
                let left = end.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return self.finish(
                        &id,
                        kind,
                        Err(("skipped", "the deadline passed before its turn".into())),
                        0,
                        Instant::now(),
                    );
                }
                self.probe_one(&id, kind, Some(left)).await
            })
            .buffer_unordered(concurrency.clamp(1, MAX_CONCURRENCY))
            .collect()
            .await;
        results.sort_by(|a, b| a.guest_id.cmp(&b.guest_id));
        let mut summary = BTreeMap::new();
        for r in &results {
            *summary.entry(r.outcome.clone()).or_insert(0) += 1;
        }
        BatchReport {
            kind,
            selected,
            elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            summary,
            results,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_probe_body_is_optional_and_strict() {
        assert_eq!(
            ProbeRequest::from_body(b" \n").unwrap().kind,
            ProbeKind::All
        );
        assert_eq!(
            ProbeRequest::from_body(br#"{"kind":"runtime"}"#)
                .unwrap()
                .kind,
            ProbeKind::Runtime
        );
        let err = ProbeRequest::from_body(br#"{"kind":"Runtime"}"#).unwrap_err();
        assert!(err.starts_with("invalid probe request"), "{err}");
    }

    #[test]
    fn batch_requests_parse() {
        let r: BatchRequest = serde_json::from_str(
            r#"{"selector":"app=db","kind":"health","concurrency":8,"deadline_ms":500}"#,
        )
        .unwrap();
        assert_eq!(r.kind, ProbeKind::Health);
        assert!(serde_json::from_str::<BatchRequest>(r#"{"bogus":1}"#).is_err());
    }
}
