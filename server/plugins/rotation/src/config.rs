//! `[plugins.rotation]`: the default deadline of a rollout.

use std::time::Duration;

use serde::Deserialize;

use crate::api::MAX_DEADLINE_S;

/// Rotation settings (`[plugins.rotation]`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RotationConfig {
    /// Overall deadline of a rollout started without `deadline_s`: then it expires, and the
    /// targets still pending fail, so an offline guest never keeps a rollout (and the
    /// version's plaintext in memory) running forever.
    #[serde(with = "humantime_serde")]
    pub default_deadline: Duration,
}

impl Default for RotationConfig {
    fn default() -> Self {
        Self {
            default_deadline: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl RotationConfig {
    /// Range checks: the key at fault (within `[plugins.rotation]`) and why.
    pub fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        if self.default_deadline < Duration::from_secs(60)
            || self.default_deadline > Duration::from_secs(MAX_DEADLINE_S)
        {
            return Err(("default_deadline", "must be between 1m and 30d"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_a_week_and_bounds_are_checked() {
        let c = RotationConfig::default();
        assert_eq!(c.default_deadline, Duration::from_secs(7 * 24 * 3600));
        assert!(c.validate().is_ok());
        for bad in [Duration::from_secs(59), Duration::from_secs(31 * 24 * 3600)] {
            let c = RotationConfig {
                default_deadline: bad,
            };
            assert_eq!(c.validate().unwrap_err().0, "default_deadline");
        }
    }
}
