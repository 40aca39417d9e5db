//! Draining a replica (issue 19, part 5): three real `kbs` processes on one PostgreSQL
//! database behind HAProxy (`deploy/haproxy.cfg`), simulated guests attested for real and
//! spread over them. One replica is stopped the way an orchestrator stops it (SIGTERM): it
//! stops accepting, sends its tunnels GoAway, and exits; its guests reconnect through the
//! load balancer to the others without a single failed attestation or tunnel attempt, and
//! each is then reachable through any replica (admin calls are forwarded to the new owner).

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tests::{Haproxy, Replicas, SimFleet, SimOptions, haproxy_binary, skip};

const GUESTS: usize = 30;
const WAIT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn a_drained_replica_s_guests_move_to_the_others_without_an_error() {
    tests::init_logging();
    let test = "a_drained_replica_s_guests_move_to_the_others_without_an_error";
    let Some(bin) = haproxy_binary() else {
        skip(test, "haproxy is not installed (apt-get install haproxy)");
        return;
    };
    let Some(db) = tests::pg_database(test).await else {
        return;
    };
    let mut replicas = Replicas::start(3, &db.url).await;
    let lb = Haproxy::start(&bin, &replicas.addrs()).await.unwrap();
    let mut fleet = SimFleet::spawn(&lb.url, GUESTS, &SimOptions::new("d", ("app", "drain")));
    fleet.wait_connected(GUESTS, WAIT).await.unwrap();

    // Round robin spreads them; the drained replica must hold some for the test to mean
    // anything.
    let before = replicas.held(&[0, 1, 2]).await;
    assert_eq!(before.iter().sum::<usize>(), GUESTS, "{before:?}");
    assert!(before[0] > 0, "replica 0 holds no guest: {before:?}");
    let (opened, errors) = (fleet.opened(), fleet.errors());
    assert_eq!(fleet.went_away(), 0);

    let status = replicas.terminate(0, WAIT).await.unwrap();
    assert!(
        status.success(),
        "the drained replica exits cleanly: {status}"
    );

    // Every guest it held opened a new tunnel on another replica.
    let started = tokio::time::Instant::now();
    loop {
        let now = replicas.held(&[1, 2]).await;
        if now.iter().sum::<usize>() == GUESTS && fleet.connected() == GUESTS {
            break;
        }
        assert!(
            started.elapsed() < WAIT,
            "guests not back on replicas 1 and 2: {now:?}, {} connected",
            fleet.connected()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::info!(after = ?started.elapsed(), moved = before[0], "drained guests moved");
    assert!(
        fleet.opened() >= opened + before[0],
        "{} tunnels opened, {opened} before the drain, {} guests to move",
        fleet.opened(),
        before[0]
    );
    // Told to go, not cut off: each tunnel of the drained replica ended with GoAway.
    assert_eq!(
        fleet.went_away(),
        before[0],
        "tunnels of the drained replica that ended with GoAway"
    );
    assert_eq!(
        fleet.errors(),
        errors,
        "a guest saw a failed attestation or tunnel attempt during the drain"
    );

    // Each guest answers through either remaining replica: the registry names its new owner.
    for i in 0..GUESTS {
        let guest = fleet.guest_id(i);
        for r in [1, 2] {
            replicas
                .admin(r)
                .ping_guest(&guest)
                .await
                .unwrap_or_else(|e| panic!("ping {guest} through replica {r}: {e}"));
        }
    }
    fleet.stop().await;
}
