#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::*;
use crate::tee_key::TeeKeyPair;

fn rp(s: &str) -> ResourcePath {
    s.parse().unwrap()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn file(name: &str, mode: u32, contents: &[u8]) -> BundleFile {
    BundleFile {
        name: name.into(),
        mode,
        contents: Zeroizing::new(contents.to_vec()),
    }
}

fn tls_bundle(tag: &[u8]) -> Vec<BundleFile> {
    vec![
        file("server.key", 0o600, &[b"key-", tag].concat()),
        file("server.crt", 0o644, &[b"crt-", tag].concat()),
        file("ca.crt", 0o644, b"ca"),
    ]
}

/// Make every directory under `dir` (and `dir`) 0500; true when that really
/// stops writes (false when running as root).
fn make_read_only(dir: &Path) -> bool {
    fn walk(dir: &Path, mode: u32) {
        for entry in fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                walk(&entry.path(), mode);
            }
        }
        fs::set_permissions(dir, fs::Permissions::from_mode(mode)).unwrap();
    }
    walk(dir, 0o500);
    let probe = dir.join("probe");
    if fs::File::create(&probe).is_ok() {
        let _ = fs::remove_file(&probe);
        return false;
    }
    true
}

fn make_writable(dir: &Path) {
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).unwrap();
    for entry in fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            make_writable(&entry.path());
        }
    }
}

/// A test that cannot run here says so: `SKIPPED <test>: <why>` on stdout (shown in the
/// summary, see .config/nextest.toml), or a failure when `TETHER_TEST_REQUIRE_ALL=1` (set by
/// .ci/run, where every test must really run).
pub(crate) fn skip(test: &str, why: &str) {
    if std::env::var_os("TETHER_TEST_REQUIRE_ALL").is_some_and(|v| v == "1") {
        panic!("{test} cannot run here ({why}) and TETHER_TEST_REQUIRE_ALL=1 forbids skipping it");
    }
    println!("SKIPPED {test}: {why}");
}

/// `dir` made read-only for this process until dropped: mode 0500 when not root; as root
/// (which ignores modes) a read-only bind mount of `dir` onto itself.
pub(crate) struct ReadOnly {
    dir: std::path::PathBuf,
    mounted: bool,
}

impl ReadOnly {
    /// The guard, or `None` after [`skip`]ping `test` when neither way works here.
    pub(crate) fn new_or_skip(dir: &Path, test: &str) -> Option<Self> {
        let guard = Self::new(dir);
        if guard.is_none() {
            skip(
                test,
                "cannot make a directory read-only (not root, or no mount)",
            );
        }
        guard
    }

    fn new(dir: &Path) -> Option<Self> {
        if make_read_only(dir) {
            return Some(Self {
                dir: dir.to_owned(),
                mounted: false,
            });
        }
        make_writable(dir);
        let mount = |args: &[&str]| {
            std::process::Command::new("mount")
                .args(args)
                .arg(dir)
                .arg(dir)
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !mount(&["--bind"]) {
            return None;
        }
        let guard = Self {
            dir: dir.to_owned(),
            mounted: true,
        };
        mount(&["-o", "remount,bind,ro"]).then_some(guard)
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        if self.mounted {
            let _ = std::process::Command::new("umount").arg(&self.dir).status();
        } else {
            make_writable(&self.dir);
        }
    }
}

#[test]
fn apply_writes_stable_path_with_private_modes() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("state");
    let store = StateStore::open(&root).unwrap();
    assert_eq!(mode(&root), 0o700);
    let path = rp("default/key/1");
    let out = store.apply_resource(&path, 1, b"secret one").unwrap();
    assert!(!out.already_held);
    assert_eq!(out.sha256, hex::encode(Sha256::digest(b"secret one")));

    let stable = store.resource_file(&path);
    assert_eq!(stable, root.join("resources/default/key/1"));
    assert_eq!(fs::read(&stable).unwrap(), b"secret one");
    assert_eq!(mode(&stable), 0o600, "follows the symlink to the data");
    assert_eq!(mode(&root.join("resources/default/key/1@v1.json")), 0o600);
    for dir in ["resources", "resources/default", "resources/default/key"] {
        assert_eq!(mode(&root.join(dir)), 0o700, "{dir}");
    }
    let held = store.get_resource(&path).unwrap().unwrap();
    assert_eq!((held.version, &held.plaintext[..]), (1, &b"secret one"[..]));
    assert!(
        !format!("{held:?}").contains("secret"),
        "Debug redacts the plaintext"
    );
    assert!(store.get_resource(&rp("default/key/2")).unwrap().is_none());
}

#[test]
fn replay_is_idempotent_and_old_versions_go_away() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StateStore::open(tmp.path()).unwrap();
    let path = rp("r/t/tag");
    store.apply_resource(&path, 1, b"v1").unwrap();
    let again = store.apply_resource(&path, 1, b"v1").unwrap();
    assert!(again.already_held);
    assert_eq!(again.version, 1);

    store.apply_resource(&path, 2, b"v2").unwrap();
    let dir = tmp.path().join("resources/r/t");
    let mut names: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["tag", "tag@v2", "tag@v2.json"]);
    assert_eq!(fs::read(dir.join("tag")).unwrap(), b"v2");
}

#[test]
fn downgrade_and_same_version_conflict_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StateStore::open(tmp.path()).unwrap();
    let path = rp("r/t/tag");
    store.apply_resource(&path, 5, b"five").unwrap();
    assert!(matches!(
        store.apply_resource(&path, 4, b"four"),
        Err(StoreError::Downgrade {
            held: 5,
            offered: 4,
            ..
        })
    ));
    assert!(matches!(
        store.apply_resource(&path, 5, b"other five"),
        Err(StoreError::VersionConflict { version: 5, .. })
    ));
    assert_eq!(fs::read(store.resource_file(&path)).unwrap(), b"five");
}

#[test]
fn restart_reports_the_same_held_versions() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StateStore::open(tmp.path()).unwrap();
    store.apply_resource(&rp("a/b/c"), 3, b"abc").unwrap();
    store.apply_resource(&rp("a/b/d"), 1, b"abd").unwrap();
    store.apply_resource(&rp("x/y/z"), 7, b"xyz").unwrap();
    store
        .install_bundle("splitapi", 2, tls_bundle(b"2"), 1_900_000_000)
        .unwrap();
    let before = store.held();
    assert_eq!(before.len(), 4);
    assert!(
        before
            .iter()
            .any(|h| h.uri == "credentials/splitapi" && h.version == 2)
    );
    drop(store);

    let store = StateStore::open(tmp.path()).unwrap();
    assert_eq!(store.held(), before);
    assert_eq!(
        &store.get_resource(&rp("x/y/z")).unwrap().unwrap().plaintext[..],
        b"xyz"
    );
    assert!(
        store
            .apply_resource(&rp("a/b/c"), 3, b"abc")
            .unwrap()
            .already_held
    );
    assert!(matches!(
        store.apply_resource(&rp("a/b/c"), 2, b"old"),
        Err(StoreError::Downgrade { held: 3, .. })
    ));
}

#[test]
fn crash_leftovers_are_swept_and_the_committed_version_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StateStore::open(tmp.path()).unwrap();
    let path = rp("r/t/tag");
    store.apply_resource(&path, 2, b"two").unwrap();
    drop(store);
    // A crash after writing v3's files but before the symlink switch, and one
    // in the middle of a temp write.
    let dir = tmp.path().join("resources/r/t");
    fs::write(dir.join("tag@v3"), b"three").unwrap();
    fs::write(dir.join("tag@v3.json"), b"{}").unwrap();
    fs::write(dir.join("~tag@v3.0123456789abcdef"), b"thr").unwrap();
    fs::create_dir(tmp.path().join("credentials")).unwrap();
    fs::create_dir(tmp.path().join("credentials/~splitapi@v1.0000000000000000")).unwrap();

    let store = StateStore::open(tmp.path()).unwrap();
    let held = store.held();
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].version, 2);
    assert_eq!(fs::read(dir.join("tag")).unwrap(), b"two");
    assert!(!dir.join("tag@v3").exists());
    assert!(!dir.join("tag@v3.json").exists());
    assert!(!dir.join("~tag@v3.0123456789abcdef").exists());
    assert_eq!(
        fs::read_dir(tmp.path().join("credentials"))
            .unwrap()
            .count(),
        0
    );
    // v3 can now be applied for real.
    assert!(
        !store
            .apply_resource(&path, 3, b"three")
            .unwrap()
            .already_held
    );
}

#[test]
fn a_version_whose_data_does_not_match_its_digest_is_forgotten() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StateStore::open(tmp.path()).unwrap();
    let path = rp("r/t/tag");
    store.apply_resource(&path, 1, b"good").unwrap();
    drop(store);
    fs::write(tmp.path().join("resources/r/t/tag@v1"), b"bad!").unwrap();

    let store = StateStore::open(tmp.path()).unwrap();
    assert!(
        store.held().is_empty(),
        "not held, so the KBS pushes it again"
    );
    let out = store.apply_resource(&path, 1, b"good").unwrap();
    assert!(!out.already_held);
    assert_eq!(fs::read(store.resource_file(&path)).unwrap(), b"good");
}

#[test]
fn foreign_entries_are_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StateStore::open(tmp.path()).unwrap();
    store.apply_resource(&rp("r/t/tag"), 1, b"x").unwrap();
    drop(store);
    let dir = tmp.path().join("resources/r/t");
    fs::write(dir.join("README"), b"hello").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", dir.join("evil")).unwrap();
    let store = StateStore::open(tmp.path()).unwrap();
    assert_eq!(store.held().len(), 1);
    assert!(dir.join("README").exists());
}

#[test]
fn bundle_install_replay_downgrade_and_modes() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StateStore::open(tmp.path()).unwrap();
    let out = store
        .install_bundle("splitapi", 1, tls_bundle(b"1"), 1_900_000_000)
        .unwrap();
    assert!(!out.already_held);
    let stable = store.bundle_dir("splitapi");
    assert_eq!(fs::read(stable.join("server.key")).unwrap(), b"key-1");
    assert_eq!(mode(&stable.join("server.key")), 0o600);
    assert_eq!(mode(&stable.join("server.crt")), 0o644);
    assert_eq!(mode(&stable.join("ca.crt")), 0o644);

    let replay = store
        .install_bundle("splitapi", 1, tls_bundle(b"1"), 1_900_000_000)
        .unwrap();
    assert!(replay.already_held);
    assert_eq!(replay.sha256, out.sha256);
    assert!(matches!(
        store.install_bundle("splitapi", 1, tls_bundle(b"x"), 0),
        Err(StoreError::VersionConflict { .. })
    ));
    let mut other_modes = tls_bundle(b"1");
    other_modes[1].mode = 0o600;
    assert!(matches!(
        store.install_bundle("splitapi", 1, other_modes, 0),
        Err(StoreError::VersionConflict { .. })
    ));

    store
        .install_bundle("splitapi", 2, tls_bundle(b"2"), 0)
        .unwrap();
    assert_eq!(fs::read(stable.join("server.key")).unwrap(), b"key-2");
    assert!(!tmp.path().join("credentials/splitapi@v1").exists());
    assert!(!tmp.path().join("credentials/splitapi@v1.json").exists());
    assert!(matches!(
        store.install_bundle("splitapi", 1, tls_bundle(b"1"), 0),
        Err(StoreError::Downgrade {
            held: 2,
            offered: 1,
            ..
        })
    ));
    let held = store.read_bundle("splitapi").unwrap().unwrap();
    assert_eq!(held.version, 2);
    let names: Vec<&str> = held.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["ca.crt", "server.crt", "server.key"]);
    assert_eq!(
        store.bundle_versions(),
        BTreeMap::from([("splitapi".to_owned(), 2)])
    );
    assert!(
        !format!("{held:?}").contains("key-2"),
        "Debug redacts contents"
    );
}

#[test]
fn bad_names_and_modes_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StateStore::open(tmp.path()).unwrap();
    for bad in ["../x", "a/b", "..", ".", "", "a b", "x~y", "x@v1"] {
        let err = store
            .install_bundle("ok", 1, vec![file(bad, 0o600, b"x")], 0)
            .unwrap_err();
        assert!(
            matches!(err, StoreError::InvalidName { .. }),
            "{bad:?}: {err}"
        );
        let err = store
            .install_bundle(bad, 1, vec![file("ok", 0o600, b"x")], 0)
            .unwrap_err();
        assert!(
            matches!(err, StoreError::InvalidName { .. }),
            "{bad:?}: {err}"
        );
        assert!(store.store_secret(bad, b"x").is_err(), "{bad:?}");
    }
    let long = "a".repeat(MAX_NAME_LEN + 1);
    assert!(matches!(
        store.apply_resource(&rp(&format!("r/t/{long}")), 1, b"x"),
        Err(StoreError::InvalidName { .. })
    ));
    for bad_mode in [0o4600, 0o666, 0o620, 0o200, 0o1644] {
        assert!(matches!(
            store.install_bundle("ok", 1, vec![file("f", bad_mode, b"x")], 0),
            Err(StoreError::InvalidBundle(_))
        ));
    }
    assert!(matches!(
        store.install_bundle(
            "ok",
            1,
            vec![file("f", 0o600, b"x"), file("f", 0o600, b"y")],
            0
        ),
        Err(StoreError::InvalidBundle(_))
    ));
    assert!(matches!(
        store.install_bundle("ok", 1, vec![], 0),
        Err(StoreError::InvalidBundle(_))
    ));
    assert!(store.held().is_empty());
    assert!(!tmp.path().join("x").exists());
}

#[test]
fn secrets_round_trip_with_private_mode() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StateStore::open(tmp.path()).unwrap();
    assert!(store.get_secret("api-token").unwrap().is_none());
    let first = store.store_secret("api-token", b"t1").unwrap();
    assert_eq!(first.version, 1);
    assert_eq!(first.path, tmp.path().join("secrets/api-token"));
    assert_eq!(first.path, store.secret_file("api-token"));
    assert_eq!(mode(&first.path), 0o600);
    assert_eq!(mode(&tmp.path().join("secrets")), 0o700);
    assert_eq!(fs::read(&first.path).unwrap(), b"t1");
    // A re-put is a new version; the old one is gone once the new one is committed.
    let second = store.store_secret("api-token", b"t2").unwrap();
    assert_eq!(second.version, 2);
    assert_eq!(second.sha256, hex::encode(Sha256::digest(b"t2")));
    let held = store.get_secret("api-token").unwrap().unwrap();
    assert_eq!((held.version, &held.plaintext[..]), (2, &b"t2"[..]));
    assert_eq!(fs::read(&second.path).unwrap(), b"t2");
    assert_eq!(
        fs::read_link(&second.path).unwrap(),
        Path::new("api-token@v2")
    );
    assert!(!tmp.path().join("secrets/api-token@v1").exists());
    assert!(!tmp.path().join("secrets/api-token@v1.json").exists());
    // Secrets are the owner's: never reported to the KBS with the held resources.
    assert!(store.held().is_empty());
    // A restart keeps the version, so the next put goes on counting.
    drop(store);
    let store = StateStore::open(tmp.path()).unwrap();
    assert_eq!(
        store.held_secrets(),
        vec![HeldSecret {
            name: "api-token".into(),
            version: 2,
            applied_at: held_at(&store, "api-token"),
        }]
    );
    assert_eq!(store.store_secret("api-token", b"t3").unwrap().version, 3);
    // No temp files are left behind.
    let names: Vec<String> = fs::read_dir(tmp.path().join("secrets"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.iter().all(|n| !n.starts_with('~')), "{names:?}");
}

fn held_at(store: &StateStore, name: &str) -> u64 {
    store
        .held_secrets()
        .into_iter()
        .find(|s| s.name == name)
        .unwrap()
        .applied_at
}

#[test]
fn tee_key_survives_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StateStore::open(tmp.path()).unwrap();
    let key = store.load_or_create_tee_key(TeeKeyPair::new_ec).unwrap();
    let path = tmp.path().join("tee_key.pem");
    assert_eq!(mode(&path), 0o600);
    drop(store);

    let store = StateStore::open(tmp.path()).unwrap();
    let again = store
        .load_or_create_tee_key(|| panic!("must not generate a second key"))
        .unwrap();
    assert_eq!(
        serde_json::to_value(again.export_pubkey()).unwrap(),
        serde_json::to_value(key.export_pubkey()).unwrap()
    );
}

#[test]
fn a_corrupt_tee_key_is_an_error_not_a_new_key() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StateStore::open(tmp.path()).unwrap();
    fs::write(tmp.path().join("tee_key.pem"), b"garbage").unwrap();
    let err = store
        .load_or_create_tee_key(|| panic!("must not replace the key"))
        .unwrap_err();
    assert!(matches!(err, StoreError::Key { .. }));
    assert!(err.to_string().contains("tee_key.pem"), "{err}");
    assert_eq!(
        fs::read(tmp.path().join("tee_key.pem")).unwrap(),
        b"garbage"
    );
}

#[test]
fn read_only_state_dir_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("state");
    let store = StateStore::open(&root).unwrap();
    store.apply_resource(&rp("r/t/held"), 1, b"x").unwrap();
    let Some(read_only) = ReadOnly::new_or_skip(&root, "read_only_state_dir_is_a_clear_error")
    else {
        return;
    };
    let err = store.apply_resource(&rp("r/t/new"), 1, b"x").unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, StoreError::Io { .. }), "{msg}");
    assert!(
        msg.contains(&root.display().to_string())
            && (msg.contains("ermission denied") || msg.contains("Read-only file system")),
        "{msg}"
    );
    assert!(store.apply_resource(&rp("other/t/new"), 1, b"x").is_err());
    assert!(store.store_secret("s", b"x").is_err());
    assert!(!store.check_writable().is_empty());
    // Reading still works, and reopening a read-only dir works too.
    assert_eq!(store.held().len(), 1);
    let reopened = StateStore::open(&root).unwrap();
    assert_eq!(reopened.held().len(), 1);
    drop(read_only);
    assert!(store.check_writable().is_empty());
}
