#![allow(clippy::unwrap_used)]
//! Forgotten guests age out (issue 17, defect 10): a guest without a tunnel, not seen for
//! `fleet.forget_after`, leaves the fleet view in memory and in the database, while
//! connected and recently seen guests stay. Real KBS, real guests over real tunnels; the
//! sweep is driven at an injected time where it can be, and on its own schedule once.

use std::collections::BTreeSet;
use std::time::Duration;

use kbs_core::fleet::{Retention, sweep};
use reqwest::Method;
use serde_json::Value;
use server::admin_client::AdminClient;
use tests::{StubGuest, TestKbs, TunnelGuest, allow_sample, eventually, unix_ms};

const HOUR_MS: u64 = 3600 * 1000;

async fn connect(kbs: &TestKbs, id: &str) -> TunnelGuest {
    let init = tests::init_data(id, &[("app", "web")]);
    let info = tests::guest_info(id, "test", &[]);
    TunnelGuest::attest_and_dial(kbs, Some(&init), info, StubGuest::new())
        .await
        .0
}

async fn listing(admin: &AdminClient) -> Value {
    admin
        .send(Method::GET, "/kbs/v0/admin/guests?connected=any", None)
        .await
        .unwrap()
}

fn ids(list: &Value) -> BTreeSet<String> {
    list["guests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["guest_id"].as_str().unwrap().to_string())
        .collect()
}

async fn stored(kbs: &TestKbs) -> BTreeSet<String> {
    kbs.state
        .store
        .load_fleet()
        .await
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect()
}

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn a_guest_gone_longer_than_the_retention_leaves_memory_and_the_database() {
    tests::init_logging();
    let kbs = TestKbs::start_dev().await;
    let admin = kbs.admin();
    let stays = connect(&kbs, "stays").await;
    let leaves = connect(&kbs, "leaves").await;
    leaves.leave().await;
    eventually("both records written, one guest disconnected", || async {
        let list = listing(&admin).await;
        stored(&kbs).await == set(&["stays", "leaves"])
            && list["guests"]
                .as_array()
                .unwrap()
                .iter()
                .any(|g| g["guest_id"] == "leaves" && g["connected"] == false)
    })
    .await;
    let list = listing(&admin).await;
    assert_eq!(list["forget_after"], "30days", "{list}");
    assert_eq!(list["forget_after_s"], 30 * 24 * 3600);

    let hub = &kbs.state.hub;
    let metrics = &kbs.state.metrics.observability;
    let sweep_at = |forget_after_h: u64, later_h: u64| {
        let retention = Retention {
            forget_after: Duration::from_secs(forget_after_h * 3600),
            ..Retention::default()
        };
        let fleet = kbs.state.fleet.clone();
        let store = kbs.state.store.clone();
        async move {
            sweep(
                &fleet,
                store.as_ref(),
                hub,
                retention,
                unix_ms() + later_h * HOUR_MS,
                metrics,
            )
            .await
            .unwrap()
        }
    };
    // Two hours later with a three-hour retention: recent, kept.
    assert_eq!(sweep_at(3, 2).await, 0);
    assert_eq!(ids(&listing(&admin).await), set(&["stays", "leaves"]));
    // Two hours later with a one-hour retention: the disconnected guest goes, the connected
    // one (seen long before the cut-off as well) stays.
    assert_eq!(sweep_at(1, 2).await, 1);
    let list = listing(&admin).await;
    assert_eq!(ids(&list), set(&["stays"]));
    assert_eq!(list["known"], 1);
    assert_eq!(stored(&kbs).await, set(&["stays"]));
    assert_eq!(
        kbs.metric("kbs_fleet_guests_forgotten_total", &[]).await,
        1.0
    );
    // Gone from the database: a restart does not bring it back.
    drop(stays);
    let kbs = kbs.restart().await;
    let admin = kbs.admin();
    assert_eq!(ids(&listing(&admin).await), set(&["stays"]));
}

#[tokio::test]
async fn the_kbs_forgets_gone_guests_on_its_own_schedule() {
    tests::init_logging();
    let kbs = TestKbs::start_with(false, |c| {
        allow_sample(c);
        c.fleet.forget_after = Duration::from_secs(1);
        c.fleet.sweep_interval = Duration::from_secs(1);
    })
    .await;
    let admin = kbs.admin();
    let _stays = connect(&kbs, "stays").await;
    let leaves = connect(&kbs, "leaves").await;
    eventually("both guests listed", || async {
        ids(&listing(&admin).await) == set(&["stays", "leaves"])
    })
    .await;
    leaves.leave().await;
    eventually("the gone guest forgotten in memory and storage", || async {
        ids(&listing(&admin).await) == set(&["stays"]) && stored(&kbs).await == set(&["stays"])
    })
    .await;
    let list = listing(&admin).await;
    assert_eq!(
        (&list["forget_after"], &list["forget_after_s"]),
        (&"1s".into(), &1.into())
    );
    // The connected guest outlives many sweeps.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(ids(&listing(&admin).await), set(&["stays"]));
    assert_eq!(stored(&kbs).await, set(&["stays"]));
}
