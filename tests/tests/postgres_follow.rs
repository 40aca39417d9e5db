#![allow(clippy::unwrap_used)]
//! Two real `kbs` replicas sharing one PostgreSQL database (the kit's throwaway cluster) and
//! one data directory: what an admin changes through one replica is in force on the other,
//! carried by the store's change feed (LISTEN/NOTIFY), not by a restart.

use std::path::Path;
use std::time::Duration;

use guest_daemon::tee_key::TeeKeyPair;
use kbs_core::admin_key::AdminKeyPair;
use server::admin_client::AdminClient;
use tests::eventually_within;

const PATH: &str = "default/key/followed";
const DENY_ALL: &str = "package policy\n\nimport rego.v1\n\ndefault allow := false\n";
/// NOTIFY reaches the other replica within milliseconds; the bound only keeps a broken
/// feed from hanging the test.
const WITHIN: Duration = Duration::from_secs(10);

fn admin(url: &str, data_dir: &Path) -> AdminClient {
    let key = AdminKeyPair::load(&data_dir.join("admin.key")).unwrap();
    AdminClient::new(url, key, None).unwrap()
}

/// RCAR (auth, attest) and the resource GET, all on `url`: the plaintext, or the error text.
async fn fetch(url: &str) -> Result<Vec<u8>, String> {
    let mut client = tests::rcar_client(url, None, &TeeKeyPair::new_ec(), None).unwrap();
    client
        .get_resource(&PATH.parse().unwrap())
        .await
        .map(|z| z.to_vec())
        .map_err(|e| format!("{e:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_and_a_plugin_state_changed_on_one_replica_are_in_force_on_the_other() {
    let Some(setup) = tests::pg_kbs_setup(
        "a_policy_and_a_plugin_state_changed_on_one_replica_are_in_force_on_the_other",
        "",
    )
    .await
    else {
        return;
    };
    let (data_dir, config) = (&setup.data_dir, &setup.config);
    let a = tests::spawn_kbs(data_dir, Some(config)).await;
    let b = tests::spawn_kbs(data_dir, Some(config)).await;
    let (url_a, url_b) = (a.announced.clone(), b.announced.clone());
    let admin_a = admin(&url_a, data_dir);
    admin_a
        .put_resource(PATH, b"s3cret".to_vec())
        .await
        .unwrap();

    // Both started with the built-in policy, which refuses the sample TEE.
    let refused = fetch(&url_b).await.unwrap_err();
    assert!(
        refused.contains("PolicyDeny") || refused.contains("401") || refused.contains("403"),
        "{refused}"
    );

    // The resource policy, set through A, decides on B.
    admin_a.set_policy(tests::ALLOW_SAMPLE).await.unwrap();
    eventually_within(
        WITHIN,
        "B to release the resource under A's policy",
        || async { fetch(&url_b).await.is_ok_and(|got| got == b"s3cret") },
    )
    .await;

    // A plugin disabled through A answers 404 PluginDisabled on B, and comes back with it.
    admin_a.set_plugin_enabled("resource", false).await.unwrap();
    eventually_within(WITHIN, "B's resource plugin to be disabled", || async {
        fetch(&url_b)
            .await
            .is_err_and(|e| e.contains("PluginDisabled") || e.contains("404"))
    })
    .await;
    admin_a.set_plugin_enabled("resource", true).await.unwrap();
    eventually_within(
        WITHIN,
        "B's resource plugin to be enabled again",
        || async { fetch(&url_b).await.is_ok() },
    )
    .await;

    // And the other way round: B's admin API changes A.
    let admin_b = admin(&url_b, data_dir);
    admin_b.set_policy(DENY_ALL).await.unwrap();
    eventually_within(WITHIN, "A to refuse under B's policy", || async {
        fetch(&url_a).await.is_err()
    })
    .await;
    drop((a, b));
}
