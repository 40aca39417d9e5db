//! Whether the version a rollout delivers still exists, asked before every push (a version
//! erased meanwhile, whose delete notice was missed, is never delivered) but read from the
//! store in rounds: a push that asks while a read is under way waits for the next read,
//! which starts after it asked, so every push still sees a read begun after it asked, and
//! thousands of pushes in flight cost a few reads instead of one each. One read each queued
//! 10,000 reads per replica on the database pool at the start of a large rollout; those
//! that waited past the pool's acquire timeout failed their push, which was then retried
//! after its backoff (docs/operations.md, section 4.2).

use std::sync::{Arc, Mutex, PoisonError};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};

use kbs_core::resource_path::ResourcePath;
use kbs_core::storage::ResourceStore;

/// One read of the version list: whether the version is there (not erased), or the store's
/// error as text.
type Round = Shared<BoxFuture<'static, Result<bool, String>>>;

/// The existence check of one rollout's version, shared by its pushes.
pub struct VersionCheck {
    resources: Arc<dyn ResourceStore>,
    path: ResourcePath,
    version: u64,
    rounds: Mutex<Rounds>,
}

#[derive(Default)]
struct Rounds {
    /// The read under way (or finished, until someone asks again).
    current: Option<Round>,
    /// The read that starts when `current` ends, with the pushes that asked meanwhile.
    next: Option<Round>,
}

impl VersionCheck {
    /// The check of `version` of `path`, read from `resources`.
    pub fn new(resources: Arc<dyn ResourceStore>, path: ResourcePath, version: u64) -> Self {
        Self {
            resources,
            path,
            version,
            rounds: Mutex::default(),
        }
    }

    /// Whether the version exists and is not erased, from a read that began after this
    /// call did.
    pub async fn exists(&self) -> Result<bool, String> {
        let round = {
            let mut rounds = self.rounds.lock().unwrap_or_else(PoisonError::into_inner);
            while rounds.current.as_ref().is_some_and(|c| c.peek().is_some()) {
                rounds.current = rounds.next.take();
            }
            match (&rounds.current, &rounds.next) {
                (None, _) => {
                    let read = self.read(None);
                    rounds.current = Some(read.clone());
                    read
                }
                (Some(_), Some(next)) => next.clone(),
                (Some(current), None) => {
                    let read = self.read(Some(current.clone()));
                    rounds.next = Some(read.clone());
                    read
                }
            }
        };
        round.await
    }

    /// A read that starts once `after` (the read under way) has ended. It holds what it
    /// reads with, not the check itself: a round nobody awaited to its end stays in
    /// `rounds`, and a check held by its own round would never be freed.
    fn read(&self, after: Option<Round>) -> Round {
        let (resources, path, version) =
            (Arc::clone(&self.resources), self.path.clone(), self.version);
        async move {
            if let Some(previous) = after {
                let _ = previous.await;
            }
            resources
                .list_versions(&path)
                .await
                .map(|versions| versions.iter().any(|v| v.version == version && !v.deleted))
                .map_err(|e| e.to_string())
        }
        .boxed()
        .shared()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::atomic::{AtomicUsize, Ordering};

    use async_trait::async_trait;
    use kbs_core::storage::{
        KeyEncryptionKey, ResourceVersion, SqliteStore, StoreError, VersionInfo,
    };
    use tokio::sync::Semaphore;

    use super::*;

    /// The real in-memory store, its `list_versions` counted once it has read and then
    /// held at a gate the test opens: what a read saw is fixed before the test goes on.
    struct Gated {
        store: SqliteStore,
        reads: AtomicUsize,
        gate: Semaphore,
    }

    #[async_trait]
    impl ResourceStore for Gated {
        async fn put_resource(
            &self,
            path: &ResourcePath,
            data: &[u8],
            actor: &str,
        ) -> Result<u64, StoreError> {
            self.store.put_resource(path, data, actor).await
        }
        async fn get_resource(
            &self,
            path: &ResourcePath,
            version: Option<u64>,
        ) -> Result<Option<ResourceVersion>, StoreError> {
            self.store.get_resource(path, version).await
        }
        async fn list_versions(&self, path: &ResourcePath) -> Result<Vec<VersionInfo>, StoreError> {
            let read = self.store.list_versions(path).await;
            self.reads.fetch_add(1, Ordering::SeqCst);
            self.gate.acquire().await.unwrap().forget();
            read
        }
        async fn delete_resource(
            &self,
            path: &ResourcePath,
            actor: &str,
        ) -> Result<bool, StoreError> {
            self.store.delete_resource(path, actor).await
        }
    }

    async fn gated() -> (Arc<Gated>, ResourcePath) {
        let kek = Arc::new(KeyEncryptionKey::from_bytes(&[3u8; 32]));
        let store = SqliteStore::open_in_memory(kek).await.unwrap();
        let path: ResourcePath = "default/key/app".parse().unwrap();
        store.put_resource(&path, b"v1", "ops").await.unwrap();
        let gated = Arc::new(Gated {
            store,
            reads: AtomicUsize::new(0),
            gate: Semaphore::new(0),
        });
        (gated, path)
    }

    /// Waits until `n` reads have read (each then waits at the gate).
    async fn reads_done(g: &Gated, n: usize) {
        while g.reads.load(Ordering::SeqCst) < n {
            tokio::task::yield_now().await;
        }
    }

    fn ask(check: &Arc<VersionCheck>) -> tokio::task::JoinHandle<Result<bool, String>> {
        let check = Arc::clone(check);
        tokio::spawn(async move { check.exists().await })
    }

    #[tokio::test]
    async fn a_thousand_asking_at_once_cost_two_reads() {
        let (g, path) = gated().await;
        let check = Arc::new(VersionCheck::new(g.clone(), path, 1));
        let first = ask(&check);
        reads_done(&g, 1).await;
        // Asked while the first read is under way: they share the next one.
        let rest: Vec<_> = (0..999).map(|_| ask(&check)).collect();
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        g.gate.add_permits(2);
        assert_eq!(first.await.unwrap(), Ok(true));
        for r in rest {
            assert_eq!(r.await.unwrap(), Ok(true));
        }
        assert_eq!(g.reads.load(Ordering::SeqCst), 2);
    }

    /// The point of the rounds: a push that asks after a read began never takes that
    /// read's answer, so an erase that landed before it asked is always seen.
    #[tokio::test]
    async fn an_erase_after_a_read_began_is_seen_by_those_who_asked_after_it() {
        let (g, path) = gated().await;
        let check = Arc::new(VersionCheck::new(g.clone(), path.clone(), 1));
        let early = ask(&check);
        reads_done(&g, 1).await;
        assert!(g.store.delete_resource(&path, "ops").await.unwrap());
        let late = ask(&check);
        tokio::task::yield_now().await;
        g.gate.add_permits(2);
        assert_eq!(early.await.unwrap(), Ok(true), "read before the erase");
        assert_eq!(late.await.unwrap(), Ok(false), "asked after the erase");
        assert_eq!(g.reads.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn each_ask_after_the_reads_ended_reads_again() {
        let (g, path) = gated().await;
        let check = Arc::new(VersionCheck::new(g.clone(), path.clone(), 2));
        g.gate.add_permits(1);
        assert_eq!(check.exists().await, Ok(false), "no version 2 yet");
        g.store.put_resource(&path, b"v2", "ops").await.unwrap();
        g.gate.add_permits(1);
        assert_eq!(check.exists().await, Ok(true), "read again, not remembered");
        let other = Arc::new(VersionCheck::new(
            g.clone(),
            "default/key/other".parse().unwrap(),
            1,
        ));
        g.gate.add_permits(1);
        assert_eq!(other.exists().await, Ok(false), "no such path");
        assert_eq!(g.reads.load(Ordering::SeqCst), 3);
    }
}
