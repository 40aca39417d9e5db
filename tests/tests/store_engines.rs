#![allow(clippy::unwrap_used)]
//! The storage suite (`kbs_core::storage::suite`, run on SQLite by kbs-core's own tests) on a
//! real PostgreSQL cluster, plus what only PostgreSQL needs: both migration sets end with
//! the same tables and columns, secrets are sealed in the database, and no replica serves a
//! version another replica replaced.

use std::collections::BTreeSet;
use std::sync::Arc;

use kbs_core::resource_path::ResourcePath;
use kbs_core::storage::suite::Opened;
use kbs_core::storage::{
    KeyEncryptionKey, KvStore, PostgresStore, ResourceStore, SqliteStore, StoreError,
};
use sqlx::{Connection, Row};

fn kek(byte: u8) -> Arc<KeyEncryptionKey> {
    Arc::new(KeyEncryptionKey::from_bytes(&[byte; 32]))
}

/// Two `PostgresStore`s (two pools, as two replicas) on a fresh database.
async fn open(case: &'static str) -> Opened {
    let db = tests::pg_database(case).await?;
    let a = PostgresStore::open(&db.url, kek(1)).await.unwrap();
    let b = PostgresStore::open(&db.url, kek(1)).await.unwrap();
    Some((Box::new(db), Arc::new(a), Arc::new(b)))
}

mod postgres {
    use super::*;
    kbs_core::store_suite!(open);
}

/// `(table, column, type class, not null)` of every table the migrations made.
type Schema = BTreeSet<(String, String, &'static str, bool)>;

fn type_class(declared: &str) -> &'static str {
    match declared.to_ascii_lowercase().as_str() {
        "integer" | "bigint" => "integer",
        "text" => "text",
        "blob" | "bytea" => "bytes",
        _ => "other",
    }
}

/// The migration sets of the two engines (server/core/migrations/{sqlite,postgres}) are
/// kept in step: a table or column added to one only fails here.
#[tokio::test]
async fn both_engines_end_up_with_the_same_tables_and_columns() {
    let Some(db) = tests::pg_database("both_engines_end_up_with_the_same_tables_and_columns").await
    else {
        return;
    };
    PostgresStore::open(&db.url, kek(1)).await.unwrap();
    let mut pg = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let rows = sqlx::query(
        "SELECT table_name::TEXT, column_name::TEXT, data_type::TEXT, is_nullable::TEXT
         FROM information_schema.columns
         WHERE table_schema = 'public' AND table_name <> '_sqlx_migrations'",
    )
    .fetch_all(&mut pg)
    .await
    .unwrap();
    let postgres: Schema = rows
        .iter()
        .map(|r| {
            let ty: String = r.get(2);
            let nullable: String = r.get(3);
            (r.get(0), r.get(1), type_class(&ty), nullable == "NO")
        })
        .collect();

    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    SqliteStore::open(&url, kek(1)).await.unwrap();
    let mut lite = sqlx::SqliteConnection::connect(&url).await.unwrap();
    let rows = sqlx::query(
        "SELECT m.name, p.name, p.type, p.\"notnull\", p.pk FROM sqlite_master m
         JOIN pragma_table_info(m.name) p
         WHERE m.type = 'table' AND m.name NOT IN ('sqlite_sequence', '_sqlx_migrations')",
    )
    .fetch_all(&mut lite)
    .await
    .unwrap();
    let sqlite: Schema = rows
        .iter()
        .map(|r| {
            let ty: String = r.get(2);
            let not_null: i64 = r.get(3);
            let pk: i64 = r.get(4);
            // SQLite's INTEGER PRIMARY KEY is never null without saying so.
            (
                r.get(0),
                r.get(1),
                type_class(&ty),
                not_null != 0 || pk != 0,
            )
        })
        .collect();
    assert!(sqlite.len() > 50, "{sqlite:?}");
    assert!(postgres.iter().all(|c| c.2 != "other"), "{postgres:?}");
    let only_sqlite: Vec<_> = sqlite.difference(&postgres).collect();
    let only_postgres: Vec<_> = postgres.difference(&sqlite).collect();
    assert!(
        only_sqlite.is_empty() && only_postgres.is_empty(),
        "migrations differ:\n  only in SQLite: {only_sqlite:?}\n  only in PostgreSQL: {only_postgres:?}"
    );
}

/// Resource versions and plugin values reach PostgreSQL sealed under the KEK, which the
/// database never holds: the raw rows carry no plaintext, and a replica with another KEK
/// opens nothing.
#[tokio::test]
async fn secrets_reach_postgres_sealed_under_the_kek() {
    let Some(db) = tests::pg_database("secrets_reach_postgres_sealed_under_the_kek").await else {
        return;
    };
    let store = PostgresStore::open(&db.url, kek(1)).await.unwrap();
    let path: ResourcePath = "default/key/sealed".parse().unwrap();
    let secret = b"the plaintext that must never be stored as is".to_vec();
    store.put_resource(&path, &secret, "t").await.unwrap();
    store.kv_put("pki", "ca-key", &secret).await.unwrap();

    let mut pg = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let mut raw: Vec<Vec<u8>> = sqlx::query_scalar("SELECT ciphertext FROM resources")
        .fetch_all(&mut pg)
        .await
        .unwrap();
    raw.extend(
        sqlx::query_scalar::<_, Vec<u8>>("SELECT value FROM plugin_kv")
            .fetch_all(&mut pg)
            .await
            .unwrap(),
    );
    assert_eq!(raw.len(), 2);
    for value in &raw {
        assert!(value.len() >= secret.len(), "sealed values are whole");
        assert!(
            !value
                .windows(16)
                .any(|w| secret.windows(16).any(|s| s == w)),
            "plaintext in a row"
        );
    }

    let other = PostgresStore::open(&db.url, kek(2)).await.unwrap();
    assert!(matches!(
        other.get_resource(&path, None).await,
        Err(StoreError::Crypto(_))
    ));
    assert!(matches!(
        other.kv_get("pki", "ca-key").await,
        Err(StoreError::Crypto(_))
    ));
    let back = store.get_resource(&path, None).await.unwrap().unwrap();
    assert_eq!(back.data.as_slice(), secret.as_slice());
}

/// A replica that read version 1 reads version 2 as soon as another replica stored it (no
/// per-process cache can hide it), and a delete on one replica is seen by the other.
#[tokio::test]
async fn no_replica_serves_a_version_another_replaced_or_deleted() {
    let Some((_db, a, b)) = open("no_replica_serves_a_version_another_replaced_or_deleted").await
    else {
        return;
    };
    let path: ResourcePath = "default/key/rotated".parse().unwrap();
    a.put_resource(&path, b"v1", "t").await.unwrap();
    for _ in 0..3 {
        assert_eq!(
            b.get_resource(&path, None).await.unwrap().unwrap().version,
            1
        );
    }
    a.put_resource(&path, b"v2", "t").await.unwrap();
    let got = b.get_resource(&path, None).await.unwrap().unwrap();
    assert_eq!((got.version, got.data.as_slice()), (2, &b"v2"[..]));
    a.delete_resource(&path, "t").await.unwrap();
    assert!(b.get_resource(&path, None).await.unwrap().is_none());
    assert_eq!(b.engine(), "postgres");
}
