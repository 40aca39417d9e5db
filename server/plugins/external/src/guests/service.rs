//! [`GuestsService`]: the `tether.plugin.v1.Guests` calls. Each call authenticates the
//! plugin by its bearer token (UNAUTHENTICATED otherwise), checks its grants
//! (PERMISSION_DENIED, audited), takes one of its call slots (RESOURCE_EXHAUSTED when all
//! are in use), then does what the built-in plugins do through the same parts: the hub's
//! typed calls, the prober, the resource policy for pushed resources and the plugin's own
//! policy question for credentials, sealing by [`kbs_core::guest_push`]. Every call that
//! got past authentication is audited with the plugin as actor.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kbs_core::guest_directory::GuestAttestation;
use kbs_core::metrics::Labels;
use kbs_core::notices::NoticeActor;
use kbs_core::policy_gate::{Decision, PolicyGate, PolicyQuestion};
use kbs_core::probe::Prober;
use kbs_core::resource_path::ResourcePath;
use kbs_core::selector::{MAX_SELECTOR_LEN, Selector};
use kbs_core::storage::ResourceStore;
use kbs_web::plugin::PluginContext;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rpc_defs::{CredentialFile, ProbeKind};
use serde_bytes::ByteBuf;
use tokio::sync::OwnedSemaphorePermit;
use tonic::{Request, Response, Status};
use tunnel::{CallError, TunnelHandle};
use zeroize::Zeroizing;

use super::callers::{Caller, Callers};
use super::grants::{Call, check_bundle_id};
use super::token::MAX_TOKEN_LEN;
use crate::proto::tether_plugin_v1 as pb;
use crate::proto::tether_plugin_v1::guests_server::Guests;

/// Most guests one `ListGuests` answer lists.
pub const MAX_LISTED_GUESTS: usize = 10_000;
/// Largest ping payload.
pub const MAX_PING_PAYLOAD: usize = 4096;
/// Most files in one credential bundle.
pub const MAX_BUNDLE_FILES: usize = 32;
/// Expiry of a bundle whose `not_after` is 0.
const DEFAULT_BUNDLE_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// The audit role of an external plugin.
pub const AUDIT_ROLE: &str = "external-plugin";

/// What the composition root grants the Guests API beyond the plugins' contexts.
#[derive(Clone)]
pub struct GuestsGrants {
    /// Stored resource versions (`ApplyResource` pushes one).
    pub resources: Arc<dyn ResourceStore>,
    /// The resource policy, asked as the resource plugin would be for a pushed resource.
    pub policy: PolicyGate,
    /// Probes guests and records the outcome in the fleet view (also for applied versions).
    pub prober: Prober,
}

/// The service.
#[derive(Clone)]
pub struct GuestsService {
    pub(super) callers: Callers,
    pub(super) grants: GuestsGrants,
    pub(super) call_timeout: Duration,
    pub(super) calls: Family<Labels, Counter>,
}

/// A call past its checks: who, through which context, holding a slot.
struct Admitted {
    caller: Arc<Caller>,
    ctx: PluginContext,
    call: Call,
    _slot: OwnedSemaphorePermit,
}

fn guest_status(guest_id: &str, e: &CallError) -> Status {
    let msg = format!("guest {guest_id}: {e}");
    match e {
        CallError::Disconnected | CallError::Transport(_) => Status::unavailable(msg),
        CallError::DeadlineExceeded => Status::deadline_exceeded(msg),
        CallError::TooManyInFlight => Status::resource_exhausted(msg),
        CallError::Guest(_) => Status::failed_precondition(msg),
    }
}

fn outcome(status: &Status) -> &'static str {
    use tonic::Code;
    match status.code() {
        Code::Ok => "ok",
        Code::PermissionDenied => "denied",
        Code::Unauthenticated => "unauthenticated",
        Code::ResourceExhausted => "busy",
        Code::NotFound => "not_found",
        Code::DeadlineExceeded => "timeout",
        Code::InvalidArgument => "invalid",
        Code::FailedPrecondition => "guest_refused",
        Code::Unavailable => "unavailable",
        _ => "error",
    }
}

impl GuestsService {
    fn count(&self, plugin: &str, call: Call, outcome: &str) {
        self.calls
            .get_or_create(&vec![
                ("plugin", plugin.to_string()),
                ("call", call.as_str().to_string()),
                ("outcome", outcome.to_string()),
            ])
            .inc();
    }

    /// Authenticate, check the call is granted, take a slot.
    async fn admit<T>(&self, call: Call, request: &Request<T>) -> Result<Admitted, Status> {
        let presented = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes())
            .and_then(|v| v.strip_prefix(b"Bearer "))
            .filter(|t| t.len() <= MAX_TOKEN_LEN);
        let Some(caller) = presented.and_then(|t| self.callers.authenticate(t)) else {
            self.count("-", call, "unauthenticated");
            tracing::warn!(
                call = call.as_str(),
                "Guests API call without a known plugin token"
            );
            return Err(Status::unauthenticated(
                "no known plugin token (metadata `authorization: Bearer <token>`)",
            ));
        };
        let Some(ctx) = caller.ctx().cloned() else {
            return Err(Status::unavailable("the KBS is starting"));
        };
        if !ctx.is_enabled() {
            self.count(caller.name, call, "disabled");
            return Err(Status::unavailable(format!(
                "plugin {} is disabled",
                caller.name
            )));
        }
        if !caller.grants.allows_call(call) {
            let status = Status::permission_denied(format!(
                "{} is not granted {} (plugins.external.guests.calls)",
                caller.name,
                call.as_str()
            ));
            self.finish::<()>(
                &caller,
                &ctx,
                call,
                "-",
                &Err(status.clone()),
                String::new(),
            )
            .await;
            return Err(status);
        }
        let Ok(slot) = caller.slots.clone().try_acquire_owned() else {
            self.count(caller.name, call, "busy");
            tracing::warn!(
                plugin = caller.name,
                call = call.as_str(),
                "Guests API: the plugin's calls at once are all in use; refused"
            );
            return Err(Status::resource_exhausted(format!(
                "{} has as many calls in progress as it may \
                 (plugins.external.guests.max_concurrent); retry later",
                caller.name
            )));
        };
        Ok(Admitted {
            caller,
            ctx,
            call,
            _slot: slot,
        })
    }

    /// Count and audit a finished call.
    async fn finish<T>(
        &self,
        caller: &Caller,
        ctx: &PluginContext,
        call: Call,
        target: &str,
        result: &Result<T, Status>,
        detail: String,
    ) {
        let outcome = match result {
            Ok(_) => "ok",
            Err(s) => outcome(s),
        };
        self.count(caller.name, call, outcome);
        let detail = match result {
            Ok(_) => detail,
            Err(s) if detail.is_empty() => s.message().to_string(),
            Err(s) => format!("{detail}: {}", s.message()),
        };
        let actor = NoticeActor {
            name: caller.name.to_string(),
            role: AUDIT_ROLE.to_string(),
        };
        ctx.audit_for(
            &actor,
            &format!("external.guests.{}", call.as_str()),
            target,
            outcome,
            detail,
        )
        .await;
    }

    /// The live tunnel of `guest_id` and its attestation, if the grant covers it.
    fn guest(
        &self,
        a: &Admitted,
        guest_id: &str,
    ) -> Result<(Arc<TunnelHandle>, Arc<GuestAttestation>), Status> {
        if guest_id.is_empty() || guest_id.len() > 256 {
            return Err(Status::invalid_argument("guest_id must be 1..=256 bytes"));
        }
        let handle = a
            .ctx
            .hub()
            .get(guest_id)
            .ok_or_else(|| Status::not_found(format!("no tunnel from guest {guest_id}")))?;
        if !a.caller.grants.allows_guest(&handle.labels) {
            return Err(Status::permission_denied(format!(
                "guest {guest_id} is outside {}'s granted selector",
                a.caller.name
            )));
        }
        let att = a.ctx.attested_guest(guest_id).ok_or_else(|| {
            Status::unavailable(format!("no attestation recorded for guest {guest_id} yet"))
        })?;
        Ok((handle, att))
    }

    fn deadline(&self, ms: u32) -> Option<Duration> {
        (ms > 0).then(|| Duration::from_millis(u64::from(ms)).min(self.call_timeout))
    }

    /// Run `body` for an admitted call, then count and audit it against `target`.
    async fn run<T, F>(&self, a: &Admitted, target: &str, body: F) -> Result<Response<T>, Status>
    where
        F: std::future::Future<Output = Result<(T, String), Status>>,
    {
        let result = body.await;
        let (result, detail) = match result {
            Ok((t, detail)) => (Ok(t), detail),
            Err(s) => (Err(s), String::new()),
        };
        self.finish(&a.caller, &a.ctx, a.call, target, &result, detail)
            .await;
        result.map(Response::new)
    }

    async fn list(
        &self,
        a: &Admitted,
        selector: &str,
    ) -> Result<(pb::ListGuestsResponse, String), Status> {
        if selector.len() > MAX_SELECTOR_LEN {
            return Err(Status::invalid_argument(format!(
                "selector longer than {MAX_SELECTOR_LEN} bytes"
            )));
        }
        let wanted =
            Selector::parse(selector).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut handles: Vec<Arc<TunnelHandle>> = a
            .ctx
            .hub()
            .list()
            .into_iter()
            .filter(|h| a.caller.grants.allows_guest(&h.labels) && wanted.matches(&h.labels))
            .collect();
        handles.sort_by(|x, y| x.guest_id.cmp(&y.guest_id));
        let truncated = handles.len() > MAX_LISTED_GUESTS;
        handles.truncate(MAX_LISTED_GUESTS);
        let guests: Vec<pb::Guest> = handles
            .iter()
            .map(|h| pb::Guest {
                guest_id: h.guest_id.clone(),
                labels: h
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                services: h.services.clone(),
                session_id: h.session_id.clone(),
                connected_since_ms: h
                    .connected_at
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0),
            })
            .collect();
        let detail = format!("{} guests", guests.len());
        Ok((pb::ListGuestsResponse { guests, truncated }, detail))
    }

    async fn ping_guest(
        &self,
        a: &Admitted,
        r: pb::PingRequest,
    ) -> Result<(pb::PingResponse, String), Status> {
        if r.payload.len() > MAX_PING_PAYLOAD {
            return Err(Status::invalid_argument(format!(
                "payload larger than {MAX_PING_PAYLOAD} bytes"
            )));
        }
        let (handle, _) = self.guest(a, &r.guest_id)?;
        let started = Instant::now();
        let payload = handle
            .ping(r.payload, self.deadline(r.deadline_ms))
            .await
            .map_err(|e| guest_status(&r.guest_id, &e))?;
        let rtt_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        Ok((
            pb::PingResponse { payload, rtt_us },
            format!("rtt {rtt_us} us"),
        ))
    }

    async fn probe_guest(
        &self,
        a: &Admitted,
        r: pb::ProbeRequest,
    ) -> Result<(pb::ProbeResponse, String), Status> {
        let kind = match r.kind.as_str() {
            "" | "all" => ProbeKind::All,
            "health" => ProbeKind::Health,
            "resources" => ProbeKind::Resources,
            "runtime" => ProbeKind::Runtime,
            other => {
                return Err(Status::invalid_argument(format!(
                    "kind `{other}`: expected health, resources, runtime or all"
                )));
            }
        };
        self.guest(a, &r.guest_id)?;
        let done = self
            .grants
            .prober
            .probe_one(&r.guest_id, kind, self.deadline(r.deadline_ms))
            .await;
        let Some(report) = done.report else {
            let msg = format!(
                "guest {}: {}",
                r.guest_id,
                done.error.unwrap_or_else(|| done.outcome.clone())
            );
            return Err(match done.outcome.as_str() {
                "not_connected" => Status::not_found(msg),
                "timeout" => Status::deadline_exceeded(msg),
                "busy" => Status::resource_exhausted(msg),
                "guest_error" => Status::failed_precondition(msg),
                _ => Status::unavailable(msg),
            });
        };
        let report_json =
            serde_json::to_string(&report).map_err(|e| Status::internal(e.to_string()))?;
        Ok((
            pb::ProbeResponse { report_json },
            format!("{} in {} us", kind.as_str(), done.rtt_us),
        ))
    }

    async fn apply(
        &self,
        a: &Admitted,
        r: pb::ApplyResourceRequest,
    ) -> Result<(pb::ApplyResourceResponse, String), Status> {
        let path: ResourcePath = r
            .path
            .parse()
            .map_err(|e: String| Status::invalid_argument(format!("path: {e}")))?;
        if !a.caller.grants.allows_resource(&path) {
            return Err(Status::permission_denied(format!(
                "{path} is not among {}'s granted resources",
                a.caller.name
            )));
        }
        let (handle, att) = self.guest(a, &r.guest_id)?;
        let version = (r.version > 0).then_some(r.version);
        let stored = self
            .grants
            .resources
            .get_resource(&path, version)
            .await
            .map_err(|e| Status::unavailable(format!("storage: {e}")))?
            .ok_or_else(|| match version {
                Some(v) => Status::not_found(format!("no live version {v} of {path}")),
                None => Status::not_found(format!("no resource {path}")),
            })?;
        // The same decision as if the guest fetched the resource itself.
        let question = PolicyQuestion {
            plugin: "resource",
            path: Some(&path),
            query: &BTreeMap::new(),
        };
        match self.grants.policy.decide(&att.claims, question) {
            Ok(Decision::Allow) => {}
            Ok(Decision::Deny(why)) => {
                return Err(Status::permission_denied(format!(
                    "the resource policy refuses {path} to guest {}: {why}",
                    r.guest_id
                )));
            }
            Err(e) => return Err(Status::unavailable(format!("policy evaluation: {e}"))),
        }
        let uri = path.to_string();
        let sealed = kbs_core::guest_push::sealed_resource(
            handle.push_key(),
            &att.tee_pubkey,
            &uri,
            stored.version,
            &stored.sha256,
            &stored.data,
        )
        .map_err(|e| Status::failed_precondition(format!("cannot seal to the guest: {e}")))?;
        let applied = handle
            .apply_resource(sealed, self.deadline(r.deadline_ms))
            .await
            .map_err(|e| guest_status(&r.guest_id, &e))?;
        if applied.uri != uri {
            return Err(Status::internal(format!(
                "guest acknowledged another resource: {}",
                applied.uri
            )));
        }
        self.grants
            .prober
            .fleet
            .note_held(&r.guest_id, &uri, applied.version, &applied.sha256);
        let detail = format!(
            "{uri} version {} (guest holds {}{})",
            stored.version,
            applied.version,
            if applied.already_held {
                ", already held"
            } else {
                ""
            }
        );
        Ok((
            pb::ApplyResourceResponse {
                path: uri,
                version: applied.version,
                sha256: applied.sha256,
                already_held: applied.already_held,
                hook_status: applied.hook_status,
            },
            detail,
        ))
    }

    async fn install(
        &self,
        a: &Admitted,
        r: pb::InstallCredentialsRequest,
    ) -> Result<(pb::InstallCredentialsResponse, String), Status> {
        check_bundle_id(&r.bundle_id).map_err(Status::invalid_argument)?;
        if !a.caller.grants.allows_bundle(&r.bundle_id) {
            return Err(Status::permission_denied(format!(
                "bundle `{}` is not among {}'s granted bundles",
                r.bundle_id, a.caller.name
            )));
        }
        if r.version == 0 {
            return Err(Status::invalid_argument("version must be at least 1"));
        }
        if r.files.is_empty() || r.files.len() > MAX_BUNDLE_FILES {
            return Err(Status::invalid_argument(format!(
                "a bundle holds 1..={MAX_BUNDLE_FILES} files"
            )));
        }
        let (handle, att) = self.guest(a, &r.guest_id)?;
        // The plugin's own policy question, with the guest's claims: `data.plugin ==
        // "external"`, `data["resource-path"] == [<name>, "install_credentials", <bundle>]`.
        let segments = ["install_credentials".to_string(), r.bundle_id.clone()];
        match a.ctx.decide_path(&att.claims, &segments, &BTreeMap::new()) {
            Ok(Decision::Allow) => {}
            Ok(Decision::Deny(why)) => {
                return Err(Status::permission_denied(format!(
                    "the policy refuses bundle `{}` to guest {}: {why}",
                    r.bundle_id, r.guest_id
                )));
            }
            Err(e) => return Err(Status::unavailable(format!("policy evaluation: {e}"))),
        }
        let mut files = Vec::with_capacity(r.files.len());
        let mut contents: BTreeMap<String, ByteBuf> = BTreeMap::new();
        for f in r.files {
            if contents.contains_key(&f.name) {
                return Err(Status::invalid_argument(format!(
                    "file `{}` is listed twice",
                    f.name
                )));
            }
            files.push(CredentialFile {
                name: f.name.clone(),
                mode: f.mode,
            });
            contents.insert(f.name, ByteBuf::from(f.contents));
        }
        let mut plaintext = Zeroizing::new(Vec::new());
        ciborium::into_writer(&contents, &mut *plaintext)
            .map_err(|e| Status::internal(format!("bundle encoding: {e}")))?;
        for v in contents.values_mut() {
            zeroize::Zeroize::zeroize(v.as_mut_slice());
        }
        let not_after = match r.not_after {
            0 => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d + DEFAULT_BUNDLE_LIFETIME)
                .unwrap_or_default()
                .as_secs(),
            t => t,
        };
        let bundle = kbs_core::guest_push::credential_bundle(
            handle.push_key(),
            &att.tee_pubkey,
            &r.bundle_id,
            r.version,
            files,
            &plaintext,
            not_after,
        )
        .map_err(|e| Status::failed_precondition(format!("cannot seal to the guest: {e}")))?;
        let installed = handle
            .install_credentials(bundle, self.deadline(r.deadline_ms))
            .await
            .map_err(|e| guest_status(&r.guest_id, &e))?;
        let detail = format!(
            "bundle {} version {} (guest holds {}{})",
            r.bundle_id,
            r.version,
            installed.version,
            if installed.already_held {
                ", already held"
            } else {
                ""
            }
        );
        Ok((
            pb::InstallCredentialsResponse {
                bundle_id: installed.id,
                version: installed.version,
                already_held: installed.already_held,
            },
            detail,
        ))
    }
}

#[tonic::async_trait]
impl Guests for GuestsService {
    async fn list_guests(
        &self,
        request: Request<pb::ListGuestsRequest>,
    ) -> Result<Response<pb::ListGuestsResponse>, Status> {
        let a = self.admit(Call::ListGuests, &request).await?;
        let r = request.into_inner();
        let target = format!("selector `{}`", r.selector);
        let body = self.list(&a, &r.selector);
        self.run(&a, &target, body).await
    }

    async fn ping(
        &self,
        request: Request<pb::PingRequest>,
    ) -> Result<Response<pb::PingResponse>, Status> {
        let a = self.admit(Call::Ping, &request).await?;
        let r = request.into_inner();
        let target = r.guest_id.clone();
        let body = self.ping_guest(&a, r);
        self.run(&a, &target, body).await
    }

    async fn probe(
        &self,
        request: Request<pb::ProbeRequest>,
    ) -> Result<Response<pb::ProbeResponse>, Status> {
        let a = self.admit(Call::Probe, &request).await?;
        let r = request.into_inner();
        let target = r.guest_id.clone();
        let body = self.probe_guest(&a, r);
        self.run(&a, &target, body).await
    }

    async fn apply_resource(
        &self,
        request: Request<pb::ApplyResourceRequest>,
    ) -> Result<Response<pb::ApplyResourceResponse>, Status> {
        let a = self.admit(Call::ApplyResource, &request).await?;
        let r = request.into_inner();
        let target = r.guest_id.clone();
        let body = self.apply(&a, r);
        self.run(&a, &target, body).await
    }

    async fn install_credentials(
        &self,
        request: Request<pb::InstallCredentialsRequest>,
    ) -> Result<Response<pb::InstallCredentialsResponse>, Status> {
        let a = self.admit(Call::InstallCredentials, &request).await?;
        let r = request.into_inner();
        let target = r.guest_id.clone();
        let body = self.install(&a, r);
        self.run(&a, &target, body).await
    }
}
