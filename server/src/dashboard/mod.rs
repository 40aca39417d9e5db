//! The operator dashboard at `/dashboard`: log in by pasting an admin JWT, which is checked
//! and exchanged for a short-lived session cookie (`tether-dashboard`, HttpOnly,
//! SameSite=Strict, Secure over TLS); the token itself is never stored, echoed or shown. The
//! page is server-rendered HTML plus one small vanilla JS file and one CSS file, all served
//! from the binary (no CDN). The JS calls the ordinary admin APIs with the cookie:
//! [`crate::http::AdminCaller`] accepts a dashboard session as it accepts a Bearer token,
//! re-checking the session's role on every request, and for anything but GET/HEAD it also
//! requires the `X-Tether-Dashboard: 1` header (which a cross-site form cannot send).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Form;
use axum::extract::State;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE, SET_COOKIE};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use dashmap::DashMap;
use rand::RngCore;
use serde::Deserialize;

use crate::admin::auth::AdminIdentity;
use crate::app::AppState;
use crate::error::ApiError;

/// Session cookie name.
pub const COOKIE: &str = "tether-dashboard";
/// Header the dashboard's JS sends on state-changing requests (CSRF guard).
pub const CSRF_HEADER: &str = "x-tether-dashboard";
/// Longest session (never beyond the admin token's own expiry).
pub const SESSION_TTL: Duration = Duration::from_secs(15 * 60);
/// Most sessions at once.
pub const MAX_SESSIONS: usize = 1024;
/// What a login must be allowed to do: read the fleet view.
const LOGIN_CHECK: &str = "/kbs/v0/admin/guests";

const APP_JS: &str = include_str!("app.js");
const APP_CSS: &str = include_str!("app.css");
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

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

    fn open(&self, identity: AdminIdentity, ttl: Duration) -> String {
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
    fn get(&self, id: &str) -> Option<AdminIdentity> {
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

    fn close(&self, id: &str) {
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

fn cookie_value(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.trim().to_string())
}

/// For [`crate::http::AdminCaller`]: `None` when the request carries no dashboard cookie
/// (or carries a Bearer token, which wins); otherwise the session's identity, authorised
/// for `method path`, or why not.
pub fn session_caller(
    state: &AppState,
    headers: &HeaderMap,
    method: &Method,
    path: &str,
) -> Option<Result<AdminIdentity, ApiError>> {
    if headers.contains_key(axum::http::header::AUTHORIZATION) {
        return None;
    }
    let id = cookie_value(headers)?;
    let Some(identity) = state.dashboard.get(&id) else {
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
    Some(
        state
            .admin
            .authorize_identity(&identity, method, path)
            .map(|()| identity),
    )
}

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn html(status: StatusCode, body: String) -> Response {
    let mut resp = (status, body).into_response();
    let h = resp.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    secure_headers(h);
    resp
}

fn secure_headers(h: &mut HeaderMap) {
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("content-security-policy", HeaderValue::from_static(CSP));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
}

fn page(title: &str, body: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><link rel=\"stylesheet\" href=\"/dashboard/app.css\"></head>\
         <body>{body}</body></html>\n",
        esc(title)
    )
}

fn login_page(error: Option<&str>) -> String {
    let error = error
        .map(|e| format!("<p class=\"error\" id=\"login-error\">{}</p>", esc(e)))
        .unwrap_or_default();
    page(
        "Tether KBS: log in",
        &format!(
            "<main class=\"login\"><h1>Tether KBS</h1>\
             <p>Paste an admin token (<code>kbsctl token --ttl 15m</code> prints one). \
             It is checked and exchanged for a 15-minute session; it is not kept.</p>{error}\
             <form method=\"post\" action=\"/dashboard/login\" autocomplete=\"off\">\
             <textarea id=\"token\" name=\"token\" rows=\"6\" required spellcheck=\"false\" \
             placeholder=\"eyJhbGciOiJFZERTQSIs...\"></textarea>\
             <button id=\"login\" type=\"submit\">Log in</button></form></main>"
        ),
    )
}

/// The session identity of a request to a dashboard page, if any.
fn page_session(state: &AppState, headers: &HeaderMap) -> Option<AdminIdentity> {
    cookie_value(headers).and_then(|id| state.dashboard.get(&id))
}

/// `GET /dashboard`: the dashboard with a live session, else (401) the login form.
pub async fn index(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let Some(identity) = page_session(&state, &headers) else {
        return html(StatusCode::UNAUTHORIZED, login_page(None));
    };
    let (policy_version, policy) = match state
        .store
        .get_policy(crate::http::admin::RESOURCE_POLICY)
        .await
    {
        Ok(Some(p)) => (p.version, p.body),
        _ => (0, state.policy.source().1),
    };
    let plugins: String = state
        .plugins
        .list()
        .iter()
        .map(|p| {
            format!(
                "<tr data-plugin=\"{n}\"><td>{n}</td><td>{k}</td><td>{v}</td>\
                 <td class=\"state\">{s}</td><td></td></tr>",
                n = esc(&p.name),
                k = esc(&serde_json::to_string(&p.kind)
                    .unwrap_or_default()
                    .replace('"', "")),
                v = esc(&p.version),
                s = if p.enabled { "enabled" } else { "disabled" },
            )
        })
        .collect();
    let body = format!(
        "<header><h1>Tether KBS</h1><span id=\"whoami\">{actor} ({role})</span>\
         <form method=\"post\" action=\"/dashboard/logout\"><button id=\"logout\">Log out</button></form>\
         </header><main>\
         <section id=\"fleet\"><h2>Guests <small id=\"guest-count\"></small></h2>\
         <table id=\"guests\"><thead><tr><th>guest</th><th>state</th><th>labels</th><th>TEE</th>\
         <th>held versions</th><th>last probe</th><th>last seen</th></tr></thead>\
         <tbody><tr><td colspan=\"7\">{connected} connected, {known} known; loading…</td></tr></tbody></table></section>\
         <section id=\"rollouts-section\"><h2>Rollouts</h2>\
         <form id=\"rollout-form\"><input id=\"rollout-path\" placeholder=\"repo/type/tag\" required>\
         <input id=\"rollout-selector\" placeholder=\"selector, e.g. app=db (empty: all)\">\
         <button id=\"rollout-start\" type=\"submit\">Start rollout</button>\
         <span id=\"rollout-error\" class=\"error\"></span></form>\
         <table id=\"rollouts\"><thead><tr><th>id</th><th>path</th><th>version</th><th>selector</th>\
         <th>state</th><th>progress</th></tr></thead><tbody></tbody></table></section>\
         <section id=\"plugins-section\"><h2>Plugins</h2><table id=\"plugins\"><thead><tr><th>name</th>\
         <th>kind</th><th>version</th><th>state</th><th></th></tr></thead><tbody>{plugins}</tbody></table>\
         <span id=\"plugin-error\" class=\"error\"></span></section>\
         <section id=\"policy-section\"><h2>Resource policy <small id=\"policy-version\">version {policy_version}</small></h2>\
         <pre id=\"policy\">{policy}</pre></section>\
         <section id=\"events-section\"><h2>Recent events</h2><table id=\"events\"><thead><tr><th>at</th>\
         <th>kind</th><th>action</th><th>guest</th><th>actor</th><th>target</th><th>outcome</th>\
         <th>detail</th></tr></thead><tbody></tbody></table></section>\
         </main><script src=\"/dashboard/app.js\"></script>",
        actor = esc(&identity.actor()),
        role = esc(&identity.role),
        connected = state.hub.len(),
        known = state.fleet.len(),
        policy = esc(&policy),
    );
    html(StatusCode::OK, page("Tether KBS", &body))
}

/// The login form.
#[derive(Deserialize)]
pub struct Login {
    token: String,
}

fn token_exp(token: &str) -> Option<u64> {
    let payload = token.split('.').nth(1)?;
    let claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
    claims.get("exp")?.as_u64()
}

/// `POST /dashboard/login` (form `token=<admin JWT>`): a valid admin token whose role may
/// read the fleet view opens a session (cookie) and redirects to `/dashboard`; anything else
/// is a 401 login form saying why. Audited.
pub async fn login(State(state): State<AppState>, Form(form): Form<Login>) -> Response {
    let token = form.token.trim();
    let mut headers = HeaderMap::new();
    let Ok(bearer) = HeaderValue::from_str(&format!("Bearer {token}")) else {
        return html(
            StatusCode::UNAUTHORIZED,
            login_page(Some("That is not an admin token.")),
        );
    };
    headers.insert(axum::http::header::AUTHORIZATION, bearer);
    let identity = match state.admin.authorize(&headers, &Method::GET, LOGIN_CHECK) {
        Ok(identity) => identity,
        Err(e) => {
            crate::metrics::Metrics::inc(
                &state.metrics.admin_actions,
                &[("action", "dashboard.login"), ("outcome", e.name)],
            );
            return html(
                StatusCode::UNAUTHORIZED,
                login_page(Some(&format!("Refused: {}", e.detail))),
            );
        }
    };
    let now_s = crate::storage::now_ms() / 1000;
    let ttl = token_exp(token)
        .map(|exp| Duration::from_secs(exp.saturating_sub(now_s)))
        .unwrap_or(SESSION_TTL)
        .min(SESSION_TTL);
    let id = state.dashboard.open(identity.clone(), ttl);
    state
        .audit(
            &identity,
            "dashboard.login",
            "/dashboard",
            "ok",
            format!("session for {} s", ttl.as_secs()),
        )
        .await;
    let secure = if state.config.http.tls.is_some() {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        ttl.as_secs()
    );
    let mut resp = Redirect::to("/dashboard").into_response();
    *resp.status_mut() = StatusCode::SEE_OTHER;
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().insert(SET_COOKIE, v);
    }
    secure_headers(resp.headers_mut());
    resp
}

/// `POST /dashboard/logout`: ends the session and clears the cookie.
pub async fn logout(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(id) = cookie_value(&headers) {
        state.dashboard.close(&id);
    }
    let mut resp = Redirect::to("/dashboard").into_response();
    *resp.status_mut() = StatusCode::SEE_OTHER;
    resp.headers_mut().insert(
        SET_COOKIE,
        HeaderValue::from_static("tether-dashboard=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    secure_headers(resp.headers_mut());
    resp
}

fn asset(
    state: &AppState,
    headers: &HeaderMap,
    content_type: &'static str,
    body: &'static str,
) -> Response {
    if page_session(state, headers).is_none() {
        return ApiError::unauthorized("DashboardSessionRequired", "log in at /dashboard first")
            .into_response();
    }
    let mut resp = body.into_response();
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    secure_headers(resp.headers_mut());
    resp
}

/// `GET /dashboard/app.js` (session required).
pub async fn app_js(State(state): State<AppState>, headers: HeaderMap) -> Response {
    asset(&state, &headers, "text/javascript; charset=utf-8", APP_JS)
}

/// `GET /dashboard/app.css` (public: the login page uses it; nothing in it is secret).
pub async fn app_css() -> Response {
    let mut resp = APP_CSS.into_response();
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/css; charset=utf-8"),
    );
    secure_headers(resp.headers_mut());
    resp
}

/// The dashboard routes.
pub fn routes() -> axum::Router<AppState> {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/dashboard", get(index))
        .route("/dashboard/", get(|| async { Redirect::to("/dashboard") }))
        .route("/dashboard/login", post(login))
        .route("/dashboard/logout", post(logout))
        .route("/dashboard/app.js", get(app_js))
        .route("/dashboard/app.css", get(app_css))
}

/// Shared handle type in [`AppState`].
pub type SharedSessions = Arc<Sessions>;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn escaping_and_cookies() {
        assert_eq!(
            esc("<a href='x'>&\"</a>"),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;&lt;/a&gt;"
        );
        let mut h = HeaderMap::new();
        h.insert("cookie", "a=b; tether-dashboard=xyz; c=d".parse().unwrap());
        assert_eq!(cookie_value(&h).as_deref(), Some("xyz"));
    }

    #[test]
    fn sessions_expire_and_close() {
        let s = Sessions::new();
        let who = AdminIdentity {
            subject: "a".into(),
            role: "admin".into(),
            key: "dev".into(),
        };
        let id = s.open(who.clone(), Duration::from_secs(60));
        assert_eq!(s.get(&id).unwrap().actor(), "a@dev");
        s.close(&id);
        assert!(s.get(&id).is_none());
        let gone = s.open(who, Duration::ZERO);
        assert!(s.get(&gone).is_none());
        assert!(s.is_empty());
    }
}
