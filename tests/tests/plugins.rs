#![allow(clippy::unwrap_used)]
//! The plugin framework over real HTTP: listing, enable/disable effective at once and after a
//! restart, 404 JSON while disabled, admin-only, audited, `[plugins] disabled` defaults.

use guest_daemon::tee_key::TeeKeyPair;
use reqwest::StatusCode;
use serde_json::Value;
use tests::{ALLOW_SAMPLE, TestKbs, api_err, error_name};

fn plugin<'a>(list: &'a Value, name: &str) -> &'a Value {
    list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("{name} listed: {list}"))
}

/// An attested guest's resource GET, raw.
async fn guest_get(kbs: &TestKbs, token: &str, path: &str) -> reqwest::Response {
    kbs.http()
        .get(format!("{}/kbs/v0/resource/{path}", kbs.url))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

async fn token(kbs: &TestKbs) -> String {
    kbs.attest(&TeeKeyPair::new_ec(), None).await
}

#[tokio::test]
async fn list_shows_every_builtin_with_kind_state_and_version() {
    let kbs = TestKbs::start().await;
    let list = kbs.admin().list_plugins().await.unwrap();
    let resource = plugin(&list, "resource");
    assert_eq!(resource["kind"], "client-request");
    assert_eq!(resource["enabled"], true);
    assert_eq!(resource["version"], env!("CARGO_PKG_VERSION"));
    let splitapi = plugin(&list, "splitapi");
    assert_eq!(splitapi["kind"], "server-request");
    let kinds: Vec<&str> = splitapi["kinds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"client-request") && kinds.contains(&"admin"),
        "{kinds:?}"
    );
    assert_eq!(splitapi["enabled"], true);
    let pki = plugin(&list, "pki");
    assert_eq!(pki["kind"], "client-request");
    assert_eq!(pki["enabled"], true);
}

#[tokio::test]
async fn disable_is_effective_at_once_audited_and_survives_a_restart() {
    let kbs = TestKbs::start_tls().await;
    let admin = kbs.admin();
    admin.set_policy(ALLOW_SAMPLE).await.unwrap();
    admin
        .put_resource("default/key/one", b"s1".to_vec())
        .await
        .unwrap();
    let guest = token(&kbs).await;
    assert_eq!(
        guest_get(&kbs, &guest, "default/key/one").await.status(),
        StatusCode::OK
    );

    let v = admin.set_plugin_enabled("resource", false).await.unwrap();
    assert_eq!(v["changed"], true);
    // At once: the guest GET and the admin POST answer 404 with the JSON error body.
    assert_eq!(
        error_name(guest_get(&kbs, &guest, "default/key/one").await).await,
        (StatusCode::NOT_FOUND, "PluginDisabled".into())
    );
    let err = admin
        .put_resource("default/key/two", b"s2".to_vec())
        .await
        .unwrap_err();
    assert_eq!(
        api_err(err),
        (StatusCode::NOT_FOUND, "PluginDisabled".into())
    );
    assert_eq!(
        plugin(&admin.list_plugins().await.unwrap(), "resource")["enabled"],
        false
    );
    // Idempotent, and says so.
    let v = admin.set_plugin_enabled("resource", false).await.unwrap();
    assert_eq!(v["changed"], false);

    // Audited.
    let audit = admin
        .send(
            reqwest::Method::GET,
            "/kbs/v0/admin/audit?action=plugin.*",
            None,
        )
        .await
        .unwrap();
    let records = audit["records"].as_array().unwrap();
    assert!(
        records.iter().any(|r| r["action"] == "plugin.disable"
            && r["target"] == "resource"
            && r["outcome"] == "ok"),
        "{audit}"
    );

    // Restart: still disabled.
    let kbs = kbs.restart().await;
    let admin = kbs.admin();
    assert_eq!(
        plugin(&admin.list_plugins().await.unwrap(), "resource")["enabled"],
        false
    );
    let guest = token(&kbs).await;
    assert_eq!(
        guest_get(&kbs, &guest, "default/key/one").await.status(),
        StatusCode::NOT_FOUND
    );

    // Enable: at once, and after the next restart too.
    admin.set_plugin_enabled("resource", true).await.unwrap();
    assert_eq!(
        guest_get(&kbs, &guest, "default/key/one").await.status(),
        StatusCode::OK
    );
    let kbs = kbs.restart().await;
    let guest = token(&kbs).await;
    assert_eq!(
        guest_get(&kbs, &guest, "default/key/one").await.status(),
        StatusCode::OK
    );
    let audit = kbs
        .admin()
        .send(
            reqwest::Method::GET,
            "/kbs/v0/admin/audit?action=plugin.enable",
            None,
        )
        .await
        .unwrap();
    assert_eq!(audit["records"][0]["target"], "resource", "{audit}");
}

#[tokio::test]
async fn admin_only() {
    let kbs = TestKbs::start_with(false, |c| {
        c.admin
            .roles
            .insert("viewer".into(), vec!["GET ^/kbs/v0/plugin$".into()]);
    })
    .await;
    let http = kbs.http();
    for (method, path) in [
        (reqwest::Method::GET, "/kbs/v0/plugin"),
        (reqwest::Method::POST, "/kbs/v0/plugin/disable/splitapi"),
        (reqwest::Method::POST, "/kbs/v0/plugin/enable/splitapi"),
    ] {
        let resp = http
            .request(method.clone(), format!("{}{path}", kbs.url))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{method} {path}");
        // An attestation token is no admin token.
        let resp = http
            .request(method.clone(), format!("{}{path}", kbs.url))
            .bearer_auth(token(&kbs).await)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{method} {path}");
    }
    // A role that may list but not change.
    let viewer = kbs.admin().with_identity("vera", "viewer");
    viewer.list_plugins().await.unwrap();
    let err = viewer
        .set_plugin_enabled("splitapi", false)
        .await
        .unwrap_err();
    assert_eq!(api_err(err).0, StatusCode::FORBIDDEN);
    assert!(kbs.state.plugins.is_enabled("splitapi"), "nothing changed");

    // Unknown plugin: 404, audited as an error.
    let err = kbs
        .admin()
        .set_plugin_enabled("nope", true)
        .await
        .unwrap_err();
    assert_eq!(
        api_err(err),
        (StatusCode::NOT_FOUND, "PluginNotFound".into())
    );
    let audit = kbs
        .admin()
        .send(
            reqwest::Method::GET,
            "/kbs/v0/admin/audit?action=plugin.enable",
            None,
        )
        .await
        .unwrap();
    assert_eq!(audit["records"][0]["outcome"], "error", "{audit}");
}

#[tokio::test]
async fn config_default_disables_until_an_admin_decides() {
    let kbs = TestKbs::start_with(false, |c| c.plugins.disabled = vec!["splitapi".into()]).await;
    let admin = kbs.admin();
    assert_eq!(
        plugin(&admin.list_plugins().await.unwrap(), "splitapi")["enabled"],
        false
    );
    let guest = token(&kbs).await;
    let resp = kbs
        .http()
        .get(format!("{}/kbs/v0/splitapi/credentials", kbs.url))
        .bearer_auth(&guest)
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_name(resp).await,
        (StatusCode::NOT_FOUND, "PluginDisabled".into())
    );
    admin.set_plugin_enabled("splitapi", true).await.unwrap();
    // The stored decision wins over the config default after a restart.
    let kbs = kbs.restart().await;
    assert!(kbs.state.plugins.is_enabled("splitapi"));
}
