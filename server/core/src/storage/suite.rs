//! The storage test suite, one case per function, run on every engine: kbs-core's own tests
//! run it on SQLite (below), the test kit on a throwaway PostgreSQL cluster
//! (`tests/tests/store_engines.rs`), through [`store_suite!`](crate::store_suite). Compiled
//! into the library (no feature, see `storage/mod.rs`) but used only by tests.
//!
//! Every case gets two stores `a` and `b` opened separately on one fresh database (two
//! connection pools, as two KBS replicas have); most use only `a`, the concurrency cases use
//! both. Engine-specific checks (files on disk, pragmas) stay beside their engine.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{
    AuditEntry, AuditQuery, EventQuery, NewEvent, NewRollout, RolloutQuery, RolloutState, Store,
    TargetRecord, TargetState, now_ms,
};
use crate::resource_path::ResourcePath;

/// Two stores on one fresh database; `None` when the engine cannot run here (the opener
/// reports the skip).
pub type Opened = Option<(
    Box<dyn std::any::Any + Send>,
    Arc<dyn Store>,
    Arc<dyn Store>,
)>;

/// Declares one `#[tokio::test]` per suite case, each opening its stores with `$open`
/// (an `async fn(&'static str) -> Opened`, given the case name).
#[macro_export]
macro_rules! store_suite {
    ($open:path) => {
        $crate::store_suite!(@cases $open;
            resource_versions_are_monotonic_and_survive_delete,
            concurrent_puts_on_two_stores_get_distinct_versions,
            a_put_on_one_store_is_read_on_the_other,
            policy_versions_audit_and_kv,
            plugin_state_round_trips_and_updates,
            reference_values_round_trip_replace_and_delete,
            events_filter_page_and_prune,
            fleet_records_upsert_and_load,
            forgetting_spares_recent_records_and_targets_of_rollouts_in_force,
            rollouts_supersede_and_targets_round_trip,
            many_targets_and_known_guests,
            rollouts_of_one_path_started_at_once_leave_one_in_force,
            acks_written_from_two_stores_are_never_lost,
            tunnel_records_grow_an_epoch_and_go_only_with_their_own
        );
    };
    (@cases $open:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let Some((_guard, a, b)) = $open(stringify!($case)).await else {
                    return;
                };
                $crate::storage::suite::$case(a, b).await;
            }
        )*
    };
}

fn path(p: &str) -> ResourcePath {
    p.parse().unwrap()
}

pub async fn resource_versions_are_monotonic_and_survive_delete(
    s: Arc<dyn Store>,
    _: Arc<dyn Store>,
) {
    let p = path("default/key/one");
    assert!(s.get_resource(&p, None).await.unwrap().is_none());
    assert_eq!(s.put_resource(&p, b"v1", "t").await.unwrap(), 1);
    assert_eq!(s.put_resource(&p, b"v2", "t").await.unwrap(), 2);
    let latest = s.get_resource(&p, None).await.unwrap().unwrap();
    assert_eq!((latest.version, latest.data.as_slice()), (2, &b"v2"[..]));
    let v1 = s.get_resource(&p, Some(1)).await.unwrap().unwrap();
    assert_eq!(v1.data.as_slice(), b"v1");
    assert!(s.get_resource(&p, Some(7)).await.unwrap().is_none());
    assert!(s.delete_resource(&p, "t").await.unwrap());
    assert!(!s.delete_resource(&p, "t").await.unwrap());
    assert!(s.get_resource(&p, None).await.unwrap().is_none());
    assert!(s.get_resource(&p, Some(1)).await.unwrap().is_none());
    assert_eq!(s.put_resource(&p, b"v3", "t").await.unwrap(), 3);
    let versions = s.list_versions(&p).await.unwrap();
    assert_eq!(versions.len(), 3);
    assert!(versions[0].deleted && !versions[2].deleted);
    assert_eq!(versions[2].size, 2);
    assert_eq!(versions[2].created_by, "t");
}

/// Two replicas putting the same path at once: every put gets its own version, 1..=n.
pub async fn concurrent_puts_on_two_stores_get_distinct_versions(
    a: Arc<dyn Store>,
    b: Arc<dyn Store>,
) {
    let p = path("r/t/x");
    let mut tasks = Vec::new();
    for i in 0..40 {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            s.put_resource(&p, format!("{i}").as_bytes(), "t")
                .await
                .unwrap()
        }));
    }
    let mut got = Vec::new();
    for t in tasks {
        got.push(t.await.unwrap());
    }
    got.sort();
    assert_eq!(got, (1..=40).collect::<Vec<_>>());
    let mut policies = Vec::new();
    for i in 0..20 {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        policies.push(tokio::spawn(async move {
            s.set_policy("resource", &format!("p{i}"), "t")
                .await
                .unwrap()
        }));
    }
    let mut got = Vec::new();
    for t in policies {
        got.push(t.await.unwrap());
    }
    got.sort();
    assert_eq!(got, (1..=20).collect::<Vec<_>>());
}

/// What one replica stores, the other reads: resources, plugin values, policies.
pub async fn a_put_on_one_store_is_read_on_the_other(a: Arc<dyn Store>, b: Arc<dyn Store>) {
    let p = path("r/t/shared");
    a.put_resource(&p, b"from a", "t").await.unwrap();
    let got = b.get_resource(&p, None).await.unwrap().unwrap();
    assert_eq!((got.version, got.data.as_slice()), (1, &b"from a"[..]));
    b.kv_put("pki", "ca", b"sealed by b").await.unwrap();
    assert_eq!(
        a.kv_get("pki", "ca").await.unwrap().unwrap(),
        b"sealed by b"
    );
    b.set_policy("resource", "package policy", "t")
        .await
        .unwrap();
    assert_eq!(
        a.get_policy("resource").await.unwrap().unwrap().body,
        "package policy"
    );
}

pub async fn policy_versions_audit_and_kv(s: Arc<dyn Store>, _: Arc<dyn Store>) {
    assert!(s.get_policy("resource").await.unwrap().is_none());
    assert_eq!(s.set_policy("resource", "a", "x").await.unwrap(), 1);
    assert_eq!(s.set_policy("resource", "b", "x").await.unwrap(), 2);
    assert_eq!(s.set_policy("appraisal", "c", "x").await.unwrap(), 1);
    let current = s.get_policy("resource").await.unwrap().unwrap();
    assert_eq!((current.version, current.body.as_str()), (2, "b"));
    for action in [
        "resource.put",
        "policy.set",
        "resource.delete",
        "resource_x",
    ] {
        s.audit(AuditEntry {
            actor: "alice".into(),
            role: "admin".into(),
            action: action.into(),
            target: "t".into(),
            outcome: "ok".into(),
            detail: String::new(),
        })
        .await
        .unwrap();
    }
    let q = |f: &dyn Fn(&mut AuditQuery)| {
        let mut q = AuditQuery {
            limit: 10,
            ..Default::default()
        };
        f(&mut q);
        q
    };
    let all = s.list_audit(&q(&|_| {})).await.unwrap();
    assert_eq!(all.len(), 4);
    assert_eq!(all[0].action, "resource_x");
    // `_` in the prefix is a character, not a wildcard.
    let res = s
        .list_audit(&q(&|q| q.action = Some("resource.*".into())))
        .await
        .unwrap();
    assert_eq!(res.len(), 2);
    let exact = s
        .list_audit(&q(&|q| q.action = Some("policy.set".into())))
        .await
        .unwrap();
    assert_eq!(exact.len(), 1);
    let page = s
        .list_audit(&q(&|q| {
            q.before = Some(all[1].id);
            q.limit = 1;
        }))
        .await
        .unwrap();
    assert_eq!(page[0].action, "policy.set");
    assert!(
        s.list_audit(&q(&|q| q.actor = Some("bob".into())))
            .await
            .unwrap()
            .is_empty()
    );

    s.kv_put("splitapi", "g1", b"one").await.unwrap();
    s.kv_put("splitapi", "g2", b"two").await.unwrap();
    s.kv_put("splitapi", "G3", b"three").await.unwrap();
    s.kv_put("splitapi", "h1", b"x").await.unwrap();
    s.kv_put("other", "g1", b"x").await.unwrap();
    s.kv_put("splitapi", "g2", b"two again").await.unwrap();
    assert_eq!(s.kv_get("splitapi", "g1").await.unwrap().unwrap(), b"one");
    let listed = s.kv_list("splitapi", "g", 10).await.unwrap();
    assert_eq!(
        listed,
        [
            ("g1".to_string(), b"one".to_vec()),
            ("g2".to_string(), b"two again".to_vec())
        ]
    );
    // Sorted bytewise (upper case first), whatever the database's locale.
    let keys: Vec<String> = s
        .kv_list("splitapi", "", 10)
        .await
        .unwrap()
        .into_iter()
        .map(|kv| kv.0)
        .collect();
    assert_eq!(keys, ["G3", "g1", "g2", "h1"]);
    assert_eq!(s.kv_list("splitapi", "", 2).await.unwrap().len(), 2);
    assert!(s.kv_delete("splitapi", "g1").await.unwrap());
    assert!(!s.kv_delete("splitapi", "g1").await.unwrap());
    assert!(s.kv_get("splitapi", "g1").await.unwrap().is_none());
}

pub async fn plugin_state_round_trips_and_updates(s: Arc<dyn Store>, _: Arc<dyn Store>) {
    assert!(s.plugin_states().await.unwrap().is_empty());
    s.set_plugin_enabled("splitapi", false, "a@dev")
        .await
        .unwrap();
    s.set_plugin_enabled("splitapi", true, "b@dev")
        .await
        .unwrap();
    s.set_plugin_enabled("resource", false, "b@dev")
        .await
        .unwrap();
    let rows = s.plugin_states().await.unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].name, "resource");
    assert!(!rows[0].enabled);
    assert!(rows[1].enabled);
    assert_eq!(rows[1].updated_by, "b@dev");
}

pub async fn reference_values_round_trip_replace_and_delete(s: Arc<dyn Store>, _: Arc<dyn Store>) {
    assert!(s.reference_values().await.unwrap().is_empty());
    let mr = vec!["ab".repeat(48), "cd".repeat(48)];
    s.set_reference_value("mr_td", &mr, "a@dev").await.unwrap();
    s.set_reference_value("allow_debug", &["true".into()], "a@dev")
        .await
        .unwrap();
    s.set_reference_value("mr_td", &mr[..1], "b@dev")
        .await
        .unwrap();
    let all = s.reference_values().await.unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].name, "allow_debug");
    assert_eq!(all[1].values, mr[..1]);
    assert_eq!(all[1].updated_by, "b@dev");
    assert!(s.delete_reference_value("allow_debug").await.unwrap());
    assert!(!s.delete_reference_value("allow_debug").await.unwrap());
    assert_eq!(s.reference_values().await.unwrap().len(), 1);
}

fn ev(at: u64, kind: &str, guest: Option<&str>, actor: Option<&str>) -> NewEvent {
    NewEvent {
        at,
        kind: kind.into(),
        action: format!("{kind}.x"),
        guest_id: guest.map(Into::into),
        actor: actor.map(Into::into),
        target: "t".into(),
        outcome: "ok".into(),
        detail: String::new(),
    }
}

pub async fn events_filter_page_and_prune(s: Arc<dyn Store>, _: Arc<dyn Store>) {
    let batch = vec![
        ev(10, "connect", Some("g1"), None),
        ev(20, "admin", None, Some("alice@dev")),
        ev(30, "disconnect", Some("g1"), None),
        ev(40, "connect", Some("g2"), None),
        ev(50, "policy", None, Some("bob@dev")),
    ];
    s.append_events(&batch).await.unwrap();
    s.append_events(&[]).await.unwrap();
    let q = |f: &dyn Fn(&mut EventQuery)| {
        let mut q = EventQuery {
            limit: 100,
            ..Default::default()
        };
        f(&mut q);
        q
    };
    let all = s.list_events(&q(&|_| {})).await.unwrap();
    assert_eq!(all.len(), 5);
    assert_eq!(all[0].event, batch[4]);
    assert!(all[0].id > all[1].id);
    let conn = s
        .list_events(&q(&|q| {
            q.kinds = vec!["connect".into(), "disconnect".into()]
        }))
        .await
        .unwrap();
    assert_eq!(conn.len(), 3);
    let g1 = s
        .list_events(&q(&|q| q.guest_id = Some("g1".into())))
        .await
        .unwrap();
    assert_eq!(g1.len(), 2);
    let alice = s
        .list_events(&q(&|q| q.actor = Some("alice@dev".into())))
        .await
        .unwrap();
    assert_eq!(alice[0].event.kind, "admin");
    let since = s.list_events(&q(&|q| q.since = Some(30))).await.unwrap();
    assert_eq!(since.len(), 3);
    let page = s
        .list_events(&q(&|q| {
            q.before = Some(all[1].id);
            q.limit = 2;
        }))
        .await
        .unwrap();
    assert_eq!(
        page.iter().map(|e| e.event.at).collect::<Vec<_>>(),
        [30, 20]
    );
    assert_eq!(s.prune_events(2).await.unwrap(), 3);
    assert_eq!(s.prune_events(2).await.unwrap(), 0);
    let kept = s.list_events(&q(&|_| {})).await.unwrap();
    assert_eq!(
        kept.iter().map(|e| e.event.at).collect::<Vec<_>>(),
        [50, 40]
    );
    assert_eq!(s.prune_events(0).await.unwrap(), 2);
    assert!(s.list_events(&q(&|_| {})).await.unwrap().is_empty());
}

pub async fn fleet_records_upsert_and_load(s: Arc<dyn Store>, _: Arc<dyn Store>) {
    s.upsert_fleet(&[
        ("g1".into(), "{}".into()),
        ("g2".into(), "{\"a\":1}".into()),
    ])
    .await
    .unwrap();
    // A batch may name a guest twice (two changes queued): the last one wins.
    s.upsert_fleet(&[
        ("g1".into(), "{\"b\":1}".into()),
        ("g1".into(), "{\"b\":2}".into()),
    ])
    .await
    .unwrap();
    let mut all = s.load_fleet().await.unwrap();
    all.sort();
    assert_eq!(
        all,
        [
            ("g1".to_string(), "{\"b\":2}".to_string()),
            ("g2".to_string(), "{\"a\":1}".to_string())
        ]
    );
}

pub async fn forgetting_spares_recent_records_and_targets_of_rollouts_in_force(
    s: Arc<dyn Store>,
    _: Arc<dyn Store>,
) {
    let ids: Vec<String> = ["old", "waited-for", "acked", "of-cancelled"]
        .map(String::from)
        .to_vec();
    let records: Vec<(String, String)> = ids
        .iter()
        .map(|id| (id.clone(), "{}".to_string()))
        .collect();
    s.upsert_fleet(&records).await.unwrap();
    let labels: tunnel::Labels = BTreeMap::new().into();
    let sightings: Vec<(String, tunnel::Labels)> =
        ids.iter().map(|id| (id.clone(), labels.clone())).collect();
    s.note_rotation_guests(&sightings).await.unwrap();
    let running = s
        .create_rollout(
            &NewRollout::for_test("default/key/a", 1),
            &["waited-for".into(), "acked".into()],
        )
        .await
        .unwrap();
    let mut acked = TargetRecord::pending(running.rollout.id, "acked");
    acked.state = TargetState::Acked;
    s.write_targets(&[acked]).await.unwrap();
    let cancelled = s
        .create_rollout(
            &NewRollout::for_test("default/key/b", 1),
            &["of-cancelled".into()],
        )
        .await
        .unwrap();
    s.set_rollout_state(cancelled.rollout.id, RolloutState::Cancelled, "")
        .await
        .unwrap();

    // Written after the cut-off: nothing goes.
    let cut = now_ms().saturating_sub(60_000);
    assert!(s.forget_fleet(&ids, cut).await.unwrap().is_empty());
    let mut gone = s.forget_fleet(&ids, now_ms() + 1).await.unwrap();
    gone.sort();
    assert_eq!(gone, ["acked", "of-cancelled", "old"]);
    let left: Vec<String> = s
        .load_fleet()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.0)
        .collect();
    assert_eq!(left, ["waited-for"]);
    let sighted: Vec<String> = s
        .rotation_guests(0)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.0)
        .collect();
    assert_eq!(sighted, ["waited-for"], "rotation forgets them too");
    // Once its rollout ends, the guest it waited for goes as well.
    s.set_rollout_state(running.rollout.id, RolloutState::Expired, "")
        .await
        .unwrap();
    assert_eq!(
        s.forget_fleet(&ids, now_ms() + 1).await.unwrap(),
        ["waited-for"]
    );
    assert!(s.load_fleet().await.unwrap().is_empty());
}

pub async fn rollouts_supersede_and_targets_round_trip(s: Arc<dyn Store>, _: Arc<dyn Store>) {
    let new = NewRollout::for_test;
    let first = s
        .create_rollout(&new("default/key/a", 1), &["g1".into(), "g2".into()])
        .await
        .unwrap();
    assert!(first.superseded.is_empty());
    assert_eq!(first.rollout.state, RolloutState::Running);
    assert_eq!(first.rollout.selector, "app=db");
    let other = s
        .create_rollout(&new("default/key/b", 1), &["g1".into()])
        .await
        .unwrap();
    let second = s
        .create_rollout(&new("default/key/a", 2), &["g1".into()])
        .await
        .unwrap();
    assert_eq!(second.superseded, [first.rollout.id]);
    let old = s.get_rollout(first.rollout.id).await.unwrap().unwrap();
    assert_eq!(old.state, RolloutState::Superseded);
    assert_eq!(old.superseded_by, Some(second.rollout.id));
    assert!(old.finished_at.is_some());
    let b = s.get_rollout(other.rollout.id).await.unwrap().unwrap();
    assert_eq!(b.state, RolloutState::Running, "other paths are untouched");
    assert!(s.get_rollout(9999).await.unwrap().is_none());

    let mut t = TargetRecord::pending(first.rollout.id, "g2");
    t.state = TargetState::Acked;
    t.digest = Some("ff".into());
    t.hook_status = Some(-3);
    t.held_version = Some(1);
    t.attempts = 1;
    t.already_held = true;
    t.acked_at = Some(5);
    s.write_targets(std::slice::from_ref(&t)).await.unwrap();
    let counts = s.target_counts(first.rollout.id).await.unwrap();
    assert_eq!(counts[&TargetState::Pending], 1);
    assert_eq!(counts[&TargetState::Acked], 1);
    assert_eq!(counts[&TargetState::Failed], 0);
    let acked = s
        .list_targets(first.rollout.id, Some(TargetState::Acked), None, 10)
        .await
        .unwrap();
    assert_eq!(acked, [t]);
    let page = s
        .list_targets(first.rollout.id, None, Some("g1"), 10)
        .await
        .unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].guest_id, "g2");

    let in_force = s
        .list_rollouts(&RolloutQuery {
            in_force: true,
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    let ids: Vec<i64> = in_force.iter().map(|r| r.id).collect();
    assert_eq!(ids, [second.rollout.id, other.rollout.id]);
    let of_a = s
        .list_rollouts(&RolloutQuery {
            path: Some("default/key/a".into()),
            before: Some(second.rollout.id),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(of_a.len(), 1);
    assert_eq!(of_a[0].id, first.rollout.id);
    s.set_rollout_state(other.rollout.id, RolloutState::Cancelled, "by ops")
        .await
        .unwrap();
    let b = s.get_rollout(other.rollout.id).await.unwrap().unwrap();
    assert_eq!(
        (b.state, b.detail.as_str()),
        (RolloutState::Cancelled, "by ops")
    );
    assert!(b.finished_at.is_some());
    assert!(
        s.set_rollout_state(999, RolloutState::Paused, "")
            .await
            .is_err()
    );
}

pub async fn many_targets_and_known_guests(s: Arc<dyn Store>, _: Arc<dyn Store>) {
    let ids: Vec<String> = (0..1000).map(|n| format!("g{n:04}")).collect();
    let r = s
        .create_rollout(&NewRollout::for_test("default/key/a", 1), &ids)
        .await
        .unwrap();
    let counts = s.target_counts(r.rollout.id).await.unwrap();
    assert_eq!(counts[&TargetState::Pending], 1000);
    let mut paged = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = s
            .list_targets(r.rollout.id, None, after.as_deref(), 300)
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.guest_id.clone());
        paged.extend(page.into_iter().map(|t| t.guest_id));
    }
    assert_eq!(paged, ids);
    // Read back by guest: more names than one query binds, some without a target.
    let mut asked: Vec<String> = ids.iter().rev().cloned().collect();
    asked.extend((0..1500).map(|n| format!("unknown{n}")));
    let mut found: Vec<String> = s
        .targets_of(r.rollout.id, &asked)
        .await
        .unwrap()
        .into_iter()
        .map(|t| {
            assert_eq!(t.state, TargetState::Pending);
            t.guest_id
        })
        .collect();
    found.sort();
    assert_eq!(found, ids);
    assert!(s.targets_of(r.rollout.id, &[]).await.unwrap().is_empty());
    let guests: Vec<(String, tunnel::Labels)> = ids
        .iter()
        .map(|g| {
            (
                g.clone(),
                BTreeMap::from([("app".into(), "db".into())]).into(),
            )
        })
        .collect();
    s.note_rotation_guests(&guests).await.unwrap();
    s.note_rotation_guests(&guests[..10]).await.unwrap();
    let known = s.rotation_guests(0).await.unwrap();
    assert_eq!(known.len(), 1000);
    assert_eq!(known[0].1["app"], "db");
    assert!(
        s.rotation_guests(now_ms() + 60_000)
            .await
            .unwrap()
            .is_empty()
    );
}

/// Two replicas starting a rollout of one resource at the same moment: one supersedes the
/// other, never both left delivering.
pub async fn rollouts_of_one_path_started_at_once_leave_one_in_force(
    a: Arc<dyn Store>,
    b: Arc<dyn Store>,
) {
    for round in 0..10 {
        let p = format!("default/key/r{round}");
        let (first, second) = (NewRollout::for_test(&p, 1), NewRollout::for_test(&p, 2));
        let targets = ["g1".to_string()];
        let (x, y) = tokio::join!(
            a.create_rollout(&first, &targets),
            b.create_rollout(&second, &targets),
        );
        let (x, y) = (x.unwrap(), y.unwrap());
        let in_force = a
            .list_rollouts(&RolloutQuery {
                path: Some(p.clone()),
                in_force: true,
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(in_force.len(), 1, "round {round}: {in_force:?}");
        let superseded = x.superseded.len() + y.superseded.len();
        assert_eq!(superseded, 1, "round {round}");
    }
}

/// Replicas deliver to the targets they hold and write acks, while a stale writer (a retry
/// that raced the ack, a replica that still thought the target pending) writes the same
/// rows: no ack is lost, none counted twice.
pub async fn acks_written_from_two_stores_are_never_lost(a: Arc<dyn Store>, b: Arc<dyn Store>) {
    let ids: Vec<String> = (0..600).map(|n| format!("g{n:04}")).collect();
    let r = a
        .create_rollout(&NewRollout::for_test("default/key/acks", 1), &ids)
        .await
        .unwrap();
    let id = r.rollout.id;
    let row = |g: &str, state: TargetState| {
        let mut t = TargetRecord::pending(id, g);
        t.state = state;
        if state == TargetState::Acked {
            t.acked_at = Some(now_ms());
            t.held_version = Some(1);
        }
        t
    };
    let mut tasks = Vec::new();
    for (n, chunk) in ids.chunks(50).enumerate() {
        let (acker, stale) = if n % 2 == 0 {
            (a.clone(), b.clone())
        } else {
            (b.clone(), a.clone())
        };
        let acks: Vec<TargetRecord> = chunk.iter().map(|g| row(g, TargetState::Acked)).collect();
        // The stale writer's batch overlaps this chunk and the next, in reverse order.
        let stale_rows: Vec<TargetRecord> = ids[n * 50..((n + 2) * 50).min(ids.len())]
            .iter()
            .rev()
            .map(|g| row(g, TargetState::Delivering))
            .collect();
        tasks.push(tokio::spawn(async move {
            acker.write_targets(&acks).await.unwrap();
        }));
        tasks.push(tokio::spawn(async move {
            stale.write_targets(&stale_rows).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let counts = b.target_counts(id).await.unwrap();
    assert_eq!(counts[&TargetState::Acked], 600, "{counts:?}");
    assert_eq!(counts.values().sum::<u64>(), 600);
    // And a pending write after the ack does not undo it either.
    a.write_targets(&[row("g0000", TargetState::Pending)])
        .await
        .unwrap();
    let t = b.list_targets(id, None, None, 1).await.unwrap().remove(0);
    assert_eq!(
        (t.guest_id.as_str(), t.state),
        ("g0000", TargetState::Acked)
    );
    // A batch naming one target twice: the last row wins.
    b.write_targets(&[
        row("g0599", TargetState::Acked),
        row("g0599", TargetState::Acked),
    ])
    .await
    .unwrap();
}

/// The replica registry: each claim of a guest's tunnel, on either store, gets a larger
/// epoch; a release at an old epoch or by another replica leaves the newer record; a retired
/// replica's records go with it, and the record names its replica's URL and heartbeat.
pub async fn tunnel_records_grow_an_epoch_and_go_only_with_their_own(
    a: Arc<dyn Store>,
    b: Arc<dyn Store>,
) {
    let before = now_ms();
    a.replica_heartbeat("ra", "http://127.0.0.1:1", 0)
        .await
        .unwrap();
    b.replica_heartbeat("rb", "http://127.0.0.1:2", 0)
        .await
        .unwrap();
    assert_eq!(a.tunnel_owner("g").await.unwrap(), None);
    let e1 = a.tunnel_claim("g", "ra").await.unwrap();
    let e2 = b.tunnel_claim("g", "rb").await.unwrap();
    assert!(e2 > e1, "{e1} then {e2}");
    let owner = a.tunnel_owner("g").await.unwrap().unwrap();
    assert_eq!((owner.replica_id.as_str(), owner.epoch), ("rb", e2));
    assert_eq!(owner.advertise_url.as_deref(), Some("http://127.0.0.1:2"));
    assert!(owner.heartbeat_at_ms >= before, "{owner:?}");
    // The old tunnel's end on replica ra does not remove rb's record.
    assert!(!a.tunnel_release("g", "ra", e1).await.unwrap());
    assert!(!a.tunnel_release("g", "rb", e1).await.unwrap());
    assert_eq!(a.tunnel_owner("g").await.unwrap().unwrap().epoch, e2);
    assert!(b.tunnel_release("g", "rb", e2).await.unwrap());
    assert_eq!(a.tunnel_owner("g").await.unwrap(), None);
    // Epochs of a guest never repeat, released or not, and a wrong one removes nothing.
    let e3 = a.tunnel_claim("g", "ra").await.unwrap();
    assert!(e3 > e2, "{e2} then {e3}");
    assert!(!a.tunnel_release("g", "ra", e3 + 1).await.unwrap());
    b.tunnel_claim("h", "rb").await.unwrap();
    b.replica_retire("rb").await.unwrap();
    assert_eq!(a.tunnel_owner("h").await.unwrap(), None);
    assert_eq!(a.tunnel_owner("g").await.unwrap().unwrap().epoch, e3);
    // A replica silent since before the cut is forgotten with its records (a cut in the
    // future forgets the one writing the heartbeat too: no need to wait an hour).
    a.replica_heartbeat("ra", "http://127.0.0.1:1", now_ms() + 1000)
        .await
        .unwrap();
    assert_eq!(a.tunnel_owner("g").await.unwrap(), None);
}

#[cfg(test)]
mod sqlite {
    use std::sync::Arc;

    use super::Opened;
    use crate::storage::{KeyEncryptionKey, SqliteStore};

    /// Two `SqliteStore`s on one file in a fresh directory (two pools, as two processes).
    async fn open(_case: &'static str) -> Opened {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let kek = Arc::new(KeyEncryptionKey::from_bytes(&[1u8; 32]));
        let a = SqliteStore::open(&url, kek.clone()).await.unwrap();
        let b = SqliteStore::open(&url, kek).await.unwrap();
        Some((Box::new(dir), Arc::new(a), Arc::new(b)))
    }

    crate::store_suite!(open);
}
