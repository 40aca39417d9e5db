//! External plugin overhead: the same work, an attested GET answered with a secret sealed to
//! the caller's TEE key, served by a built-in plugin (`GET /kbs/v0/resource/...`: policy,
//! SQLite read, seal) and by an external plugin process (`GET /kbs/v0/external/...`: policy,
//! `ValidateAuth` + `Handle` + `NeedsEncryption` over gRPC, seal), through a real `kbs`
//! process on loopback. Prints p50, p99 and calls/s per concurrency for both, and the
//! external plugin's extra cost per call.
//!
//! ```sh
//! cargo run --release -p examples --example external_plugin_bench -- --calls 2000
//! ```
//! (The `kbs` and `upstream_plugin` binaries are built by the kit in the same profile as
//! this tool.)

use std::time::{Duration, Instant};

use clap::Parser;
use guest_daemon::tee_key::TeeKeyPair;
use server::admin_client::AdminClient;
use tests::{attest, spawn_kbs, spawn_upstream_plugin};

#[derive(Parser, Debug)]
struct Args {
    /// Calls per run.
    #[arg(long, default_value_t = 2000)]
    calls: usize,
    /// Concurrency levels (one run each, for both plugins).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    concurrency: Vec<usize>,
}

struct Figures {
    p50: Duration,
    p99: Duration,
    per_sec: f64,
}

async fn run(http: &reqwest::Client, url: &str, token: &str, calls: usize, conc: usize) -> Figures {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..conc {
        let (http, url, token) = (http.clone(), url.to_string(), token.to_string());
        let n = calls / conc + usize::from(w < calls % conc);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(n);
            for _ in 0..n {
                let t = Instant::now();
                let resp = http
                    .get(&url)
                    .bearer_auth(&token)
                    .send()
                    .await
                    .expect("request");
                assert!(resp.status().is_success(), "{url}: {}", resp.status());
                resp.bytes().await.expect("body");
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut lat = Vec::with_capacity(calls);
    for t in tasks {
        lat.extend(t.await.expect("worker"));
    }
    let elapsed = started.elapsed();
    lat.sort();
    let at = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
    Figures {
        p50: at(0.50),
        p99: at(0.99),
        per_sec: lat.len() as f64 / elapsed.as_secs_f64(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let dir = tempfile::tempdir()?;
    let plugin = spawn_upstream_plugin("127.0.0.1:0", None).await;
    let policy = dir.path().join("policy.rego");
    std::fs::write(&policy, tests::ALLOW_SAMPLE)?;
    let config = dir.path().join("kbs.toml");
    std::fs::write(
        &config,
        format!(
            "[policy]\ninitial_policy_file = \"{}\"\n\n[[plugins.external]]\nname = \"bench\"\nendpoint = \"http://{}\"\n",
            policy.display(),
            plugin.announced
        ),
    )?;
    let data = dir.path().join("data");
    let kbs = spawn_kbs(&data, Some(&config)).await;
    let base = kbs.announced.clone();
    let admin = AdminClient::new(
        &base,
        kbs_core::admin_key::AdminKeyPair::load(&data.join("admin.key"))?,
        None,
    )?;
    let secret = vec![7u8; 64];
    admin
        .put_resource("default/key/bench", secret.clone())
        .await?;
    let http = reqwest::Client::new();
    let resp = http
        .post(format!("{base}/kbs/v0/external/bench/secret/bench"))
        .bearer_auth(admin.token()?)
        .body(secret)
        .send()
        .await?;
    anyhow::ensure!(
        resp.status().is_success(),
        "store in the plugin: {}",
        resp.status()
    );
    let key = TeeKeyPair::new_ec();
    let token = attest(&base, None, &key, None).await?;
    let builtin = format!("{base}/kbs/v0/resource/default/key/bench");
    let external = format!("{base}/kbs/v0/external/bench/secret/bench");
    // Warm both paths (connections, the plugin's channel).
    run(&http, &builtin, &token, 200, 4).await;
    run(&http, &external, &token, 200, 4).await;

    println!(
        "external_plugin_bench: {} calls per run, {profile} build, kbs and plugin on loopback",
        args.calls
    );
    println!("baseline: the built-in resource plugin doing the same work (policy, read, seal)");
    println!(
        "{:>4}  {:>10} {:>10} {:>9}  {:>10} {:>10} {:>9}  {:>10}",
        "conc", "built p50", "built p99", "built/s", "ext p50", "ext p99", "ext/s", "extra p50"
    );
    for &c in &args.concurrency {
        let b = run(&http, &builtin, &token, args.calls, c).await;
        let e = run(&http, &external, &token, args.calls, c).await;
        let us = |d: Duration| d.as_micros();
        println!(
            "{c:>4}  {:>8}us {:>8}us {:>9.0}  {:>8}us {:>8}us {:>9.0}  {:>8}us",
            us(b.p50),
            us(b.p99),
            b.per_sec,
            us(e.p50),
            us(e.p99),
            e.per_sec,
            us(e.p50).saturating_sub(us(b.p50)),
        );
    }
    drop(kbs);
    drop(plugin);
    Ok(())
}
