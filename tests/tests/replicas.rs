//! Several `kbs` replicas behind a load balancer (issue 19, part 2): real processes sharing
//! one data directory and one database, started at the same moment on an empty data
//! directory; RCAR's three steps on three different replicas, with no session store and
//! no sticky sessions; then the same through a real HAProxy running deploy/haproxy.cfg, a
//! guest daemon's tunnel through it, and the key files every replica ended up with.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use guest_daemon::run::RunConfig;
use guest_daemon::tee_key::TeeKeyPair;
use tests::{
    DaemonRun, Haproxy, Replicas, admin_client, haproxy_binary, http_client, init_data,
    rcar_across, rcar_client, skip, spawn_kbs_with,
};

const SECRET_PATH: &str = "default/key/replicated";

/// Three replicas sharing a data directory and a fresh PostgreSQL database of the kit's
/// throwaway cluster (an SQLite database is one process's own); `None` after reporting the
/// skip where PostgreSQL cannot run.
async fn three(test: &str) -> Option<Replicas> {
    let db = tests::pg_database(test).await?;
    Some(Replicas::start(3, &db.url).await)
}

/// The key files of a data directory, as bytes.
fn key_files(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    ["kek.key", "token.key", "admin.key", "admin.pub"]
        .into_iter()
        .map(|name| {
            let bytes = std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
            (name.to_owned(), bytes)
        })
        .collect()
}

#[tokio::test]
async fn auth_attest_and_get_on_three_different_replicas() {
    let Some(replicas) = three("auth_attest_and_get_on_three_different_replicas").await else {
        return;
    };
    let admin = replicas.admin(0);
    admin
        .put_resource(SECRET_PATH, b"one secret, three replicas".to_vec())
        .await
        .unwrap();
    let key = TeeKeyPair::new_ec();
    let init = init_data("guest-across", &[]);
    // Every order of the three replicas: a challenge sealed by one is accepted by another,
    // a token signed by one is accepted by a third, and the resource sealed at rest by the
    // first opens on each.
    for [a, b, c] in [[0, 1, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]] {
        let urls = [replicas.url(a), replicas.url(b), replicas.url(c)];
        let plain = rcar_across(urls, &key, Some(&init), SECRET_PATH)
            .await
            .unwrap_or_else(|e| panic!("auth on {a}, attest on {b}, GET on {c}: {e:#}"));
        assert_eq!(plain, b"one secret, three replicas");
    }
    // The project's own client too, one replica per handshake.
    for i in 0..replicas.len() {
        let mut client = rcar_client(replicas.url(i), None, &key, Some(&init)).unwrap();
        let plain = client
            .get_resource(&SECRET_PATH.parse().unwrap())
            .await
            .unwrap();
        assert_eq!(&plain[..], b"one secret, three replicas");
    }
}

/// Replicas started at the same instant on an empty data directory race to create the key
/// files and the database: they must all end with the same keys (the files the first writer
/// created, never replaced), and all of them serve.
#[tokio::test]
async fn replicas_started_together_on_an_empty_data_dir_share_one_set_of_keys() {
    for round in 0..3 {
        let Some(replicas) =
            three("replicas_started_together_on_an_empty_data_dir_share_one_set_of_keys").await
        else {
            return;
        };
        let keys = key_files(&replicas.data_dir);
        // Each replica really uses those files: an admin token signed with admin.key is
        // accepted by all, and so is an RCAR token one of them signed.
        for i in 0..replicas.len() {
            admin_client(&replicas.data_dir, replicas.url(i))
                .list_guests()
                .await
                .unwrap_or_else(|e| panic!("round {round}, replica {i}: {e}"));
        }
        replicas
            .admin(1)
            .put_resource(SECRET_PATH, format!("round {round}").into_bytes())
            .await
            .unwrap();
        let key = TeeKeyPair::new_ec();
        let plain = rcar_across(
            [replicas.url(2), replicas.url(0), replicas.url(1)],
            &key,
            None,
            SECRET_PATH,
        )
        .await
        .unwrap_or_else(|e| panic!("round {round}: {e:#}"));
        assert_eq!(plain, format!("round {round}").into_bytes());
        assert_eq!(key_files(&replicas.data_dir), keys, "round {round}");
    }
}

/// Defect found here on replicas sharing one SQLite file: a replica kept the latest version
/// of each resource in a cache that only its own writes invalidate, so after a rotation
/// published on another replica it went on serving the old version. Replicas now share
/// PostgreSQL (no such cache; an SQLite database is one process's own).
#[tokio::test]
async fn a_new_version_published_on_one_replica_is_served_by_the_others() {
    let Some(replicas) =
        three("a_new_version_published_on_one_replica_is_served_by_the_others").await
    else {
        return;
    };
    replicas
        .admin(0)
        .put_resource(SECRET_PATH, b"v1".to_vec())
        .await
        .unwrap();
    let key = TeeKeyPair::new_ec();
    let get_on = |i: usize| {
        let urls = [replicas.url(i), replicas.url(i), replicas.url(i)];
        let key = key.clone();
        async move { rcar_across(urls, &key, None, SECRET_PATH).await.unwrap() }
    };
    assert_eq!(get_on(2).await, b"v1", "replica 2 reads (and caches) v1");
    replicas
        .admin(0)
        .put_resource(SECRET_PATH, b"v2".to_vec())
        .await
        .unwrap();
    assert_eq!(get_on(0).await, b"v2");
    assert_eq!(get_on(2).await, b"v2", "replica 2 still serves v1");
}

/// The replica whose admin API lists `guest` as connected, waiting up to `limit`.
async fn holder_of(replicas: &Replicas, guest: &str, limit: Duration) -> usize {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        for i in 0..replicas.len() {
            if let Ok(guests) = replicas.admin(i).list_guests().await
                && guests.iter().any(|g| g.guest_id == guest && g.connected)
            {
                return i;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{guest} is connected to no replica after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn haproxy_or_skip(test: &str) -> Option<std::path::PathBuf> {
    let bin = haproxy_binary();
    if bin.is_none() {
        skip(test, "haproxy is not installed (apt-get install haproxy)");
    }
    bin
}

#[tokio::test]
async fn rcar_through_haproxy_round_robin_lands_each_step_on_another_replica() {
    let Some(bin) = haproxy_or_skip("rcar_through_haproxy") else {
        return;
    };
    let Some(replicas) =
        three("rcar_through_haproxy_round_robin_lands_each_step_on_another_replica").await
    else {
        return;
    };
    let lb = Haproxy::start(&bin, &replicas.addrs()).await.unwrap();
    let admin = admin_client(&replicas.data_dir, &lb.url);
    admin
        .put_resource(SECRET_PATH, b"behind the balancer".to_vec())
        .await
        .unwrap();
    let key = TeeKeyPair::new_ec();
    let init = init_data("guest-lb", &[]);
    for round in 0..4 {
        let before = lb.servers().await.unwrap();
        let mut client = rcar_client(&lb.url, None, &key, Some(&init)).unwrap();
        let plain = client
            .get_resource(&SECRET_PATH.parse().unwrap())
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(&plain[..], b"behind the balancer");
        // auth, attest and GET: three requests, round robin over three servers, so each
        // step went to another replica.
        let after = lb.servers().await.unwrap();
        assert_eq!(after.len(), 3, "{after:?}");
        for (name, (total, status)) in &after {
            assert_eq!(status, "UP", "{name}: {after:?}");
            let sent = total - before[name].0;
            assert_eq!(
                sent, 1,
                "{name} got {sent} of the 3 requests: {before:?} -> {after:?}"
            );
        }
    }
}

#[tokio::test]
async fn a_guest_tunnel_through_haproxy_stays_up_and_answers() {
    let Some(bin) = haproxy_or_skip("a_guest_tunnel_through_haproxy") else {
        return;
    };
    let Some(replicas) = three("a_guest_tunnel_through_haproxy_stays_up_and_answers").await else {
        return;
    };
    let lb = Haproxy::start(&bin, &replicas.addrs()).await.unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut config = RunConfig::new(&lb.url, state.path());
    config.init_data = Some(init_data("guest-ws", &[("app", "lb")]));
    let mut daemon = DaemonRun::spawn(config);
    daemon.connected().await;
    // The tunnel is on one replica; the admin API of that replica reaches the guest
    // through it (cross-replica forwarding is not part of this test).
    let holder = holder_of(&replicas, "guest-ws", Duration::from_secs(10)).await;
    let rtt = replicas.admin(holder).ping_guest("guest-ws").await.unwrap();
    assert!(rtt < 5_000, "{rtt}");
    daemon.stop().await;
}

/// Replicas with a generated self-signed TLS pair, started together on an empty data
/// directory: one pair is written (under the start-up lock), and every replica serves the
/// certificate that is in the file, so one CA file works for all of them.
#[tokio::test]
async fn replicas_started_together_with_tls_self_signed_serve_one_certificate() {
    for round in 0..3 {
        let Some(setup) = tests::pg_kbs_setup(
            "replicas_started_together_with_tls_self_signed_serve_one_certificate",
            "[http.tls]\nself_signed = true\n",
        )
        .await
        else {
            return;
        };
        let (data_dir, config) = (&setup.data_dir, &setup.config);
        let procs = futures::future::join_all(
            (0..3).map(|_| spawn_kbs_with("127.0.0.1:0", data_dir, Some(config), &[])),
        )
        .await;
        let http = http_client(Some(&data_dir.join("tls/cert.pem")));
        for p in &procs {
            assert!(p.announced.starts_with("https://"), "{}", p.announced);
            let r = http
                .get(format!("{}/healthz", p.announced))
                .send()
                .await
                .unwrap_or_else(|e| panic!("round {round}, {}: {e}", p.announced));
            assert!(r.status().is_success());
        }
    }
}

/// An SQLite database is one process's own (what a KBS keeps in memory from it is right only
/// while nobody else writes): a second `kbs` on the same data directory and SQLite file
/// refuses to start, saying why and what to use instead, and the first keeps serving.
#[tokio::test]
async fn a_second_kbs_on_the_same_sqlite_database_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let first = tests::spawn_kbs(&data_dir, None).await;
    let second = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(tests::kbs_binary())
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data_dir)
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the second kbs gives up within its owner-lock wait")
    .unwrap();
    assert!(!second.status.success(), "the second kbs must not serve");
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains("in use by another kbs") && err.contains("PostgreSQL"),
        "{err}"
    );
    let health = http_client(None)
        .get(format!("{}/healthz", first.announced))
        .send()
        .await
        .unwrap();
    assert!(health.status().is_success());
}
