//! Hooks the server maps to metrics (Prometheus counters and histograms).

use std::time::Duration;

/// Receives tunnel events for metrics; every method defaults to doing nothing.
///
/// Called inline on the tunnel's task: implementations must be quick and never block.
pub trait TunnelObserver: Send + Sync + 'static {
    /// A handshake ended: `ok`, `bad_proof`, `protocol_error`, `too_large`, `timeout` or `disconnected`.
    fn handshake(&self, outcome: &'static str) {
        let _ = outcome;
    }

    /// A tunnel was registered in the hub.
    fn connected(&self, guest_id: &str) {
        let _ = guest_id;
    }

    /// A registered tunnel ended with `close_code` (ours or the peer's; 1006 when it vanished).
    fn disconnected(&self, guest_id: &str, close_code: u16, reason: &str) {
        let _ = (guest_id, close_code, reason);
    }

    /// A call ended: `method` as in `GuestService`; `outcome` one of `ok`, `guest_error`,
    /// `deadline_exceeded`, `too_many_in_flight`, `disconnected`, `transport_error`, `cancelled`.
    fn rpc(&self, method: &'static str, outcome: &'static str, elapsed: Duration) {
        let _ = (method, outcome, elapsed);
    }
}

/// An observer that records nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoopObserver;

impl TunnelObserver for NoopObserver {}
