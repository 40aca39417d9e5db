#![allow(clippy::unwrap_used)]
//! The dashboard: login exchanges an admin JWT for an HttpOnly SameSite=Strict session, and
//! nothing (page, script, admin APIs) answers without it; then the whole page in headless
//! Debian chromium (playwright-core, `tests/browser/dashboard.mjs`): log in, see a guest
//! connect, start a rollout and watch it reach 100 %, disable a plugin. Screenshots land in
//! `target/browser-artifacts/`. The browser test skips, saying so, only when chromium is not
//! installed (`.ci/run` installs it, so CI always runs it).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use kbs_core::admin_key::AdminTokenRequest;
use reqwest::StatusCode;
use tests::{StubGuest, TestKbs, TunnelGuest};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

#[tokio::test]
async fn the_dashboard_refuses_access_without_a_session() {
    let kbs = TestKbs::start().await;
    let http = client();
    let url = |p: &str| format!("{}{p}", kbs.url);

    // No session: the login form (401), no script, no admin API.
    let resp = http.get(url("/dashboard")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(
        resp.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("script-src 'self'")
    );
    let body = resp.text().await.unwrap();
    assert!(body.contains("name=\"token\"") && !body.contains("whoami"));
    for path in [
        "/dashboard/app.js",
        "/kbs/v0/admin/guests",
        "/kbs/v0/admin/events",
    ] {
        let resp = http.get(url(path)).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{path}");
    }

    // Bad tokens and roles that may not read the fleet get no session.
    let key = kbs.admin_key();
    let reader = key
        .sign(&AdminTokenRequest::new(
            "eve",
            "reader",
            Duration::from_secs(60),
        ))
        .unwrap();
    for bad in ["garbage", reader.as_str()] {
        let resp = http
            .post(url("/dashboard/login"))
            .form(&[("token", bad)])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert!(resp.headers().get("set-cookie").is_none());
        let body = resp.text().await.unwrap();
        assert!(body.contains("Refused") || body.contains("not an admin token"));
        assert!(!body.contains(bad), "the token is never echoed");
    }

    // A good token: a short-lived HttpOnly SameSite=Strict cookie, never the token itself.
    let token = kbs.admin().with_identity("alice", "admin").token().unwrap();
    let resp = http
        .post(url("/dashboard/login"))
        .form(&[("token", token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let cookie = resp.headers()["set-cookie"].to_str().unwrap().to_string();
    for attr in [
        "tether-dashboard=",
        "HttpOnly",
        "SameSite=Strict",
        "Path=/",
        "Max-Age=",
    ] {
        assert!(cookie.contains(attr), "{attr} in {cookie}");
    }
    assert!(!cookie.contains(&token));
    let max_age: u64 = cookie
        .split("Max-Age=")
        .nth(1)
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(max_age > 0 && max_age <= 900, "{max_age}");
    let page = http.get(url("/dashboard")).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let page = page.text().await.unwrap();
    assert!(page.contains("alice@dev") && !page.contains(&token));
    assert!(page.contains("/dashboard/app.js"));
    let js = http.get(url("/dashboard/app.js")).send().await.unwrap();
    assert_eq!(js.status(), StatusCode::OK);

    // The session works on the admin APIs; changes need the CSRF header.
    let guests = http.get(url("/kbs/v0/admin/guests")).send().await.unwrap();
    assert_eq!(guests.status(), StatusCode::OK);
    let no_csrf = http
        .post(url("/kbs/v0/plugin/disable/probes"))
        .send()
        .await
        .unwrap();
    assert_eq!(no_csrf.status(), StatusCode::FORBIDDEN);
    let ok = http
        .post(url("/kbs/v0/plugin/disable/probes"))
        .header("x-tether-dashboard", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    let events = kbs
        .admin()
        .send(
            reqwest::Method::GET,
            "/kbs/v0/admin/events?actor=alice%40dev",
            None,
        )
        .await
        .unwrap();
    let actions: Vec<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert!(actions.contains(&"dashboard.login"), "{events}");

    // A forged or stale cookie is refused; logging out ends the session.
    let forged = reqwest::Client::new()
        .get(url("/kbs/v0/admin/guests"))
        .header("cookie", "tether-dashboard=AAAA")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), StatusCode::UNAUTHORIZED);
    let out = http.post(url("/dashboard/logout")).send().await.unwrap();
    assert_eq!(out.status(), StatusCode::SEE_OTHER);
    let after = reqwest::Client::new()
        .get(url("/kbs/v0/admin/guests"))
        .header("cookie", cookie.split(';').next().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(after.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(kbs.state.admin.sessions().len(), 0);
}

/// A guest labelled `app=browser` that acks every pushed resource (what a rollout needs).
async fn connect_guest(kbs: &TestKbs, id: &str) -> TunnelGuest {
    let init = tests::init_data(id, &[("app", "browser")]);
    let info = tests::guest_info(&format!("{id}-1"), "browser-test", &["resources"]);
    let service = StubGuest::new().refusing_bundles();
    TunnelGuest::attest_and_dial(kbs, Some(&init), info, service)
        .await
        .0
}

fn chromium() -> Option<PathBuf> {
    let candidate = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    candidate.is_file().then_some(candidate)
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

#[tokio::test]
async fn the_dashboard_works_in_headless_chromium() {
    let Some(chromium) = chromium() else {
        tests::skip(
            "the_dashboard_works_in_headless_chromium",
            "no chromium at /usr/bin/chromium (install Debian's: apt-get install -y chromium \
             chromium-driver; .ci/run does)",
        );
        return;
    };
    let browser_dir = repo_root().join("tests/browser");
    if !browser_dir.join("node_modules/playwright-core").is_dir() {
        let status = std::process::Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&browser_dir)
            .status()
            .expect("npm (Node.js) is needed to drive chromium");
        assert!(status.success(), "npm ci in tests/browser failed");
    }
    let artifacts = repo_root().join("target/browser-artifacts");

    let kbs = TestKbs::start().await;
    let admin = kbs.admin();
    admin.set_policy(tests::ALLOW_SAMPLE).await.unwrap();
    admin
        .put_resource("default/key/browser", b"rotated secret".to_vec())
        .await
        .unwrap();
    let token = kbs
        .admin()
        .with_identity("browser", "admin")
        .token()
        .unwrap();

    let mut node = tokio::process::Command::new("node")
        .arg(browser_dir.join("dashboard.mjs"))
        .current_dir(&browser_dir)
        .env("KBS_URL", &kbs.url)
        .env("ADMIN_TOKEN", &token)
        .env("ARTIFACTS", &artifacts)
        .env("GUEST_ID", "g-browser")
        .env("ROLLOUT_PATH", "default/key/browser")
        .env("ROLLOUT_SELECTOR", "app=browser")
        .env("CHROMIUM", &chromium)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs");
    let mut stdin = node.stdin.take().unwrap();
    let mut lines = BufReader::new(node.stdout.take().unwrap()).lines();
    let mut sessions = Vec::new();
    let mut done = false;
    let run = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            println!("browser: {line}");
            if line == "NEED_GUEST" {
                sessions.push(connect_guest(&kbs, "g-browser").await);
                stdin.write_all(b"GUEST_UP\n").await.unwrap();
                stdin.flush().await.unwrap();
            }
            if line == "DONE" {
                done = true;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .expect("the browser test finishes within 3 minutes");
    let status = tokio::time::timeout(Duration::from_secs(30), node.wait())
        .await
        .expect("node exits")
        .unwrap();
    assert!(
        status.success() && done,
        "browser test failed ({status}); screenshots in {}",
        artifacts.display()
    );
    for shot in [
        "01-login",
        "02-dashboard",
        "03-guest-connected",
        "04-rollout-done",
        "05-plugin-disabled",
    ] {
        assert!(artifacts.join(format!("{shot}.png")).is_file(), "{shot}");
    }
    // What the browser did is on the record.
    let rollouts = admin
        .send(reqwest::Method::GET, "/kbs/v0/rotation/rollouts", None)
        .await
        .unwrap();
    assert_eq!(
        rollouts["rollouts"][0]["created_by"], "browser@dev",
        "{rollouts}"
    );
    let plugins = admin
        .send(reqwest::Method::GET, "/kbs/v0/plugin", None)
        .await
        .unwrap();
    let probes = plugins["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "probes")
        .unwrap();
    assert_eq!(probes["enabled"], false);
    drop(sessions);
}
