#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use futures::StreamExt;
use rpc_defs::{CredentialFile, GuestServiceClient};
use tarpc::server::Channel;

use super::*;
use crate::hook::HOOK_TIMED_OUT;
use crate::store::tests::ReadOnly;
use crate::tee_key::seal::seal_bound;

struct Guest {
    dir: tempfile::TempDir,
    key: TeeKeyPair,
    svc: GuestDaemonService,
}

fn guest(hook: Option<PostApplyHook>) -> Guest {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(StateStore::open(dir.path().join("state")).unwrap());
    let key = store.load_or_create_tee_key(TeeKeyPair::new_ec).unwrap();
    let svc = GuestDaemonService::new(store, key.clone(), hook);
    Guest { dir, key, svc }
}

/// Sealed as the KBS seals a push: `binding` in the protected header member `header`.
fn sealed_to(
    key: &TeeKeyPair,
    plain: &[u8],
    header: &str,
    binding: &impl serde::Serialize,
) -> Vec<u8> {
    let bound =
        serde_json::Map::from_iter([(header.to_owned(), serde_json::to_value(binding).unwrap())]);
    serde_json::to_vec(&seal_bound(&key.export_pubkey(), plain, &bound)).unwrap()
}

fn resource(key: &TeeKeyPair, uri: &str, version: u64, plain: &[u8]) -> SealedResource {
    resource_claiming(key, uri, version, plain, hex::encode(Sha256::digest(plain)))
}

/// A resource whose announced (and bound) digest is `sha256`, whatever `plain` is.
fn resource_claiming(
    key: &TeeKeyPair,
    uri: &str,
    version: u64,
    plain: &[u8],
    sha256: String,
) -> SealedResource {
    let binding = ResourceBinding {
        sha256: sha256.clone(),
        uri: uri.into(),
        version,
    };
    SealedResource {
        uri: uri.into(),
        version,
        jwe: sealed_to(key, plain, RESOURCE_BINDING_HEADER, &binding),
        sha256,
    }
}

fn bundle(key: &TeeKeyPair, version: u64, files: &[(&str, u32, &[u8])]) -> CredentialBundle {
    let map: BTreeMap<String, ByteBuf> = files
        .iter()
        .map(|(n, _, b)| (n.to_string(), ByteBuf::from(b.to_vec())))
        .collect();
    let mut cbor = Vec::new();
    ciborium::into_writer(&map, &mut cbor).unwrap();
    let listed: Vec<CredentialFile> = files
        .iter()
        .map(|(n, m, _)| CredentialFile {
            name: n.to_string(),
            mode: *m,
        })
        .collect();
    let not_after = unix_now() + 3600;
    let binding = BundleBinding::new("demo", version, &listed, not_after);
    CredentialBundle {
        id: "demo".into(),
        version,
        files: listed,
        jwe: sealed_to(key, &cbor, BUNDLE_BINDING_HEADER, &binding),
        not_after,
    }
}

fn tls_files(tag: &'static [u8]) -> Vec<(&'static str, u32, &'static [u8])> {
    vec![
        ("ca.crt", 0o644, b"ca"),
        ("server.crt", 0o644, b"crt"),
        ("server.key", 0o600, tag),
    ]
}

#[tokio::test]
async fn apply_then_replay_is_idempotent() {
    let g = guest(None);
    let res = resource(&g.key, "default/key/1", 1, b"hello");
    let first = g.svc.apply(res.clone()).await.unwrap();
    assert_eq!(
        first,
        Applied {
            uri: "default/key/1".into(),
            version: 1,
            sha256: res.sha256.clone(),
            already_held: false,
            hook_status: None,
        }
    );
    let again = g.svc.apply(res.clone()).await.unwrap();
    assert!(again.already_held);
    assert_eq!(again.sha256, res.sha256);
    let file = g.dir.path().join("state/resources/default/key/1");
    assert_eq!(std::fs::read(&file).unwrap(), b"hello");
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[tokio::test]
async fn downgrade_is_refused() {
    let g = guest(None);
    g.svc
        .apply(resource(&g.key, "r/t/x", 2, b"two"))
        .await
        .unwrap();
    let err = g
        .svc
        .apply(resource(&g.key, "r/t/x", 1, b"one"))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        GuestError::Downgrade {
            held: 2,
            offered: 1
        }
    );
}

#[tokio::test]
async fn same_version_other_contents_is_refused() {
    let g = guest(None);
    g.svc
        .apply(resource(&g.key, "r/t/x", 2, b"two"))
        .await
        .unwrap();
    let err = g
        .svc
        .apply(resource(&g.key, "r/t/x", 2, b"TWO"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, GuestError::Invalid(m) if m.contains("version 2")),
        "{err}"
    );
    let held = g
        .svc
        .store()
        .get_resource(&"r/t/x".parse().unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(&held.plaintext[..], b"two");
}

#[tokio::test]
async fn digest_mismatch_is_refused_and_nothing_is_stored() {
    let g = guest(None);
    // A KBS that binds a digest the plaintext does not have.
    let mut res = resource_claiming(
        &g.key,
        "r/t/x",
        1,
        b"one",
        hex::encode(Sha256::digest(b"something else")),
    );
    let err = g.svc.apply(res.clone()).await.unwrap_err();
    assert_eq!(
        err,
        GuestError::DigestMismatch {
            announced: res.sha256.clone(),
            actual: hex::encode(Sha256::digest(b"one")),
        }
    );
    res.sha256 = "not hex".into();
    assert!(matches!(
        g.svc.apply(res).await,
        Err(GuestError::Invalid(_))
    ));
    assert!(g.svc.store().held().is_empty());
}

#[tokio::test]
async fn upper_case_digest_is_accepted() {
    let g = guest(None);
    let mut res = resource(&g.key, "r/t/x", 1, b"one");
    res.sha256 = res.sha256.to_ascii_uppercase();
    let applied = g.svc.apply(res).await.unwrap();
    assert_eq!(applied.sha256, hex::encode(Sha256::digest(b"one")));
}

#[tokio::test]
async fn jwe_for_another_key_is_an_unseal_error() {
    let g = guest(None);
    let other = TeeKeyPair::new_ec();
    let err = g
        .svc
        .apply(resource(&other, "r/t/x", 1, b"one"))
        .await
        .unwrap_err();
    assert!(matches!(err, GuestError::Unseal(_)), "{err}");
    let mut res = resource(&g.key, "r/t/x", 1, b"one");
    res.jwe = b"{not json".to_vec();
    assert!(matches!(g.svc.apply(res).await, Err(GuestError::Unseal(_))));
}

#[tokio::test]
async fn bad_uris_and_versions_are_invalid() {
    let g = guest(None);
    for uri in [
        "../x",
        "a/b",
        "a/b/../c",
        "../../etc/passwd",
        "a/b/c/d",
        "",
        "a/b/c~",
    ] {
        let err = g
            .svc
            .apply(resource(&g.key, uri, 1, b"x"))
            .await
            .unwrap_err();
        assert!(matches!(err, GuestError::Invalid(_)), "{uri:?}: {err}");
    }
    let err = g
        .svc
        .apply(resource(&g.key, "r/t/x", 0, b"x"))
        .await
        .unwrap_err();
    assert!(matches!(err, GuestError::Invalid(_)));
    assert!(g.svc.store().held().is_empty());
}

#[tokio::test]
async fn read_only_state_dir_is_a_storage_error() {
    let g = guest(None);
    let root = g.dir.path().join("state");
    g.svc
        .apply(resource(&g.key, "r/t/held", 1, b"x"))
        .await
        .unwrap();
    let Some(read_only) = ReadOnly::new_or_skip(&root, "read_only_state_dir_is_a_storage_error")
    else {
        return;
    };
    let err = g
        .svc
        .apply(resource(&g.key, "r/t/new", 1, b"x"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, GuestError::Storage(m) if m.contains(&root.display().to_string())),
        "{err}"
    );
    let health = g
        .svc
        .report(ProbeKind::Health)
        .await
        .unwrap()
        .health
        .unwrap();
    assert!(!health.healthy);
    assert!(!health.problems.is_empty());
    drop(read_only);
    let health = g
        .svc
        .report(ProbeKind::Health)
        .await
        .unwrap()
        .health
        .unwrap();
    assert!(health.healthy, "{:?}", health.problems);
}

#[tokio::test]
async fn restart_reports_the_same_held_versions() {
    let g = guest(None);
    g.svc
        .apply(resource(&g.key, "a/b/c", 3, b"abc"))
        .await
        .unwrap();
    g.svc
        .install(bundle(&g.key, 4, &tls_files(b"k")))
        .await
        .unwrap();
    let before = g
        .svc
        .report(ProbeKind::Resources)
        .await
        .unwrap()
        .resources
        .unwrap();
    assert_eq!(before.len(), 2);

    // A new daemon on the same state dir: same key, same held versions.
    let store = Arc::new(StateStore::open(g.dir.path().join("state")).unwrap());
    let key = store
        .load_or_create_tee_key(|| panic!("the key must be loaded"))
        .unwrap();
    let svc = GuestDaemonService::new(store, key, None);
    let after = svc
        .report(ProbeKind::Resources)
        .await
        .unwrap()
        .resources
        .unwrap();
    assert_eq!(after, before);
    // A push sealed to the first instance's key still opens, and is a replay.
    let again = svc
        .apply(resource(&g.key, "a/b/c", 3, b"abc"))
        .await
        .unwrap();
    assert!(again.already_held);
    assert_eq!(
        *svc.subscribe_credentials().borrow(),
        BTreeMap::from([("demo".into(), 4)])
    );
}

#[tokio::test]
async fn credentials_install_replay_downgrade_and_notify() {
    let g = guest(None);
    let mut changes = g.svc.subscribe_credentials();
    assert!(changes.borrow_and_update().is_empty());

    let installed = g
        .svc
        .install(bundle(&g.key, 1, &tls_files(b"k1")))
        .await
        .unwrap();
    assert_eq!(
        installed,
        Installed {
            id: "demo".into(),
            version: 1,
            already_held: false
        }
    );
    assert!(changes.has_changed().unwrap());
    assert_eq!(changes.borrow_and_update().get("demo"), Some(&1));
    let dir = g.svc.store().bundle_dir("demo");
    assert_eq!(std::fs::read(dir.join("server.key")).unwrap(), b"k1");
    let mode = |n: &str| std::fs::metadata(dir.join(n)).unwrap().permissions().mode() & 0o777;
    assert_eq!((mode("server.key"), mode("server.crt")), (0o600, 0o644));

    let replay = g
        .svc
        .install(bundle(&g.key, 1, &tls_files(b"k1")))
        .await
        .unwrap();
    assert!(replay.already_held);
    assert!(!changes.has_changed().unwrap(), "a replay does not notify");

    g.svc
        .install(bundle(&g.key, 2, &tls_files(b"k2")))
        .await
        .unwrap();
    assert_eq!(changes.borrow_and_update().get("demo"), Some(&2));
    assert_eq!(std::fs::read(dir.join("server.key")).unwrap(), b"k2");

    let err = g
        .svc
        .install(bundle(&g.key, 1, &tls_files(b"k1")))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        GuestError::Downgrade {
            held: 2,
            offered: 1
        }
    );
    let held = g.svc.store().held();
    assert!(
        held.iter()
            .any(|h| h.uri == "credentials/demo" && h.version == 2)
    );
}

#[tokio::test]
async fn credentials_must_match_their_listing() {
    let g = guest(None);
    // Listed but not sealed.
    let mut b = bundle(&g.key, 1, &tls_files(b"k"));
    b.files.push(CredentialFile {
        name: "extra.pem".into(),
        mode: 0o600,
    });
    let err = g.svc.install(b).await.unwrap_err();
    assert!(
        matches!(&err, GuestError::Invalid(m) if m.contains("extra.pem")),
        "{err}"
    );
    // Sealed but not listed.
    let mut b = bundle(&g.key, 1, &tls_files(b"k"));
    b.files.pop();
    let err = g.svc.install(b).await.unwrap_err();
    assert!(
        matches!(&err, GuestError::Invalid(m) if m.contains("server.key")),
        "{err}"
    );
    // Bad names, modes, ids, duplicates, non-CBOR plaintext.
    for name in ["../x", "a/b", "..", ""] {
        let err = g
            .svc
            .install(bundle(&g.key, 1, &[(name, 0o600, b"x")]))
            .await
            .unwrap_err();
        assert!(matches!(err, GuestError::Invalid(_)), "{name:?}: {err}");
    }
    let err = g
        .svc
        .install(bundle(&g.key, 1, &[("k", 0o666, b"x")]))
        .await
        .unwrap_err();
    assert!(matches!(err, GuestError::Invalid(_)), "{err}");
    let mut b = bundle(&g.key, 1, &tls_files(b"k"));
    b.id = "../etc".into();
    assert!(matches!(
        g.svc.install(b).await,
        Err(GuestError::Invalid(_))
    ));
    let mut b = bundle(&g.key, 1, &tls_files(b"k"));
    b.files.push(b.files[0].clone());
    assert!(matches!(
        g.svc.install(b).await,
        Err(GuestError::Invalid(_))
    ));
    let mut b = bundle(&g.key, 1, &tls_files(b"k"));
    b.jwe = sealed_to(
        &g.key,
        b"plain text, not CBOR",
        BUNDLE_BINDING_HEADER,
        &BundleBinding::new(&b.id, b.version, &b.files, b.not_after),
    );
    assert!(matches!(
        g.svc.install(b).await,
        Err(GuestError::Invalid(_))
    ));
    assert!(g.svc.store().held().is_empty());
    assert!(!g.dir.path().join("etc").exists());
}

#[tokio::test]
async fn hook_runs_for_new_versions_only_and_reports_its_status() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("hook.log");
    let hook = PostApplyHook::new(format!(
        "echo \"$TETHER_RESOURCE $TETHER_VERSION $(cat \"$TETHER_FILE\")\" >> '{}'; exit 7",
        log.display()
    ));
    let g = guest(Some(hook));
    let applied = g
        .svc
        .apply(resource(&g.key, "r/t/x", 1, b"one"))
        .await
        .unwrap();
    assert_eq!(applied.hook_status, Some(7));
    let replay = g
        .svc
        .apply(resource(&g.key, "r/t/x", 1, b"one"))
        .await
        .unwrap();
    assert_eq!(
        replay.hook_status, None,
        "no hook for an already-held replay"
    );
    g.svc
        .apply(resource(&g.key, "r/t/x", 2, b"two"))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "r/t/x 1 one\nr/t/x 2 two\n"
    );
}

#[tokio::test]
async fn a_slow_hook_times_out() {
    let g = guest(Some(
        PostApplyHook::new("sleep 30").with_timeout(Duration::from_millis(200)),
    ));
    let applied = g
        .svc
        .apply(resource(&g.key, "r/t/x", 1, b"one"))
        .await
        .unwrap();
    assert_eq!(applied.hook_status, Some(HOOK_TIMED_OUT));
    assert!(!applied.already_held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_applies_end_with_the_newest_version() {
    let g = guest(None);
    let pushes: Vec<_> = (1..=20u64)
        .map(|v| resource(&g.key, "r/t/x", v, format!("v{v}").as_bytes()))
        .collect();
    let tasks: Vec<_> = pushes
        .into_iter()
        .map(|res| {
            let svc = g.svc.clone();
            tokio::spawn(async move { svc.apply(res).await })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        match task.await.unwrap() {
            Ok(applied) => assert_eq!(applied.version, i as u64 + 1),
            Err(GuestError::Downgrade { held, offered }) => assert!(held > offered),
            Err(e) => panic!("unexpected {e}"),
        }
    }
    let held = g
        .svc
        .store()
        .get_resource(&"r/t/x".parse().unwrap())
        .unwrap()
        .unwrap();
    assert_eq!((held.version, &held.plaintext[..]), (20, &b"v20"[..]));
    let file = g.svc.store().resource_file(&"r/t/x".parse().unwrap());
    assert_eq!(std::fs::read(file).unwrap(), b"v20");
    let names = std::fs::read_dir(g.dir.path().join("state/resources/r/t"))
        .unwrap()
        .count();
    assert_eq!(names, 3, "only the link, v20 and its metadata remain");
    assert!(g.svc.inner.locks.map.lock().unwrap().is_empty());
}

#[tokio::test]
async fn probe_reports_what_was_asked() {
    let g = guest(None);
    g.svc
        .apply(resource(&g.key, "r/t/x", 1, b"one"))
        .await
        .unwrap();
    g.svc.open_tunnels().store(1, Ordering::Relaxed);

    let health = g.svc.report(ProbeKind::Health).await.unwrap();
    assert_eq!(
        health.health,
        Some(HealthReport {
            healthy: true,
            problems: vec![]
        })
    );
    assert!(health.resources.is_none() && health.runtime.is_none());

    let resources = g
        .svc
        .report(ProbeKind::Resources)
        .await
        .unwrap()
        .resources
        .unwrap();
    assert_eq!(resources.len(), 1);
    assert_eq!(resources[0].uri, "r/t/x");
    assert_eq!(resources[0].sha256, hex::encode(Sha256::digest(b"one")));
    assert!(resources[0].applied_at > 0);

    let runtime = g
        .svc
        .report(ProbeKind::Runtime)
        .await
        .unwrap()
        .runtime
        .unwrap();
    assert_eq!(runtime.open_tunnels, 1);
    assert_eq!(runtime.daemon_version, env!("CARGO_PKG_VERSION"));
    assert!(runtime.rss_bytes > 0);

    let all = g.svc.report(ProbeKind::All).await.unwrap();
    assert!(all.health.is_some() && all.resources.is_some() && all.runtime.is_some());
}

#[tokio::test]
async fn serves_over_a_tarpc_channel() {
    let g = guest(None);
    let (client_side, server_side) = tarpc::transport::channel::unbounded();
    let server = tarpc::server::BaseChannel::with_defaults(server_side);
    tokio::spawn(
        server
            .execute(g.svc.clone().serve())
            .for_each(|call| async move {
                tokio::spawn(call);
            }),
    );
    let client = GuestServiceClient::new(tarpc::client::Config::default(), client_side).spawn();
    let ctx = tarpc::context::current;

    let echo = client
        .ping(ctx(), ByteBuf::from(b"hi".to_vec()))
        .await
        .unwrap();
    assert_eq!(echo.as_ref(), b"hi");
    let applied = client
        .apply_resource(ctx(), resource(&g.key, "r/t/x", 1, b"one"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(applied.version, 1);
    let err = client
        .apply_resource(ctx(), resource(&g.key, "r/t/x", 0, b"one"))
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, GuestError::Invalid(_)));
    let installed = client
        .install_credentials(ctx(), bundle(&g.key, 1, &tls_files(b"k")))
        .await
        .unwrap()
        .unwrap();
    assert!(!installed.already_held);
    let report = client.probe(ctx(), ProbeKind::All).await.unwrap().unwrap();
    assert_eq!(report.resources.unwrap().len(), 2);
}

#[tokio::test]
async fn a_new_version_into_a_read_only_state_dir_fails_naming_why_and_keeps_the_old_one() {
    let g = guest(None);
    let root = g.dir.path().join("state");
    g.svc
        .apply(resource(&g.key, "r/t/x", 1, b"one"))
        .await
        .unwrap();
    let Some(read_only) = ReadOnly::new_or_skip(
        &root,
        "a_new_version_into_a_read_only_state_dir_fails_naming_why_and_keeps_the_old_one",
    ) else {
        return;
    };
    let err = g
        .svc
        .apply(resource(&g.key, "r/t/x", 2, b"two"))
        .await
        .unwrap_err();
    let GuestError::Storage(message) = &err else {
        panic!("expected a storage error, got {err:?}");
    };
    assert!(
        message.contains(&root.display().to_string())
            && (message.contains("Read-only file system") || message.contains("ermission denied")),
        "the error names the path and the reason: {message}"
    );
    // The previous version is still the held and readable one.
    let file = root.join("resources/r/t/x");
    assert_eq!(std::fs::read(&file).unwrap(), b"one");
    let held = g
        .svc
        .store()
        .get_resource(&"r/t/x".parse().unwrap())
        .unwrap()
        .unwrap();
    assert_eq!((held.version, &held.plaintext[..]), (1, &b"one"[..]));
    let health = g
        .svc
        .report(ProbeKind::Health)
        .await
        .unwrap()
        .health
        .unwrap();
    assert!(!health.healthy);
    drop(read_only);
    // Writable again: the same push now applies.
    let applied = g
        .svc
        .apply(resource(&g.key, "r/t/x", 2, b"two"))
        .await
        .unwrap();
    assert_eq!((applied.version, applied.already_held), (2, false));
    assert_eq!(std::fs::read(&file).unwrap(), b"two");
}

#[tokio::test]
async fn a_write_that_fails_before_the_commit_leaves_the_previous_version_in_place() {
    let hook_log = tempfile::NamedTempFile::new().unwrap();
    let g = guest(Some(PostApplyHook::new(format!(
        "echo \"$TETHER_VERSION\" >> '{}'",
        hook_log.path().display()
    ))));
    let root = g.dir.path().join("state");
    g.svc
        .apply(resource(&g.key, "r/t/x", 1, b"one"))
        .await
        .unwrap();
    // Something in the way of version 2's metadata: its data is written, the metadata's
    // rename fails, so the stable name must never switch.
    let blocker = root.join("resources/r/t/x@v2.json");
    std::fs::create_dir(&blocker).unwrap();
    std::fs::write(blocker.join("keep"), b"").unwrap();
    let err = g
        .svc
        .apply(resource(&g.key, "r/t/x", 2, b"two"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, GuestError::Storage(m) if m.contains("x@v2.json")),
        "{err}"
    );
    assert_eq!(std::fs::read(root.join("resources/r/t/x")).unwrap(), b"one");
    assert!(
        !root.join("resources/r/t/x@v2").exists(),
        "the new data is cleaned up"
    );
    let held = g.svc.store().held();
    assert_eq!((held.len(), held[0].version), (1, 1));
    // No hook ran for the failed version.
    assert_eq!(std::fs::read_to_string(hook_log.path()).unwrap(), "1\n");
}

#[tokio::test]
async fn the_hook_sees_the_committed_version_and_its_status_is_reported() {
    let g = guest(Some(PostApplyHook::new(
        "test \"$(cat \"$TETHER_FILE\")\" = \"v$TETHER_VERSION\" && exit 42; exit 1",
    )));
    for version in 1..=2u64 {
        let plain = format!("v{version}");
        let applied = g
            .svc
            .apply(resource(&g.key, "r/t/x", version, plain.as_bytes()))
            .await
            .unwrap();
        assert_eq!(applied.hook_status, Some(42), "version {version}");
    }
    // A downgrade is refused before anything is written, and runs no hook.
    let err = g
        .svc
        .apply(resource(&g.key, "r/t/x", 1, b"v1"))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        GuestError::Downgrade {
            held: 2,
            offered: 1
        }
    );
    assert_eq!(
        std::fs::read(g.dir.path().join("state/resources/r/t/x")).unwrap(),
        b"v2"
    );
}

/// A field name and how to change that field.
type Swap<T> = (&'static str, Box<dyn Fn(&mut T)>);

/// Issue 17, defect 9: what travels beside the JWE (a resource's uri, version and digest; a
/// bundle's id, version, file modes and expiry) must be what the JWE binds, so a replayed
/// ciphertext cannot pass as a newer version nor land under another path.
#[tokio::test]
async fn push_metadata_that_the_jwe_does_not_bind_is_invalid() {
    let g = guest(None);
    let swaps: Vec<Swap<SealedResource>> = vec![
        ("version", Box::new(|r| r.version = 2)),
        ("uri", Box::new(|r| r.uri = "r/t/other".into())),
        (
            "sha256",
            Box::new(|r| r.sha256 = hex::encode(Sha256::digest(b"another plaintext"))),
        ),
    ];
    for (field, swap) in swaps {
        let mut res = resource(&g.key, "r/t/x", 1, b"one");
        swap(&mut res);
        let err = g.svc.apply(res).await.unwrap_err();
        assert!(
            matches!(&err, GuestError::Invalid(m) if m.contains(field)),
            "{field}: {err}"
        );
    }
    assert!(g.svc.store().held().is_empty(), "nothing applied");

    let files = [("k", 0o600, &b"key"[..]), ("c", 0o644, &b"crt"[..])];
    let bundle_swaps: Vec<Swap<CredentialBundle>> = vec![
        ("id", Box::new(|b| b.id = "other".into())),
        ("version", Box::new(|b| b.version = 7)),
        ("files", Box::new(|b| b.files[0].mode = 0o400)),
        ("not_after", Box::new(|b| b.not_after += 3600)),
    ];
    for (field, swap) in bundle_swaps {
        let mut b = bundle(&g.key, 1, &files);
        swap(&mut b);
        let err = g.svc.install(b).await.unwrap_err();
        assert!(
            matches!(&err, GuestError::Invalid(m) if m.contains(field)),
            "{field}: {err}"
        );
    }
    assert!(
        g.svc.store().bundle_versions().is_empty(),
        "nothing installed"
    );
    // Unchanged, both go through.
    g.svc
        .apply(resource(&g.key, "r/t/x", 1, b"one"))
        .await
        .unwrap();
    g.svc.install(bundle(&g.key, 1, &files)).await.unwrap();
}
