//! Fleet view benchmark: a KBS (in process, on loopback) that knows 100,000 guests, queried
//! over HTTP like an operator would: `GET /kbs/v0/admin/guests` with a selector, the drift
//! filter, connected=false, and paging by cursor. Prints p50/p99 per query shape (target: a
//! filtered page in under 50 ms), plus how long the 100,000 records take to write to SQLite
//! and to load back at start.
//!
//! ```sh
//! cargo run --release -p examples --example fleet_view_bench
//! cargo run --release -p examples --example fleet_view_bench -- --guests 100000 --rounds 200
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use examples::percentile;
use kbs_core::admin_key::AdminKeyPair;
use kbs_core::fleet::{ConnectionRecord, Fleet, GuestRecord, HeldVersion, LastProbe};
use server::admin_client::AdminClient;
use server::app::Kbs;
use server::config::Config;

#[derive(Parser, Debug)]
struct Args {
    /// Known guests.
    #[arg(long, default_value_t = 100_000)]
    guests: usize,
    /// Requests per query shape.
    #[arg(long, default_value_t = 200)]
    rounds: usize,
    /// Page size.
    #[arg(long, default_value_t = 100)]
    limit: usize,
}

const PATH: &str = "default/key/tls";
const APPS: &[&str] = &[
    "db", "web", "cache", "queue", "auth", "search", "batch", "ml",
];
const ZONES: &[&str] = &["eu-1", "eu-2", "us-1", "us-2", "ap-1"];

fn record(i: usize) -> GuestRecord {
    let now = 1_760_000_000_000u64;
    let app = APPS[i % APPS.len()];
    let zone = ZONES[(i / APPS.len()) % ZONES.len()];
    let mut labels = BTreeMap::from([
        ("app".to_string(), app.to_string()),
        ("zone".to_string(), zone.to_string()),
    ]);
    if i.is_multiple_of(100) {
        labels.insert("canary".into(), "true".into());
    }
    // One guest in 50 still holds version 2 of the resource; the rest hold 3 (the latest).
    let held = if i % 50 == 7 { 2 } else { 3 };
    GuestRecord {
        guest_id: format!("guest-{i:06}"),
        labels: std::sync::Arc::new(labels),
        tee: Some("tdx".into()),
        attested_at: Some(now),
        token_expires_at: Some(now + 300_000),
        first_seen: now - 86_400_000,
        last_seen: now,
        connected: false,
        instance: format!("inst-{i}"),
        daemon_version: "0.1.0".into(),
        services: vec!["resources".into()],
        history: (0..3)
            .map(|k| ConnectionRecord {
                epoch: (i * 10 + k) as u64,
                session_id: format!("s-{i}-{k}"),
                connected_at: now - 3_600_000 * (k as u64 + 1),
                disconnected_at: Some(now - 3_600_000 * k as u64),
                close_code: Some(1000),
                reason: Some("normal".into()),
            })
            .collect(),
        last_probe: Some(Box::new(LastProbe {
            at: now,
            kind: "all".into(),
            outcome: "ok".into(),
            error: None,
            rtt_us: 800,
            health: None,
            runtime: None,
        })),
        held: BTreeMap::from([(
            PATH.to_string(),
            HeldVersion {
                version: held,
                sha256: "ab".repeat(32),
                applied_at: 1_760_000_000,
            },
        )]),
        held_at: Some(now),
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut config = Config::default();
    config.storage.data_dir = dir.path().join("data");
    config.http.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.log.level = "warn".into();

    // 1. Fill the fleet and write it to SQLite (what the flusher does, in one go here).
    let kbs = Kbs::build(config.clone()).await.context("KBS builds")?;
    let store = kbs.state.store.clone();
    let started = Instant::now();
    let records: Vec<GuestRecord> = (0..args.guests).map(record).collect();
    let fleet = Fleet::new();
    for r in records {
        fleet.insert(r);
    }
    let built = started.elapsed();
    let started = Instant::now();
    fleet
        .flush(store.as_ref(), &kbs.state.metrics.observability)
        .await;
    let written = started.elapsed();
    drop(kbs);

    // 2. Start a real KBS on that data: it loads the fleet at start.
    let started = Instant::now();
    let kbs = Kbs::build(config.clone()).await.context("KBS builds")?;
    let loaded = started.elapsed();
    anyhow::ensure!(
        kbs.state.fleet.len() == args.guests,
        "loaded {} guests",
        kbs.state.fleet.len()
    );
    let listener = tokio::net::TcpListener::bind(config.http.listen).await?;
    let url = format!("http://{}", listener.local_addr()?);
    let state = kbs.state.clone();
    let key = AdminKeyPair::load(&config.storage.data_dir.join("admin.key"))?;
    tokio::spawn(kbs.serve(listener));
    let admin = Arc::new(AdminClient::new(&url, key, None)?);
    for v in 1..=3 {
        admin
            .put_resource(PATH, format!("v{v}").into_bytes())
            .await?;
    }

    println!(
        "fleet of {} guests: built in memory in {:.0} ms, written to SQLite in {:.0} ms, loaded at start in {:.0} ms",
        args.guests,
        built.as_secs_f64() * 1e3,
        written.as_secs_f64() * 1e3,
        loaded.as_secs_f64() * 1e3
    );
    println!(
        "\n{:<58} {:>8} {:>9} {:>9} {:>9}",
        "query (limit per page)", "matches", "p50", "p99", "max"
    );

    let l = args.limit;
    let shapes: Vec<(String, String)> = vec![
        (
            "all known, first page".into(),
            format!("connected=any&limit={l}"),
        ),
        (
            "selector app=db".into(),
            format!("connected=any&selector=app%3Ddb&limit={l}"),
        ),
        (
            "selector app=db,zone in (eu-1,eu-2)".into(),
            format!("connected=any&selector=app%3Ddb%2Czone%20in%20(eu-1%2Ceu-2)&limit={l}"),
        ),
        (
            "selector canary (1 in 100)".into(),
            format!("connected=any&selector=canary&limit={l}"),
        ),
        (
            "drift: stale=<path> (1 in 50)".into(),
            format!("connected=any&stale={PATH}&limit={l}"),
        ),
        (
            "drift + selector app=web".into(),
            format!("connected=any&stale={PATH}&selector=app%3Dweb&limit={l}"),
        ),
        (
            "connected=false, page from the middle".into(),
            format!("connected=false&cursor=guest-050000&limit={l}"),
        ),
        (
            "no match (scans every guest)".into(),
            format!("connected=any&selector=app%3Dnone&limit={l}"),
        ),
        (
            "connected=true (walks the live tunnels: none here)".into(),
            format!("connected=true&limit={l}"),
        ),
    ];
    let mut worst_p99 = Duration::ZERO;
    for (name, query) in &shapes {
        let path = format!("/kbs/v0/admin/guests?{query}");
        let mut times = Vec::with_capacity(args.rounds);
        let mut matched = 0;
        for _ in 0..args.rounds {
            let started = Instant::now();
            let v = admin.send(reqwest::Method::GET, &path, None).await?;
            times.push(started.elapsed());
            matched = v["guests"].as_array().map_or(0, Vec::len);
        }
        times.sort();
        let p99 = percentile(&times, 99.0);
        worst_p99 = worst_p99.max(p99);
        println!(
            "{:<58} {:>8} {:>7.2}ms {:>7.2}ms {:>7.2}ms",
            name,
            matched,
            percentile(&times, 50.0).as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
            times.last().copied().unwrap_or_default().as_secs_f64() * 1e3
        );
    }

    // Walk every page of one filter (what `kbsctl guests list --selector app=db` does).
    let started = Instant::now();
    let mut cursor: Option<String> = None;
    let (mut pages, mut total) = (0, 0);
    loop {
        let mut path =
            "/kbs/v0/admin/guests?connected=any&selector=app%3Ddb&limit=1000".to_string();
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let v = admin.send(reqwest::Method::GET, &path, None).await?;
        pages += 1;
        total += v["guests"].as_array().map_or(0, Vec::len);
        cursor = v["next_cursor"].as_str().map(str::to_string);
        if cursor.is_none() {
            break;
        }
    }
    println!(
        "\nall pages of app=db (limit 1000): {total} guests in {pages} pages, {:.0} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
    println!(
        "worst p99 of a filtered page: {:.2} ms (target < 50 ms): {}",
        worst_p99.as_secs_f64() * 1e3,
        if worst_p99 < Duration::from_millis(50) {
            "met"
        } else {
            "NOT met"
        }
    );
    state.shutdown.cancel();
    Ok(())
}
