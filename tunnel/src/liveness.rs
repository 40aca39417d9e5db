//! Sans-IO liveness: when to ping, when a silent peer is dead, and the wall-clock
//! conversions for token deadlines.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// What the heartbeat wants done now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Beat {
    /// Nothing yet.
    Idle,
    /// Send a WebSocket ping.
    Ping,
    /// The peer has been silent for too many intervals: close (4408).
    Silent,
}

/// Heartbeat state of one tunnel end: the server pings every interval, both ends give up
/// on a peer silent for `missed` intervals.
#[derive(Clone, Debug)]
pub(crate) struct Heartbeat {
    interval: Duration,
    missed: u32,
    pings: bool,
    last_heard: Instant,
    next_ping: Instant,
}

impl Heartbeat {
    /// A heartbeat starting at `now`; `pings` is true on the side that sends pings.
    pub fn new(now: Instant, interval: Duration, missed: u32, pings: bool) -> Self {
        let interval = interval.max(Duration::from_millis(1));
        Self {
            interval,
            missed: missed.max(1),
            pings,
            last_heard: now,
            next_ping: now + interval,
        }
    }

    /// Anything arrived from the peer.
    pub fn heard(&mut self, now: Instant) {
        self.last_heard = now;
    }

    fn silence_limit(&self) -> Instant {
        self.last_heard + self.interval * self.missed
    }

    /// When [`Heartbeat::poll`] next has something to say.
    pub fn next_wake(&self) -> Instant {
        if self.pings {
            self.next_ping.min(self.silence_limit())
        } else {
            self.silence_limit()
        }
    }

    /// What to do at `now`.
    pub fn poll(&mut self, now: Instant) -> Beat {
        if now >= self.silence_limit() {
            return Beat::Silent;
        }
        if self.pings && now >= self.next_ping {
            // Skip missed slots rather than bursting pings after a stall.
            while self.next_ping <= now {
                self.next_ping += self.interval;
            }
            return Beat::Ping;
        }
        Beat::Idle
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Longest wait a wall-clock deadline is turned into (keeps `Instant` arithmetic safe).
const MAX_WAIT: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The tokio instant at which the Unix time `deadline_s` (seconds) is reached.
pub(crate) fn instant_at_unix(deadline_s: u64) -> Instant {
    let now_ms = unix_now_ms();
    let wait_ms = deadline_s.saturating_mul(1000).saturating_sub(now_ms);
    Instant::now() + Duration::from_millis(wait_ms).min(MAX_WAIT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn server_pings_each_interval_and_gives_up_after_three_silent_ones() {
        let start = Instant::now();
        let mut hb = Heartbeat::new(start, Duration::from_secs(20), 3, true);
        assert_eq!(hb.poll(Instant::now()), Beat::Idle);
        assert_eq!(hb.next_wake(), start + Duration::from_secs(20));

        tokio::time::sleep_until(hb.next_wake()).await;
        assert_eq!(hb.poll(Instant::now()), Beat::Ping);
        tokio::time::sleep_until(hb.next_wake()).await;
        assert_eq!(hb.poll(Instant::now()), Beat::Ping);
        // A pong at 45 s resets the silence clock.
        tokio::time::sleep(Duration::from_secs(5)).await;
        hb.heard(Instant::now());
        let mut pings = 0;
        loop {
            tokio::time::sleep_until(hb.next_wake()).await;
            match hb.poll(Instant::now()) {
                Beat::Ping => pings += 1,
                Beat::Silent => break,
                Beat::Idle => {}
            }
        }
        assert_eq!(pings, 3);
        assert_eq!(
            Instant::now() - start,
            Duration::from_secs(45 + 60),
            "silent exactly three intervals after the last pong"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn guest_never_pings_and_gives_up_on_silence() {
        let start = Instant::now();
        let mut hb = Heartbeat::new(start, Duration::from_secs(1), 3, false);
        tokio::time::sleep(Duration::from_millis(2500)).await;
        hb.heard(Instant::now());
        tokio::time::sleep_until(hb.next_wake()).await;
        assert_eq!(hb.poll(Instant::now()), Beat::Silent);
        assert_eq!(Instant::now() - start, Duration::from_millis(5500));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_loop_sends_one_ping_not_a_burst() {
        let start = Instant::now();
        let mut hb = Heartbeat::new(start, Duration::from_secs(1), 100, true);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(hb.poll(Instant::now()), Beat::Ping);
        assert_eq!(hb.poll(Instant::now()), Beat::Idle);
    }

    #[test]
    fn unix_deadlines_convert_safely() {
        let now_s = unix_now_ms() / 1000;
        let past = instant_at_unix(now_s.saturating_sub(100));
        assert!(past <= Instant::now());
        let soon = instant_at_unix(now_s + 60);
        assert!(soon > Instant::now() + Duration::from_secs(58));
        // Absurd deadlines do not overflow.
        let _ = instant_at_unix(u64::MAX);
    }
}
