//! Rollouts across replicas (issue 19, parts 4 and 5): three real `kbs` processes on one
//! PostgreSQL database, simulated guests attested for real and spread over them. A rollout
//! started on one replica is delivered by every replica to the guests it holds, its progress
//! is the fleet-wide total whichever replica is asked, and when a replica is killed with
//! `kill -9` mid-rollout its guests come back through HAProxy to the others, which finish
//! their deliveries: every guest applies the version once and every ack is stored once.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use kbs_core::storage::{RolloutState, TargetRecord, TargetState};
use plugin_rotation::{Control, RolloutView, StartRollout};
use server::admin_client::AdminClient;
use tests::{Haproxy, Replicas, SimFleet, SimOptions, haproxy_binary, skip};

const PATH: &str = "default/key/fleet-wide";
const WAIT: Duration = Duration::from_secs(60);

async fn three(test: &str) -> Option<Replicas> {
    let db = tests::pg_database(test).await?;
    Some(Replicas::start(3, &db.url).await)
}

fn count(v: &RolloutView, s: TargetState) -> u64 {
    tests::target_count(v, s)
}

fn start(max_concurrent: u32) -> StartRollout {
    StartRollout {
        path: PATH.into(),
        selector: "app=spread".into(),
        max_concurrent: Some(max_concurrent),
        ..StartRollout::default()
    }
}

async fn watch_until(
    admin: &AdminClient,
    id: i64,
    what: &str,
    done: impl Fn(&RolloutView) -> bool,
) -> RolloutView {
    tests::watch_rollout_until(admin, id, WAIT, what, done).await
}

/// Every target row of rollout `id`, by guest.
async fn rows(admin: &AdminClient, id: i64) -> BTreeMap<String, TargetRecord> {
    admin
        .rollout(id, "limit=1000")
        .await
        .unwrap()
        .targets
        .into_iter()
        .map(|t| (t.guest_id.clone(), t))
        .collect()
}

#[tokio::test]
async fn a_rollout_started_on_one_replica_is_delivered_by_each_and_counted_fleet_wide() {
    tests::init_logging();
    let test = "a_rollout_started_on_one_replica_is_delivered_by_each_and_counted_fleet_wide";
    let Some(replicas) = three(test).await else {
        return;
    };
    replicas
        .admin(0)
        .put_resource(PATH, b"v1".to_vec())
        .await
        .unwrap();
    // Ten guests on each replica, straight to it.
    let mut fleets: Vec<SimFleet> = (0..3)
        .map(|i| {
            SimFleet::spawn(
                replicas.url(i),
                10,
                &SimOptions::new(&format!("r{i}"), ("app", "spread")),
            )
        })
        .collect();
    for f in &fleets {
        f.wait_connected(10, WAIT).await.unwrap();
    }
    assert_eq!(replicas.held(&[0, 1, 2]).await, [10, 10, 10]);

    let id = replicas
        .admin(0)
        .start_rollout(&start(4))
        .await
        .unwrap()
        .rollout
        .id;
    // Watched on another replica than the one that started it: its stream counts them all.
    let view = watch_until(&replicas.admin(2), id, "30 acks seen from replica 2", |v| {
        count(v, TargetState::Acked) == 30 && v.rollout.state == RolloutState::Completed
    })
    .await;
    assert_eq!(view.total, 30, "{view:?}");
    for i in 0..3 {
        let v = replicas.admin(i).rollout(id, "").await.unwrap().view;
        assert_eq!(count(&v, TargetState::Acked), 30, "replica {i}: {v:?}");
        assert_eq!(v.rollout.state, RolloutState::Completed, "replica {i}");
    }
    for f in &fleets {
        for g in 0..f.len() {
            assert_eq!(
                f.applied(g),
                BTreeMap::from([(1, 1)]),
                "{} applied version 1 once",
                f.guest_id(g)
            );
        }
    }
    for row in rows(&replicas.admin(1), id).await.values() {
        assert_eq!((row.attempts, row.already_held), (1, false), "{row:?}");
    }

    // Paused on replica 1: replica 0, where a newcomer connects, does not push to it.
    let paused = replicas
        .admin(1)
        .control_rollout(id, Control::Pause)
        .await
        .unwrap();
    assert_eq!(paused.rollout.state, RolloutState::Paused);
    let late = SimFleet::spawn(
        replicas.url(0),
        1,
        &SimOptions::new("late", ("app", "spread")),
    );
    late.wait_connected(1, WAIT).await.unwrap();
    watch_until(&replicas.admin(0), id, "the newcomer counted", |v| {
        count(v, TargetState::Pending) == 1
    })
    .await;
    assert_eq!(late.applied(0), BTreeMap::new(), "pushed while paused");
    // Resumed on replica 2: replica 0 delivers.
    replicas
        .admin(2)
        .control_rollout(id, Control::Resume)
        .await
        .unwrap();
    watch_until(&replicas.admin(1), id, "the newcomer acked", |v| {
        count(v, TargetState::Acked) == 31 && v.rollout.state == RolloutState::Completed
    })
    .await;
    assert_eq!(late.applied(0), BTreeMap::from([(1, 1)]));
    for f in &mut fleets {
        f.stop().await;
    }
}

#[tokio::test]
async fn kill_9_of_a_replica_mid_rollout_moves_its_guests_and_stores_each_ack_once() {
    tests::init_logging();
    let test = "kill_9_of_a_replica_mid_rollout_moves_its_guests_and_stores_each_ack_once";
    let Some(bin) = haproxy_binary() else {
        skip(test, "haproxy is not installed (apt-get install haproxy)");
        return;
    };
    let Some(mut replicas) = three(test).await else {
        return;
    };
    let lb = Haproxy::start(&bin, &replicas.addrs()).await.unwrap();
    replicas
        .admin(0)
        .put_resource(PATH, b"v1".to_vec())
        .await
        .unwrap();
    let options = SimOptions {
        // Slow enough that the kill lands while pushes are still to come on every replica.
        apply_time: Duration::from_millis(300),
        ..SimOptions::new("k", ("app", "spread"))
    };
    let mut fleet = SimFleet::spawn(&lb.url, 30, &options);
    fleet.wait_connected(30, WAIT).await.unwrap();
    let spread = replicas.held(&[0, 1, 2]).await;
    assert_eq!(spread.iter().sum::<usize>(), 30, "{spread:?}");
    assert!(
        spread[1] > 0,
        "round robin left replica 1 empty: {spread:?}"
    );

    let id = replicas
        .admin(0)
        .start_rollout(&start(2))
        .await
        .unwrap()
        .rollout
        .id;
    watch_until(&replicas.admin(0), id, "the first acks", |v| {
        count(v, TargetState::Acked) >= 3
    })
    .await;
    let before = rows(&replicas.admin(0), id).await;
    replicas.kill_9(1).await;
    let killed_at = tokio::time::Instant::now();
    let outstanding = before.values().filter(|t| !t.state.is_terminal()).count();
    assert!(outstanding > 0, "the rollout ended before the kill");

    let view = watch_until(&replicas.admin(2), id, "every ack after kill -9", |v| {
        count(v, TargetState::Acked) == 30 && v.rollout.state == RolloutState::Completed
    })
    .await;
    tracing::info!(after = ?killed_at.elapsed(), "rollout complete after the kill");
    assert_eq!(view.total, 30, "{view:?}");
    fleet.wait_connected(30, WAIT).await.unwrap();
    let spread = replicas.held(&[0, 1, 2]).await;
    assert_eq!(spread[1], 0);
    assert_eq!(spread.iter().sum::<usize>(), 30, "{spread:?}");

    for g in 0..fleet.len() {
        assert_eq!(
            fleet.applied(g),
            BTreeMap::from([(1, 1)]),
            "{} applied version 1 once",
            fleet.guest_id(g)
        );
    }
    // What was acked before the kill is unchanged: not pushed again, not written again.
    let after = rows(&replicas.admin(0), id).await;
    for (guest, row) in before.iter().filter(|(_, t)| t.state == TargetState::Acked) {
        assert_eq!(&after[guest], row, "an acked row changed across the kill");
    }
    fleet.stop().await;
}
