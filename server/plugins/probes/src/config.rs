//! `[plugins.probes]`: periodic probing of connected guests.

use std::time::Duration;

use kbs_core::probe::{MAX_CONCURRENCY, MAX_DEADLINE};
use kbs_core::selector::Selector;
use rpc_defs::ProbeKind;
use serde::Deserialize;

/// `[plugins.probes]`: periodic probing of connected guests.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ProbesConfig {
    /// Interval between rounds; `0s` turns periodic probes off.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Each wait is the interval times a random factor in `1 ± jitter` (0.0..=0.9).
    pub jitter: f64,
    /// What to probe each round.
    #[serde(with = "rpc_defs::probe_kind_name")]
    pub kind: ProbeKind,
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
            kind: ProbeKind::All,
            concurrency: 32,
            deadline: Duration::from_secs(30),
            selector: String::new(),
        }
    }
}

impl ProbesConfig {
    /// Check ranges: the key at fault (within `[plugins.probes]`) and why.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(0.0..=0.9).contains(&self.jitter) {
            return Err(("jitter", "must be within 0.0..=0.9".to_string()));
        }
        if self.concurrency == 0 || self.concurrency > MAX_CONCURRENCY {
            return Err((
                "concurrency",
                format!("must be within 1..={MAX_CONCURRENCY}"),
            ));
        }
        if self.deadline.is_zero() || self.deadline > MAX_DEADLINE {
            return Err(("deadline", "must be within 1ms..=300s".to_string()));
        }
        Selector::parse(&self.selector).map_err(|e| ("selector", e.to_string()))?;
        Ok(())
    }

    /// The wait before the next round: the interval scaled by a random factor in
    /// `1 ± jitter`, never below a millisecond.
    pub fn next_wait(&self, unit: f64) -> Duration {
        let factor = 1.0 + self.jitter * (unit.clamp(0.0, 1.0) * 2.0 - 1.0);
        self.interval.mul_f64(factor).max(Duration::from_millis(1))
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
        assert_eq!(bad.validate().unwrap_err().0, "jitter");
        let bad = ProbesConfig {
            selector: "a in (".into(),
            ..c.clone()
        };
        assert_eq!(bad.validate().unwrap_err().0, "selector");
        let c = ProbesConfig {
            interval: Duration::from_secs(100),
            jitter: 0.2,
            ..c
        };
        assert_eq!(c.next_wait(0.0), Duration::from_secs(80));
        assert_eq!(c.next_wait(1.0), Duration::from_secs(120));
        assert_eq!(c.next_wait(0.5), Duration::from_secs(100));
    }
}
