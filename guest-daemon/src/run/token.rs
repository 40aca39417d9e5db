//! The attestation token the daemon holds, and when to refresh it: the schedule is read
//! from the token's own `iat`/`exp` (not verified: the KBS verifies, this only schedules).

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use tokio::time::Instant;
use zeroize::Zeroizing;

/// A token is refreshed at least this long before it expires (when its lifetime allows).
const REFRESH_MARGIN: Duration = Duration::from_secs(60);
/// Shortest refresh delay, so a token with a tiny (or skewed) lifetime cannot spin RCAR.
const MIN_REFRESH: Duration = Duration::from_secs(1);
/// Bounds of the delay before retrying a failed in-band re-attestation.
pub(super) const MIN_REFRESH_RETRY: Duration = Duration::from_secs(1);
const MAX_REFRESH_RETRY: Duration = Duration::from_secs(10);

/// When to refresh a token valid for `lifetime` (exp - iat), counted from when it was
/// issued: at 80 % of its lifetime or 60 s before it expires, whichever is earlier, but never
/// before half of its lifetime (so a short-lived token is not refreshed in a tight loop) nor
/// sooner than 1 s.
pub fn refresh_after(lifetime: Duration) -> Duration {
    let at_80_percent = lifetime / 5 * 4;
    let before_expiry = lifetime.saturating_sub(REFRESH_MARGIN);
    at_80_percent
        .min(before_expiry)
        .max(lifetime / 2)
        .max(MIN_REFRESH)
}

/// What the loop knows of its current token. `Debug` hides the token.
pub(super) struct Token {
    pub jwt: Zeroizing<String>,
    pub guest_id: Option<String>,
    pub exp: Option<u64>,
    /// When to re-attest (None: the token does not expire).
    pub refresh_at: Option<Instant>,
    /// When it expires, on the local monotonic clock.
    expires_at: Option<Instant>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("jwt", &"[redacted]")
            .field("guest_id", &self.guest_id)
            .field("exp", &self.exp)
            .finish_non_exhaustive()
    }
}

impl Token {
    /// A token received at `now` (`now_unix` on the wall clock). Its lifetime is `exp - iat`
    /// as the KBS wrote them, so a guest clock that is off does not shift the schedule.
    pub fn new(jwt: String, now: Instant, now_unix: u64) -> Self {
        let facts = TokenFacts::of(&jwt);
        let lifetime = facts
            .exp
            .map(|exp| Duration::from_secs(exp.saturating_sub(facts.iat.unwrap_or(now_unix))));
        Self {
            jwt: Zeroizing::new(jwt),
            guest_id: facts.guest_id,
            exp: facts.exp,
            refresh_at: lifetime.map(|l| now + refresh_after(l)),
            expires_at: lifetime.map(|l| now + l),
        }
    }

    /// True once it is time to re-attest.
    pub fn is_due(&self, now: Instant) -> bool {
        self.refresh_at.is_some_and(|at| now >= at)
    }

    /// Delay before retrying a failed in-band refresh: a quarter of the time left, 1..=10 s.
    pub fn retry_delay(&self, now: Instant) -> Duration {
        let left = self
            .expires_at
            .map_or(MAX_REFRESH_RETRY, |at| at.saturating_duration_since(now));
        (left / 4).clamp(MIN_REFRESH_RETRY, MAX_REFRESH_RETRY)
    }
}

/// Claims of a token read without verifying it (the KBS verifies; this only schedules).
#[derive(Debug, Default, PartialEq, Eq)]
struct TokenFacts {
    iat: Option<u64>,
    exp: Option<u64>,
    guest_id: Option<String>,
}

impl TokenFacts {
    fn of(jwt: &str) -> Self {
        let Some(payload) = jwt.split('.').nth(1) else {
            return Self::default();
        };
        let Ok(bytes) = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')) else {
            return Self::default();
        };
        let Ok(claims) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            return Self::default();
        };
        Self {
            iat: claims.get("iat").and_then(serde_json::Value::as_u64),
            exp: claims.get("exp").and_then(serde_json::Value::as_u64),
            guest_id: claims
                .pointer("/tether/guest_id")
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn refresh_is_at_80_percent_or_a_minute_before_expiry_never_before_half() {
        let s = Duration::from_secs;
        // 5 minutes: both rules agree on 240 s.
        assert_eq!(refresh_after(s(300)), s(240));
        // An hour: 80 % (2880 s) is earlier than a minute before expiry (3540 s).
        assert_eq!(refresh_after(s(3600)), s(2880));
        // 2 minutes: a minute before expiry (60 s) is earlier than 80 % (96 s).
        assert_eq!(refresh_after(s(120)), s(60));
        // 100 s: a minute before (40 s) would be under half the lifetime: 50 s.
        assert_eq!(refresh_after(s(100)), s(50));
        // The KBS's shortest ttl (10 s): half of it.
        assert_eq!(refresh_after(s(10)), s(5));
        // Degenerate lifetimes never spin.
        assert_eq!(refresh_after(Duration::ZERO), MIN_REFRESH);
        assert_eq!(refresh_after(Duration::from_millis(1500)), MIN_REFRESH);
    }

    fn jwt(claims: serde_json::Value) -> String {
        let part = |v: &serde_json::Value| URL_SAFE_NO_PAD.encode(v.to_string());
        format!(
            "{}.{}.sig",
            part(&serde_json::json!({"alg": "ES256"})),
            part(&claims)
        )
    }

    #[test]
    fn token_schedule_uses_the_kbs_clock_for_the_lifetime() {
        let now = Instant::now();
        // The guest's clock is an hour behind the KBS: exp - iat still says 300 s.
        let t = Token::new(
            jwt(serde_json::json!({"iat": 10_000, "exp": 10_300, "tether": {"guest_id": "g1"}})),
            now,
            6_400,
        );
        assert_eq!(t.guest_id.as_deref(), Some("g1"));
        assert_eq!(t.exp, Some(10_300));
        assert_eq!(t.refresh_at, Some(now + Duration::from_secs(240)));
        assert_eq!(t.expires_at, Some(now + Duration::from_secs(300)));
        assert!(!t.is_due(now + Duration::from_secs(239)));
        assert!(t.is_due(now + Duration::from_secs(240)));
        // Retry a failed refresh at a quarter of the time left, within 1..=10 s.
        assert_eq!(
            t.retry_delay(now + Duration::from_secs(280)),
            Duration::from_secs(5)
        );
        assert_eq!(
            t.retry_delay(now + Duration::from_secs(299)),
            MIN_REFRESH_RETRY
        );
        assert_eq!(t.retry_delay(now), MAX_REFRESH_RETRY);

        // Without iat the local clock is all there is.
        let t = Token::new(jwt(serde_json::json!({"exp": 1_100})), now, 1_000);
        assert_eq!(t.refresh_at, Some(now + Duration::from_secs(50)));
        // No exp: never due. Not a JWT: nothing known, never due.
        let t = Token::new(jwt(serde_json::json!({})), now, 1_000);
        assert!(!t.is_due(now + Duration::from_secs(1_000_000)));
        let t = Token::new("not-a-jwt".into(), now, 1_000);
        assert_eq!(t.exp, None);
        assert!(!format!("{t:?}").contains("not-a-jwt"));
    }
}
