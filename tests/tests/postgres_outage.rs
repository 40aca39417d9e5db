#![allow(clippy::unwrap_used)]
//! Real `kbs` replicas whose PostgreSQL really goes away (the kit's cluster stopped and
//! started again on the same port and data directory, under the running processes): they
//! keep serving what they hold (tunnels, RCAR, the resource versions they last read),
//! refuse writes with 503 `StorageUnavailable`, and catch up when the database is back. A
//! `kbs` started while the database is down waits for it, answering `/healthz`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use guest_daemon::tee_key::TeeKeyPair;
use kbs_core::admin_key::AdminKeyPair;
use plugin_rotation::StartRollout;
use reqwest::StatusCode;
use server::admin_client::AdminClient;
use tests::{PgCluster, StubGuest, TunnelGuest, eventually_within};
use tokio::process::Command;
use tunnel::GuestTunnelConfig;

const CACHED: &str = "default/key/cached";
const UNREAD: &str = "default/key/never-read";
const DENY_ALL: &str = "package policy\n\nimport rego.v1\n\ndefault allow := false\n";
/// Bounds on what the database's return takes to be noticed (the feed's backoff is 2 s).
const WITHIN: Duration = Duration::from_secs(30);

fn admin(url: &str, data_dir: &Path) -> AdminClient {
    let key = AdminKeyPair::load(&data_dir.join("admin.key")).unwrap();
    AdminClient::new(url, key, None).unwrap()
}

/// RCAR (auth, attest) and the resource GET of `path` on `url`: the plaintext, or the error.
async fn fetch(url: &str, path: &str) -> Result<Vec<u8>, String> {
    let mut client = tests::rcar_client(url, None, &TeeKeyPair::new_ec(), None).unwrap();
    client
        .get_resource(&path.parse().unwrap())
        .await
        .map(|z| z.to_vec())
        .map_err(|e| format!("{e:#}"))
}

async fn readyz(url: &str) -> Option<(u16, serde_json::Value)> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let r = http.get(format!("{url}/readyz")).send().await.ok()?;
    Some((r.status().as_u16(), r.json().await.ok()?))
}

async fn healthz(url: &str) -> u16 {
    reqwest::get(format!("{url}/healthz"))
        .await
        .map_or(0, |r| r.status().as_u16())
}

/// A data directory and a config naming `db_url`, a short pool timeout (so a refused write
/// answers in a second), and `extra`.
fn setup(db_url: &str, extra: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kbs.toml");
    std::fs::write(
        &config,
        format!("[storage]\ndatabase_url = \"{db_url}\"\nacquire_timeout_ms = 1000\n{extra}"),
    )
    .unwrap();
    let data_dir = dir.path().join("data");
    (dir, data_dir, config)
}

fn assert_storage_unavailable(what: &str, e: server::admin_client::ClientError) {
    assert_eq!(
        tests::api_err(e),
        (StatusCode::SERVICE_UNAVAILABLE, "StorageUnavailable".into()),
        "{what} while the database is away"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_that_lose_the_database_keep_serving_refuse_writes_and_catch_up() {
    let test = "replicas_that_lose_the_database_keep_serving_refuse_writes_and_catch_up";
    let Some((cluster, db)) = tests::pg_own_cluster(test).await else {
        return;
    };
    let (_dir, data_dir, config) = setup(&db.url, "");
    let a = tests::spawn_kbs(&data_dir, Some(&config)).await;
    let b = tests::spawn_kbs(&data_dir, Some(&config)).await;
    let (url_a, url_b) = (a.announced.clone(), b.announced.clone());
    let (admin_a, admin_b) = (admin(&url_a, &data_dir), admin(&url_b, &data_dir));
    admin_a.set_policy(tests::ALLOW_SAMPLE).await.unwrap();
    admin_a.put_resource(CACHED, b"v1".to_vec()).await.unwrap();
    admin_a.put_resource(UNREAD, b"u1".to_vec()).await.unwrap();
    eventually_within(WITHIN, "B to follow A's policy", || async {
        fetch(&url_b, CACHED).await.is_ok_and(|v| v == b"v1")
    })
    .await;
    assert_eq!(fetch(&url_a, CACHED).await.unwrap(), b"v1");
    // Version 2 stored through A: A's copy of version 1 is dropped by the write, B's by the
    // change feed, and B's next read is of version 2.
    admin_a.put_resource(CACHED, b"v2".to_vec()).await.unwrap();
    eventually_within(WITHIN, "B to read version 2", || async {
        fetch(&url_b, CACHED).await.is_ok_and(|v| v == b"v2")
    })
    .await;

    // A guest on a tunnel to B.
    let key = TeeKeyPair::new_ec();
    let init = tests::init_data("outage-guest", &[("app", "db")]);
    let token = tests::attest(&url_b, None, &key, Some(&init))
        .await
        .unwrap();
    let _guest = TunnelGuest::dial(
        &GuestTunnelConfig::new(tests::tunnel_url(&url_b)),
        &token,
        tests::guest_info("i-1", "test", &[]),
        &key,
        StubGuest::new(),
    )
    .await
    .unwrap();
    admin_b.ping_guest("outage-guest").await.unwrap();
    // A rollout in force (selecting nobody), to be paused while the database is away.
    let rollout = admin_b
        .start_rollout(&StartRollout {
            path: CACHED.into(),
            selector: "app=nobody".into(),
            ..StartRollout::default()
        })
        .await
        .unwrap()
        .rollout
        .id;

    // The database goes away.
    let cluster = Arc::new(cluster);
    blocking(&cluster, PgCluster::stop).await;
    for url in [&url_a, &url_b] {
        eventually_within(WITHIN, "/readyz 503 naming the store", || async {
            readyz(url).await.is_some_and(|(s, b)| {
                s == 503 && b["store"] == "postgres" && b["status"] != "ready"
            })
        })
        .await;
        assert_eq!(healthz(url).await, 200, "the process itself is alive");
    }

    // What B holds keeps working: the tunnel (ping, probe), RCAR, and the version it read.
    admin_b.ping_guest("outage-guest").await.unwrap();
    admin_b
        .probe_guest("outage-guest", rpc_defs::ProbeKind::Health)
        .await
        .unwrap();
    assert_eq!(fetch(&url_b, CACHED).await.unwrap(), b"v2");
    // A read version 1, then wrote version 2 and never read it: it has no copy, and above
    // all not version 1.
    let a_after_write = fetch(&url_a, CACHED).await.unwrap_err();
    assert!(
        a_after_write.contains("StorageUnavailable") || a_after_write.contains("503"),
        "{a_after_write}"
    );
    // A version B never read is not made up: 503, which the client may retry.
    let unread = fetch(&url_b, UNREAD).await.unwrap_err();
    assert!(
        unread.contains("StorageUnavailable") || unread.contains("503"),
        "{unread}"
    );

    // Writes are refused with 503 StorageUnavailable, never a 500.
    assert_storage_unavailable(
        "a resource put",
        admin_b
            .put_resource(CACHED, b"v3".to_vec())
            .await
            .unwrap_err(),
    );
    assert_storage_unavailable("a policy", admin_b.set_policy(DENY_ALL).await.unwrap_err());
    assert_storage_unavailable(
        "a plugin state",
        admin_b
            .set_plugin_enabled("probes", false)
            .await
            .unwrap_err(),
    );
    assert_storage_unavailable(
        "a rollout",
        admin_b
            .start_rollout(&StartRollout {
                path: CACHED.into(),
                selector: "app=db".into(),
                ..StartRollout::default()
            })
            .await
            .unwrap_err(),
    );
    assert_storage_unavailable(
        "a rollout pause",
        admin_b
            .control_rollout(rollout, plugin_rotation::Control::Pause)
            .await
            .unwrap_err(),
    );
    // Nothing was half-applied: the policy in force is still the allowing one.
    assert_eq!(fetch(&url_b, CACHED).await.unwrap(), b"v2");

    // The database is back: both replicas are ready again and follow each other again.
    blocking(&cluster, PgCluster::start_again).await;
    for url in [&url_a, &url_b] {
        eventually_within(WITHIN, "/readyz 200 again", || async {
            readyz(url).await.is_some_and(|(s, _)| s == 200)
        })
        .await;
    }
    let versions = admin_a.resource_versions(CACHED).await.unwrap();
    assert_eq!(
        versions["versions"].as_array().unwrap().len(),
        2,
        "the refused put left nothing: {versions}"
    );
    assert_eq!(
        admin_b.put_resource(CACHED, b"v3".to_vec()).await.unwrap()["version"],
        3
    );
    eventually_within(WITHIN, "A to serve B's version 3", || async {
        fetch(&url_a, CACHED).await.is_ok_and(|v| v == b"v3")
    })
    .await;
    // A policy set through A after the outage is in force on B: B's feed listens again.
    admin_a.set_policy(DENY_ALL).await.unwrap();
    eventually_within(WITHIN, "B to refuse under A's new policy", || async {
        fetch(&url_b, CACHED)
            .await
            .is_err_and(|e| !e.contains("StorageUnavailable"))
    })
    .await;
    drop((a, b));
    drop(cluster);
}

/// Runs `op` (stop, start again: they wait on processes) off the runtime's threads.
async fn blocking(cluster: &Arc<PgCluster>, op: fn(&PgCluster) -> anyhow::Result<()>) {
    let cluster = cluster.clone();
    tokio::task::spawn_blocking(move || op(&cluster))
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kbs_started_without_its_database_waits_for_it_answering_healthz() {
    let test = "a_kbs_started_without_its_database_waits_for_it_answering_healthz";
    let Some((cluster, db)) = tests::pg_own_cluster(test).await else {
        return;
    };
    let cluster = Arc::new(cluster);
    blocking(&cluster, PgCluster::stop).await;
    let (dir, data_dir, config) = setup(&db.url, "connect_wait_secs = 120\n");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let log = dir.path().join("kbs.log");
    let mut kbs = kbs_command(&data_dir, &config, port, &log).spawn().unwrap();
    eventually_within(WITHIN, "/healthz while waiting", || async {
        healthz(&url).await == 200
    })
    .await;
    let (status, body) = readyz(&url).await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "waiting for storage", "{body}");
    assert_eq!(body["store"], "postgres", "{body}");
    let early = reqwest::get(format!("{url}/kbs/v0/auth")).await.unwrap();
    assert_eq!(
        tests::error_name(early).await,
        (StatusCode::SERVICE_UNAVAILABLE, "StorageUnavailable".into())
    );
    eventually_within(WITHIN, "the log naming what it waits for", || async {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("waiting for the database"))
    })
    .await;
    assert!(
        kbs.try_wait().unwrap().is_none(),
        "it waits, it does not exit"
    );

    blocking(&cluster, PgCluster::start_again).await;
    eventually_within(
        Duration::from_secs(60),
        "ready once the database is up",
        || async { readyz(&url).await.is_some_and(|(s, _)| s == 200) },
    )
    .await;
    let admin = admin(&url, &data_dir);
    admin.set_policy(tests::ALLOW_SAMPLE).await.unwrap();
    admin.put_resource(CACHED, b"late".to_vec()).await.unwrap();
    assert_eq!(fetch(&url, CACHED).await.unwrap(), b"late");
    kbs.start_kill().unwrap();
    let _ = kbs.wait().await;

    // With a short wait and the database down, it gives up with an error naming the key.
    blocking(&cluster, PgCluster::stop).await;
    let (dir, data_dir, config) = setup(&db.url, "connect_wait_secs = 2\n");
    let log = dir.path().join("kbs.log");
    let mut kbs = kbs_command(&data_dir, &config, free_port(), &log)
        .spawn()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(60), kbs.wait())
        .await
        .expect("it gives up")
        .unwrap();
    assert!(!status.success());
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("storage.connect_wait_secs = 2"), "{logged}");
    drop(cluster);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn kbs_command(data_dir: &Path, config: &Path, port: u16, log: &Path) -> Command {
    let mut cmd = Command::new(tests::kbs_binary());
    cmd.args(["--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(data_dir)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .kill_on_drop(true);
    cmd
}

/// What `retry_conflicts` runs again: a real deadlock between two transactions is
/// recognised as a conflict (SQLSTATE 40P01), a constraint violation is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_deadlock_is_a_conflict_and_a_constraint_is_not() {
    use kbs_core::storage::StoreError;
    use sqlx::Connection;
    let Some(db) =
        tests::pg_database("a_real_deadlock_is_a_conflict_and_a_constraint_is_not").await
    else {
        return;
    };
    let mut setup = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("CREATE TABLE t (id INT PRIMARY KEY, v INT)")
        .execute(&mut setup)
        .await
        .unwrap();
    sqlx::query("INSERT INTO t VALUES (1, 0), (2, 0)")
        .execute(&mut setup)
        .await
        .unwrap();
    let mut one = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let mut two = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let mut tx1 = one.begin().await.unwrap();
    let mut tx2 = two.begin().await.unwrap();
    let lock = |id: i32| sqlx::query("UPDATE t SET v = v + 1 WHERE id = $1").bind(id);
    lock(1).execute(&mut *tx1).await.unwrap();
    lock(2).execute(&mut *tx2).await.unwrap();
    let (a, b) = tokio::join!(lock(2).execute(&mut *tx1), lock(1).execute(&mut *tx2));
    let lost = match (a, b) {
        (Err(e), _) | (_, Err(e)) => StoreError::from(e),
        _ => panic!("no deadlock"),
    };
    assert!(lost.is_conflict(), "{lost}");
    assert!(!lost.is_unavailable(), "{lost}");
    // Ended now, not at the connections' next use: tx2 still holds both rows.
    let _ = tx1.rollback().await;
    let _ = tx2.rollback().await;
    let dup = sqlx::query("INSERT INTO t VALUES (1, 0)")
        .execute(&mut setup)
        .await
        .unwrap_err();
    assert!(!StoreError::from(dup).is_conflict());
}
