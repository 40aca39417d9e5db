//! [`Fleet`]: the in-memory index of every known guest, by guest id.

use std::collections::{BTreeMap, HashSet};
use std::ops::Bound;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use rpc_defs::HeldResource;
use tunnel::TunnelHandle;

use super::record::{
    ConnectionRecord, FleetPage, FleetQuery, GuestRecord, HISTORY_LEN, HeldVersion, LastProbe,
    MAX_PAGE, close_reason,
};
use crate::guest_directory::{GuestAttestation, GuestDirectory};
use crate::metrics::ObservabilityMetrics;
use crate::selector::Selector;
use crate::storage::{FleetStore, StoreError, now_ms};

/// The fleet index.
pub struct Fleet {
    guests: RwLock<BTreeMap<String, GuestRecord>>,
    dirty: Mutex<HashSet<String>>,
    /// Where the next retention scan starts (the id after the last one looked at).
    scan_from: Mutex<Option<String>>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet").field("known", &self.len()).finish()
    }
}

impl Default for Fleet {
    fn default() -> Self {
        Self::new()
    }
}

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Fleet {
    /// An empty index.
    pub fn new() -> Self {
        Self {
            guests: RwLock::new(BTreeMap::new()),
            dirty: Mutex::new(HashSet::new()),
            scan_from: Mutex::new(None),
        }
    }

    /// The index as stored: every guest is disconnected (tunnels do not survive a restart),
    /// and connections left open are closed as `kbs_restart`.
    pub async fn load(store: &dyn FleetStore) -> Result<Self, StoreError> {
        let fleet = Self::new();
        let rows = store.load_fleet().await?;
        {
            let mut map = fleet.write();
            for (id, json) in rows {
                match serde_json::from_str::<GuestRecord>(&json) {
                    Ok(mut rec) => {
                        rec.connected = false;
                        rec.labels = tunnel::labels::intern_map(&rec.labels);
                        for h in &mut rec.history {
                            if h.disconnected_at.is_none() {
                                h.disconnected_at = Some(rec.last_seen);
                                h.reason = Some("kbs_restart".into());
                            }
                        }
                        map.insert(id, rec);
                    }
                    Err(e) => {
                        tracing::warn!(guest_id = %id, error = %e, "unreadable fleet record skipped")
                    }
                }
            }
        }
        Ok(fleet)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, GuestRecord>> {
        self.guests.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, GuestRecord>> {
        self.guests.write().unwrap_or_else(|e| e.into_inner())
    }

    fn mark(&self, guest_id: &str) {
        self.dirty
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(guest_id.to_string());
    }

    /// Number of known guests.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// True when no guest is known.
    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    /// One guest's record.
    pub fn get(&self, guest_id: &str) -> Option<GuestRecord> {
        self.read().get(guest_id).cloned()
    }

    /// Insert or replace a record as is (bulk loading, benchmarks).
    pub fn insert(&self, mut record: GuestRecord) {
        record.labels = tunnel::labels::intern_map(&record.labels);
        let id = record.guest_id.clone();
        self.write().insert(id.clone(), record);
        self.mark(&id);
    }

    /// A tunnel was registered. Idempotent per tunnel epoch.
    pub fn on_connect(&self, h: &TunnelHandle, att: Option<&GuestAttestation>) {
        let now = now_ms();
        let labels = h.labels.clone();
        {
            let mut map = self.write();
            let rec = map
                .entry(h.guest_id.clone())
                .or_insert_with(|| GuestRecord {
                    guest_id: h.guest_id.clone(),
                    first_seen: now,
                    ..GuestRecord::default()
                });
            rec.labels = labels;
            rec.instance = h.instance_id.clone();
            rec.daemon_version = h.daemon_version.clone();
            rec.services = h.services.clone();
            rec.connected = true;
            rec.last_seen = now;
            if let Some(att) = att {
                apply_attestation(rec, att);
            }
            if rec.history.first().is_none_or(|c| c.epoch != h.epoch) {
                if rec.history.len() < HISTORY_LEN {
                    rec.history.reserve_exact(1);
                }
                rec.history.insert(
                    0,
                    ConnectionRecord {
                        epoch: h.epoch,
                        session_id: h.session_id.clone(),
                        connected_at: unix_ms(h.connected_at),
                        disconnected_at: None,
                        close_code: None,
                        reason: None,
                    },
                );
                rec.history.truncate(HISTORY_LEN);
            }
        }
        self.mark(&h.guest_id);
    }

    /// A tunnel ended with `code`; `still_connected` when a newer tunnel of the guest is live.
    pub fn on_disconnect(&self, guest_id: &str, epoch: u64, code: u16, still_connected: bool) {
        let now = now_ms();
        {
            let mut map = self.write();
            let Some(rec) = map.get_mut(guest_id) else {
                return;
            };
            rec.connected = still_connected;
            rec.last_seen = now;
            if let Some(c) = rec.history.iter_mut().find(|c| c.epoch == epoch) {
                c.disconnected_at = Some(now);
                c.close_code = Some(code);
                c.reason = Some(close_reason(code));
            }
        }
        self.mark(guest_id);
    }

    /// Refresh token facts (after an in-band re-attestation).
    pub fn on_attestation(&self, att: &GuestAttestation) {
        let changed = {
            let mut map = self.write();
            match map.get_mut(&att.identity.guest_id) {
                Some(rec) => {
                    let before = (rec.attested_at, rec.token_expires_at);
                    apply_attestation(rec, att);
                    before != (rec.attested_at, rec.token_expires_at)
                }
                None => false,
            }
        };
        if changed {
            self.mark(&att.identity.guest_id);
        }
    }

    /// Record a probe outcome; `held` replaces the held versions when the probe listed them.
    pub fn on_probe(&self, guest_id: &str, probe: LastProbe, held: Option<&[HeldResource]>) {
        {
            let mut map = self.write();
            let Some(rec) = map.get_mut(guest_id) else {
                return;
            };
            if probe.outcome == "ok" {
                rec.last_seen = probe.at;
            }
            if let Some(held) = held {
                rec.held = held
                    .iter()
                    .map(|r| {
                        (
                            r.uri.clone(),
                            HeldVersion {
                                version: r.version,
                                sha256: r.sha256.clone(),
                                applied_at: r.applied_at,
                            },
                        )
                    })
                    .collect();
                rec.held_at = Some(probe.at);
            }
            rec.last_probe = Some(Box::new(probe));
        }
        self.mark(guest_id);
    }

    /// A guest acknowledged holding `version` of `uri` (a rollout push): the drift query
    /// sees it at once, without waiting for the next resources probe.
    pub fn note_held(&self, guest_id: &str, uri: &str, version: u64, sha256: &str) {
        {
            let mut map = self.write();
            let Some(rec) = map.get_mut(guest_id) else {
                return;
            };
            let now = now_ms();
            rec.held.insert(
                uri.to_string(),
                HeldVersion {
                    version,
                    sha256: sha256.to_string(),
                    applied_at: now / 1000,
                },
            );
            rec.held_at.get_or_insert(now);
            rec.last_seen = now;
        }
        self.mark(guest_id);
    }

    /// Makes sure every live tunnel has a record (the hub is the truth; its events reach
    /// the index a moment later).
    pub fn ensure_live(&self, live: &[Arc<TunnelHandle>], directory: &GuestDirectory) {
        let missing: Vec<&Arc<TunnelHandle>> = {
            let map = self.read();
            live.iter()
                .filter(|h| {
                    map.get(&h.guest_id)
                        .is_none_or(|r| r.history.first().is_none_or(|c| c.epoch != h.epoch))
                })
                .collect()
        };
        for h in missing {
            self.on_connect(h, directory.get(&h.guest_id).as_deref());
        }
    }

    /// A page of guests matching `q`, by id; `is_live` tells whether a guest has a tunnel.
    pub fn query(&self, q: &FleetQuery, is_live: impl Fn(&str) -> bool) -> FleetPage {
        let limit = q.limit.clamp(1, MAX_PAGE);
        let map = self.read();
        let range = match &q.after {
            Some(after) => map.range::<String, _>((Bound::Excluded(after), Bound::Unbounded)),
            None => map.range::<String, _>(..),
        };
        let mut guests = Vec::with_capacity(limit.min(64));
        let mut more = false;
        for (id, rec) in range {
            if !q.selector.matches(&rec.labels) {
                continue;
            }
            if let Some((path, latest)) = &q.stale
                && !rec.is_stale(path, *latest)
            {
                continue;
            }
            let live = is_live(id);
            if q.connected.is_some_and(|want| want != live) {
                continue;
            }
            if guests.len() == limit {
                more = true;
                break;
            }
            let mut rec = rec.clone();
            rec.connected = live;
            guests.push(rec);
        }
        let next = more
            .then(|| guests.last().map(|g| g.guest_id.clone()))
            .flatten();
        FleetPage { guests, next }
    }

    /// Like [`Self::query`] for `connected=true`, but walking `live_ids` (the hub's guests,
    /// usually far fewer than the known ones) instead of every known guest.
    pub fn query_live(&self, q: &FleetQuery, mut live_ids: Vec<String>) -> FleetPage {
        let limit = q.limit.clamp(1, MAX_PAGE);
        live_ids.sort_unstable();
        let start = match &q.after {
            Some(after) => live_ids.partition_point(|id| id <= after),
            None => 0,
        };
        let map = self.read();
        let mut guests = Vec::with_capacity(limit.min(64));
        let mut more = false;
        for id in &live_ids[start..] {
            let Some(rec) = map.get(id) else { continue };
            if !q.selector.matches(&rec.labels) {
                continue;
            }
            if let Some((path, latest)) = &q.stale
                && !rec.is_stale(path, *latest)
            {
                continue;
            }
            if guests.len() == limit {
                more = true;
                break;
            }
            let mut rec = rec.clone();
            rec.connected = true;
            guests.push(rec);
        }
        let next = more
            .then(|| guests.last().map(|g| g.guest_id.clone()))
            .flatten();
        FleetPage { guests, next }
    }

    /// Ids of guests matching a selector (and connected-ness), by id.
    pub fn select_ids(
        &self,
        selector: &Selector,
        connected: Option<bool>,
        is_live: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        self.read()
            .iter()
            .filter(|(id, r)| {
                selector.matches(&r.labels) && connected.is_none_or(|want| want == is_live(id))
            })
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Up to `max` guests, among the next `scan` records from where the previous call
    /// stopped (wrapping around), without a tunnel and not seen since `seen_before_ms`:
    /// bounded work per call, the whole index every `len / scan` calls.
    pub fn stale_candidates(
        &self,
        seen_before_ms: u64,
        scan: usize,
        max: usize,
        is_live: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        let mut cursor = self.scan_from.lock().unwrap_or_else(|e| e.into_inner());
        let map = self.read();
        let mut out = Vec::new();
        let mut looked = 0;
        let mut wrapped = false;
        let mut last: Option<&String> = None;
        let mut range = match cursor.as_ref() {
            Some(after) => map.range::<String, _>((Bound::Excluded(after), Bound::Unbounded)),
            None => map.range::<String, _>(..),
        };
        while looked < scan.min(map.len()) && out.len() < max {
            let Some((id, rec)) = range.next() else {
                if wrapped || cursor.is_none() {
                    break;
                }
                // From the start, up to where this scan began.
                wrapped = true;
                range = map.range::<String, _>(..);
                continue;
            };
            if wrapped && cursor.as_ref().is_some_and(|c| id > c) {
                break;
            }
            looked += 1;
            last = Some(id);
            if !rec.connected && rec.last_seen < seen_before_ms && !is_live(id) {
                out.push(id.clone());
            }
        }
        *cursor = last.cloned();
        out
    }

    /// Removes those of `ids` that still have no tunnel and were not seen since
    /// `seen_before_ms` (storage has forgotten them); a guest back meanwhile is kept and
    /// written again. Returns how many went.
    pub fn forget(
        &self,
        ids: &[String],
        seen_before_ms: u64,
        is_live: impl Fn(&str) -> bool,
    ) -> usize {
        let mut back = Vec::new();
        let mut gone = 0;
        {
            let mut map = self.write();
            for id in ids {
                match map.get(id) {
                    Some(rec)
                        if rec.connected || rec.last_seen >= seen_before_ms || is_live(id) =>
                    {
                        back.push(id.clone());
                    }
                    Some(_) => {
                        map.remove(id);
                        gone += 1;
                    }
                    None => {}
                }
            }
        }
        let mut dirty = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        dirty.extend(back);
        gone
    }

    /// Changed records since the last call, as `(guest_id, JSON)`.
    pub fn take_dirty(&self) -> Vec<(String, String)> {
        let ids: Vec<String> = {
            let mut d = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
            d.drain().collect()
        };
        let map = self.read();
        ids.into_iter()
            .filter_map(|id| {
                let rec = map.get(&id)?;
                serde_json::to_string(rec).ok().map(|json| (id, json))
            })
            .collect()
    }

    /// Write changed records to storage (in transactions of 1,000).
    pub async fn flush(&self, store: &dyn FleetStore, metrics: &ObservabilityMetrics) {
        let dirty = self.take_dirty();
        // Chunks of a few hundred: each holds the batch-write turn only briefly, so a rollout
        // ack written meanwhile waits for one chunk, not the whole flush.
        for chunk in dirty.chunks(250) {
            let started = Instant::now();
            if let Err(e) = store.upsert_fleet(chunk).await {
                tracing::error!(error = %e, records = chunk.len(), "fleet write failed; will retry");
                let mut d = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
                d.extend(chunk.iter().map(|(id, _)| id.clone()));
            }
            metrics.storage("upsert_fleet", started);
        }
        metrics
            .fleet_guests
            .set(i64::try_from(self.len()).unwrap_or(i64::MAX));
    }
}

fn apply_attestation(rec: &mut GuestRecord, att: &GuestAttestation) {
    rec.tee = Some(att.tee.clone());
    rec.attested_at = Some(att.iat.saturating_mul(1000));
    rec.token_expires_at = Some(att.exp.saturating_mul(1000));
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn rec(id: &str, app: &str, held: Option<u64>) -> GuestRecord {
        GuestRecord {
            guest_id: id.into(),
            labels: Arc::new(BTreeMap::from([("app".to_string(), app.to_string())])),
            held: held
                .map(|v| {
                    BTreeMap::from([(
                        "default/key/one".to_string(),
                        HeldVersion {
                            version: v,
                            sha256: String::new(),
                            applied_at: 0,
                        },
                    )])
                })
                .unwrap_or_default(),
            held_at: held.map(|_| 1),
            ..GuestRecord::default()
        }
    }

    #[test]
    fn queries_filter_and_page() {
        let fleet = Fleet::new();
        for i in 0..10 {
            let app = if i % 2 == 0 { "db" } else { "web" };
            fleet.insert(rec(&format!("g{i}"), app, Some(i % 3)));
        }
        fleet.insert(rec("unprobed", "db", None));
        let live = |id: &str| id == "g2" || id == "g4";
        let q = FleetQuery {
            selector: Selector::parse("app=db").unwrap(),
            limit: 2,
            ..FleetQuery::default()
        };
        let p1 = fleet.query(&q, live);
        assert_eq!(
            p1.guests
                .iter()
                .map(|g| g.guest_id.as_str())
                .collect::<Vec<_>>(),
            ["g0", "g2"]
        );
        assert!(p1.guests[1].connected && !p1.guests[0].connected);
        let p2 = fleet.query(
            &FleetQuery {
                after: p1.next.clone(),
                ..q.clone()
            },
            live,
        );
        assert_eq!(p2.guests[0].guest_id, "g4");
        let mut all = Vec::new();
        let mut cursor = None;
        loop {
            let p = fleet.query(
                &FleetQuery {
                    after: cursor,
                    ..q.clone()
                },
                live,
            );
            all.extend(p.guests.into_iter().map(|g| g.guest_id));
            cursor = p.next;
            if cursor.is_none() {
                break;
            }
        }
        assert_eq!(all, ["g0", "g2", "g4", "g6", "g8", "unprobed"]);
        let connected = fleet.query(
            &FleetQuery {
                connected: Some(true),
                limit: 100,
                ..FleetQuery::default()
            },
            live,
        );
        assert_eq!(connected.guests.len(), 2);
        assert!(connected.next.is_none());
        let live_ids = vec!["g4".to_string(), "g2".to_string(), "gone".to_string()];
        let by_hub = fleet.query_live(
            &FleetQuery {
                limit: 1,
                ..FleetQuery::default()
            },
            live_ids.clone(),
        );
        assert_eq!(by_hub.guests[0].guest_id, "g2");
        let rest = fleet.query_live(
            &FleetQuery {
                limit: 1,
                after: by_hub.next,
                ..FleetQuery::default()
            },
            live_ids,
        );
        assert_eq!(rest.guests[0].guest_id, "g4");
        assert!(rest.next.is_none());
        // Latest is 2: holders of 0 and 1 are stale; the unprobed guest is unknown.
        let stale = fleet.query(
            &FleetQuery {
                stale: Some(("default/key/one".into(), 2)),
                limit: 100,
                ..FleetQuery::default()
            },
            live,
        );
        let ids: Vec<_> = stale.guests.iter().map(|g| g.guest_id.as_str()).collect();
        assert_eq!(ids, ["g0", "g1", "g3", "g4", "g6", "g7", "g9"]);
        assert_eq!(fleet.take_dirty().len(), 11);
        assert!(fleet.take_dirty().is_empty());
    }

    #[test]
    fn close_reasons_are_named() {
        assert_eq!(close_reason(4409), "superseded");
        assert_eq!(close_reason(1000), "normal");
        assert_eq!(close_reason(4413), "frame_too_large");
        assert_eq!(close_reason(4503), "going_away");
        assert_eq!(close_reason(4999), "code_4999");
    }
}
