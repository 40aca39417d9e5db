//! What a follower of one rollout is told, in order: the stream behind
//! `GET /rollouts/<id>/events` without its HTTP (README, rotation API; docs/operations.md
//! section 4.2).
//!
//! A follower that falls behind the engine's broadcast channel reads the rollout back from
//! the store; when that read fails (the database is slow or away) it is told so with an
//! `error` update and keeps following: the next change carries the cumulative counts again.
//! The stream ends only after the rollout left force, or with an `error` update when the
//! engine's channel closes, never quietly while the rollout still runs, because a quiet end
//! reads as "done" to a client waiting for the rollout (`kbsctl rollout status --wait`).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::sync::broadcast::Receiver;
use tokio::sync::broadcast::error::RecvError;

use crate::engine::RolloutEvent;
use crate::view::RolloutView;
use kbs_web::error::ApiError;

/// Queued changes folded into one `change` update at most.
const MAX_FOLDED: usize = 4096;

/// After a failed read-back with no change since, how long a follower waits before it
/// tries the read again (the rollout's last change may have been among those missed).
pub(crate) const READ_BACK_RETRY: Duration = Duration::from_secs(2);

/// One message to a follower.
#[derive(Debug)]
pub(crate) enum Update {
    /// The whole rollout with its counts: first, and after the follower fell behind.
    Snapshot(Box<RolloutView>),
    /// The newest change (counts are cumulative).
    Change(Arc<RolloutEvent>),
    /// Something the follower should know although the stream goes on (or, for
    /// `StreamClosed`, ends): named like an API error.
    Error {
        /// CamelCase name, as in an API error's `type`.
        name: &'static str,
        /// Human-readable detail.
        detail: String,
    },
}

struct Follower<R> {
    rx: Receiver<Arc<RolloutEvent>>,
    id: i64,
    read_back: R,
    pending: Option<Update>,
    finished: bool,
    /// The last read-back failed and no change came since: what the follower knows may be
    /// behind.
    stale: bool,
}

impl<R> Follower<R> {
    /// A rollout read back: what the follower knows is current again.
    fn snapshot(&mut self, v: RolloutView) -> Update {
        self.stale = false;
        self.finished = !v.rollout.state.in_force();
        Update::Snapshot(Box::new(v))
    }
}

/// The updates for rollout `id`, starting with `first` (read after `rx` subscribed, so no
/// change in between is lost); `read_back` reads the rollout again after a lag.
pub(crate) fn follow<R, F>(
    rx: Receiver<Arc<RolloutEvent>>,
    id: i64,
    first: RolloutView,
    read_back: R,
) -> impl Stream<Item = Update> + Send + 'static
where
    R: Fn() -> F + Send + 'static,
    F: Future<Output = Result<RolloutView, ApiError>> + Send,
{
    let start = Follower {
        rx,
        id,
        read_back,
        finished: !first.rollout.state.in_force(),
        stale: false,
        pending: Some(Update::Snapshot(Box::new(first))),
    };
    futures::stream::unfold(start, |mut st| async move {
        if let Some(update) = st.pending.take() {
            return Some((update, st));
        }
        if st.finished {
            return None;
        }
        let update = next(&mut st).await;
        Some((update, st))
    })
}

async fn next<R, F>(st: &mut Follower<R>) -> Update
where
    R: Fn() -> F,
    F: Future<Output = Result<RolloutView, ApiError>>,
{
    loop {
        let received = if st.stale {
            match tokio::time::timeout(READ_BACK_RETRY, st.rx.recv()).await {
                Ok(received) => received,
                Err(_) => match (st.read_back)().await {
                    Ok(v) => return st.snapshot(v),
                    // Said once already; quiet until it succeeds or a change comes.
                    Err(_) => continue,
                },
            }
        } else {
            st.rx.recv().await
        };
        match received {
            Ok(ev) if ev.rollout_id == st.id => {
                st.stale = false;
                let ev = newest_ready(&mut st.rx, st.id, ev);
                if ev.target.is_none() && !ev.state.in_force() {
                    st.finished = true;
                }
                return Update::Change(ev);
            }
            Ok(_) => continue,
            Err(RecvError::Lagged(missed)) => match (st.read_back)().await {
                Ok(v) => return st.snapshot(v),
                Err(e) => {
                    st.stale = true;
                    tracing::warn!(
                        rollout = st.id,
                        missed,
                        error = %e.detail,
                        "rollout event stream fell behind and could not read the rollout back; still following"
                    );
                    return Update::Error {
                        name: "ReadBackFailed",
                        detail: format!(
                            "fell behind by {missed} changes and could not read rollout {} back ({}: {}); the next change brings the counts again",
                            st.id, e.name, e.detail
                        ),
                    };
                }
            },
            Err(RecvError::Closed) => {
                st.finished = true;
                return Update::Error {
                    name: "StreamClosed",
                    detail: "the rotation engine stopped (the server is shutting down); ask again"
                        .into(),
                };
            }
        }
    }
}

/// The newest change of rollout `id` among `first` and those already queued behind it (a
/// change that ends the rollout is the last one, so it is never folded away).
fn newest_ready(
    rx: &mut Receiver<Arc<RolloutEvent>>,
    id: i64,
    first: Arc<RolloutEvent>,
) -> Arc<RolloutEvent> {
    let mut newest = first;
    // Bounded, so a stream under a steady flood still sends; a lag shows at the next `recv`.
    for _ in 0..MAX_FOLDED {
        match rx.try_recv() {
            Ok(ev) if ev.rollout_id == id => newest = ev,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    newest
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::http::StatusCode;
    use futures::StreamExt;
    use kbs_core::storage::{RolloutRecord, RolloutState, TargetState};
    use tokio::sync::broadcast;

    use super::*;

    const ID: i64 = 7;

    fn record(state: RolloutState) -> RolloutRecord {
        RolloutRecord {
            id: ID,
            path: "default/key/app".into(),
            version: 2,
            sha256: "00".repeat(32),
            selector: String::new(),
            max_concurrent: 64,
            max_attempts: 5,
            guest_deadline_ms: 10_000,
            deadline_at: None,
            state,
            detail: String::new(),
            superseded_by: None,
            created_at: 1,
            created_by: "ops".into(),
            updated_at: 1,
            finished_at: None,
        }
    }

    fn counts(pending: u64, acked: u64) -> BTreeMap<TargetState, u64> {
        BTreeMap::from([(TargetState::Pending, pending), (TargetState::Acked, acked)])
    }

    fn view(state: RolloutState, acked: u64) -> RolloutView {
        RolloutView::new(record(state), counts(10 - acked, acked))
    }

    fn change(id: i64, state: RolloutState, acked: u64) -> Arc<RolloutEvent> {
        Arc::new(RolloutEvent {
            rollout_id: id,
            state,
            counts: counts(10 - acked, acked),
            target: None,
        })
    }

    fn unavailable() -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "StorageUnavailable",
            "database unreachable",
        )
    }

    /// A read-back that fails `failures` times, then reads `then`; counts its calls.
    fn read_back(
        failures: usize,
        then: RolloutView,
    ) -> (
        Arc<AtomicUsize>,
        impl Fn() -> futures::future::Ready<Result<RolloutView, ApiError>> + Send + 'static,
    ) {
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&calls);
        let read = move || {
            let n = seen.fetch_add(1, Ordering::SeqCst);
            futures::future::ready(if n < failures {
                Err(unavailable())
            } else {
                Ok(then.clone())
            })
        };
        (calls, read)
    }

    fn name(update: &Update) -> String {
        match update {
            Update::Snapshot(v) => format!(
                "snapshot {} acked {}",
                v.rollout.state,
                v.counts[&TargetState::Acked]
            ),
            Update::Change(e) => {
                format!("change {} acked {}", e.state, e.counts[&TargetState::Acked])
            }
            Update::Error { name, .. } => format!("error {name}"),
        }
    }

    /// The defect this module fixes: a follower that fell behind and could not read the
    /// rollout back ended its stream as if the rollout were done.
    #[tokio::test]
    async fn a_follower_that_cannot_read_back_after_a_lag_is_told_and_keeps_following() {
        let (tx, rx) = broadcast::channel(4);
        let (calls, read) = read_back(1, view(RolloutState::Running, 0));
        let stream = follow(rx, ID, view(RolloutState::Running, 0), read);
        // Ten changes while the follower is not reading: six are lost, the last one ends it.
        for acked in 1..10 {
            tx.send(change(ID, RolloutState::Running, acked)).unwrap();
        }
        tx.send(change(ID, RolloutState::Cancelled, 9)).unwrap();
        let updates: Vec<String> = stream.map(|u| name(&u)).collect().await;
        assert_eq!(
            updates,
            [
                "snapshot running acked 0",
                "error ReadBackFailed",
                "change cancelled acked 9",
            ]
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_follower_that_falls_behind_gets_a_fresh_snapshot() {
        let (tx, rx) = broadcast::channel(2);
        let (calls, read) = read_back(0, view(RolloutState::Running, 6));
        let mut stream = Box::pin(follow(rx, ID, view(RolloutState::Running, 0), read));
        for acked in 1..7 {
            tx.send(change(ID, RolloutState::Running, acked)).unwrap();
        }
        assert_eq!(
            name(&stream.next().await.unwrap()),
            "snapshot running acked 0"
        );
        assert_eq!(
            name(&stream.next().await.unwrap()),
            "snapshot running acked 6"
        );
        // The two changes kept in the channel are folded into the newest.
        assert_eq!(
            name(&stream.next().await.unwrap()),
            "change running acked 6"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        tx.send(change(ID, RolloutState::Cancelled, 6)).unwrap();
        assert_eq!(
            name(&stream.next().await.unwrap()),
            "change cancelled acked 6"
        );
        assert!(stream.next().await.is_none(), "ends once out of force");
    }

    /// When nothing of its rollout comes after a failed read-back (the rollout's last
    /// change was among those lost), the follower reads again on its own until it can.
    #[tokio::test(start_paused = true)]
    async fn a_stale_follower_reads_back_again_until_it_can() {
        let (tx, rx) = broadcast::channel(2);
        let (calls, read) = read_back(3, view(RolloutState::Cancelled, 10));
        let stream = follow(rx, ID, view(RolloutState::Running, 0), read);
        tx.send(change(ID, RolloutState::Running, 10)).unwrap();
        tx.send(change(ID, RolloutState::Cancelled, 10)).unwrap();
        // Another rollout's changes push this one's out of the channel.
        for _ in 0..4 {
            tx.send(change(ID + 1, RolloutState::Running, 0)).unwrap();
        }
        let started = tokio::time::Instant::now();
        let updates: Vec<String> = stream.map(|u| name(&u)).collect().await;
        assert_eq!(
            updates,
            [
                "snapshot running acked 0",
                "error ReadBackFailed",
                "snapshot cancelled acked 10",
            ],
            "one error for the whole failed streak, then the rollout as it stands"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        assert_eq!(started.elapsed(), READ_BACK_RETRY * 3);
        drop(tx);
    }

    #[tokio::test]
    async fn a_follower_is_told_when_the_engine_stops() {
        let (tx, rx) = broadcast::channel::<Arc<RolloutEvent>>(4);
        let (_, read) = read_back(0, view(RolloutState::Running, 0));
        let stream = follow(rx, ID, view(RolloutState::Running, 0), read);
        drop(tx);
        let updates: Vec<String> = stream.map(|u| name(&u)).collect().await;
        assert_eq!(updates, ["snapshot running acked 0", "error StreamClosed"]);
    }

    #[tokio::test]
    async fn a_rollout_out_of_force_is_one_snapshot() {
        let (_tx, rx) = broadcast::channel::<Arc<RolloutEvent>>(4);
        let (calls, read) = read_back(0, view(RolloutState::Running, 0));
        let stream = follow(rx, ID, view(RolloutState::Expired, 3), read);
        let updates: Vec<String> = stream.map(|u| name(&u)).collect().await;
        assert_eq!(updates, ["snapshot expired acked 3"]);
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }
}
