//! Storage benchmark, both engines side by side: resource puts and latest-version gets, and
//! rollout acks written in the rotation writer's batches and one by one. SQLite is a file in
//! a temporary directory; PostgreSQL is the test kit's throwaway cluster (or `--postgres-url`).
//! Prints operations per second per engine.
//!
//! ```sh
//! cargo run --release -p examples --example store_bench
//! cargo run --release -p examples --example store_bench -- --ops 5000 --targets 20000
//! ```

use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use kbs_core::resource_path::ResourcePath;
use kbs_core::storage::{
    KeyEncryptionKey, NewRollout, PostgresStore, SqliteStore, Store, TargetRecord, TargetState,
};

#[derive(Parser, Debug)]
struct Args {
    /// Resource puts and gets per engine.
    #[arg(long, default_value_t = 2000)]
    ops: usize,
    /// Rollout targets acked per engine.
    #[arg(long, default_value_t = 10_000)]
    targets: usize,
    /// Targets per batch write (the rotation writer's batch).
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// An existing PostgreSQL database instead of a throwaway cluster.
    #[arg(long)]
    postgres_url: Option<String>,
}

fn per_second(n: usize, started: Instant) -> f64 {
    n as f64 / started.elapsed().as_secs_f64()
}

async fn bench(name: &str, store: Arc<dyn Store>, args: &Args) -> anyhow::Result<()> {
    let path: ResourcePath = "bench/key/one".parse().map_err(anyhow::Error::msg)?;
    let data = vec![7u8; 256];
    let started = Instant::now();
    for _ in 0..args.ops {
        store.put_resource(&path, &data, "bench").await?;
    }
    let puts = per_second(args.ops, started);
    let started = Instant::now();
    for _ in 0..args.ops {
        store.get_resource(&path, None).await?;
    }
    let gets = per_second(args.ops, started);

    let ids: Vec<String> = (0..args.targets).map(|n| format!("g{n:06}")).collect();
    let rollout = store
        .create_rollout(
            &NewRollout {
                path: "bench/key/one".into(),
                version: 1,
                sha256: "00".into(),
                selector: String::new(),
                max_concurrent: 64,
                max_attempts: 5,
                guest_deadline_ms: 30_000,
                deadline_at: None,
                created_by: "bench".into(),
            },
            &ids,
        )
        .await?
        .rollout;
    let acked = |g: &String| {
        let mut t = TargetRecord::pending(rollout.id, g);
        t.state = TargetState::Acked;
        t.held_version = Some(1);
        t.acked_at = Some(kbs_core::storage::now_ms());
        t
    };
    let started = Instant::now();
    for chunk in ids.chunks(args.batch) {
        let rows: Vec<TargetRecord> = chunk.iter().map(acked).collect();
        store.write_targets(&rows).await?;
    }
    let batched = per_second(args.targets, started);
    let singles = args.ops.min(args.targets);
    let started = Instant::now();
    for g in &ids[..singles] {
        store.write_targets(&[acked(g)]).await?;
    }
    let single = per_second(singles, started);
    println!("{name:<10} {puts:>10.0} {gets:>12.0} {batched:>16.0} {single:>14.0}");
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let kek = Arc::new(KeyEncryptionKey::from_bytes(&[9u8; 32]));
    println!(
        "{:<10} {:>10} {:>12} {:>16} {:>14}",
        "engine", "puts/s", "gets/s", "acks/s (batch)", "acks/s (one)"
    );
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}", dir.path().join("bench.db").display());
    bench(
        "sqlite",
        Arc::new(SqliteStore::open(&url, kek.clone()).await?),
        &args,
    )
    .await?;
    let _db;
    let pg_url = match &args.postgres_url {
        Some(url) => url.clone(),
        None => match tests::pg_database("store_bench").await {
            Some(db) => {
                let url = db.url.clone();
                _db = db;
                url
            }
            None => return Ok(()),
        },
    };
    bench(
        "postgres",
        Arc::new(PostgresStore::open(&pg_url, kek).await?),
        &args,
    )
    .await?;
    Ok(())
}
