//! Following a rollout the way `kbsctl rollout status --watch` does: its event stream on one
//! replica, until the counts it streams say enough.

use std::time::Duration;

use kbs_core::storage::TargetState;
use plugin_rotation::RolloutView;
use server::admin_client::{AdminClient, RolloutUpdate};

/// Follows rollout `id`'s event stream on `admin`'s KBS until `done` holds for the counts
/// it streams, for at most `within` (fails naming `what`); then the stored view.
pub async fn watch_rollout_until(
    admin: &AdminClient,
    id: i64,
    within: Duration,
    what: &str,
    done: impl Fn(&RolloutView) -> bool,
) -> RolloutView {
    let mut watch = admin
        .watch_rollout(id)
        .await
        .expect("open the event stream");
    let mut view: Option<RolloutView> = None;
    let result = tokio::time::timeout(within, async {
        loop {
            match watch.next().await.expect("read the event stream") {
                Some(RolloutUpdate::Snapshot(v)) => view = Some(v),
                Some(RolloutUpdate::Change(e)) => {
                    if let Some(v) = view.as_mut() {
                        v.apply(&e);
                    }
                }
                Some(RolloutUpdate::Error { name, detail }) => {
                    eprintln!("rollout {id} event stream: {name}: {detail}");
                }
                None => break,
            }
            if view.as_ref().is_some_and(&done) {
                break;
            }
        }
    })
    .await;
    assert!(result.is_ok(), "timed out waiting for {what}: {view:?}");
    admin.rollout(id, "").await.expect("rollout status").view
}

/// Targets of the view in state `s`.
pub fn target_count(v: &RolloutView, s: TargetState) -> u64 {
    v.count(s)
}
