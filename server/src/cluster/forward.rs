//! The forwarding layer: an admin call for one guest (`POST /kbs/v0/admin/guests/<id>/ping`,
//! `.../probe`, `POST /kbs/v0/probes/<id>`) that lands on a replica not holding the guest's
//! tunnel goes to the replica that does, as the registry records it; a call that arrives
//! forwarded is checked (hop MAC, freshness, replay, still the owner at that epoch) and then
//! served as any other, the admin's own credentials checked as usual. A forwarded call is
//! never forwarded again.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use kbs_core::storage::{TunnelOwner, now_ms};
use kbs_web::admin_auth::ForwardedBy;
use kbs_web::error::ApiError;

use super::hop::{HOP_HEADER, Hop, HopError, verify};
use super::{Cluster, REPLICA_STALE_AFTER};

/// Header on a forwarded call's answer: the replica that served it.
pub const SERVED_BY_HEADER: &str = "x-tether-served-by";
/// Largest answer taken back from the owner replica.
pub const MAX_FORWARDED_RESPONSE: usize = 8 * 1024 * 1024;

/// The guest a one-guest admin call addresses, if `method path` is one.
pub fn one_guest_target<'p>(method: &Method, path: &'p str) -> Option<&'p str> {
    if method != Method::POST {
        return None;
    }
    let id = if let Some(rest) = path.strip_prefix("/kbs/v0/admin/guests/") {
        rest.strip_suffix("/ping")
            .or_else(|| rest.strip_suffix("/probe"))?
    } else {
        path.strip_prefix("/kbs/v0/probes/")?
    };
    // Guest ids are [A-Za-z0-9._-]: anything else (an encoded slash) is left to the handler.
    let plain = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    plain.then_some(id)
}

/// The middleware (`from_fn_with_state` with the [`Cluster`]).
pub async fn route(State(cluster): State<Arc<Cluster>>, req: Request, next: Next) -> Response {
    let hop = req.headers().get(HOP_HEADER).cloned();
    let path = req.uri().path().to_owned();
    let Some(guest_id) = one_guest_target(req.method(), &path).map(str::to_owned) else {
        if hop.is_some() {
            return refused(HopError::Malformed("not a forwardable call")).into_response();
        }
        return next.run(req).await;
    };
    if let Some(hop) = hop {
        return arrived(&cluster, &guest_id, hop, req, next).await;
    }
    if !cluster.is_shared() {
        return next.run(req).await;
    }
    // Ask the registry even when a tunnel is live here: after a move, a half-open tunnel of
    // this replica is not the guest's tunnel any more.
    let owner = match cluster.owner(&guest_id).await {
        Ok(Some(o)) if o.replica_id != cluster.replica_id() => o,
        Ok(_) => return next.run(req).await,
        Err(e) => {
            tracing::warn!(guest_id = %guest_id, error = %e, "cluster registry unreadable; answering from this replica");
            return next.run(req).await;
        }
    };
    if cluster
        .held_epoch(&guest_id)
        .is_some_and(|e| e > owner.epoch)
    {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, cluster.max_body).await {
        Ok(b) => b,
        Err(_) => {
            return ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "PayloadTooLarge",
                format!("request body is larger than {} bytes", cluster.max_body),
            )
            .into_response();
        }
    };
    let answer = forward_to(&cluster, &owner, &guest_id, &parts, &body).await;
    // The owner answers 409 when the guest moved between our read of the registry and the
    // hop's arrival: the registry then names its new place; one more try, no more.
    let moved =
        answer.status() == StatusCode::CONFLICT && answer.headers().contains_key(SERVED_BY_HEADER);
    if !moved {
        return answer;
    }
    match cluster.owner(&guest_id).await {
        Ok(Some(o)) if o.replica_id != cluster.replica_id() && o.epoch > owner.epoch => {
            forward_to(&cluster, &o, &guest_id, &parts, &body).await
        }
        // It reconnected here.
        Ok(Some(o)) if o.replica_id == cluster.replica_id() => {
            next.run(Request::from_parts(parts, Body::from(body))).await
        }
        _ => answer,
    }
}

/// Sends the call to `owner` and turns its answer (or its silence) into ours.
async fn forward_to(
    cluster: &Cluster,
    owner: &TunnelOwner,
    guest_id: &str,
    parts: &axum::http::request::Parts,
    body: &Bytes,
) -> Response {
    let age = now_ms().saturating_sub(owner.heartbeat_at_ms);
    let Some(base) = owner
        .advertise_url
        .as_deref()
        .filter(|_| age <= REPLICA_STALE_AFTER.as_millis() as u64)
    else {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "GuestOwnerGone",
            format!(
                "guest {guest_id}'s tunnel was held by replica {}, which has not been heard from for {} s: \
                 the guest is reconnecting to another replica, try again shortly",
                owner.replica_id,
                age / 1000
            ),
        )
        .into_response();
    };
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or(parts.uri.path(), |p| p.as_str());
    let hop = Hop::new(cluster.replica_id(), guest_id, owner.epoch, now_ms());
    let mac = hop.header(&cluster.key, parts.method.as_str(), path_and_query, body);
    let mut headers = HeaderMap::new();
    for name in [header::AUTHORIZATION, header::CONTENT_TYPE, header::ACCEPT] {
        if let Some(v) = parts.headers.get(&name) {
            headers.insert(name, v.clone());
        }
    }
    let Ok(mac) = HeaderValue::from_str(&mac) else {
        return ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "ForwardFailed",
            "hop header",
        )
        .into_response();
    };
    headers.insert(HOP_HEADER, mac);
    let url = format!("{base}{path_and_query}");
    let started = std::time::Instant::now();
    let sent = cluster
        .client
        .request(parts.method.clone(), &url)
        .headers(headers)
        .body(body.clone())
        .send()
        .await;
    let unreachable = |e: String| {
        tracing::warn!(guest_id, owner = %owner.replica_id, url = %url, error = %e, "forwarding to the owner replica failed");
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "GuestOwnerUnreachable",
            format!(
                "guest {guest_id}'s tunnel is on replica {} ({base}), which did not answer: {e}",
                owner.replica_id
            ),
        )
        .into_response()
    };
    let answer = match sent {
        Ok(a) => a,
        Err(e) if e.is_timeout() => {
            return unreachable(format!("no answer within {:?}", started.elapsed()));
        }
        Err(e) => return unreachable(chain(&e)),
    };
    let status = answer.status();
    let content_type = answer.headers().get(header::CONTENT_TYPE).cloned();
    let mut answer = answer;
    let mut taken = Vec::new();
    loop {
        match answer.chunk().await {
            Ok(None) => break,
            Ok(Some(c)) if taken.len() + c.len() <= MAX_FORWARDED_RESPONSE => {
                taken.extend_from_slice(&c)
            }
            Ok(Some(_)) => {
                return unreachable(format!(
                    "its answer is larger than {MAX_FORWARDED_RESPONSE} bytes"
                ));
            }
            Err(e) => return unreachable(chain(&e)),
        }
    }
    tracing::info!(guest_id, owner = %owner.replica_id, status = status.as_u16(), elapsed_ms = started.elapsed().as_millis() as u64, "admin call forwarded to the owner replica");
    let mut response = Response::new(Body::from(taken));
    *response.status_mut() = status;
    if let Some(ct) = content_type {
        response.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    if let Ok(v) = HeaderValue::from_str(&owner.replica_id) {
        response.headers_mut().insert(SERVED_BY_HEADER, v);
    }
    response
}

/// A call another replica forwarded: served here only if its hop verifies and this replica
/// still holds the guest at the hop's epoch; never forwarded again.
async fn arrived(
    cluster: &Cluster,
    guest_id: &str,
    hop: HeaderValue,
    req: Request,
    next: Next,
) -> Response {
    let (mut parts, body) = req.into_parts();
    let Ok(body) = axum::body::to_bytes(body, cluster.max_body).await else {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PayloadTooLarge",
            format!("request body is larger than {} bytes", cluster.max_body),
        )
        .into_response();
    };
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or(parts.uri.path(), |p| p.as_str());
    let checked = match hop.to_str() {
        Ok(h) => verify(
            &cluster.key,
            &cluster.replay,
            h,
            parts.method.as_str(),
            path_and_query,
            &body,
            now_ms(),
        ),
        Err(_) => Err(HopError::Malformed("not ASCII")),
    };
    let hop = match checked {
        Ok(hop) if hop.guest_id == guest_id => hop,
        Ok(_) => {
            return refused(HopError::Malformed("guest id differs from the path")).into_response();
        }
        Err(e) => {
            tracing::warn!(guest_id, error = %e, "forwarded call refused");
            return refused(e).into_response();
        }
    };
    let mut answer = match cluster.held_epoch(guest_id) {
        Some(epoch) if epoch == hop.epoch => {
            parts.extensions.insert(ForwardedBy(hop.from.clone()));
            next.run(Request::from_parts(parts, Body::from(body))).await
        }
        Some(epoch) => ApiError::new(
            StatusCode::CONFLICT,
            "GuestMoved",
            format!(
                "replica {} holds guest {guest_id} at epoch {epoch}, not {}: its tunnel changed since the call was forwarded",
                cluster.replica_id(),
                hop.epoch
            ),
        )
        .into_response(),
        None => ApiError::new(
            StatusCode::CONFLICT,
            "GuestMoved",
            format!(
                "replica {} does not hold guest {guest_id}'s tunnel (any more)",
                cluster.replica_id()
            ),
        )
        .into_response(),
    };
    if let Ok(v) = HeaderValue::from_str(cluster.replica_id()) {
        answer.headers_mut().insert(SERVED_BY_HEADER, v);
    }
    answer
}

/// `e` and its causes (reqwest's own message leaves out "connection refused").
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        next = cause.source();
    }
    out
}

fn refused(e: HopError) -> ApiError {
    let status = match e {
        HopError::Busy => StatusCode::SERVICE_UNAVAILABLE,
        HopError::Malformed(_) => StatusCode::UNAUTHORIZED,
        HopError::BadMac | HopError::Stale(_) | HopError::Replayed => StatusCode::FORBIDDEN,
    };
    ApiError::new(status, "ReplicaHopRefused", e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_one_guest_calls_are_forwarded() {
        let post = Method::POST;
        assert_eq!(
            one_guest_target(&post, "/kbs/v0/admin/guests/g-1/ping"),
            Some("g-1")
        );
        assert_eq!(
            one_guest_target(&post, "/kbs/v0/admin/guests/g.1/probe"),
            Some("g.1")
        );
        assert_eq!(one_guest_target(&post, "/kbs/v0/probes/g_1"), Some("g_1"));
        for path in [
            "/kbs/v0/admin/guests",
            "/kbs/v0/admin/guests/a/b/ping",
            "/kbs/v0/admin/guests/%2f/ping",
            "/kbs/v0/admin/guests//ping",
            "/kbs/v0/probes/",
            "/kbs/v0/probes/a/b",
            "/kbs/v0/resource/a/b/c",
        ] {
            assert_eq!(one_guest_target(&post, path), None, "{path}");
        }
        assert_eq!(one_guest_target(&Method::GET, "/kbs/v0/probes/g"), None);
    }
}
