#![allow(clippy::unwrap_used)]
//! External plugins (upstream's `kbs.plugin.v1`) through the real `kbs` binary and a plugin
//! process written only from upstream's proto and docs (`src/bin/upstream_plugin.rs`):
//! admin and attested paths, policy, JWE-sealed answers opened with the guest's key,
//! upstream's status mapping; then crash isolation (kill -9 under load), hot swap and
//! enable/disable at run time, a hung plugin, a plugin answering garbage.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use guest_daemon::tee_key::TeeKeyPair;
use reqwest::StatusCode;
use serde_json::{Value, json};
use server::admin_client::AdminClient;
use tests::{
    DaemonRun, TestKbs, allow_sample, attest, error_detail, eventually, init_data, spawn_kbs,
    spawn_upstream_plugin,
};

/// Only what these tests need: the external plugins' paths, nothing with `forbidden`.
const EXTERNAL_POLICY: &str = r#"package policy
import rego.v1
default allow := false
allow if {
    input["submods"]["cpu0"]["ear.status"] == "affirming"
    data.plugin == "external"
    not "forbidden" in data["resource-path"]
}
allow if {
    input["submods"]["cpu0"]["ear.status"] == "affirming"
    data.plugin != "external"
}
"#;

fn external_table(name: &str, endpoint: &str, extra: &str) -> String {
    format!(
        "[[plugins.external]]\nname = \"{name}\"\nendpoint = \"{endpoint}\"\ntls_mode = \"insecure\"\n{extra}\n"
    )
}

/// A real `kbs` process whose config holds `tables` (and the policy above).
async fn kbs_with(dir: &Path, tables: &str) -> (tests::Spawned, AdminClient) {
    let policy = dir.join("policy.rego");
    std::fs::write(&policy, EXTERNAL_POLICY).unwrap();
    let config = dir.join("kbs.toml");
    std::fs::write(
        &config,
        format!(
            "[policy]\ninitial_policy_file = \"{}\"\n\n{tables}",
            policy.display()
        ),
    )
    .unwrap();
    let data = dir.join("data");
    let kbs = spawn_kbs(&data, Some(&config)).await;
    let key = kbs_core::admin_key::AdminKeyPair::load(&data.join("admin.key")).unwrap();
    let admin = AdminClient::new(&kbs.announced, key, None).unwrap();
    (kbs, admin)
}

fn url(kbs: &tests::Spawned, path: &str) -> String {
    format!("{}/kbs/v0/external/{path}", kbs.announced)
}

#[tokio::test]
async fn an_upstream_plugin_serves_admins_and_attested_guests_through_the_kbs_binary() {
    tests::init_logging();
    let dir = tempfile::tempdir().unwrap();
    let plugin = spawn_upstream_plugin("127.0.0.1:0", None).await;
    let endpoint = format!("http://{}", plugin.announced);
    let (kbs, admin) = kbs_with(
        dir.path(),
        &external_table("secrets", &endpoint, "timeout_ms = 3000"),
    )
    .await;
    let http = reqwest::Client::new();

    // Listed like any plugin, with its endpoint.
    let list = admin.list_plugins().await.unwrap();
    let me = list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "external/secrets")
        .unwrap_or_else(|| panic!("listed: {list}"));
    assert_eq!(me["enabled"], true);
    assert_eq!(me["settings"]["endpoint"], endpoint);
    assert_eq!(me["settings"]["timeout_ms"], 3000);

    // Admin path (the plugin's ValidateAuth says so for POST): no admin token, 401.
    let resp = http
        .post(url(&kbs, "secrets/secret/db"))
        .body("s3cret")
        .send()
        .await
        .unwrap();
    let (status, name, _) = error_detail(resp).await;
    assert_eq!(
        (status, name.as_str()),
        (StatusCode::UNAUTHORIZED, "AdminAuthRequired"),
        "no admin token"
    );
    let resp = http
        .post(url(&kbs, "secrets/secret/db"))
        .bearer_auth(admin.token().unwrap())
        .body("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.text().await.unwrap(), "stored");

    // Attested path: no token, 401; with one, the answer is sealed to the guest's TEE key.
    let resp = http
        .get(url(&kbs, "secrets/secret/db"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let key = TeeKeyPair::new_ec();
    let token = attest(&kbs.announced, None, &key, None).await.unwrap();
    let resp = http
        .get(url(&kbs, "secrets/secret/db"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let jwe = resp.bytes().await.unwrap();
    assert!(
        !jwe.windows(6).any(|w| w == b"s3cret"),
        "sealed, never in clear"
    );
    assert_eq!(&key.open_json(&jwe).unwrap()[..], b"s3cret");
    // Another guest's key cannot open it.
    assert!(TeeKeyPair::new_ec().open_json(&jwe).is_err());

    // NeedsEncryption false: as is. Path after the name, query and method as upstream forwards them.
    let resp = http
        .get(url(&kbs, "secrets/echo/a/b%20c?x=1&y=two"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let echo: Value = resp.json().await.unwrap();
    assert_eq!(
        echo,
        json!({"method": "GET", "path": ["echo", "a", "b c"], "query": {"x": "1", "y": "two"}, "body": ""})
    );

    // The policy sees plugin `external` and the path after it, the plugin's name first.
    let resp = http
        .get(url(&kbs, "secrets/secret/forbidden"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let (status, name, _) = error_detail(resp).await;
    assert_eq!(
        (status, name.as_str()),
        (StatusCode::FORBIDDEN, "PolicyDeny")
    );

    // Upstream's status mapping: 404 stays 404, other non-2xx is a plugin error (401).
    let get = |path: &'static str| http.get(url(&kbs, path)).bearer_auth(&token).send();
    let (status, name, _) = error_detail(get("secrets/secret/nope").await.unwrap()).await;
    assert_eq!(
        (status, name.as_str()),
        (StatusCode::NOT_FOUND, "PluginNotFound")
    );
    let (status, name, _) = error_detail(get("secrets/status/500").await.unwrap()).await;
    assert_eq!(
        (status, name.as_str()),
        (StatusCode::UNAUTHORIZED, "PluginInternalError")
    );
    assert_eq!(
        get("secrets/status/201").await.unwrap().status(),
        StatusCode::OK
    );

    // An unknown external plugin is a 404 JSON error, like any unknown path.
    let resp = get("nobody/secret/db").await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);

    // Admin calls are audited; calls are counted per plugin.
    let audit = admin
        .send(
            reqwest::Method::GET,
            "/kbs/v0/admin/audit?action=external.*",
            None,
        )
        .await
        .unwrap();
    let record = &audit["records"][0];
    assert_eq!(record["action"], "external.handle");
    assert_eq!(record["target"], "external/secrets POST /secret/db");
    assert_eq!(record["outcome"], "ok");
    let metrics = http
        .get(format!("{}/metrics", kbs.announced))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("kbs_external_secrets_calls_total{rpc=\"handle\",outcome=\"ok\"}"),
        "{metrics}"
    );
}

/// Outcomes of a load loop: (ok, failures as "status name").
#[derive(Default)]
struct Tally {
    ok: usize,
    failures: Vec<String>,
}

#[tokio::test]
async fn kill_9_of_a_plugin_under_load_costs_only_its_routes_and_a_swap_or_restart_brings_them_back()
 {
    tests::init_logging();
    let dir = tempfile::tempdir().unwrap();
    let mut first = spawn_upstream_plugin("127.0.0.1:0", None).await;
    let (kbs, admin) = kbs_with(
        dir.path(),
        &external_table(
            "echo",
            &format!("http://{}", first.announced),
            "timeout_ms = 1000",
        ),
    )
    .await;
    let base = kbs.announced.clone();
    admin
        .put_resource("default/key/steady", b"steady".to_vec())
        .await
        .unwrap();

    // A real guest daemon holding a tunnel: it must not notice anything.
    let mut config = guest_daemon::run::RunConfig::new(&base, dir.path().join("g1"));
    config.init_data = Some(init_data("g1", &[("app", "web")]));
    let mut daemon = DaemonRun::spawn(config);
    let (session, _) = daemon.connected().await;

    let key = TeeKeyPair::new_ec();
    let token = attest(&base, None, &key, None).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();

    // Four clients: two on the external plugin, one fetching a resource, one pinging the guest.
    let mut external = Vec::new();
    for _ in 0..2 {
        let (http, token, stop, url) = (
            http.clone(),
            token.clone(),
            stop.clone(),
            format!("{base}/kbs/v0/external/echo/echo/x"),
        );
        external.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let resp = http.get(&url).bearer_auth(&token).send().await.unwrap();
                let status = resp.status();
                let body: Value = resp.json().await.unwrap_or(Value::Null);
                statuses.push((status, body));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            statuses
        }));
    }
    let others = {
        let (http, token, stop, key) = (http.clone(), token.clone(), stop.clone(), key.clone());
        let base = base.clone();
        let admin_key =
            kbs_core::admin_key::AdminKeyPair::load(&dir.path().join("data/admin.key")).unwrap();
        let admin = AdminClient::new(&base, admin_key, None).unwrap();
        tokio::spawn(async move {
            let mut tally = Tally::default();
            while !stop.load(Ordering::Relaxed) {
                let resp = http
                    .get(format!("{base}/kbs/v0/resource/default/key/steady"))
                    .bearer_auth(&token)
                    .send()
                    .await
                    .unwrap();
                if resp.status() == StatusCode::OK {
                    let jwe = resp.bytes().await.unwrap();
                    assert_eq!(&key.open_json(&jwe).unwrap()[..], b"steady");
                    tally.ok += 1;
                } else {
                    tally.failures.push(format!("resource {}", resp.status()));
                }
                match admin.ping_guest("g1").await {
                    Ok(_) => tally.ok += 1,
                    Err(e) => tally.failures.push(format!("ping {e}")),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tally
        })
    };

    let get = |path: &str| {
        http.get(format!("{base}/kbs/v0/external/echo/{path}"))
            .bearer_auth(&token)
            .send()
    };
    eventually("the plugin answers through the KBS", || async {
        get("echo/x").await.unwrap().status() == StatusCode::OK
    })
    .await;
    let first_pid = first.child.id().unwrap().to_string();
    assert_eq!(get("pid").await.unwrap().text().await.unwrap(), first_pid);

    // kill -9 under load: its routes answer 503 with a JSON error, quickly.
    tokio::time::sleep(Duration::from_millis(300)).await;
    first.kill_9().await;
    let started = Instant::now();
    let resp = get("echo/x").await.unwrap();
    let (status, name, detail) = error_detail(resp).await;
    assert_eq!(
        (status, name.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "PluginUnavailable"),
        "{detail}"
    );
    assert!(detail.contains("external plugin `echo`"), "{detail}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "no waiting on a dead plugin"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A replacement on a new endpoint, swapped in at run time.
    let second = spawn_upstream_plugin("127.0.0.1:0", None).await;
    let swapped = admin
        .configure_plugin(
            "external/echo",
            json!({"endpoint": format!("http://{}", second.announced)}),
        )
        .await
        .unwrap();
    assert_eq!(
        swapped["settings"]["endpoint"],
        format!("http://{}", second.announced)
    );
    let second_pid = second.child.id().unwrap().to_string();
    assert_eq!(get("pid").await.unwrap().text().await.unwrap(), second_pid);
    tokio::time::sleep(Duration::from_millis(300)).await;

    stop.store(true, Ordering::Relaxed);
    let mut seen_503 = 0;
    for task in external {
        for (status, body) in task.await.unwrap() {
            match status {
                StatusCode::OK => {}
                StatusCode::SERVICE_UNAVAILABLE => {
                    assert!(
                        body["type"]
                            .as_str()
                            .unwrap()
                            .ends_with("/PluginUnavailable"),
                        "{body}"
                    );
                    seen_503 += 1;
                }
                other => panic!("the external route answered {other}: {body}"),
            }
        }
    }
    assert!(seen_503 > 0, "the load saw the plugin down");
    let tally = others.await.unwrap();
    assert!(
        tally.failures.is_empty(),
        "other routes saw errors: {:?}",
        tally.failures
    );
    assert!(tally.ok > 10, "other routes were exercised: {}", tally.ok);
    assert!(daemon.is_running());
    let (now, _) = daemon.connected().await;
    assert_eq!(now, session, "the guest's tunnel was never cut");

    // Disabled at run time: 404 at once; enabled: answers again.
    admin
        .set_plugin_enabled("external/echo", false)
        .await
        .unwrap();
    let (status, name, _) = error_detail(get("pid").await.unwrap()).await;
    assert_eq!(
        (status, name.as_str()),
        (StatusCode::NOT_FOUND, "PluginDisabled")
    );
    admin
        .set_plugin_enabled("external/echo", true)
        .await
        .unwrap();
    assert_eq!(get("pid").await.unwrap().status(), StatusCode::OK);

    // Killed and restarted on the same address: reached again with no admin action.
    let addr = second.announced.clone();
    let mut second = second;
    second.kill_9().await;
    assert_eq!(
        get("pid").await.unwrap().status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    let third = spawn_upstream_plugin(&addr, None).await;
    let third_pid = third.child.id().unwrap().to_string();
    eventually("the restarted plugin is reached again", || async {
        let resp = get("pid").await.unwrap();
        resp.status() == StatusCode::OK && resp.text().await.unwrap() == third_pid
    })
    .await;
    daemon.stop().await;
    drop(kbs);
}

#[tokio::test]
async fn the_run_time_endpoint_survives_a_kbs_restart_until_the_config_names_another() {
    tests::init_logging();
    let dir = tempfile::tempdir().unwrap();
    let a = spawn_upstream_plugin("127.0.0.1:0", None).await;
    let b = spawn_upstream_plugin("127.0.0.1:0", None).await;
    let table = external_table("echo", &format!("http://{}", a.announced), "");
    let (kbs, admin) = kbs_with(dir.path(), &table).await;
    // A bad change is refused and changes nothing.
    let err = admin
        .configure_plugin("external/echo", json!({"endpoint": "ftp://x"}))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("endpoint"), "{err}");
    let err = admin
        .configure_plugin("external/echo", json!({"color": "red"}))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("color"), "{err}");
    admin
        .configure_plugin(
            "external/echo",
            json!({"endpoint": format!("http://{}", b.announced)}),
        )
        .await
        .unwrap();
    drop(kbs);

    let token_for = |base: String| async move {
        attest(&base, None, &TeeKeyPair::new_ec(), None)
            .await
            .unwrap()
    };
    let pid_via = |base: String, token: String| async move {
        reqwest::Client::new()
            .get(format!("{base}/kbs/v0/external/echo/pid"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let (kbs, _) = kbs_with(dir.path(), &table).await;
    let token = token_for(kbs.announced.clone()).await;
    let b_pid = b.child.id().unwrap().to_string();
    eventually("the stored endpoint is restored", || {
        let (base, token, b_pid) = (kbs.announced.clone(), token.clone(), b_pid.clone());
        async move { pid_via(base, token).await == b_pid }
    })
    .await;
    drop(kbs);

    // The operator edits the config since: the config wins.
    let c = spawn_upstream_plugin("127.0.0.1:0", None).await;
    let table = external_table("echo", &format!("http://{}", c.announced), "");
    let (kbs, _) = kbs_with(dir.path(), &table).await;
    let token = token_for(kbs.announced.clone()).await;
    let c_pid = c.child.id().unwrap().to_string();
    assert_eq!(pid_via(kbs.announced.clone(), token).await, c_pid);
}

/// In-process KBS with one external plugin at `endpoint`.
async fn in_process(endpoint: &str, extra: &str) -> TestKbs {
    let table: toml::Table = external_table("p", endpoint, extra).parse().unwrap();
    let value = table["plugins"]["external"].clone();
    TestKbs::start_with(false, move |c| {
        allow_sample(c);
        c.plugins.sections.insert("external".into(), value);
    })
    .await
}

async fn get_p(kbs: &TestKbs, token: &str, path: &str) -> reqwest::Response {
    kbs.http()
        .get(format!("{}/kbs/v0/external/p/{path}", kbs.url))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_hung_plugin_is_cut_at_its_deadline_and_a_garbage_answer_is_a_503() {
    // Accepts connections and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let kbs = in_process(&format!("http://{silent_addr}"), "timeout_ms = 300").await;
    let token = kbs.attest(&TeeKeyPair::new_ec(), None).await;
    let started = Instant::now();
    let (status, name, detail) = error_detail(get_p(&kbs, &token, "x").await).await;
    assert_eq!(
        (status, name.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "PluginUnavailable")
    );
    assert!(detail.contains("300 ms"), "{detail}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // Other routes are not held up.
    let other = kbs
        .http()
        .get(format!("{}/kbs/v0/auth", kbs.url))
        .send()
        .await
        .unwrap();
    assert_ne!(other.status(), StatusCode::SERVICE_UNAVAILABLE);

    // Answers bytes that are not HTTP/2 and hangs up.
    let garbage = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let garbage_addr = garbage.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while let Ok((mut s, _)) = garbage.accept().await {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello\x00\xff garbage")
                .await;
        }
    });
    let kbs = in_process(&format!("http://{garbage_addr}"), "timeout_ms = 2000").await;
    let token = kbs.attest(&TeeKeyPair::new_ec(), None).await;
    let started = Instant::now();
    let (status, name, _) = error_detail(get_p(&kbs, &token, "x").await).await;
    assert_eq!(
        (status, name.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "PluginUnavailable")
    );
    assert!(started.elapsed() < Duration::from_secs(3));

    // Nothing listening at all.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let kbs = in_process(&format!("http://{closed}"), "").await;
    let token = kbs.attest(&TeeKeyPair::new_ec(), None).await;
    let (status, name, _) = error_detail(get_p(&kbs, &token, "x").await).await;
    assert_eq!(
        (status, name.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "PluginUnavailable")
    );
}

#[tokio::test]
async fn a_bad_external_table_stops_the_start_naming_the_key() {
    for (table, key) in [
        (
            "name = \"Bad\"\nendpoint = \"http://a:1\"",
            "plugins.external[0].name",
        ),
        (
            "name = \"a\"\nendpoint = \"https://a:1\"",
            "plugins.external[0].ca_cert_path",
        ),
        (
            "name = \"a\"\nendpoint = \"http://a:1\"\ntls_mode = \"tls\"",
            "plugins.external[0].tls_mode",
        ),
        (
            "name = \"a\"\nendpoint = \"http://a:1\"\nbackends = []",
            "plugins.external[0]",
        ),
    ] {
        let value = toml::Value::Array(vec![toml::Value::Table(table.parse().unwrap())]);
        let mut config = server::config::Config::default();
        config.storage.data_dir = tempfile::tempdir().unwrap().keep();
        config.plugins.sections.insert("external".into(), value);
        let err = server::app::Kbs::build(config)
            .await
            .err()
            .expect("refused");
        let text = err.to_string();
        assert!(text.contains(key), "{key}: {text}");
    }
}
