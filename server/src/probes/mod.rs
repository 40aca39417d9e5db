//! Probes (the `probes` server-request plugin): ask guests through their tunnels for health,
//! held resources and runtime figures, one guest (`POST /kbs/v0/probes/<guest_id>`) or many
//! by label selector with bounded concurrency and a deadline (`POST /kbs/v0/probes`), and
//! periodically at a configurable interval with jitter. Every outcome becomes the guest's
//! last known state in the fleet view, and held versions feed the drift query.

pub mod plugin;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use rpc_defs::{ProbeKind, ProbeReport};
use serde::{Deserialize, Serialize};
use tunnel::{CallError, Hub};

use crate::events::ObservabilityMetrics;
use crate::fleet::{Fleet, LastProbe, Selector};
use crate::guest_directory::GuestDirectory;
use crate::http::guests::ProbeSelector;
use crate::storage::now_ms;

/// Default and largest concurrency of a selector probe.
pub const DEFAULT_CONCURRENCY: usize = 64;
/// Largest concurrency of a selector probe.
pub const MAX_CONCURRENCY: usize = 4096;
/// Default deadline of a selector probe.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(10);
/// Largest deadline of a selector probe.
pub const MAX_DEADLINE: Duration = Duration::from_secs(300);

/// `[probes]`: periodic probing of connected guests.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ProbesConfig {
    /// Interval between rounds; `0s` turns periodic probes off.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Each wait is the interval times a random factor in `1 ± jitter` (0.0..=0.9).
    pub jitter: f64,
    /// What to probe each round.
    pub kind: ProbeSelector,
    /// Guests probed at once.
    pub concurrency: usize,
    /// Deadline of one round.
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
    /// Only guests matching this label selector (empty: all).
    pub selector: String,
}

impl Default for ProbesConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(300),
            jitter: 0.2,
            kind: ProbeSelector::All,
            concurrency: 32,
            deadline: Duration::from_secs(30),
            selector: String::new(),
        }
    }
}

impl ProbesConfig {
    /// Check ranges; the error names the key.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if !(0.0..=0.9).contains(&self.jitter) {
            return Err(("probes.jitter".into(), "must be within 0.0..=0.9".into()));
        }
        if self.concurrency == 0 || self.concurrency > MAX_CONCURRENCY {
            return Err((
                "probes.concurrency".into(),
                format!("must be within 1..={MAX_CONCURRENCY}"),
            ));
        }
        if self.deadline.is_zero() || self.deadline > MAX_DEADLINE {
            return Err(("probes.deadline".into(), "must be within 1ms..=300s".into()));
        }
        Selector::parse(&self.selector).map_err(|e| ("probes.selector".into(), e.to_string()))?;
        Ok(())
    }

    /// The wait before the next round: the interval scaled by a random factor in
    /// `1 ± jitter`, never below a millisecond.
    pub fn next_wait(&self, unit: f64) -> Duration {
        let factor = 1.0 + self.jitter * (unit.clamp(0.0, 1.0) * 2.0 - 1.0);
        self.interval.mul_f64(factor).max(Duration::from_millis(1))
    }
}

/// What the probes need from the KBS.
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
    #[serde(default)]
    pub kind: ProbeSelector,
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
    pub kind: ProbeSelector,
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

fn kind_label(kind: ProbeSelector) -> &'static str {
    match kind {
        ProbeSelector::Health => "health",
        ProbeSelector::Resources => "resources",
        ProbeSelector::Runtime => "runtime",
        ProbeSelector::All => "all",
    }
}

impl Prober {
    /// Probe one guest with `deadline` (the tunnel's default when `None`), and record the
    /// outcome as its last known state.
    pub async fn probe_one(
        &self,
        guest_id: &str,
        kind: ProbeSelector,
        deadline: Option<Duration>,
    ) -> ProbeOutcome {
        let started = Instant::now();
        let result = match self.hub.get(guest_id) {
            None => Err(("not_connected", "no tunnel from this guest".to_string())),
            Some(h) => h
                .probe(ProbeKind::from(kind), deadline)
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
        kind: ProbeSelector,
        result: Result<ProbeReport, (&'static str, String)>,
        started: Instant,
    ) {
        let rtt_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.finish(guest_id, kind, result, rtt_us, started);
    }

    fn finish(
        &self,
        guest_id: &str,
        kind: ProbeSelector,
        result: Result<ProbeReport, (&'static str, String)>,
        rtt_us: u64,
        started: Instant,
    ) -> ProbeOutcome {
        let label = kind_label(kind);
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
        kind: ProbeSelector,
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

    /// Probe rounds every `config.interval` (± jitter) until `stop`.
    pub async fn run_periodic(
        &self,
        config: ProbesConfig,
        stop: tokio_util::sync::CancellationToken,
    ) {
        if config.interval.is_zero() {
            return;
        }
        let selector = Selector::parse(&config.selector).unwrap_or_default();
        loop {
            let wait = config.next_wait(rand::random::<f64>());
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = stop.cancelled() => return,
            }
            let round = self.probe_many(
                &selector,
                config.kind,
                config.concurrency,
                config.deadline,
                false,
            );
            let report = tokio::select! {
                r = round => r,
                () = stop.cancelled() => return,
            };
            tracing::debug!(selected = report.selected, elapsed_ms = report.elapsed_ms, summary = ?report.summary, "periodic probe round");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn config_validates_and_jitters() {
        let c = ProbesConfig::default();
        assert!(c.validate().is_ok());
        let bad = ProbesConfig {
            jitter: 1.5,
            ..c.clone()
        };
        assert_eq!(bad.validate().unwrap_err().0, "probes.jitter");
        let bad = ProbesConfig {
            selector: "a in (".into(),
            ..c.clone()
        };
        assert_eq!(bad.validate().unwrap_err().0, "probes.selector");
        let c = ProbesConfig {
            interval: Duration::from_secs(100),
            jitter: 0.2,
            ..c
        };
        assert_eq!(c.next_wait(0.0), Duration::from_secs(80));
        assert_eq!(c.next_wait(1.0), Duration::from_secs(120));
        assert_eq!(c.next_wait(0.5), Duration::from_secs(100));
    }

    #[test]
    fn batch_requests_parse() {
        let r: BatchRequest = serde_json::from_str(
            r#"{"selector":"app=db","kind":"health","concurrency":8,"deadline_ms":500}"#,
        )
        .unwrap();
        assert_eq!(r.kind, ProbeSelector::Health);
        assert!(serde_json::from_str::<BatchRequest>(r#"{"bogus":1}"#).is_err());
    }
}
