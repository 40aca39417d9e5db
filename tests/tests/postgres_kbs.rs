#![allow(clippy::unwrap_used)]
//! The real `kbs` binary on PostgreSQL (a throwaway cluster of the test kit): RCAR and a
//! resource GET with the project's client, a rollout acked by a guest on a real tunnel, a
//! kill -9 and restart with everything still there; `/readyz` following the database.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use guest_daemon::tee_key::TeeKeyPair;
use kbs_core::admin_key::AdminKeyPair;
use kbs_core::storage::TargetState;
use plugin_rotation::StartRollout;
use server::admin_client::AdminClient;
use sqlx::Connection;
use tests::{FaultProxy, StubGuest, TunnelGuest, eventually, eventually_within};
use tokio::process::{Child, Command};
use tunnel::GuestTunnelConfig;

fn admin(url: &str, data_dir: &Path) -> AdminClient {
    let key = AdminKeyPair::load(&data_dir.join("admin.key")).unwrap();
    AdminClient::new(url, key, None).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kbs_on_postgres_attests_serves_rolls_out_and_keeps_it_all_across_a_restart() {
    let Some(setup) = tests::pg_kbs_setup(
        "a_kbs_on_postgres_attests_serves_rolls_out_and_keeps_it_all_across_a_restart",
        "",
    )
    .await
    else {
        return;
    };
    let (data_dir, config) = (setup.data_dir.clone(), setup.config.clone());
    let mut kbs = tests::spawn_kbs(&data_dir, Some(&config)).await;
    let url = kbs.announced.clone();
    let admin = admin(&url, &data_dir);
    admin.set_policy(tests::ALLOW_SAMPLE).await.unwrap();
    let path = "default/key/db-pass";
    admin.put_resource(path, b"v1".to_vec()).await.unwrap();
    assert!(
        !data_dir.join("tether.db").exists(),
        "a postgres database_url leaves SQLite alone"
    );

    // RCAR + the resource GET, with the guest daemon's own client.
    let mut client = tests::rcar_client(&url, None, &TeeKeyPair::new_ec(), None).unwrap();
    let got = client.get_resource(&path.parse().unwrap()).await.unwrap();
    assert_eq!(got.as_slice(), b"v1");

    // A guest on a tunnel gets version 2 through a rollout and acks it.
    let key = TeeKeyPair::new_ec();
    let init = tests::init_data("pg-guest-1", &[("app", "db")]);
    let token = tests::attest(&url, None, &key, Some(&init)).await.unwrap();
    let guest = TunnelGuest::dial(
        &GuestTunnelConfig::new(tests::tunnel_url(&url)),
        &token,
        tests::guest_info("i-1", "test", &[]),
        &key,
        StubGuest::new(),
    )
    .await
    .unwrap();
    admin.put_resource(path, b"v2".to_vec()).await.unwrap();
    let started = admin
        .start_rollout(&StartRollout {
            path: path.into(),
            selector: "app=db".into(),
            ..StartRollout::default()
        })
        .await
        .unwrap();
    let id = started.rollout.id;
    eventually("the guest's ack", || async {
        let view = admin.rollout(id, "").await.unwrap().view;
        view.counts.get(&TargetState::Acked) == Some(&1)
    })
    .await;
    let acked = admin.rollout(id, "").await.unwrap().targets;
    assert_eq!(acked.len(), 1);
    assert_eq!(acked[0].guest_id, "pg-guest-1");
    assert_eq!(acked[0].held_version, Some(2));

    // The fleet record (written behind, in batches) reaches the database.
    let mut pg = sqlx::PgConnection::connect(&setup.db.url).await.unwrap();
    let fleet_row = "SELECT COUNT(*) FROM fleet_guests WHERE guest_id = 'pg-guest-1'";
    for _ in 0..300 {
        let n: i64 = sqlx::query_scalar(fleet_row)
            .fetch_one(&mut pg)
            .await
            .unwrap();
        if n == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // kill -9, start again: the database has everything.
    drop(guest);
    let listen = url.strip_prefix("http://").unwrap().to_string();
    kbs.kill_9().await;
    let _kbs = tests::spawn_kbs_on(&listen, &data_dir, Some(&config)).await;
    let versions = admin.resource_versions(path).await.unwrap();
    assert_eq!(
        versions["versions"].as_array().unwrap().len(),
        2,
        "{versions}"
    );
    assert_eq!(admin.get_policy().await.unwrap().0, tests::ALLOW_SAMPLE);
    let after = admin.rollout(id, "").await.unwrap();
    assert_eq!(after.view.counts.get(&TargetState::Acked), Some(&1));
    assert_eq!(after.targets[0].held_version, Some(2));
    let n: i64 = sqlx::query_scalar(fleet_row)
        .fetch_one(&mut pg)
        .await
        .unwrap();
    assert_eq!(n, 1, "the guest's fleet record is in the database");
    let audit: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM audit_log WHERE action = 'resource.put'")
            .fetch_one(&mut pg)
            .await
            .unwrap();
    assert_eq!(audit, 2, "both puts are audited in the database");
    let mut client = tests::rcar_client(&url, None, &TeeKeyPair::new_ec(), None).unwrap();
    let got = client.get_resource(&path.parse().unwrap()).await.unwrap();
    assert_eq!(got.as_slice(), b"v2");
    assert!(!data_dir.join("tether.db").exists());
}

/// The `kbs` binary with its database URL from the environment, stderr to `log`.
async fn spawn_logging(data_dir: &Path, database_url: &str, log: &Path) -> (Child, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(tests::kbs_binary())
        .args(["--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(data_dir)
        .env("KBS_STORAGE__DATABASE_URL", database_url)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    (child, format!("http://127.0.0.1:{port}"))
}

async fn readyz(http: &reqwest::Client, url: &str) -> Option<(u16, serde_json::Value)> {
    let r = http.get(format!("{url}/readyz")).send().await.ok()?;
    Some((r.status().as_u16(), r.json().await.ok()?))
}

/// `/readyz` is 503 naming the store while PostgreSQL is unreachable and 200 again once it
/// is back; the KBS itself keeps answering; the password of the URL is never logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_database_and_the_password_stays_out_of_the_log() {
    let Some(db) =
        tests::pg_database("readyz_follows_the_database_and_the_password_stays_out_of_the_log")
            .await
    else {
        return;
    };
    let upstream: SocketAddr = format!("127.0.0.1:{}", db.port).parse().unwrap();
    let proxy = FaultProxy::start(upstream).await;
    let proxy_addr = proxy.addr;
    // The cluster trusts loopback, so any password is accepted: it is here to be hidden.
    let password = "hunter2-never-logged";
    let database_url = format!("postgres://tether:{password}@{proxy_addr}/{}", db.name);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("kbs.log");
    let (mut child, url) = spawn_logging(&dir.path().join("data"), &database_url, &log).await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    eventually_within(Duration::from_secs(60), "the kbs ready", || async {
        readyz(&http, &url).await.is_some_and(|(s, _)| s == 200)
    })
    .await;
    let (_, body) = readyz(&http, &url).await.unwrap();
    assert_eq!(body["store"], "postgres", "{body}");
    assert_eq!(body["status"], "ready", "{body}");

    // The database goes away (connections cut, new ones refused).
    drop(proxy);
    eventually_within(Duration::from_secs(30), "/readyz 503", || async {
        readyz(&http, &url).await.is_some_and(|(s, b)| {
            s == 503
                && b["store"] == "postgres"
                && (b["status"] == "storage unavailable" || b["status"] == "storage timeout")
        })
    })
    .await;
    let health = http.get(format!("{url}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200, "the process itself is alive");
    // A write meanwhile is refused clearly (and may be retried), not a 500.
    let admin = admin(&url, &dir.path().join("data"));
    let refused = admin
        .put_resource("default/key/while-down", b"x".to_vec())
        .await
        .unwrap_err();
    assert_eq!(
        tests::api_err(refused),
        (
            reqwest::StatusCode::SERVICE_UNAVAILABLE,
            "StorageUnavailable".to_string()
        )
    );
    let (_, down) = readyz(&http, &url).await.unwrap();
    assert!(!down.to_string().contains(password), "{down}");
    assert!(!down.to_string().contains(&db.name), "{down}");

    // It comes back where the KBS knew it.
    let _proxy = FaultProxy::start_at(proxy_addr, upstream).await;
    eventually_within(Duration::from_secs(30), "/readyz 200 again", || async {
        readyz(&http, &url).await.is_some_and(|(s, _)| s == 200)
    })
    .await;
    assert_eq!(
        admin
            .put_resource("default/key/while-down", b"x".to_vec())
            .await
            .unwrap()["version"],
        1,
        "the refused write left nothing behind"
    );
    eventually("the log line naming the storage", || async {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("storage open"))
    })
    .await;
    child.start_kill().unwrap();
    let _ = child.wait().await;
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("tether:***@"), "{logged}");
    assert!(
        !logged.contains(password),
        "the password was logged:\n{logged}"
    );
}
