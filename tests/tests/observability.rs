#![allow(clippy::unwrap_used)]
//! Observability end to end: the event log, the fleet view (filters, paging, drift, restart),
//! probes (one guest, many by selector, with a guest that times out, one that disconnects
//! mid-probe and one that is gone), and `/metrics` parsed by a Prometheus text parser. Real
//! KBS, real guests over real tunnels on loopback.

use std::time::Duration;

use guest_daemon::tee_key::TeeKeyPair;
use reqwest::{Method, StatusCode};
use rpc_defs::{HeldResource, ProbeKind, ProbeReport};
use serde_json::{Value, json};
use server::admin_client::{AdminClient, RequestBody};
use tests::{StubGuest, TestKbs, TunnelGuest, api_err, eventually, healthy};
use tokio::sync::mpsc;

const PATH: &str = "default/key/one";

/// How a test guest answers probes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Healthy, holding `PATH` at the given version.
    Answer,
    /// Never answers (for deadlines).
    Hang,
    /// Tells the test it was probed, then never answers (the test then disconnects it).
    HangAndNotify,
}

/// A guest holding `PATH` at version `held` that answers probes as `mode` says and refuses
/// pushes.
fn fleet_guest(held: u64, mode: Mode, probed: Option<mpsc::UnboundedSender<()>>) -> StubGuest {
    StubGuest::new()
        .refusing_bundles()
        .refusing_pushes()
        .on_probe(move |kind| {
            let probed = probed.clone();
            async move {
                match mode {
                    Mode::Answer => {}
                    Mode::Hang => std::future::pending::<()>().await,
                    Mode::HangAndNotify => {
                        if let Some(tx) = &probed {
                            let _ = tx.send(());
                        }
                        std::future::pending::<()>().await;
                    }
                }
                let health = Some(healthy());
                let resources = Some(vec![HeldResource {
                    uri: PATH.into(),
                    version: held,
                    sha256: "ab".repeat(32),
                    applied_at: 1_700_000_000,
                }]);
                Ok(match kind {
                    ProbeKind::Health => ProbeReport {
                        health,
                        ..ProbeReport::default()
                    },
                    ProbeKind::Resources => ProbeReport {
                        resources,
                        ..ProbeReport::default()
                    },
                    _ => ProbeReport {
                        health,
                        resources,
                        runtime: None,
                    },
                })
            }
        })
}

/// Attests as `id` labelled `app` and connects, serving `service`.
async fn connect(kbs: &TestKbs, id: &str, app: &str, service: StubGuest) -> TunnelGuest {
    let init = tests::init_data(id, &[("app", app)]);
    let info = tests::guest_info(&format!("{id}-instance"), "test-0.1", &["resources"]);
    TunnelGuest::attest_and_dial(kbs, Some(&init), info, service)
        .await
        .0
}

/// A guest that answers probes, holding `PATH` at version `held`.
async fn answer(kbs: &TestKbs, id: &str, app: &str, held: u64) -> TunnelGuest {
    connect(kbs, id, app, fleet_guest(held, Mode::Answer, None)).await
}

async fn get(admin: &AdminClient, path: &str) -> Value {
    admin.send(Method::GET, path, None).await.unwrap()
}

async fn post(admin: &AdminClient, path: &str, body: Value) -> Value {
    admin
        .send(Method::POST, path, Some(RequestBody::Json(body)))
        .await
        .unwrap()
}

fn ids(list: &Value) -> Vec<String> {
    list["guests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["guest_id"].as_str().unwrap().to_string())
        .collect()
}

async fn wait_connected(admin: &AdminClient, n: usize) {
    eventually(&format!("{n} connected"), || async move {
        ids(&get(admin, "/kbs/v0/admin/guests").await).len() == n
    })
    .await;
}

#[tokio::test]
async fn the_event_log_records_connects_disconnects_and_admin_actions() {
    let kbs = TestKbs::start_dev().await;
    let admin = kbs.admin().with_identity("alice", "admin");
    kbs.admin().set_policy(tests::ALLOW_SAMPLE).await.unwrap();
    let g1 = answer(&kbs, "g1", "db", 1).await;
    wait_connected(&admin, 1).await;
    admin.put_resource(PATH, b"secret".to_vec()).await.unwrap();
    let closed = g1.leave().await;
    assert_eq!(closed.close.code, 1000);
    eventually("g1 gone", || async {
        ids(&get(&admin, "/kbs/v0/admin/guests").await).is_empty()
    })
    .await;

    let tunnel = get(
        &admin,
        "/kbs/v0/admin/events?guest_id=g1&kind=connect,disconnect",
    )
    .await;
    let events = tunnel["events"].as_array().unwrap();
    let kinds: Vec<(&str, &str)> = events
        .iter()
        .map(|e| (e["kind"].as_str().unwrap(), e["outcome"].as_str().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        [("disconnect", "normal"), ("connect", "ok")],
        "{tunnel}"
    );
    assert!(
        events[0]["detail"].as_str().unwrap().contains("1000"),
        "{tunnel}"
    );

    // Admin actions and policy changes, with their actor (the audit log is unified in).
    let policy = get(&admin, "/kbs/v0/admin/events?kind=policy").await;
    assert_eq!(policy["events"][0]["action"], "policy.set", "{policy}");
    let alice = get(&admin, "/kbs/v0/admin/events?actor=alice%40dev").await;
    let actions: Vec<&str> = alice["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["resource.put"], "{alice}");

    // Paging backwards, newest first, and `since`.
    let all = get(&admin, "/kbs/v0/admin/events?limit=1000").await;
    let all = all["events"].as_array().unwrap().clone();
    assert!(all.len() >= 4, "{all:?}");
    let mut paged = Vec::new();
    let mut url = "/kbs/v0/admin/events?limit=2".to_string();
    loop {
        let page = get(&admin, &url).await;
        paged.extend(
            page["events"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["id"].clone()),
        );
        match page["next_before"].as_i64() {
            Some(b) => url = format!("/kbs/v0/admin/events?limit=2&before={b}"),
            None => break,
        }
    }
    let all_ids: Vec<Value> = all.iter().map(|e| e["id"].clone()).collect();
    assert_eq!(paged, all_ids);
    let newest_at = all[0]["at"].as_u64().unwrap();
    let since = get(&admin, &format!("/kbs/v0/admin/events?since={newest_at}")).await;
    let since = since["events"].as_array().unwrap();
    // Not vacuous: the newest event itself is at `newest_at`, so the page holds it.
    assert!(
        since.iter().any(|e| e["id"] == all[0]["id"]),
        "the newest event is since its own time: {since:?}"
    );
    assert!(
        since.iter().all(|e| e["at"].as_u64().unwrap() >= newest_at),
        "{since:?}"
    );
    assert!(
        all.iter()
            .filter(|e| e["at"].as_u64().unwrap() < newest_at)
            .all(|old| !since.iter().any(|e| e["id"] == old["id"])),
        "older events are filtered out"
    );

    // Bad filters and no credentials are refused.
    let e = admin
        .send(Method::GET, "/kbs/v0/admin/events?kind=bogus", None)
        .await
        .unwrap_err();
    assert_eq!(api_err(e).0, StatusCode::BAD_REQUEST);
    let resp = kbs
        .http()
        .get(format!("{}/kbs/v0/admin/events", kbs.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn the_fleet_view_filters_pages_finds_drift_and_survives_a_restart() {
    let kbs = TestKbs::start_dev().await;
    let admin = kbs.admin();
    admin.put_resource(PATH, b"v1".to_vec()).await.unwrap();
    admin.put_resource(PATH, b"v2".to_vec()).await.unwrap();
    let g1 = answer(&kbs, "g1", "db", 1).await;
    let g2 = answer(&kbs, "g2", "web", 2).await;
    let g3 = answer(&kbs, "g3", "db", 2).await;
    let _g4 = answer(&kbs, "g4", "db", 0).await;
    wait_connected(&admin, 4).await;

    // Probe the guests for their resources: held versions feed the drift query.
    let report = post(
        &admin,
        "/kbs/v0/probes",
        json!({"selector": "app in (db,web)", "kind": "resources", "concurrency": 2}),
    )
    .await;
    assert_eq!(report["selected"], 4, "{report}");
    assert_eq!(report["summary"]["ok"], 4, "{report}");
    // g1 holds version 1 and g4 version 0 of a resource at version 2: both drifted.
    let stale = get(
        &admin,
        &format!("/kbs/v0/admin/guests?connected=any&stale={PATH}"),
    )
    .await;
    assert_eq!(ids(&stale), ["g1", "g4"], "{stale}");
    let g1_view = &stale["guests"][0];
    assert_eq!(g1_view["held"][PATH]["version"], 1);
    assert_eq!(g1_view["tee"], "sample");
    assert!(g1_view["attested_at"].as_u64().unwrap() > 0);
    assert!(
        g1_view["token_expires_at"].as_u64().unwrap() > g1_view["attested_at"].as_u64().unwrap()
    );
    assert_eq!(g1_view["last_probe"]["outcome"], "ok");
    assert_eq!(g1_view["connected"], true);

    // Selector and paging.
    let db = get(&admin, "/kbs/v0/admin/guests?selector=app%3Ddb").await;
    assert_eq!(ids(&db), ["g1", "g3", "g4"]);
    let mut seen = Vec::new();
    let mut url = "/kbs/v0/admin/guests?connected=any&limit=1".to_string();
    loop {
        let page = get(&admin, &url).await;
        seen.extend(ids(&page));
        match page["next_cursor"].as_str() {
            Some(c) => url = format!("/kbs/v0/admin/guests?connected=any&limit=1&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(seen, ["g1", "g2", "g3", "g4"]);
    let e = admin
        .send(
            Method::GET,
            "/kbs/v0/admin/guests?selector=app%20in%20(",
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(
        api_err(e),
        (StatusCode::BAD_REQUEST, "InvalidSelector".into())
    );

    // A guest that leaves stays known, disconnected, with the close reason in its history.
    g3.leave().await;
    eventually("g3 disconnected", || async {
        ids(&get(&admin, "/kbs/v0/admin/guests?connected=false").await) == ["g3"]
    })
    .await;
    let gone = get(&admin, "/kbs/v0/admin/guests?connected=false").await;
    assert_eq!(
        gone["guests"][0]["history"][0]["reason"], "normal",
        "{gone}"
    );
    assert_eq!(gone["guests"][0]["history"][0]["close_code"], 1000);
    assert_eq!(
        ids(&get(&admin, "/kbs/v0/admin/guests").await),
        ["g1", "g2", "g4"]
    );
    assert_eq!(get(&admin, "/kbs/v0/admin/guests").await["known"], 4);
    drop((g1, g2));

    // After a restart every guest is still known (from storage), none connected.
    let kbs = kbs.restart().await;
    let admin = kbs.admin();
    let all = get(&admin, "/kbs/v0/admin/guests?connected=any").await;
    assert_eq!(ids(&all), ["g1", "g2", "g3", "g4"], "{all}");
    assert!(
        all["guests"]
            .as_array()
            .unwrap()
            .iter()
            .all(|g| g["connected"] == false)
    );
    assert_eq!(all["guests"][0]["held"][PATH]["version"], 1);
    let stale = get(
        &admin,
        &format!("/kbs/v0/admin/guests?connected=any&stale={PATH}"),
    )
    .await;
    assert_eq!(ids(&stale), ["g1", "g4"]);
}

#[tokio::test]
async fn selector_probes_report_timeouts_disconnects_and_absent_guests() {
    let kbs = TestKbs::start_dev().await;
    let admin = kbs.admin();
    let (tx, mut probed) = mpsc::unbounded_channel();
    let _ok = answer(&kbs, "ok", "db", 1).await;
    let _slow = connect(&kbs, "slow", "db", fleet_guest(1, Mode::Hang, None)).await;
    let dropper = connect(
        &kbs,
        "dropper",
        "db",
        fleet_guest(1, Mode::HangAndNotify, Some(tx)),
    )
    .await;
    let gone = answer(&kbs, "gone", "db", 1).await;
    let _other = answer(&kbs, "other", "web", 1).await;
    wait_connected(&admin, 5).await;
    gone.leave().await;
    wait_connected(&admin, 4).await;

    // The dropper disconnects while its probe is in flight.
    let disconnect = tokio::spawn(async move {
        probed.recv().await.unwrap();
        dropper.leave().await
    });
    let report = post(
        &admin,
        "/kbs/v0/probes",
        json!({"selector": "app=db", "kind": "health", "concurrency": 8, "deadline_ms": 1500}),
    )
    .await;
    disconnect.await.unwrap();
    let outcomes: Vec<(String, String)> = report["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["guest_id"].as_str().unwrap().to_string(),
                r["outcome"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = [
        ("dropper", "disconnected"),
        ("gone", "not_connected"),
        ("ok", "ok"),
        ("slow", "timeout"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(outcomes, want, "{report}");
    assert_eq!(report["selected"], 4);
    assert!(report["elapsed_ms"].as_u64().unwrap() < 5000, "{report}");
    assert_eq!(report["results"][2]["report"]["health"]["healthy"], true);

    // The outcome is each guest's last known state.
    let slow = get(
        &admin,
        "/kbs/v0/admin/guests?selector=app%3Ddb&connected=any",
    )
    .await;
    let last: Vec<&str> = slow["guests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["last_probe"]["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(last, ["disconnected", "not_connected", "ok", "timeout"]);

    // One guest at a time; a guest the KBS never knew is a 404; bad requests are 400.
    let one = post(&admin, "/kbs/v0/probes/ok", json!({"kind": "resources"})).await;
    assert_eq!(one["outcome"], "ok");
    assert_eq!(one["report"]["resources"][0]["version"], 1);
    let gone_now = post(&admin, "/kbs/v0/probes/gone", json!({})).await;
    assert_eq!(gone_now["outcome"], "not_connected");
    let e = admin
        .send(
            Method::POST,
            "/kbs/v0/probes/nobody",
            Some(RequestBody::Json(json!({}))),
        )
        .await
        .unwrap_err();
    assert_eq!(api_err(e), (StatusCode::NOT_FOUND, "GuestNotFound".into()));
    for bad in [
        json!({"selector": "a in ("}),
        json!({"concurrency": 0}),
        json!({"deadline_ms": 0}),
        json!({"bogus": 1}),
    ] {
        let e = admin
            .send(
                Method::POST,
                "/kbs/v0/probes",
                Some(RequestBody::Json(bad.clone())),
            )
            .await
            .unwrap_err();
        assert_eq!(api_err(e).0, StatusCode::BAD_REQUEST, "{bad}");
    }
    let resp = kbs
        .http()
        .post(format!("{}/kbs/v0/probes", kbs.url))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    // Counted by kind and outcome.
    let m = kbs.metrics().await;
    assert_eq!(
        tests::metric_value(
            &m,
            "kbs_probes_total",
            &[("kind", "health"), ("outcome", "timeout")]
        ),
        1.0
    );
    assert_eq!(
        tests::metric_value(
            &m,
            "kbs_probes_total",
            &[("kind", "health"), ("outcome", "disconnected")]
        ),
        1.0
    );
}

#[tokio::test]
async fn metrics_parse_with_a_prometheus_text_parser() {
    use prometheus_parse::{Scrape, Value as P};

    let kbs = TestKbs::start_dev().await;
    let admin = kbs.admin();
    admin.set_policy(tests::ALLOW_SAMPLE).await.unwrap();
    admin.put_resource(PATH, b"x".to_vec()).await.unwrap();
    let g = answer(&kbs, "g1", "db", 1).await;
    wait_connected(&admin, 1).await;
    post(&admin, "/kbs/v0/probes/g1", json!({"kind": "all"})).await;
    admin.ping_guest("g1").await.unwrap();
    // A resource fetch runs the policy.
    let key = TeeKeyPair::new_ec();
    let mut client = kbs.rcar_client(&key, None);
    client.get_resource(&PATH.parse().unwrap()).await.unwrap();
    get(&admin, "/kbs/v0/admin/events").await;
    // An API error, and a rollout (this guest refuses pushes: the push fails).
    let e = admin
        .send(Method::POST, "/kbs/v0/probes/nobody", None)
        .await
        .unwrap_err();
    assert_eq!(api_err(e).0, StatusCode::NOT_FOUND);
    post(
        &admin,
        "/kbs/v0/rotation/rollouts",
        json!({"path": PATH, "selector": "app=db", "max_attempts": 1}),
    )
    .await;
    let kbs_ref = &kbs;
    eventually("a push counted", || async move {
        kbs_ref
            .metrics()
            .await
            .contains("kbs_rotation_pushes_total{")
    })
    .await;
    g.leave().await;

    let text = kbs
        .http()
        .get(format!("{}/metrics", kbs.url))
        .send()
        .await
        .unwrap();
    assert!(
        text.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = text.text().await.unwrap();
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    let kind_of = |name: &str| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name)
            .map(|s| match &s.value {
                P::Counter(_) => "counter",
                P::Gauge(_) => "gauge",
                P::Histogram(_) => "histogram",
                P::Summary(_) => "summary",
                P::Untyped(_) => "untyped",
            })
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    };
    for (name, want) in [
        ("kbs_attestations_total", "counter"),
        ("kbs_tunnels_connected", "gauge"),
        ("kbs_tunnel_disconnects_total", "counter"),
        ("kbs_rpc_calls_total", "counter"),
        ("kbs_rpc_duration_seconds", "histogram"),
        ("kbs_probes_total", "counter"),
        ("kbs_probe_duration_seconds", "histogram"),
        ("kbs_policy_decisions_total", "counter"),
        ("kbs_storage_operation_duration_seconds", "histogram"),
        ("kbs_events_written_total", "counter"),
        ("kbs_events_dropped_total", "counter"),
        ("kbs_fleet_guests_known", "gauge"),
        ("kbs_http_request_duration_seconds", "histogram"),
        ("kbs_admin_actions_total", "counter"),
    ] {
        assert_eq!(kind_of(name), want, "{name}");
    }
    let attest = scrape
        .samples
        .iter()
        .find(|s| s.metric == "kbs_attestations_total" && s.labels.get("outcome") == Some("ok"))
        .unwrap();
    assert_eq!(attest.labels.get("tee"), Some("sample"));
    let rpc = scrape
        .samples
        .iter()
        .find(|s| s.metric == "kbs_rpc_duration_seconds" && s.labels.get("method") == Some("probe"))
        .expect("probe latency histogram");
    assert!(matches!(&rpc.value, P::Histogram(b) if b.len() > 5));

    // Every series the Grafana dashboard queries is a family this KBS exposes.
    let grafana = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/grafana/tether.json"),
    )
    .unwrap();
    let dashboard: Value = serde_json::from_str(&grafana).unwrap();
    let mut used = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(i) = rest.find("kbs_") {
                let name: String = rest[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[i + name.len()..];
                used.insert(name);
            }
        }
    }
    assert!(used.len() >= 15, "{used:?}");
    for name in &used {
        let family = name.strip_suffix("_bucket").unwrap_or(name);
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "the Grafana dashboard uses {name}, which /metrics does not expose"
        );
    }

    // Scrapers that ask for OpenMetrics get it.
    let om = kbs
        .http()
        .get(format!("{}/metrics", kbs.url))
        .header("accept", "application/openmetrics-text; version=1.0.0")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(om.trim_end().ends_with("# EOF"));
    assert!(om.contains("# TYPE kbs_probes counter"));
}

#[tokio::test]
async fn periodic_probes_keep_the_last_known_state() {
    let kbs = TestKbs::start_with(false, |c| {
        tests::allow_sample(c);
        c.plugins
            .set(
                "probes",
                "interval = \"100ms\"\njitter = 0.5\nkind = \"resources\"",
            )
            .unwrap();
    })
    .await;
    let admin = kbs.admin();
    let _g = answer(&kbs, "g1", "db", 7).await;
    eventually("a periodic probe recorded", || async {
        let v = get(&admin, "/kbs/v0/admin/guests").await;
        v["guests"][0]["last_probe"]["outcome"] == "ok"
            && v["guests"][0]["held"][PATH]["version"] == 7
    })
    .await;
    let v = get(&admin, "/kbs/v0/admin/guests").await;
    assert_eq!(v["guests"][0]["last_probe"]["kind"], "resources");
    // Disabling the plugin stops the rounds.
    admin
        .send(Method::POST, "/kbs/v0/plugin/disable/probes", None)
        .await
        .unwrap();
    let before = tests::metric_value(&kbs.metrics().await, "kbs_probes_total", &[]);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let after = tests::metric_value(&kbs.metrics().await, "kbs_probes_total", &[]);
    assert!(after - before <= 1.0, "{before} -> {after}");
}
