//! splitapi HTTP: the guest pull path and the owner's client bundle.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Extension, Path, Query, State};
use serde_json::{Value, json};

use kbs_core::identity::GuestIdentity;
use kbs_web::error::ApiError;
use kbs_web::extract::{AdminCaller, Attested};
use kbs_web::plugin::PluginContext;

use super::pki::{self, SandboxIdentity};
use super::{Inner, server_files};

/// Upstream's query parameters are accepted only when they repeat the attested identity.
fn check_query(identity: &GuestIdentity, query: &BTreeMap<String, String>) -> Result<(), ApiError> {
    let mismatch = |key: &str, sent: &str| {
        ApiError::forbidden(
            "IdentityMismatch",
            format!(
                "query parameter `{key}` ({sent:?}) does not match the attested identity of this guest; \
                 the sandbox identity comes from attestation only"
            ),
        )
    };
    if let Some(id) = query.get("id")
        && *id != identity.guest_id
    {
        return Err(mismatch("id", id));
    }
    if let Some(name) = query.get("name")
        && !identity
            .name
            .as_deref()
            .is_some_and(|n| n.eq_ignore_ascii_case(name))
    {
        return Err(mismatch("name", name));
    }
    if let Some(ip) = query.get("ip") {
        let parsed: Option<std::net::IpAddr> = ip.parse().ok();
        if parsed.is_none() || parsed != identity.ip {
            return Err(mismatch("ip", ip));
        }
    }
    Ok(())
}

/// `GET /kbs/v0/splitapi/credentials[?id=&ip=&name=]` (attested): the server bundle, sealed to
/// the caller's TEE key: `{"id","version","not_after","files":[{"name","mode"}],"jwe":{..}}`.
pub(super) async fn pull(
    State(ctx): State<PluginContext>,
    Extension(inner): Extension<Arc<Inner>>,
    Attested(token): Attested,
    Query(query): Query<BTreeMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    check_query(&token.identity, &query)?;
    ctx.require_policy(&token.claims, None, &query)?;
    let rec = inner
        .ensure(&ctx, &SandboxIdentity::from(&token.identity), false)
        .await?;
    let sealed = super::seal_server_files(&rec, &token.tee_pubkey)?;
    tracing::info!(guest_id = %token.identity.guest_id, version = rec.version, "splitapi bundle pulled");
    Ok(Json(json!({
        "id": pki::BUNDLE_ID,
        "version": rec.version,
        "not_after": rec.not_after,
        "files": server_files(),
        "jwe": sealed,
    })))
}

/// `GET /kbs/v0/splitapi/owner/<guest_id>/credentials` (admin role allowing this path): the
/// owner's client bundle, PEM: `{"guest_id","version","not_after","ca.crt","client.crt","client.key"}`.
pub(super) async fn owner(
    State(ctx): State<PluginContext>,
    Extension(inner): Extension<Arc<Inner>>,
    AdminCaller(admin): AdminCaller,
    Path(guest_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    // Guest ids are [A-Za-z0-9._-] (init-data) or derived `tee-<hex>`: anything else (an
    // encoded slash, say) names no sandbox, whatever a loose role regex let through.
    if guest_id.is_empty()
        || guest_id.len() > 128
        || !guest_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(ApiError::bad_request(
            "InvalidGuestId",
            "a guest id is 1..=128 characters of [A-Za-z0-9._-]",
        ));
    }
    let rec = match inner.load(&ctx, &guest_id).await {
        Ok(Some(r)) => r,
        Ok(None) => {
            ctx.audit(
                &admin,
                "splitapi.owner-credentials",
                &guest_id,
                "not-found",
                String::new(),
            )
            .await;
            return Err(ApiError::not_found(
                "CredentialsNotFound",
                format!(
                    "no splitapi credentials for guest {guest_id:?} yet: they are issued when it connects \
                     announcing the splitapi service or pulls /kbs/v0/splitapi/credentials"
                ),
            ));
        }
        Err(e) => {
            ctx.audit(
                &admin,
                "splitapi.owner-credentials",
                &guest_id,
                "error",
                e.to_string(),
            )
            .await;
            return Err(e.into());
        }
    };
    ctx.audit(
        &admin,
        "splitapi.owner-credentials",
        &guest_id,
        "ok",
        format!("version {}", rec.version),
    )
    .await;
    Ok(Json(json!({
        "guest_id": guest_id,
        "version": rec.version,
        "not_after": rec.not_after,
        pki::CA_CRT: rec.ca_cert,
        pki::CLIENT_CRT: rec.client_cert,
        pki::CLIENT_KEY: rec.client_key.as_str(),
    })))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn query_must_repeat_the_attested_identity() {
        let id = GuestIdentity {
            guest_id: "g1".into(),
            name: Some("g1.example".into()),
            ip: Some("10.0.0.1".parse().unwrap()),
            ..Default::default()
        };
        let q = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
        };
        check_query(&id, &q(&[])).unwrap();
        check_query(
            &id,
            &q(&[("id", "g1"), ("name", "G1.example"), ("ip", "10.0.0.1")]),
        )
        .unwrap();
        for bad in [
            q(&[("id", "g2")]),
            q(&[("name", "other")]),
            q(&[("ip", "10.0.0.2")]),
            q(&[("ip", "nonsense")]),
        ] {
            assert_eq!(check_query(&id, &bad).unwrap_err().status.as_u16(), 403);
        }
        let bare = GuestIdentity {
            guest_id: "g1".into(),
            ..Default::default()
        };
        assert!(check_query(&bare, &q(&[("ip", "10.0.0.1")])).is_err());
        assert!(check_query(&bare, &q(&[("name", "g1")])).is_err());
    }
}
