//! The reconciler's side of several replicas on one database (`Deps::shared`): following
//! rollouts other replicas create or change, counting every replica's targets, and reading a
//! target's stored row back before a push (its guest may have been served elsewhere).

use kbs_core::storage::{Change, RolloutQuery, RolloutRecord, RolloutState, now_ms};

use super::{Engine, recount_delay};

impl Engine {
    /// A change the store announced (this replica's own writes included: following them is
    /// a no-op).
    pub(super) fn on_change(&mut self, change: &Change) {
        match change {
            Change::Rollout(id) => {
                self.remote.insert(*id);
                self.schedule_recount();
            }
            Change::Lost => {
                self.reload_all = true;
                self.schedule_recount();
            }
            _ => {}
        }
    }

    pub(super) fn schedule_recount(&mut self) {
        if self.recount_at.is_none() {
            self.recount_at = Some(tokio::time::Instant::now() + recount_delay(self.recount_cost));
        }
    }

    /// Reads back what changed since the last time: rollouts (started, paused, resumed or
    /// ended elsewhere), then the counts of those whose targets changed.
    pub(super) async fn follow_store(&mut self) {
        self.recount_at = None;
        let started = tokio::time::Instant::now();
        if std::mem::take(&mut self.reload_all) {
            match self
                .deps
                .rollouts
                .list_rollouts(&RolloutQuery {
                    in_force: true,
                    limit: 100_000,
                    ..RolloutQuery::default()
                })
                .await
            {
                Ok(in_force) => {
                    self.remote.extend(in_force.iter().map(|r| r.id));
                    self.remote.extend(self.live.keys().copied());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading the rollouts in force failed; retried");
                    self.reload_all = true;
                }
            }
        }
        let mut remote: Vec<i64> = self.remote.drain().collect();
        remote.sort_unstable();
        for id in remote {
            self.follow(id).await;
        }
        let dirty: Vec<i64> = self.dirty.drain().collect();
        for id in dirty {
            self.recount(id).await;
        }
        self.recount_cost = started.elapsed();
        if self.reload_all || !self.remote.is_empty() || !self.dirty.is_empty() {
            self.schedule_recount();
        }
    }

    /// Brings rollout `id` in line with its stored row.
    async fn follow(&mut self, id: i64) {
        let rec = match self.deps.rollouts.get_rollout(id).await {
            Ok(Some(rec)) => rec,
            Ok(None) => {
                self.live.remove(&id);
                return;
            }
            Err(e) => {
                tracing::warn!(rollout = id, error = %e, "reading a rollout back failed; retried");
                self.remote.insert(id);
                return;
            }
        };
        if !rec.state.in_force() {
            self.drop_ended(rec);
            return;
        }
        self.dirty.insert(id);
        let Some(live) = self.live.get_mut(&id) else {
            self.adopt_remote(rec).await;
            return;
        };
        if live.rec.state == rec.state {
            return;
        }
        let resumed = rec.state == RolloutState::Running;
        tracing::info!(rollout = id, state = %rec.state, "rollout changed by another replica");
        live.rec = rec;
        if resumed {
            self.queue_connected(id);
        }
        if let Some(l) = self.live.get(&id) {
            self.emit(l.event(None));
        }
        self.update_gauges();
    }

    /// A rollout another replica started: followed from now on (the older rollouts of its
    /// path it superseded end here too).
    async fn adopt_remote(&mut self, rec: RolloutRecord) {
        let id = rec.id;
        let older: Vec<i64> = self
            .live
            .values()
            .filter(|l| l.rec.path == rec.path && l.rec.id < id)
            .map(|l| l.rec.id)
            .collect();
        self.remote.extend(older);
        if let Err(e) = self.load_rollout(rec).await {
            tracing::warn!(rollout = id, error = %e, "loading a rollout started elsewhere failed; retried");
            self.remote.insert(id);
            return;
        }
        tracing::info!(
            rollout = id,
            "following a rollout started by another replica"
        );
        self.queue_connected(id);
        self.adopt_newcomers(Some(id)).await;
        if let Some(l) = self.live.get(&id) {
            self.emit(l.event(None));
        }
        self.update_gauges();
    }

    fn drop_ended(&mut self, rec: RolloutRecord) {
        let Some(mut live) = self.live.remove(&rec.id) else {
            return;
        };
        tracing::info!(rollout = rec.id, state = %rec.state, "rollout ended by another replica");
        live.loaded = None;
        live.rec = rec;
        self.emit(live.event(None));
        self.update_gauges();
    }

    /// Queues every target of `id` whose guest is connected here.
    fn queue_connected(&mut self, id: i64) {
        let now = now_ms();
        let Some(live) = self.live.get_mut(&id) else {
            return;
        };
        let ids: Vec<String> = live.targets.keys().cloned().collect();
        for g in ids {
            if self.deps.hub.get(&g).is_some() {
                live.queue(&g, now);
            }
        }
    }

    /// Counts every replica's targets of `id` and decides completed or running from them
    /// (never completed while this replica still has pushes queued or in flight).
    async fn recount(&mut self, id: i64) {
        if !self.live.contains_key(&id) {
            return;
        }
        let counts = match self.deps.rollouts.target_counts(id).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(rollout = id, error = %e, "counting targets failed; retried");
                self.dirty.insert(id);
                return;
            }
        };
        let Some(live) = self.live.get_mut(&id) else {
            return;
        };
        let changed = live.fleet.as_ref() != Some(&counts);
        live.fleet = Some(counts);
        let busy = live.in_flight() > 0 || !live.ready.is_empty();
        let next = match live.rec.state {
            RolloutState::Running if live.outstanding() == 0 && !busy => {
                Some(RolloutState::Completed)
            }
            RolloutState::Completed if live.outstanding() > 0 => Some(RolloutState::Running),
            _ => None,
        };
        if let Some(next) = next {
            if let Err(e) = self.deps.rollouts.set_rollout_state(id, next, "").await {
                tracing::error!(rollout = id, error = %e, "storing the rollout state failed");
                self.dirty.insert(id);
                return;
            }
            let Some(live) = self.live.get_mut(&id) else {
                return;
            };
            if next == RolloutState::Completed {
                live.loaded = None;
            }
            live.rec.state = next;
            live.rec.detail.clear();
            live.rec.updated_at = now_ms();
            tracing::info!(rollout = id, state = %next, "rollout state changed");
            self.transitioned(next);
            self.update_gauges();
        }
        if (changed || next.is_some())
            && let Some(l) = self.live.get(&id)
        {
            self.emit(l.event(None));
        }
    }

    /// Before pushes start: the stored rows of the targets about to be pushed. One acked,
    /// failed or denied meanwhile (its guest was served by another replica before it came
    /// here) is taken as stored and not pushed; otherwise its attempts so far count.
    pub(super) async fn read_back_ready(&mut self, id: i64) {
        let now = now_ms();
        let Some(live) = self.live.get(&id) else {
            return;
        };
        if live.rec.state != RolloutState::Running || live.loaded.is_none() {
            return;
        }
        let free = (live.rec.max_concurrent as usize).saturating_sub(live.in_flight());
        let wanted: Vec<String> = live
            .ready
            .iter()
            .filter(|g| live.due(g, now))
            .take(free.saturating_mul(2))
            .cloned()
            .collect();
        if wanted.is_empty() {
            return;
        }
        let stored = match self.deps.rollouts.targets_of(id, &wanted).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(rollout = id, error = %e, "reading targets back failed; pushing from memory");
                return;
            }
        };
        let Some(live) = self.live.get_mut(&id) else {
            return;
        };
        let mut changed = false;
        for row in stored {
            let Some(mine) = live.targets.get_mut(&row.guest_id) else {
                continue;
            };
            if live.flying.contains(&row.guest_id) {
                continue;
            }
            if row.state.is_terminal() {
                let from = mine.state;
                *mine = row;
                let to = mine.state;
                live.count(Some(from), to);
                changed = true;
            } else if row.attempts > mine.attempts {
                mine.attempts = row.attempts;
            }
        }
        if changed {
            self.dirty.insert(id);
            self.schedule_recount();
        }
    }
}
