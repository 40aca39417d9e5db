//! `GET /kbs/v0/tunnel`: a guest dials in with its attestation token as Bearer. The token is
//! verified and the resource policy asked (`data.plugin == "tunnel"`) before the upgrade; the
//! tunnel crate then proves possession of the token's TEE key (a challenge sealed to it).
//! Only then is the token recorded in the guest directory (a token that merely names a guest
//! changes nothing about it), and the guest registered in the hub and served until it
//! leaves, is superseded, or the KBS drains (`docs/protocol.md`, "The tunnel").

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{WebSocketUpgrade, rejection::WebSocketUpgradeRejection};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use rand::RngCore;
use rpc_defs::SUBPROTOCOL;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use tunnel::{
    AcceptParams, Hub, ProvenFn, PushKey, ReauthFn, TunnelLimits, configure_upgrade,
    offers_push_key, offers_subprotocol, serve_guest_tunnel,
};
use zeroize::Zeroizing;

use kbs_core::attest::{RcarService, VerifyToken};
use kbs_core::events::EventSink;
use kbs_core::guest_directory::{GuestDirectory, Recorded, tee_key_digest};
use kbs_core::metrics::Metrics;
use kbs_core::policy_gate::{Decision, PolicyGate, PolicyQuestion};
use kbs_core::token::VerifiedToken;
use kbs_core::tunnel_metrics::TunnelMetrics;
use kbs_web::admin_auth::bearer;
use kbs_web::error::{ApiError, require};

use crate::config::TunnelConfig;

/// What every tunnel of this KBS shares: its limits, the observer feeding the metrics, and
/// the services the endpoint uses (token verification, the directory, the hub, shutdown).
pub struct TunnelEndpoint {
    limits: Arc<TunnelLimits>,
    observer: Arc<TunnelMetrics>,
    metrics: Arc<Metrics>,
    rcar: Arc<RcarService>,
    directory: Arc<GuestDirectory>,
    hub: Hub,
    policy: PolicyGate,
    events: EventSink,
    shutdown: CancellationToken,
}

/// `data.plugin` when the policy is asked whether a guest may hold a tunnel.
pub const TUNNEL_PLUGIN: &str = "tunnel";

impl std::fmt::Debug for TunnelEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelEndpoint")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// What the tunnel endpoint works with.
pub struct TunnelServices {
    /// Verifies attestation tokens.
    pub rcar: Arc<RcarService>,
    /// Records each guest's latest token.
    pub directory: Arc<GuestDirectory>,
    /// Live tunnels.
    pub hub: Hub,
    /// The resource policy: asked whether a guest may hold a tunnel.
    pub policy: PolicyGate,
    /// The event log: TEE key changes of a guest id go there.
    pub events: EventSink,
    /// Cancelled when the KBS begins to shut down (tunnels drain).
    pub shutdown: CancellationToken,
    /// Tunnel and RPC metrics.
    pub metrics: Arc<Metrics>,
}

impl TunnelEndpoint {
    /// The endpoint for `limits` (already validated).
    pub fn new(limits: TunnelLimits, services: TunnelServices) -> Self {
        Self {
            limits: Arc::new(limits),
            observer: Arc::new(TunnelMetrics::new(services.metrics.clone())),
            metrics: services.metrics,
            rcar: services.rcar,
            directory: services.directory,
            hub: services.hub,
            policy: services.policy,
            events: services.events,
            shutdown: services.shutdown,
        }
    }
}

/// The tunnel limits for a configuration: the configured values over the protocol defaults.
pub fn limits(config: &TunnelConfig) -> TunnelLimits {
    TunnelLimits {
        heartbeat: config.heartbeat,
        max_frame: config.max_frame_bytes,
        max_guest_frame: config.max_guest_frame_bytes,
        max_in_flight: config.max_in_flight,
        call_deadline: config.call_deadline,
        write_queue: config.write_queue,
        read_buffer_size: config.read_buffer_bytes,
        ..TunnelLimits::default()
    }
}

/// `GET /kbs/v0/tunnel`: 401 without a valid attestation token, 403 when the policy refuses
/// the guest a tunnel, 400 without the `tether.v1` subprotocol, 503 while draining; otherwise
/// the WebSocket upgrade.
pub async fn upgrade(
    State(endpoint): State<Arc<TunnelEndpoint>>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    if endpoint.shutdown.is_cancelled() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "ShuttingDown",
            "the KBS is shutting down; reconnect to another replica or retry later",
        ));
    }
    let token = verify_bearer(&endpoint.rcar, &headers)
        .inspect_err(|_| count_handshake(&endpoint, "unauthorized"))?;
    admit(&endpoint, &token)?;
    let ws =
        ws.map_err(|rej| ApiError::new(rej.status(), "WebSocketUpgradeRequired", rej.body_text()))?;
    if !offers_subprotocol(&ws) {
        return Err(ApiError::bad_request(
            "SubprotocolRequired",
            format!("offer the `{SUBPROTOCOL}` WebSocket subprotocol (Sec-WebSocket-Protocol)"),
        ));
    }
    let accept = accept_params(&endpoint, &token, offers_push_key(&ws))?;
    let hub = endpoint.hub.clone();
    let observer: Arc<dyn tunnel::TunnelObserver> = endpoint.observer.clone();
    let drain = endpoint.shutdown.clone();
    let upgrade = configure_upgrade(ws, &accept.limits);
    // Boxed: the upgrade task keeps its callback for the tunnel's lifetime, so the callback
    // holds a pointer rather than the parameters themselves.
    let accept = Box::new(accept);
    Ok(upgrade
        .on_failed_upgrade(|e| tracing::debug!(error = %e, "tunnel upgrade failed"))
        .on_upgrade(move |socket| serve_guest_tunnel(socket, *accept, hub, observer, drain)))
}

fn count_handshake(endpoint: &TunnelEndpoint, outcome: &str) {
    Metrics::inc(&endpoint.metrics.tunnel_handshakes, &[("outcome", outcome)]);
}

/// Asks the resource policy whether the token's guest may hold a tunnel (`data.plugin ==
/// "tunnel"`, no resource path, no query): 403 `PolicyDeny` before any upgrade if not.
fn admit(endpoint: &TunnelEndpoint, token: &VerifiedToken) -> Result<(), ApiError> {
    let question = PolicyQuestion {
        plugin: TUNNEL_PLUGIN,
        path: None,
        query: &BTreeMap::new(),
    };
    let guest_id = &token.identity.guest_id;
    match endpoint.policy.decide(&token.claims, question) {
        Ok(Decision::Allow) => Ok(()),
        Ok(denied) => {
            count_handshake(endpoint, "policy_deny");
            tracing::info!(%guest_id, tee = %token.tee, "tunnel refused: the resource policy denies `tunnel` to this guest");
            require(denied)
        }
        Err(e) => {
            count_handshake(endpoint, "policy_error");
            tracing::warn!(%guest_id, error = %e, "tunnel refused: the resource policy failed");
            Err(e.into())
        }
    }
}

/// The Bearer attestation token, this KBS's or a trusted attestation service's (passport
/// mode only: a session cookie does not open a tunnel).
fn verify_bearer(rcar: &RcarService, headers: &HeaderMap) -> Result<VerifiedToken, ApiError> {
    let token = bearer(headers).ok_or_else(|| {
        ApiError::unauthorized(
            "Unauthenticated",
            "the tunnel needs `Authorization: Bearer <attestation token>`",
        )
    })?;
    Ok(rcar.tokens().verify(token)?)
}

/// Identity and labels from the token only; a fresh challenge sealed to its TEE key (with a
/// fresh push key after the nonce when the guest offered `tether.v2`).
fn accept_params(
    endpoint: &Arc<TunnelEndpoint>,
    token: &VerifiedToken,
    with_push_key: bool,
) -> Result<AcceptParams, ApiError> {
    let mut nonce = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut nonce);
    let push_key = with_push_key.then(PushKey::generate);
    // Sized up front: a reallocation would leave an unzeroed copy behind.
    let mut plaintext = Zeroizing::new(Vec::with_capacity(64));
    plaintext.extend_from_slice(&nonce);
    if let Some(key) = &push_key {
        plaintext.extend_from_slice(key.bytes());
    }
    let sealed = kbs_core::jwe::seal(&token.tee_pubkey, &plaintext)?;
    let challenge_jwe = serde_json::to_vec(&sealed)
        .map_err(|e| ApiError::internal("serialising the tunnel challenge", e))?;
    let binding = TunnelBinding::of(token)
        .map_err(|e| ApiError::internal("binding the tunnel to its TEE key", e))?;
    Ok(AcceptParams {
        guest_id: token.identity.guest_id.clone(),
        labels: token.identity.labels.clone(),
        challenge_jwe,
        expected_nonce: nonce,
        push_key,
        reauth_before: token.exp,
        reauth: record_on_reauth(binding, endpoint.clone()),
        on_proven: Some(record_on_proof(token.clone(), endpoint.clone())),
        limits: endpoint.limits.clone(),
    })
}

/// Runs once the guest proved possession of the token's TEE key, before its tunnel is
/// registered: records the token in the guest directory, and reports a guest id now proven
/// with another TEE key than before (an event and `kbs_tunnel_tee_key_changes_total`), so
/// two keys fighting over one guest id do not flap silently.
fn record_on_proof(token: VerifiedToken, endpoint: Arc<TunnelEndpoint>) -> ProvenFn {
    Box::new(move |epoch| {
        let guest_id = token.identity.guest_id.as_str();
        // Still registered here: the previous tunnel of this guest, if it is up.
        let previous_up = endpoint.hub.get(guest_id).is_some();
        match endpoint.directory.record_proven(&token, epoch) {
            Recorded::KeyChanged {
                previous, current, ..
            } => {
                let (label, outcome, when) = if previous_up {
                    ("connected", "conflict", "while its tunnel was up")
                } else {
                    ("offline", "changed", "after its tunnel had ended")
                };
                Metrics::inc(&endpoint.metrics.tunnel_key_changes, &[("previous", label)]);
                tracing::warn!(
                    guest_id,
                    previous_key = %previous,
                    key = %current,
                    previous_tunnel = label,
                    "guest id proven with another TEE key"
                );
                endpoint.events.record(
                    "connect",
                    "tunnel.tee_key_changed",
                    Some(guest_id),
                    None,
                    guest_id,
                    outcome,
                    format!("TEE key {current} replaced {previous} {when}"),
                );
            }
            Recorded::Stale => {
                tracing::info!(
                    guest_id,
                    epoch,
                    "a newer tunnel of this guest was proven first"
                );
            }
            Recorded::First | Recorded::SameKey => {}
        }
    })
}

/// The tunnel's `Frame::Reauth` check: a fresh token `binding` accepts also updates the guest
/// directory (the claims the resource policy sees for pushes into this guest). One closure
/// per tunnel, holding the binding and the endpoint.
fn record_on_reauth(binding: TunnelBinding, endpoint: Arc<TunnelEndpoint>) -> ReauthFn {
    Arc::new(move |fresh: String| {
        let result = binding.check(endpoint.rcar.tokens(), &fresh).map(|token| {
            if !endpoint.directory.refresh(&token) {
                tracing::info!(guest_id = %token.identity.guest_id, "re-attested tunnel no longer holds its guest's directory entry");
            }
            token.exp
        });
        Box::pin(std::future::ready(result))
    })
}

/// What a fresh token must match for in-band re-attestation: the tunnel's guest and TEE key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunnelBinding {
    guest_id: String,
    /// SHA-256 of the canonical JSON (RFC 8785) of the TEE public key.
    tee_pubkey_digest: [u8; 32],
}

impl TunnelBinding {
    /// The binding of the token a tunnel was opened with.
    pub fn of(token: &VerifiedToken) -> Result<Self, serde_json::Error> {
        Ok(Self {
            guest_id: token.identity.guest_id.clone(),
            tee_pubkey_digest: tee_key_digest(&token.tee_pubkey)?,
        })
    }

    /// Verifies `fresh` with `tokens` and checks it names the same TEE key and guest; returns
    /// the verified token (its expiry is the new `reauth_before`) or why it is refused.
    pub fn check(&self, tokens: &impl VerifyToken, fresh: &str) -> Result<VerifiedToken, String> {
        let token = tokens.verify(fresh).map_err(|e| e.to_string())?;
        let key = tee_key_digest(&token.tee_pubkey).map_err(|e| format!("tee-pubkey: {e}"))?;
        if key != self.tee_pubkey_digest {
            return Err("the token is bound to another TEE key".into());
        }
        if token.identity.guest_id != self.guest_id {
            return Err(format!(
                "the token names guest {:?}, this tunnel is {:?}",
                token.identity.guest_id, self.guest_id
            ));
        }
        Ok(token)
    }
}

/// Once `shutdown` is cancelled, waits up to `grace` for every tunnel to leave `hub` (each
/// sends GoAway and closes with 4503 when it sees the same token).
pub async fn drain(hub: &Hub, shutdown: &CancellationToken, grace: Duration) {
    shutdown.cancelled().await;
    let live = hub.len();
    if live == 0 {
        return;
    }
    tracing::info!(tunnels = live, "draining guest tunnels");
    if tokio::time::timeout(grace, until_empty(hub)).await.is_err() {
        tracing::warn!(
            tunnels = hub.len(),
            "shutdown grace elapsed with guest tunnels still open"
        );
    }
}

/// Resolves once no tunnel is registered in `hub`.
pub async fn until_empty(hub: &Hub) {
    // Subscribe before looking, so a tunnel leaving in between is not missed.
    let mut events = hub.subscribe();
    while !hub.is_empty() {
        match events.recv().await {
            Ok(_) | Err(RecvError::Lagged(_)) => {}
            Err(RecvError::Closed) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use kbs_core::token::TokenSigner;
    use kbs_types::TeePubKey;
    use serde_json::json;

    use super::*;
    use kbs_core::identity::GuestIdentity;
    use kbs_core::policy::{DEFAULT_POLICY, PolicyEngine};
    use kbs_core::token::build_claims;

    fn ec_key(x: &str) -> TeePubKey {
        TeePubKey::EC {
            crv: "P-256".into(),
            alg: "ECDH-ES+A256KW".into(),
            x: x.into(),
            y: "y77t-RvAHRKTsSGdIYUfweuOvwrvDD-Q3Hv5J0fSKbE".into(),
        }
    }

    fn token(signer: &TokenSigner, key: &TeePubKey, guest_id: &str) -> (String, VerifiedToken) {
        let identity = GuestIdentity {
            guest_id: guest_id.into(),
            labels: BTreeMap::from([("app".into(), "db".into())]).into(),
            ..Default::default()
        };
        let claims = build_claims("sample", json!({}), key, "bm9uY2U=", None, &identity);
        signer
            .issue_verified(claims, Duration::from_secs(300))
            .unwrap()
    }

    #[test]
    fn reauth_needs_the_same_key_and_guest_under_our_signature() {
        let signer = TokenSigner::ephemeral().unwrap();
        let key = ec_key("WKn-ZIGevcwGIyyrzFoZNBdaq9_TsqzGl96oc0CWuis");
        let (_, first) = token(&signer, &key, "g1");
        let binding = TunnelBinding::of(&first).unwrap();

        let (fresh, verified) = token(&signer, &key, "g1");
        assert_eq!(
            binding.check(&signer, &fresh).map(|t| t.exp),
            Ok(verified.exp)
        );

        let (other_key, _) = token(
            &signer,
            &ec_key("AAn-ZIGevcwGIyyrzFoZNBdaq9_TsqzGl96oc0CWuis"),
            "g1",
        );
        let err = binding.check(&signer, &other_key).unwrap_err();
        assert!(err.contains("another TEE key"), "{err}");

        let (other_guest, _) = token(&signer, &key, "g2");
        let err = binding.check(&signer, &other_guest).unwrap_err();
        assert!(err.contains("g2"), "{err}");

        let stranger = TokenSigner::ephemeral().unwrap();
        let (forged, _) = token(&stranger, &key, "g1");
        assert!(binding.check(&signer, &forged).is_err());
        assert!(binding.check(&signer, "not a token").is_err());
    }

    #[tokio::test]
    async fn reauth_answers_with_the_new_expiry_and_records_the_fresh_token() {
        let signer = Arc::new(TokenSigner::ephemeral().unwrap());
        let endpoint = Arc::new(TunnelEndpoint::new(
            limits(&TunnelConfig::default()),
            TunnelServices {
                rcar: Arc::new(RcarService::new(
                    Default::default(),
                    signer.clone(),
                    Vec::new(),
                    &[0u8; 32],
                )),
                directory: Arc::default(),
                hub: Hub::new(),
                policy: PolicyGate::new(
                    Arc::new(PolicyEngine::new(DEFAULT_POLICY).unwrap()),
                    Default::default(),
                ),
                events: EventSink::new(16, Default::default()),
                shutdown: CancellationToken::new(),
                metrics: Arc::default(),
            },
        ));
        let key = ec_key("WKn-ZIGevcwGIyyrzFoZNBdaq9_TsqzGl96oc0CWuis");
        let (_, first) = token(&signer, &key, "g1");
        endpoint.directory.record_proven(&first, 1);
        let reauth = record_on_reauth(TunnelBinding::of(&first).unwrap(), endpoint.clone());
        let (fresh, verified) = token(&signer, &key, "g1");
        assert_eq!(reauth(fresh).await, Ok(verified.exp));
        let recorded = endpoint.directory.get("g1").unwrap();
        assert_eq!(recorded.exp, verified.exp);
        assert!(reauth("garbage".into()).await.is_err());
    }

    #[test]
    fn limits_follow_the_config() {
        let config = TunnelConfig {
            heartbeat: Duration::from_secs(5),
            max_frame_bytes: 64 * 1024,
            max_guest_frame_bytes: 16 * 1024,
            max_in_flight: 8,
            call_deadline: Duration::from_secs(3),
            write_queue: 16,
            read_buffer_bytes: 512,
            ..TunnelConfig::default()
        };
        let l = limits(&config);
        assert_eq!(l.heartbeat, Duration::from_secs(5));
        assert_eq!(l.max_frame, 64 * 1024);
        assert_eq!(l.guest_frame_limit(), 16 * 1024);
        assert_eq!(l.max_in_flight, 8);
        assert_eq!(l.call_deadline, Duration::from_secs(3));
        assert_eq!(l.write_queue, 16);
        assert_eq!(l.read_buffer_size, 512);
        assert_eq!(l.validate(), Ok(()));
        assert_eq!(limits(&TunnelConfig::default()).validate(), Ok(()));
        let lowered = TunnelConfig {
            max_frame_bytes: 8 * 1024,
            ..TunnelConfig::default()
        };
        assert_eq!(limits(&lowered).guest_frame_limit(), 8 * 1024);
        assert_eq!(limits(&lowered).validate(), Ok(()));
    }

    #[tokio::test]
    async fn drain_returns_at_once_with_no_tunnels() {
        let hub = Hub::new();
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        tokio::time::timeout(
            Duration::from_secs(1),
            drain(&hub, &shutdown, Duration::from_secs(30)),
        )
        .await
        .expect("nothing to wait for");
    }
}
