//! The guest daemon's failover between several KBS URLs (`--kbs-url` repeated), for sites
//! without a load balancer (issue 19, part 6): two real, separate `kbs` processes (their
//! own keys and databases, so the daemon must attest again at the second), the first
//! killed with SIGKILL under a connected guest, or never reachable at all; and the test
//! kit's simulated guests (`SimFleet::spawn_across`), which the load tools rely on to fail
//! over the same way.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use guest_daemon::run::RunConfig;
use tests::{
    ALLOW_SAMPLE, DaemonRun, SimFleet, SimOptions, Spawned, admin_client, built_binary, init_data,
    spawn_kbs,
};

/// How long a guest may take to be back on the second KBS after the first died.
const FAILOVER_WITHIN: Duration = Duration::from_secs(10);

/// A `kbs` process with its own data directory under `dir`, allowing the sample TEE.
async fn kbs(dir: &Path, name: &str) -> Spawned {
    let policy = dir.join(format!("{name}.rego"));
    std::fs::write(&policy, ALLOW_SAMPLE).unwrap();
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "[policy]\ninitial_policy_file = {:?}\n",
            policy.display().to_string()
        ),
    )
    .unwrap();
    spawn_kbs(&dir.join(name), Some(&config)).await
}

/// Whether the KBS at `url` (data directory `data_dir`) lists `guest` with a live tunnel.
async fn holds(data_dir: &Path, url: &str, guest: &str) -> bool {
    admin_client(data_dir, url)
        .list_guests()
        .await
        .is_ok_and(|guests| guests.iter().any(|g| g.guest_id == guest && g.connected))
}

/// Waits up to `limit` until the KBS at `url` holds `guest`'s tunnel; returns how long it took.
async fn until_held(data_dir: &Path, url: &str, guest: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    while !holds(data_dir, url, guest).await {
        assert!(
            start.elapsed() < limit,
            "{guest} is not back on {url} after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

fn dead_url() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("http://127.0.0.1:{port}")
}

#[tokio::test]
async fn the_real_daemon_moves_to_the_second_kbs_when_the_first_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = kbs(dir.path(), "first").await;
    let second = kbs(dir.path(), "second").await;
    let (first_data, second_data) = (dir.path().join("first"), dir.path().join("second"));
    let init = dir.path().join("init.toml");
    std::fs::write(&init, init_data("failover-1", &[])).unwrap();

    let mut daemon = tokio::process::Command::new(built_binary("guest-daemon", "guest-daemon"))
        .arg("run")
        .args([
            "--kbs-url",
            &first.announced,
            "--kbs-url",
            &second.announced,
        ])
        .args([
            "--tee",
            "sample",
            "--no-splitapi",
            "--no-cdh",
            "--init-data",
        ])
        .arg(&init)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    // The first URL works: the daemon stays there (the second never sees it).
    until_held(&first_data, &first.announced, "failover-1", FAILOVER_WITHIN).await;
    assert!(!holds(&second_data, &second.announced, "failover-1").await);

    first.kill_9().await;
    let took = until_held(
        &second_data,
        &second.announced,
        "failover-1",
        FAILOVER_WITHIN,
    )
    .await;
    println!("guest back on the second KBS {took:?} after the first was killed");
    let rtt = admin_client(&second_data, &second.announced)
        .ping_guest("failover-1")
        .await
        .unwrap();
    assert!(rtt < 5_000, "{rtt}");
    assert!(
        daemon.try_wait().unwrap().is_none(),
        "the daemon keeps running"
    );
    daemon.start_kill().unwrap();
    let _ = daemon.wait().await;
}

#[tokio::test]
async fn an_unreachable_first_url_does_not_stop_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let second = kbs(dir.path(), "second").await;
    let mut config = RunConfig::new(dead_url(), dir.path().join("state"));
    config.failover_urls = vec![second.announced.clone()];
    config.init_data = Some(init_data("failover-2", &[]));
    config.reconnect.initial = Duration::from_millis(100);
    config.reconnect.max = Duration::from_secs(1);
    let mut daemon = DaemonRun::spawn(config);
    daemon.connected().await;
    until_held(
        &dir.path().join("second"),
        &second.announced,
        "failover-2",
        FAILOVER_WITHIN,
    )
    .await;
    daemon.stop().await;
}

#[tokio::test]
async fn simulated_guests_fail_over_like_the_daemon_when_their_kbs_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = kbs(dir.path(), "first").await;
    let second = kbs(dir.path(), "second").await;
    let urls = [first.announced.clone(), second.announced.clone()];
    let mut options = SimOptions::new("sim-failover", ("app", "failover"));
    options.reconnect.initial = Duration::from_millis(100);
    options.reconnect.max = Duration::from_secs(1);
    // Guests 0, 2, 4 start on the first KBS, 1, 3, 5 on the second.
    let mut fleet = SimFleet::spawn_across(&urls, 6, &options);
    fleet.wait_connected(6, FAILOVER_WITHIN).await.unwrap();
    let second_data = dir.path().join("second");
    for g in [0, 2, 4] {
        assert!(!holds(&second_data, &second.announced, &fleet.guest_id(g)).await);
    }

    first.kill_9().await;
    // Separate KBSes, separate keys: the first's token is refused at the second, so the
    // guests must attest again there, as the daemon does.
    for g in [0, 2, 4] {
        until_held(
            &second_data,
            &second.announced,
            &fleet.guest_id(g),
            FAILOVER_WITHIN,
        )
        .await;
    }
    fleet.wait_connected(6, FAILOVER_WITHIN).await.unwrap();
    assert_eq!(fleet.opened(), 9, "three guests moved, the others stayed");
    fleet.stop().await;
}
