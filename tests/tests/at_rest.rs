#![allow(clippy::unwrap_used)]
//! Encryption at rest, read from the disk: no resource plaintext and no private key the KBS
//! holds (uploaded as a resource, or made by the splitapi plugin) appears in any file under
//! the data directory (database, WAL, shared memory, key files), in any encoding, while the
//! KBS runs, after it stopped, and after the resources were deleted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use guest_daemon::tee_key::TeeKeyPair;
use rand::RngCore;
use serde_bytes::ByteBuf;
use serde_json::Value;
use tests::{ALLOW_SAMPLE, TestKbs, der};

/// Every regular file under `dir`, with its bytes.
fn files_under(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() {
                files.insert(entry.path(), std::fs::read(entry.path()).unwrap());
            }
        }
    }
    files
}

/// The ways a secret could have been written: raw, hex, base64 (standard and URL-safe).
fn encodings(secret: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    // A prefix of 48 bytes is as telling as the whole and survives page boundaries better.
    let secret = &secret[..secret.len().min(48)];
    vec![
        ("raw", secret.to_vec()),
        ("hex", hex(secret).into_bytes()),
        ("base64", STANDARD.encode(secret).into_bytes()),
        ("base64url", URL_SAFE_NO_PAD.encode(secret).into_bytes()),
    ]
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Fails naming the file, the secret and the encoding found. `stored` is something the
/// database does hold in clear (a resource path): finding it shows the scan reads the files
/// the data is in.
fn assert_nowhere(dir: &Path, secrets: &[(String, Vec<u8>)], stored: &str, when: &str) {
    let files = files_under(dir);
    let names: Vec<_> = files.keys().map(|p| p.strip_prefix(dir).unwrap()).collect();
    assert!(
        files.keys().any(|p| p.ends_with("tether.db")),
        "no database under {}: {names:?}",
        dir.display()
    );
    assert!(
        files
            .values()
            .any(|bytes| bytes.windows(stored.len()).any(|w| w == stored.as_bytes())),
        "{when}: the scan did not even find {stored:?} in {names:?}"
    );
    for (path, bytes) in &files {
        for (what, secret) in secrets {
            for (encoding, needle) in encodings(secret) {
                assert!(
                    !bytes.windows(needle.len()).any(|w| w == needle),
                    "{when}: {what} ({encoding}) found in {}",
                    path.display()
                );
            }
        }
    }
    eprintln!("{when}: checked {} secrets in {names:?}", secrets.len());
}

fn random(len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    rand::thread_rng().fill_bytes(&mut bytes);
    bytes
}

/// The splitapi plugin's keys for `guest_id` (server key sealed to the guest, the owner's
/// client key), as DER.
async fn splitapi_keys(kbs: &TestKbs, guest_id: &str) -> Vec<(String, Vec<u8>)> {
    let key = TeeKeyPair::new_ec();
    let init = format!("[tether]\nguest_id = \"{guest_id}\"\nname = \"{guest_id}.example\"\n");
    let token = kbs.attest(&key, Some(&init)).await;
    let body: Value = kbs
        .http()
        .get(format!("{}/kbs/v0/splitapi/credentials", kbs.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let plain = key
        .open_json(&serde_json::to_vec(&body["jwe"]).unwrap())
        .unwrap();
    let files: BTreeMap<String, ByteBuf> = ciborium::from_reader(plain.as_slice()).unwrap();
    let server_key = String::from_utf8(files["server.key"].to_vec()).unwrap();
    let owner = kbs.admin().splitapi_client_creds(guest_id).await.unwrap();
    vec![
        ("the guest's server key (DER)".into(), der(&server_key)),
        (
            "the owner's client key (DER)".into(),
            der(&owner.client_key),
        ),
    ]
}

/// A resource path: kept in clear (and after DELETE: the row stays, its ciphertext goes).
const STORED: &str = "default/secret/s2";

#[tokio::test]
async fn no_plaintext_or_private_key_is_on_disk_running_stopped_or_deleted() {
    let kbs = TestKbs::start().await;
    let admin = kbs.admin();
    admin.set_policy(ALLOW_SAMPLE).await.unwrap();
    let mut secrets: Vec<(String, Vec<u8>)> = Vec::new();
    // Random secrets of several sizes (one spans many pages), and a private key as DER.
    for (n, len) in [32usize, 1000, 70_000].into_iter().enumerate() {
        let secret = random(len);
        admin
            .put_resource(&format!("default/secret/s{n}"), secret.clone())
            .await
            .unwrap();
        secrets.push((format!("resource s{n} ({len} bytes)"), secret));
    }
    let uploaded_key = rcgen::KeyPair::generate().unwrap().serialize_der();
    admin
        .put_resource("default/key/tls", uploaded_key.clone())
        .await
        .unwrap();
    secrets.push(("an uploaded private key (DER)".into(), uploaded_key));
    secrets.extend(splitapi_keys(&kbs, "rest-1").await);

    let data_dir = kbs.data_dir.clone();
    assert_nowhere(
        &data_dir,
        &secrets,
        STORED,
        "while the KBS runs (WAL and shm files)",
    );

    for n in 0..3 {
        admin
            .delete_resource(&format!("default/secret/s{n}"))
            .await
            .unwrap();
    }
    admin.delete_resource("default/key/tls").await.unwrap();
    assert_nowhere(&data_dir, &secrets, STORED, "after DELETE");

    let (_config, dir) = kbs.stop().await;
    assert_nowhere(&data_dir, &secrets, STORED, "after a graceful stop");
    drop(dir);
}

/// The ciphertext of every stored version of `path`, read from the database file.
async fn ciphertexts(data_dir: &Path, path: &str) -> Vec<Vec<u8>> {
    use sqlx::Row;
    let url = format!("sqlite://{}?mode=ro", data_dir.join("tether.db").display());
    let db = sqlx::SqlitePool::connect(&url).await.unwrap();
    let rows = sqlx::query("SELECT ciphertext FROM resources WHERE path = ?1 ORDER BY version")
        .bind(path)
        .fetch_all(&db)
        .await
        .unwrap();
    db.close().await;
    rows.iter().map(|r| r.get::<Vec<u8>, _>(0)).collect()
}

/// DELETE is a crypto-shred of the stored versions: their ciphertext (sealed under the KEK,
/// which stays) must leave the disk too, or whoever reads the files and the KEK reads the
/// deleted secret. SQLite keeps freed cells in the page and old pages in the WAL unless
/// `secure_delete` is on.
#[tokio::test]
async fn delete_leaves_no_ciphertext_of_the_deleted_versions_on_disk() {
    let kbs = TestKbs::start().await;
    let admin = kbs.admin();
    let path = "default/secret/shredded";
    for _ in 0..3 {
        admin.put_resource(path, random(2000)).await.unwrap();
    }
    let sealed = ciphertexts(&kbs.data_dir, path).await;
    assert_eq!(sealed.len(), 3);
    assert!(sealed.iter().all(|c| c.len() > 2000), "{:?}", sealed.len());
    let secrets: Vec<(String, Vec<u8>)> = sealed
        .into_iter()
        .enumerate()
        .map(|(n, c)| (format!("version {} ciphertext", n + 1), c))
        .collect();
    // Before DELETE the scan finds them: it looks where they are.
    let files = files_under(&kbs.data_dir);
    let needle = &secrets[0].1[..48];
    assert!(
        files
            .values()
            .any(|b| b.windows(needle.len()).any(|w| w == needle)),
        "the stored ciphertext is on disk before DELETE"
    );

    admin.delete_resource(path).await.unwrap();
    let data_dir = kbs.data_dir.clone();
    let (_config, dir) = kbs.stop().await;
    assert_nowhere(
        &data_dir,
        &secrets,
        path,
        "after DELETE and a graceful stop",
    );
    drop(dir);
}
