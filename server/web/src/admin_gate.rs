//! [`AdminGate`]: who may call an admin endpoint. An `Authorization: Bearer` admin token, or
//! a dashboard session cookie, authorised against the role rules for the method and path;
//! every refusal is counted (`kbs_admin_actions{action="auth",outcome=<error name>}`).

use axum::http::{HeaderMap, Method};
use kbs_core::metrics::Labels;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::admin_auth::{AdminAuth, AdminIdentity};
use crate::dashboard_session::{Sessions, session_caller};
use crate::error::ApiError;

/// Admin authentication and authorisation, with the dashboard's sessions.
pub struct AdminGate {
    auth: AdminAuth,
    sessions: Sessions,
    actions: Family<Labels, Counter>,
}

impl std::fmt::Debug for AdminGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminGate")
            .field("sessions", &self.sessions)
            .finish_non_exhaustive()
    }
}

impl AdminGate {
    /// A gate over `auth`, counting refusals into `actions`.
    pub fn new(auth: AdminAuth, actions: Family<Labels, Counter>) -> Self {
        Self {
            auth,
            sessions: Sessions::new(),
            actions,
        }
    }

    /// Token verification and role rules.
    pub fn auth(&self) -> &AdminAuth {
        &self.auth
    }

    /// Live dashboard sessions.
    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    /// The admin behind a request to `method path`, or why not (401 unauthenticated, 403
    /// outside the role).
    pub fn authorize(
        &self,
        headers: &HeaderMap,
        method: &Method,
        path: &str,
    ) -> Result<AdminIdentity, ApiError> {
        let result = match session_caller(&self.sessions, &self.auth, headers, method, path) {
            Some(session) => session,
            None => self.auth.authorize(headers, method, path),
        };
        if let Err(e) = &result {
            self.count("auth", e.name);
        }
        result
    }

    /// Count an admin action outcome that is not an audited action (e.g. `auth` refusals).
    pub fn count(&self, action: &str, outcome: &str) {
        self.actions
            .get_or_create(&vec![
                ("action", action.to_string()),
                ("outcome", outcome.to_string()),
            ])
            .inc();
    }
}
