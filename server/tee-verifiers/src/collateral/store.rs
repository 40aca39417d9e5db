//! The collateral cache: in memory, optionally backed by a persistent cache, refreshed
//! before nextUpdate through a fetcher.
//!
//! Rules, per item:
//! - fresh (now before `next_update - refresh_before`): served from memory, no fetch;
//! - due for refresh, or missing: one fetch per key at a time (concurrent callers wait for
//!   it); on success the new copy replaces the old one (memory and persistent cache);
//! - the fetch fails but a copy is still valid (now before `next_update`): that copy is
//!   served and no new fetch is tried for `retry_after`, so an outage costs one failed
//!   request per key per `retry_after`, not one per verification;
//! - the fetch fails and no valid copy exists: [`VerifyError::CollateralUnavailable`].
//!
//! [`CollateralStore::run_refresher`] does the same ahead of time: it wakes when the first
//! cached item becomes due (`next_update - refresh_before`) and refreshes it, so no
//! attestation waits for a fetch; a failed refresh keeps the still-valid copy and is retried
//! with exponential backoff (`retry_after`, doubling, at most [`MAX_BACKOFF_FACTOR`] times it).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use dcap_qvl::QuoteCollateralV3;

use super::{
    Collateral, CollateralItem, CollateralKey, CollateralRequest, ItemBody, PckCa, SnpCollateral,
    TdxCollateral,
};
use crate::VerifyError;

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The service did not answer, or answered with an error status.
    #[error("{0}")]
    Unreachable(String),
    /// The service has no such item (HTTP 404, no file).
    #[error("not found: {0}")]
    NotFound(String),
    /// The answer could not be used.
    #[error("invalid answer: {0}")]
    Invalid(String),
}

/// Where collateral comes from (HTTP services, files).
#[async_trait]
pub trait CollateralFetcher: Send + Sync {
    /// Fetches one item.
    async fn fetch(&self, key: &CollateralKey) -> Result<CollateralItem, FetchError>;

    /// Whether the source changed since the last call (files replaced): the refresher then
    /// fetches every cached item again at once. Services are asked only when items are due.
    async fn source_changed(&self) -> bool {
        false
    }
}

/// A persistent store for fetched items (the KBS backs it with its database), so a restart
/// does not refetch everything and an outage at start-up is survivable.
#[async_trait]
pub trait PersistentCache: Send + Sync {
    /// The bytes stored under `name`, if any.
    async fn load(&self, name: &str) -> Option<Vec<u8>>;
    /// Stores bytes under `name`; failures are the cache's to log.
    async fn store(&self, name: &str, bytes: Vec<u8>);
}

/// Cache timing.
#[derive(Debug, Clone, Copy)]
pub struct StoreConfig {
    /// Refresh an item this long before its nextUpdate.
    pub refresh_before: Duration,
    /// After a failed refresh with a still-valid copy, wait this long before trying again
    /// (doubling after each further failure, up to [`MAX_BACKOFF_FACTOR`] times this).
    pub retry_after: Duration,
    /// How often the refresher asks the fetcher whether its source changed (offline files).
    pub source_poll: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            refresh_before: Duration::from_secs(3600),
            retry_after: Duration::from_secs(60),
            source_poll: Duration::from_secs(60),
        }
    }
}

#[derive(Clone)]
struct Entry {
    item: Arc<CollateralItem>,
    /// No refresh attempt before this time (after a failed one).
    retry_not_before: i64,
    /// Failed refreshes in a row (sets the backoff).
    failures: u32,
}

impl Entry {
    fn new(item: Arc<CollateralItem>) -> Self {
        Entry {
            item,
            retry_not_before: i64::MIN,
            failures: 0,
        }
    }
}

/// How long (seconds) a source that publishes no AMD CRL is believed before it is asked
/// again.
pub const ABSENT_CRL_RECHECK: i64 = 3600;

/// The backoff between failed refreshes of one item grows up to this many `retry_after`s.
pub const MAX_BACKOFF_FACTOR: u32 = 32;

/// Wall time for [`CollateralStore::run_refresher`]: unix seconds, and a way to wait for a
/// given one (tests drive it by hand; the KBS's fixed test clock never reaches a later time).
#[async_trait]
pub trait RefreshClock: Send + Sync {
    /// Now, in unix seconds.
    fn now(&self) -> i64;
    /// Returns at `unix` or later (it may return early; the caller checks again).
    async fn sleep_until(&self, unix: i64);
}

/// The system clock; sleeps are cut into hours so a clock step or a suspend is noticed.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

#[async_trait]
impl RefreshClock for SystemClock {
    fn now(&self) -> i64 {
        crate::unix(std::time::SystemTime::now())
    }

    async fn sleep_until(&self, unix: i64) {
        let wait = unix.saturating_sub(self.now()).clamp(0, 3600);
        tokio::time::sleep(Duration::from_secs(wait as u64)).await;
    }
}

type Assembled = (Vec<Arc<CollateralItem>>, Arc<TdxCollateral>);

/// The collateral cache and its fetcher.
pub struct CollateralStore {
    fetcher: Arc<dyn CollateralFetcher>,
    persistent: Option<Arc<dyn PersistentCache>>,
    config: StoreConfig,
    items: RwLock<HashMap<CollateralKey, Entry>>,
    fetch_locks: Mutex<HashMap<CollateralKey, Arc<tokio::sync::Mutex<()>>>>,
    assembled: RwLock<HashMap<(String, PckCa), Assembled>>,
    /// Woken when an item is added or replaced, so the refresher recomputes its schedule.
    changed: tokio::sync::Notify,
}

impl std::fmt::Debug for CollateralStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CollateralStore")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

impl CollateralStore {
    /// A store over `fetcher`.
    pub fn new(fetcher: Arc<dyn CollateralFetcher>, config: StoreConfig) -> Self {
        CollateralStore {
            fetcher,
            persistent: None,
            config,
            items: RwLock::new(HashMap::new()),
            fetch_locks: Mutex::new(HashMap::new()),
            assembled: RwLock::new(HashMap::new()),
            changed: tokio::sync::Notify::new(),
        }
    }

    /// Adds a persistent cache behind the in-memory one.
    pub fn with_persistent_cache(mut self, cache: Arc<dyn PersistentCache>) -> Self {
        self.persistent = Some(cache);
        self
    }

    fn fresh(&self, entry: &Entry, now: i64) -> bool {
        now < entry.item.next_update - secs(self.config.refresh_before)
            || (now < entry.retry_not_before && now <= entry.item.next_update)
    }

    fn cached(&self, key: &CollateralKey) -> Option<Entry> {
        self.items.read().ok()?.get(key).cloned()
    }

    fn put(&self, key: &CollateralKey, entry: Entry) {
        if let Ok(mut items) = self.items.write() {
            items.insert(key.clone(), entry);
        }
        self.changed.notify_one();
    }

    /// Fetches every cached item again and replaces those that differ (the source changed).
    async fn reload_all(&self, now: i64) {
        for (key, _) in self.schedule() {
            let lock = match self.fetch_locks.lock() {
                Ok(mut locks) => locks.entry(key.clone()).or_default().clone(),
                Err(_) => return,
            };
            let _guard = lock.lock().await;
            match self.fetcher.fetch(&key).await {
                Ok(item) => {
                    let item = self.settle(item, now);
                    // A still-absent CRL differs only in its recheck time: not a change.
                    let changed = |e: &Entry| {
                        e.item.body != item.body
                            || (e.item.next_update != item.next_update
                                && item.body != ItemBody::SnpCrlAbsent)
                    };
                    if self.cached(&key).is_some_and(|e| changed(&e)) {
                        tracing::info!(key = %key.name(), next_update = item.next_update,
                            "collateral replaced from its changed source");
                        if let Some(p) = &self.persistent
                            && let Ok(bytes) = serde_json::to_vec(&item)
                        {
                            p.store(&key.name(), bytes).await;
                        }
                        let mut entry = Entry::new(Arc::new(item));
                        if !self.fresh(&entry, now) {
                            entry.retry_not_before =
                                now.saturating_add(secs(self.config.retry_after));
                        }
                        self.put(&key, entry);
                    }
                }
                Err(e) => tracing::warn!(key = %key.name(), error = %e,
                    "changed collateral source no longer has this item; keeping the cached copy"),
            }
        }
    }

    /// A fetched item as cached: "no CRL published" is believed for [`ABSENT_CRL_RECHECK`]
    /// past the refresh margin, then the source is asked again.
    fn settle(&self, mut item: CollateralItem, now: i64) -> CollateralItem {
        if item.body == ItemBody::SnpCrlAbsent {
            item.next_update = now
                .saturating_add(ABSENT_CRL_RECHECK)
                .saturating_add(secs(self.config.refresh_before));
        }
        item
    }

    /// When `entry` is next due for a refresh.
    fn due(&self, entry: &Entry) -> i64 {
        let ahead = entry
            .item
            .next_update
            .saturating_sub(secs(self.config.refresh_before));
        ahead.max(entry.retry_not_before)
    }

    /// The cached keys, each with the time it is next due for a refresh.
    fn schedule(&self) -> Vec<(CollateralKey, i64)> {
        self.items
            .read()
            .map(|items| {
                items
                    .iter()
                    .map(|(k, e)| (k.clone(), self.due(e)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Refreshes every cached item before its nextUpdate (see the module documentation)
    /// until `shutdown` completes. Items enter the cache through attestations (or the
    /// persistent cache); this task keeps them fresh from then on.
    pub async fn run_refresher(
        self: Arc<Self>,
        clock: Arc<dyn RefreshClock>,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) {
        tokio::pin!(shutdown);
        let poll = secs(self.config.source_poll).max(1);
        let mut next_poll = clock.now().saturating_add(poll);
        loop {
            // Registered before the schedule is read, so an item added meanwhile wakes us.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let now = clock.now();
            if now >= next_poll {
                next_poll = now.saturating_add(poll);
                if self.fetcher.source_changed().await {
                    self.reload_all(now).await;
                }
            }
            let schedule = self.schedule();
            for (key, due) in &schedule {
                if *due <= now {
                    match self.item(key, now).await {
                        Ok(_) => {}
                        Err(e) => tracing::warn!(key = %key.name(), error = %e,
                            "background collateral refresh failed"),
                    }
                }
            }
            let next = schedule
                .iter()
                .filter(|(_, due)| *due > now)
                .map(|(_, due)| *due)
                .chain(std::iter::once(next_poll))
                .min();
            if schedule.iter().any(|(_, due)| *due <= now) {
                // Refreshed (or failed) this round: recompute with the new dates at once.
                continue;
            }
            tokio::select! {
                () = &mut shutdown => return,
                () = &mut changed => {}
                () = async {
                    match next {
                        Some(at) => clock.sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
        }
    }

    /// The item for `key` at `now` (unix seconds), fetching or refreshing it as needed.
    pub async fn item(
        &self,
        key: &CollateralKey,
        now: i64,
    ) -> Result<Arc<CollateralItem>, VerifyError> {
        if let Some(e) = self.cached(key).filter(|e| self.fresh(e, now)) {
            return Ok(e.item);
        }
        let lock = {
            let mut locks = self
                .fetch_locks
                .lock()
                .map_err(|_| VerifyError::CollateralUnavailable("cache lock poisoned".into()))?;
            locks.entry(key.clone()).or_default().clone()
        };
        let _guard = lock.lock().await;
        // Another caller may have refreshed it while this one waited.
        let mut current = self.cached(key);
        if let Some(e) = current.as_ref().filter(|e| self.fresh(e, now)) {
            return Ok(e.item.clone());
        }
        let name = key.name();
        if current.is_none()
            && let Some(p) = &self.persistent
            && let Some(item) = p
                .load(&name)
                .await
                .and_then(|b| serde_json::from_slice::<CollateralItem>(&b).ok())
        {
            let entry = Entry::new(Arc::new(item));
            self.put(key, entry.clone());
            if self.fresh(&entry, now) {
                return Ok(entry.item);
            }
            current = Some(entry);
        }
        match self.fetcher.fetch(key).await {
            Ok(item) => {
                let item = self.settle(item, now);
                tracing::debug!(key = %name, next_update = item.next_update, "collateral fetched");
                if let Some(p) = &self.persistent
                    && let Ok(bytes) = serde_json::to_vec(&item)
                {
                    p.store(&name, bytes).await;
                }
                let item = Arc::new(item);
                let mut entry = Entry::new(item.clone());
                if !self.fresh(&entry, now) {
                    // The service still serves a copy inside the refresh margin (it has not
                    // published the next one yet): ask again after `retry_after`, not at
                    // every verification.
                    entry.retry_not_before = now.saturating_add(secs(self.config.retry_after));
                }
                self.put(key, entry);
                Ok(item)
            }
            Err(err) => {
                let mut e = match current {
                    Some(e) => e,
                    None => {
                        return Err(VerifyError::CollateralUnavailable(format!("{name}: {err}")));
                    }
                };
                let factor = 1u32
                    .checked_shl(e.failures)
                    .unwrap_or(u32::MAX)
                    .min(MAX_BACKOFF_FACTOR);
                let backoff = secs(self.config.retry_after).saturating_mul(i64::from(factor));
                e.retry_not_before = now.saturating_add(backoff);
                e.failures = e.failures.saturating_add(1);
                self.put(key, e.clone());
                if now <= e.item.next_update {
                    tracing::warn!(key = %name, error = %err, retry_in_secs = backoff,
                        "collateral refresh failed, serving the cached copy");
                    Ok(e.item)
                } else {
                    Err(VerifyError::CollateralUnavailable(format!(
                        "{name}: {err} (the cached copy expired at {})",
                        e.item.next_update
                    )))
                }
            }
        }
    }

    /// AMD's CRL of `generation`, `None` when the source publishes none.
    async fn snp_crl(
        &self,
        generation: crate::request::Generation,
        now: i64,
    ) -> Result<Option<Arc<Vec<u8>>>, VerifyError> {
        match &self
            .item(&CollateralKey::SnpCrl(generation), now)
            .await?
            .body
        {
            ItemBody::SnpCrl { crl } => Ok(Some(Arc::new(crl.clone()))),
            ItemBody::SnpCrlAbsent => Ok(None),
            _ => Err(VerifyError::CollateralInvalid("not an AMD CRL".into())),
        }
    }

    /// The collateral `request` asks for, at `now` (unix seconds).
    pub async fn collateral(
        &self,
        request: &CollateralRequest,
        now: i64,
    ) -> Result<Collateral, VerifyError> {
        match request {
            CollateralRequest::None => Ok(Collateral::None),
            CollateralRequest::SnpVcek(id) => {
                let key = CollateralKey::Vcek(id.clone());
                let der = match &self.item(&key, now).await?.body {
                    ItemBody::Vcek { der } => der.clone(),
                    _ => return Err(VerifyError::CollateralInvalid("not a VCEK".into())),
                };
                // Version 2 reports do not say their generation: the VCEK's productName does.
                let generation = match id.generation {
                    Some(g) => Some(g),
                    None => crate::snp::vek::product_generation(&der)?,
                };
                let crl = match generation {
                    Some(g) => self.snp_crl(g, now).await?,
                    None => None,
                };
                Ok(Collateral::Snp(SnpCollateral {
                    vcek: Some(Arc::new(der)),
                    crl,
                }))
            }
            CollateralRequest::SnpCrl(g) => Ok(Collateral::Snp(SnpCollateral {
                vcek: None,
                crl: self.snp_crl(*g, now).await?,
            })),
            CollateralRequest::Tdx { fmspc, ca } => {
                let mut items = Vec::with_capacity(4);
                for key in request.keys() {
                    items.push(self.item(&key, now).await?);
                }
                let id = (fmspc.clone(), *ca);
                if let Some((parts, tdx)) =
                    self.assembled.read().ok().and_then(|a| a.get(&id).cloned())
                    && parts.iter().zip(&items).all(|(a, b)| Arc::ptr_eq(a, b))
                {
                    return Ok(Collateral::Tdx(tdx));
                }
                let tdx = Arc::new(assemble(&items)?);
                if let Ok(mut a) = self.assembled.write() {
                    a.insert(id, (items, tdx.clone()));
                }
                Ok(Collateral::Tdx(tdx))
            }
        }
    }
}

/// Builds `dcap-qvl`'s collateral from PCK CRL, root CA CRL, TCB info and QE identity items.
fn assemble(items: &[Arc<CollateralItem>]) -> Result<TdxCollateral, VerifyError> {
    let wrong = || VerifyError::CollateralInvalid("unexpected collateral item".into());
    let [pck, root, tcb, qe] = items else {
        return Err(wrong());
    };
    let (
        ItemBody::PckCrl {
            crl: pck_crl,
            issuer_chain: pck_chain,
        },
        ItemBody::RootCaCrl { crl: root_crl },
    ) = (&pck.body, &root.body)
    else {
        return Err(wrong());
    };
    let (
        ItemBody::TcbInfo {
            tcb_info,
            signature: tcb_sig,
            issuer_chain: tcb_chain,
        },
        ItemBody::QeIdentity {
            qe_identity,
            signature: qe_sig,
            issuer_chain: qe_chain,
        },
    ) = (&tcb.body, &qe.body)
    else {
        return Err(wrong());
    };
    TdxCollateral::new(QuoteCollateralV3 {
        pck_crl_issuer_chain: pck_chain.clone(),
        root_ca_crl: root_crl.clone(),
        pck_crl: pck_crl.clone(),
        tcb_info_issuer_chain: tcb_chain.clone(),
        tcb_info: tcb_info.clone(),
        tcb_info_signature: tcb_sig.clone(),
        qe_identity_issuer_chain: qe_chain.clone(),
        qe_identity: qe_identity.clone(),
        qe_identity_signature: qe_sig.clone(),
        pck_certificate_chain: None,
    })
}

/// Splits a `QuoteCollateralV3` into cache items (offline bundles, tests).
pub(crate) fn split(
    c: &QuoteCollateralV3,
) -> Result<Vec<(CollateralKey, CollateralItem)>, VerifyError> {
    let tcb: serde_json::Value = serde_json::from_str(&c.tcb_info)
        .map_err(|e| VerifyError::CollateralInvalid(format!("TCB info: {e}")))?;
    let fmspc = tcb["fmspc"]
        .as_str()
        .ok_or_else(|| VerifyError::CollateralInvalid("TCB info has no fmspc".into()))?
        .to_ascii_lowercase();
    let ca = pck_crl_ca(&c.pck_crl)?;
    Ok(vec![
        (
            CollateralKey::PckCrl(ca),
            CollateralItem::new(ItemBody::PckCrl {
                crl: c.pck_crl.clone(),
                issuer_chain: c.pck_crl_issuer_chain.clone(),
            })?,
        ),
        (
            CollateralKey::RootCaCrl,
            CollateralItem::new(ItemBody::RootCaCrl {
                crl: c.root_ca_crl.clone(),
            })?,
        ),
        (
            CollateralKey::TdxTcbInfo(fmspc),
            CollateralItem::new(ItemBody::TcbInfo {
                tcb_info: c.tcb_info.clone(),
                signature: c.tcb_info_signature.clone(),
                issuer_chain: c.tcb_info_issuer_chain.clone(),
            })?,
        ),
        (
            CollateralKey::TdxQeIdentity,
            CollateralItem::new(ItemBody::QeIdentity {
                qe_identity: c.qe_identity.clone(),
                signature: c.qe_identity_signature.clone(),
                issuer_chain: c.qe_identity_issuer_chain.clone(),
            })?,
        ),
    ])
}

/// Which PCK CA issued a PCK CRL (from its issuer CN).
pub(crate) fn pck_crl_ca(der: &[u8]) -> Result<PckCa, VerifyError> {
    let (_, crl) = x509_parser::parse_x509_crl(der)
        .map_err(|e| VerifyError::CollateralInvalid(format!("PCK CRL: {e}")))?;
    let cn = crl
        .issuer()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .unwrap_or_default();
    if cn.contains("Platform") {
        Ok(PckCa::Platform)
    } else if cn.contains("Processor") {
        Ok(PckCa::Processor)
    } else {
        Err(VerifyError::CollateralInvalid(format!(
            "PCK CRL issuer {cn:?} is not a PCK CA"
        )))
    }
}
