#![allow(clippy::unwrap_used)]
//! Key rotation end to end: a real KBS, real guest daemons (`guest_daemon::run`) on loopback,
//! rollouts started through the admin API and watched through its event stream.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use guest_daemon::hook::PostApplyHook;
use guest_daemon::run::{DaemonState, RunConfig};
use guest_daemon::tee_key::{TeeKeyPair, UnsealError};
use kbs_core::storage::{RolloutState, TargetRecord, TargetState};
use plugin_rotation::{Control, RolloutView, StartRollout};
use reqwest::StatusCode;
use server::admin_client::AdminClient;
use tests::{
    ALLOW_SAMPLE, DaemonRun, StubGuest, TestKbs, api_err_detail, eventually_within, hub_until,
    unseal_with,
};
use tokio_util::sync::CancellationToken;

/// How long any single wait may take before the test fails.
const WAIT: Duration = Duration::from_secs(20);

fn init_data(guest_id: &str, labels: &[(&str, &str)]) -> String {
    let mut s = format!("[tether]\nguest_id = \"{guest_id}\"\n\n[tether.labels]\n");
    for (k, v) in labels {
        s.push_str(&format!("{k} = \"{v}\"\n"));
    }
    s
}

struct Daemon {
    guest_id: String,
    run: DaemonRun,
    init: String,
    hook: Option<String>,
}

impl Daemon {
    fn spawn(
        kbs: &TestKbs,
        root: &Path,
        guest_id: &str,
        labels: &[(&str, &str)],
        hook: Option<String>,
    ) -> Self {
        let state_dir = root.join(guest_id);
        let init = init_data(guest_id, labels);
        Self::spawn_with(kbs, guest_id, state_dir, init, hook)
    }

    fn spawn_with(
        kbs: &TestKbs,
        guest_id: &str,
        state_dir: PathBuf,
        init: String,
        hook: Option<String>,
    ) -> Self {
        Self::spawn_offering(kbs, guest_id, state_dir, init, hook, true)
    }

    /// `push_key: false` offers only `tether.v1`: pushes then come sealed to the TEE key.
    fn spawn_offering(
        kbs: &TestKbs,
        guest_id: &str,
        state_dir: PathBuf,
        init: String,
        hook: Option<String>,
        push_key: bool,
    ) -> Self {
        let mut config = kbs.daemon_config(&state_dir, Some(init.clone()));
        config.push_key = push_key;
        config.hook = hook.clone().map(PostApplyHook::new);
        Self {
            guest_id: guest_id.to_string(),
            run: DaemonRun::spawn(config),
            init,
            hook,
        }
    }

    async fn connected(&mut self) {
        tokio::time::timeout(
            WAIT,
            self.run
                .state
                .wait_for(|s| matches!(s, DaemonState::Connected { .. })),
        )
        .await
        .expect("daemon connects in time")
        .expect("daemon state channel open");
    }

    async fn stop(self) -> (String, PathBuf, String, Option<String>) {
        let state_dir = self.run.state_dir.clone();
        self.run.stop().await;
        (self.guest_id, state_dir, self.init, self.hook)
    }

    /// The plaintext the daemon holds for `path`, if any.
    fn held(&self, path: &str) -> Option<Vec<u8>> {
        self.run.held(path)
    }
}

async fn setup() -> (TestKbs, AdminClient, tempfile::TempDir) {
    let kbs = TestKbs::start().await;
    let admin = kbs.admin();
    admin.set_policy(ALLOW_SAMPLE).await.unwrap();
    (kbs, admin, tempfile::tempdir().unwrap())
}

fn start(path: &str, selector: &str) -> StartRollout {
    StartRollout {
        path: path.into(),
        selector: selector.into(),
        ..StartRollout::default()
    }
}

async fn watch_until(
    admin: &AdminClient,
    id: i64,
    what: &str,
    done: impl Fn(&RolloutView) -> bool,
) -> RolloutView {
    tests::watch_rollout_until(admin, id, WAIT, what, done).await
}

fn count(v: &RolloutView, s: TargetState) -> u64 {
    tests::target_count(v, s)
}

#[tokio::test]
async fn only_matching_guests_get_the_version_and_an_offline_one_gets_it_on_reconnect() {
    let (kbs, admin, root) = setup().await;
    let path = "default/key/db-pass";
    admin.put_resource(path, b"v1".to_vec()).await.unwrap();
    let mut daemons = Vec::new();
    for (id, app) in [
        ("g1", "db"),
        ("g2", "db"),
        ("g3", "db"),
        ("g4", "web"),
        ("g5", "db"),
    ] {
        // g2 speaks only `tether.v1`: its push is sealed to its TEE key, the others' to
        // their tunnels' push keys.
        let init = init_data(id, &[("app", app)]);
        let mut d = Daemon::spawn_offering(&kbs, id, root.path().join(id), init, None, id != "g2");
        d.connected().await;
        kbs.tunnel(id).await;
        daemons.push(d);
    }
    for (id, has_key) in [("g1", true), ("g2", false), ("g3", true)] {
        let handle = kbs.state.hub.get(id).unwrap();
        assert_eq!(handle.push_key().is_some(), has_key, "{id}");
    }
    // g5 goes offline once rotation has noted it.
    eventually_within(WAIT, "g5 noted by rotation", || async {
        kbs.state
            .store
            .rotation_guests(0)
            .await
            .unwrap()
            .iter()
            .any(|(g, _)| g == "g5")
    })
    .await;
    let g5 = daemons.pop().unwrap().stop().await;
    hub_until(&kbs.state.hub, WAIT, "g5 out of the hub", |hub| {
        hub.get("g5").is_none()
    })
    .await;

    admin.put_resource(path, b"v2".to_vec()).await.unwrap();
    let started = admin.start_rollout(&start(path, "app=db")).await.unwrap();
    assert_eq!(started.rollout.version, 2, "latest by default");
    assert_eq!(started.total, 4, "g1-g3 connected, g5 known offline");
    let id = started.rollout.id;
    let view = watch_until(&admin, id, "3 acks", |v| count(v, TargetState::Acked) == 3).await;
    assert_eq!(count(&view, TargetState::Pending), 1, "{view:?}");
    assert_eq!(view.rollout.state, RolloutState::Running);
    for d in &daemons[..3] {
        assert_eq!(d.held(path).as_deref(), Some(&b"v2"[..]), "{}", d.guest_id);
    }
    assert_eq!(daemons[3].held(path), None, "g4 does not match");
    let detail = admin.rollout(id, "state=pending").await.unwrap();
    assert_eq!(detail.targets.len(), 1);
    assert_eq!(detail.targets[0].guest_id, "g5");
    let acked = admin.rollout(id, "state=acked").await.unwrap();
    for t in &acked.targets {
        assert_eq!(t.held_version, Some(2));
        let v2 = format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(b"v2"));
        assert_eq!(t.digest.as_deref(), Some(v2.as_str()));
        assert!(!t.already_held);
    }

    // g5 comes back: it gets the version, and the rollout completes.
    let (g5_id, g5_dir, g5_init, _) = g5;
    let mut g5 = Daemon::spawn_with(&kbs, &g5_id, g5_dir, g5_init, None);
    g5.connected().await;
    let view = watch_until(&admin, id, "completion", |v| {
        v.rollout.state == RolloutState::Completed
    })
    .await;
    assert_eq!(count(&view, TargetState::Acked), 4, "{view:?}");
    assert_eq!(g5.held(path).as_deref(), Some(&b"v2"[..]));

    // A newcomer that matches gets it on connect; one that does not, does not.
    let mut g6 = Daemon::spawn(&kbs, root.path(), "g6", &[("app", "db")], None);
    g6.connected().await;
    eventually_within(WAIT, "g6 acked", || async {
        count(
            &admin.rollout(id, "").await.unwrap().view,
            TargetState::Acked,
        ) == 5
    })
    .await;
    assert_eq!(g6.held(path).as_deref(), Some(&b"v2"[..]));

    let metrics = kbs.metrics().await;
    assert!(
        tests::metric_value(
            &metrics,
            "kbs_rotation_pushes_total",
            &[("outcome", "acked")]
        ) >= 5.0,
        "{metrics}"
    );
    assert!(tests::metric_value(&metrics, "kbs_rotation_delivery_seconds_count", &[]) >= 5.0);
    let audit = admin
        .send(
            reqwest::Method::GET,
            "/kbs/v0/admin/audit?action=rotation.*",
            None,
        )
        .await
        .unwrap();
    assert_eq!(audit["records"][0]["action"], "rotation.start");
    assert_eq!(audit["records"][0]["actor"], "kbsctl@dev");
    for d in daemons {
        d.stop().await;
    }
}

#[tokio::test]
async fn a_kbs_restart_mid_rollout_resumes_and_acks_every_guest_once() {
    let (kbs, admin, root) = setup().await;
    let path = "default/key/api";
    admin.put_resource(path, b"one".to_vec()).await.unwrap();
    admin.put_resource(path, b"two".to_vec()).await.unwrap();
    // Each apply runs a slow hook that counts its runs, so the rollout takes a while and a
    // replayed push that re-applied would show.
    let mut daemons = Vec::new();
    for n in 0..4 {
        let id = format!("r{n}");
        let counter = root.path().join(format!("{id}.hooks"));
        let hook = format!("echo $TETHER_VERSION >> {}; sleep 0.4", counter.display());
        let mut d = Daemon::spawn(&kbs, root.path(), &id, &[("app", "api")], Some(hook));
        d.connected().await;
        kbs.tunnel(&id).await;
        daemons.push(d);
    }
    let mut req = start(path, "app=api");
    req.max_concurrent = Some(1);
    let id = admin.start_rollout(&req).await.unwrap().rollout.id;
    watch_until(&admin, id, "the first ack", |v| {
        count(v, TargetState::Acked) >= 1
    })
    .await;

    let kbs = kbs.restart().await;
    let admin = kbs.admin();
    let view = watch_until(&admin, id, "completion after the restart", |v| {
        v.rollout.state == RolloutState::Completed
    })
    .await;
    assert_eq!(count(&view, TargetState::Acked), 4, "{view:?}");
    for d in &daemons {
        assert_eq!(d.held(path).as_deref(), Some(&b"two"[..]));
        let runs =
            std::fs::read_to_string(root.path().join(format!("{}.hooks", d.guest_id))).unwrap();
        assert_eq!(runs, "2\n", "{} applied version 2 exactly once", d.guest_id);
    }
    let targets = admin.rollout(id, "").await.unwrap().targets;
    assert_eq!(targets.len(), 4);
    for t in &targets {
        assert_eq!(t.state, TargetState::Acked, "{t:?}");
        // A push replayed after the restart finds the version held: no second hook run.
        let expected_hook = if t.already_held { None } else { Some(0) };
        assert_eq!(t.hook_status, expected_hook, "{t:?}");
    }
    for d in daemons {
        d.stop().await;
    }
}

/// A guest on a real tunnel whose pushes are recorded (the JWE as it arrived) and acked.
struct RecordingTunnel {
    push_key: Option<tunnel::PushKey>,
    session: tunnel::TunnelSession,
    served: tokio::task::JoinHandle<tunnel::Closed>,
    pushes: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
}

impl RecordingTunnel {
    async fn dial(kbs: &TestKbs, token: &str, key: &TeeKeyPair) -> Self {
        let info = tests::guest_info("rec", "test", &[]);
        let tunnel = tunnel::connect(&kbs.tunnel_config(), token, info, unseal_with(key))
            .await
            .unwrap();
        let push_key = tunnel.welcome().push_key.clone();
        let pushes: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>> = Default::default();
        let recorded = pushes.clone();
        let guest = StubGuest::new().on_apply(move |resource| {
            recorded.lock().unwrap().push(resource.jwe.clone());
            async move { Ok(tests::acknowledge(resource)) }
        });
        let session = tunnel.session();
        let served = tokio::spawn(tunnel.serve(guest));
        Self {
            push_key,
            session,
            served,
            pushes,
        }
    }

    async fn leave(self) {
        self.session.close();
        tokio::time::timeout(WAIT, self.served)
            .await
            .unwrap()
            .unwrap();
    }
}

#[tokio::test]
async fn every_tunnel_gets_a_push_key_of_its_own_and_a_push_opens_only_with_its_tunnels_key() {
    let (kbs, admin, _root) = setup().await;
    let path = "default/key/pk";
    admin
        .put_resource(path, b"for the second tunnel".to_vec())
        .await
        .unwrap();
    let key = TeeKeyPair::new_ec();
    let token = kbs
        .attest(&key, Some(&init_data("pk1", &[("app", "pk")])))
        .await;

    // Connection 1, then connection 2 of the same guest with the same token.
    let first = RecordingTunnel::dial(&kbs, &token, &key).await;
    let first_key = first
        .push_key
        .clone()
        .expect("a tether.v2 tunnel has a push key");
    let handle = kbs.tunnel("pk1").await;
    assert_eq!(
        handle.push_key(),
        Some(&first_key),
        "both ends hold the same key"
    );
    first.leave().await;
    let second = RecordingTunnel::dial(&kbs, &token, &key).await;
    let second_key = second.push_key.clone().expect("push key");
    let handle = tests::tunnel_of(&kbs.state.hub, WAIT, "pk1", |h| {
        h.session_id != handle.session_id
    })
    .await;
    assert_eq!(handle.push_key(), Some(&second_key));
    assert_ne!(first_key, second_key, "a new key with every connection");
    // Another guest connected at the same time has a key of its own too.
    let other_key = TeeKeyPair::new_ec();
    let other_token = kbs
        .attest(&other_key, Some(&init_data("pk2", &[("app", "pk")])))
        .await;
    let other = RecordingTunnel::dial(&kbs, &other_token, &other_key).await;
    let third_key = other.push_key.clone().expect("push key");
    assert!(third_key != first_key && third_key != second_key);

    let id = admin
        .start_rollout(&start(path, "app=pk"))
        .await
        .unwrap()
        .rollout
        .id;
    watch_until(&admin, id, "both acked", |v| {
        v.rollout.state == RolloutState::Completed
    })
    .await;
    let pushes = second.pushes.lock().unwrap().clone();
    assert_eq!(pushes.len(), 1, "one push on the live tunnel");
    let jwe: serde_json::Value = serde_json::from_slice(&pushes[0]).unwrap();
    assert_eq!(jwe["encrypted_key"], "");
    let opened = key
        .open_json_with(&pushes[0], Some(second_key.bytes()))
        .unwrap();
    assert_eq!(opened.as_slice(), b"for the second tunnel");
    for (wrong, what) in [
        (&first_key, "the first tunnel's key"),
        (&third_key, "another guest's"),
    ] {
        let err = key
            .open_json_with(&pushes[0], Some(wrong.bytes()))
            .unwrap_err();
        assert!(matches!(err, UnsealError::Decrypt), "{what}: {err}");
    }
    // Without a push key (what a tether.v1 guest holds) it does not open with the TEE key.
    assert!(matches!(
        key.open_json(&pushes[0]),
        Err(UnsealError::NoPushKey)
    ));
    other.leave().await;
    second.leave().await;
}

const DENY_UNTRUSTED: &str = r#"
package policy

import rego.v1

default allow := false

untrusted if input.tether.labels.tier == "untrusted"

allow if {
	input["submods"]["cpu0"]["ear.status"] == "affirming"
	not untrusted
}

# Untrusted guests may still hold a tunnel: every push over it is asked as `resource`.
allow if {
	input["submods"]["cpu0"]["ear.status"] == "affirming"
	data.plugin == "tunnel"
}
"#;

#[tokio::test]
async fn a_denied_guest_gets_nothing_and_a_failing_guest_fails_with_the_reason() {
    let (kbs, admin, root) = setup().await;
    admin.set_policy(DENY_UNTRUSTED).await.unwrap();
    let path = "default/key/tls";
    admin.put_resource(path, b"cert".to_vec()).await.unwrap();
    let mut ok = Daemon::spawn(&kbs, root.path(), "ok", &[("app", "tls")], None);
    let mut denied = Daemon::spawn(
        &kbs,
        root.path(),
        "denied",
        &[("app", "tls"), ("tier", "untrusted")],
        None,
    );
    let mut broken = Daemon::spawn(&kbs, root.path(), "broken", &[("app", "tls")], None);
    for d in [&mut ok, &mut denied, &mut broken] {
        d.connected().await;
        kbs.tunnel(&d.guest_id).await;
    }
    // The broken guest cannot write the resource: a file sits where its directory goes.
    let blocker = broken.run.state_dir.join("resources/default");
    std::fs::create_dir_all(blocker.parent().unwrap()).unwrap();
    std::fs::write(&blocker, b"not a directory").unwrap();

    let mut req = start(path, "app=tls");
    req.max_attempts = Some(2);
    let id = admin.start_rollout(&req).await.unwrap().rollout.id;
    let view = watch_until(&admin, id, "completion", |v| {
        v.rollout.state == RolloutState::Completed
    })
    .await;
    assert_eq!(count(&view, TargetState::Acked), 1, "{view:?}");
    assert_eq!(count(&view, TargetState::Denied), 1, "{view:?}");
    assert_eq!(count(&view, TargetState::Failed), 1, "{view:?}");
    let targets = admin.rollout(id, "").await.unwrap().targets;
    let by = |g: &str| targets.iter().find(|t| t.guest_id == g).unwrap().clone();
    let d = by("denied");
    assert_eq!(d.attempts, 0, "nothing was sent");
    assert!(d.reason.contains("policy denies"), "{}", d.reason);
    assert_eq!(denied.held(path), None);
    let b = by("broken");
    assert_eq!(b.attempts, 2);
    assert!(b.reason.contains("storage failed"), "{}", b.reason);
    assert!(
        b.reason.contains("gave up after 2 attempts"),
        "{}",
        b.reason
    );
    assert_eq!(ok.held(path).as_deref(), Some(&b"cert"[..]));

    // A rollout of an older version is refused by the guest that holds a newer one.
    admin.put_resource(path, b"cert2".to_vec()).await.unwrap();
    let newer = start(path, "app=tls,!tier");
    let id2 = admin.start_rollout(&newer).await.unwrap().rollout.id;
    watch_until(&admin, id2, "v2 to ok", |v| {
        count(v, TargetState::Acked) >= 1
    })
    .await;
    let mut old = start(path, "app=tls,!tier");
    old.version = Some(1);
    old.max_attempts = Some(1);
    let id3 = admin.start_rollout(&old).await.unwrap().rollout.id;
    assert_eq!(
        admin.rollout(id2, "").await.unwrap().view.rollout.state,
        RolloutState::Superseded
    );
    watch_until(&admin, id3, "the downgrade refusal", |v| {
        count(v, TargetState::Failed) >= 1 && v.rollout.state == RolloutState::Completed
    })
    .await;
    let t = admin.rollout(id3, "state=failed").await.unwrap().targets;
    let refused = t.iter().find(|t| t.guest_id == "ok").unwrap();
    assert!(refused.reason.contains("downgrade"), "{}", refused.reason);
    assert_eq!(ok.held(path).as_deref(), Some(&b"cert2"[..]));
    for d in [ok, denied, broken] {
        d.stop().await;
    }
}

/// Issue 17, defect 8: deleting a resource stops its rollouts (recorded in the audit log), a
/// guest that comes back afterwards gets nothing, and a rollout started without a deadline
/// has the default one.
#[tokio::test]
async fn deleting_the_resource_cancels_its_rollouts_and_nothing_erased_is_delivered() {
    let (kbs, admin, root) = setup().await;
    let path = "default/key/doomed";
    admin
        .put_resource(path, b"erase me".to_vec())
        .await
        .unwrap();
    let mut online = Daemon::spawn(&kbs, root.path(), "del-1", &[("app", "del")], None);
    let mut away = Daemon::spawn(&kbs, root.path(), "del-2", &[("app", "del")], None);
    for d in [&mut online, &mut away] {
        d.connected().await;
        kbs.tunnel(&d.guest_id).await;
    }
    eventually_within(WAIT, "del-2 noted by rotation", || async {
        kbs.state
            .store
            .rotation_guests(0)
            .await
            .unwrap()
            .iter()
            .any(|(g, _)| g == "del-2")
    })
    .await;
    let (away_id, away_dir, away_init, _) = away.stop().await;
    hub_until(&kbs.state.hub, WAIT, "del-2 out of the hub", |hub| {
        hub.get("del-2").is_none()
    })
    .await;

    let started = admin.start_rollout(&start(path, "app=del")).await.unwrap();
    let id = started.rollout.id;
    let deadline = started
        .rollout
        .deadline_at
        .expect("a rollout has a deadline by default");
    let week = 7 * 24 * 3600 * 1000;
    assert!(
        deadline > started.rollout.created_at && deadline <= started.rollout.created_at + week,
        "{deadline}"
    );
    watch_until(&admin, id, "del-1 acked", |v| {
        count(v, TargetState::Acked) == 1
    })
    .await;

    admin.delete_resource(path).await.unwrap();
    eventually_within(WAIT, "the rollout cancelled", || async {
        admin.rollout(id, "").await.unwrap().view.rollout.state == RolloutState::Cancelled
    })
    .await;
    let rollout = admin.rollout(id, "").await.unwrap().view.rollout;
    assert!(rollout.detail.contains("deleted"), "{}", rollout.detail);
    // The cancel is audited just after the engine stored it: wait for the record.
    let cancels = || async {
        admin
            .send(
                reqwest::Method::GET,
                "/kbs/v0/admin/audit?action=rotation.cancel",
                None,
            )
            .await
            .unwrap()
    };
    eventually_within(WAIT, "the cancel audited", || async {
        cancels().await["records"][0].is_object()
    })
    .await;
    let audit = cancels().await;
    let record = &audit["records"][0];
    assert_eq!(record["target"], format!("rollout {id}"), "{audit}");
    assert!(record["detail"].as_str().unwrap().contains(path), "{audit}");
    assert_eq!(record["actor"], "kbsctl@dev", "the admin who deleted it");

    // The guest that was away comes back: nothing is pushed to it.
    let mut back = Daemon::spawn_with(&kbs, &away_id, away_dir, away_init, None);
    back.connected().await;
    kbs.tunnel("del-2")
        .await
        .ping(vec![0; 4], None)
        .await
        .unwrap();
    tokio::time::sleep(plugin_rotation::engine::RECONCILE_EVERY + Duration::from_millis(500)).await;
    assert_eq!(back.held(path), None, "an erased version was delivered");
    let targets = admin.rollout(id, "").await.unwrap().targets;
    let t = targets.iter().find(|t| t.guest_id == "del-2").unwrap();
    assert_ne!(t.state, TargetState::Acked, "{t:?}");
    for d in [online, back] {
        d.stop().await;
    }
}

#[tokio::test]
async fn concurrent_rollouts_of_different_resources_do_not_interfere() {
    let (kbs, admin, root) = setup().await;
    let (a, b) = ("default/key/a", "default/key/b");
    admin.put_resource(a, b"a1".to_vec()).await.unwrap();
    admin.put_resource(b, b"b1".to_vec()).await.unwrap();
    let mut daemons = Vec::new();
    for n in 0..4 {
        let id = format!("c{n}");
        let team = if n < 2 { "x" } else { "y" };
        let mut d = Daemon::spawn(&kbs, root.path(), &id, &[("team", team)], None);
        d.connected().await;
        kbs.tunnel(&id).await;
        daemons.push(d);
    }
    let mut ra = start(a, "team in (x,y)");
    ra.max_concurrent = Some(1);
    let mut rb = start(b, "team=y");
    rb.max_concurrent = Some(2);
    let (va, vb) = tokio::join!(admin.start_rollout(&ra), admin.start_rollout(&rb));
    let (ia, ib) = (va.unwrap().rollout.id, vb.unwrap().rollout.id);
    let done = |v: &RolloutView| v.rollout.state == RolloutState::Completed;
    let (fa, fb) = tokio::join!(
        watch_until(&admin, ia, "rollout a", done),
        watch_until(&admin, ib, "rollout b", done)
    );
    assert_eq!((fa.total, count(&fa, TargetState::Acked)), (4, 4));
    assert_eq!((fb.total, count(&fb, TargetState::Acked)), (2, 2));
    for (n, d) in daemons.iter().enumerate() {
        assert_eq!(d.held(a).as_deref(), Some(&b"a1"[..]));
        let expect_b = (n >= 2).then_some(&b"b1"[..]);
        assert_eq!(d.held(b).as_deref(), expect_b);
    }
    let list = admin.list_rollouts(true, 10).await.unwrap();
    assert_eq!(list.rollouts.len(), 2);
    for d in daemons {
        d.stop().await;
    }
}

#[tokio::test]
async fn bad_input_is_refused_clearly_and_controls_work() {
    let kbs = TestKbs::start_with(false, |c| {
        c.admin
            .roles
            .insert("reader".into(), vec!["GET ^/kbs/.+$".into()]);
    })
    .await;
    let admin = kbs.admin();
    let path = "default/key/x";
    admin.put_resource(path, b"x".to_vec()).await.unwrap();

    let e = api_err_detail(
        admin
            .start_rollout(&start("default/key/nope", "app=a"))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (e.0, e.1.as_str()),
        (StatusCode::NOT_FOUND, "ResourceNotFound")
    );
    let mut v9 = start(path, "app=a");
    v9.version = Some(9);
    let e = api_err_detail(admin.start_rollout(&v9).await.unwrap_err());
    assert_eq!(
        (e.0, e.1.as_str()),
        (StatusCode::NOT_FOUND, "VersionNotFound")
    );
    assert!(e.2.contains("versions: 1"), "{}", e.2);
    let e = api_err_detail(
        admin
            .start_rollout(&start(path, "app in prod"))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (e.0, e.1.as_str()),
        (StatusCode::BAD_REQUEST, "InvalidSelector")
    );
    assert!(e.2.contains("expected `(`"), "{}", e.2);
    let e = api_err_detail(
        admin
            .start_rollout(&start("../etc/x", ""))
            .await
            .unwrap_err(),
    );
    assert_eq!(e.0, StatusCode::BAD_REQUEST);
    let mut zero = start(path, "");
    zero.max_concurrent = Some(0);
    let e = api_err_detail(admin.start_rollout(&zero).await.unwrap_err());
    assert_eq!(
        (e.0, e.1.as_str()),
        (StatusCode::BAD_REQUEST, "InvalidRollout")
    );
    let raw = admin
        .send(
            reqwest::Method::POST,
            "/kbs/v0/rotation/rollouts",
            Some(server::admin_client::RequestBody::Json(
                serde_json::json!({"path": path, "selector": "", "bogus": 1}),
            )),
        )
        .await
        .unwrap_err();
    assert_eq!(api_err_detail(raw).0, StatusCode::BAD_REQUEST);
    let reader = kbs.admin().with_identity("viewer", "reader");
    let e = api_err_detail(reader.start_rollout(&start(path, "")).await.unwrap_err());
    assert_eq!(e.0, StatusCode::FORBIDDEN);
    assert!(
        reader
            .list_rollouts(false, 10)
            .await
            .unwrap()
            .rollouts
            .is_empty(),
        "nothing was created"
    );

    // Controls: pause, resume, cancel; a finished rollout refuses them.
    let r = admin.start_rollout(&start(path, "app=none")).await.unwrap();
    let id = r.rollout.id;
    let paused = admin.control_rollout(id, Control::Pause).await.unwrap();
    assert_eq!(paused.rollout.state, RolloutState::Paused);
    let resumed = admin.control_rollout(id, Control::Resume).await.unwrap();
    assert_eq!(resumed.rollout.state, RolloutState::Completed, "no targets");
    let cancelled = admin.control_rollout(id, Control::Cancel).await.unwrap();
    assert_eq!(cancelled.rollout.state, RolloutState::Cancelled);
    let e = api_err_detail(
        admin
            .control_rollout(id, Control::Resume)
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (e.0, e.1.as_str()),
        (StatusCode::CONFLICT, "RolloutFinished")
    );
    let e = api_err_detail(
        admin
            .control_rollout(999, Control::Pause)
            .await
            .unwrap_err(),
    );
    assert_eq!(e.0, StatusCode::NOT_FOUND);
    let e = api_err_detail(admin.rollout(999, "").await.unwrap_err());
    assert_eq!(
        (e.0, e.1.as_str()),
        (StatusCode::NOT_FOUND, "RolloutNotFound")
    );
    let audit = admin
        .send(
            reqwest::Method::GET,
            "/kbs/v0/admin/audit?action=rotation.*",
            None,
        )
        .await
        .unwrap();
    let actions: Vec<&str> = audit["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "rotation.pause",
            "rotation.resume",
            "rotation.cancel",
            "rotation.resume",
            "rotation.pause",
            "rotation.start"
        ],
        "newest first, refusals included"
    );
    assert_eq!(audit["records"][0]["outcome"], "refused");
}

/// A `kbs` process on `listen`; returns it and its base URL (from its banner).
async fn spawn_kbs(data_dir: &Path, listen: &str) -> (tokio::process::Child, String) {
    let kbs = tests::spawn_kbs_on(listen, data_dir, None).await;
    (kbs.child, kbs.announced)
}

#[tokio::test]
async fn kill_9_of_the_kbs_binary_mid_rollout_loses_no_ack_and_repeats_no_apply() {
    tests::init_logging();
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("kbs-data");
    let (mut kbs, url) = spawn_kbs(&data, "127.0.0.1:0").await;
    let listen = url.trim_start_matches("http://").to_string();
    let key = kbs_core::admin_key::AdminKeyPair::load(&data.join("admin.key")).unwrap();
    let admin = AdminClient::new(&url, key, None).unwrap();
    admin.set_policy(ALLOW_SAMPLE).await.unwrap();
    let path = "default/key/k9";
    admin.put_resource(path, b"before".to_vec()).await.unwrap();
    admin.put_resource(path, b"after".to_vec()).await.unwrap();

    let mut daemons = Vec::new();
    let started = |id: &str| root.path().join(format!("{id}.started"));
    for n in 0..4 {
        let id = format!("k{n}");
        let counter = root.path().join(format!("{id}.hooks"));
        // The hook marks its start, then takes long enough for the kill to land inside it.
        let hook = format!(
            "touch {}; echo $TETHER_VERSION >> {}; sleep 1",
            started(&id).display(),
            counter.display()
        );
        let mut config = RunConfig::new(&url, root.path().join(&id));
        config.init_data = Some(init_data(&id, &[("app", "k9")]));
        config.hook = Some(PostApplyHook::new(hook));
        let mut state = config.subscribe();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(guest_daemon::run::run(config, shutdown.clone()));
        tokio::time::timeout(
            WAIT,
            state.wait_for(|s| matches!(s, DaemonState::Connected { .. })),
        )
        .await
        .unwrap()
        .unwrap();
        daemons.push((id, shutdown, task));
    }
    let mut req = start(path, "app=k9");
    req.max_concurrent = Some(1);
    let id = admin.start_rollout(&req).await.unwrap().rollout.id;
    watch_until(&admin, id, "the first ack", |v| {
        count(v, TargetState::Acked) >= 1
    })
    .await;
    // Kill while the next guest's hook runs: its target is in flight, not between pushes.
    let (in_flight, before) = tokio::time::timeout(WAIT, async {
        loop {
            let targets = admin.rollout(id, "").await.unwrap().targets;
            let running = targets
                .iter()
                .find(|t| t.state == TargetState::Delivering && started(&t.guest_id).exists())
                .map(|t| t.guest_id.clone());
            if let Some(guest) = running {
                let rows: BTreeMap<String, TargetRecord> = targets
                    .into_iter()
                    .map(|t| (t.guest_id.clone(), t))
                    .collect();
                return (guest, rows);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("a guest's hook starts after the first ack");
    kbs.kill().await.unwrap();
    tracing::info!(%in_flight, "killed with this guest's push in flight");
    let acked: Vec<&TargetRecord> = before
        .values()
        .filter(|t| t.state == TargetState::Acked)
        .collect();
    assert!(!acked.is_empty(), "{before:?}");

    let (_kbs, _) = spawn_kbs(&data, &listen).await;
    let view = watch_until(&admin, id, "completion after kill -9", |v| {
        v.rollout.state == RolloutState::Completed
    })
    .await;
    assert_eq!(count(&view, TargetState::Acked), 4, "{view:?}");
    let after: BTreeMap<String, TargetRecord> = admin
        .rollout(id, "")
        .await
        .unwrap()
        .targets
        .into_iter()
        .map(|t| (t.guest_id.clone(), t))
        .collect();
    // What was acked before the kill is exactly as it was: not pushed again.
    for row in acked {
        let now = &after[&row.guest_id];
        assert_eq!(now, row, "an acked row changed across the kill");
        assert_eq!(
            (now.attempts, now.already_held, now.hook_status),
            (1, false, Some(0)),
            "{now:?}"
        );
    }
    for (gid, shutdown, task) in daemons {
        let file = root.path().join(&gid).join("resources").join(path);
        assert_eq!(std::fs::read(&file).unwrap(), b"after");
        let runs = std::fs::read_to_string(root.path().join(format!("{gid}.hooks"))).unwrap();
        assert_eq!(runs, "2\n", "{gid} applied version 2 exactly once");
        shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }
}
