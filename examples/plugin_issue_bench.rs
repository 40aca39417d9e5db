//! Issue rates of the provisioner and nebula-ca plugins: a KBS in process, on loopback, and
//! N concurrent clients over HTTP for a few seconds per level. Provision: admin
//! `POST /kbs/v0/provisioner/provision` for a new VM each time (UUID, random key, one sealed
//! SQLite write). Nebula: an attested guest's `GET /kbs/v0/nebula-ca/credential` (X25519 key,
//! Ed25519-signed certificate, JWE sealed to the TEE key). Prints calls/s, p50 and p99.
//! Baseline: upstream's nebula_ca runs `nebula-cert sign` and `nebula-cert verify`
//! (two processes) per credential; this prints the cost of one such process beside it when
//! `nebula-cert` is installed.
//!
//! ```sh
//! cargo run --release -p examples --example plugin_issue_bench -- --seconds 3 --levels 1,4,8
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use examples::percentile;
use guest_daemon::tee_key::TeeKeyPair;
use kbs_core::admin_key::AdminKeyPair;
use server::admin_client::AdminClient;
use server::app::Kbs;
use server::config::Config;

#[derive(Parser, Debug)]
struct Args {
    /// Seconds per level.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Concurrency levels, comma separated.
    #[arg(long, default_value = "1,4,8", value_delimiter = ',')]
    levels: Vec<usize>,
}

struct Level {
    calls: usize,
    errors: usize,
    elapsed: Duration,
    lat: Vec<Duration>,
}

async fn drive<F, Fut>(n: usize, seconds: u64, call: F) -> Level
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let call = Arc::new(call);
    let counter = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..n {
        let call = call.clone();
        let counter = counter.clone();
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut errors) = (Vec::new(), 0usize);
            while Instant::now() < deadline {
                let i = counter.fetch_add(1, Ordering::Relaxed);
                let t = Instant::now();
                if call(worker, i).await {
                    lat.push(t.elapsed());
                } else {
                    errors += 1;
                }
            }
            (lat, errors)
        }));
    }
    let mut level = Level {
        calls: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        lat: Vec::new(),
    };
    for t in tasks {
        if let Ok((lat, errors)) = t.await {
            level.calls += lat.len();
            level.errors += errors;
            level.lat.extend(lat);
        }
    }
    level.elapsed = started.elapsed();
    level.lat.sort();
    level
}

fn report(what: &str, n: usize, l: &Level) {
    println!(
        "{what:<10} concurrency {n:>2}: {:>7.0} calls/s  p50 {:>8.2?}  p99 {:>8.2?}  ({} calls, {} errors)",
        l.calls as f64 / l.elapsed.as_secs_f64(),
        percentile(&l.lat, 50.0),
        percentile(&l.lat, 99.0),
        l.calls,
        l.errors
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let mut config = Config::default();
    config.storage.data_dir = dir.path().join("data");
    config.http.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.log.level = "warn".into();
    config
        .plugins
        .set("provisioner", "kbs_url = \"https://kbs.example\"")?;
    let kbs = Kbs::build(config.clone()).await.context("KBS builds")?;
    let listener = tokio::net::TcpListener::bind(config.http.listen).await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(kbs.serve(listener));
    let admin = AdminClient::new(
        &url,
        AdminKeyPair::load(&config.storage.data_dir.join("admin.key"))?,
        None,
    )?;
    admin.set_policy(tests::ALLOW_SAMPLE).await?;
    let http = reqwest::Client::new();
    println!(
        "plugin_issue_bench: KBS and clients in one process ({} build), {} s per level",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        args.seconds
    );

    for &n in &args.levels {
        let token = Arc::new(admin.token()?);
        let (http, url) = (http.clone(), url.clone());
        let level = drive(n, args.seconds, move |_, i| {
            let (http, url, token) = (http.clone(), url.clone(), token.clone());
            async move {
                http.post(format!("{url}/kbs/v0/provisioner/provision"))
                    .bearer_auth(&*token)
                    .json(&serde_json::json!({"vm_name": format!("vm-{n}-{i}"), "namespace": "bench"}))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            }
        })
        .await;
        report("provision", n, &level);
    }

    for &n in &args.levels {
        // One attested guest per worker, each with its own [nebula] identity.
        let mut guests = Vec::new();
        for w in 0..n {
            let key = TeeKeyPair::new_ec();
            let init = format!(
                "[tether]\nguest_id = \"neb-{n}-{w}\"\n\n[nebula]\nname = \"node-{w}\"\nip = \"10.42.{}.{}/16\"\ngroups = [\"bench\"]\n",
                w / 250,
                w % 250 + 1
            );
            let token = tests::attest(&url, None, &key, Some(&init)).await?;
            guests.push((
                token,
                format!(
                    "name=node-{w}&ip=10.42.{}.{}/16&groups=bench",
                    w / 250,
                    w % 250 + 1
                ),
            ));
        }
        let guests = Arc::new(guests);
        let (http, url) = (http.clone(), url.clone());
        let level = drive(n, args.seconds, move |w, _| {
            let (http, url, guests) = (http.clone(), url.clone(), guests.clone());
            async move {
                let (token, query) = &guests[w];
                http.get(format!("{url}/kbs/v0/nebula-ca/credential?{query}"))
                    .bearer_auth(token)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            }
        })
        .await;
        report("nebula", n, &level);
    }

    // The upstream plugin's cost floor: one `nebula-cert` process (it runs two per credential).
    let ca_dir = tempfile::tempdir()?;
    let has_cli = std::process::Command::new("nebula-cert")
        .args(["ca", "-name", "bench", "-out-crt"])
        .arg(ca_dir.path().join("ca.crt"))
        .arg("-out-key")
        .arg(ca_dir.path().join("ca.key"))
        .output()
        .is_ok_and(|o| o.status.success());
    if has_cli {
        let rounds = 20;
        let t = Instant::now();
        for i in 0..rounds {
            let out = std::process::Command::new("nebula-cert")
                .current_dir(ca_dir.path())
                .args([
                    "sign",
                    "-name",
                    &format!("n{i}"),
                    "-ip",
                    "10.42.0.1/16",
                    "-out-crt",
                ])
                .arg(format!("n{i}.crt"))
                .arg("-out-key")
                .arg(format!("n{i}.key"))
                .output()?;
            anyhow::ensure!(out.status.success(), "nebula-cert sign failed");
        }
        println!(
            "baseline   nebula-cert sign (one process, no HTTP, no JWE): {:.2?} each, {:.0}/s one at a time",
            t.elapsed() / rounds,
            f64::from(rounds) / t.elapsed().as_secs_f64()
        );
    } else {
        println!("baseline   nebula-cert not installed: no process baseline");
    }
    Ok(())
}
