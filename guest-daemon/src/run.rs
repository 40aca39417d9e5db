//! `guest-daemon run`: the supervisor that keeps one tunnel to the KBS open and serves the
//! KBS's calls on it (docs/protocol.md, Part II).
//!
//! The loop: attest (RCAR) -> open the tunnel (`/kbs/v0/tunnel`, the token as Bearer, proof of
//! possession of the TEE key) -> serve [`GuestDaemonService`](crate::service::GuestDaemonService), re-attesting before the token
//! expires and sending the fresh token in band (`Reauth`). When the tunnel ends, for any
//! reason, it reconnects after a [`Backoff`](tunnel::Backoff) delay (exponential with full jitter, the server's
//! GoAway delay honoured, reset after a stable connection), attesting again first when the
//! close asks for it (4401) or the token is near expiry. A KBS that is down is just another
//! failed attempt. Only start-up problems (state directory, TEE key, URL, CA file, init-data)
//! end [`run`] with an error; otherwise it runs until `shutdown` is cancelled, then closes the
//! tunnel normally (1000).
//!
//! Every state change is logged and published as a [`DaemonState`] on a watch channel
//! ([`RunConfig::subscribe`]).

//!
//! Inside: `supervisor` starts up and runs the reconnect loop; `attester` holds the RCAR
//! client and the current `token` (with its refresh schedule); `connected` serves one open
//! tunnel; `endpoints` runs the local CDH and splitapi endpoints beside it; `state` publishes
//! [`DaemonState`]; `tunnel_config` derives the tunnel's URL and TLS from the KBS URL.

mod attester;
mod config;
mod connected;
mod endpoints;
mod error;
mod state;
mod supervisor;
mod token;
mod tunnel_config;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

pub use config::{DEFAULT_STATE_DIR, RunConfig, SERVICES, default_reconnect_policy};
pub use error::RunError;
pub use state::DaemonState;
pub use token::refresh_after;
pub use tunnel_config::{TUNNEL_PATH, tunnel_url};

use state::set_state;
use supervisor::Supervisor;

/// Longest wait for the tunnel to finish its closing handshake on shutdown.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Runs the daemon until `shutdown` is cancelled: load or create the TEE key in the state
/// directory, attest, keep the tunnel open and serve
/// [`GuestDaemonService`](crate::service::GuestDaemonService) on it.
pub async fn run(config: RunConfig, shutdown: CancellationToken) -> Result<(), RunError> {
    let state = config.state.clone();
    let result = match Supervisor::start(config, shutdown).await {
        Ok(supervisor) => {
            supervisor.run().await;
            Ok(())
        }
        Err(e) => Err(e),
    };
    set_state(&state, DaemonState::Stopped);
    result
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_bad_kbs_url_fails_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let config = RunConfig::new("ftp://kbs.example", dir.path().join("state"));
        let mut states = config.subscribe();
        let err = run(config, CancellationToken::new()).await.unwrap_err();
        assert!(matches!(err, RunError::Client(_)), "{err}");
        assert_eq!(*states.borrow_and_update(), DaemonState::Stopped);
    }

    #[tokio::test]
    async fn an_unreachable_kbs_is_retried_with_backoff_until_shutdown() {
        // A port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let mut config = RunConfig::new(format!("http://127.0.0.1:{port}"), dir.path());
        config.reconnect.initial = Duration::from_millis(20);
        config.reconnect.max = Duration::from_millis(40);
        let mut states = config.subscribe();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(config, shutdown.clone()));
        // Several failed attempts, each followed by a backoff step.
        let mut attempts = 0;
        while attempts < 3 {
            states.changed().await.unwrap();
            if let DaemonState::BackingOff { attempt, .. } = *states.borrow_and_update() {
                attempts = attempt;
            }
        }
        assert!(
            dir.path().join("tee_key.pem").exists(),
            "key created at start"
        );
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(*states.borrow(), DaemonState::Stopped);
    }

    /// Failing over between KBSes that are all down is still one backoff sequence: each
    /// failed attempt, on whichever KBS, counts, so a ring of dead URLs is never a hot loop.
    #[tokio::test]
    async fn failing_over_between_dead_kbses_keeps_backing_off() {
        let dead = || {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            format!("http://127.0.0.1:{port}")
        };
        let dir = tempfile::tempdir().unwrap();
        let mut config = RunConfig::new(dead(), dir.path());
        config.failover_urls = vec![dead(), dead()];
        config.reconnect.initial = Duration::from_millis(10);
        config.reconnect.max = Duration::from_millis(40);
        let mut states = config.subscribe();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(config, shutdown.clone()));
        let mut seen = Vec::new();
        while seen.len() < 7 {
            states.changed().await.unwrap();
            if let DaemonState::BackingOff { attempt, .. } = *states.borrow_and_update() {
                seen.push(attempt);
            }
        }
        // 1, 2, 3, ...: moving to the next KBS never resets the backoff.
        assert_eq!(seen, (1..=7).collect::<Vec<_>>());
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}
