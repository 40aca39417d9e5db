//! Bounded waits: on the hub's connect/disconnect events where the KBS offers them, else a
//! short poll. A wait that runs out fails the test, naming what it waited for.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;
use tunnel::{Hub, TunnelHandle};

/// How long a wait may take by default before the test fails.
pub const WAIT: Duration = Duration::from_secs(15);

/// How often [`eventually`] checks its condition.
const POLL: Duration = Duration::from_millis(20);

/// Polls `check` until it holds; fails the test, naming `what`, after [`WAIT`].
pub async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually_within(WAIT, what, check).await;
}

/// Polls `check` until it holds; fails the test, naming `what`, after `limit`.
pub async fn eventually_within<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until `holds(hub)`, checking again on each of the hub's connect and disconnect
/// events; fails the test, naming `what`, after `limit`.
pub async fn hub_until(
    hub: &Hub,
    limit: Duration,
    what: &str,
    mut holds: impl FnMut(&Hub) -> bool,
) {
    // Subscribed before the first check: the hub changes its map before it tells anyone,
    // so no change between the check and the first event goes unseen.
    let mut events = hub.subscribe();
    let waited = tokio::time::timeout(limit, async {
        while !holds(hub) {
            match events.recv().await {
                Ok(_) | Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => panic!("the hub closed while waiting for {what}"),
            }
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "timed out after {limit:?} waiting for {what}"
    );
}

/// The live tunnel of `guest_id` once the hub holds one that passes `accept`, awaited on the
/// hub's events; fails the test after `limit`.
pub async fn tunnel_of(
    hub: &Hub,
    limit: Duration,
    guest_id: &str,
    accept: impl Fn(&TunnelHandle) -> bool,
) -> Arc<TunnelHandle> {
    let mut found = None;
    hub_until(hub, limit, &format!("a tunnel of {guest_id}"), |hub| {
        found = hub.get(guest_id).filter(|h| accept(h));
        found.is_some()
    })
    .await;
    found.expect("found when the wait ends")
}
