//! One push of a rollout to one guest: policy with the guest's own claims, seal to its TEE
//! key, `apply_resource`, and what the answer means for the target.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rpc_defs::GuestError;
use tunnel::{CallError, TunnelHandle};
use zeroize::Zeroizing;

use kbs_core::guest_directory::GuestAttestation;
use kbs_core::policy_gate::{Decision, PolicyQuestion};
use kbs_core::resource_path::ResourcePath;
use kbs_core::storage::{RolloutRecord, TargetRecord, TargetState, now_ms};

use crate::Deps;
use crate::version_check::VersionCheck;

/// First retry delay; doubles per attempt up to [`RETRY_CAP`].
pub const RETRY_BASE: Duration = Duration::from_millis(500);
/// Longest retry delay.
pub const RETRY_CAP: Duration = Duration::from_secs(30);

/// What happened to one push, for metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushOutcome {
    /// The guest applied the version.
    Acked,
    /// The guest already held it (replay after a restart or a lost answer).
    AlreadyHeld,
    /// The policy refuses the resource to the guest; nothing sent.
    Denied,
    /// Given up on the guest.
    Failed,
    /// Will be retried after a backoff.
    Retry,
    /// The tunnel went away; waits for the guest to reconnect.
    Disconnected,
}

impl PushOutcome {
    /// Metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Acked => "acked",
            Self::AlreadyHeld => "already_held",
            Self::Denied => "denied",
            Self::Failed => "failed",
            Self::Retry => "retry",
            Self::Disconnected => "disconnected",
        }
    }
}

/// Backoff before attempt `attempts + 1`, with up to 20 % jitter.
pub fn backoff(attempts: u32) -> Duration {
    let exp = RETRY_BASE.saturating_mul(1u32 << attempts.saturating_sub(1).min(16));
    let base = exp.min(RETRY_CAP);
    let jitter = rand::random::<f64>() * 0.2;
    base.mul_f64(1.0 + jitter)
}

/// The version a rollout delivers, loaded while its pushes need it.
pub(crate) struct LoadedVersion {
    /// Its plaintext.
    pub(crate) plaintext: Zeroizing<Vec<u8>>,
    /// Whether it still exists, asked before each push.
    pub(crate) check: VersionCheck,
}

/// Pushes the rollout's `version` to the guest behind `handle`; returns the target as it
/// now stands (not yet stored) and the outcome.
pub(crate) async fn push(
    deps: &Deps,
    rollout: &RolloutRecord,
    mut target: TargetRecord,
    handle: Arc<TunnelHandle>,
    guest: Arc<GuestAttestation>,
    version: Arc<LoadedVersion>,
) -> (TargetRecord, PushOutcome) {
    let outcome = attempt(deps, rollout, &mut target, &handle, &guest, &version).await;
    target.updated_at = now_ms();
    (target, outcome)
}

fn fail(target: &mut TargetRecord, reason: String) -> PushOutcome {
    target.state = TargetState::Failed;
    target.reason = reason;
    PushOutcome::Failed
}

/// A failure worth retrying: count the attempt, back off, or give up after `max_attempts`.
fn retry(target: &mut TargetRecord, max_attempts: u32, reason: String) -> PushOutcome {
    if target.attempts >= max_attempts {
        return fail(
            target,
            format!("{reason} (gave up after {} attempts)", target.attempts),
        );
    }
    target.state = TargetState::Pending;
    target.reason = reason;
    target.next_attempt_at = now_ms()
        .saturating_add(u64::try_from(backoff(target.attempts).as_millis()).unwrap_or(u64::MAX));
    PushOutcome::Retry
}

async fn attempt(
    deps: &Deps,
    rollout: &RolloutRecord,
    target: &mut TargetRecord,
    handle: &TunnelHandle,
    guest: &GuestAttestation,
    version: &LoadedVersion,
) -> PushOutcome {
    let path = match rollout.path.parse::<ResourcePath>() {
        Ok(p) => p,
        Err(e) => return fail(target, format!("invalid resource path: {e}")),
    };
    // Checked at each push, not only when the rollout loaded its plaintext: a version erased
    // meanwhile (a missed delete notice) is never delivered. The pushes in flight share the
    // reads (`version_check`).
    match version.check.exists().await {
        Ok(true) => {}
        Ok(false) => {
            return fail(
                target,
                format!("version {} of {path} was erased", rollout.version),
            );
        }
        Err(e) => {
            target.attempts += 1;
            return retry(
                target,
                rollout.max_attempts,
                format!("checking the version: {e}"),
            );
        }
    }
    // The same decision as if the guest fetched the resource itself.
    let question = PolicyQuestion {
        plugin: "resource",
        path: Some(&path),
        query: &BTreeMap::new(),
    };
    match deps.policy.decide(&guest.claims, question) {
        Ok(Decision::Allow) => {}
        Ok(Decision::Deny(why)) => {
            target.state = TargetState::Denied;
            target.reason = why;
            return PushOutcome::Denied;
        }
        Err(e) => {
            target.attempts += 1;
            return retry(
                target,
                rollout.max_attempts,
                format!("policy evaluation: {e}"),
            );
        }
    }
    let sealed = match kbs_core::guest_push::sealed_resource(
        handle.push_key(),
        &guest.tee_pubkey,
        &rollout.path,
        rollout.version,
        &rollout.sha256,
        &version.plaintext,
    ) {
        Ok(sealed) => sealed,
        Err(e) => return fail(target, format!("cannot seal to the guest's TEE key: {e}")),
    };
    target.attempts += 1;
    let deadline = Duration::from_millis(rollout.guest_deadline_ms);
    match handle.apply_resource(sealed, Some(deadline)).await {
        Ok(applied) => {
            if applied.uri != rollout.path {
                return fail(
                    target,
                    format!("guest acknowledged another resource: {}", applied.uri),
                );
            }
            if applied.version == rollout.version && applied.sha256 != rollout.sha256 {
                return fail(
                    target,
                    format!(
                        "guest reports digest {} for version {}, expected {}",
                        applied.sha256, applied.version, rollout.sha256
                    ),
                );
            }
            target.state = TargetState::Acked;
            target.digest = Some(applied.sha256);
            target.held_version = Some(applied.version);
            target.hook_status = applied.hook_status;
            target.already_held = applied.already_held;
            target.acked_at = Some(now_ms());
            deps.fleet.note_held(
                &target.guest_id,
                &rollout.path,
                applied.version,
                target.digest.as_deref().unwrap_or_default(),
            );
            target.reason = if applied.version > rollout.version {
                format!("guest holds a newer version ({})", applied.version)
            } else {
                String::new()
            };
            if applied.already_held {
                PushOutcome::AlreadyHeld
            } else {
                PushOutcome::Acked
            }
        }
        Err(CallError::Disconnected) => {
            // Not the guest's fault: no attempt is counted; it is retried when it reconnects.
            target.attempts = target.attempts.saturating_sub(1);
            target.state = TargetState::Pending;
            target.reason = "guest disconnected during the push".into();
            PushOutcome::Disconnected
        }
        Err(CallError::TooManyInFlight) => {
            target.attempts = target.attempts.saturating_sub(1);
            target.state = TargetState::Pending;
            target.reason = "guest busy (too many calls in flight)".into();
            target.next_attempt_at = now_ms() + 100;
            PushOutcome::Retry
        }
        Err(CallError::Guest(
            e @ (GuestError::Downgrade { .. }
            | GuestError::Invalid(_)
            | GuestError::Unsupported(_)
            | GuestError::DigestMismatch { .. }),
        )) => fail(target, format!("guest refused: {e}")),
        Err(e @ CallError::Guest(GuestError::Storage(_) | GuestError::Unseal(_))) => {
            retry(target, rollout.max_attempts, e.to_string())
        }
        Err(e) => retry(target, rollout.max_attempts, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `outcome` label of `kbs_rotation_pushes_total`, as docs/operations.md lists it.
    #[test]
    fn outcomes_have_their_documented_metric_labels() {
        let labels = [
            (PushOutcome::Acked, "acked"),
            (PushOutcome::AlreadyHeld, "already_held"),
            (PushOutcome::Denied, "denied"),
            (PushOutcome::Failed, "failed"),
            (PushOutcome::Retry, "retry"),
            (PushOutcome::Disconnected, "disconnected"),
        ];
        for (outcome, label) in labels {
            assert_eq!(outcome.as_str(), label, "{outcome:?}");
        }
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let first = backoff(1);
        assert!(first >= RETRY_BASE && first <= RETRY_BASE.mul_f64(1.2));
        let third = backoff(3);
        assert!(third >= RETRY_BASE * 4, "{third:?}");
        assert!(backoff(40) <= RETRY_CAP.mul_f64(1.2));
    }
}
