//! Probe benchmark: a real `kbs` process, N simulated guests in this process (each attests
//! for real with the sample TEE and holds a real tunnel over loopback), then one selector
//! call `POST /kbs/v0/probes` that probes all of them. Reports completion time, outcomes and
//! the KBS's CPU time for the call (from /proc).
//!
//! ```sh
//! cargo build --release --bin kbs
//! cargo run --release -p examples --example probe_bench -- --guests 10000
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use examples::{AttestedGuest, KbsProcess, connect_fleet, default_kbs_bin, proc_cpu_time};
use rpc_defs::{HeldResource, ProbeReport, RuntimeReport};
use server::admin_client::RequestBody;
use tests::{StubGuest, TunnelGuest, healthy};

#[derive(Parser, Debug)]
struct Args {
    /// Simulated guests.
    #[arg(long, default_value_t = 10_000)]
    guests: usize,
    /// Concurrency of the selector probe calls (comma-separated: one run each).
    #[arg(long, value_delimiter = ',', default_value = "256,1024")]
    concurrency: Vec<usize>,
    /// Guests attesting and connecting at once during set-up.
    #[arg(long, default_value_t = 32)]
    connect_concurrency: usize,
    /// The kbs binary.
    #[arg(long)]
    kbs_bin: Option<std::path::PathBuf>,
}

/// Answers every probe with health, one held resource (version 1, 2 or 3 by index) and
/// runtime figures.
fn sim_guest(index: usize) -> StubGuest {
    StubGuest::new()
        .refusing_bundles()
        .refusing_pushes()
        .on_probe(move |_| async move {
            Ok(ProbeReport {
                health: Some(healthy()),
                resources: Some(vec![HeldResource {
                    uri: "default/key/tls".into(),
                    version: 1 + (index % 3) as u64,
                    sha256: "ab".repeat(32),
                    applied_at: 1_760_000_000,
                }]),
                runtime: Some(RuntimeReport {
                    uptime_s: 60,
                    rss_bytes: 8 << 20,
                    daemon_version: "sim".into(),
                    open_tunnels: 1,
                }),
            })
        })
}

fn main() -> anyhow::Result<()> {
    examples::block_on_multi_thread(run(Args::parse()))
}

async fn connect(url: &str, index: usize) -> anyhow::Result<TunnelGuest> {
    let shard = format!("s{}", index % 10);
    let guest = AttestedGuest::attest(url, index, &[("app", "bench"), ("shard", &shard)]).await?;
    let config = tunnel::GuestTunnelConfig::new(tests::tunnel_url(url));
    Ok(TunnelGuest::dial(
        &config,
        &guest.token,
        guest.info(),
        &guest.key,
        sim_guest(index),
    )
    .await?)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let bin = args.kbs_bin.clone().unwrap_or_else(default_kbs_bin);
    let kbs = KbsProcess::start(&bin, &[]).await?;
    let admin = Arc::new(kbs.admin()?);
    // Sample-TEE guests may hold tunnels only under a development policy.
    admin
        .set_policy(include_str!("policies/allow-sample.rego"))
        .await?;

    let started = Instant::now();
    let sessions = connect_fleet(args.guests, args.connect_concurrency, |i| {
        connect(&kbs.url, i)
    })
    .await?;
    let setup = started.elapsed();
    println!(
        "{} guests attested and connected in {:.1} s; KBS RSS {} MiB",
        sessions.len(),
        setup.as_secs_f64(),
        kbs.rss_kib() / 1024
    );
    // Wait until the KBS lists them all.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = admin
            .send(
                reqwest::Method::GET,
                "/kbs/v0/admin/guests?limit=1&selector=app%3Dbench",
                None,
            )
            .await?;
        let live = v["known"].as_u64().unwrap_or(0) as usize;
        if live >= args.guests {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "only {live} guests known");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    println!(
        "\n{:>11} {:>6} {:>10} {:>12} {:>14} {:>10}",
        "concurrency", "kind", "selected", "completion", "KBS CPU", "outcomes"
    );
    for &c in &args.concurrency {
        for kind in ["health", "all"] {
            let cpu0 = proc_cpu_time(kbs.pid());
            let started = Instant::now();
            let body = serde_json::json!({
                "selector": "app=bench",
                "kind": kind,
                "concurrency": c,
                "deadline_ms": 120_000,
            });
            let v = admin
                .send(
                    reqwest::Method::POST,
                    "/kbs/v0/probes",
                    Some(RequestBody::Json(body)),
                )
                .await?;
            let wall = started.elapsed();
            let cpu = proc_cpu_time(kbs.pid()).saturating_sub(cpu0);
            println!(
                "{:>11} {:>6} {:>10} {:>10.0}ms {:>9.0}ms ({:.0}%) {}",
                c,
                kind,
                v["selected"],
                wall.as_secs_f64() * 1e3,
                cpu.as_secs_f64() * 1e3,
                cpu.as_secs_f64() / wall.as_secs_f64() * 100.0,
                v["summary"]
            );
        }
    }
    let drift = admin
        .send(
            reqwest::Method::GET,
            "/kbs/v0/admin/guests?connected=any&stale=default/key/tls&limit=1",
            None,
        )
        .await?;
    println!(
        "\n(the KBS holds no default/key/tls, so no guest is stale: {} listed)",
        drift["guests"].as_array().map_or(0, Vec::len)
    );
    drop(sessions);
    Ok(())
}
