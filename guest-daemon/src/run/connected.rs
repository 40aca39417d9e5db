//! The `Connected` state: serving one open tunnel until it closes or shutdown closes it,
//! re-attesting on the token's schedule and sending the fresh token in band (`Reauth`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinError;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tunnel::{CloseInfo, Closed, GuestTunnel, ReauthError, TunnelSession};

use super::attester::Attester;
use super::state::{DaemonState, connected_state, disconnected_state, set_state};
use super::{CLOSE_WAIT, millis};
use crate::service::GuestDaemonService;

/// Counts one open tunnel in the service's `open_tunnels` while it lives.
struct OpenTunnel(Arc<AtomicU32>);

impl OpenTunnel {
    fn count(counter: Arc<AtomicU32>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter)
    }
}

impl Drop for OpenTunnel {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What serving one tunnel needs from the supervisor.
pub(super) struct Connected<'a> {
    pub attester: &'a mut Attester,
    pub service: &'a GuestDaemonService,
    pub state: &'a watch::Sender<DaemonState>,
    pub shutdown: &'a CancellationToken,
}

impl Connected<'_> {
    fn set(&self, state: DaemonState) {
        set_state(self.state, state);
    }

    /// Serves an open tunnel until it ends (`Some`) or shutdown closed it (`None`), refreshing
    /// its token in band on schedule.
    pub async fn serve(mut self, tunnel: GuestTunnel) -> Option<Closed> {
        let session = tunnel.session();
        let _open = OpenTunnel::count(self.service.open_tunnels());
        let mut reauths = 0;
        self.set(connected_state(&session, reauths));
        let service = self.service.for_tunnel(tunnel.welcome().push_key.clone());
        let mut task = AbortOnDropHandle::new(tokio::spawn(tunnel.serve(service)));
        let mut next_refresh = self.attester.token().and_then(|t| t.refresh_at);
        let shutdown = self.shutdown;
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    session.close();
                    let closed = match timeout(CLOSE_WAIT, &mut task).await {
                        Ok(joined) => closed_from(joined),
                        Err(_) => local_close(1006, "the tunnel did not close in time"),
                    };
                    self.set(disconnected_state(&closed));
                    return None;
                }
                joined = &mut task => {
                    let closed = closed_from(joined);
                    self.set(disconnected_state(&closed));
                    return Some(closed);
                }
                () = sleep_until_opt(next_refresh) => {
                    next_refresh = self.refresh_in_band(&session, &mut reauths).await;
                }
            }
        }
    }

    /// Re-attests and sends the fresh token in band; returns when to try again (the new
    /// token's refresh time, or a retry after a failure; `None` when the tunnel is closing).
    async fn refresh_in_band(
        &mut self,
        session: &TunnelSession,
        reauths: &mut u32,
    ) -> Option<Instant> {
        let shutdown = self.shutdown;
        tracing::info!(
            session_id = session.session_id(),
            "re-attesting for the open tunnel"
        );
        let token = match shutdown.run_until_cancelled(self.attester.attest()).await? {
            Ok(token) => token,
            Err(e) => {
                let retry = self.attester.retry_delay();
                tracing::warn!(
                    error = %e,
                    retry_in_ms = millis(retry),
                    "re-attestation failed; the tunnel stays up until its token expires"
                );
                return Some(Instant::now() + retry);
            }
        };
        tracing::info!(
            guest_id = token.guest_id.as_deref().unwrap_or("(not in the token)"),
            exp = token.exp.unwrap_or(0),
            "attested"
        );
        let sent = shutdown
            .run_until_cancelled(session.reauth(token.jwt.to_string()))
            .await?;
        match sent {
            Ok(_) => {
                *reauths = reauths.saturating_add(1);
                let next = token.refresh_at;
                self.attester.hold(token);
                self.set(connected_state(session, *reauths));
                next
            }
            Err(ReauthError::Closed(closed)) => {
                tracing::warn!(
                    code = closed.close.code,
                    reason = %closed.close.reason,
                    "reauth failed: the tunnel closed"
                );
                if !closed.needs_reattest() {
                    self.attester.hold(token);
                }
                None
            }
            Err(e) => {
                self.attester.hold(token);
                let retry = self.attester.retry_delay();
                tracing::warn!(error = %e, retry_in_ms = millis(retry), "reauth failed");
                Some(Instant::now() + retry)
            }
        }
    }
}

fn closed_from(joined: Result<Closed, JoinError>) -> Closed {
    joined.unwrap_or_else(|e| local_close(1011, &format!("the tunnel task failed: {e}")))
}

fn local_close(code: u16, reason: &str) -> Closed {
    Closed {
        close: CloseInfo {
            code,
            reason: reason.to_owned(),
            by_peer: false,
        },
        reconnect_after: None,
        connected_for: Duration::ZERO,
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_tunnel_guard_counts_while_alive() {
        let counter = Arc::new(AtomicU32::new(0));
        let a = OpenTunnel::count(counter.clone());
        let b = OpenTunnel::count(counter.clone());
        assert_eq!(counter.load(Ordering::Relaxed), 2);
        drop(a);
        drop(b);
        assert_eq!(counter.load(Ordering::Relaxed), 0);
    }
}
