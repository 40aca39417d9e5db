//! Reconnect delays for the guest: exponential backoff with full jitter, reset after a
//! stable connection, and the server's GoAway delay honoured.

use std::time::Duration;

use rand::Rng;

use crate::guest::Closed;

/// Backoff settings (docs/protocol.md, "Reconnecting": 0.5 s doubling to 30 s).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReconnectPolicy {
    /// Ceiling of the first delay.
    pub initial: Duration,
    /// Largest ceiling.
    pub max: Duration,
    /// A tunnel up at least this long counts as stable and resets the backoff.
    pub stable_after: Duration,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
            stable_after: Duration::from_secs(60),
        }
    }
}

impl ReconnectPolicy {
    /// Ceiling for `attempt` (0-based): `initial * 2^attempt`, capped at `max`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 2_u32.checked_pow(attempt.min(31)).unwrap_or(u32::MAX);
        self.initial
            .checked_mul(factor)
            .unwrap_or(self.max)
            .min(self.max)
    }

    /// Delay before reconnect `attempt` (0-based): uniform in `[0, ceiling(attempt)]`
    /// ("full jitter"), so a fleet dropped at once does not come back at once.
    pub fn next_delay<R: Rng + ?Sized>(&self, attempt: u32, rng: &mut R) -> Duration {
        let ceiling = self.ceiling(attempt);
        let ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rng.gen_range(0..=ms))
    }
}

/// Reconnect attempts so far, for one guest's run loop.
#[derive(Clone, Debug)]
pub struct Backoff {
    policy: ReconnectPolicy,
    attempt: u32,
}

impl Backoff {
    /// A fresh backoff (the next delay is the shortest).
    pub fn new(policy: ReconnectPolicy) -> Self {
        Self { policy, attempt: 0 }
    }

    /// Failed attempts since the last reset.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Delay before the next attempt after a failure; each call widens the next one.
    pub fn next_delay<R: Rng + ?Sized>(&mut self, rng: &mut R) -> Duration {
        let delay = self.policy.next_delay(self.attempt, rng);
        self.attempt = self.attempt.saturating_add(1);
        delay
    }

    /// Forgets past failures.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Delay after a served tunnel ended: a stable tunnel resets the backoff first; a server
    /// that sent GoAway gets the delay it asked for.
    pub fn after_close<R: Rng + ?Sized>(&mut self, closed: &Closed, rng: &mut R) -> Duration {
        if closed.connected_for >= self.policy.stable_after {
            self.reset();
        }
        match closed.reconnect_after {
            Some(delay) => delay,
            None => self.next_delay(rng),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::CloseInfo;
    use rand::{SeedableRng, rngs::StdRng};

    #[test]
    fn ceilings_double_from_half_a_second_to_thirty() {
        let p = ReconnectPolicy::default();
        let ceilings: Vec<u64> = (0..9).map(|a| p.ceiling(a).as_millis() as u64).collect();
        assert_eq!(
            ceilings,
            [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
        assert_eq!(p.ceiling(u32::MAX), Duration::from_secs(30));
    }

    #[test]
    fn delays_are_full_jitter_and_reproducible_with_a_seed() {
        let p = ReconnectPolicy::default();
        let mut a = StdRng::seed_from_u64(7);
        let mut b = StdRng::seed_from_u64(7);
        for attempt in 0..20 {
            let d = p.next_delay(attempt, &mut a);
            assert_eq!(d, p.next_delay(attempt, &mut b), "same seed, same delay");
            assert!(d <= p.ceiling(attempt));
        }
        // Full jitter spreads over the whole range, down to near zero.
        let mut rng = StdRng::seed_from_u64(1);
        let delays: Vec<Duration> = (0..200).map(|_| p.next_delay(6, &mut rng)).collect();
        assert!(delays.iter().any(|d| *d < Duration::from_secs(3)));
        assert!(delays.iter().any(|d| *d > Duration::from_secs(27)));
    }

    fn closed(connected_for: Duration, reconnect_after: Option<Duration>) -> Closed {
        Closed {
            close: CloseInfo::local_code(1006, "lost"),
            reconnect_after,
            connected_for,
        }
    }

    #[test]
    fn backoff_grows_resets_when_stable_and_honours_goaway() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut b = Backoff::new(ReconnectPolicy::default());
        for _ in 0..5 {
            b.next_delay(&mut rng);
        }
        assert_eq!(b.attempt(), 5);
        // A short-lived tunnel keeps widening the backoff.
        let d = b.after_close(&closed(Duration::from_secs(1), None), &mut rng);
        assert!(d <= Duration::from_secs(16));
        assert_eq!(b.attempt(), 6);
        // A stable one starts over.
        let d = b.after_close(&closed(Duration::from_secs(600), None), &mut rng);
        assert!(d <= Duration::from_millis(500));
        assert_eq!(b.attempt(), 1);
        // GoAway's delay is used as is.
        let d = b.after_close(
            &closed(Duration::from_secs(600), Some(Duration::from_millis(1234))),
            &mut rng,
        );
        assert_eq!(d, Duration::from_millis(1234));
        assert_eq!(b.attempt(), 0);
    }
}
