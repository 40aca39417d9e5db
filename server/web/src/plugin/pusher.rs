//! [`CredentialPusher`]: the push half of a server-request plugin that installs credentials
//! into guests (splitapi, nebula-ca): which tunnels offer the service, at most one push per
//! tunnel in flight, a bound on pushes at once, and what each live tunnel last acknowledged.
//!
//! The plugin supplies what to push (a future per tunnel that answers the acknowledged
//! marker: a bundle version, an expiry); the pusher decides when a push runs and remembers
//! its outcome per connection epoch, so a reconnect (new epoch) is pushed again and a renewal
//! pass never queues a second push behind one still running.

use std::future::Future;
use std::sync::Arc;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tunnel::{Hub, TunnelHandle};

/// Pushes of one tunnel service's credentials; `M` is what a guest acknowledged.
pub struct CredentialPusher<M> {
    service: &'static str,
    /// What each live tunnel (guest id -> epoch) last acknowledged.
    delivered: DashMap<String, (u64, M)>,
    /// The tunnel (guest id -> epoch) a push is running for.
    in_flight: DashMap<String, u64>,
    permits: Semaphore,
}

impl<M: Copy + Send + Sync + 'static> CredentialPusher<M> {
    /// Pushes into tunnels that announce `service`, at most `max_concurrent` at once.
    pub fn new(service: &'static str, max_concurrent: usize) -> Arc<Self> {
        Arc::new(Self {
            service,
            delivered: DashMap::new(),
            in_flight: DashMap::new(),
            permits: Semaphore::new(max_concurrent.max(1)),
        })
    }

    /// Whether `handle`'s guest announced the service.
    pub fn offers(&self, handle: &TunnelHandle) -> bool {
        handle.services.iter().any(|s| s == self.service)
    }

    /// Run `push` for `handle` in a task, unless the tunnel does not offer the service or a
    /// push to this very tunnel (same epoch) is still running. The push waits for a permit;
    /// it is dropped unstarted or cut short when `shutdown` fires. `Some(marker)` is recorded
    /// as what this tunnel acknowledged.
    pub fn spawn<F, Fut>(
        self: &Arc<Self>,
        handle: Arc<TunnelHandle>,
        shutdown: &CancellationToken,
        push: F,
    ) where
        F: FnOnce(Arc<TunnelHandle>) -> Fut + Send + 'static,
        Fut: Future<Output = Option<M>> + Send + 'static,
    {
        if !self.offers(&handle) {
            return;
        }
        match self.in_flight.entry(handle.guest_id.clone()) {
            Entry::Occupied(e) if *e.get() == handle.epoch => return,
            Entry::Occupied(mut e) => {
                // A newer (or older) tunnel of the same guest: the running push ends
                // against its own, closed tunnel; this one is pushed too.
                e.insert(handle.epoch);
            }
            Entry::Vacant(e) => {
                e.insert(handle.epoch);
            }
        }
        let running = InFlight {
            pusher: self.clone(),
            guest_id: handle.guest_id.clone(),
            epoch: handle.epoch,
        };
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _running = running;
            let pusher = _running.pusher.clone();
            let (guest_id, epoch) = (handle.guest_id.clone(), handle.epoch);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {}
                _ = async {
                    let Ok(_permit) = pusher.permits.acquire().await else { return };
                    if let Some(marker) = push(handle).await {
                        pusher.delivered.insert(guest_id, (epoch, marker));
                    }
                } => {}
            }
        });
    }

    /// What `handle`'s tunnel (this guest, this epoch) acknowledged, if anything.
    pub fn delivered(&self, handle: &TunnelHandle) -> Option<M> {
        self.delivered
            .get(&handle.guest_id)
            .and_then(|d| (d.0 == handle.epoch).then_some(d.1))
    }

    /// Forget what the tunnel `guest_id`/`epoch` acknowledged (it closed).
    pub fn forget(&self, guest_id: &str, epoch: u64) {
        self.delivered.remove_if(guest_id, |_, (e, _)| *e == epoch);
    }

    /// Keep only what the tunnels live in `hub` acknowledged.
    pub fn retain_live(&self, hub: &Hub) {
        self.delivered
            .retain(|id, (epoch, _)| hub.get(id).is_some_and(|h| h.epoch == *epoch));
    }

    /// Tunnels remembered as acknowledged (for tests and stats).
    pub fn delivered_len(&self) -> usize {
        self.delivered.len()
    }
}

/// Marks a push as running until its task ends, however it ends.
struct InFlight<M: Copy + Send + Sync + 'static> {
    pusher: Arc<CredentialPusher<M>>,
    guest_id: String,
    epoch: u64,
}

impl<M: Copy + Send + Sync + 'static> Drop for InFlight<M> {
    fn drop(&mut self) {
        self.pusher
            .in_flight
            .remove_if(&self.guest_id, |_, e| *e == self.epoch);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use std::pin::Pin;

    use tunnel::{NoopObserver, TunnelInfo};

    use super::*;

    const SERVICE: &str = "creds";

    fn tunnel(guest: &str, services: &[&str]) -> Arc<TunnelHandle> {
        Arc::new(TunnelHandle::new(
            TunnelInfo {
                guest_id: guest.to_string(),
                session_id: "s".to_string(),
                labels: Default::default(),
                instance_id: "i".to_string(),
                daemon_version: "t".to_string(),
                services: services.iter().map(|s| s.to_string()).collect(),
            },
            4,
            Duration::from_secs(5),
            Arc::new(NoopObserver),
        ))
    }

    type Push = Pin<Box<dyn Future<Output = Option<u64>> + Send + 'static>>;

    /// Counts pushes; each waits for a released permit, then acknowledges its marker.
    #[derive(Clone)]
    struct Gate {
        started: Arc<AtomicUsize>,
        release: Arc<Semaphore>,
    }

    impl Gate {
        fn new() -> Self {
            Self {
                started: Arc::default(),
                release: Arc::new(Semaphore::new(0)),
            }
        }

        fn push(&self, marker: u64) -> impl FnOnce(Arc<TunnelHandle>) -> Push + use<> {
            let gate = self.clone();
            move |_handle| {
                Box::pin(async move {
                    gate.started.fetch_add(1, Ordering::SeqCst);
                    gate.release.acquire().await.ok()?.forget();
                    Some(marker)
                })
            }
        }

        fn release(&self, n: usize) {
            self.release.add_permits(n);
        }
    }

    async fn until(what: impl Fn() -> bool) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while !what() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("condition within 5 s");
    }

    #[tokio::test]
    async fn a_second_push_to_a_tunnel_with_one_running_is_not_queued() {
        let pusher = CredentialPusher::<u64>::new(SERVICE, 8);
        let stop = CancellationToken::new();
        let gate = Gate::new();
        let t = tunnel("g1", &[SERVICE]);
        pusher.spawn(t.clone(), &stop, gate.push(1));
        until(|| gate.started.load(Ordering::SeqCst) == 1).await;
        // A renewal pass while the first push still runs.
        pusher.spawn(t.clone(), &stop, gate.push(2));
        pusher.spawn(t.clone(), &stop, gate.push(3));
        gate.release(1);
        until(|| pusher.delivered(&t) == Some(1)).await;
        until(|| pusher.in_flight.is_empty()).await;
        assert_eq!(gate.started.load(Ordering::SeqCst), 1);

        // Once it has ended, the next pass pushes again.
        pusher.spawn(t.clone(), &stop, gate.push(4));
        until(|| gate.started.load(Ordering::SeqCst) == 2).await;
        gate.release(1);
        until(|| pusher.delivered(&t) == Some(4)).await;
    }

    #[tokio::test]
    async fn a_new_tunnel_of_the_guest_is_pushed_while_the_old_push_runs() {
        let pusher = CredentialPusher::<u64>::new(SERVICE, 8);
        let stop = CancellationToken::new();
        let gate = Gate::new();
        let old = tunnel("g1", &[SERVICE]);
        let new = tunnel("g1", &[SERVICE]);
        pusher.spawn(old.clone(), &stop, gate.push(1));
        pusher.spawn(new.clone(), &stop, gate.push(2));
        until(|| gate.started.load(Ordering::SeqCst) == 2).await;
        gate.release(2);
        until(|| pusher.in_flight.is_empty()).await;
        // The old tunnel's marker is not taken for the new tunnel's.
        assert_eq!(
            pusher.delivered(&old).is_some(),
            pusher.delivered(&new).is_none()
        );
    }

    #[tokio::test]
    async fn tunnels_without_the_service_are_not_pushed() {
        let pusher = CredentialPusher::<u64>::new(SERVICE, 8);
        let stop = CancellationToken::new();
        let gate = Gate::new();
        let t = tunnel("g1", &["other"]);
        assert!(!pusher.offers(&t));
        pusher.spawn(t.clone(), &stop, gate.push(1));
        assert!(pusher.in_flight.is_empty());
        tokio::task::yield_now().await;
        assert_eq!(gate.started.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn pushes_wait_for_a_permit() {
        let pusher = CredentialPusher::<u64>::new(SERVICE, 1);
        let stop = CancellationToken::new();
        let gate = Gate::new();
        let a = tunnel("a", &[SERVICE]);
        let b = tunnel("b", &[SERVICE]);
        pusher.spawn(a.clone(), &stop, gate.push(1));
        pusher.spawn(b.clone(), &stop, gate.push(1));
        until(|| gate.started.load(Ordering::SeqCst) == 1).await;
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            gate.started.load(Ordering::SeqCst),
            1,
            "one permit, one push"
        );
        gate.release(1);
        until(|| gate.started.load(Ordering::SeqCst) == 2).await;
        gate.release(1);
        until(|| pusher.delivered_len() == 2).await;
    }

    #[tokio::test]
    async fn shutdown_drops_a_waiting_push_and_clears_it() {
        let pusher = CredentialPusher::<u64>::new(SERVICE, 1);
        let stop = CancellationToken::new();
        let gate = Gate::new();
        let a = tunnel("a", &[SERVICE]);
        pusher.spawn(a.clone(), &stop, gate.push(1));
        until(|| gate.started.load(Ordering::SeqCst) == 1).await;
        stop.cancel();
        until(|| pusher.in_flight.is_empty()).await;
        assert_eq!(pusher.delivered(&a), None);
    }

    #[tokio::test]
    async fn forget_and_retain_live_drop_only_closed_tunnels() {
        let pusher = CredentialPusher::<u64>::new(SERVICE, 8);
        let hub = Hub::new();
        let old = tunnel("g1", &[SERVICE]);
        let live = tunnel("g1", &[SERVICE]);
        let gone = tunnel("g2", &[SERVICE]);
        pusher.delivered.insert("g1".into(), (old.epoch, 1));
        // A disconnect of an older tunnel keeps the newer one's record.
        pusher.delivered.insert("g1".into(), (live.epoch, 2));
        pusher.forget("g1", old.epoch);
        assert_eq!(pusher.delivered(&live), Some(2));
        assert_eq!(pusher.delivered(&old), None);
        pusher.forget("g1", live.epoch);
        assert_eq!(pusher.delivered(&live), None);

        pusher.delivered.insert("g1".into(), (live.epoch, 2));
        pusher.delivered.insert("g2".into(), (gone.epoch, 3));
        hub.register(live.clone());
        pusher.retain_live(&hub);
        assert_eq!(pusher.delivered(&live), Some(2));
        assert_eq!(pusher.delivered(&gone), None);
        assert_eq!(pusher.delivered_len(), 1);
    }
}
