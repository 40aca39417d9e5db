//! Dashboard login sessions: an admin token exchanged at `/dashboard` for a short-lived
//! cookie (`tether-dashboard`). [`crate::extract::AdminCaller`] accepts a live session as it
//! accepts a Bearer token, re-checking the session's role on every request, and for anything
//! but GET/HEAD it also requires the `X-Tether-Dashboard: 1` header (which a cross-site form
//! cannot send). The pages themselves are the composition root's.

use std::time::{Duration, Instant};

use axum::http::{HeaderMap, Method};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use dashmap::DashMap;
use rand::RngCore;

use crate::admin_auth::{AdminAuth, AdminIdentity};
use crate::error::ApiError;

/// Session cookie name.
pub const COOKIE: &str = "tether-dashboard";
/// Header the dashboard's JS sends on state-changing requests (CSRF guard).
pub const CSRF_HEADER: &str = "x-tether-dashboard";
/// Longest session (never beyond the admin token's own expiry).
pub const SESSION_TTL: Duration = Duration::from_secs(15 * 60);
/// Most sessions at once.
pub const MAX_SESSIONS: usize = 1024;

struct Session {
    identity: AdminIdentity,
    expires: Instant,
}

/// Live dashboard sessions (in memory: a restart logs everyone out).
#[derive(Default)]
pub struct Sessions {
    map: DashMap<String, Session>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("live", &self.map.len())
            .finish()
    }
}

impl Sessions {
    /// No sessions.
    pub fn new() -> Self {
        Self::default()
    }

    /// Open a session for `identity`, at most `ttl` long; returns its cookie value.
    pub fn open(&self, identity: AdminIdentity, ttl: Duration) -> String {
        let now = Instant::now();
        if self.map.len() >= MAX_SESSIONS {
            self.map.retain(|_, s| s.expires > now);
        }
        if self.map.len() >= MAX_SESSIONS
            && let Some(oldest) = self
                .map
                .iter()
                .min_by_key(|e| e.value().expires)
                .map(|e| e.key().clone())
        {
            self.map.remove(&oldest);
        }
        let mut raw = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut raw);
        let id = URL_SAFE_NO_PAD.encode(raw);
        self.map.insert(
            id.clone(),
            Session {
                identity,
                expires: now + ttl,
            },
        );
        id
    }

    /// The identity of a live session.
    pub fn get(&self, id: &str) -> Option<AdminIdentity> {
        let now = Instant::now();
        let found = self.map.get(id).map(|s| (s.identity.clone(), s.expires));
        match found {
            Some((identity, expires)) if expires > now => Some(identity),
            Some(_) => {
                self.map.remove(id);
                None
            }
            None => None,
        }
    }

    /// End a session.
    pub fn close(&self, id: &str) {
        self.map.remove(id);
    }

    /// Number of live sessions.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when there is none.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// The dashboard session cookie's value, if the request carries one.
pub fn cookie_value(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.trim().to_string())
}

/// For [`crate::extract::AdminCaller`]: `None` when the request carries no dashboard
/// cookie (or carries a Bearer token, which wins); otherwise the session's identity,
/// authorised for `method path` by `auth`, or why not.
pub(crate) fn session_caller(
    sessions: &Sessions,
    auth: &AdminAuth,
    headers: &HeaderMap,
    method: &Method,
    path: &str,
) -> Option<Result<AdminIdentity, ApiError>> {
    if headers.contains_key(axum::http::header::AUTHORIZATION) {
        return None;
    }
    let id = cookie_value(headers)?;
    let Some(identity) = sessions.get(&id) else {
        return Some(Err(ApiError::unauthorized(
            "DashboardSessionExpired",
            "the dashboard session is unknown or expired: log in again at /dashboard",
        )));
    };
    if !matches!(*method, Method::GET | Method::HEAD)
        && headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok()) != Some("1")
    {
        return Some(Err(ApiError::forbidden(
            "CsrfHeaderMissing",
            format!("requests with the dashboard cookie must send `{CSRF_HEADER}: 1`"),
        )));
    }
    Some(auth.authorize_identity(&identity, method, path))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn cookies_are_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert("cookie", "a=b; tether-dashboard=xyz; c=d".parse().unwrap());
        assert_eq!(cookie_value(&h).as_deref(), Some("xyz"));
    }

    #[test]
    fn sessions_expire_and_close() {
        let s = Sessions::new();
        let who = AdminIdentity::new("a", "admin", "dev");
        let id = s.open(who.clone(), Duration::from_secs(60));
        assert_eq!(s.get(&id).unwrap().actor(), "a@dev");
        s.close(&id);
        assert!(s.get(&id).is_none());
        let gone = s.open(who, Duration::ZERO);
        assert!(s.get(&gone).is_none());
        assert!(s.is_empty());
    }
}
