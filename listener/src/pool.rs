//! How many connections a server holds, and which one makes room for a newcomer.
//!
//! Two budgets: every socket ([`Limits::max_connections`]), and the sockets not upgraded
//! ([`Limits::max_http_connections`]). A socket's place in the first travels with the
//! socket itself ([`SocketPermit`], inside the stream an upgrade hands over), so an
//! upgraded tunnel keeps it for its whole life; a connection's place in the second is held
//! by its task ([`Member`]) and freed when it is upgraded or closed. When either is full
//! and a new socket has been accepted, the oldest connection not upgraded and without a
//! request in flight (idle between requests, or not yet past its TLS handshake or first
//! bytes) is closed: an idle socket costs its owner its place as soon as someone else needs
//! one. Upgraded connections are never closed to make room.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::limits::Limits;

/// Counters of one server's connections, readable while it runs ([`Server::stats`](crate::Server::stats)).
#[derive(Clone, Debug, Default)]
pub struct ConnectionStats(Arc<Counters>);

#[derive(Debug, Default)]
struct Counters {
    open: AtomicUsize,
    http: AtomicUsize,
    evicted: AtomicU64,
    timed_out: AtomicU64,
}

impl ConnectionStats {
    /// Sockets open now, upgraded ones included.
    pub fn open(&self) -> usize {
        self.0.open.load(Ordering::Relaxed)
    }

    /// Sockets open now and not upgraded (TLS handshake, HTTP, idle).
    pub fn http(&self) -> usize {
        self.0.http.load(Ordering::Relaxed)
    }

    /// Connections closed so far to make room for a newer one.
    pub fn evicted(&self) -> u64 {
        self.0.evicted.load(Ordering::Relaxed)
    }

    /// Connections closed so far because a peer let a deadline pass (TLS handshake, first
    /// bytes, idle).
    pub fn timed_out(&self) -> u64 {
        self.0.timed_out.load(Ordering::Relaxed)
    }

    pub(crate) fn count_timeout(&self) {
        self.0.timed_out.fetch_add(1, Ordering::Relaxed);
    }
}

/// The two budgets of one server.
pub(crate) struct Pool {
    sockets: Arc<Semaphore>,
    http: Arc<Semaphore>,
    members: Mutex<BTreeMap<u64, Arc<Slot>>>,
    next: AtomicU64,
    /// Notified (one permit kept) whenever a connection's last request ends.
    idle_somewhere: Arc<Notify>,
    stats: ConnectionStats,
}

/// How long the accept loop waits for an evicted connection to free its place before it
/// looks for another one to evict.
const EVICTION_WAIT: Duration = Duration::from_secs(2);

impl Pool {
    pub(crate) fn new(limits: &Limits, stats: ConnectionStats) -> Arc<Self> {
        Arc::new(Self {
            sockets: Arc::new(Semaphore::new(limits.max_connections)),
            http: Arc::new(Semaphore::new(limits.max_http_connections)),
            members: Mutex::default(),
            next: AtomicU64::new(0),
            idle_somewhere: Arc::new(Notify::new()),
            stats,
        })
    }

    /// A place for a socket just accepted: at once if there is one, else after closing the
    /// oldest connection that has no request in flight, else when a socket closes or a
    /// request ends somewhere. The socket keeps the place until it is dropped.
    pub(crate) async fn room(&self) -> SocketPermit {
        let permit = self.place(&self.sockets).await;
        self.stats.0.open.fetch_add(1, Ordering::Relaxed);
        SocketPermit {
            _permit: permit,
            stats: self.stats.clone(),
        }
    }

    /// A place among the connections that are not upgraded: at once if one is free, else
    /// after closing the oldest connection that has no request in flight, else when a
    /// request ends somewhere.
    pub(crate) async fn join(self: &Arc<Self>) -> Member {
        let permit = self.place(&self.http).await;
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(Slot::new(Arc::clone(&self.idle_somewhere)));
        lock(&self.members).insert(id, Arc::clone(&slot));
        self.stats.0.http.fetch_add(1, Ordering::Relaxed);
        Member {
            _permit: permit,
            id,
            slot,
            pool: Arc::clone(self),
        }
    }

    /// A place in `budget` (the sockets' or the HTTP connections'), making room if need be.
    async fn place(&self, budget: &Arc<Semaphore>) -> Option<OwnedSemaphorePermit> {
        loop {
            if let Ok(permit) = Arc::clone(budget).try_acquire_owned() {
                return Some(permit);
            }
            let places = Arc::clone(budget).acquire_owned();
            if self.evict_oldest_idle() {
                // The evicted connection's task frees its place within its close grace.
                if let Ok(permit) = tokio::time::timeout(EVICTION_WAIT, places).await {
                    return permit.ok();
                }
                continue;
            }
            // Every connection has a request in flight: wait for one to close, or to become
            // idle (evictable).
            tokio::select! {
                permit = places => return permit.ok(),
                () = self.idle_somewhere.notified() => {}
            }
        }
    }

    /// Close the oldest connection without a request in flight; false when there is none.
    fn evict_oldest_idle(&self) -> bool {
        let members = lock(&self.members);
        let oldest = members
            .values()
            .find(|slot| !slot.evict.is_cancelled() && slot.is_idle());
        match oldest {
            Some(slot) => {
                slot.evict.cancel();
                self.stats.0.evicted.fetch_add(1, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One socket's place in the server's budget; freed when the socket is dropped, wherever an
/// upgrade took it.
#[derive(Debug)]
pub(crate) struct SocketPermit {
    _permit: Option<OwnedSemaphorePermit>,
    stats: ConnectionStats,
}

impl Drop for SocketPermit {
    fn drop(&mut self) {
        self.stats.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection's place among those not upgraded, held by its task.
pub(crate) struct Member {
    _permit: Option<OwnedSemaphorePermit>,
    id: u64,
    slot: Arc<Slot>,
    pool: Arc<Pool>,
}

impl Member {
    pub(crate) fn slot(&self) -> &Arc<Slot> {
        &self.slot
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        lock(&self.pool.members).remove(&self.id);
        self.pool.stats.0.http.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the pool and the connection's task share: requests in flight, since when there
/// have been none, and the order to make room.
pub(crate) struct Slot {
    state: Mutex<Activity>,
    became_idle: Notify,
    idle_somewhere: Arc<Notify>,
    evict: CancellationToken,
}

struct Activity {
    in_flight: usize,
    idle_since: Option<Instant>,
}

impl Slot {
    fn new(idle_somewhere: Arc<Notify>) -> Self {
        Self {
            state: Mutex::new(Activity {
                in_flight: 0,
                idle_since: Some(Instant::now()),
            }),
            became_idle: Notify::new(),
            idle_somewhere,
            evict: CancellationToken::new(),
        }
    }

    fn is_idle(&self) -> bool {
        lock(&self.state).in_flight == 0
    }

    /// Cancelled when the pool needs this connection's place.
    pub(crate) fn evicted(&self) -> &CancellationToken {
        &self.evict
    }

    /// A request starts; it ends when the returned guard is dropped (with its response body).
    pub(crate) fn begin(self: &Arc<Self>) -> InFlight {
        let mut state = lock(&self.state);
        state.in_flight += 1;
        state.idle_since = None;
        InFlight(Arc::clone(self))
    }

    /// Returns once the connection has had no request in flight for `idle`.
    pub(crate) async fn idle_for(&self, idle: Duration) {
        loop {
            let since = lock(&self.state).idle_since;
            match since {
                None => self.became_idle.notified().await,
                Some(at) => {
                    tokio::time::sleep_until(at + idle).await;
                    if lock(&self.state).idle_since == Some(at) {
                        return;
                    }
                }
            }
        }
    }
}

/// One request in flight on a connection.
pub(crate) struct InFlight(Arc<Slot>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut state = lock(&self.0.state);
        state.in_flight = state.in_flight.saturating_sub(1);
        if state.in_flight == 0 {
            state.idle_since = Some(Instant::now());
            drop(state);
            // Stores a permit when the waiter is not waiting yet: no wake-up is lost.
            self.0.became_idle.notify_one();
            self.0.idle_somewhere.notify_one();
        }
    }
}
