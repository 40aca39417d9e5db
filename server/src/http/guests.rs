//! Admin view of the guests connected over the tunnel: list them, and ping or probe one
//! through its tunnel (`/kbs/v0/admin/guests...`).

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use rand::RngCore;
use rpc_defs::ProbeReport;
use serde::{Deserialize, Serialize};
use tunnel::{CallError, TunnelHandle};

use kbs_core::audit::Audit;
use kbs_core::fleet::{
    ConnectionRecord, FleetQuery, GuestRecord, HeldVersion, LastProbe, MAX_PAGE, Retention,
};
use kbs_core::probe::{ProbeRequest, Prober};
use kbs_core::resource_path::ResourcePath;
use kbs_core::selector::Selector;
use kbs_core::storage::ResourceStore;
use kbs_web::admin_auth::AdminIdentity;
use kbs_web::error::ApiError;
use kbs_web::extract::{AdminCaller, ApiBytes};

/// What the guest endpoints use: the prober (hub, fleet view, directory, probe metrics),
/// resource versions (for the drift filter) and audit.
#[derive(Clone)]
pub struct GuestsApi {
    /// Probes guests and holds the hub and the fleet view.
    pub prober: Prober,
    /// Resource versions.
    pub resources: Arc<dyn ResourceStore>,
    /// The audit trail.
    pub audit: Audit,
    /// How long guests that are gone are kept (shown with every listing).
    pub retention: Retention,
}

/// Bytes echoed by `POST /kbs/v0/admin/guests/{guest_id}/ping`.
pub const PING_PAYLOAD_BYTES: usize = 256;

/// One guest, as `GET /kbs/v0/admin/guests` lists it: the tunnel fields (of its live or last
/// tunnel) and what the fleet view knows.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestSummary {
    /// Attested guest id.
    pub guest_id: String,
    /// Attested labels.
    pub labels: BTreeMap<String, String>,
    /// Daemon instance id (the guest's own words).
    pub instance: String,
    /// Daemon version (the guest's own words).
    pub daemon_version: String,
    /// Services the daemon offers (the guest's own words).
    pub services: Vec<String>,
    /// Tunnel session id (live or last).
    pub session_id: String,
    /// When the (live or last) tunnel came up, Unix milliseconds.
    pub connected_since: u64,
    /// The KBS replica holding the tunnel (its host name, or `local`).
    pub replica: String,
    /// When the guest was last heard from, Unix milliseconds.
    pub last_seen: u64,
    /// Whether a tunnel is live now.
    #[serde(default)]
    pub connected: bool,
    /// TEE type of its latest token.
    #[serde(default)]
    pub tee: Option<String>,
    /// Attestation (token issue) time, Unix ms.
    #[serde(default)]
    pub attested_at: Option<u64>,
    /// Token expiry, Unix ms.
    #[serde(default)]
    pub token_expires_at: Option<u64>,
    /// First connection, Unix ms.
    #[serde(default)]
    pub first_seen: u64,
    /// Last connections, newest first.
    #[serde(default)]
    pub history: Vec<ConnectionRecord>,
    /// Last probe.
    #[serde(default)]
    pub last_probe: Option<LastProbe>,
    /// Held resource versions (from the last resources probe).
    #[serde(default)]
    pub held: BTreeMap<String, HeldVersion>,
    /// When `held` was reported, Unix ms.
    #[serde(default)]
    pub held_at: Option<u64>,
}

impl GuestSummary {
    /// The summary of a fleet record, with live tunnel figures when `live` is given.
    pub fn of(rec: GuestRecord, live: Option<&TunnelHandle>) -> Self {
        let last = rec.history.first();
        let session_id = live
            .map(|h| h.session_id.clone())
            .or_else(|| last.map(|c| c.session_id.clone()))
            .unwrap_or_default();
        let connected_since = live
            .map(|h| unix_ms(h.connected_at))
            .or_else(|| last.map(|c| c.connected_at))
            .unwrap_or(0);
        let last_seen = live
            .map(|h| h.last_seen_unix_ms())
            .unwrap_or(0)
            .max(rec.last_seen);
        Self {
            guest_id: rec.guest_id,
            labels: Arc::unwrap_or_clone(rec.labels),
            instance: rec.instance,
            daemon_version: rec.daemon_version,
            services: rec.services,
            session_id,
            connected_since,
            replica: replica_name().to_string(),
            last_seen,
            connected: live.is_some(),
            tee: rec.tee,
            attested_at: rec.attested_at,
            token_expires_at: rec.token_expires_at,
            first_seen: rec.first_seen,
            history: rec.history,
            last_probe: rec.last_probe.map(|p| *p),
            held: rec.held,
            held_at: rec.held_at,
        }
    }
}

/// Body of `GET /kbs/v0/admin/guests`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestList {
    /// Matching guests, sorted by id.
    pub guests: Vec<GuestSummary>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
    /// Guests the KBS knows in all (connected or not).
    #[serde(default)]
    pub known: usize,
    /// How long a guest without a tunnel is kept after it was last seen, then forgotten
    /// (`fleet.forget_after`, humantime: `30days`).
    #[serde(default)]
    pub forget_after: String,
    /// The same, in seconds.
    #[serde(default)]
    pub forget_after_s: u64,
}

/// Query of `GET /kbs/v0/admin/guests`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    /// Label selector (`app=db,zone in (a,b)`).
    pub selector: Option<String>,
    /// `true` (default: guests with a live tunnel), `false` (known, not connected) or `any`.
    pub connected: Option<String>,
    /// Only guests holding an older version of this resource path than the latest (drift).
    pub stale: Option<String>,
    /// Page size (default 100, at most 1000).
    pub limit: Option<usize>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// Body of a successful ping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PingReply {
    /// Round trip through the tunnel, microseconds.
    pub rtt_us: u64,
}

/// This replica's name in listings: the host name, or `local` when there is none.
pub fn replica_name() -> &'static str {
    static NAME: OnceLock<String> = OnceLock::new();
    NAME.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "local".to_string())
    })
}

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Maps a failed call into a guest to the API error an operator sees.
pub fn call_error(guest_id: &str, e: CallError) -> ApiError {
    match e {
        CallError::DeadlineExceeded => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "GuestTimeout",
            format!("guest {guest_id} did not answer before the deadline"),
        ),
        CallError::Disconnected => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "GuestDisconnected",
            format!("guest {guest_id} disconnected during the call"),
        ),
        CallError::TooManyInFlight => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "GuestBusy",
            format!("too many calls in flight to guest {guest_id}; retry later"),
        ),
        CallError::Guest(e) => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "GuestError",
            format!("guest {guest_id}: {e}"),
        ),
        CallError::Transport(e) => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "GuestTransportError",
            format!("guest {guest_id}: {e}"),
        ),
    }
}

fn not_connected(guest_id: &str) -> ApiError {
    ApiError::not_found(
        "GuestNotConnected",
        format!("no tunnel from guest {guest_id:?} on this replica"),
    )
}

/// `GET /kbs/v0/admin/guests?selector=&connected=true|false|any&stale=<path>&limit=&cursor=`:
/// a page of guests by id. Without `connected`, only guests with a live tunnel (as before the
/// fleet view); `connected=any` adds every guest known from earlier connections.
pub async fn list(
    State(api): State<GuestsApi>,
    AdminCaller(_admin): AdminCaller,
    Query(p): Query<ListParams>,
) -> Result<Json<GuestList>, ApiError> {
    let connected = match p.connected.as_deref() {
        None | Some("true") => Some(true),
        Some("false") => Some(false),
        Some("any") => None,
        Some(other) => {
            return Err(ApiError::bad_request(
                "MalformedRequest",
                format!("connected must be true, false or any, not {other:?}"),
            ));
        }
    };
    let selector = Selector::parse(p.selector.as_deref().unwrap_or(""))
        .map_err(|e| ApiError::bad_request("InvalidSelector", e.to_string()))?;
    let stale = match &p.stale {
        Some(path) => {
            let parsed: ResourcePath = path
                .parse()
                .map_err(|e| ApiError::bad_request("InvalidResourcePath", format!("stale: {e}")))?;
            let started = std::time::Instant::now();
            let versions = api.resources.list_versions(&parsed).await?;
            api.prober.metrics.storage("list_versions", started);
            let latest = versions
                .iter()
                .filter(|v| !v.deleted)
                .map(|v| v.version)
                .max()
                .unwrap_or(0);
            Some((parsed.to_string(), latest))
        }
        None => None,
    };
    let Prober {
        hub,
        fleet,
        directory,
        ..
    } = &api.prober;
    let live = hub.list();
    fleet.ensure_live(&live, directory);
    let query = FleetQuery {
        selector,
        connected,
        stale,
        after: p.cursor.filter(|c| !c.is_empty()),
        limit: p.limit.unwrap_or(100).clamp(1, MAX_PAGE),
    };
    let page = if connected == Some(true) {
        let ids = live.iter().map(|h| h.guest_id.clone()).collect();
        fleet.query_live(&query, ids)
    } else {
        fleet.query(&query, |id| hub.get(id).is_some())
    };
    let guests = page
        .guests
        .into_iter()
        .map(|rec| {
            let handle = hub.get(&rec.guest_id);
            GuestSummary::of(rec, handle.as_deref())
        })
        .collect();
    Ok(Json(GuestList {
        guests,
        next_cursor: page.next,
        known: fleet.len(),
        forget_after: humantime::format_duration(api.retention.forget_after).to_string(),
        forget_after_s: api.retention.forget_after.as_secs(),
    }))
}

/// `POST /kbs/v0/admin/guests/{guest_id}/ping`: echoes 256 random bytes through the tunnel.
pub async fn ping(
    State(api): State<GuestsApi>,
    AdminCaller(admin): AdminCaller,
    Path(guest_id): Path<String>,
) -> Result<Json<PingReply>, ApiError> {
    let result = ping_guest(&api.prober.hub, &guest_id).await;
    let detail = match &result {
        Ok(r) => format!("rtt {} us", r.rtt_us),
        Err(e) => e.detail.clone(),
    };
    audit(&api.audit, &admin, "guest.ping", &guest_id, &result, detail).await;
    result.map(Json)
}

async fn ping_guest(hub: &tunnel::Hub, guest_id: &str) -> Result<PingReply, ApiError> {
    let handle = hub.get(guest_id).ok_or_else(|| not_connected(guest_id))?;
    let mut payload = vec![0u8; PING_PAYLOAD_BYTES];
    rand::thread_rng().fill_bytes(&mut payload);
    let start = std::time::Instant::now();
    let echo = handle
        .ping(payload.clone(), None)
        .await
        .map_err(|e| call_error(guest_id, e))?;
    let rtt = start.elapsed();
    if echo != payload {
        return Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "GuestError",
            format!(
                "guest {guest_id} echoed {} bytes that differ from the {PING_PAYLOAD_BYTES} sent",
                echo.len()
            ),
        ));
    }
    Ok(PingReply {
        rtt_us: u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX),
    })
}

/// `POST /kbs/v0/admin/guests/{guest_id}/probe` with optional `{"kind": "health" |
/// "resources" | "runtime" | "all"}` (default `all`): the guest's `ProbeReport`.
pub async fn probe(
    State(api): State<GuestsApi>,
    AdminCaller(admin): AdminCaller,
    Path(guest_id): Path<String>,
    ApiBytes(body): ApiBytes,
) -> Result<Json<ProbeReport>, ApiError> {
    let request =
        ProbeRequest::from_body(&body).map_err(|e| ApiError::bad_request("MalformedRequest", e))?;
    let kind = request.kind;
    let prober = &api.prober;
    let started = std::time::Instant::now();
    let result = match prober.hub.get(&guest_id) {
        Some(handle) => handle
            .probe(kind, None)
            .await
            .map_err(|e| call_error(&guest_id, e)),
        None => Err(not_connected(&guest_id)),
    };
    if prober.hub.get(&guest_id).is_some() || prober.fleet.get(&guest_id).is_some() {
        prober
            .fleet
            .ensure_live(&prober.hub.list(), &prober.directory);
        let outcome = result.clone().map_err(|e| {
            let o = match e.name {
                "GuestTimeout" => "timeout",
                "GuestDisconnected" => "disconnected",
                "GuestNotConnected" => "not_connected",
                "GuestBusy" => "busy",
                "GuestError" => "guest_error",
                _ => "transport_error",
            };
            (o, e.detail)
        });
        prober.record(&guest_id, kind, outcome, started);
    }
    let detail = match &result {
        Ok(_) => format!("kind {kind:?}"),
        Err(e) => format!("kind {kind:?}: {}", e.detail),
    };
    audit(
        &api.audit,
        &admin,
        "guest.probe",
        &guest_id,
        &result,
        detail,
    )
    .await;
    result.map(Json)
}

async fn audit<T>(
    trail: &Audit,
    admin: &AdminIdentity,
    action: &str,
    guest_id: &str,
    result: &Result<T, ApiError>,
    detail: String,
) {
    let outcome = match result {
        Ok(_) => "ok",
        Err(e) => e.name,
    };
    admin.audit(trail, action, guest_id, outcome, detail).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use rpc_defs::ProbeKind;

    #[test]
    fn probe_requests_parse_with_a_default() {
        let parse = |s: &str| serde_json::from_str::<ProbeRequest>(s);
        assert_eq!(parse("{}").unwrap().kind, ProbeKind::All);
        assert_eq!(
            parse(r#"{"kind":"health"}"#).unwrap().kind,
            ProbeKind::Health
        );
        assert_eq!(
            parse(r#"{"kind":"resources"}"#).unwrap().kind,
            ProbeKind::Resources
        );
        assert!(parse(r#"{"kind":"Health"}"#).is_err());
        assert!(parse(r#"{"kind":"all","extra":1}"#).is_err());
        let json = serde_json::to_string(&ProbeRequest {
            kind: ProbeKind::Runtime,
        })
        .unwrap();
        assert_eq!(json, r#"{"kind":"runtime"}"#);
    }

    #[test]
    fn call_errors_map_to_statuses() {
        let cases = [
            (CallError::DeadlineExceeded, 504, "GuestTimeout"),
            (CallError::Disconnected, 502, "GuestDisconnected"),
            (CallError::TooManyInFlight, 429, "GuestBusy"),
            (
                CallError::Guest(rpc_defs::GuestError::Unsupported("runtime".into())),
                502,
                "GuestError",
            ),
            (
                CallError::Transport("too big".into()),
                502,
                "GuestTransportError",
            ),
        ];
        for (e, status, name) in cases {
            let api = call_error("g1", e);
            assert_eq!((api.status.as_u16(), api.name), (status, name));
            assert!(api.detail.contains("g1"), "{}", api.detail);
        }
        let guest = call_error(
            "g1",
            CallError::Guest(rpc_defs::GuestError::Unsupported("runtime".into())),
        );
        assert!(
            guest.detail.contains("unsupported: runtime"),
            "{}",
            guest.detail
        );
    }

    #[test]
    fn replica_name_is_never_empty() {
        assert!(!replica_name().is_empty());
        assert_eq!(unix_ms(UNIX_EPOCH), 0);
    }
}
