//! The operator dashboard at `/dashboard`: log in by pasting an admin JWT, which is checked
//! and exchanged for a short-lived session cookie (`tether-dashboard`, HttpOnly,
//! SameSite=Strict, Secure over TLS); the token itself is never stored, echoed or shown. The
//! page is server-rendered HTML plus one small vanilla JS file and one CSS file, all served
//! from the binary (no CDN). The JS calls the ordinary admin APIs with the cookie:
//! [`kbs_web::extract::AdminCaller`] accepts a dashboard session as it accepts a Bearer token,
//! re-checking the session's role on every request, and for anything but GET/HEAD it also
//! requires the `X-Tether-Dashboard: 1` header (which a cross-site form cannot send).

use std::sync::Arc;
use std::time::Duration;

use axum::Form;
use axum::extract::State;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE, SET_COOKIE};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use kbs_core::audit::Audit;
use kbs_core::fleet::Fleet;
use kbs_web::admin_auth::AdminIdentity;
use kbs_web::admin_gate::AdminGate;
use kbs_web::dashboard_session::{COOKIE, SESSION_TTL, cookie_value};
use kbs_web::error::ApiError;
use kbs_web::plugin::PluginRegistry;
use serde::Deserialize;

use crate::http::policy::PolicyAdmin;

/// What the dashboard pages use.
#[derive(Clone)]
pub struct Dashboard {
    /// Admin authentication and the sessions.
    pub admin: Arc<AdminGate>,
    /// The resource policy (shown).
    pub policy: PolicyAdmin,
    /// The plugins (listed).
    pub plugins: Arc<PluginRegistry>,
    /// Live tunnels (counted).
    pub hub: tunnel::Hub,
    /// The fleet view (counted).
    pub fleet: Arc<Fleet>,
    /// How long guests that are gone are kept (`fleet.forget_after`, shown).
    pub forget_after: std::time::Duration,
    /// The audit trail (logins).
    pub audit: Audit,
    /// Mark the session cookie `Secure` (the KBS serves TLS).
    pub secure_cookie: bool,
}
/// What a login must be allowed to do: read the fleet view.
const LOGIN_CHECK: &str = "/kbs/v0/admin/guests";

const APP_JS: &str = include_str!("app.js");
const APP_CSS: &str = include_str!("app.css");
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

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
fn page_session(state: &Dashboard, headers: &HeaderMap) -> Option<AdminIdentity> {
    cookie_value(headers).and_then(|id| state.admin.sessions().get(&id))
}

/// `GET /dashboard`: the dashboard with a live session, else (401) the login form.
pub async fn index(State(state): State<Dashboard>, headers: HeaderMap) -> Response {
    let Some(identity) = page_session(&state, &headers) else {
        return html(StatusCode::UNAUTHORIZED, login_page(None));
    };
    let (policy_version, policy) = match state.policy.current().await {
        Ok(current) => current,
        Err(_) => (0, state.policy.gate.engine().source().1),
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
         <tbody><tr><td colspan=\"7\">{connected} connected, {known} known (kept {forget_after} after last seen); loading…</td></tr></tbody></table></section>\
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
        forget_after = esc(&humantime::format_duration(state.forget_after).to_string()),
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
pub async fn login(State(state): State<Dashboard>, Form(form): Form<Login>) -> Response {
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
            state.admin.count("dashboard.login", e.name);
            return html(
                StatusCode::UNAUTHORIZED,
                login_page(Some(&format!("Refused: {}", e.detail))),
            );
        }
    };
    let now_s = kbs_core::storage::now_ms() / 1000;
    let ttl = token_exp(token)
        .map(|exp| Duration::from_secs(exp.saturating_sub(now_s)))
        .unwrap_or(SESSION_TTL)
        .min(SESSION_TTL);
    let id = state.admin.sessions().open(identity.clone(), ttl);
    identity
        .audit(
            &state.audit,
            "dashboard.login",
            "/dashboard",
            "ok",
            format!("session for {} s", ttl.as_secs()),
        )
        .await;
    let secure = if state.secure_cookie { "; Secure" } else { "" };
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
pub async fn logout(State(state): State<Dashboard>, headers: HeaderMap) -> Response {
    if let Some(id) = cookie_value(&headers) {
        state.admin.sessions().close(&id);
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
    state: &Dashboard,
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
pub async fn app_js(State(state): State<Dashboard>, headers: HeaderMap) -> Response {
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
pub fn routes<S>() -> axum::Router<S>
where
    S: Clone + Send + Sync + 'static,
    Dashboard: axum::extract::FromRef<S>,
{
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/dashboard", get(index))
        .route("/dashboard/", get(|| async { Redirect::to("/dashboard") }))
        .route("/dashboard/login", post(login))
        .route("/dashboard/logout", post(logout))
        .route("/dashboard/app.js", get(app_js))
        .route("/dashboard/app.css", get(app_css))
}

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
}
