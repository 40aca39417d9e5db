//! [`Hub`]: the registry of live tunnels, one per guest id, with connection epochs so a
//! stale tunnel's cleanup never removes its successor.

use std::sync::Arc;

use dashmap::{DashMap, mapref::entry::Entry};
use tokio::sync::broadcast;

use crate::handle::TunnelHandle;

/// Default number of events a slow subscriber may fall behind before it loses some.
pub const DEFAULT_EVENT_CAPACITY: usize = 1024;

/// A change in the set of live tunnels, for server-request plugins.
#[derive(Clone, Debug)]
pub enum TunnelEvent {
    /// A tunnel was registered (possibly superseding an older one of the same guest).
    Connected(Arc<TunnelHandle>),
    /// A tunnel ended.
    Disconnected {
        /// Its guest id.
        guest_id: String,
        /// Its epoch (compare with the live handle's to tell a superseded tunnel apart).
        epoch: u64,
        /// Close code it ended with.
        code: u16,
    },
}

/// Registry of live tunnels; cheap to clone (all clones share one registry).
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    tunnels: DashMap<String, Arc<TunnelHandle>>,
    events: broadcast::Sender<TunnelEvent>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").field("tunnels", &self.len()).finish()
    }
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

impl Hub {
    /// An empty hub with the default event capacity.
    pub fn new() -> Self {
        Self::with_event_capacity(DEFAULT_EVENT_CAPACITY)
    }

    /// An empty hub whose subscribers may lag `capacity` events before losing some.
    pub fn with_event_capacity(capacity: usize) -> Self {
        let (events, _) = broadcast::channel(capacity.max(1));
        Self {
            inner: Arc::new(Inner {
                tunnels: DashMap::new(),
                events,
            }),
        }
    }

    /// Registers `handle` and returns the handle that lost and must be closed with 4409:
    /// normally the previous tunnel of the same guest; `handle` itself if a tunnel with a
    /// newer epoch is already registered (two connects raced); `None` if there was none.
    pub fn register(&self, handle: Arc<TunnelHandle>) -> Option<Arc<TunnelHandle>> {
        let previous = match self.inner.tunnels.entry(handle.guest_id.clone()) {
            Entry::Occupied(slot) if slot.get().epoch > handle.epoch => return Some(handle),
            Entry::Occupied(mut slot) => Some(slot.insert(handle.clone())),
            Entry::Vacant(slot) => {
                slot.insert(handle.clone());
                None
            }
        };
        // The map guard is released here, before anyone hears of it.
        let _ = self.inner.events.send(TunnelEvent::Connected(handle));
        previous
    }

    /// Removes the tunnel of `guest_id` only if it is the one with `epoch`.
    pub fn remove(&self, guest_id: &str, epoch: u64) -> Option<Arc<TunnelHandle>> {
        self.inner
            .tunnels
            .remove_if(guest_id, |_, h| h.epoch == epoch)
            .map(|(_, h)| h)
    }

    /// Removes the tunnel (if `epoch` is still the live one) and tells subscribers it ended
    /// with `code`; returns whether it was the live one.
    pub fn unregister(&self, guest_id: &str, epoch: u64, code: u16) -> bool {
        let removed = self.remove(guest_id, epoch).is_some();
        let _ = self.inner.events.send(TunnelEvent::Disconnected {
            guest_id: guest_id.to_owned(),
            epoch,
            code,
        });
        removed
    }

    /// The live tunnel of `guest_id`.
    pub fn get(&self, guest_id: &str) -> Option<Arc<TunnelHandle>> {
        self.inner.tunnels.get(guest_id).map(|h| Arc::clone(&h))
    }

    /// All live tunnels (a snapshot).
    pub fn list(&self) -> Vec<Arc<TunnelHandle>> {
        self.inner
            .tunnels
            .iter()
            .map(|entry| Arc::clone(entry.value()))
            .collect()
    }

    /// Number of live tunnels.
    pub fn len(&self) -> usize {
        self.inner.tunnels.len()
    }

    /// True when no tunnel is live.
    pub fn is_empty(&self) -> bool {
        self.inner.tunnels.is_empty()
    }

    /// Subscribes to connects and disconnects from now on; a subscriber that falls behind
    /// gets `RecvError::Lagged` and loses events, it never slows the hub.
    pub fn subscribe(&self) -> broadcast::Receiver<TunnelEvent> {
        self.inner.events.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{handle::TunnelInfo, observer::NoopObserver};
    use std::time::Duration;

    /// A handle no task serves.
    fn handle(guest_id: &str) -> Arc<TunnelHandle> {
        Arc::new(TunnelHandle::new(
            TunnelInfo {
                guest_id: guest_id.into(),
                ..TunnelInfo::default()
            },
            4,
            Duration::from_secs(1),
            Arc::new(NoopObserver),
        ))
    }

    #[test]
    fn a_new_tunnel_supersedes_the_old_and_stale_cleanup_keeps_it() {
        let hub = Hub::new();
        let old = handle("g1");
        let new = handle("g1");
        assert!(new.epoch > old.epoch);
        assert!(hub.register(old.clone()).is_none());
        let loser = hub.register(new.clone()).expect("old one superseded");
        assert_eq!(loser.epoch, old.epoch);
        // The old tunnel's cleanup runs after the new one registered.
        assert!(!hub.unregister("g1", old.epoch, 4409));
        assert_eq!(hub.get("g1").map(|h| h.epoch), Some(new.epoch));
        assert!(hub.unregister("g1", new.epoch, 1000));
        assert!(hub.is_empty());
    }

    #[test]
    fn an_older_epoch_registering_late_loses() {
        let hub = Hub::new();
        let old = handle("g1");
        let new = handle("g1");
        assert!(hub.register(new.clone()).is_none());
        let loser = hub.register(old.clone()).expect("stale one refused");
        assert_eq!(loser.epoch, old.epoch);
        assert_eq!(hub.get("g1").map(|h| h.epoch), Some(new.epoch));
    }

    #[test]
    fn list_len_and_events() {
        let hub = Hub::with_event_capacity(2);
        let mut events = hub.subscribe();
        let a = handle("a");
        let b = handle("b");
        hub.register(a.clone());
        hub.register(b.clone());
        assert_eq!(hub.len(), 2);
        let mut ids: Vec<_> = hub.list().iter().map(|h| h.guest_id.clone()).collect();
        ids.sort();
        assert_eq!(ids, ["a", "b"]);
        assert!(matches!(events.try_recv(), Ok(TunnelEvent::Connected(h)) if h.guest_id == "a"));
        // A lagging subscriber loses events; the hub never waits for it.
        hub.unregister("a", a.epoch, 1000);
        hub.unregister("b", b.epoch, 1000);
        hub.register(handle("c"));
        assert!(matches!(
            events.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(_))
        ));
        assert_eq!(hub.len(), 1);
    }
}
