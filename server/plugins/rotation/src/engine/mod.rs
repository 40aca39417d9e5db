//! [`run`]: the rollout reconciler. One task owns the in-memory view of every rollout in
//! force (loaded from storage at start, so a restart resumes where the last run stopped),
//! hands pushes to delivery tasks up to each rollout's `max_concurrent`, and reacts to
//! guests connecting (offline targets and newcomers matching a selector), retries coming
//! due, admin controls and deadlines. Storage is written before anything is reported, and a
//! push is idempotent by path + version on the guest, so replaying one after a crash is safe.
//!
//! Several replicas on one database (`Deps::shared`): every replica follows every rollout in
//! force (a rollout created, paused or ended elsewhere reaches it through the store's change
//! feed) and pushes to the guests whose tunnels it holds; before a push it reads the
//! target's stored row, so a guest that moved here from another replica is neither pushed a
//! version it already acked there nor counted twice. Counts, and whether a rollout is
//! completed, come from the store (every replica's acks), read at most every
//! [`RECOUNT_DELAY`] while targets change. See `docs/architecture.md`, "Several replicas".

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tunnel::TunnelHandle;

use kbs_core::selector::Selector;
use kbs_core::storage::{
    Change, RolloutQuery, RolloutRecord, RolloutState, StoreError, TargetRecord, TargetState,
    now_ms,
};

mod commands;
mod live;
mod shared;
#[cfg(test)]
mod tests;

pub use commands::{Command, Control, ControlError, RolloutEvent};
use live::Live;

use crate::Deps;
use crate::deliver::{self, LoadedVersion, PushOutcome};
use crate::version_check::VersionCheck;
use crate::writer::TargetWriter;

/// How often the reconciler compares rollouts with the hub's live tunnels (tunnel events can
/// be missed when the broadcast lags).
pub const RECONCILE_EVERY: Duration = Duration::from_secs(2);
/// Guests last seen longer ago than this are not targeted by new rollouts while offline.
pub const KNOWN_GUEST_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Guest sightings written per batch.
const NOTE_BATCH: usize = 512;
/// With a shared store: how long changes gather before counts and rollout states are read
/// back from it (one read per rollout however many targets changed meanwhile), at least.
pub const RECOUNT_DELAY: Duration = Duration::from_millis(50);
/// With a shared store, the gap between two read-backs is at least this many times what the
/// last one took, so each replica keeps the database busy counting a large rollout's targets
/// a tenth of the time at most (docs/operations.md, section 4.2).
pub const RECOUNT_GAP_PER_COST: u32 = 10;

/// The delay before the next read-back, given what the last one took: [`RECOUNT_DELAY`] for
/// a cheap one, [`RECOUNT_GAP_PER_COST`] times its cost for a dear one, [`RECONCILE_EVERY`]
/// at most.
pub fn recount_delay(last_cost: Duration) -> Duration {
    last_cost
        .saturating_mul(RECOUNT_GAP_PER_COST)
        .clamp(RECOUNT_DELAY, RECONCILE_EVERY)
}

struct Done {
    rollout_id: i64,
    row: TargetRecord,
    outcome: PushOutcome,
    elapsed: Duration,
}

struct Engine {
    deps: Deps,
    events: broadcast::Sender<Arc<RolloutEvent>>,
    writer: TargetWriter,
    live: BTreeMap<i64, Live>,
    done_tx: mpsc::UnboundedSender<Done>,
    retries: BinaryHeap<Reverse<(u64, i64, String)>>,
    /// Connected guests whose sighting is stored or queued in `to_note` (so a reconcile pass
    /// does not write it again); pruned to the live tunnels at each full pass.
    noted: HashSet<String>,
    to_note: Vec<(String, tunnel::Labels)>,
    /// Shared store: rollouts another replica may have changed (read back at `recount_at`).
    remote: HashSet<i64>,
    /// Shared store: rollouts whose targets changed (counted again at `recount_at`).
    dirty: HashSet<i64>,
    /// Shared store: notifications may have been missed; every rollout is read back.
    reload_all: bool,
    recount_at: Option<tokio::time::Instant>,
    /// Shared store: what the last read-back took (see [`recount_delay`]).
    recount_cost: Duration,
}

/// Runs the reconciler until `stop` is cancelled or `commands` closes. Deliveries in flight
/// at that moment finish on their own and store their outcome.
pub async fn run(
    deps: Deps,
    events: broadcast::Sender<Arc<RolloutEvent>>,
    commands: &mut mpsc::Receiver<Command>,
    stop: CancellationToken,
) {
    // Unbounded by type, bounded by construction: each delivery task sends exactly one `Done`,
    // and at most `max_concurrent` deliveries per rollout are in flight.
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let mut engine = Engine {
        writer: TargetWriter::spawn(deps.rollouts.clone()),
        deps,
        events,
        live: BTreeMap::new(),
        done_tx,
        retries: BinaryHeap::new(),
        noted: HashSet::new(),
        to_note: Vec::new(),
        remote: HashSet::new(),
        dirty: HashSet::new(),
        reload_all: false,
        recount_at: None,
        recount_cost: Duration::ZERO,
    };
    // Subscribed before the load, so a rollout created meanwhile is not missed.
    let mut changes = engine.deps.changes.subscribe();
    let mut feed_open = engine.deps.shared;
    if let Err(e) = engine.load().await {
        tracing::error!(error = %e, "loading rollouts failed; rotation reconciler not started");
        return;
    }
    engine.reconcile().await;
    engine.dispatch().await;
    let mut tick = tokio::time::interval(RECONCILE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let next_retry = engine.retries.peek().map(|Reverse((at, _, _))| *at);
        let retry_due = async {
            match next_retry {
                Some(at) => {
                    let wait = Duration::from_millis(at.saturating_sub(now_ms()));
                    tokio::time::sleep(wait).await;
                }
                None => std::future::pending().await,
            }
        };
        let recount_at = engine.recount_at;
        let recount_due = async {
            match recount_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            change = changes.recv(), if feed_open => match change {
                Ok(change) => engine.on_change(&change),
                Err(RecvError::Lagged(_)) => engine.on_change(&Change::Lost),
                Err(RecvError::Closed) => feed_open = false,
            },
            Some(done) = done_rx.recv() => {
                engine.on_done(done).await;
                while let Ok(more) = done_rx.try_recv() {
                    engine.on_done(more).await;
                }
            }
            cmd = commands.recv() => match cmd {
                Some(cmd) => engine.on_command(cmd).await,
                None => break,
            },
            _ = tick.tick() => engine.reconcile().await,
            () = retry_due => engine.release_due_retries(),
            () = recount_due => engine.follow_store().await,
        }
        engine.dispatch().await;
        // Batches form under a connect storm; an idle reconciler writes sightings at once.
        if engine.to_note.len() >= NOTE_BATCH || (!engine.to_note.is_empty() && commands.is_empty())
        {
            engine.flush_notes().await;
        }
    }
    engine.flush_notes().await;
}

impl Engine {
    fn emit(&self, event: Arc<RolloutEvent>) {
        let _ = self.events.send(event);
    }

    fn update_gauges(&self) {
        for state in [
            RolloutState::Running,
            RolloutState::Completed,
            RolloutState::Paused,
        ] {
            let n = self.live.values().filter(|l| l.rec.state == state).count();
            self.deps
                .metrics
                .rollouts
                .get_or_create(&vec![("state", state.as_str().to_string())])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    fn transitioned(&self, state: RolloutState) {
        self.deps.metrics.transition(state.as_str());
    }

    /// Resume from storage: every rollout in force, its targets; pushes that were in flight
    /// when the last run stopped go back to pending (the guest answers `already_held` if the
    /// push had landed).
    async fn load(&mut self) -> Result<(), StoreError> {
        let rollouts = self
            .deps
            .rollouts
            .list_rollouts(&RolloutQuery {
                in_force: true,
                limit: 100_000,
                ..RolloutQuery::default()
            })
            .await?;
        for rec in rollouts {
            let id = rec.id;
            self.load_rollout(rec).await?;
            tracing::info!(rollout = id, "rollout resumed from storage");
        }
        self.update_gauges();
        Ok(())
    }

    async fn load_rollout(&mut self, rec: RolloutRecord) -> Result<(), StoreError> {
        let selector = match Selector::parse(&rec.selector) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(rollout = rec.id, error = %e, "stored selector does not parse; rollout skipped");
                return Ok(());
            }
        };
        let mut live = Live::new(rec, selector);
        let now = now_ms();
        let mut after: Option<String> = None;
        let mut requeued = Vec::new();
        loop {
            let page = self
                .deps
                .rollouts
                .list_targets(live.rec.id, None, after.as_deref(), 5000)
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.guest_id.clone());
            for mut t in page {
                // A `delivering` row of a shared store may be another replica's push in
                // flight: left as it is (and pushed again only if its guest comes here).
                if t.state == TargetState::Delivering && !self.deps.shared {
                    t.state = TargetState::Pending;
                    t.updated_at = now;
                    requeued.push(t.clone());
                }
                if t.state == TargetState::Pending && t.next_attempt_at > now {
                    self.retries.push(Reverse((
                        t.next_attempt_at,
                        live.rec.id,
                        t.guest_id.clone(),
                    )));
                }
                live.count(None, t.state);
                live.targets.insert(t.guest_id.clone(), t);
            }
        }
        for t in requeued {
            self.writer.write_behind(t).await;
        }
        let id = live.rec.id;
        self.live.insert(id, live);
        self.refresh_state(id).await;
        Ok(())
    }

    /// Loads a rollout just created (its `Created` command).
    async fn load_new(&mut self, id: i64) {
        match self.deps.rollouts.get_rollout(id).await {
            Ok(Some(rec)) => {
                self.transitioned(RolloutState::Running);
                if let Err(e) = self.load_rollout(rec).await {
                    tracing::error!(rollout = id, error = %e, "loading a new rollout failed; the next start resumes it");
                }
            }
            Ok(None) => tracing::error!(rollout = id, "created rollout not found"),
            Err(e) => tracing::error!(rollout = id, error = %e, "reading a new rollout failed"),
        }
    }

    async fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Created { id, superseded } => {
                for old in superseded {
                    if let Some(mut l) = self.live.remove(&old) {
                        l.rec.state = RolloutState::Superseded;
                        l.rec.superseded_by = Some(id);
                        self.transitioned(RolloutState::Superseded);
                        self.emit(l.event(None));
                    }
                }
                // Already live when the reconciler's start-up load saw the new row before this
                // command arrived: reloading it would forget the pushes in flight and send
                // them again.
                if !self.live.contains_key(&id) {
                    self.load_new(id).await;
                }
                let now = now_ms();
                if let Some(l) = self.live.get_mut(&id) {
                    let ids: Vec<String> = l.targets.keys().cloned().collect();
                    for g in ids {
                        if self.deps.hub.get(&g).is_some() {
                            l.queue(&g, now);
                        }
                    }
                }
                if self.live.contains_key(&id) {
                    self.adopt_newcomers(Some(id)).await;
                }
                if let Some(l) = self.live.get(&id) {
                    self.emit(l.event(None));
                }
                self.update_gauges();
            }
            Command::Control {
                id,
                action,
                actor,
                reply,
            } => {
                let result = self.control(id, action, &actor).await;
                self.update_gauges();
                let _ = reply.send(result);
            }
            Command::ResourceDeleted {
                path,
                detail,
                reply,
            } => {
                let cancelled = self.cancel_path(&path, &detail).await;
                self.update_gauges();
                let _ = reply.send(cancelled);
            }
            Command::Connected(handle) => self.on_connected(&handle).await,
            Command::Resync => self.reconcile().await,
        }
    }

    async fn control(
        &mut self,
        id: i64,
        action: Control,
        actor: &str,
    ) -> Result<RolloutRecord, ControlError> {
        let Some(live) = self.live.get_mut(&id) else {
            return match self.deps.rollouts.get_rollout(id).await {
                Ok(Some(rec)) => Err(ControlError::Finished(id, rec.state)),
                Ok(None) => Err(ControlError::NotFound(id)),
                Err(e) => Err(e.into()),
            };
        };
        let target = match action {
            Control::Pause => RolloutState::Paused,
            Control::Resume if live.rec.state == RolloutState::Paused => {
                if live.outstanding() > 0 {
                    RolloutState::Running
                } else {
                    RolloutState::Completed
                }
            }
            Control::Resume => live.rec.state,
            Control::Cancel => RolloutState::Cancelled,
        };
        if target == live.rec.state {
            return Ok(live.rec.clone());
        }
        let detail = format!("{} by {actor}", action.as_str());
        self.deps
            .rollouts
            .set_rollout_state(id, target, &detail)
            .await?;
        live.rec.state = target;
        live.rec.detail = detail;
        live.rec.updated_at = now_ms();
        if !target.in_force() {
            live.rec.finished_at = Some(live.rec.updated_at);
        }
        let rec = live.rec.clone();
        let event = live.event(None);
        if target == RolloutState::Cancelled {
            self.live.remove(&id);
        } else if target == RolloutState::Running {
            let now = now_ms();
            if let Some(l) = self.live.get_mut(&id) {
                let ids: Vec<String> = l.targets.keys().cloned().collect();
                for g in ids {
                    if self.deps.hub.get(&g).is_some() {
                        l.queue(&g, now);
                    }
                }
            }
        }
        self.transitioned(target);
        self.emit(event);
        Ok(rec)
    }

    /// Cancel every rollout in force of `path` (its resource was deleted): nothing more is
    /// pushed, the plaintext is dropped, targets still pending fail with `detail`.
    async fn cancel_path(&mut self, path: &str, detail: &str) -> Vec<i64> {
        let ids: Vec<i64> = self
            .live
            .values()
            .filter(|l| l.rec.path == path)
            .map(|l| l.rec.id)
            .collect();
        let mut cancelled = Vec::with_capacity(ids.len());
        for id in ids {
            if let Err(e) = self
                .deps
                .rollouts
                .set_rollout_state(id, RolloutState::Cancelled, detail)
                .await
            {
                tracing::error!(rollout = id, error = %e, "storing the cancellation failed");
                continue;
            }
            let Some(mut live) = self.live.remove(&id) else {
                continue;
            };
            live.loaded = None;
            let now = now_ms();
            let mut failed = Vec::new();
            for t in live.targets.values_mut() {
                if t.state == TargetState::Pending {
                    t.state = TargetState::Failed;
                    t.reason = detail.to_string();
                    t.updated_at = now;
                    failed.push(t.clone());
                }
            }
            for t in failed {
                live.count(Some(TargetState::Pending), TargetState::Failed);
                self.writer.write_behind(t).await;
            }
            live.rec.state = RolloutState::Cancelled;
            live.rec.detail = detail.to_string();
            live.rec.updated_at = now;
            live.rec.finished_at = Some(now);
            tracing::info!(
                rollout = id,
                path,
                "rollout cancelled: its resource was deleted"
            );
            self.transitioned(RolloutState::Cancelled);
            self.emit(live.event(None));
            cancelled.push(id);
        }
        cancelled
    }

    /// Completed when nothing is outstanding, running again when something is. With a
    /// shared store the decision waits for the next count of every replica's targets.
    async fn refresh_state(&mut self, id: i64) {
        if self.deps.shared {
            self.dirty.insert(id);
            self.schedule_recount();
            return;
        }
        let Some(live) = self.live.get_mut(&id) else {
            return;
        };
        let next = match live.rec.state {
            RolloutState::Running if live.outstanding() == 0 => RolloutState::Completed,
            RolloutState::Completed if live.outstanding() > 0 => RolloutState::Running,
            _ => return,
        };
        if next == RolloutState::Completed {
            // Keep the plaintext in memory only while it is needed.
            live.loaded = None;
        }
        if let Err(e) = self.deps.rollouts.set_rollout_state(id, next, "").await {
            tracing::error!(rollout = id, error = %e, "storing the rollout state failed");
            return;
        }
        live.rec.state = next;
        live.rec.detail.clear();
        live.rec.updated_at = now_ms();
        let event = live.event(None);
        tracing::info!(rollout = id, state = %next, "rollout state changed");
        self.transitioned(next);
        self.emit(event);
        self.update_gauges();
    }

    async fn on_connected(&mut self, handle: &TunnelHandle) {
        // Labels may differ from the last sighting: note it again.
        self.noted.remove(&handle.guest_id);
        self.note(handle);
        let now = now_ms();
        let ids: Vec<i64> = self.live.keys().copied().collect();
        for id in ids {
            self.consider(id, handle, now).await;
        }
    }

    fn note(&mut self, handle: &TunnelHandle) {
        if self.noted.insert(handle.guest_id.clone()) {
            self.to_note
                .push((handle.guest_id.clone(), handle.labels.clone()));
            self.count_noted();
        }
    }

    fn count_noted(&self) {
        self.deps
            .metrics
            .noted_guests
            .set(i64::try_from(self.noted.len()).unwrap_or(i64::MAX));
    }

    /// A connected guest and one rollout: queue it if it is a pending target, add it if it
    /// is a newcomer the selector picks.
    async fn consider(&mut self, id: i64, handle: &TunnelHandle, now: u64) {
        let Some(live) = self.live.get_mut(&id) else {
            return;
        };
        if live.targets.contains_key(&handle.guest_id) {
            live.queue(&handle.guest_id, now);
            return;
        }
        if !live.selector.matches(&handle.labels) {
            return;
        }
        let t = TargetRecord::pending(id, &handle.guest_id);
        live.count(None, TargetState::Pending);
        live.targets.insert(t.guest_id.clone(), t.clone());
        live.queue(&handle.guest_id, now);
        let event = live.event(Some(t.clone()));
        self.writer.write_behind(t).await;
        self.emit(event);
        self.refresh_state(id).await;
    }

    /// Every live tunnel against `only` (or every rollout in force).
    async fn adopt_newcomers(&mut self, only: Option<i64>) {
        let now = now_ms();
        let handles = self.deps.hub.list();
        let ids: Vec<i64> = match only {
            Some(id) => vec![id],
            None => self.live.keys().copied().collect(),
        };
        for h in &handles {
            self.note(h);
            for &id in &ids {
                self.consider(id, h, now).await;
            }
        }
        if only.is_none() {
            // Guest ids are per sandbox: remembering every id ever seen is a leak under churn.
            // A guest that comes back is noted again by its `Connected`; its targets live in
            // the rollouts, not here.
            let connected: HashSet<&str> = handles.iter().map(|h| h.guest_id.as_str()).collect();
            self.noted.retain(|g| connected.contains(g.as_str()));
            self.count_noted();
        }
    }

    /// The periodic pass: deadlines, then every live tunnel (missed events), then notes.
    async fn reconcile(&mut self) {
        let now = now_ms();
        let expired: Vec<i64> = self
            .live
            .values()
            .filter(|l| l.rec.deadline_at.is_some_and(|d| d <= now))
            .map(|l| l.rec.id)
            .collect();
        for id in expired {
            self.expire(id).await;
        }
        self.adopt_newcomers(None).await;
        self.flush_notes().await;
        if self.deps.shared {
            // Other replicas' acks announce themselves; a missed announcement is caught here.
            self.dirty.extend(self.live.keys().copied());
            self.schedule_recount();
        }
        let pruned = self.deps.directory.prune(&self.deps.hub, now / 1000);
        if pruned > 0 {
            tracing::debug!(pruned, "guest directory pruned");
        }
    }

    async fn expire(&mut self, id: i64) {
        let Some(mut live) = self.live.remove(&id) else {
            return;
        };
        let now = now_ms();
        let mut failed = Vec::new();
        for t in live.targets.values_mut() {
            if t.state == TargetState::Pending {
                t.state = TargetState::Failed;
                t.reason = format!("rollout deadline exceeded ({})", t.reason).replace(" ()", "");
                t.updated_at = now;
                failed.push(t.clone());
            }
        }
        for t in &failed {
            live.count(Some(TargetState::Pending), TargetState::Failed);
            self.deps.metrics.push("failed");
            self.writer.write_behind(t.clone()).await;
        }
        let detail = "overall deadline exceeded";
        if let Err(e) = self
            .deps
            .rollouts
            .set_rollout_state(id, RolloutState::Expired, detail)
            .await
        {
            tracing::error!(rollout = id, error = %e, "storing the rollout expiry failed");
        }
        live.rec.state = RolloutState::Expired;
        live.rec.detail = detail.into();
        tracing::info!(rollout = id, failed = failed.len(), "rollout expired");
        self.transitioned(RolloutState::Expired);
        self.emit(live.event(None));
        self.update_gauges();
    }

    fn release_due_retries(&mut self) {
        let now = now_ms();
        while let Some(Reverse((at, _, _))) = self.retries.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((_, id, guest))) = self.retries.pop() else {
                break;
            };
            if self.deps.hub.get(&guest).is_some()
                && let Some(l) = self.live.get_mut(&id)
            {
                l.queue(&guest, now);
            }
        }
    }

    async fn flush_notes(&mut self) {
        if self.to_note.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.to_note);
        if let Err(e) = self.deps.rollouts.note_rotation_guests(&batch).await {
            tracing::warn!(error = %e, guests = batch.len(), "noting rotation guests failed");
            for (g, _) in &batch {
                self.noted.remove(g);
            }
            self.count_noted();
        }
    }

    async fn on_done(&mut self, d: Done) {
        let outcome = d.outcome;
        self.deps.metrics.push(outcome.as_str());
        if matches!(outcome, PushOutcome::Acked | PushOutcome::AlreadyHeld) {
            self.deps.metrics.delivery.observe(d.elapsed.as_secs_f64());
        }
        let Some(live) = self.live.get_mut(&d.rollout_id) else {
            // Superseded, cancelled or expired meanwhile: the row is stored, nothing to drive.
            return;
        };
        live.flying.remove(&d.row.guest_id);
        let guest = d.row.guest_id.clone();
        let previous = live
            .targets
            .insert(guest.clone(), d.row.clone())
            .map(|t| t.state);
        live.count(previous, d.row.state);
        match outcome {
            PushOutcome::Retry => {
                self.retries
                    .push(Reverse((d.row.next_attempt_at, d.rollout_id, guest)));
            }
            // Back already (a quick reconnect): no Connected event will come for this push.
            PushOutcome::Disconnected if self.deps.hub.get(&guest).is_some() => {
                live.queue(&guest, now_ms());
            }
            _ => {}
        }
        let event = live.event(Some(d.row));
        self.emit(event);
        self.refresh_state(d.rollout_id).await;
    }

    /// Start pushes wherever a running rollout has a free slot and a ready target.
    async fn dispatch(&mut self) {
        let ids: Vec<i64> = self.live.keys().copied().collect();
        for id in ids {
            let wants_plaintext = self.live.get(&id).is_some_and(|l| {
                l.rec.state == RolloutState::Running
                    && !l.ready.is_empty()
                    && l.loaded.is_none()
                    && l.in_flight() < l.rec.max_concurrent as usize
            });
            if wants_plaintext && !self.load_plaintext(id).await {
                continue;
            }
            self.dispatch_one(id).await;
        }
    }

    /// Loads the rollout's version; false when it cannot be delivered now.
    async fn load_plaintext(&mut self, id: i64) -> bool {
        let Some(live) = self.live.get(&id) else {
            return false;
        };
        let path = match live
            .rec
            .path
            .parse::<kbs_core::resource_path::ResourcePath>()
        {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(rollout = id, error = %e, "stored rollout path is invalid");
                return false;
            }
        };
        let version = live.rec.version;
        match self.deps.resources.get_resource(&path, Some(version)).await {
            Ok(Some(r)) => {
                if let Some(l) = self.live.get_mut(&id) {
                    l.loaded = Some(Arc::new(LoadedVersion {
                        plaintext: r.data,
                        check: VersionCheck::new(
                            self.deps.resources.clone(),
                            path.clone(),
                            version,
                        ),
                    }));
                }
                true
            }
            Ok(None) => {
                self.fail_outstanding(id, &format!("version {version} of {path} no longer exists"))
                    .await;
                false
            }
            Err(e) => {
                tracing::error!(rollout = id, error = %e, "reading the rollout's resource failed; retried later");
                false
            }
        }
    }

    async fn fail_outstanding(&mut self, id: i64, reason: &str) {
        let Some(live) = self.live.get_mut(&id) else {
            return;
        };
        let now = now_ms();
        let mut failed = Vec::new();
        for t in live.targets.values_mut() {
            if t.state == TargetState::Pending {
                t.state = TargetState::Failed;
                t.reason = reason.to_string();
                t.updated_at = now;
                failed.push(t.clone());
            }
        }
        live.ready.clear();
        live.queued.clear();
        for t in failed {
            live.count(Some(TargetState::Pending), TargetState::Failed);
            let event = live.event(Some(t.clone()));
            let _ = self.events.send(event);
            self.writer.write_behind(t).await;
        }
        self.refresh_state(id).await;
    }

    async fn dispatch_one(&mut self, id: i64) {
        if self.deps.shared {
            self.read_back_ready(id).await;
        }
        let now = now_ms();
        let Some(live) = self.live.get_mut(&id) else {
            return;
        };
        let Some(loaded) = live.loaded.clone() else {
            return;
        };
        while live.rec.state == RolloutState::Running
            && live.in_flight() < live.rec.max_concurrent as usize
        {
            let Some(guest) = live.ready.pop_front() else {
                break;
            };
            live.queued.remove(&guest);
            let Some(t) = live.targets.get_mut(&guest) else {
                continue;
            };
            let open = t.state == TargetState::Pending
                || (t.state == TargetState::Delivering && !live.flying.contains(&guest));
            if !open || t.next_attempt_at > now {
                continue;
            }
            let Some(handle) = self.deps.hub.get(&guest) else {
                continue;
            };
            let Some(attested) = self.deps.directory.get(&guest) else {
                tracing::debug!(guest_id = %guest, "connected guest missing from the directory");
                continue;
            };
            let from = t.state;
            t.state = TargetState::Delivering;
            t.updated_at = now;
            let row = t.clone();
            live.count(Some(from), TargetState::Delivering);
            live.flying.insert(guest.clone());
            let _ = self.events.send(live.event(Some(row.clone())));

            let deps = self.deps.clone();
            let rec = live.rec.clone();
            let writer = self.writer.clone();
            let done = self.done_tx.clone();
            let loaded = loaded.clone();
            tokio::spawn(async move {
                let start = Instant::now();
                writer.write_behind(row.clone()).await;
                let (row, outcome) =
                    deliver::push(&deps, &rec, row, handle, attested, loaded).await;
                if let Err(e) = writer.write(row.clone()).await {
                    tracing::error!(rollout = rec.id, guest_id = %row.guest_id, error = %e, "target outcome not stored");
                }
                tracing::debug!(rollout = rec.id, guest_id = %row.guest_id, outcome = outcome.as_str(), attempts = row.attempts, reason = %row.reason, "push done");
                let _ = done.send(Done {
                    rollout_id: rec.id,
                    row,
                    outcome,
                    elapsed: start.elapsed(),
                });
            });
        }
    }
}
