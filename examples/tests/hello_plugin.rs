//! The example plugin of docs/architecture.md, added to a real KBS with one line and called
//! by an attested guest: its config section, policy gate, key-value namespace, metrics scope
//! and enable/disable all work without any change to the KBS.

use std::sync::Arc;

use examples::hello_plugin::{self, HelloPlugin};
use guest_daemon::tee_key::TeeKeyPair;
use kbs_web::plugin::PluginSpec;
use serde_json::Value;
use tests::{ALLOW_SAMPLE, TestKbs, error_name};

async fn kbs() -> TestKbs {
    TestKbs::start_with_plugins(
        Arc::new(|| vec![PluginSpec::new(hello_plugin::NAME, HelloPlugin::build)]),
        |c| {
            c.plugins
                .set("hello", "greeting = \"bonjour\"")
                .expect("a valid section")
        },
    )
    .await
}

#[tokio::test]
async fn the_example_plugin_answers_an_attested_guest_and_obeys_the_framework() {
    let kbs = kbs().await;
    let admin = kbs.admin();
    let key = TeeKeyPair::new_ec();
    let token = kbs.attest(&key, None).await;
    let greet = || async {
        kbs.http()
            .get(format!("{}/kbs/v0/hello/greeting", kbs.url))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
    };

    // The default policy refuses the sample TEE, for this plugin as for every other.
    let (status, name) = error_name(greet().await).await;
    assert_eq!((status.as_u16(), name.as_str()), (403, "PolicyDeny"));

    admin.set_policy(ALLOW_SAMPLE).await.unwrap();
    for times in 1..=2 {
        let r = greet().await;
        assert_eq!(r.status(), 200);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["greeting"], "bonjour", "its own config section");
        assert_eq!(body["times"], times, "its own key-value namespace");
    }
    assert_eq!(kbs.metric("kbs_hello_greetings_total", &[]).await, 2.0);

    let listed = admin.list_plugins().await.unwrap();
    let hello = listed["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "hello")
        .cloned();
    assert_eq!(hello.map(|p| p["enabled"].clone()), Some(Value::Bool(true)));
    admin.set_plugin_enabled("hello", false).await.unwrap();
    let (status, name) = error_name(greet().await).await;
    assert_eq!((status.as_u16(), name.as_str()), (404, "PluginDisabled"));
}

#[tokio::test]
async fn its_config_section_is_checked_by_the_plugin() {
    let err = server::app::Kbs::build_with(
        {
            let dir = tempfile::tempdir().unwrap();
            let mut c = server::config::Config::default();
            c.storage.data_dir = dir.keep();
            c.plugins.set("hello", "greeting = \"\"").unwrap();
            c
        },
        vec![PluginSpec::new(hello_plugin::NAME, HelloPlugin::build)],
    )
    .await
    .err()
    .unwrap();
    assert!(err.to_string().contains("plugins.hello.greeting"), "{err}");
}
