//! The provisioner's handlers: provision, list and deprovision (admin), and the attested
//! fetch of a VM's confdata.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use uuid::Uuid;

use kbs_core::resource_path::ResourcePath;
use kbs_web::error::ApiError;
use kbs_web::extract::{AdminCaller, ApiBytes, Attested};
use kbs_web::plugin::PluginContext;

use super::Inner;
use super::record::{self, ProvisionRecord, RequestError, VmIdentity};

/// Most records one listing returns.
const MAX_LIST: u32 = 1000;
/// Header telling whether a provision created the record or found it.
const PROVISIONED_HEADER: &str = "x-tether-provisioned";

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn record_key(uuid: &Uuid) -> String {
    format!("vm/{uuid}")
}

fn parse_uuid(text: &str) -> Result<Uuid, ApiError> {
    // Hyphenated lowercase, as issued; anything else names no VM.
    match Uuid::parse_str(text) {
        Ok(u) if u.hyphenated().to_string() == text => Ok(u),
        _ => Err(ApiError::bad_request(
            "InvalidUuid",
            format!(
                "{:?} is not a provisioned VM's UUID (hyphenated lowercase, e.g. c007d2cc-5f14-41e5-a202-8d15f6f68607)",
                text.chars().take(64).collect::<String>()
            ),
        )),
    }
}

async fn load(ctx: &PluginContext, uuid: &Uuid) -> Result<Option<ProvisionRecord>, ApiError> {
    let Some(raw) = ctx.kv().get(&record_key(uuid)).await? else {
        return Ok(None);
    };
    let raw = zeroize::Zeroizing::new(raw);
    serde_json::from_slice(&raw)
        .map(Some)
        .map_err(|e| ApiError::internal("provisioner: stored record", e))
}

fn refused(e: &RequestError) -> ApiError {
    let status = match e {
        RequestError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        _ => StatusCode::BAD_REQUEST,
    };
    ApiError::new(status, e.name(), e.to_string())
}

/// `POST /kbs/v0/provisioner/provision` (admin): `{"vm_name", "namespace"}` -> upstream's
/// `{uuid, resource_path, oemstring, mrconfigid}` (+ `hostdata`). The same VM again gets the
/// same answer and keeps its key; `x-tether-provisioned` says `created` or `existing`.
pub(crate) async fn provision(
    State(ctx): State<PluginContext>,
    Extension(inner): Extension<Arc<Inner>>,
    AdminCaller(admin): AdminCaller,
    ApiBytes(body): ApiBytes,
) -> Result<Response, ApiError> {
    let vm = match VmIdentity::parse(&body) {
        Ok(vm) => vm,
        Err(e) => {
            inner.count("provision", "invalid");
            ctx.audit(
                &admin,
                "provisioner.provision",
                "",
                "refused",
                e.to_string(),
            )
            .await;
            return Err(refused(&e));
        }
    };
    let Some(kbs_url) = inner.config.kbs_url.as_deref() else {
        inner.count("provision", "not_configured");
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "ProvisionerNotConfigured",
            "set plugins.provisioner.kbs_url (the KBS URL written into each VM's initdata.toml) to provision VMs",
        ));
    };
    let uuid = vm.uuid();
    let identity = format!("{}/{}", vm.namespace, vm.vm_name);
    let guard = inner.provision_lock.lock().await;
    let (rec, outcome) = match load(&ctx, &uuid).await? {
        Some(rec) if rec.is_for(&vm) => (rec, "existing"),
        Some(rec) => {
            // A SHA-1 collision between two VM names: never hand out, nor replace, the key
            // of the VM that holds this UUID.
            drop(guard);
            inner.count("provision", "conflict");
            tracing::error!(%uuid, holder = ?rec, requested = %identity, "provisioner: UUID already held by another VM");
            ctx.audit(
                &admin,
                "provisioner.provision",
                &uuid.to_string(),
                "conflict",
                identity.clone(),
            )
            .await;
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "ProvisionConflict",
                format!("UUID {uuid} is already provisioned for another VM than {identity:?}"),
            ));
        }
        None => {
            let rec = ProvisionRecord::new(
                &vm,
                kbs_url,
                inner.config.key_length,
                now_s(),
                &admin.actor(),
            );
            let raw = zeroize::Zeroizing::new(
                serde_json::to_vec(&rec)
                    .map_err(|e| ApiError::internal("provisioner: record", e))?,
            );
            ctx.kv().put(&record_key(&uuid), &raw).await?;
            (rec, "created")
        }
    };
    drop(guard);
    inner.count("provision", outcome);
    tracing::info!(%uuid, vm = %identity, outcome, by = %admin.actor(), "provisioner: VM provisioned");
    ctx.audit(
        &admin,
        "provisioner.provision",
        &uuid.to_string(),
        "ok",
        format!("{identity} ({outcome})"),
    )
    .await;
    let mut response = Json(rec.answer()).into_response();
    response
        .headers_mut()
        .insert(PROVISIONED_HEADER, HeaderValue::from_static(outcome));
    Ok(response)
}

/// `GET /kbs/v0/provisioner/provision[?limit=N]` (admin): the provisioned VMs, in UUID
/// order, without their keys: `{"provisioned": [{uuid, namespace, vm_name, resource_path,
/// mrconfigid, created_at, created_by}], "truncated": bool}`.
pub(crate) async fn list(
    State(ctx): State<PluginContext>,
    Extension(inner): Extension<Arc<Inner>>,
    AdminCaller(_admin): AdminCaller,
    Query(query): Query<BTreeMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let limit = match query.get("limit") {
        None => MAX_LIST,
        Some(text) => match text.parse::<u32>() {
            Ok(n) if (1..=MAX_LIST).contains(&n) => n,
            _ => {
                return Err(ApiError::bad_request(
                    "InvalidQuery",
                    format!("limit must be 1..={MAX_LIST}"),
                ));
            }
        },
    };
    let rows = ctx.kv().list("vm/", limit + 1).await?;
    let truncated = rows.len() > limit as usize;
    let mut out = Vec::with_capacity(rows.len().min(limit as usize));
    for (_, raw) in rows.into_iter().take(limit as usize) {
        let raw = zeroize::Zeroizing::new(raw);
        let rec: ProvisionRecord = serde_json::from_slice(&raw)
            .map_err(|e| ApiError::internal("provisioner: stored record", e))?;
        let answer = rec.answer();
        out.push(json!({
            "uuid": rec.uuid,
            "namespace": rec.namespace,
            "vm_name": rec.vm_name,
            "resource_path": rec.resource_path,
            "mrconfigid": answer.mrconfigid,
            "created_at": rec.created_at,
            "created_by": rec.created_by,
        }));
    }
    inner.count("list", "ok");
    Ok(Json(json!({ "provisioned": out, "truncated": truncated })))
}

/// `DELETE /kbs/v0/provisioner/provision/<uuid>` (admin): erase the VM's key (404 when
/// there is none). Upstream answers `{"status": "deleted"}`.
pub(crate) async fn deprovision(
    State(ctx): State<PluginContext>,
    Extension(inner): Extension<Arc<Inner>>,
    AdminCaller(admin): AdminCaller,
    Path(uuid): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let uuid = parse_uuid(&uuid).inspect_err(|_| inner.count("delete", "invalid"))?;
    let guard = inner.provision_lock.lock().await;
    let erased = ctx.kv().delete(&record_key(&uuid)).await?;
    drop(guard);
    let target = uuid.to_string();
    if !erased {
        inner.count("delete", "not_found");
        ctx.audit(
            &admin,
            "provisioner.delete",
            &target,
            "not-found",
            String::new(),
        )
        .await;
        return Err(ApiError::not_found(
            "ProvisionNotFound",
            format!("no VM is provisioned under UUID {uuid}"),
        ));
    }
    inner.count("delete", "ok");
    tracing::info!(%uuid, by = %admin.actor(), "provisioner: VM deprovisioned, key erased");
    ctx.audit(&admin, "provisioner.delete", &target, "ok", String::new())
        .await;
    Ok(Json(json!({ "status": "deleted" })))
}

/// The init-data digest (hex) of an attestation token's claims: upstream's EAR
/// `submods.cpu0` (or `cpu`) `ear.veraison.annotated-evidence.init_data`.
fn attested_init_data(claims: &Value) -> Option<&str> {
    ["cpu0", "cpu"].iter().find_map(|submod| {
        claims
            .pointer(&format!(
                "/submods/{submod}/ear.veraison.annotated-evidence/init_data"
            ))
            .and_then(Value::as_str)
    })
}

/// `GET /kbs/v0/provisioner/default/<uuid>/root` (attested): the VM's confdata TOML, sealed
/// to the caller's TEE key, when the policy allows it and the caller attested the
/// init-data issued for that UUID.
pub(crate) async fn fetch(
    State(ctx): State<PluginContext>,
    Extension(inner): Extension<Arc<Inner>>,
    Attested(token): Attested,
    Path((repo, uuid, tag)): Path<(String, String, String)>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Result<Json<kbs_types::Response>, ApiError> {
    if repo != record::REPOSITORY || tag != record::TAG {
        inner.count("fetch", "not_found");
        return Err(ApiError::not_found(
            "ResourceNotFound",
            "the provisioner serves default/<uuid>/root only",
        ));
    }
    let uuid = parse_uuid(&uuid).inspect_err(|_| inner.count("fetch", "invalid"))?;
    let path = ResourcePath::new(record::REPOSITORY, &uuid.to_string(), record::TAG)
        .map_err(|e| ApiError::bad_request("InvalidResourcePath", e))?;
    let guest_id = token.identity.guest_id.clone();
    if let Err(e) = ctx.require_policy(&token.claims, Some(&path), &query) {
        inner.count("fetch", "policy_deny");
        return Err(e);
    }
    let Some(rec) = load(&ctx, &uuid).await? else {
        inner.count("fetch", "not_found");
        return Err(ApiError::not_found(
            "ResourceNotFound",
            format!("no VM is provisioned under UUID {uuid}"),
        ));
    };
    let claims = token.claims.to_value();
    let attested = attested_init_data(&claims);
    if !attested.is_some_and(|d| rec.digest_matches(d)) {
        inner.count("fetch", "init_data_mismatch");
        tracing::warn!(
            %guest_id, %uuid,
            attested = attested.unwrap_or("none"),
            expected = %rec.init_data_digest,
            "provisioner: the caller did not attest the init-data issued for this VM; key withheld"
        );
        return Err(ApiError::forbidden(
            "InitDataMismatch",
            match attested {
                None => format!(
                    "the key of VM {uuid} is released only to a guest that attested the init-data issued for it; this token carries no init-data"
                ),
                Some(d) => format!(
                    "the key of VM {uuid} is released only to a guest that attested the init-data issued for it (sha384 {}); this token's init-data digest is {d}",
                    rec.init_data_digest
                ),
            },
        ));
    }
    let confdata = rec.confdata();
    let sealed = kbs_core::jwe::seal(&token.tee_pubkey, confdata.as_bytes())?;
    inner.count("fetch", "released");
    tracing::info!(%guest_id, %uuid, vm = %format!("{}/{}", rec.namespace, rec.vm_name), "provisioner: disk key released, sealed to the TEE key");
    Ok(Json(sealed))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn uuids_must_be_as_issued() {
        let u = Uuid::new_v4().to_string();
        parse_uuid(&u).unwrap();
        for bad in [
            u.to_uppercase(),
            u.replace('-', ""),
            "x".into(),
            String::new(),
        ] {
            assert_eq!(
                parse_uuid(&bad).unwrap_err().status,
                StatusCode::BAD_REQUEST
            );
        }
    }

    #[test]
    fn init_data_digest_from_either_submod() {
        let c =
            json!({"submods": {"cpu0": {"ear.veraison.annotated-evidence": {"init_data": "ab"}}}});
        assert_eq!(attested_init_data(&c), Some("ab"));
        let c =
            json!({"submods": {"cpu": {"ear.veraison.annotated-evidence": {"init_data": "cd"}}}});
        assert_eq!(attested_init_data(&c), Some("cd"));
        assert_eq!(attested_init_data(&json!({})), None);
    }
}
